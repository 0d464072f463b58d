//! rsllm-recommender: the ID-based sequential recommenders (SASRec, GRU4Rec, Caser) on tch.
//! The embedding-service serves them and the LLM side reads their item vectors (the "ID"
//! half of RSLLM's Text-ID prompts).
//!
//! A trained model is an artefact directory: `model.safetensors` (HF-style flat names) plus
//! `manifest.json`; the sha256 of the safetensors file is the model version.

pub mod artefact;
pub mod error;
pub mod eval;
pub mod model;
pub mod train;

pub use artefact::{RecManifest, RecModel};
pub use error::RecError;
pub use model::{ModelKind, RecConfig};
