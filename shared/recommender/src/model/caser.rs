//! Caser (Tang & Wang, WSDM 2018) without the user embedding (our rows carry no trainable
//! user ids): the L x d embedding matrix of the window goes through horizontal convolutions
//! (heights 1..=L, `n_h` filters each, ReLU, max-pooled over time: union-level patterns) and
//! a vertical convolution (`n_v` filters of height L: weighted sums of the rows, point-level
//! patterns); their concatenation -> dropout -> Linear -> ReLU is the user state, scored
//! against the item embeddings (tied output, see the module docs of `model`).
//!
//! Padded positions read the zero padding row, so they add nothing to the vertical sums and
//! only the biases to the horizontal filters.

use tch::{Kind, TchError, Tensor, nn};

use super::{Linear, SeqRecommender, embed_ids, history_shape, item_embedding};
use crate::RecConfig;

#[derive(Debug)]
pub struct Caser {
    item_emb: Tensor,
    /// `conv_h.{i}`: filters of height i+1, weight `n_h x 1 x (i+1) x d`.
    horizontal: Vec<Conv>,
    /// `conv_v`: weight `n_v x 1 x L x 1`; absent when n_v = 0.
    vertical: Option<Conv>,
    fc: Linear,
    num_items: i64,
    max_history: usize,
    dropout: f64,
}

#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    /// PyTorch `nn.Conv2d`'s init: uniform in +-1/sqrt(fan_in).
    fn new(path: &nn::Path, out_channels: i64, kernel: [i64; 2]) -> Result<Conv, TchError> {
        let fan_in = (kernel[0] * kernel[1]).max(1) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Conv {
            weight: path.f_var("weight", &[out_channels, 1, kernel[0], kernel[1]], init)?,
            bias: path.f_var("bias", &[out_channels], init)?,
        })
    }

    /// Horizontal filters (`n_h x 1 x h x d`) over `embedded` (B x L x d), ReLU, max over
    /// time: B x n_h. Computed as one matmul over the unfolded windows: the same numbers as
    /// `conv2d` (cross-correlation), several times faster on CPU, backward included, for
    /// kernels as wide as the embedding.
    fn horizontal(&self, embedded: &Tensor) -> Result<Tensor, TchError> {
        let (batch, length, dim) = embedded.size3()?;
        let (filters, height) = (self.weight.size()[0], self.weight.size()[2]);
        let windows = length - height + 1;
        // B x T x d x h -> B x T x h x d -> B x T x (h*d), rows in the kernel's (h, d) order.
        let unfolded = embedded
            .f_unfold(1, height, 1)?
            .f_transpose(-1, -2)?
            .f_reshape([batch, windows, height * dim])?;
        let kernel = self.weight.f_view([filters, height * dim])?;
        unfolded
            .f_linear(&kernel, Some(&self.bias))?
            .f_relu()?
            .f_amax([1], false)
    }

    /// Vertical filters (`n_v x 1 x L x 1`): per filter a weighted sum of the L rows,
    /// B x (n_v * d).
    fn vertical(&self, embedded: &Tensor) -> Result<Tensor, TchError> {
        let (filters, length) = (self.weight.size()[0], self.weight.size()[2]);
        let mixed = self
            .weight
            .f_view([filters, length])?
            .f_matmul(embedded)? // B x n_v x d
            .f_add(&self.bias.f_view([1, filters, 1])?)?;
        mixed.f_flatten(1, -1)
    }
}

impl Caser {
    pub fn new(path: &nn::Path, config: &RecConfig, num_items: usize) -> Result<Caser, TchError> {
        let dim = config.dim as i64;
        let window = config.max_history as i64;
        let n_h = config.caser_h_filters as i64;
        let n_v = config.caser_v_filters as i64;
        // N(0, 1/sqrt(d)): the state is a ReLU(Linear) of O(1) entries, so rows of norm ~1
        // keep the initial tied-output scores O(1).
        let item_emb = item_embedding(path, num_items, config.dim, config.item_init_std)?;
        let horizontal = if n_h > 0 {
            (1..=window)
                .map(|height| Conv::new(&(path / "conv_h" / (height - 1)), n_h, [height, dim]))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let vertical = if n_v > 0 {
            Some(Conv::new(&(path / "conv_v"), n_v, [window, 1])?)
        } else {
            None
        };
        let features = n_h * window + n_v * dim;
        Ok(Caser {
            item_emb,
            horizontal,
            vertical,
            fc: Linear::new(&(path / "fc"), features as usize, config.dim)?,
            num_items: num_items as i64,
            max_history: config.max_history,
            dropout: config.dropout,
        })
    }
}

impl SeqRecommender for Caser {
    fn encode(&self, history_ids: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let (batch, length) = history_shape(history_ids, self.max_history)?;
        let window = self.max_history as i64;
        // The filters span the full window, so a shorter batch is left-padded to it.
        let history_ids = if length < window {
            let padding = Tensor::f_full(
                [batch, window - length],
                self.num_items,
                (Kind::Int64, history_ids.device()),
            )?;
            Tensor::f_cat(&[&padding, history_ids], 1)?
        } else {
            history_ids.shallow_clone()
        };
        let embedded = embed_ids(&self.item_emb, &history_ids, self.num_items)?; // B x L x d
        let mut features = Vec::with_capacity(self.horizontal.len() + 1);
        for conv in &self.horizontal {
            features.push(conv.horizontal(&embedded)?);
        }
        if let Some(conv) = &self.vertical {
            features.push(conv.vertical(&embedded)?);
        }
        let concatenated = Tensor::f_cat(&features, 1)?.f_dropout(self.dropout, train)?;
        self.fc.forward(&concatenated)?.f_relu()
    }

    fn item_table(&self) -> &Tensor {
        &self.item_emb
    }

    fn num_items(&self) -> i64 {
        self.num_items
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor, nn};

    use super::*;

    /// The matmul forms equal PyTorch's conv2d on the same parameters.
    #[test]
    fn matmul_convolutions_match_conv2d() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let embedded = Tensor::randn([4, 6, 8], (Kind::Float, Device::Cpu));
        let image = embedded.unsqueeze(1); // B x 1 x L x d
        for height in [1, 3, 6] {
            let conv = Conv::new(&(vs.root() / "h" / height), 5, [height, 8]).unwrap();
            let reference = image
                .conv2d(&conv.weight, Some(&conv.bias), [1, 1], [0, 0], [1, 1], 1)
                .relu()
                .amax([2, 3], false);
            let ours = conv.horizontal(&embedded).unwrap();
            assert!(
                ours.allclose(&reference, 1e-5, 1e-5, false),
                "height {height}"
            );
        }
        let conv = Conv::new(&(vs.root() / "v"), 3, [6, 1]).unwrap();
        let reference = image
            .conv2d(&conv.weight, Some(&conv.bias), [1, 1], [0, 0], [1, 1], 1)
            .flatten(1, -1);
        let ours = conv.vertical(&embedded).unwrap();
        assert!(ours.allclose(&reference, 1e-5, 1e-5, false));
    }
}
