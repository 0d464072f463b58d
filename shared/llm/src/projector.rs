//! The projector `P` of RSLLM's hybrid encoding (LLaRA's design): the frozen recommender's
//! item vector `e_i` (d_id = 64) mapped into the LLM's input-embedding space,
//! `P(e) = W2 GELU(W1 e + b1) + b2`, `W1: d_id -> d_llm`, `W2: d_llm -> d_llm`.

use tch::{Tensor, nn};

use crate::error::{LlmError, Result};

/// Variables `projector.fc1.{weight,bias}` and `projector.fc2.{weight,bias}` under the path
/// it is built on (the trainable store, beside the LoRA adapters).
#[derive(Debug)]
pub struct Projector {
    fc1: nn::Linear,
    fc2: nn::Linear,
    pub d_id: usize,
    pub d_llm: usize,
}

impl Projector {
    pub fn new(path: &nn::Path, d_id: usize, d_llm: usize) -> Projector {
        let p = path / "projector";
        Projector {
            fc1: nn::linear(&p / "fc1", d_id as i64, d_llm as i64, Default::default()),
            fc2: nn::linear(&p / "fc2", d_llm as i64, d_llm as i64, Default::default()),
            d_id,
            d_llm,
        }
    }

    /// `[N, d_id]` item vectors to `[N, d_llm]` slot embeddings.
    pub fn forward(&self, item_vectors: &Tensor) -> Result<Tensor> {
        let size = item_vectors.size();
        if size.len() != 2 || size[1] != self.d_id as i64 {
            return Err(LlmError::invalid(format!(
                "item vectors {size:?} do not fit the projector's input [N, {}]",
                self.d_id
            )));
        }
        let x = item_vectors.f_to_kind(self.fc1.ws.kind())?;
        let hidden = x
            .f_linear(&self.fc1.ws, self.fc1.bs.as_ref())?
            .f_gelu("none")?;
        Ok(hidden.f_linear(&self.fc2.ws, self.fc2.bs.as_ref())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn maps_item_vectors_to_the_llm_width_and_learns() {
        let _rng = crate::test_rng_lock();
        use tch::nn::OptimizerConfig;
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let projector = Projector::new(&vs.root(), 64, 32);
        let names = vs.variables();
        for name in [
            "projector.fc1.weight",
            "projector.fc1.bias",
            "projector.fc2.weight",
            "projector.fc2.bias",
        ] {
            assert!(names.contains_key(name), "{name}");
        }
        let e = Tensor::randn([5, 64], (Kind::Float, Device::Cpu));
        assert_eq!(projector.forward(&e).unwrap().size(), [5, 32]);
        let err = projector
            .forward(&Tensor::zeros([5, 63], (Kind::Float, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[5, 63]"), "{err}");
        // It can fit fixed targets: gradients reach both layers.
        let target = Tensor::randn([5, 32], (Kind::Float, Device::Cpu));
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        let loss = |p: &Projector| {
            (p.forward(&e).unwrap() - &target)
                .square()
                .mean(Kind::Float)
        };
        let first = loss(&projector).double_value(&[]);
        for _ in 0..100 {
            opt.backward_step(&loss(&projector));
        }
        assert!(loss(&projector).double_value(&[]) < first * 0.1);
    }
}
