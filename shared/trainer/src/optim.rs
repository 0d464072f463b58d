//! AdamW (Loshchilov & Hutter 2019, decoupled weight decay) with its moment buffers as plain
//! tensors, so they can be checkpointed and restored: a resumed run continues exactly where
//! the killed one stopped. Same update as `torch.optim.AdamW`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' Trainer defaults, which LLaRA trains with.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Sorted by name: the order of the state and of the gradient-norm sum is fixed.
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("params", &self.params.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl AdamW {
    /// Optimises the variables of `vs` that require gradients.
    pub fn for_var_store(vs: &nn::VarStore, config: AdamWConfig) -> Result<AdamW> {
        let params = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        AdamW::new(params, config)
    }

    pub fn new(mut params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<AdamW> {
        if params.is_empty() {
            return Err(TrainError::Invalid(
                "nothing to optimise: no trainable tensors".into(),
            ));
        }
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |p: &Tensor| p.f_zeros_like();
        let exp_avg = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<Result<_, _>>()?;
        let exp_avg_sq = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<Result<_, _>>()?;
        Ok(AdamW {
            config,
            params,
            exp_avg,
            exp_avg_sq,
            steps: 0,
        })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping (as `torch.nn.utils.clip_grad_norm_`).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        // Summed on the parameters' device and read once: one host sync per step, not one
        // per tensor (hundreds with LoRA on every projection).
        let mut total: Option<Tensor> = None;
        for (_, p) in &self.params {
            let g = p.grad();
            if g.defined() {
                let squares = g.f_square()?.f_sum(Kind::Double)?;
                total = Some(match total {
                    None => squares,
                    Some(t) => t.f_add(&squares)?,
                });
            }
        }
        let norm = total.map_or(Ok(0.0), |t| t.f_double_value(&[]))?.sqrt();
        if !norm.is_finite() {
            return Err(TrainError::Invalid(format!(
                "gradient norm is {norm}: the loss diverged"
            )));
        }
        if norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for (_, p) in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(scale)?;
                }
            }
        }
        Ok(norm)
    }

    /// One update at learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let c = &self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, (_, p)) in self.params.iter_mut().enumerate() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let g = g.f_to_kind(Kind::Float)?;
            if c.weight_decay > 0.0 {
                let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            let m = &mut self.exp_avg[i];
            let _ = m
                .f_mul_scalar_(c.beta1)?
                .f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
            let v = &mut self.exp_avg_sq[i];
            let _ = v
                .f_mul_scalar_(c.beta2)?
                .f_add_(&g.f_square()?.f_mul_scalar(1.0 - c.beta2)?)?;
            let denom = v.f_div_scalar(bias2)?.f_sqrt()?.f_add_scalar(c.eps)?;
            let update = m.f_div(&denom)?.f_mul_scalar(lr / bias1)?;
            let _ = p.f_sub_(&update.f_to_kind(p.kind())?)?;
        }
        Ok(())
    }

    /// The moment buffers, named `exp_avg.{param}` and `exp_avg_sq.{param}`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut named = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            named.push((format!("exp_avg.{name}"), self.exp_avg[i].shallow_clone()));
            named.push((
                format!("exp_avg_sq.{name}"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        named
    }

    /// Restores buffers written by [`AdamW::state`] after `steps` updates. Every parameter must
    /// find both buffers with its shape.
    pub fn load_state(&mut self, named: Vec<(String, Tensor)>, steps: u64) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, buffer) in [
                ("exp_avg", &mut self.exp_avg[i]),
                ("exp_avg_sq", &mut self.exp_avg_sq[i]),
            ] {
                let key = format!("{prefix}.{name}");
                let saved = by_name
                    .remove(&key)
                    .ok_or_else(|| TrainError::Invalid(format!("optimizer state lacks {key}")))?;
                if saved.size() != p.size() {
                    return Err(TrainError::Invalid(format!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        saved.size(),
                        p.size()
                    )));
                }
                buffer.f_copy_(&saved)?;
            }
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(TrainError::Invalid(format!(
                "optimizer state holds {extra}, which matches no trained parameter"
            )));
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig;
    use tch::{Device, Kind};

    fn quadratic_store(seed: i64) -> (nn::VarStore, Tensor) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().randn("w", &[4, 3], 0.0, 1.0);
        (vs, w)
    }

    fn loss(w: &Tensor) -> Tensor {
        let target = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).view([1, 3]);
        (w - target).square().sum(Kind::Float) + w.abs().sum(Kind::Float) * 0.1
    }

    #[test]
    fn matches_libtorch_adamw() {
        let _rng = crate::test_support::rng_lock();
        let config = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let (vs_ref, w_ref) = quadratic_store(1);
        let mut reference = nn::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            wd: 0.01,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&vs_ref, 0.05)
        .unwrap();
        let (vs, w) = quadratic_store(1);
        let mut ours = AdamW::for_var_store(&vs, config).unwrap();
        for _ in 0..20 {
            reference.zero_grad();
            loss(&w_ref).backward();
            reference.step();
            ours.zero_grad();
            loss(&w).backward();
            ours.step(0.05).unwrap();
        }
        let diff = (&w - &w_ref).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn restored_state_continues_like_an_uninterrupted_run() {
        let _rng = crate::test_support::rng_lock();
        let config = AdamWConfig::default();
        let run = |w: &Tensor, opt: &mut AdamW, steps: usize| {
            for _ in 0..steps {
                opt.zero_grad();
                loss(w).backward();
                opt.clip_grad_norm(1.0).unwrap();
                opt.step(0.1).unwrap();
            }
        };
        let (vs, w) = quadratic_store(2);
        let mut straight = AdamW::for_var_store(&vs, config.clone()).unwrap();
        run(&w, &mut straight, 6);

        let (vs_a, w_a) = quadratic_store(2);
        let mut first = AdamW::for_var_store(&vs_a, config.clone()).unwrap();
        run(&w_a, &mut first, 3);
        let saved_w = w_a.copy();
        let saved_state: Vec<(String, Tensor)> = first
            .state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();

        let (vs_b, mut w_b) = quadratic_store(99);
        tch::no_grad(|| w_b.copy_(&saved_w));
        let mut resumed = AdamW::for_var_store(&vs_b, config).unwrap();
        resumed.load_state(saved_state, first.steps()).unwrap();
        run(&w_b, &mut resumed, 3);
        assert_eq!(resumed.steps(), 6);
        assert!(
            w.equal(&w_b),
            "resumed run must equal the uninterrupted one"
        );
    }

    #[test]
    fn clipping_bounds_the_gradient_norm() {
        let _rng = crate::test_support::rng_lock();
        let (vs, w) = quadratic_store(3);
        let mut opt = AdamW::for_var_store(&vs, AdamWConfig::default()).unwrap();
        (loss(&w) * 100.0).backward();
        let before = opt.clip_grad_norm(0.5).unwrap();
        assert!(before > 0.5);
        let after = w.grad().square().sum(Kind::Double).double_value(&[]).sqrt();
        assert!((after - 0.5).abs() < 1e-4, "{after}");
    }

    #[test]
    fn bad_state_is_refused_by_name() {
        let _rng = crate::test_support::rng_lock();
        let (vs, _) = quadratic_store(4);
        let mut opt = AdamW::for_var_store(&vs, AdamWConfig::default()).unwrap();
        let err = opt.load_state(Vec::new(), 1).unwrap_err().to_string();
        assert!(err.contains("exp_avg.w"), "{err}");
        let wrong = vec![
            (
                "exp_avg.w".to_owned(),
                Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            ),
            (
                "exp_avg_sq.w".to_owned(),
                Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)),
            ),
        ];
        let err = opt.load_state(wrong, 1).unwrap_err().to_string();
        assert!(err.contains("[2]"), "{err}");
    }
}
