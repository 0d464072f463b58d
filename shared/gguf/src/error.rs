//! The one error type of rsllm-gguf.
//!
//! Every variant carries `file`, the path (or the label a caller gave a stream), so a message read
//! in a log on its own still says which model file is broken, and where relevant the metadata key
//! or tensor name and the reason. Byte positions are absolute file offsets, so they can be checked
//! with `xxd -s`.

use crate::types::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: {context}: {error}")]
    Io {
        file: String,
        context: String,
        #[source]
        error: std::io::Error,
    },
    /// The file ends before something the header says is there.
    #[error(
        "{file}: {what}: needs {needed} bytes at byte {at} but the file has {len} bytes (truncated?)"
    )]
    Truncated {
        file: String,
        what: String,
        at: u64,
        needed: u64,
        len: u64,
    },
    /// `found` is the four bytes with non-printable ones escaped (`\x7fELF`).
    #[error("{file}: not a GGUF file: magic is \"{found}\", expected \"GGUF\"")]
    BadMagic { file: String, found: String },
    #[error("{file}: GGUF version {version} is not supported (only v2 and v3 are){hint}")]
    UnsupportedVersion {
        file: String,
        version: u32,
        hint: &'static str,
    },
    /// The fixed header or the layout as a whole is inconsistent (counts, alignment).
    #[error("{file}: {reason}")]
    InvalidHeader { file: String, reason: String },
    /// A metadata entry cannot be decoded or breaks a limit.
    #[error("{file}: metadata key '{key}': {reason}")]
    InvalidMetadata {
        file: String,
        key: String,
        reason: String,
    },
    #[error("{file}: metadata key '{key}' appears twice")]
    DuplicateKey { file: String, key: String },
    /// A tensor-directory entry cannot be decoded or describes an impossible tensor.
    #[error("{file}: tensor '{tensor}': {reason}")]
    InvalidTensor {
        file: String,
        tensor: String,
        reason: String,
    },
    #[error("{file}: tensor '{tensor}' appears twice in the tensor directory")]
    DuplicateTensor { file: String, tensor: String },
    #[error(
        "{file}: tensor '{tensor}': data ends at byte {end} but the file has {len} bytes (truncated?)"
    )]
    TensorOutOfBounds {
        file: String,
        tensor: String,
        end: u64,
        len: u64,
    },
    #[error("{file}: no tensor named '{tensor}'")]
    TensorNotFound { file: String, tensor: String },
    #[error("{file}: tensor '{tensor}': {error}")]
    Dequantize {
        file: String,
        tensor: String,
        #[source]
        error: DequantError,
    },
    #[error("{file}: metadata key '{key}' is missing")]
    MissingKey { file: String, key: String },
    #[error("{file}: metadata key '{key}': expected {expected}, found {found}")]
    WrongType {
        file: String,
        key: String,
        expected: &'static str,
        found: String,
    },
    /// `tensor_f32` needs a path; a header read from a stream has none.
    #[error(
        "{file}: the header was read from a stream, so tensor data must be read with tensor_f32_from"
    )]
    NoPath { file: String },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// Why a byte buffer cannot be dequantised. Kept separate from [`GgufError`] because
/// [`crate::dequantize`] works on bare buffers with no file or tensor to name; the file-level
/// callers wrap it in [`GgufError::Dequantize`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("dequantisation of type {0} is not supported")]
    Unsupported(GgmlType),
    #[error("{n_elements} elements is not a whole number of {dtype} blocks of {block_size}")]
    PartialBlock {
        dtype: GgmlType,
        n_elements: usize,
        block_size: usize,
    },
    #[error("{n_elements} elements of {dtype} take {expected} bytes, but {got} bytes were given")]
    WrongLength {
        dtype: GgmlType,
        n_elements: usize,
        expected: usize,
        got: usize,
    },
}
