//! SASRec (Kang & McAuley, ICDM 2018) in the form of the peer SASRec of
//! bench/llara_anchor.py (HR@1 0.379 on LLaRA's MovieLens test): item + learned positional
//! embedding, dropout, then per block a pre-LayerNorm causal self-attention whose query is the
//! normalised input and whose keys/values are the raw input (as `nn.MultiheadAttention(q, h,
//! h)` there), a residual from the normalised query, a LayerNorm'd point-wise FFN with
//! residual, and a final LayerNorm. The user state is the last position, which left padding
//! makes the newest item.

use tch::{Device, Kind, TchError, Tensor, nn};

use super::{LayerNorm, Linear, SeqRecommender, embed_ids, history_shape, item_embedding};
use crate::RecConfig;

/// Added to masked attention logits. Finite on purpose: a query whose keys are all masked
/// (the padded positions before the first item) gets a uniform softmax instead of NaN, and
/// such positions never feed a real position because they are masked as keys.
const MASKED_LOGIT: f64 = -1e9;

#[derive(Debug)]
pub struct SasRec {
    item_emb: Tensor,
    pos_emb: Tensor,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
    num_items: i64,
    max_history: usize,
    dropout: f64,
}

#[derive(Debug)]
struct Block {
    attn_ln: LayerNorm,
    attn: SelfAttention,
    ffn_ln: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Multi-head attention with PyTorch `nn.MultiheadAttention`'s parameter layout:
/// `in_proj_weight` (3d x d, rows q|k|v), `in_proj_bias`, `out_proj.{weight,bias}`.
#[derive(Debug)]
struct SelfAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    num_heads: i64,
    dim: i64,
}

impl SasRec {
    pub fn new(path: &nn::Path, config: &RecConfig, num_items: usize) -> Result<SasRec, TchError> {
        let dim = config.dim;
        // N(0, config.item_init_std): 0.05 by default, see RecConfig::item_init_std.
        let item_emb = item_embedding(path, num_items, dim, config.item_init_std)?;
        let pos_emb = (path / "pos_emb").f_var(
            "weight",
            &[config.max_history as i64, dim as i64],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let blocks = (0..config.num_blocks)
            .map(|i| Block::new(&(path / "blocks" / i), config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SasRec {
            item_emb,
            pos_emb,
            blocks,
            final_ln: LayerNorm::new(&(path / "final_ln"), dim)?,
            num_items: num_items as i64,
            max_history: config.max_history,
            dropout: config.dropout,
        })
    }
}

impl Block {
    fn new(path: &nn::Path, config: &RecConfig) -> Result<Block, TchError> {
        let dim = config.dim;
        let ffn = path / "ffn";
        Ok(Block {
            attn_ln: LayerNorm::new(&(path / "attn_ln"), dim)?,
            attn: SelfAttention::new(&(path / "attn"), dim, config.num_heads)?,
            ffn_ln: LayerNorm::new(&(path / "ffn_ln"), dim)?,
            fc1: Linear::new(&(&ffn / "fc1"), dim, dim)?,
            fc2: Linear::new(&(&ffn / "fc2"), dim, dim)?,
        })
    }

    /// `hidden`: B x L x d; `masked`: B x 1 x L x L, true where a query may not see a key.
    fn forward(
        &self,
        hidden: &Tensor,
        masked: &Tensor,
        dropout: f64,
        train: bool,
    ) -> Result<Tensor, TchError> {
        let query = self.attn_ln.forward(hidden)?;
        let attended = self.attn.forward(&query, hidden, masked, dropout, train)?;
        let hidden = query.f_add(&attended)?;
        let ffn_in = self.ffn_ln.forward(&hidden)?;
        let ffn_out = self.fc2.forward(
            &self
                .fc1
                .forward(&ffn_in)?
                .f_relu()?
                .f_dropout(dropout, train)?,
        )?;
        hidden.f_add(&ffn_out)
    }
}

impl SelfAttention {
    fn new(path: &nn::Path, dim: usize, num_heads: usize) -> Result<SelfAttention, TchError> {
        // Xavier-uniform in-projection and zero biases: nn.MultiheadAttention's init.
        let bound = (6.0 / (dim as f64 + dim as f64)).sqrt();
        Ok(SelfAttention {
            in_proj_weight: path.f_var(
                "in_proj_weight",
                &[3 * dim as i64, dim as i64],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?,
            in_proj_bias: path.f_zeros("in_proj_bias", &[3 * dim as i64])?,
            out_proj: Linear::new(&(path / "out_proj"), dim, dim)?,
            num_heads: num_heads as i64,
            dim: dim as i64,
        })
    }

    /// Rows `part*d .. (part+1)*d` of the in-projection (0 = query, 1 = key, 2 = value).
    fn project(&self, xs: &Tensor, part: i64) -> Result<Tensor, TchError> {
        let weight = self.in_proj_weight.f_narrow(0, part * self.dim, self.dim)?;
        let bias = self.in_proj_bias.f_narrow(0, part * self.dim, self.dim)?;
        xs.f_linear(&weight, Some(&bias))
    }

    /// B x L x d -> B x heads x L x head_dim.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let (batch, length, _) = xs.size3()?;
        xs.f_view([batch, length, self.num_heads, self.dim / self.num_heads])?
            .f_transpose(1, 2)
    }

    fn forward(
        &self,
        query: &Tensor,
        key_value: &Tensor,
        masked: &Tensor,
        dropout: f64,
        train: bool,
    ) -> Result<Tensor, TchError> {
        let (batch, length, _) = query.size3()?;
        let q = self.split_heads(&self.project(query, 0)?)?;
        let k = self.split_heads(&self.project(key_value, 1)?)?;
        let v = self.split_heads(&self.project(key_value, 2)?)?;
        let head_dim = (self.dim / self.num_heads) as f64;
        let logits = q
            .f_matmul(&k.f_transpose(-2, -1)?)?
            .f_div_scalar(head_dim.sqrt())?;
        let weights = logits
            .f_masked_fill(masked, MASKED_LOGIT)?
            .f_softmax(-1, logits.kind())?
            .f_dropout(dropout, train)?;
        let context = weights
            .f_matmul(&v)?
            .f_transpose(1, 2)?
            .f_contiguous()?
            .f_view([batch, length, self.dim])?;
        self.out_proj.forward(&context)
    }
}

/// B x 1 x L x L, true where query i may not attend to key j: future keys (j > i) and padded
/// keys.
fn attention_mask(
    history_ids: &Tensor,
    padding_id: i64,
    device: Device,
) -> Result<Tensor, TchError> {
    let (_, length) = history_ids.size2()?;
    let future = Tensor::f_ones([length, length], (Kind::Bool, device))?.f_triu(1)?;
    let padded_keys = history_ids.f_eq(padding_id)?.f_unsqueeze(1)?; // B x 1 x L
    future
        .f_unsqueeze(0)?
        .f_logical_or(&padded_keys)?
        .f_unsqueeze(1)
}

impl SeqRecommender for SasRec {
    fn encode(&self, history_ids: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let (_, length) = history_shape(history_ids, self.max_history)?;
        // A shorter window takes the last positions, so the newest item always sits at the
        // same position as in full windows.
        let positions = self
            .pos_emb
            .f_narrow(0, self.max_history as i64 - length, length)?;
        let mut hidden = embed_ids(&self.item_emb, history_ids, self.num_items)?
            .f_add(&positions.f_unsqueeze(0)?)?
            .f_dropout(self.dropout, train)?;
        let masked = attention_mask(history_ids, self.num_items, history_ids.device())?;
        for block in &self.blocks {
            hidden = block.forward(&hidden, &masked, self.dropout, train)?;
        }
        self.final_ln.forward(&hidden.f_select(1, length - 1)?)
    }

    fn item_table(&self) -> &Tensor {
        &self.item_emb
    }

    fn num_items(&self) -> i64 {
        self.num_items
    }
}
