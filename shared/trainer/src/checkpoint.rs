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
//! A checkpoint directory is written under a temporary name and renamed into place, then
//! `latest.json` is replaced atomically: a run killed at any moment leaves the previous
//! checkpoint intact and pointed to.

use std::path::{Path, PathBuf};

use rsllm_core::artefact::{sha256_file, write_json_atomic};
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

/// Writes a checkpoint for `manifest.step` under `root` and points `latest.json` at it;
/// keeps the `keep_last` newest checkpoints (at least 1) and removes older ones.
pub fn save(
    root: &Path,
    mut manifest: CheckpointManifest,
    trained: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep_last: usize,
) -> Result<Checkpoint> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let name = format!("step-{:08}", manifest.step);
    let final_dir = root.join(&name);
    let temp_dir = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if temp_dir.exists() {
        std::fs::remove_dir_all(&temp_dir).map_err(io(&temp_dir))?;
    }
    std::fs::create_dir_all(&temp_dir).map_err(io(&temp_dir))?;
    let to_cpu = |named: &[(String, Tensor)]| -> Result<Vec<(String, Tensor)>> {
        named
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.f_detach()?.f_to_device(tch::Device::Cpu)?)))
            .collect()
    };
    let trained_path = temp_dir.join(TRAINED_FILE);
    Tensor::write_safetensors(&to_cpu(trained)?, &trained_path)?;
    let optimizer_path = temp_dir.join(OPTIMIZER_FILE);
    Tensor::write_safetensors(&to_cpu(optimizer)?, &optimizer_path)?;
    manifest.trained_sha256 = sha256_file(&trained_path).map_err(io(&trained_path))?;
    manifest.optimizer_sha256 = sha256_file(&optimizer_path).map_err(io(&optimizer_path))?;
    let manifest_path = temp_dir.join(MANIFEST_FILE);
    write_json_atomic(&manifest_path, &manifest).map_err(io(&manifest_path))?;
    if final_dir.exists() {
        // A rerun of the same step (e.g. after a resume): replace it.
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&temp_dir, &final_dir).map_err(io(&final_dir))?;
    let latest = root.join(LATEST_FILE);
    write_json_atomic(&latest, &serde_json::json!({ "dir": name })).map_err(io(&latest))?;
    prune(root, keep_last.max(1))?;
    Ok(Checkpoint {
        dir: final_dir,
        manifest,
    })
}

/// Removes all but the `keep` newest `step-*` directories, and leftover temporary ones.
fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let entry = entry.map_err(io(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") {
            steps.push(name);
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for name in steps.into_iter().take(excess) {
        let dir = root.join(name);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

/// The checkpoint `latest.json` points to, or None when the run has none yet.
pub fn latest(root: &Path) -> Result<Option<Checkpoint>> {
    let latest = root.join(LATEST_FILE);
    if !latest.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&latest).map_err(io(&latest))?;
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
    Checkpoint::open(&root.join(name)).map(Some)
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

    /// The trained tensors and the optimizer state, each checked against the manifest's hash.
    /// Returns `(trained, optimizer)`.
    pub fn load(&self) -> Result<(NamedTensors, NamedTensors)> {
        let read = |file: &str, want: &str| -> Result<NamedTensors> {
            let path = self.dir.join(file);
            let actual = sha256_file(&path).map_err(io(&path))?;
            if actual != want {
                return Err(TrainError::BadCheckpoint {
                    path,
                    reason: format!("sha256 {actual} differs from the manifest's {want}"),
                });
            }
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

    #[test]
    fn save_points_latest_at_the_newest_and_prunes() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        assert!(latest(root.path()).unwrap().is_none());
        for step in [10, 20, 30] {
            save(
                root.path(),
                manifest(step),
                &tensors(step as f64),
                &tensors(-1.0),
                2,
            )
            .unwrap();
        }
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
        let err = latest(root.path())
            .unwrap()
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
    fn a_leftover_temporary_directory_does_not_count() {
        let _rng = crate::test_support::rng_lock();
        let root = tempfile::tempdir().unwrap();
        save(root.path(), manifest(1), &tensors(1.0), &tensors(1.0), 3).unwrap();
        // As if a run died while writing step 2.
        std::fs::create_dir_all(root.path().join(".tmp-step-00000002-1")).unwrap();
        assert_eq!(latest(root.path()).unwrap().unwrap().manifest.step, 1);
    }
}
