//! Loading a model: a GGUF file (dequantised to f32, GGUF names mapped to HF's) or a Hugging
//! Face directory (`config.json`, one or more safetensors shards, `tokenizer.json`).
//!
//! Every tensor is checked against the shape the config implies; a missing, unexpected or
//! misshapen tensor is an error naming the file and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rsllm_gguf::GgufFile;
use tch::{Device, Kind, Tensor, nn};

use crate::config::{self, HfLlamaConfig, LlamaConfig};
use crate::error::{LlmError, Result};
use crate::model::Llama;
use crate::tokenizer::LlmTokenizer;

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Gguf,
    HfDirectory,
}

/// A loaded base model: weights on `device` in `kind`, its tokenizer and provenance.
pub struct LoadedModel {
    pub model: Llama,
    /// Owns the variables `model` aliases; frozen (no gradients) after loading.
    pub vs: nn::VarStore,
    pub tokenizer: LlmTokenizer,
    pub path: PathBuf,
    pub format: ModelFormat,
    /// The dtypes of the tensors as stored, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}.
    pub stored_dtypes: BTreeMap<String, usize>,
    /// `weights_sha256`, once computed (hashing the 98 MB default model takes a while).
    weights_sha256: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("config", &self.model.config)
            .field("device", &self.vs.device())
            .field("kind", &self.model.kind())
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// sha256 of the weights as stored: the GGUF file, or an HF directory's
    /// `model.safetensors` (its `model.safetensors.index.json` when sharded). Checkpoints
    /// record it as the base model they were trained on.
    pub fn weights_sha256(&self) -> Result<String> {
        let file = match self.format {
            ModelFormat::Gguf => self.path.clone(),
            ModelFormat::HfDirectory => {
                let single = self.path.join("model.safetensors");
                if single.is_file() {
                    single
                } else {
                    self.path.join("model.safetensors.index.json")
                }
            }
        };
        if let Some(known) = self.weights_sha256.get() {
            return Ok(known.clone());
        }
        let sha = rsllm_core::artefact::sha256_file(&file)
            .map_err(|source| LlmError::Io { path: file, source })?;
        Ok(self.weights_sha256.get_or_init(|| sha).clone())
    }
}

/// Loads a GGUF file or an HF directory (picked by what `path` is) onto `device` in `kind`
/// (Float or BFloat16).
pub fn load(path: &Path, device: Device, kind: Kind) -> Result<LoadedModel> {
    if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(LlmError::invalid(format!(
            "dtype {kind:?} is not supported (f32, bf16, f16)"
        )));
    }
    let loaded = if path.is_dir() {
        load_hf_dir(path, device)?
    } else if path.is_file() {
        load_gguf(path, device)?
    } else {
        return Err(LlmError::bad_model(
            path,
            "no such file or directory (expected a .gguf file or a Hugging Face model directory)",
        ));
    };
    let mut loaded = loaded;
    if kind != Kind::Float {
        loaded.vs.set_kind(kind);
        // set_kind gave every variable new storage: q, k, v (gate, up) share one buffer again.
        loaded.model.fuse_projections()?;
    }
    loaded.vs.freeze();
    Ok(loaded)
}

/// HF name of a GGUF tensor name (llama.cpp's `convert_hf_to_gguf.py` mapping, reversed).
pub fn hf_name_of_gguf(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// llama.cpp stores q/k rows permuted for its interleaved rotary form; HF's rotate-half form
/// needs them back (`[heads, 2, half, in]` from `[heads, half, 2, in]`).
/// A tensor of another shape is refused (naming it), before the reshape could misread it.
fn unpermute_rotary_rows(w: &Tensor, heads: i64, name: &str, path: &Path) -> Result<Tensor> {
    let size = w.size();
    let [rows, cols] = size[..] else {
        return Err(LlmError::bad_model(
            path,
            format!("tensor {name:?} has shape {size:?}; a projection is 2-dimensional"),
        ));
    };
    if heads <= 0 || rows % (heads * 2) != 0 {
        return Err(LlmError::bad_model(
            path,
            format!("tensor {name:?} has {rows} rows, not a whole number of {heads} rotary heads"),
        ));
    }
    Ok(w.f_reshape([heads, rows / heads / 2, 2, cols])?
        .f_transpose(1, 2)?
        .f_reshape([rows, cols])?)
}

fn load_gguf(path: &Path, device: Device) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = config::from_gguf(&file, path)?;
    let tokenizer = LlmTokenizer::from_gguf(&file, path)?;
    let vs = nn::VarStore::new(device);
    let model = Llama::new(&vs.root(), &config)?;
    let mut stored_dtypes = BTreeMap::new();
    let mut tensors = Vec::with_capacity(file.tensors.len());
    for info in &file.tensors {
        let Some(hf) = hf_name_of_gguf(&info.name) else {
            // Tables llama.cpp may add for its own use (e.g. rope_freqs) are not weights of
            // the HF model; refuse rather than silently run a different model.
            return Err(LlmError::bad_model(
                path,
                format!("tensor {:?} has no Llama counterpart", info.name),
            ));
        };
        *stored_dtypes.entry(info.dtype.to_string()).or_insert(0) += 1;
        let values = file.tensor_f32(&info.name)?;
        let shape: Vec<i64> = info.shape().iter().map(|&d| d as i64).collect();
        let mut tensor = Tensor::f_from_slice(&values)?.f_reshape(&shape)?;
        if hf.ends_with("self_attn.q_proj.weight") {
            let heads = config.num_attention_heads as i64;
            tensor = unpermute_rotary_rows(&tensor, heads, &info.name, path)?;
        } else if hf.ends_with("self_attn.k_proj.weight") {
            let heads = config.num_key_value_heads as i64;
            tensor = unpermute_rotary_rows(&tensor, heads, &info.name, path)?;
        }
        tensors.push((hf, tensor));
    }
    copy_into(&vs, &config, tensors, path)?;
    Ok(LoadedModel {
        model,
        vs,
        tokenizer,
        path: path.to_owned(),
        format: ModelFormat::Gguf,
        stored_dtypes,
        weights_sha256: std::sync::OnceLock::new(),
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| LlmError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| LlmError::bad_model(path, format!("not valid JSON: {e}")))
}

fn load_hf_dir(dir: &Path, device: Device) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let hf: HfLlamaConfig = serde_json::from_value(read_json(&config_path)?)
        .map_err(|e| LlmError::bad_model(&config_path, format!("not a Llama config: {e}")))?;
    let config = hf.into_config(&config_path)?;
    let tokenizer = LlmTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let vs = nn::VarStore::new(device);
    let model = Llama::new(&vs.root(), &config)?;
    let mut stored_dtypes = BTreeMap::new();
    let mut tensors = Vec::new();
    for shard in safetensors_shards(dir)? {
        let named = Tensor::read_safetensors(&shard).map_err(|e| {
            LlmError::bad_model(&shard, format!("not a readable safetensors file: {e}"))
        })?;
        for (name, tensor) in named {
            *stored_dtypes
                .entry(format!("{:?}", tensor.kind()))
                .or_insert(0) += 1;
            tensors.push((name, tensor));
        }
    }
    copy_into(&vs, &config, tensors, dir)?;
    Ok(LoadedModel {
        model,
        vs,
        tokenizer,
        path: dir.to_owned(),
        format: ModelFormat::HfDirectory,
        stored_dtypes,
        weights_sha256: std::sync::OnceLock::new(),
    })
}

/// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let index = read_json(&index_path)?;
        let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(LlmError::bad_model(&index_path, "no weight_map object"));
        };
        let mut shards: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let Some(name) = file.as_str() else {
                return Err(LlmError::bad_model(
                    &index_path,
                    "a weight_map value is not a file name",
                ));
            };
            if name.contains('/') || name.contains("..") {
                return Err(LlmError::bad_model(
                    &index_path,
                    format!("shard name {name:?} leaves the directory"),
                ));
            }
            let shard = dir.join(name);
            if !shards.contains(&shard) {
                shards.push(shard);
            }
        }
        shards.sort();
        return Ok(shards);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(LlmError::bad_model(
        dir,
        "neither model.safetensors nor model.safetensors.index.json is present",
    ))
}

/// Copies loaded tensors into the store's variables: every variable exactly once, with the
/// right shape; a tied head's `lm_head.weight` and HF's cached rotary tables are skipped.
fn copy_into(
    vs: &nn::VarStore,
    config: &LlamaConfig,
    tensors: Vec<(String, Tensor)>,
    source: &Path,
) -> Result<()> {
    let mut variables: HashMap<String, Tensor> = vs.variables();
    let _guard = tch::no_grad_guard();
    let mut unexpected = Vec::new();
    for (name, tensor) in tensors {
        let Some(mut var) = variables.remove(&name) else {
            let ignorable = name.ends_with("rotary_emb.inv_freq")
                || (config.tie_word_embeddings && name == "lm_head.weight");
            if !ignorable {
                unexpected.push(name);
            }
            continue;
        };
        if var.size() != tensor.size() {
            return Err(LlmError::bad_model(
                source,
                format!(
                    "tensor {name}: shape {:?}, but the config needs {:?}",
                    tensor.size(),
                    var.size()
                ),
            ));
        }
        let converted = tensor.f_to_kind(Kind::Float)?;
        let finite = bool::try_from(converted.f_isfinite()?.f_all()?)?;
        if !finite {
            return Err(LlmError::bad_model(
                source,
                format!("tensor {name} holds NaN or infinite values"),
            ));
        }
        var.f_copy_(&converted)?;
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(LlmError::bad_model(
            source,
            format!("tensors the model does not have: {}", unexpected.join(", ")),
        ));
    }
    if !variables.is_empty() {
        let mut missing: Vec<String> = variables.into_keys().collect();
        missing.sort();
        return Err(LlmError::bad_model(
            source,
            format!("missing tensors: {}", missing.join(", ")),
        ));
    }
    Ok(())
}

/// The files an export writes: a directory holding anything else is not replaced by one.
const HF_EXPORT_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Writes `model` as a Hugging Face directory (`config.json`, `model.safetensors` in f32,
/// `tokenizer.json`) so that [`load`] or transformers can read it back: the GGUF default
/// becomes an HF checkpoint this way. The three files are written (and fsynced) into a
/// temporary sibling directory that then replaces `dir` whole, so `dir` never holds a config
/// of one export beside the weights of another, nor a shard index an export did not write.
/// A `dir` holding other files is refused, untouched: replacing it would delete them.
pub fn save_hf_dir(
    model: &Llama,
    vs: &nn::VarStore,
    tokenizer: &LlmTokenizer,
    dir: &Path,
) -> Result<()> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| LlmError::invalid(format!("{}: not a directory name", dir.display())))?;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let file = entry.map_err(io_error(dir))?.file_name();
                let file = file.to_string_lossy();
                if !HF_EXPORT_FILES.contains(&file.as_ref()) {
                    return Err(LlmError::invalid(format!(
                        "{}: holds {file}, which an export does not write; export into a new or \
                         empty directory",
                        dir.display()
                    )));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(dir)(e)),
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_error(&parent))?;
    let temp = parent.join(format!(
        ".{name}.tmp-{}",
        rsllm_core::artefact::unique_suffix()
    ));
    std::fs::create_dir(&temp).map_err(io_error(&temp))?;
    let written = write_hf_files(model, vs, tokenizer, &temp)
        .and_then(|()| replace_dir(&temp, dir, &parent, name));
    if written.is_err() {
        // Best effort: the temporary directory is garbage either way.
        let _ = std::fs::remove_dir_all(&temp);
    }
    written
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LlmError + use<> {
    let path = path.to_owned();
    move |source| LlmError::Io { path, source }
}

/// The three files of [`save_hf_dir`] into the fresh directory `dir`, durably.
fn write_hf_files(
    model: &Llama,
    vs: &nn::VarStore,
    tokenizer: &LlmTokenizer,
    dir: &Path,
) -> Result<()> {
    let config_path = dir.join("config.json");
    rsllm_core::artefact::write_json_atomic(&config_path, &model.config.to_hf_json())
        .map_err(io_error(&config_path))?;
    let tokenizer_path = dir.join("tokenizer.json");
    rsllm_core::artefact::write_atomic(&tokenizer_path, tokenizer.to_json()?.as_bytes())
        .map_err(io_error(&tokenizer_path))?;
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut f32_named = Vec::with_capacity(named.len());
    for (name, tensor) in named {
        f32_named.push((
            name,
            tensor.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?,
        ));
    }
    // Straight to its name: the directory is private until it is renamed into place.
    let weights_path = dir.join("model.safetensors");
    Tensor::write_safetensors(&f32_named, &weights_path)?;
    std::fs::File::open(&weights_path)
        .and_then(|f| f.sync_all())
        .map_err(io_error(&weights_path))?;
    rsllm_core::artefact::sync_dir(dir).map_err(io_error(dir))
}

/// Puts the directory `new` at `dir`. A previous `dir` is moved aside first and removed once
/// the new one is in place (put back if that rename fails), so `dir` is always one export or
/// the other, never a mix.
fn replace_dir(new: &Path, dir: &Path, parent: &Path, name: &str) -> Result<()> {
    let old = parent.join(format!(
        ".{name}.old-{}",
        rsllm_core::artefact::unique_suffix()
    ));
    let had_old = match std::fs::rename(dir, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_error(dir)(e)),
    };
    if let Err(e) = std::fs::rename(new, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(io_error(dir)(e));
    }
    rsllm_core::artefact::sync_dir(parent).map_err(io_error(parent))?;
    if had_old {
        // Best effort: the old export is no longer named by anything.
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{tiny_config, tiny_model};

    /// A byte-level BPE tokenizer over the 97 tokens of the tiny model's vocabulary.
    fn tiny_tokenizer() -> LlmTokenizer {
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 2, "content": "<eos>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "vocab": (0..97u32).map(|i| {
                let token = match i {
                    0 => "<unk>".to_owned(),
                    1 => "<bos>".to_owned(),
                    2 => "<eos>".to_owned(),
                    i => format!("t{i}"),
                };
                (token, serde_json::Value::from(i))
            }).collect::<serde_json::Map<String, serde_json::Value>>(), "merges": []}
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        LlmTokenizer::from_file(&path).unwrap()
    }

    fn saved_tiny_dir() -> (tempfile::TempDir, Llama) {
        let config = tiny_config();
        let (vs, model) = tiny_model(&config);
        let dir = tempfile::tempdir().unwrap();
        save_hf_dir(&model, &vs, &tiny_tokenizer(), dir.path()).unwrap();
        (dir, model)
    }

    #[test]
    fn an_export_replaces_a_previous_one_whole_and_never_a_foreign_directory() {
        let _rng = crate::test_rng_lock();
        let config = tiny_config();
        let (first_vs, first) = tiny_model(&config);
        let (second_vs, second) = tiny_model(&config);
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("export");
        save_hf_dir(&first, &first_vs, &tiny_tokenizer(), &dir).unwrap();

        // A shard index no export writes (it would win over model.safetensors when loading):
        // the directory is refused, untouched.
        std::fs::write(dir.join("model.safetensors.index.json"), "{}").unwrap();
        let err = save_hf_dir(&second, &second_vs, &tiny_tokenizer(), &dir)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds model.safetensors.index.json"), "{err}");
        assert!(dir.join("model.safetensors").is_file());
        std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();

        // Over the previous export: replaced whole, nothing left beside it.
        save_hf_dir(&second, &second_vs, &tiny_tokenizer(), &dir).unwrap();
        let names = |d: &Path| {
            let mut n: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(&dir),
            ["config.json", "model.safetensors", "tokenizer.json"]
        );
        assert_eq!(
            names(root.path()),
            ["export"],
            "temporary or old directories left"
        );
        assert!(load(&dir, Device::Cpu, Kind::Float).is_ok());
    }

    #[test]
    fn hf_directory_round_trip_gives_the_same_logits() {
        let _rng = crate::test_rng_lock();
        let (dir, model) = saved_tiny_dir();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("tmp")),
            "temporary files left: {names:?}"
        );
        let loaded = load(dir.path(), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(loaded.format, ModelFormat::HfDirectory);
        assert_eq!(loaded.model.config, model.config);
        let ids = Tensor::from_slice(&[5i64, 6, 7, 8]).view([1, 4]);
        let _g = tch::no_grad_guard();
        let a = model.forward_ids(&ids, None).unwrap();
        let b = loaded.model.forward_ids(&ids, None).unwrap();
        assert!((a - b).abs().max().double_value(&[]) < 1e-6);
        // bf16 loads too, with its variables cast.
        let bf16 = load(dir.path(), Device::Cpu, Kind::BFloat16).unwrap();
        assert_eq!(bf16.model.kind(), Kind::BFloat16);
        for l in [&loaded, &bf16] {
            let grads: Vec<String> =
                l.vs.variables()
                    .into_iter()
                    .filter(|(_, t)| t.requires_grad())
                    .map(|(n, _)| n)
                    .collect();
            assert!(grads.is_empty(), "the base model is frozen: {grads:?}");
        }
    }

    #[test]
    fn sharded_checkpoints_load_through_their_index() {
        let _rng = crate::test_rng_lock();
        let (dir, model) = saved_tiny_dir();
        let single = dir.path().join("model.safetensors");
        let all = Tensor::read_safetensors(&single).unwrap();
        let (first, second): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(n, _)| n.contains("layers.0."));
        Tensor::write_safetensors(&first, dir.path().join("model-00001-of-00002.safetensors"))
            .unwrap();
        Tensor::write_safetensors(&second, dir.path().join("model-00002-of-00002.safetensors"))
            .unwrap();
        std::fs::remove_file(&single).unwrap();
        let weight_map: serde_json::Map<String, serde_json::Value> = first
            .iter()
            .map(|(n, _)| (n.clone(), "model-00001-of-00002.safetensors".into()))
            .chain(
                second
                    .iter()
                    .map(|(n, _)| (n.clone(), "model-00002-of-00002.safetensors".into())),
            )
            .collect();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
        )
        .unwrap();
        let loaded = load(dir.path(), Device::Cpu, Kind::Float).unwrap();
        let w = loaded.vs.variables()["model.layers.1.mlp.up_proj.weight"].shallow_clone();
        let _ = model;
        assert_eq!(w.size(), [48, 32]);
    }

    /// Each broken directory gives an error naming the file and what is wrong.
    #[test]
    fn broken_hf_directories_are_named_errors() {
        let _rng = crate::test_rng_lock();
        let check = |mutate: &dyn Fn(&Path), needles: &[&str]| {
            let (dir, _) = saved_tiny_dir();
            mutate(dir.path());
            let err = load(dir.path(), Device::Cpu, Kind::Float)
                .unwrap_err()
                .to_string();
            for needle in needles {
                assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            }
        };
        let weights = |d: &Path| d.join("model.safetensors");
        // Truncated weights file.
        check(
            &|d| {
                let bytes = std::fs::read(weights(d)).unwrap();
                std::fs::write(weights(d), &bytes[..bytes.len() / 2]).unwrap();
            },
            &["model.safetensors", "not a readable safetensors file"],
        );
        // A tensor missing, one renamed to something the model lacks, one with a wrong shape.
        type Named = Vec<(String, Tensor)>;
        let rewrite = |d: &Path, f: &dyn Fn(Named) -> Named| {
            let all = Tensor::read_safetensors(weights(d)).unwrap();
            Tensor::write_safetensors(&f(all), weights(d)).unwrap();
        };
        check(
            &|d| {
                rewrite(d, &|all| {
                    all.into_iter()
                        .filter(|(n, _)| n != "model.norm.weight")
                        .collect()
                })
            },
            &["missing tensors: model.norm.weight"],
        );
        check(
            &|d| {
                rewrite(d, &|mut all| {
                    all.push((
                        "model.extra.weight".into(),
                        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
                    ));
                    all
                })
            },
            &["tensors the model does not have: model.extra.weight"],
        );
        check(
            &|d| {
                rewrite(d, &|all| {
                    all.into_iter()
                        .map(|(n, t)| {
                            if n == "model.layers.0.self_attn.q_proj.weight" {
                                (n, Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)))
                            } else {
                                (n, t)
                            }
                        })
                        .collect()
                })
            },
            &[
                "model.layers.0.self_attn.q_proj.weight",
                "[3, 3]",
                "[32, 32]",
            ],
        );
        check(
            &|d| {
                rewrite(d, &|all| {
                    all.into_iter()
                        .map(|(n, t)| {
                            if n == "model.norm.weight" {
                                (n, t.fill(f64::NAN))
                            } else {
                                (n, t)
                            }
                        })
                        .collect()
                })
            },
            &["model.norm.weight", "NaN"],
        );
        // Config problems.
        check(
            &|d| std::fs::write(d.join("config.json"), "{not json").unwrap(),
            &["config.json", "JSON"],
        );
        check(
            &|d| std::fs::write(d.join("config.json"), r#"{"model_type": "llama"}"#).unwrap(),
            &["config.json", "not a Llama config"],
        );
        check(
            &|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap(),
            &["tokenizer.json"],
        );
        check(
            &|d| std::fs::remove_file(weights(d)).unwrap(),
            &["neither model.safetensors"],
        );
    }

    #[test]
    fn a_missing_or_non_gguf_file_is_a_named_error() {
        let _rng = crate::test_rng_lock();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.gguf");
        let err = load(&missing, Device::Cpu, Kind::Float)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("absent.gguf") && err.contains("no such file"),
            "{err}"
        );
        let not_gguf = dir.path().join("fake.gguf");
        std::fs::write(&not_gguf, b"PK\x03\x04 this is a zip").unwrap();
        let err = load(&not_gguf, Device::Cpu, Kind::Float)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fake.gguf") && err.contains("not a GGUF file"),
            "{err}"
        );
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        let _rng = crate::test_rng_lock();
        assert_eq!(
            hf_name_of_gguf("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            hf_name_of_gguf("blk.12.attn_k.weight").unwrap(),
            "model.layers.12.self_attn.k_proj.weight"
        );
        assert_eq!(
            hf_name_of_gguf("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert!(hf_name_of_gguf("blk.x.attn_k.weight").is_none());
        assert!(hf_name_of_gguf("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let _rng = crate::test_rng_lock();
        // llama.cpp's permute: reshape(heads, 2, half, in).swapaxes(1, 2).
        let heads = 3;
        let w = Tensor::arange(6 * 4 * 5, (Kind::Float, Device::Cpu)).view([24, 5]);
        let permuted = w.reshape([heads, 2, 4, 5]).transpose(1, 2).reshape([24, 5]);
        let path = Path::new("m.gguf");
        let back = unpermute_rotary_rows(&permuted, heads, "blk.0.attn_q.weight", path).unwrap();
        assert!(back.equal(&w));
        // Shapes a corrupt file may declare: refused with the tensor's name, never a panic.
        let flat = Tensor::zeros([24], (Kind::Float, Device::Cpu));
        let odd = Tensor::zeros([25, 5], (Kind::Float, Device::Cpu));
        for bad in [&flat, &odd] {
            let err = unpermute_rotary_rows(bad, heads, "blk.0.attn_q.weight", path)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("m.gguf: tensor \"blk.0.attn_q.weight\""),
                "{err}"
            );
        }
    }
}
