//! Stage 2 started from a transport probe's projector and heads (ours, beyond METHOD.md).
//!
//! A stage builds its projector and alignment heads from random values, and on a short
//! budget its heads spend the run learning to read `h` at all. The transport probe
//! ([`crate::transport`]) trains them on the recommender's user state and folds a ridge
//! readout of that state from `h` into `W_u`; with the user slot as the prompt's last token
//! the frozen LLM's `h` keeps most of it (docs/results.md), so a stage started from these
//! tensors ranks near the probe from its first step and L_ui's gradient into the adapters is
//! informative from the start instead of noise.
//!
//! The tensors live in a directory of their own: `heads.safetensors` (`projector.*`,
//! `heads.w_u`, `heads.w_v`, the names a stage's store gives them) and `heads.json`, the
//! manifest saying what they fit: base model, dataset, recommender version, prompt mode,
//! L_ui's similarity and temperature, and the stage whose adapters the LLM carried when `h`
//! was read. A stage refuses them, naming both sides, when any of these differs from its own.

use std::path::{Path, PathBuf};

use rsllm_core::artefact::{sha256_file, sync_dir, unique_suffix, write_json_atomic};
use rsllm_prompt::PromptMode;
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use rsllm_core::Catalog;
use rsllm_llm::LoadedModel;

use crate::checkpoint::{self, NamedTensors};
use crate::error::{Result, TrainError};
use crate::losses::UiSimilarity;
use crate::stage::{CHECKPOINT_DIR, Rsllm, open_stage};
use crate::transport::{TransportConfig, TransportReport};

pub const HEADS_FILE: &str = "heads.safetensors";
pub const MANIFEST_FILE: &str = "heads.json";
/// Only tensors under these prefixes are carried: the adapters stay the stage's own.
const PREFIXES: [&str; 2] = ["projector.", "heads."];

/// The stage whose trained tensors the LLM carried when `h` was read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadOn {
    pub stage_dir: PathBuf,
    pub step: u64,
    /// The checkpoint's `trained_sha256`: what a stage continuing from it must match.
    pub trained_sha256: String,
}

/// What the saved heads fit, and how they ranked when they were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmHeadsManifest {
    pub base_model_sha256: String,
    pub dataset: String,
    pub recommender_version: Option<String>,
    /// The prompts whose `h` the user head was fit to read.
    pub prompt_mode: PromptMode,
    pub ui_similarity: UiSimilarity,
    pub tau: f64,
    /// None: the base model alone (a stage without `init_from`).
    pub read_on: Option<ReadOn>,
    /// The folded head's HR@1 on each evaluation part the probe ranked, `(part, rows, hr1)`.
    pub folded_hr1: Vec<(String, usize, f64)>,
    /// Filled in by [`save`]; [`load`] checks the tensors against it.
    #[serde(default)]
    pub heads_sha256: String,
}

/// What the stage about to start from the heads is: each field must match the manifest's.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSide<'a> {
    pub base_model_sha256: &'a str,
    pub dataset: &'a str,
    pub recommender_version: Option<&'a str>,
    pub prompt_mode: PromptMode,
    pub ui_similarity: UiSimilarity,
    pub tau: f64,
    /// The checkpoint the stage starts from (`init_from`'s latest), as `(step, trained_sha256)`.
    pub init_checkpoint: Option<(u64, &'a str)>,
}

/// Attaches the trained stage in `dir` (its latest checkpoint) to `base`, for `h` to be read
/// with its adapters, and says which checkpoint that was. Keep the returned [`Rsllm`] alive
/// while the model runs: it holds the adapters' variables.
pub fn open_read_on(
    base: &mut LoadedModel,
    dir: &Path,
    dataset: &str,
    catalog: &Catalog,
) -> Result<(Rsllm, ReadOn)> {
    let (spec, rsllm, step) = open_stage(base, dir, catalog)?;
    if spec.dataset != dataset {
        return Err(TrainError::Invalid(format!(
            "the stage {} was trained on {}; the heads are for {dataset}",
            dir.display(),
            spec.dataset
        )));
    }
    let root = dir.join(CHECKPOINT_DIR);
    let latest = checkpoint::latest(&root)?.ok_or_else(|| TrainError::BadCheckpoint {
        path: root.clone(),
        reason: "no checkpoint yet".into(),
    })?;
    if latest.manifest.step != step {
        return Err(TrainError::BadCheckpoint {
            path: root,
            reason: format!(
                "its latest checkpoint moved from step {step} to {} while it was opened",
                latest.manifest.step
            ),
        });
    }
    let read_on = ReadOn {
        stage_dir: dir.to_owned(),
        step,
        trained_sha256: latest.manifest.trained_sha256,
    };
    Ok((rsllm, read_on))
}

impl WarmHeadsManifest {
    /// The manifest of a transport probe's heads (`heads_sha256` is filled in by [`save`]).
    pub fn new(
        base_model_sha256: String,
        dataset: &str,
        recommender_version: Option<String>,
        config: &TransportConfig,
        read_on: Option<ReadOn>,
        report: &TransportReport,
    ) -> WarmHeadsManifest {
        WarmHeadsManifest {
            base_model_sha256,
            dataset: dataset.to_owned(),
            recommender_version,
            prompt_mode: config.prompt_mode,
            ui_similarity: config.probe.similarity,
            tau: config.probe.tau,
            read_on,
            folded_hr1: report
                .parts
                .iter()
                .map(|p| (p.part.clone(), p.hidden_folded.n, p.hidden_folded.hr1.mean))
                .collect(),
            heads_sha256: String::new(),
        }
    }

    /// Refuses heads made for another stage than `stage`, naming the field and both sides.
    pub fn check_fits(&self, dir: &Path, stage: &StageSide<'_>) -> Result<()> {
        let refuse = |what: &str, theirs: String, ours: String| {
            Err(TrainError::Invalid(format!(
                "warm heads {}: {what} is {theirs} there, {ours} in this stage",
                dir.display()
            )))
        };
        let none = || "none".to_owned();
        if self.base_model_sha256 != stage.base_model_sha256 {
            return refuse(
                "the base model's sha256",
                self.base_model_sha256.clone(),
                stage.base_model_sha256.to_owned(),
            );
        }
        if self.dataset != stage.dataset {
            return refuse(
                "the dataset",
                self.dataset.clone(),
                stage.dataset.to_owned(),
            );
        }
        if self.recommender_version.as_deref() != stage.recommender_version {
            return refuse(
                "the recommender version",
                self.recommender_version.clone().unwrap_or_else(none),
                stage.recommender_version.map_or_else(none, str::to_owned),
            );
        }
        if self.prompt_mode != stage.prompt_mode {
            return refuse(
                "the prompt mode",
                format!("{:?}", self.prompt_mode),
                format!("{:?}", stage.prompt_mode),
            );
        }
        if self.ui_similarity != stage.ui_similarity {
            return refuse(
                "L_ui's similarity",
                format!("{:?}", self.ui_similarity),
                format!("{:?}", stage.ui_similarity),
            );
        }
        if self.tau != stage.tau {
            return refuse(
                "L_ui's temperature",
                self.tau.to_string(),
                stage.tau.to_string(),
            );
        }
        let read_on = self
            .read_on
            .as_ref()
            .map(|r| (r.step, r.trained_sha256.as_str()));
        if read_on != stage.init_checkpoint {
            let describe = |c: Option<(u64, &str)>| match c {
                Some((step, sha)) => {
                    format!("the checkpoint of step {step} (trained sha256 {sha})")
                }
                None => "the base model alone".to_owned(),
            };
            return refuse(
                "the model h was read on",
                describe(read_on),
                describe(stage.init_checkpoint),
            );
        }
        Ok(())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `tensors` and `manifest` into `dir` (created if missing): the tensors to a temporary
/// file, synced and renamed, then the manifest naming their hash, atomically. A crash between
/// the two leaves a manifest whose hash the new tensors fail, which [`load`] reports.
pub fn save(
    dir: &Path,
    mut manifest: WarmHeadsManifest,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    if let Some((name, _)) = tensors
        .iter()
        .find(|(name, _)| !PREFIXES.iter().any(|p| name.starts_with(p)))
    {
        return Err(TrainError::Invalid(format!(
            "warm heads hold only the projector and heads, not {name}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let temp = dir.join(format!(".tmp-{}-{HEADS_FILE}", unique_suffix()));
    let on_cpu = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_detach()?.f_to_device(tch::Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let written = Tensor::write_safetensors(&on_cpu, &temp)
        .map_err(|e| TrainError::Io {
            path: temp.clone(),
            source: std::io::Error::other(e),
        })
        .and_then(|()| {
            std::fs::File::open(&temp)
                .and_then(|f| f.sync_all())
                .map_err(io(&temp))
        })
        .and_then(|()| sha256_file(&temp).map_err(io(&temp)));
    let sha256 = match written {
        Ok(sha256) => sha256,
        Err(err) => {
            // Best effort: the temporary file is garbage either way.
            let _ = std::fs::remove_file(&temp);
            return Err(err);
        }
    };
    let path = dir.join(HEADS_FILE);
    std::fs::rename(&temp, &path).map_err(io(&path))?;
    sync_dir(dir).map_err(io(dir))?;
    manifest.heads_sha256 = sha256;
    let manifest_path = dir.join(MANIFEST_FILE);
    write_json_atomic(&manifest_path, &manifest).map_err(io(&manifest_path))
}

/// The manifest in `dir` alone (no tensors read): what the heads were made for.
pub fn read_manifest(dir: &Path) -> Result<WarmHeadsManifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::BadCheckpoint {
        path,
        reason: format!("not a warm-heads manifest: {e}"),
    })
}

/// The manifest and tensors in `dir`, the tensors checked against the manifest's hash.
pub fn load(dir: &Path) -> Result<(WarmHeadsManifest, NamedTensors)> {
    let manifest = read_manifest(dir)?;
    let path = dir.join(HEADS_FILE);
    let bad = |reason: String| TrainError::BadCheckpoint {
        path: path.clone(),
        reason,
    };
    let sha256 = sha256_file(&path).map_err(io(&path))?;
    if sha256 != manifest.heads_sha256 {
        return Err(bad(format!(
            "has sha256 {sha256}; {} names {}",
            dir.join(MANIFEST_FILE).display(),
            manifest.heads_sha256
        )));
    }
    let tensors = Tensor::read_safetensors(&path).map_err(|e| bad(e.to_string()))?;
    Ok((manifest, tensors))
}

/// Stops the projector and heads of `trained` from training (they keep requiring no
/// gradient; the adapters still train).
pub fn freeze(trained: &nn::VarStore) {
    for (name, var) in trained.variables() {
        if PREFIXES.iter().any(|p| name.starts_with(p)) {
            let _ = var.set_requires_grad(false);
        }
    }
}

/// Copies `tensors` into the projector and heads of `trained`: each must name one of its
/// variables with the same shape, and every projector and head variable must be given.
/// The adapters are left as they are.
pub fn restore_heads(trained: &nn::VarStore, tensors: NamedTensors, dir: &Path) -> Result<()> {
    let bad = |reason: String| TrainError::BadCheckpoint {
        path: dir.join(HEADS_FILE),
        reason,
    };
    let mut wanted: std::collections::HashMap<String, Tensor> = trained
        .variables()
        .into_iter()
        .filter(|(name, _)| PREFIXES.iter().any(|p| name.starts_with(p)))
        .collect();
    let _guard = tch::no_grad_guard();
    for (name, tensor) in tensors {
        let Some(mut var) = wanted.remove(&name) else {
            return Err(bad(format!(
                "holds {name}, which is not a projector or head variable of this stage"
            )));
        };
        if var.size() != tensor.size() {
            return Err(bad(format!(
                "{name} has shape {:?}, the stage {:?}",
                tensor.size(),
                var.size()
            )));
        }
        var.f_copy_(&tensor.f_to_device(var.device())?)?;
    }
    if let Some(missing) = wanted.keys().next() {
        return Err(bad(format!("lacks {missing}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::RsllmHeads;
    use tch::{Device, Kind};

    fn manifest() -> WarmHeadsManifest {
        WarmHeadsManifest {
            base_model_sha256: "base".into(),
            dataset: "movielens".into(),
            recommender_version: Some("rec-1".into()),
            prompt_mode: PromptMode::UnifiedWithUserLast,
            ui_similarity: UiSimilarity::Cosine,
            tau: 0.07,
            read_on: Some(ReadOn {
                stage_dir: "runs/movielens-stage1".into(),
                step: 12,
                trained_sha256: "stage1".into(),
            }),
            folded_hr1: vec![("test".into(), 95, 0.4)],
            heads_sha256: String::new(),
        }
    }

    fn stage_side(m: &WarmHeadsManifest) -> StageSide<'_> {
        StageSide {
            base_model_sha256: &m.base_model_sha256,
            dataset: &m.dataset,
            recommender_version: m.recommender_version.as_deref(),
            prompt_mode: m.prompt_mode,
            ui_similarity: m.ui_similarity,
            tau: m.tau,
            init_checkpoint: m
                .read_on
                .as_ref()
                .map(|r| (r.step, r.trained_sha256.as_str())),
        }
    }

    #[test]
    fn saved_heads_load_into_a_stage_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let made = nn::VarStore::new(Device::Cpu);
        let _made = RsllmHeads::new(&made.root(), 4, 8);
        let mut tensors: Vec<(String, Tensor)> = made
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        save(dir.path(), manifest(), &tensors).unwrap();
        let (loaded, named) = load(dir.path()).unwrap();
        assert_eq!(loaded.folded_hr1, manifest().folded_hr1);
        assert_eq!(loaded.heads_sha256.len(), 64);

        // A stage's store: the same heads beside an adapter, all different values.
        let stage = nn::VarStore::new(Device::Cpu);
        let _heads = RsllmHeads::new(&stage.root(), 4, 8);
        let adapter = stage.root().zeros("lora_a", &[2, 2]);
        restore_heads(&stage, named, dir.path()).unwrap();
        let now = stage.variables();
        for (name, tensor) in &tensors {
            assert!(now[name].equal(tensor), "{name}");
        }
        assert!(adapter.equal(&Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))));

        // Another width: refused naming the tensor.
        let narrow = nn::VarStore::new(Device::Cpu);
        let _narrow = RsllmHeads::new(&narrow.root(), 4, 6);
        let err = restore_heads(&narrow, load(dir.path()).unwrap().1, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("shape"), "{err}");

        // Tensors that are not the ones the manifest hashed.
        let other = vec![(
            "heads.w_u".to_owned(),
            Tensor::ones([8, 8], (Kind::Float, Device::Cpu)),
        )];
        Tensor::write_safetensors(&other, dir.path().join(HEADS_FILE)).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");

        // Only the projector and heads are carried.
        let lora = vec![(
            "lora_a".to_owned(),
            Tensor::ones([2, 2], (Kind::Float, Device::Cpu)),
        )];
        let err = save(dir.path(), manifest(), &lora).unwrap_err().to_string();
        assert!(err.contains("lora_a"), "{err}");
    }

    /// One field of a stage changed.
    type Change = fn(&mut StageSide<'_>);

    #[test]
    fn heads_made_for_another_stage_are_refused_naming_both_sides() {
        let made = manifest();
        let dir = Path::new("warm");
        assert!(made.check_fits(dir, &stage_side(&made)).is_ok());
        let cases: [(Change, &str); 8] = [
            (|s| s.base_model_sha256 = "other", "base model"),
            (|s| s.dataset = "lastfm", "dataset"),
            (|s| s.recommender_version = None, "recommender version"),
            (|s| s.prompt_mode = PromptMode::Unified, "prompt mode"),
            (
                |s| s.ui_similarity = UiSimilarity::UserNormalised,
                "similarity",
            ),
            (|s| s.tau = 0.1, "temperature"),
            (|s| s.init_checkpoint = None, "the base model alone"),
            (|s| s.init_checkpoint = Some((12, "other")), "read on"),
        ];
        for (change, named) in cases {
            let mut side = stage_side(&made);
            change(&mut side);
            let err = made.check_fits(dir, &side).unwrap_err().to_string();
            assert!(err.contains(named), "{named}: {err}");
        }
    }
}
