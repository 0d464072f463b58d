//! Content hashes and atomic writes: every artefact is written to a temporary file in the same
//! directory, fsynced, then renamed, so a crash never leaves a half-written file under the
//! final name.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file's content, streamed (model files can be large).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Distinguishes temporary files of concurrent writers within one process (threads); the pid
/// distinguishes processes.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The temporary sibling of `path`: `.{name}.tmp.{pid}.{n}` in the same directory, so the
/// final rename never crosses a file system.
fn temp_path(dir: &Path, file_name: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{file_name}.tmp.{}.{n}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename, fsync
/// of the directory). Creates the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file path with a UTF-8 name", path.display()),
            )
        })?
        .to_owned();
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        Some(_) | None => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    let temp = temp_path(&dir, &file_name);
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(err) = written {
        // Best effort: the temp file is garbage either way; the original error matters.
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    sync_dir(&dir)
}

/// Makes the rename durable. Directories can be opened and fsynced on Unix only.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// `value` as pretty JSON with a trailing newline: the bytes `write_json_atomic` writes.
pub fn to_json_pretty_bytes<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Pretty JSON, atomically.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_atomic(path, &to_json_pretty_bytes(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn write_atomic_creates_dirs_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/file.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(sha256_file(&path).unwrap(), sha256_hex(b"second"));
        let names: Vec<String> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["file.txt".to_owned()]);
    }

    #[test]
    fn write_json_atomic_is_pretty_with_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.json");
        write_json_atomic(&path, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\n  \"a\": 1\n}\n");
    }

    #[test]
    fn write_atomic_rejects_a_directory_path() {
        assert!(write_atomic(Path::new("/"), b"x").is_err());
    }
}
