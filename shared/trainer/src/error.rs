//! The one error type of rsllm-trainer.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Llm(#[from] rsllm_llm::LlmError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A checkpoint that cannot be used: names the file and the reason.
    #[error("{path}: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("invalid training setting: {0}")]
    Invalid(String),
    /// The gradients' global norm is NaN or infinite (from `AdamW::clip_grad_norm`, which then
    /// scales nothing; the training loop names the step).
    #[error("gradient norm is {0}: the loss diverged")]
    NonFiniteGradNorm(f64),
    /// A training step met a NaN or infinite loss or gradient norm and was not applied.
    #[error("{0}")]
    Diverged(Box<Divergence>),
}

/// Where a training run diverged: the step (not applied), the micro-batch and training rows
/// whose loss was not finite, and the last checkpoint, which is left as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    /// The optimizer step that failed (1-based, as step reports count).
    pub step: u64,
    pub epoch: u64,
    /// What was not finite: "the loss is NaN (lm NaN, ui 2.1, it 3.0)", "the gradient norm is inf".
    pub what: String,
    /// The micro-batch (1-based) and how many the step has; None when the step as a whole
    /// (its gradient norm) is at fault.
    pub micro_batch: Option<(usize, usize)>,
    /// The training rows (indices into the stage's rows) of that micro-batch or step.
    pub rows: Vec<usize>,
    /// The newest checkpoint on disk, kept: the step it holds and its directory.
    pub last_checkpoint: Option<(u64, PathBuf)>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at optimizer step {} (epoch {})",
            self.what, self.step, self.epoch
        )?;
        if let Some((m, of)) = self.micro_batch {
            write!(f, ", micro-batch {m} of {of}")?;
        }
        write!(
            f,
            ", training rows {:?}: the step was not applied; ",
            self.rows
        )?;
        match &self.last_checkpoint {
            Some((step, dir)) => write!(
                f,
                "the last good checkpoint (step {step}, {}) is kept",
                dir.display()
            ),
            None => write!(f, "no checkpoint had been written yet"),
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
