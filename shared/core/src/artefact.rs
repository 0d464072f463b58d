//! Content hashes and atomic writes: every artefact is written to a temporary file in the same
//! directory, fsynced, then renamed, so a crash never leaves a half-written file under the
//! final name.

use std::io;
use std::path::Path;

use serde::Serialize;

pub fn sha256_hex(bytes: &[u8]) -> String {
    let _ = bytes;
    todo!("helper A")
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    let _ = path;
    todo!("helper A")
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename, fsync
/// of the directory). Creates the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let _ = (path, bytes);
    todo!("helper A")
}

/// Pretty JSON, atomically.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let _ = (path, value);
    todo!("helper A")
}
