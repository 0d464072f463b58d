//! LLaRA's learning-rate schedule: linear warm-up from `peak * start_factor` to `peak` over the
//! first `warmup_steps`, then cosine decay to `peak * end_factor` at `total_steps`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// LLaRA warms up from 1/100 of the peak.
    pub start_factor: f64,
    pub end_factor: f64,
}

impl LrSchedule {
    /// Warm-up over `warmup_fraction` of `total_steps` (LLaRA: 5%), from 1/100 of `peak`,
    /// cosine to zero.
    pub fn llara(peak: f64, total_steps: u64, warmup_fraction: f64) -> LrSchedule {
        LrSchedule {
            peak,
            warmup_steps: ((total_steps as f64) * warmup_fraction).round() as u64,
            total_steps,
            start_factor: 0.01,
            end_factor: 0.0,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            let progress = step as f64 / self.warmup_steps as f64;
            return self.peak * (self.start_factor + (1.0 - self.start_factor) * progress);
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress =
            ((step.saturating_sub(self.warmup_steps)) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.end_factor + (1.0 - self.end_factor) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let _rng = crate::test_support::rng_lock();
        let s = LrSchedule::llara(8e-4, 100, 0.05);
        assert_eq!(s.warmup_steps, 5);
        assert!(
            (s.lr(0) - 8e-6).abs() < 1e-12,
            "starts at 1/100 of the peak"
        );
        assert!(s.lr(1) > s.lr(0) && s.lr(4) < 8e-4);
        assert!((s.lr(5) - 8e-4).abs() < 1e-12, "peak after warm-up");
        let mid = s.lr(5 + 95 / 2);
        assert!((mid - 4e-4).abs() < 1e-5, "half way down the cosine: {mid}");
        assert!(
            s.lr(100) < 1e-12 && s.lr(500) < 1e-12,
            "zero at the end and after"
        );
        for step in 5..100 {
            assert!(s.lr(step + 1) <= s.lr(step), "monotone decay at {step}");
        }
    }

    #[test]
    fn no_warm_up_starts_at_the_peak() {
        let _rng = crate::test_support::rng_lock();
        let s = LrSchedule::llara(1e-3, 10, 0.0);
        assert_eq!(s.lr(0), 1e-3);
    }
}
