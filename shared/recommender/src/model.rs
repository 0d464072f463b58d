//! Model kinds, hyperparameters and the networks.
//!
//! Every network encodes a left-padded window of item ids (`B x L`, int64, padding id =
//! `num_items`) into a user state `B x dim`, and scores items with the state against its own
//! item-embedding table (tied output, as the peer SASRec of bench/llara_anchor.py): `scores =
//! state @ item_emb.weight[0..num_items]^T`. The table rows are the item vectors the LLM's
//! projector consumes (LLaRA's `cacu_x` / `item_embeddings`).
//!
//! LLaRA's GRU4Rec and Caser have a separate output layer (`s_fc`) instead; our choice ties it
//! for all three kinds, so each kind's item vectors are trained by the very objective that
//! ranks them and every artefact exposes its item vectors the same way.

mod caser;
mod gru4rec;
mod sasrec;

use serde::{Deserialize, Serialize};
use tch::{Kind, TchError, Tensor, nn};

pub use caser::Caser;
pub use gru4rec::Gru4Rec;
pub use sasrec::SasRec;

use crate::RecError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Sasrec,
    Gru4rec,
    Caser,
}

impl ModelKind {
    pub const ALL: [ModelKind; 3] = [ModelKind::Sasrec, ModelKind::Gru4rec, ModelKind::Caser];

    /// The serde / CLI name: `sasrec`, `gru4rec`, `caser`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Sasrec => "sasrec",
            ModelKind::Gru4rec => "gru4rec",
            ModelKind::Caser => "caser",
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Hyperparameters (LLaRA's defaults: d=64, 1 block, 1 head, history 10, dropout 0.1).
/// Every field has a serde default, so a manifest or config file may name only what differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecConfig {
    /// Width of the item vectors and of the user state.
    pub dim: usize,
    /// History window; longer histories keep their last `max_history` items.
    pub max_history: usize,
    pub dropout: f64,
    /// SASRec: transformer blocks.
    pub num_blocks: usize,
    /// SASRec: attention heads (must divide `dim`).
    pub num_heads: usize,
    pub lr: f64,
    /// L2 penalty added to the gradients by Adam (LLaRA grid-searched 1e-3..1e-7; the peer
    /// SASRec that reached HR@1 0.379 used 0).
    pub weight_decay: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation HR@1 (0: never stop early).
    pub patience: usize,
    pub seed: u64,
    /// Caser: horizontal filters per height (heights 1..=max_history); the paper's n_h.
    pub caser_h_filters: usize,
    /// Caser: vertical filters; the paper's n_v.
    pub caser_v_filters: usize,
    /// Standard deviation of the N(0, s) item-embedding init. Per kind by default: SASRec 0.05,
    /// GRU4Rec 0.01 (LLaRA), Caser 1/sqrt(dim). SASRec departs from nn.Embedding's N(0, 1)
    /// (LLaRA, the peer anchor): with it SASRec never learned LastFM's 4,606 sparse items
    /// (test HR@1 0.057), while 0.05 gives 0.287 there and trains faster on MovieLens too
    /// (docs/results.md).
    pub item_init_std: f64,
}

impl RecConfig {
    /// LLaRA's settings (paper 5.1.2 and the shipped checkpoints: d=64, 1 block, 1 head,
    /// history 10, dropout 0.1, Adam lr 1e-3, batch 256) with the peer anchor's schedule (up
    /// to 40 epochs, best on val), the same for every kind; fields a kind does not use are
    /// ignored by it.
    pub fn default_for(kind: ModelKind) -> RecConfig {
        let base = RecConfig {
            dim: 64,
            max_history: 10,
            dropout: 0.1,
            num_blocks: 1,
            num_heads: 1,
            lr: 1e-3,
            weight_decay: 0.0,
            batch_size: 256,
            max_epochs: 40,
            // 10, not 5: on LLaRA's MovieLens split (94 val rows) SASRec's val HR@1 sits on a
            // plateau for 6 epochs early on; patience 5 stopped it there at test HR@1 0.21,
            // while its best of 40 epochs reaches 0.43.
            patience: 10,
            seed: 1234,
            caser_h_filters: 16,
            caser_v_filters: 4,
            item_init_std: 1.0,
        };
        let item_init_std = match kind {
            ModelKind::Sasrec => 0.05,
            ModelKind::Gru4rec => 0.01,
            ModelKind::Caser => 1.0 / (base.dim as f64).sqrt(),
        };
        RecConfig {
            item_init_std,
            ..base
        }
    }

    /// Rejects settings no network can be built or trained with.
    pub fn validate(&self, kind: ModelKind) -> Result<(), RecError> {
        let fail = |what: &str| Err(RecError::Invalid(format!("{kind} config: {what}")));
        if self.dim == 0 {
            return fail("dim must be > 0");
        }
        if self.max_history == 0 {
            return fail("max_history must be > 0");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return fail("dropout must be in [0, 1)");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return fail("lr must be a positive number");
        }
        if !(self.item_init_std.is_finite() && self.item_init_std > 0.0) {
            return fail("item_init_std must be a positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return fail("weight_decay must be >= 0");
        }
        if self.batch_size == 0 {
            return fail("batch_size must be > 0");
        }
        if self.max_epochs == 0 {
            return fail("max_epochs must be > 0");
        }
        match kind {
            ModelKind::Sasrec => {
                if self.num_blocks == 0 {
                    return fail("num_blocks must be > 0");
                }
                if self.num_heads == 0 || !self.dim.is_multiple_of(self.num_heads) {
                    return fail("num_heads must be > 0 and divide dim");
                }
            }
            ModelKind::Caser => {
                if self.caser_h_filters == 0 && self.caser_v_filters == 0 {
                    return fail("caser needs caser_h_filters > 0 or caser_v_filters > 0");
                }
            }
            ModelKind::Gru4rec => {}
        }
        Ok(())
    }
}

impl Default for RecConfig {
    fn default() -> Self {
        RecConfig::default_for(ModelKind::Sasrec)
    }
}

/// A sequential recommender network: encodes histories into user states. Scores are the
/// states against [`SeqRecommender::item_table`] (see the module docs).
pub trait SeqRecommender: Send + std::fmt::Debug {
    /// `history_ids`: `B x L` int64, LEFT-padded with the padding id (`num_items`), so the
    /// last column is the newest item; `L <= max_history`. Returns the user states `B x dim`.
    /// `train` switches dropout on.
    fn encode(&self, history_ids: &Tensor, train: bool) -> Result<Tensor, TchError>;

    /// The item-embedding table, `(num_items + 1) x dim`; the last row is the padding row and
    /// stays zero.
    fn item_table(&self) -> &Tensor;

    /// Number of real items (the table has one more row).
    fn num_items(&self) -> i64;

    /// `state @ item_table[0..num_items]^T`: `B x num_items`.
    fn score_items(&self, states: &Tensor) -> Result<Tensor, TchError> {
        states.f_matmul(&self.item_table().f_narrow(0, 0, self.num_items())?.f_tr()?)
    }
}

/// Builds the network of `kind` under `path` (its variables land in the path's VarStore).
pub fn build_network(
    kind: ModelKind,
    path: &nn::Path,
    config: &RecConfig,
    num_items: usize,
) -> Result<Box<dyn SeqRecommender>, RecError> {
    config.validate(kind)?;
    if num_items == 0 {
        return Err(RecError::Invalid(format!(
            "{kind}: the catalog has no items"
        )));
    }
    Ok(match kind {
        ModelKind::Sasrec => Box::new(SasRec::new(path, config, num_items)?),
        ModelKind::Gru4rec => Box::new(Gru4Rec::new(path, config, num_items)?),
        ModelKind::Caser => Box::new(Caser::new(path, config, num_items)?),
    })
}

/// The item-embedding table `item_emb.weight`, `(num_items + 1) x dim`, drawn from
/// N(0, init_std) with the padding row (`num_items`) zeroed.
fn item_embedding(
    path: &nn::Path,
    num_items: usize,
    dim: usize,
    init_std: f64,
) -> Result<Tensor, TchError> {
    let table = (path / "item_emb").f_var(
        "weight",
        &[num_items as i64 + 1, dim as i64],
        nn::Init::Randn {
            mean: 0.0,
            stdev: init_std,
        },
    )?;
    tch::no_grad(|| {
        table
            .f_narrow(0, num_items as i64, 1)?
            .f_zero_()
            .map(|_| ())
    })?;
    Ok(table)
}

/// Looks the ids up in the table; the padding id gets the (zero) padding row and no gradient.
fn embed_ids(table: &Tensor, ids: &Tensor, padding_id: i64) -> Result<Tensor, TchError> {
    Tensor::f_embedding(table, ids, padding_id, false, false)
}

/// A linear layer `y = x W^T + b` whose variables are `<name>.weight` (out x in) and
/// `<name>.bias`, initialised as PyTorch's `nn.Linear` (uniform in +-1/sqrt(in)).
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(path: &nn::Path, in_dim: usize, out_dim: usize) -> Result<Linear, TchError> {
        let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Linear {
            weight: path.f_var("weight", &[out_dim as i64, in_dim as i64], init)?,
            bias: path.f_var("bias", &[out_dim as i64], init)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_linear(&self.weight, Some(&self.bias))
    }
}

/// LayerNorm over the last dimension: `<name>.weight` (ones) and `<name>.bias` (zeros).
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    fn new(path: &nn::Path, dim: usize) -> Result<LayerNorm, TchError> {
        Ok(LayerNorm {
            weight: path.f_ones("weight", &[dim as i64])?,
            bias: path.f_zeros("bias", &[dim as i64])?,
            dim: dim as i64,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_layer_norm([self.dim], Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

/// `(batch, length)` of a history batch, checked against the window.
fn history_shape(history_ids: &Tensor, max_history: usize) -> Result<(i64, i64), TchError> {
    let (batch, length) = history_ids.size2()?;
    if length < 1 || length > max_history as i64 {
        return Err(TchError::Shape(format!(
            "history batch has {length} columns; expected 1..={max_history}"
        )));
    }
    if history_ids.kind() != Kind::Int64 {
        return Err(TchError::Kind(format!(
            "history ids must be int64, got {:?}",
            history_ids.kind()
        )));
    }
    Ok((batch, length))
}

#[cfg(test)]
pub(crate) mod tests {
    use tch::{Device, Kind, Tensor, nn};

    use super::*;

    pub(crate) fn tiny_config() -> RecConfig {
        RecConfig {
            dim: 8,
            max_history: 5,
            num_heads: 2,
            caser_h_filters: 3,
            caser_v_filters: 2,
            ..RecConfig::default()
        }
    }

    const NUM_ITEMS: usize = 30;

    fn build(kind: ModelKind) -> (nn::VarStore, Box<dyn SeqRecommender>) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = build_network(kind, &vs.root(), &tiny_config(), NUM_ITEMS).unwrap();
        (vs, net)
    }

    /// Two full rows, one partly padded row and one fully padded row.
    fn batch() -> Tensor {
        let pad = NUM_ITEMS as i64;
        Tensor::from_slice(&[
            1i64, 2, 3, 4, 5, //
            29, 0, 7, 7, 9, //
            pad, pad, pad, 4, 11, //
            pad, pad, pad, pad, pad,
        ])
        .view([4, 5])
    }

    #[test]
    fn every_kind_encodes_to_dim_and_scores_all_items_without_nan() {
        let _rng = crate::test_rng_lock();
        for kind in ModelKind::ALL {
            let (_vs, net) = build(kind);
            for train in [false, true] {
                let states = net.encode(&batch(), train).unwrap();
                assert_eq!(states.size(), vec![4, 8], "{kind}");
                let scores = net.score_items(&states).unwrap();
                assert_eq!(scores.size(), vec![4, NUM_ITEMS as i64], "{kind}");
                let nan = scores.isnan().any().int64_value(&[]);
                assert_eq!(nan, 0, "{kind} (train={train}) produced NaN");
            }
        }
    }

    #[test]
    fn backward_reaches_the_item_embeddings_but_not_the_padding_row() {
        let _rng = crate::test_rng_lock();
        for kind in ModelKind::ALL {
            let (vs, net) = build(kind);
            let states = net.encode(&batch(), true).unwrap();
            let logits = net.score_items(&states).unwrap();
            let targets = Tensor::from_slice(&[6i64, 10, 12, 0]);
            let loss = logits.cross_entropy_for_logits(&targets);
            loss.backward();
            let table = vs.variables()["item_emb.weight"].shallow_clone();
            let grad = table.grad();
            let item_grad = grad.narrow(0, 0, NUM_ITEMS as i64).abs().sum(Kind::Float);
            assert!(
                item_grad.double_value(&[]) > 0.0,
                "{kind}: no gradient to items"
            );
            let pad_grad = grad.narrow(0, NUM_ITEMS as i64, 1).abs().sum(Kind::Float);
            assert_eq!(
                pad_grad.double_value(&[]),
                0.0,
                "{kind}: padding row got gradient"
            );
            let pad_row = table.narrow(0, NUM_ITEMS as i64, 1).abs().sum(Kind::Float);
            assert_eq!(
                pad_row.double_value(&[]),
                0.0,
                "{kind}: padding row not zero"
            );
        }
    }

    #[test]
    fn shorter_windows_are_accepted_and_longer_ones_rejected() {
        let _rng = crate::test_rng_lock();
        for kind in ModelKind::ALL {
            let (_vs, net) = build(kind);
            let short = Tensor::from_slice(&[3i64, 4]).view([1, 2]);
            assert_eq!(
                net.encode(&short, false).unwrap().size(),
                vec![1, 8],
                "{kind}"
            );
            let long = Tensor::zeros([1, 6], (Kind::Int64, Device::Cpu));
            assert!(net.encode(&long, false).is_err(), "{kind}");
        }
    }

    #[test]
    fn parameter_names_are_flat_and_stable() {
        let _rng = crate::test_rng_lock();
        let (vs, _) = build(ModelKind::Sasrec);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert!(names.contains(&"item_emb.weight".to_owned()));
        assert!(names.contains(&"pos_emb.weight".to_owned()));
        assert!(names.contains(&"blocks.0.attn.in_proj_weight".to_owned()));
        assert!(names.contains(&"final_ln.weight".to_owned()));
        let (vs, _) = build(ModelKind::Gru4rec);
        assert!(vs.variables().contains_key("gru.weight_ih_l0"));
        let (vs, _) = build(ModelKind::Caser);
        assert!(vs.variables().contains_key("conv_v.weight"));
        assert!(vs.variables().contains_key("conv_h.0.weight"));
    }

    #[test]
    fn config_defaults_fill_missing_fields() {
        let _rng = crate::test_rng_lock();
        let config: RecConfig = serde_json::from_str(r#"{"dim": 16}"#).unwrap();
        assert_eq!(config.dim, 16);
        assert_eq!(config.max_history, 10);
        assert_eq!(RecConfig::default_for(ModelKind::Caser).caser_v_filters, 4);
        let mut bad = tiny_config();
        bad.num_heads = 3;
        assert!(bad.validate(ModelKind::Sasrec).is_err());
        assert!(bad.validate(ModelKind::Gru4rec).is_ok());
    }
}
