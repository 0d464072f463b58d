//! A trained recommender on disk and in memory.
//!
//! On disk: `model-<sha256 prefix>.safetensors` (flat names such as `item_emb.weight`,
//! `pos_emb.weight`, `blocks.0.attn.in_proj_weight`, `gru.weight_ih_l0`, `conv_h.0.weight`)
//! and `manifest.json` ([`RecManifest`]), which names that file and whose `version` is its
//! sha256. The weights file is named by its content so that saving a new version never
//! touches the file the current manifest names: the manifest's atomic replace is the single
//! commit point, and until it happens the previous artefact stays loadable.

use std::fs;
use std::path::Path;

use rsllm_core::ItemId;
use rsllm_core::artefact::{sha256_file, sha256_hex, sync_dir, unique_suffix, write_json_atomic};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::model::{SeqRecommender, build_network};
use crate::{ModelKind, RecConfig, RecError};

/// The weights file of artefacts saved before [`RecManifest::weights_file`] existed (newer
/// ones name theirs by content, see [`weights_file_name`]).
pub const MODEL_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";

/// The weights file a save of weights with sha256 `version` writes:
/// `model-<first 16 hex digits>.safetensors`.
pub fn weights_file_name(version: &str) -> String {
    format!("model-{}.safetensors", version.get(..16).unwrap_or(version))
}

/// Weights files an artefact directory may hold: the legacy name or a content name. Only these
/// are removed once no manifest names them.
fn is_weights_file(name: &str) -> bool {
    name == MODEL_FILE || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

fn legacy_weights_file() -> String {
    MODEL_FILE.to_owned()
}

/// Histories scored per forward pass: bounds the `B x num_items` score matrix.
const SCORE_BATCH: usize = 1024;

/// `manifest.json` of a recommender artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecManifest {
    pub kind: ModelKind,
    /// e.g. "movielens"
    pub dataset: String,
    /// "llara" or "loo"
    pub protocol: String,
    /// The prepared split's version (SplitManifest::version) it was trained on.
    pub split_version: String,
    pub num_items: usize,
    pub config: RecConfig,
    /// sha256 of the weights file: the model version caches and responses carry.
    pub version: String,
    /// The weights file beside the manifest (a plain file name); `model.safetensors` in
    /// manifests written before this field existed.
    #[serde(default = "legacy_weights_file")]
    pub weights_file: String,
    /// Validation/test metrics and training summary (epochs, best epoch, seconds).
    pub metrics: serde_json::Value,
}

/// A loaded recommender: the tch module in eval mode plus its manifest. Not `Sync` (tch
/// tensors are not); the service keeps it behind a mutex or on a worker thread.
pub struct RecModel {
    pub manifest: RecManifest,
    /// Owns the variables the network's tensors alias.
    pub(crate) vs: nn::VarStore,
    pub(crate) net: Box<dyn SeqRecommender>,
}

impl std::fmt::Debug for RecModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecModel")
            .field("manifest", &self.manifest)
            .field("device", &self.vs.device())
            .finish_non_exhaustive()
    }
}

impl RecModel {
    /// Loads `dir/manifest.json` and the weights file it names on `device`, checking the file
    /// hash against the manifest's version. The file is read twice (hash, then load); that
    /// is safe against a concurrent save because a save never rewrites a file under a name a
    /// manifest gave it, only adds a file of another content under another name.
    pub fn load(dir: &Path, device: Device) -> Result<RecModel, RecError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_text = fs::read_to_string(&manifest_path).map_err(|source| RecError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest: RecManifest = serde_json::from_str(&manifest_text).map_err(|err| {
            RecError::Invalid(format!(
                "{}: not a recommender manifest: {err}",
                manifest_path.display()
            ))
        })?;

        let weights_file = &manifest.weights_file;
        if weights_file.is_empty()
            || weights_file.contains(['/', '\\'])
            || weights_file == "."
            || weights_file == ".."
        {
            return Err(RecError::Invalid(format!(
                "{}: weights_file {weights_file:?} is not a file name in the artefact directory",
                manifest_path.display()
            )));
        }
        let weights_path = dir.join(weights_file);
        let actual = sha256_file(&weights_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                RecError::Invalid(format!(
                    "{}: the weights file {weights_file} that {} names is missing",
                    weights_path.display(),
                    manifest_path.display()
                ))
            } else {
                RecError::Io {
                    path: weights_path.clone(),
                    source,
                }
            }
        })?;
        if actual != manifest.version {
            return Err(RecError::Invalid(format!(
                "{}: sha256 {actual} does not match the version {} recorded in {}; the file \
                 changed after it was saved (retrain or restore it)",
                weights_path.display(),
                manifest.version,
                manifest_path.display()
            )));
        }

        let vs = nn::VarStore::new(device);
        let net = build_network(
            manifest.kind,
            &vs.root(),
            &manifest.config,
            manifest.num_items,
        )
        .map_err(|err| prefix_error(&manifest_path, err))?;
        let mut model = RecModel { manifest, vs, net };
        model.vs.load(&weights_path).map_err(|err| {
            RecError::Invalid(format!(
                "{}: cannot load the {} weights: {err}",
                weights_path.display(),
                model.manifest.kind
            ))
        })?;
        model.vs.freeze();
        Ok(model)
    }

    /// An untrained model with seeded random weights (tests, benchmarks, smoke runs). Its
    /// manifest has empty split_version and metrics until saved by the trainer; its version is
    /// `untrained-<hash of the weights>` until saved.
    pub fn new_untrained(
        kind: ModelKind,
        config: RecConfig,
        dataset: &str,
        num_items: usize,
        device: Device,
    ) -> Result<RecModel, RecError> {
        config.validate(kind)?;
        // Weights depend on the seed only (libtorch's generator is global).
        tch::manual_seed(config.seed as i64);
        let vs = nn::VarStore::new(device);
        let net = build_network(kind, &vs.root(), &config, num_items)?;
        let manifest = RecManifest {
            kind,
            dataset: dataset.to_owned(),
            protocol: String::new(),
            split_version: String::new(),
            num_items,
            config,
            version: String::new(),
            // Named when saved.
            weights_file: legacy_weights_file(),
            metrics: serde_json::Value::Object(serde_json::Map::new()),
        };
        let mut model = RecModel { manifest, vs, net };
        model.manifest.version = format!("untrained-{}", model.weights_fingerprint()?);
        // Frozen like a loaded model: libtorch may pick other kernels (other rounding) for
        // weights that require gradients, and an untrained model should score exactly as the
        // same weights saved and loaded. The trainer unfreezes it.
        model.vs.freeze();
        Ok(model)
    }

    /// Writes the weights as `dir/model-<sha256 prefix>.safetensors`, then `dir/manifest.json`
    /// naming them (both atomically, in this order: the manifest's replace is the commit
    /// point, so a crash or error before it leaves the previous artefact loadable), then
    /// removes weights files no manifest names any more. Sets and returns the manifest with
    /// `version` = sha256 of the safetensors bytes. One writer per directory: two saving at
    /// once may each remove the other's weights.
    pub fn save(&mut self, dir: &Path) -> Result<RecManifest, RecError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        // VarStore::save picks the format from the extension, so the temporary sibling must
        // end in .safetensors too. Created empty and exclusively first: VarStore::save would
        // truncate another writer's file on a name collision.
        let temp_path = dir.join(format!(".model.tmp.{}.safetensors", unique_suffix()));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(io_error(&temp_path))?;
        let written = (|| {
            self.vs.save(&temp_path).map_err(|err| {
                RecError::Invalid(format!(
                    "{}: cannot write weights: {err}",
                    temp_path.display()
                ))
            })?;
            fs::File::open(&temp_path)
                .and_then(|file| file.sync_all())
                .map_err(io_error(&temp_path))?;
            let version = sha256_file(&temp_path).map_err(io_error(&temp_path))?;
            let weights_file = weights_file_name(&version);
            // A file of that name holds these very bytes already (the same weights saved
            // again): replacing it changes nothing a concurrent reader could see.
            let weights_path = dir.join(&weights_file);
            fs::rename(&temp_path, &weights_path).map_err(io_error(&weights_path))?;
            Ok::<_, RecError>((version, weights_file))
        })();
        let (version, weights_file) = match written {
            Ok(named) => named,
            Err(err) => {
                // Best effort: the temporary file is garbage either way.
                let _ = fs::remove_file(&temp_path);
                return Err(err);
            }
        };
        // The weights' rename must be durable before a manifest names them.
        sync_dir(dir).map_err(io_error(dir))?;
        let mut manifest = self.manifest.clone();
        manifest.version = version;
        manifest.weights_file = weights_file;
        let manifest_path = dir.join(MANIFEST_FILE);
        write_json_atomic(&manifest_path, &manifest).map_err(io_error(&manifest_path))?;
        remove_unnamed_weights(dir, &manifest.weights_file);
        self.manifest = manifest;
        Ok(self.manifest.clone())
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    pub fn kind(&self) -> ModelKind {
        self.manifest.kind
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn num_items(&self) -> usize {
        self.manifest.num_items
    }

    /// Width of the item vectors (64).
    pub fn dim(&self) -> usize {
        self.manifest.config.dim
    }

    /// History window; longer histories are cut to their last `max_history` items.
    pub fn max_history(&self) -> usize {
        self.manifest.config.max_history
    }

    /// The raw ID vectors (the item-embedding table rows 0..num_items, no padding row),
    /// row-major `num_items x dim`. This is what the LLM's projector consumes.
    ///
    /// # Panics
    /// Only if the table this crate built is not a float matrix, which cannot happen for a
    /// model built by `load`/`new_untrained`; [`RecModel::try_item_embeddings`] returns the
    /// error instead.
    pub fn item_embeddings(&self) -> Vec<f32> {
        self.try_item_embeddings()
            .expect("the item table is a float matrix built by this crate")
    }

    /// [`RecModel::item_embeddings`] with errors returned.
    pub fn try_item_embeddings(&self) -> Result<Vec<f32>, RecError> {
        let table = self.item_embedding_tensor()?;
        Ok(Vec::<f32>::try_from(
            &table
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_contiguous()?
                .f_view([-1])?,
        )?)
    }

    /// The item vectors as a detached `num_items x dim` tensor on the model's device (a copy:
    /// the caller may keep it after the model is dropped or retrained).
    pub fn item_embedding_tensor(&self) -> Result<Tensor, RecError> {
        let _guard = tch::no_grad_guard();
        let rows = self
            .net
            .item_table()
            .f_narrow(0, 0, self.num_items() as i64)?;
        Ok(rows.f_detach_copy()?)
    }

    /// Scores every item after each history: `histories.len() x num_items`, row-major.
    /// Histories must be non-empty with ids < num_items (checked: `RecError::Invalid`); longer
    /// ones are cut to their last `max_history` items.
    pub fn score_all(&self, histories: &[Vec<ItemId>]) -> Result<Vec<Vec<f32>>, RecError> {
        self.check_histories(histories)?;
        let _guard = tch::no_grad_guard();
        let mut scores = Vec::with_capacity(histories.len());
        for chunk in histories.chunks(SCORE_BATCH) {
            let states = self.encode(chunk.iter().map(Vec::as_slice))?;
            let chunk_scores = self.net.score_items(&states)?;
            scores.extend(tensor_rows(&chunk_scores)?);
        }
        Ok(scores)
    }

    /// The user state after each history (`histories.len() x dim`, on the model's device,
    /// detached): the vector the recommender dots with item vectors to score them, and what
    /// fills a prompt's user slot (RSLLM's `UnifiedWithUser` prompts). Ids are checked; an
    /// empty history is all padding and still has a state.
    pub fn user_states(&self, histories: &[&[ItemId]]) -> Result<Tensor, RecError> {
        for (row, history) in histories.iter().enumerate() {
            self.check_ids(history, "history", row)?;
        }
        let _guard = tch::no_grad_guard();
        let mut states = Vec::with_capacity(histories.len().div_ceil(SCORE_BATCH));
        for chunk in histories.chunks(SCORE_BATCH) {
            states.push(self.encode(chunk.iter().copied())?);
        }
        if states.is_empty() {
            return Ok(Tensor::f_zeros(
                [0, self.dim() as i64],
                (Kind::Float, self.device()),
            )?);
        }
        Ok(Tensor::f_cat(&states, 0)?.f_detach()?)
    }

    /// Scores given candidates after each history (`candidates[i]` for `histories[i]`).
    /// Checked: equal list lengths, non-empty histories, every id < num_items.
    pub fn score_candidates(
        &self,
        histories: &[Vec<ItemId>],
        candidates: &[Vec<ItemId>],
    ) -> Result<Vec<Vec<f32>>, RecError> {
        if histories.len() != candidates.len() {
            return Err(RecError::Invalid(format!(
                "{} histories but {} candidate lists",
                histories.len(),
                candidates.len()
            )));
        }
        self.check_histories(histories)?;
        let histories: Vec<&[ItemId]> = histories.iter().map(Vec::as_slice).collect();
        let candidates: Vec<&[ItemId]> = candidates.iter().map(Vec::as_slice).collect();
        self.candidate_scores(&histories, &candidates)
    }

    /// Candidate scores without the non-empty history check (an empty history is all padding
    /// and still has a state); ids are still checked. Used by evaluation.
    pub(crate) fn candidate_scores(
        &self,
        histories: &[&[ItemId]],
        candidates: &[&[ItemId]],
    ) -> Result<Vec<Vec<f32>>, RecError> {
        for (row, (history, row_candidates)) in histories.iter().zip(candidates).enumerate() {
            self.check_ids(history, "history", row)?;
            self.check_ids(row_candidates, "candidates", row)?;
        }
        let _guard = tch::no_grad_guard();
        let device = self.device();
        let table = self.net.item_table();
        let mut scores = Vec::with_capacity(histories.len());
        for (chunk_histories, chunk_candidates) in histories
            .chunks(SCORE_BATCH)
            .zip(candidates.chunks(SCORE_BATCH))
        {
            let states = self.encode(chunk_histories.iter().copied())?;
            // One flat gather for the whole chunk, so lists may differ in length: the state of
            // row r dotted with the vector of each of its candidates.
            let mut state_rows = Vec::new();
            let mut candidate_ids = Vec::new();
            for (row, row_candidates) in chunk_candidates.iter().enumerate() {
                state_rows.extend(std::iter::repeat_n(row as i64, row_candidates.len()));
                candidate_ids.extend(row_candidates.iter().map(|&id| i64::from(id)));
            }
            let flat: Vec<f32> = if candidate_ids.is_empty() {
                Vec::new()
            } else {
                let state_rows = Tensor::f_from_slice(&state_rows)?.f_to_device(device)?;
                let candidate_ids = Tensor::f_from_slice(&candidate_ids)?.f_to_device(device)?;
                let dots = states
                    .f_index_select(0, &state_rows)?
                    .f_mul(&table.f_index_select(0, &candidate_ids)?)?
                    .f_sum_dim_intlist(-1, false, Kind::Float)?;
                Vec::<f32>::try_from(&dots.f_to_device(Device::Cpu)?)?
            };
            let mut rest = flat.as_slice();
            for row_candidates in chunk_candidates {
                let (row_scores, tail) = rest.split_at(row_candidates.len());
                scores.push(row_scores.to_vec());
                rest = tail;
            }
        }
        Ok(scores)
    }

    /// User states (`B x dim`, eval mode) of histories already checked for id range.
    pub(crate) fn encode<'a>(
        &self,
        histories: impl ExactSizeIterator<Item = &'a [ItemId]>,
    ) -> Result<Tensor, RecError> {
        let ids = history_batch(
            histories,
            self.max_history(),
            self.num_items(),
            self.device(),
        )?;
        Ok(self.net.encode(&ids, false)?)
    }

    fn check_histories(&self, histories: &[Vec<ItemId>]) -> Result<(), RecError> {
        for (row, history) in histories.iter().enumerate() {
            if history.is_empty() {
                return Err(RecError::Invalid(format!("history {row} is empty")));
            }
            self.check_ids(history, "history", row)?;
        }
        Ok(())
    }

    fn check_ids(&self, ids: &[ItemId], what: &str, row: usize) -> Result<(), RecError> {
        match ids.iter().find(|&&id| id as usize >= self.num_items()) {
            Some(id) => Err(RecError::Invalid(format!(
                "{what} {row}: item id {id} is out of range (the model knows {} items, ids 0..{})",
                self.num_items(),
                self.num_items()
            ))),
            None => Ok(()),
        }
    }

    /// sha256 of every variable's bytes in name order: identifies in-memory weights.
    fn weights_fingerprint(&self) -> Result<String, RecError> {
        let mut variables: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let mut bytes = Vec::new();
        for (name, tensor) in variables {
            bytes.extend_from_slice(name.as_bytes());
            let values = Vec::<f32>::try_from(
                &tensor
                    .f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Float)?
                    .f_contiguous()?
                    .f_view([-1])?,
            )?;
            bytes.extend(values.iter().flat_map(|value| value.to_le_bytes()));
        }
        Ok(sha256_hex(&bytes)[..16].to_owned())
    }
}

/// Left-pads (with `padding_id` = num_items) or cuts each history to its last `window` items:
/// a `B x window` int64 tensor on `device`. Ids must already be checked.
pub(crate) fn history_batch<'a>(
    histories: impl ExactSizeIterator<Item = &'a [ItemId]>,
    window: usize,
    padding_id: usize,
    device: Device,
) -> Result<Tensor, RecError> {
    let rows = histories.len();
    let mut ids = Vec::with_capacity(rows * window);
    for history in histories {
        let kept = &history[history.len().saturating_sub(window)..];
        ids.extend(std::iter::repeat_n(padding_id as i64, window - kept.len()));
        ids.extend(kept.iter().map(|&id| i64::from(id)));
    }
    Ok(Tensor::f_from_slice(&ids)?
        .f_view([rows as i64, window as i64])?
        .f_to_device(device)?)
}

/// A `B x N` float tensor as rows.
fn tensor_rows(matrix: &Tensor) -> Result<Vec<Vec<f32>>, RecError> {
    let cpu = matrix
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    Ok(Vec::<Vec<f32>>::try_from(&cpu)?)
}

fn prefix_error(path: &Path, err: RecError) -> RecError {
    match err {
        RecError::Invalid(message) => RecError::Invalid(format!("{}: {message}", path.display())),
        RecError::Data(_) | RecError::Torch(_) | RecError::Io { .. } => err,
    }
}

/// Best effort: removes the weights files in `dir` other than `named` (the manifest's), i.e.
/// those of versions saved before. A leftover only costs disk space and the next save tries
/// again, so a failure is a warning, not a failed save.
fn remove_unnamed_weights(dir: &Path, named: &str) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%error, "cannot list {} to remove old weights", dir.display());
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name != named && is_weights_file(&name) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot remove the old weights {}", path.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny_config;

    const NUM_ITEMS: usize = 30;

    fn model(kind: ModelKind) -> RecModel {
        RecModel::new_untrained(kind, tiny_config(), "synthetic", NUM_ITEMS, Device::Cpu).unwrap()
    }

    fn histories() -> Vec<Vec<ItemId>> {
        vec![vec![1, 2, 3], vec![29], vec![4, 5, 6, 7, 8, 9, 10, 11]]
    }

    #[test]
    fn save_load_round_trip_keeps_scores_and_item_vectors() {
        let _rng = crate::test_rng_lock();
        for kind in ModelKind::ALL {
            let dir = tempfile::tempdir().unwrap();
            let mut original = model(kind);
            let manifest = original.save(dir.path()).unwrap();
            assert_eq!(manifest.version.len(), 64);
            assert_eq!(
                manifest.version,
                sha256_file(&dir.path().join(&manifest.weights_file)).unwrap()
            );
            assert_eq!(manifest.weights_file, weights_file_name(&manifest.version));
            let loaded = RecModel::load(dir.path(), Device::Cpu).unwrap();
            assert_eq!(loaded.manifest, manifest);
            assert_eq!(loaded.kind(), kind);
            assert_eq!(loaded.item_embeddings(), original.item_embeddings());
            assert_eq!(loaded.item_embeddings().len(), NUM_ITEMS * 8);
            let scores = original.score_all(&histories()).unwrap();
            assert_eq!(loaded.score_all(&histories()).unwrap(), scores);
            assert_eq!(scores.len(), 3);
            assert_eq!(scores[0].len(), NUM_ITEMS);
            let candidates = vec![vec![0, 5, 9], vec![3], vec![]];
            let picked = loaded.score_candidates(&histories(), &candidates).unwrap();
            assert_eq!(
                picked,
                original
                    .score_candidates(&histories(), &candidates)
                    .unwrap()
            );
            // Candidate scores are the same numbers as the full score rows.
            for (row, row_candidates) in candidates.iter().enumerate() {
                for (k, &id) in row_candidates.iter().enumerate() {
                    let full = scores[row][id as usize];
                    assert!(
                        (picked[row][k] - full).abs() < 1e-5,
                        "{kind} row {row} item {id}"
                    );
                }
            }
            // Saving the same weights again gives the same version.
            let mut loaded = loaded;
            let again = tempfile::tempdir().unwrap();
            assert_eq!(loaded.save(again.path()).unwrap().version, manifest.version);
        }
    }

    /// The service moves a model onto its worker thread.
    #[test]
    fn models_are_send() {
        let _rng = crate::test_rng_lock();
        fn assert_send<T: Send>() {}
        assert_send::<RecModel>();
    }

    #[test]
    fn untrained_models_are_seeded() {
        let _rng = crate::test_rng_lock();
        let a = model(ModelKind::Sasrec);
        let b = model(ModelKind::Sasrec);
        assert_eq!(a.item_embeddings(), b.item_embeddings());
        assert_eq!(a.version(), b.version());
        assert!(a.version().starts_with("untrained-"));
    }

    #[test]
    fn load_rejects_tampered_missing_and_corrupt_files() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let weights_file = model(ModelKind::Sasrec)
            .save(dir.path())
            .unwrap()
            .weights_file;
        let weights = dir.path().join(&weights_file);
        let mut bytes = fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        fs::write(&weights, &bytes).unwrap();
        let err = RecModel::load(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&weights_file) && err.contains("does not match"),
            "{err}"
        );

        // A corrupt file whose hash was recorded (e.g. truncated before saving the manifest).
        fs::write(&weights, b"not safetensors").unwrap();
        let mut manifest: RecManifest =
            serde_json::from_str(&fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap())
                .unwrap();
        manifest.version = sha256_file(&weights).unwrap();
        fs::write(
            dir.path().join(MANIFEST_FILE),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        let err = RecModel::load(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&weights_file) && err.contains("cannot load"),
            "{err}"
        );

        fs::remove_file(&weights).unwrap();
        let err = RecModel::load(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&weights_file), "{err}");
        fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        let err = RecModel::load(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("manifest.json"), "{err}");
    }

    #[test]
    fn load_rejects_weights_of_another_shape() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let weights_file = model(ModelKind::Gru4rec)
            .save(dir.path())
            .unwrap()
            .weights_file;
        let path = dir.path().join(MANIFEST_FILE);
        let mut manifest: RecManifest =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        manifest.num_items += 1;
        fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
        let err = RecModel::load(dir.path(), Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&weights_file), "{err}");
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn saving_again_leaves_only_the_new_version_and_no_stale_weights() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let old = model(ModelKind::Sasrec).save(dir.path()).unwrap();
        let mut config = tiny_config();
        config.seed += 1;
        let mut newer = RecModel::new_untrained(
            ModelKind::Sasrec,
            config,
            "synthetic",
            NUM_ITEMS,
            Device::Cpu,
        )
        .unwrap();
        let new = newer.save(dir.path()).unwrap();
        assert_ne!(new.version, old.version);
        assert_ne!(new.weights_file, old.weights_file);
        let loaded = RecModel::load(dir.path(), Device::Cpu).unwrap();
        assert_eq!(loaded.manifest, new);
        assert_eq!(loaded.item_embeddings(), newer.item_embeddings());
        assert_eq!(
            file_names(dir.path()),
            [MANIFEST_FILE.to_owned(), new.weights_file.clone()]
        );
    }

    /// Artefacts saved before manifests named their weights file still load, and the next
    /// save into their directory removes the old fixed-name file.
    #[test]
    fn an_artefact_with_the_old_fixed_weights_name_loads_and_is_replaced_cleanly() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let mut original = model(ModelKind::Caser);
        let saved = original.save(dir.path()).unwrap();
        fs::rename(
            dir.path().join(&saved.weights_file),
            dir.path().join(MODEL_FILE),
        )
        .unwrap();
        let mut old_manifest = serde_json::to_value(&saved).unwrap();
        old_manifest.as_object_mut().unwrap().remove("weights_file");
        fs::write(
            dir.path().join(MANIFEST_FILE),
            serde_json::to_string(&old_manifest).unwrap(),
        )
        .unwrap();
        let mut loaded = RecModel::load(dir.path(), Device::Cpu).unwrap();
        assert_eq!(loaded.manifest.weights_file, MODEL_FILE);
        assert_eq!(loaded.item_embeddings(), original.item_embeddings());
        let again = loaded.save(dir.path()).unwrap();
        assert_eq!(again.version, saved.version);
        assert_eq!(
            file_names(dir.path()),
            [MANIFEST_FILE.to_owned(), saved.weights_file]
        );
    }

    #[test]
    fn a_manifest_naming_a_missing_or_outside_file_is_refused_naming_it() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let saved = model(ModelKind::Sasrec).save(dir.path()).unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        for (name, expected) in [
            ("model-0123456789abcdef.safetensors", "is missing"),
            ("../model.safetensors", "is not a file name"),
            ("", "is not a file name"),
        ] {
            let mut manifest = saved.clone();
            manifest.weights_file = name.into();
            fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
            let err = RecModel::load(dir.path(), Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("{name:?}")) || err.contains(&format!(" {name} ")),
                "{name}: {err}"
            );
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn scoring_validates_its_inputs() {
        let _rng = crate::test_rng_lock();
        let model = model(ModelKind::Sasrec);
        let err = model.score_all(&[vec![1], vec![]]).unwrap_err().to_string();
        assert!(err.contains("history 1 is empty"), "{err}");
        let err = model.score_all(&[vec![1, 30]]).unwrap_err().to_string();
        assert!(err.contains("item id 30"), "{err}");
        let err = model
            .score_candidates(&[vec![1]], &[vec![2], vec![3]])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("1 histories but 2 candidate lists"),
            "{err}"
        );
        let err = model
            .score_candidates(&[vec![1]], &[vec![2, 99]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("candidates 0") && err.contains("item id 99"),
            "{err}"
        );
        let err = model
            .score_candidates(&[vec![]], &[vec![2]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("history 0 is empty"), "{err}");
        assert!(model.score_all(&[]).unwrap().is_empty());
    }

    #[test]
    fn long_histories_keep_their_last_items() {
        let _rng = crate::test_rng_lock();
        let model = model(ModelKind::Caser);
        let long: Vec<ItemId> = (0..20).collect();
        let tail = long[15..].to_vec();
        // One call each: libtorch's kernels may round differently with the batch size.
        assert_eq!(
            model.score_all(&[long]).unwrap(),
            model.score_all(&[tail]).unwrap()
        );
    }

    #[test]
    fn user_states_are_what_the_scores_are_made_of() {
        let _rng = crate::test_rng_lock();
        for kind in [ModelKind::Sasrec, ModelKind::Gru4rec, ModelKind::Caser] {
            let model = model(kind);
            let histories = histories();
            let slices: Vec<&[ItemId]> = histories.iter().map(Vec::as_slice).collect();
            let states = model.user_states(&slices).unwrap();
            assert_eq!(states.size(), [3, model.dim() as i64], "{kind}");
            let table = model.item_embedding_tensor().unwrap();
            let from_states = Vec::<Vec<f32>>::try_from(states.matmul(&table.tr())).unwrap();
            let scores = model.score_all(&histories).unwrap();
            for (a, b) in from_states.iter().flatten().zip(scores.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{kind}: {a} vs {b}");
            }
            let err = model.user_states(&[&[1, 30]]).unwrap_err().to_string();
            assert!(
                err.contains("history 0") && err.contains("item id 30"),
                "{err}"
            );
            assert_eq!(
                model.user_states(&[]).unwrap().size(),
                [0, model.dim() as i64]
            );
        }
    }
}
