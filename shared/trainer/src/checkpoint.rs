//! Resumable checkpoints that hold only what was trained.
//!
//! Layout under a run's checkpoint root:
//! ```text
//! step-00000100/trained.safetensors    adapters, projector, heads (never the base model)
//! step-00000100/optimizer.safetensors  AdamW moments (exp_avg.*, exp_avg_sq.*)
//! step-00000100/manifest.json          CheckpointManifest: step, epoch, position in the data
//!                                      order, seeds, base-model hash, recommender version,
//!                                      config, metrics, sha256 of both files
//! latest.json                          {"dir": "step-00000100"}
//! ```
//! A checkpoint directory is written under a temporary name (every file fsynced) and renamed
//! into place, then `latest.json` is replaced atomically: a run killed at any moment leaves
//! the previous checkpoint intact and pointed to. A checkpoint that still fails its hash check
//! (a disk fault) is skipped for the previous one, which `keep_last` >= 2 keeps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rsllm_core::artefact::{sha256_file, sync_dir, unique_suffix, write_json_atomic};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Result, TrainError};

pub const TRAINED_FILE: &str = "trained.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const LATEST_FILE: &str = "latest.json";

/// Named tensors as safetensors files hold them.
pub type NamedTensors = Vec<(String, Tensor)>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch in progress (0-based) and how many of its examples were consumed.
    pub epoch: u64,
    pub examples_done_in_epoch: u64,
    /// Seeds the trainer derives its data order and dropout from.
    pub seed: u64,
    /// sha256 of the base model file (GGUF) or of its safetensors (HF directory).
    pub base_model_sha256: String,
    /// Version of the recommender whose item vectors feed the ID slots, if any.
    pub recommender_version: Option<String>,
    /// The full training configuration, as the trainer serialises it.
    pub config: serde_json::Value,
    /// Loss curve points and evaluation results so far.
    pub metrics: serde_json::Value,
    /// Filled in by [`save`].
    #[serde(default)]
    pub trained_sha256: String,
    #[serde(default)]
    pub optimizer_sha256: String,
}

impl CheckpointManifest {
    /// Refuses a checkpoint (at `dir`) trained over another base model, or with another
    /// version of the recommender when `recommender_version` is given, naming both sides.
    pub fn check_provenance(
        &self,
        dir: &Path,
        base_model_sha256: &str,
        recommender_version: Option<Option<&str>>,
    ) -> Result<()> {
        let refuse = |reason: String| {
            Err(TrainError::BadCheckpoint {
                path: dir.to_owned(),
                reason,
            })
        };
        if self.base_model_sha256 != base_model_sha256 {
            return refuse(format!(
                "was trained over the base model with sha256 {}; the loaded base model has sha256 {base_model_sha256}",
                self.base_model_sha256
            ));
        }
        if let Some(now) = recommender_version
            && self.recommender_version.as_deref() != now
        {
            return refuse(format!(
                "was trained with recommender version {}; the recommender loaded now is {}",
                self.recommender_version.as_deref().unwrap_or("none"),
                now.unwrap_or("none")
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: CheckpointManifest,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Temporary checkpoint directories start with this; [`prune`] removes stale ones.
const TEMP_PREFIX: &str = ".tmp-";

/// A temporary directory untouched for this long belongs to a writer that died. A live writer
/// creates its three files (and the manifest's temporary file) one after another, and each
/// new entry refreshes the directory's mtime, so even a full fine-tune's gigabyte-sized file
/// keeps the gap to seconds: an hour is far from any live writer sharing the directory.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-N` directory name.
fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Writes a checkpoint for `manifest.step` under `root` and points `latest.json` at it;
/// keeps the `keep_last` newest checkpoints up to it (at least 1) and removes older ones,
/// steps above it (orphans of an interrupted run) and stale temporary directories.
pub fn save(
    root: &Path,
    mut manifest: CheckpointManifest,
    trained: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep_last: usize,
) -> Result<Checkpoint> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let name = step_name(manifest.step);
    let final_dir = root.join(&name);
    // Unique across processes sharing the volume (containers all run as pid 1) and created
    // exclusively: a collision fails instead of mixing two writers' files.
    let temp_dir = root.join(format!("{TEMP_PREFIX}{name}-{}", unique_suffix()));
    std::fs::create_dir(&temp_dir).map_err(io(&temp_dir))?;
    let written = write_files(&temp_dir, &mut manifest, trained, optimizer)
        .and_then(|()| move_into_place(&temp_dir, &final_dir));
    if let Err(err) = written {
        // Best effort: the directory is garbage either way, and prune would only remove it an
        // hour from now; the original error matters.
        let _ = std::fs::remove_dir_all(&temp_dir);
        return Err(err);
    }
    // The rename must be durable before latest.json names the directory.
    sync_dir(root).map_err(io(root))?;
    let latest = root.join(LATEST_FILE);
    write_json_atomic(&latest, &serde_json::json!({ "dir": name })).map_err(io(&latest))?;
    prune(root, keep_last.max(1), manifest.step)?;
    Ok(Checkpoint {
        dir: final_dir,
        manifest,
    })
}

/// The tensor files (fsynced, then hashed into `manifest`) and the manifest, into `dir`.
fn write_files(
    dir: &Path,
    manifest: &mut CheckpointManifest,
    trained: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
) -> Result<()> {
    for (file, named, sha256) in [
        (TRAINED_FILE, trained, &mut manifest.trained_sha256),
        (OPTIMIZER_FILE, optimizer, &mut manifest.optimizer_sha256),
    ] {
        let path = dir.join(file);
        let on_cpu = named
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.f_detach()?.f_to_device(tch::Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::write_safetensors(&on_cpu, &path).map_err(|e| TrainError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        // tch does not fsync: without this a power loss could leave a checkpoint whose
        // manifest and pointer survived but whose tensors did not.
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
        *sha256 = sha256_file(&path).map_err(io(&path))?;
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    write_json_atomic(&manifest_path, &*manifest).map_err(io(&manifest_path))?;
    // The tensor files' directory entries (write_json_atomic syncs only as best effort).
    sync_dir(dir).map_err(io(dir))
}

/// Renames the finished `temp_dir` to `final_dir`, replacing a checkpoint of the same step
/// (a run resumed from an older checkpoint writes that step again).
fn move_into_place(temp_dir: &Path, final_dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(final_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TrainError::Io {
                path: final_dir.to_owned(),
                source,
            });
        }
    }
    std::fs::rename(temp_dir, final_dir).map_err(io(final_dir))
}

/// The `step-N` directories under `root` as (N, name), unsorted.
fn step_dirs(root: &Path) -> Result<Vec<(u64, String)>> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let name = entry.map_err(io(root))?.file_name();
        let name = name.to_string_lossy();
        if let Some(step) = parse_step(&name) {
            steps.push((step, name.into_owned()));
        }
    }
    Ok(steps)
}

/// Keeps the `keep` newest checkpoints up to `current` (the one latest.json names, so it is
/// always kept); removes older ones, those above `current` (orphans of an interrupted run,
/// whose steps a resumed run writes again), and stale temporary directories.
fn prune(root: &Path, keep: usize, current: u64) -> Result<()> {
    let (mut kept, orphans): (Vec<_>, Vec<_>) = step_dirs(root)?
        .into_iter()
        .partition(|&(step, _)| step <= current);
    kept.sort_unstable();
    let excess = kept.len().saturating_sub(keep);
    for (_, name) in kept.into_iter().take(excess).chain(orphans) {
        let dir = root.join(name);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let entry = entry.map_err(io(root))?;
        if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        // Only old ones: a fresh one may be another writer's save in progress.
        let stale = entry.metadata().is_ok_and(|m| {
            m.is_dir()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= STALE_TEMP_AGE)
        });
        if stale && let Err(error) = std::fs::remove_dir_all(entry.path()) {
            // Not worth failing a saved checkpoint for: another pruner may have got there
            // first, and the next save tries again.
            tracing::warn!(%error, "cannot remove the stale {}", entry.path().display());
        }
    }
    Ok(())
}

/// The name `latest.json` under `root` points to, or None when there is none.
fn read_pointer(root: &Path) -> Result<Option<String>> {
    let latest = root.join(LATEST_FILE);
    let text = match std::fs::read_to_string(&latest) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TrainError::Io {
                path: latest,
                source,
            });
        }
    };
    let pointer: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::BadCheckpoint {
            path: latest.clone(),
            reason: format!("not JSON: {e}"),
        })?;
    let Some(name) = pointer.get("dir").and_then(|d| d.as_str()) else {
        return Err(TrainError::BadCheckpoint {
            path: latest,
            reason: "no \"dir\" entry".into(),
        });
    };
    if name.contains('/') || name.contains("..") {
        return Err(TrainError::BadCheckpoint {
            path: latest,
            reason: format!("dir {name:?} leaves the checkpoint root"),
        });
    }
    Ok(Some(name.to_owned()))
}

/// The checkpoint `latest.json` points to, or None when the run has none yet. Its files are
/// checked against their hashes (one more read of them than [`Checkpoint::load`]'s own): when
/// it is missing or fails the check, the newest older `step-*` checkpoint that passes is
/// returned instead, with a warning naming the bad one, so a run resumes (and a stage serves)
/// from the previous checkpoint rather than not at all. When none passes, the error is the
/// one `latest.json`'s checkpoint gave.
pub fn latest(root: &Path) -> Result<Option<Checkpoint>> {
    let Some(name) = read_pointer(root)? else {
        return Ok(None);
    };
    let named = root.join(&name);
    let bad = match Checkpoint::open_verified(&named) {
        Ok(ckpt) => return Ok(Some(ckpt)),
        Err(err) => err,
    };
    let Some(named_step) = parse_step(&name) else {
        return Err(bad);
    };
    let mut older: Vec<_> = step_dirs(root)?
        .into_iter()
        .filter(|&(step, _)| step < named_step)
        .collect();
    older.sort_unstable();
    for (_, older_name) in older.into_iter().rev() {
        match Checkpoint::open_verified(&root.join(&older_name)) {
            Ok(ckpt) => {
                tracing::warn!(
                    error = %bad,
                    "the checkpoint {} that {LATEST_FILE} names is unusable; using the older {}",
                    named.display(),
                    ckpt.dir.display()
                );
                return Ok(Some(ckpt));
            }
            Err(error) => tracing::warn!(%error, "older checkpoint {older_name} unusable too"),
        }
    }
    Err(bad)
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let manifest = serde_json::from_str(&text).map_err(|e| TrainError::BadCheckpoint {
            path: path.clone(),
            reason: format!("not a checkpoint manifest: {e}"),
        })?;
        Ok(Checkpoint {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// [`Checkpoint::open`], and both tensor files match the manifest's hashes.
    fn open_verified(dir: &Path) -> Result<Checkpoint> {
        let ckpt = Checkpoint::open(dir)?;
        ckpt.checked(TRAINED_FILE, &ckpt.manifest.trained_sha256)?;
        ckpt.checked(OPTIMIZER_FILE, &ckpt.manifest.optimizer_sha256)?;
        Ok(ckpt)
    }

    /// The path of `file` in this checkpoint, once its sha256 is the `want`ed one.
    fn checked(&self, file: &str, want: &str) -> Result<PathBuf> {
        let path = self.dir.join(file);
        let actual = sha256_file(&path).map_err(io(&path))?;
        if actual != want {
            return Err(TrainError::BadCheckpoint {
                path,
                reason: format!("sha256 {actual} differs from the manifest's {want}"),
            });
        }
        Ok(path)
    }

    /// The trained tensors and the optimizer state, each checked against the manifest's hash.
    /// Returns `(trained, optimizer)`.
    pub fn load(&self) -> Result<(NamedTensors, NamedTensors)> {
        let read = |file: &str, want: &str| -> Result<NamedTensors> {
            let path = self.checked(file, want)?;
            Tensor::read_safetensors(&path).map_err(|e| TrainError::BadCheckpoint {
                path,
                reason: format!("unreadable: {e}"),
            })
        };
        Ok((
            read(TRAINED_FILE, &self.manifest.trained_sha256)?,
            read(OPTIMIZER_FILE, &self.manifest.optimizer_sha256)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn manifest(step: u64) -> CheckpointManifest {
        CheckpointManifest {
            step,
            epoch: 0,
            examples_done_in_epoch: step * 4,
            seed: 7,
            base_model_sha256: "b179".into(),
            recommender_version: Some("abc".into()),
            config: serde_json::json!({"lr": 1e-3}),
            metrics: serde_json::json!({}),
            trained_sha256: String::new(),
            optimizer_sha256: String::new(),
        }
    }

    fn tensors(value: f64) -> Vec<(String, Tensor)> {
        vec![(
            "projector.fc1.weight".into(),
            Tensor::full([2, 3], value, (Kind::Float, Device::Cpu)),
        )]
    }

    #[test]
    fn another_base_model_or_recommender_version_is_refused_naming_both() {
        let m = manifest(3);
        let dir = Path::new("runs/x/checkpoints/step-00000003");
        assert!(m.check_provenance(dir, "b179", Some(Some("abc"))).is_ok());
        assert!(
            m.check_provenance(dir, "b179", None).is_ok(),
            "the recommender unchecked"
        );
        let err = m
            .check_provenance(dir, "ffff", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step-00000003")
                && err.contains("sha256 b179")
                && err.contains("sha256 ffff"),
            "{err}"
        );
        let err = m
            .check_provenance(dir, "b179", Some(Some("def")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("version abc") && err.contains("is def"),
            "{err}"
        );
        let err = m
            .check_provenance(dir, "b179", Some(None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("version abc") && err.contains("is none"),
            "{err}"
        );
    }

    /// Saves a checkpoint at each of `steps` (trained tensors filled with the step number).
    fn save_steps(root: &Path, steps: &[u64], keep_last: usize) {
        for &step in steps {
            save(
                root,
                manifest(step),
                &tensors(step as f64),
                &tensors(-1.0),
                keep_last,
            )
            .unwrap();
        }
    }

    #[test]
    fn save_points_latest_at_the_newest_and_prunes() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        assert!(latest(root.path()).unwrap().is_none());
        save_steps(root.path(), &[10, 20, 30], 2);
        let found = latest(root.path()).unwrap().unwrap();
        assert_eq!(found.manifest.step, 30);
        let (trained, optimizer) = found.load().unwrap();
        assert_eq!(trained[0].1.double_value(&[0, 0]), 30.0);
        assert_eq!(optimizer[0].1.double_value(&[1, 2]), -1.0);
        let mut names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["latest.json", "step-00000020", "step-00000030"]);
    }

    #[test]
    fn a_tampered_file_is_refused() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        let ckpt = save(root.path(), manifest(5), &tensors(1.0), &tensors(2.0), 3).unwrap();
        Tensor::write_safetensors(&tensors(9.0), ckpt.dir.join(TRAINED_FILE)).unwrap();
        // No older checkpoint to fall back to: the bad one is named.
        let err = latest(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("step-00000005/trained.safetensors") && err.contains("sha256"),
            "{err}"
        );
        let err = Checkpoint::open(&ckpt.dir)
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trained.safetensors") && err.contains("sha256"),
            "{err}"
        );
        std::fs::write(root.path().join(LATEST_FILE), r#"{"dir": "../elsewhere"}"#).unwrap();
        let err = latest(root.path()).unwrap_err().to_string();
        assert!(err.contains("leaves"), "{err}");
    }

    #[test]
    fn a_corrupt_or_missing_newest_checkpoint_falls_back_to_the_previous_one() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        save_steps(root.path(), &[10, 20, 30], 3);
        let newest = root.path().join("step-00000030");
        let mut bytes = std::fs::read(newest.join(OPTIMIZER_FILE)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(newest.join(OPTIMIZER_FILE), &bytes).unwrap();
        let found = latest(root.path()).unwrap().unwrap();
        assert_eq!(found.manifest.step, 20);
        assert_eq!(found.load().unwrap().0[0].1.double_value(&[0, 0]), 20.0);
        // Gone (a crash while a resumed run rewrote it), and the next one corrupt too.
        std::fs::remove_dir_all(&newest).unwrap();
        let previous = root.path().join("step-00000020");
        Tensor::write_safetensors(&tensors(9.0), previous.join(TRAINED_FILE)).unwrap();
        let found = latest(root.path()).unwrap().unwrap();
        assert_eq!(found.manifest.step, 10);
        assert_eq!(found.load().unwrap().0[0].1.double_value(&[0, 0]), 10.0);
    }

    #[test]
    fn a_leftover_temporary_directory_does_not_count() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        save(root.path(), manifest(1), &tensors(1.0), &tensors(1.0), 3).unwrap();
        // As if a run died while writing step 2.
        std::fs::create_dir_all(root.path().join(".tmp-step-00000002-1")).unwrap();
        assert_eq!(latest(root.path()).unwrap().unwrap().manifest.step, 1);
    }

    #[test]
    fn prune_removes_stale_temporary_directories_but_not_fresh_ones() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        let stale = root.path().join(".tmp-step-00000002-1.0.00000000000000aa");
        let fresh = root.path().join(".tmp-step-00000002-1.0.00000000000000bb");
        for dir in [&stale, &fresh] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join(TRAINED_FILE), b"half").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::open(&stale)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        save(root.path(), manifest(3), &tensors(1.0), &tensors(1.0), 2).unwrap();
        assert!(!stale.exists(), "a dead writer's leftover");
        assert!(fresh.exists(), "possibly another writer's save in progress");
        let leftovers = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-") && !n.ends_with("bb"))
            .count();
        assert_eq!(
            leftovers, 0,
            "the save's own temporary directory was renamed"
        );
    }

    #[test]
    fn prune_keeps_the_step_latest_names_and_drops_higher_orphans() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        // An orphan above: step 30 was renamed into place, then the run died before
        // latest.json named it, and the resumed run starts from an older step.
        let other = tempfile::tempdir().unwrap();
        let orphan = save(other.path(), manifest(30), &tensors(30.0), &tensors(0.0), 1).unwrap();
        std::fs::rename(&orphan.dir, root.path().join("step-00000030")).unwrap();
        let names = || {
            let mut names: Vec<String> = std::fs::read_dir(root.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        for step in [10, 20] {
            save(
                root.path(),
                manifest(step),
                &tensors(step as f64),
                &tensors(0.0),
                1,
            )
            .unwrap();
            let found = latest(root.path()).unwrap().unwrap();
            assert_eq!(found.manifest.step, step);
            let value = found.load().unwrap().0[0].1.double_value(&[0, 0]);
            assert_eq!(value, step as f64);
            assert_eq!(names(), ["latest.json".to_owned(), step_name(step)]);
        }
    }
}
