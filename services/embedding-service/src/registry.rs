//! The loaded models: item vectors in memory for the hot path, the tch model behind a mutex
//! for scoring.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rsllm_recommender::{ModelKind, RecModel};
use tokio::sync::Semaphore;

use crate::error::{ServiceError, StartError};

/// One served model.
#[derive(Debug)]
pub struct LoadedModel {
    /// Artefact directory name, e.g. `movielens-llara-sasrec`.
    pub name: String,
    /// sha256 hex of the model's weights file.
    pub version: String,
    pub kind: ModelKind,
    pub dataset: String,
    pub protocol: String,
    pub num_items: usize,
    pub dim: usize,
    /// The model's history window.
    pub max_history: usize,
    /// Row-major `num_items x dim` raw ID vectors; GetItemEmbeddings reads only this.
    pub vectors: Arc<[f32]>,
    /// tch tensors are `Send` but not `Sync`: one scoring call at a time, on a blocking thread.
    model: Arc<Mutex<RecModel>>,
    /// Bounds scoring calls queued on this model.
    pending: Arc<Semaphore>,
    max_pending: usize,
}

impl LoadedModel {
    /// Wraps a loaded recommender under `name`, copying its item vectors out once.
    pub fn new(name: &str, model: RecModel, max_pending: usize) -> Result<LoadedModel, StartError> {
        let bad = |detail: String| StartError::BadModel {
            name: name.to_owned(),
            detail,
        };
        let vectors = model
            .try_item_embeddings()
            .map_err(|e| bad(format!("item table: {e}")))?;
        let (num_items, dim) = (model.num_items(), model.dim());
        if num_items == 0 || dim == 0 {
            return Err(bad(format!("{num_items} items of dim {dim}")));
        }
        if u32::try_from(num_items).is_err() {
            return Err(bad(format!("{num_items} items do not fit u32 item ids")));
        }
        if vectors.len() != num_items * dim {
            return Err(bad(format!(
                "item table has {} values, expected {num_items} x {dim}",
                vectors.len()
            )));
        }
        let m = &model.manifest;
        Ok(LoadedModel {
            name: name.to_owned(),
            version: m.version.clone(),
            kind: m.kind,
            dataset: m.dataset.clone(),
            protocol: m.protocol.clone(),
            num_items,
            dim,
            max_history: model.max_history(),
            vectors: vectors.into(),
            model: Arc::new(Mutex::new(model)),
            pending: Arc::new(Semaphore::new(max_pending)),
            max_pending,
        })
    }

    /// The vector of `id` (which the caller has range-checked).
    pub fn vector(&self, id: u32) -> Option<&[f32]> {
        let start = (id as usize).checked_mul(self.dim)?;
        self.vectors.get(start..start + self.dim)
    }

    /// Runs `f` on the model on a blocking thread, holding the model's mutex. At most
    /// `max_pending` calls wait or run per model; more get [`ServiceError::Overloaded`].
    pub async fn with_model<T, F>(&self, context: &'static str, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&RecModel) -> Result<T, rsllm_recommender::RecError> + Send + 'static,
    {
        let permit =
            self.pending
                .clone()
                .try_acquire_owned()
                .map_err(|_| ServiceError::Overloaded {
                    model: self.name.clone(),
                    limit: self.max_pending,
                })?;
        let model = self.model.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // A panic in an earlier call poisons the mutex but leaves the weights intact
            // (scoring does not mutate them), so keep serving.
            let guard = match model.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            f(&guard)
        })
        .await;
        match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ServiceError::internal(context, e)),
            Err(e) => Err(ServiceError::internal(context, e)),
        }
    }
}

/// The models of one replica, addressable by name or version.
#[derive(Debug, Default)]
pub struct Registry {
    /// Sorted by name.
    models: Vec<Arc<LoadedModel>>,
    by_key: HashMap<String, Arc<LoadedModel>>,
}

impl Registry {
    /// Builds a registry from already loaded models (tests, benchmarks, the CLI).
    pub fn from_models(models: Vec<LoadedModel>) -> Registry {
        let mut models: Vec<Arc<LoadedModel>> = models.into_iter().map(Arc::new).collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        let mut by_key = HashMap::new();
        for m in &models {
            by_key.entry(m.version.clone()).or_insert_with(|| m.clone());
        }
        // Names win over a (theoretical) version spelled like a name.
        for m in &models {
            by_key.insert(m.name.clone(), m.clone());
        }
        Registry { models, by_key }
    }

    /// Loads the artefacts under `dir` (all, or those in `names`) on `device`. Blocking.
    pub fn load(
        dir: &Path,
        names: &[String],
        device: tch::Device,
        max_pending: usize,
    ) -> Result<Registry, StartError> {
        let found = find_artefacts(dir)?;
        let chosen: Vec<(String, PathBuf)> = if names.is_empty() {
            if found.is_empty() {
                return Err(StartError::NoModels {
                    dir: dir.to_path_buf(),
                });
            }
            found
        } else {
            let mut chosen = Vec::new();
            for name in names {
                match found.iter().find(|(n, _)| n == name) {
                    Some(hit) => chosen.push(hit.clone()),
                    None => {
                        return Err(StartError::MissingModel {
                            name: name.clone(),
                            dir: dir.to_path_buf(),
                            found: list(found.iter().map(|(n, _)| n.as_str())),
                        });
                    }
                }
            }
            chosen
        };
        let mut models = Vec::with_capacity(chosen.len());
        for (name, path) in chosen {
            let started = std::time::Instant::now();
            let model = RecModel::load(&path, device).map_err(|source| StartError::Load {
                name: name.clone(),
                dir: path.clone(),
                source,
            })?;
            let loaded = LoadedModel::new(&name, model, max_pending)?;
            tracing::info!(
                model = %loaded.name,
                version = %loaded.version,
                kind = ?loaded.kind,
                items = loaded.num_items,
                dim = loaded.dim,
                window = loaded.max_history,
                ?device,
                ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            models.push(loaded);
        }
        Ok(Registry::from_models(models))
    }

    /// The model called `model` (name or version).
    pub fn get(&self, model: &str) -> Result<&Arc<LoadedModel>, ServiceError> {
        if model.is_empty() {
            return Err(ServiceError::EmptyModel);
        }
        self.by_key
            .get(model)
            .ok_or_else(|| ServiceError::UnknownModel {
                model: model.to_owned(),
                loaded: list(self.models.iter().map(|m| m.name.as_str())),
            })
    }

    /// Every model, sorted by name.
    pub fn models(&self) -> &[Arc<LoadedModel>] {
        &self.models
    }
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

/// Sub-directories of `dir` that hold a `manifest.json`, sorted by name.
fn find_artefacts(dir: &Path) -> Result<Vec<(String, PathBuf)>, StartError> {
    let io = |source| StartError::ModelsDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if !path.join("manifest.json").is_file() {
            continue;
        }
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            found.push((name.to_owned(), path.clone()));
        }
    }
    found.sort();
    Ok(found)
}
