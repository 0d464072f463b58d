//! GRU4Rec (Hidasi et al., ICLR 2016) as LLaRA ships it: item embedding (N(0, 0.01)) ->
//! one-layer GRU -> the hidden state after the last step is the user state. With left padding
//! the last step is the newest item; the padded steps before the first item read the zero
//! padding row, so every history of the same length starts from the same state.

use tch::{TchError, Tensor, nn};

use super::{SeqRecommender, embed_ids, history_shape, item_embedding};
use crate::RecConfig;

#[derive(Debug)]
pub struct Gru4Rec {
    item_emb: Tensor,
    /// PyTorch `nn.GRU` layout: `weight_ih_l0` (3d x d), `weight_hh_l0`, `bias_ih_l0`,
    /// `bias_hh_l0`; gate order r|z|n.
    gru_weights: Vec<Tensor>,
    dim: i64,
    num_items: i64,
    max_history: usize,
    dropout: f64,
}

impl Gru4Rec {
    pub fn new(path: &nn::Path, config: &RecConfig, num_items: usize) -> Result<Gru4Rec, TchError> {
        let dim = config.dim as i64;
        let item_emb = item_embedding(path, num_items, config.dim, config.item_init_std)?;
        // nn.GRU's init: every weight and bias uniform in +-1/sqrt(hidden).
        let bound = 1.0 / (dim as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let gru = path / "gru";
        let gru_weights = vec![
            gru.f_var("weight_ih_l0", &[3 * dim, dim], init)?,
            gru.f_var("weight_hh_l0", &[3 * dim, dim], init)?,
            gru.f_var("bias_ih_l0", &[3 * dim], init)?,
            gru.f_var("bias_hh_l0", &[3 * dim], init)?,
        ];
        Ok(Gru4Rec {
            item_emb,
            gru_weights,
            dim,
            num_items: num_items as i64,
            max_history: config.max_history,
            dropout: config.dropout,
        })
    }
}

impl SeqRecommender for Gru4Rec {
    fn encode(&self, history_ids: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let (batch, _) = history_shape(history_ids, self.max_history)?;
        let inputs = embed_ids(&self.item_emb, history_ids, self.num_items)?
            .f_dropout(self.dropout, train)?;
        let initial = Tensor::f_zeros(
            [1, batch, self.dim],
            (self.item_emb.kind(), history_ids.device()),
        )?;
        let (_, last_hidden) = inputs.f_gru(
            &initial,
            &self.gru_weights,
            true,  // has_biases
            1,     // num_layers
            0.0,   // dropout between layers (there is one layer)
            train, // train
            false, // bidirectional
            true,  // batch_first
        )?;
        // 1 x B x d -> B x d
        last_hidden.f_select(0, 0)
    }

    fn item_table(&self) -> &Tensor {
        &self.item_emb
    }

    fn num_items(&self) -> i64 {
        self.num_items
    }
}
