//! RSLLM training building blocks (issue 4): an AdamW whose state can be saved and restored
//! ([`optim`]), LLaRA's learning-rate schedule ([`schedule`]), resumable checkpoints that hold
//! only what was trained ([`checkpoint`]), and the three loss terms of METHOD.md ([`losses`]).
//!
//! Why an own AdamW: tch's optimizers keep their moment buffers inside libtorch with no API to
//! read or write them, so a killed run could not resume with its optimizer state. Here the
//! moments are plain tensors, saved beside the weights.

pub mod batch;
pub mod checkpoint;
pub mod error;
pub mod eval;
pub mod losses;
pub mod objective;
pub mod optim;
pub mod probe;
pub mod schedule;
pub mod stage;
#[cfg(test)]
mod test_support;
pub mod train_loop;
pub mod transport;
pub mod warm_heads;
pub mod warmup;

pub use checkpoint::{Checkpoint, CheckpointManifest};
pub use error::{Divergence, Result, TrainError};
pub use objective::{ItemTable, LossConfig, LossTerms, Losses, RsllmHeads};
pub use optim::{AdamW, AdamWConfig};
pub use schedule::LrSchedule;
pub use train_loop::{ExampleSource, StepReport, TrainConfig, TrainSummary, Trainee, train};
