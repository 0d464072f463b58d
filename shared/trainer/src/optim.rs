//! AdamW (Loshchilov & Hutter 2019, decoupled weight decay) with its moment buffers as plain
//! tensors, so they can be checkpointed and restored: a resumed run continues exactly where
//! the killed one stopped. Same update as `torch.optim.AdamW`, with one step count for all
//! tensors (torch keeps one per tensor; they differ only for a tensor whose first gradient
//! comes after the first step).
//!
//! Multi-tensor: the trained tensors of one device and dtype are moved into one flat buffer
//! (each parameter becomes a view of it, the way Apex and DeepSpeed flatten parameters), and
//! so are their gradients once every one of them exists. Zeroing, the gradient norm, clipping
//! and the update are then a handful of kernels per step instead of a dozen per tensor: on a
//! GPU the per-tensor form is bound by kernel launches (272 tensors in a full fine-tune of
//! SmolLM2-135M, 424 with LLaRA's default LoRA and the projector), and tch wraps neither
//! torch's fused nor its foreach AdamW. A tensor with no gradient (stage 1's projector: text-only
//! prompts fill no ID slot) keeps zeros in the flat gradient and is left out of the update, as
//! torch skips it; the update runs over the spans between such tensors. Only a gradient of
//! another dtype or device than its tensor sends a group back to the tensor-by-tensor update,
//! on views of the same buffers, so semantics never depend on the path.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

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

/// The trained tensors of one device and dtype, flattened.
struct FlatGroup {
    /// Indices into `AdamW::params`, in name order.
    members: Vec<usize>,
    /// Every member's values, back to back: each member is a view of its span.
    values: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The members' gradients back to back, once adopted.
    grads: Option<FlatGrads>,
}

/// A group's adopted gradients: each member that had a gradient then has as `.grad()` the view
/// of its span, and autograd accumulates into it in place; the spans of the members that had
/// none hold zeros, and those members' `.grad()` stays undefined.
struct FlatGrads {
    buffer: Tensor,
    /// Indices into `AdamW::params` of the members without a gradient.
    idle: Vec<usize>,
    /// The buffer's runs of members with a gradient: what the update covers.
    active: Spans,
}

/// `(offset, len)` spans of a flat buffer.
type Spans = Vec<(i64, i64)>;

/// Where a parameter lives: its group and its span there.
#[derive(Clone, Copy)]
struct Slot {
    group: usize,
    offset: i64,
    numel: i64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Sorted by name: the order of the state and of the gradient-norm sum is fixed.
    params: Vec<(String, Tensor)>,
    slots: Vec<Slot>,
    groups: Vec<FlatGroup>,
    steps: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("params", &self.params.len())
            .field("groups", &self.groups.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

/// The view of `flat` that holds `slot`, shaped like `shape`.
fn span(flat: &Tensor, slot: Slot, shape: &[i64]) -> Result<Tensor> {
    Ok(flat.f_narrow(0, slot.offset, slot.numel)?.f_view(shape)?)
}

/// One AdamW update of `p` from gradient `g` (any float kind; computed in f32) with moments
/// `m` and `v`, in place. `bias1` and `bias2` are the bias corrections of this step.
fn update(
    c: &AdamWConfig,
    lr: f64,
    (bias1, bias2): (f64, f64),
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
) -> Result<()> {
    let g = g.f_to_kind(Kind::Float)?;
    if c.weight_decay > 0.0 {
        let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
    }
    let _ = m.f_lerp_(&g.f_to_kind(m.kind())?, 1.0 - c.beta1)?;
    let _ = v.f_lerp_(&g.f_square()?.f_to_kind(v.kind())?, 1.0 - c.beta2)?;
    let mut denom = v.f_sqrt()?;
    let _ = denom.f_div_scalar_(bias2.sqrt())?.f_add_scalar_(c.eps)?;
    let mut step = m.f_div(&denom)?;
    let _ = step.f_mul_scalar_(lr / bias1)?;
    let _ = p.f_sub_(&step.f_to_kind(p.kind())?)?;
    Ok(())
}

/// How many values of a flat buffer one round of the update covers. On a CPU the update's
/// ten passes should run in cache: streaming a 540 MB buffer ten times made the full
/// fine-tune's step three times slower than libtorch's tensor-by-tensor loop, and chunks of
/// 2^16 .. 2^22 values measured 0.27 .. 0.16 s against its 0.27 .. 0.54 s (2^20 best; see
/// `benches/optim_bench.rs`). On a GPU each kernel launch should cover as much as possible.
fn chunk_values(device: Device) -> i64 {
    if device.is_cuda() { 1 << 26 } else { 1 << 20 }
}

/// [`update`] over the flat buffers' spans `active` (`(offset, len)`), chunk by chunk.
fn update_flat(
    c: &AdamWConfig,
    lr: f64,
    bias: (f64, f64),
    group: &mut FlatGroup,
    grads: &Tensor,
    active: &[(i64, i64)],
) -> Result<()> {
    let chunk = chunk_values(group.values.device());
    for &(offset, len) in active {
        let mut start = offset;
        while start < offset + len {
            let n = chunk.min(offset + len - start);
            let part = |t: &Tensor| t.f_narrow(0, start, n);
            update(
                c,
                lr,
                bias,
                &mut part(&group.values)?,
                &part(grads)?,
                &mut part(&group.exp_avg)?,
                &mut part(&group.exp_avg_sq)?,
            )?;
            start += n;
        }
    }
    Ok(())
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

    /// Takes `params` (shallow handles of the model's tensors) and moves their values into one
    /// flat buffer per device and dtype; the model keeps working on the same tensors, which
    /// are views of it from now on. Build the optimizer after the model is on its device.
    pub fn new(mut params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<AdamW> {
        if params.is_empty() {
            return Err(TrainError::Invalid(
                "nothing to optimise: no trainable tensors".into(),
            ));
        }
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let _guard = tch::no_grad_guard();
        let mut keys: Vec<(Device, Kind)> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        for (i, (_, p)) in params.iter().enumerate() {
            let key = (p.device(), p.kind());
            match keys.iter().position(|k| *k == key) {
                Some(g) => members[g].push(i),
                None => {
                    keys.push(key);
                    members.push(vec![i]);
                }
            }
        }
        let mut slots = vec![
            Slot {
                group: 0,
                offset: 0,
                numel: 0
            };
            params.len()
        ];
        let mut groups = Vec::with_capacity(members.len());
        for (g, members) in members.into_iter().enumerate() {
            let flat_parts = members
                .iter()
                .map(|&i| params[i].1.f_reshape([-1]))
                .collect::<Result<Vec<_>, _>>()?;
            let values = Tensor::f_cat(&flat_parts, 0)?;
            drop(flat_parts);
            let mut offset = 0;
            for &i in &members {
                let numel = params[i].1.numel() as i64;
                slots[i] = Slot {
                    group: g,
                    offset,
                    numel,
                };
                let view = span(&values, slots[i], &params[i].1.size())?;
                // `param.data = view`: the model's handle now reads and writes the buffer.
                params[i].1.f_set_data(&view)?;
                offset += numel;
            }
            groups.push(FlatGroup {
                members,
                exp_avg: values.f_zeros_like()?,
                exp_avg_sq: values.f_zeros_like()?,
                values,
                grads: None,
            });
        }
        Ok(AdamW {
            config,
            params,
            slots,
            groups,
            steps: 0,
        })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Whether every member of group `g` still is the view of its span it was made into
    /// (a host-side pointer check, no kernel). Something that replaced a parameter's storage
    /// after the optimizer was built would otherwise be trained no more, silently.
    fn check_values(&self, g: usize) -> Result<()> {
        let group = &self.groups[g];
        let base = group.values.data_ptr() as usize;
        let width = group.values.kind().elt_size_in_bytes();
        for &i in &group.members {
            let expected = base + self.slots[i].offset as usize * width;
            if self.params[i].1.data_ptr() as usize != expected {
                return Err(TrainError::Invalid(format!(
                    "trained tensor {} was replaced after the optimizer was built",
                    self.params[i].0
                )));
            }
        }
        Ok(())
    }

    /// The flat gradient of group `g` and the spans the update covers: adopted on first use
    /// (the gradients are copied into one buffer, zeros where a member has none, and each
    /// gradient becomes a view of its span), then reused for as long as every member's
    /// gradient still is that view, or still undefined where it was. `None` when no member
    /// has a gradient yet, or when a gradient's dtype or device is not its group's.
    fn flat_grads(&mut self, g: usize) -> Result<Option<(Tensor, Spans)>> {
        let _guard = tch::no_grad_guard();
        let group = &self.groups[g];
        let grads: Vec<Tensor> = group
            .members
            .iter()
            .map(|&i| self.params[i].1.grad())
            .collect();
        if grads.iter().all(|t| !t.defined()) {
            return Ok(None);
        }
        if let Some(flat) = &group.grads {
            let base = flat.buffer.data_ptr() as usize;
            let width = flat.buffer.kind().elt_size_in_bytes();
            let unchanged = group.members.iter().zip(&grads).all(|(&i, grad)| {
                if flat.idle.contains(&i) {
                    !grad.defined()
                } else {
                    grad.defined()
                        && grad.data_ptr() as usize == base + self.slots[i].offset as usize * width
                }
            });
            if unchanged {
                return Ok(Some((flat.buffer.shallow_clone(), flat.active.clone())));
            }
        }
        let kind = group.values.kind();
        if grads
            .iter()
            .any(|t| t.defined() && (t.kind() != kind || t.device() != group.values.device()))
        {
            return Ok(None);
        }
        let flat_parts = group
            .members
            .iter()
            .zip(&grads)
            .map(|(&i, t)| {
                if t.defined() {
                    t.f_reshape([-1])
                } else {
                    Tensor::f_zeros([self.slots[i].numel], (kind, group.values.device()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let buffer = Tensor::f_cat(&flat_parts, 0)?;
        drop(flat_parts);
        let (mut idle, mut active) = (Vec::new(), Spans::new());
        for (&i, mut grad) in group.members.iter().zip(grads) {
            let slot = self.slots[i];
            if !grad.defined() {
                idle.push(i);
                continue;
            }
            // `param.grad.data = view`: autograd keeps accumulating into the same tensor.
            grad.f_set_data(&span(&buffer, slot, &grad.size())?)?;
            match active.last_mut() {
                Some((offset, len)) if *offset + *len == slot.offset => *len += slot.numel,
                _ => active.push((slot.offset, slot.numel)),
            }
        }
        self.groups[g].grads = Some(FlatGrads {
            buffer: buffer.shallow_clone(),
            idle,
            active: active.clone(),
        });
        Ok(Some((buffer, active)))
    }

    pub fn zero_grad(&mut self) {
        for g in 0..self.groups.len() {
            match self.flat_grads(g) {
                Ok(Some((mut flat, _))) => {
                    let _ = flat.zero_();
                }
                _ => {
                    for &i in &self.groups[g].members {
                        self.params[i].1.zero_grad();
                    }
                }
            }
        }
    }

    /// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping (as `torch.nn.utils.clip_grad_norm_`).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        // Per-tensor gradients of groups not (yet) flat; each element appears once.
        let mut parts: Vec<Tensor> = Vec::new();
        for g in 0..self.groups.len() {
            // A flat buffer's idle spans are zeros: they add nothing to the norm.
            match self.flat_grads(g)? {
                Some((flat, _)) => parts.push(flat),
                None => parts.extend(
                    self.groups[g]
                        .members
                        .iter()
                        .map(|&i| self.params[i].1.grad())
                        .filter(Tensor::defined),
                ),
            }
        }
        // Summed on the parameters' device and read once: one host sync per step.
        let mut total: Option<Tensor> = None;
        for t in &parts {
            // One streaming pass with no temporary the size of the buffer; per-tensor norms
            // in the gradients' dtype, combined in f64, as torch's clip_grad_norm_ does.
            let squares = t.f_norm()?.f_to_kind(Kind::Double)?.f_square()?;
            total = Some(match total {
                None => squares,
                Some(sum) => sum.f_add(&squares)?,
            });
        }
        let norm = total.map_or(Ok(0.0), |t| t.f_double_value(&[]))?.sqrt();
        if !norm.is_finite() {
            return Err(TrainError::NonFiniteGradNorm(norm));
        }
        if norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for t in &mut parts {
                let _ = t.f_mul_scalar_(scale)?;
            }
        }
        Ok(norm)
    }

    /// One update at learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps as i32;
        let bias = (
            1.0 - self.config.beta1.powi(t),
            1.0 - self.config.beta2.powi(t),
        );
        for g in 0..self.groups.len() {
            self.check_values(g)?;
            if let Some((flat, active)) = self.flat_grads(g)? {
                update_flat(&self.config, lr, bias, &mut self.groups[g], &flat, &active)?;
                continue;
            }
            for &i in &self.groups[g].members {
                let (_, p) = &self.params[i];
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let (slot, shape) = (self.slots[i], p.size());
                let group = &self.groups[g];
                update(
                    &self.config,
                    lr,
                    bias,
                    &mut span(&group.values, slot, &shape)?,
                    &grad,
                    &mut span(&group.exp_avg, slot, &shape)?,
                    &mut span(&group.exp_avg_sq, slot, &shape)?,
                )?;
            }
        }
        Ok(())
    }

    /// The moment buffers of parameter `i`, shaped like it.
    fn moments(&self, i: usize) -> Result<(Tensor, Tensor)> {
        let slot = self.slots[i];
        let shape = self.params[i].1.size();
        let group = &self.groups[slot.group];
        Ok((
            span(&group.exp_avg, slot, &shape)?,
            span(&group.exp_avg_sq, slot, &shape)?,
        ))
    }

    /// The moment buffers, named `exp_avg.{param}` and `exp_avg_sq.{param}`.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut named = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            let (m, v) = self.moments(i)?;
            named.push((format!("exp_avg.{name}"), m));
            named.push((format!("exp_avg_sq.{name}"), v));
        }
        Ok(named)
    }

    /// Restores buffers written by [`AdamW::state`] after `steps` updates. Every parameter must
    /// find both buffers with its shape.
    pub fn load_state(&mut self, named: Vec<(String, Tensor)>, steps: u64) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for i in 0..self.params.len() {
            let (m, v) = self.moments(i)?;
            let (name, p) = &self.params[i];
            for (prefix, mut buffer) in [("exp_avg", m), ("exp_avg_sq", v)] {
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

/// One optimizer step on `loss` (gradients clipped to norm 1), refused when the loss is not
/// finite, naming `what` and the step. Returns the loss.
pub(crate) fn descend(
    optimizer: &mut AdamW,
    loss: &Tensor,
    lr: f64,
    (what, step): (&str, u64),
) -> Result<f64> {
    let value = loss.double_value(&[]);
    if !value.is_finite() {
        return Err(TrainError::Invalid(format!(
            "{what}: loss {value} at step {step}"
        )));
    }
    loss.f_backward()?;
    optimizer.clip_grad_norm(1.0)?;
    optimizer.step(lr)?;
    Ok(value)
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

    /// Steps libtorch's AdamW over `vs_ref` and ours over `vs` side by side, both with
    /// `weight_decay` and `lr`, each side's gradients from its own loss; returns ours.
    fn side_by_side(
        (vs_ref, loss_ref): (&nn::VarStore, &dyn Fn() -> Tensor),
        (vs, loss): (&nn::VarStore, &dyn Fn() -> Tensor),
        weight_decay: f64,
        lr: f64,
        steps: usize,
    ) -> AdamW {
        let mut reference = nn::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            wd: weight_decay,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(vs_ref, lr)
        .unwrap();
        let config = AdamWConfig {
            weight_decay,
            ..AdamWConfig::default()
        };
        let mut ours = AdamW::for_var_store(vs, config).unwrap();
        for _ in 0..steps {
            reference.zero_grad();
            loss_ref().backward();
            reference.step();
            ours.zero_grad();
            loss().backward();
            ours.step(lr).unwrap();
        }
        ours
    }

    #[test]
    fn matches_libtorch_adamw() {
        let _rng = crate::test_support::rng_lock();
        let (vs_ref, w_ref) = quadratic_store(1);
        let (vs, w) = quadratic_store(1);
        side_by_side(
            (&vs_ref, &|| loss(&w_ref)),
            (&vs, &|| loss(&w)),
            0.01,
            0.05,
            20,
        );
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
            .unwrap()
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

    /// Three tensors of different shapes; `unused` is in the store but in no loss.
    fn three_tensor_store(seed: i64) -> (nn::VarStore, [Tensor; 3]) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let a = vs.root().randn("a", &[4, 3], 0.0, 1.0);
        let b = vs.root().randn("b", &[3], 0.0, 1.0);
        let unused = vs.root().randn("unused", &[2, 2], 0.0, 1.0);
        (vs, [a, b, unused])
    }

    fn two_tensor_loss(a: &Tensor, b: &Tensor) -> Tensor {
        (a.matmul(b) - 1.0).square().sum(Kind::Float) + b.abs().sum(Kind::Float)
    }

    /// Runs `steps` steps of ours and of libtorch's AdamW side by side; returns the largest
    /// difference between the two stores' tensors afterwards.
    fn against_libtorch(steps: usize, loss: impl Fn(&[Tensor; 3]) -> Tensor) -> (f64, AdamW) {
        let (vs_ref, t_ref) = three_tensor_store(5);
        let (vs, t) = three_tensor_store(5);
        let ours = side_by_side(
            (&vs_ref, &|| loss(&t_ref)),
            (&vs, &|| loss(&t)),
            0.01,
            0.05,
            steps,
        );
        let diff = t
            .iter()
            .zip(&t_ref)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        (diff, ours)
    }

    #[test]
    fn all_gradients_present_takes_the_flat_path_and_matches_libtorch() {
        let _rng = crate::test_support::rng_lock();
        let (diff, mut ours) = against_libtorch(20, |[a, b, unused]| {
            two_tensor_loss(a, b) + unused.square().sum(Kind::Float)
        });
        assert!(diff < 1e-5, "{diff}");
        // Every gradient is now a view of the group's flat buffer ...
        let adopted = ours.groups[0].grads.as_ref().expect("gradients adopted");
        assert_eq!(adopted.buffer.numel(), 12 + 3 + 4);
        assert_eq!(adopted.active, [(0, 19)]);
        let before = adopted.buffer.data_ptr() as usize;
        // ... so zeroing the buffer zeroes what the tensors see, and the norm covers them all.
        for (_, p) in &ours.params {
            assert!(p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
        ours.zero_grad();
        for (name, p) in &ours.params {
            let left = p.grad().abs().sum(Kind::Float).double_value(&[]);
            assert_eq!(left, 0.0, "{name}");
        }
        assert_eq!(ours.clip_grad_norm(1.0).unwrap(), 0.0);
        // Autograd accumulates into the adopted views in place: the buffer is not rebuilt.
        let [a, b, unused] = [0, 1, 2].map(|i| ours.params[i].1.shallow_clone());
        (two_tensor_loss(&a, &b) + unused.square().sum(Kind::Float)).backward();
        ours.step(0.05).unwrap();
        let after = ours.groups[0].grads.as_ref().unwrap().buffer.data_ptr() as usize;
        assert_eq!(before, after);
        assert!(a.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn a_tensor_without_gradient_is_left_alone_and_the_rest_match_libtorch() {
        let _rng = crate::test_support::rng_lock();
        let (_, [.., unused_before]) = three_tensor_store(5);
        let (diff, mut ours) = against_libtorch(20, |[a, b, _]| two_tensor_loss(a, b));
        assert!(diff < 1e-5, "{diff}");
        // The flat path all the same: `unused` keeps zeros in the buffer and is not updated.
        let adopted = ours.groups[0].grads.as_ref().expect("gradients adopted");
        assert_eq!(adopted.buffer.numel(), 12 + 3 + 4);
        assert_eq!(
            (adopted.idle.as_slice(), adopted.active.as_slice()),
            (&[2][..], &[(0, 15)][..])
        );
        let unused = &ours.params[2];
        assert_eq!(unused.0, "unused");
        assert!(
            !unused.1.grad().defined(),
            "an idle tensor was given a gradient"
        );
        assert!(
            unused.1.equal(&unused_before),
            "a tensor without gradient moved"
        );
        let moments = ours.moments(2).unwrap();
        assert_eq!(moments.0.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(moments.1.abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Nothing in the norm from it either.
        ours.zero_grad();
        assert_eq!(ours.clip_grad_norm(1.0).unwrap(), 0.0);
    }

    #[test]
    fn a_tensor_whose_gradient_comes_later_joins_the_flat_update() {
        let _rng = crate::test_support::rng_lock();
        let (vs_ref, t_ref) = three_tensor_store(5);
        let (vs, t) = three_tensor_store(5);
        let unused_before = t[2].copy();
        // `unused` enters the loss from step 10 on (each side calls its loss once a step).
        let loss = |[a, b, unused]: &[Tensor; 3], calls: &std::cell::Cell<usize>| {
            calls.set(calls.get() + 1);
            let loss = two_tensor_loss(a, b);
            if calls.get() > 10 {
                loss + unused.square().sum(Kind::Float)
            } else {
                loss
            }
        };
        let (calls_ref, calls) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let ours = side_by_side(
            (&vs_ref, &|| loss(&t_ref, &calls_ref)),
            (&vs, &|| loss(&t, &calls)),
            0.01,
            0.05,
            20,
        );
        // `a` and `b` match libtorch; `unused` need not: torch counts its steps from its first
        // gradient, ours from the optimizer's first step (module doc).
        for i in 0..2 {
            let diff = (&t[i] - &t_ref[i]).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{}: {diff}", ours.params[i].0);
        }
        let adopted = ours.groups[0].grads.as_ref().expect("gradients adopted");
        assert!(adopted.idle.is_empty());
        assert_eq!(adopted.active, [(0, 19)]);
        assert!(!t[2].equal(&unused_before), "it was not trained");
    }

    #[test]
    fn a_tensor_replaced_after_the_optimizer_was_built_is_named() {
        let _rng = crate::test_support::rng_lock();
        let (vs, [a, b, _]) = three_tensor_store(6);
        let mut opt = AdamW::for_var_store(&vs, AdamWConfig::default()).unwrap();
        let mut handle = b.shallow_clone();
        handle.set_data(&b.copy());
        two_tensor_loss(&a, &b).backward();
        let err = opt.step(0.1).unwrap_err().to_string();
        assert!(err.contains("trained tensor b was replaced"), "{err}");
    }

    #[test]
    fn a_buffer_longer_than_one_chunk_matches_libtorch() {
        let _rng = crate::test_support::rng_lock();
        let build = || {
            tch::manual_seed(8);
            let vs = nn::VarStore::new(Device::Cpu);
            // 1,049,600 + 3 values: two chunks on a CPU, the second a short one.
            let a = vs.root().randn("a", &[1024, 1025], 0.0, 1.0);
            let b = vs.root().randn("b", &[3], 0.0, 1.0);
            (vs, a, b)
        };
        let loss = |a: &Tensor, b: &Tensor| {
            (a.square() * 0.5 + a.sin()).sum(Kind::Float) + b.square().sum(Kind::Float)
        };
        assert!(1024 * 1025 + 3 > chunk_values(Device::Cpu));
        let (vs_ref, a_ref, b_ref) = build();
        let (vs, a, b) = build();
        side_by_side(
            (&vs_ref, &|| loss(&a_ref, &b_ref)),
            (&vs, &|| loss(&a, &b)),
            0.0,
            0.01,
            3,
        );
        for (x, y) in [(&a, &a_ref), (&b, &b_ref)] {
            let diff = (x - y).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{diff}");
        }
        assert!(!a.equal(&build().1), "the tensors moved");
    }
}
