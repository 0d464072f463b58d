//! Content hashes and atomic writes: every artefact is written to a temporary file in the same
//! directory, fsynced, then renamed, so a crash never leaves a half-written file under the
//! final name.

use std::fs::{self, File, OpenOptions};
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

/// Distinguishes temporary files of concurrent writers within one process (threads).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name part no other writer picks: the pid and a counter alone are not enough, because
/// containers sharing a volume all run as pid 1.
pub fn unique_suffix() -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}.{n}.{:016x}", std::process::id(), rand::random::<u64>())
}

/// The temporary sibling of `path`: `.{name}.tmp.{pid}.{n}.{random}` in the same directory,
/// so the final rename never crosses a file system.
fn temp_path(dir: &Path, file_name: &str) -> PathBuf {
    dir.join(format!(".{file_name}.tmp.{}", unique_suffix()))
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename, fsync
/// of the directory). Creates the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_syncing(path, bytes, sync_dir)
}

/// [`write_atomic`] with the directory fsync given (tests make it fail).
fn write_atomic_syncing(
    path: &Path,
    bytes: &[u8],
    sync_dir: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
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
    write_via(&temp_path(&dir, &file_name), path, bytes)?;
    // The new content is in place whatever happens now: an error here must not read as "the
    // replace failed" (a caller would retry or report a write that did happen). Only its
    // durability across a power loss is in doubt, which is worth a warning.
    if let Err(err) = sync_dir(&dir) {
        tracing::warn!(
            dir = %dir.display(),
            error = %err,
            "{} was replaced, but fsync of its directory failed: the rename may not survive a power loss",
            path.display()
        );
    }
    Ok(())
}

/// Writes `bytes` to the fresh file `temp`, fsyncs it and renames it to `path`. `temp` must
/// not exist: creating it exclusively means a name collision with another writer fails here
/// instead of truncating that writer's file.
fn write_via(temp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot create the temporary file {}: {err}", temp.display()),
            )
        })?;
    let written = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(temp, path)
    })();
    if written.is_err() {
        // Best effort: the temp file is ours and garbage either way; the original error matters.
        let _ = fs::remove_file(temp);
    }
    written
}

/// Makes renames and new entries in `dir` durable. Directories can be opened and fsynced on
/// Unix only.
#[cfg(unix)]
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes renames and new entries in `dir` durable. Directories can be opened and fsynced on
/// Unix only.
#[cfg(not(unix))]
pub fn sync_dir(_dir: &Path) -> io::Result<()> {
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
    fn a_temp_name_collision_fails_and_leaves_the_other_writers_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join(".file.txt.tmp.1.0.0000000000000000");
        let path = dir.path().join("file.txt");
        fs::write(&temp, b"another writer's").unwrap();
        let err = write_via(&temp, &path, b"mine").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains(".file.txt.tmp.1.0."), "{err}");
        assert_eq!(fs::read(&temp).unwrap(), b"another writer's");
        assert!(!path.exists());
    }

    #[test]
    fn temp_names_carry_the_pid_and_a_random_part() {
        let name = |path: PathBuf| path.file_name().unwrap().to_string_lossy().into_owned();
        let a = name(temp_path(Path::new("d"), "f.json"));
        let b = name(temp_path(Path::new("d"), "f.json"));
        let prefix = format!(".f.json.tmp.{}.", std::process::id());
        assert!(a.starts_with(&prefix), "{a}");
        let random = |n: &str| n.rsplit('.').next().unwrap().to_owned();
        assert_eq!(random(&a).len(), 16, "{a}");
        assert!(random(&a).chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        // Not the counter alone: another process (pid 1 in every container) counts alike.
        assert_ne!(random(&a), random(&b));
    }

    #[test]
    fn a_failed_directory_fsync_after_the_rename_is_not_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.txt");
        write_atomic_syncing(&path, b"new", |_| Err(io::Error::other("fsync failed"))).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert!(sync_dir(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn write_atomic_rejects_a_directory_path() {
        assert!(write_atomic(Path::new("/"), b"x").is_err());
    }
}
