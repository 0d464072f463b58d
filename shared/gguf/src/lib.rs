//! rsllm-gguf: a reader for GGUF files (v2 and v3) as llama.cpp writes them.
//!
//! It gives the metadata and the tensor directory of a model file and dequantises tensors to
//! f32, so the model code can load llama.cpp checkpoints without llama.cpp. No tch here: the
//! format work builds and tests fast, and the engine converts the `Vec<f32>`s to tensors.
//!
//! Layout to keep in mind: GGUF stores dimensions fastest-first (ggml `ne[0]` first), the reverse
//! of PyTorch shapes. [`TensorInfo::dims`] is as stored, [`TensorInfo::shape`] is the PyTorch
//! shape, and the data from [`GgufFile::tensor_f32`] is row-major for that shape.
//!
//! Files are treated as hostile: every count, length and offset is checked against caps and the
//! file length before use (the `MAX_*` constants are the limits), and nothing panics on bad input.

mod dequant;
mod error;
mod file;
mod metadata;
mod parse;
mod types;

#[cfg(test)]
mod testutil;

pub use dequant::dequantize;
pub use error::{DequantError, GgufError, Result};
pub use file::{GgufFile, TensorInfo};
pub use metadata::MetadataValue;
pub use parse::{
    DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS, MAX_STRING_LEN,
    MAX_TOTAL_ARRAY_ELEMENTS,
};
pub use types::GgmlType;

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
