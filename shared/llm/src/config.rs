//! Model hyperparameters: the file formats ([`HfLlamaConfig`] from `config.json`, GGUF
//! metadata) kept apart from what the code needs ([`LlamaConfig`]), as candle's llama.rs does.

use serde::{Deserialize, Serialize};

use crate::error::{LlmError, Result};

/// `config.json` of a Hugging Face Llama-family checkpoint, as written by transformers.
/// Optional fields take transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// transformers 5 moved `rope_theta` into `rope_parameters`.
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub model_type: Option<String>,
    pub hidden_act: Option<String>,
    /// Only the default rotary embedding is implemented; anything else is refused.
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

/// Most parameters a config may describe (Llama-family checkpoints this engine serves are at
/// most tens of billions).
pub const MAX_PARAMETERS: usize = 200_000_000_000;
/// Largest single dimension of a config.
pub const MAX_DIMENSION: usize = 1 << 24;

/// The resolved hyperparameters the model code runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// The shape of SmolLM2-135M (the default model), for work where the weights do not
    /// matter: speed benchmarks on random weights.
    pub fn smollm2_135m() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rope_theta: 100_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// Checks the invariants the model code relies on; `source` names the file in errors.
    pub fn validate(&self, source: &std::path::Path) -> Result<()> {
        let fail = |reason: String| Err(LlmError::bad_model(source, reason));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return fail(format!(
                "vocab_size ({}), hidden_size ({}) and num_hidden_layers ({}) must be positive",
                self.vocab_size, self.hidden_size, self.num_hidden_layers
            ));
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return fail(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return fail(format!(
                "head_dim ({}) must be even and positive",
                self.head_dim
            ));
        }
        // Written so that NaN fails too.
        let positive = |x: f64| x > 0.0;
        if !positive(self.rope_theta) || !positive(self.rms_norm_eps) {
            return fail(format!(
                "rope_theta ({}) and rms_norm_eps ({}) must be positive",
                self.rope_theta, self.rms_norm_eps
            ));
        }
        self.size_problem().map_or(Ok(()), fail)
    }

    /// [`Self::validate`]'s size check alone, for a config built in code (no file to name).
    pub fn check_size(&self) -> Result<()> {
        self.size_problem()
            .map_or(Ok(()), |reason| Err(LlmError::invalid(reason)))
    }

    /// Why this config is too large to build, if it is: a dimension above [`MAX_DIMENSION`]
    /// or more than [`MAX_PARAMETERS`] in all. A corrupt header's sizes are refused here, not
    /// by a failed multi-terabyte allocation or an arithmetic overflow.
    fn size_problem(&self) -> Option<String> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, value)) = dims.iter().find(|(_, v)| *v > MAX_DIMENSION) {
            return Some(format!("{name} ({value}) is larger than {MAX_DIMENSION}"));
        }
        match self.checked_num_parameters() {
            Some(n) if n <= MAX_PARAMETERS => None,
            Some(n) => Some(format!(
                "{n} parameters: more than this engine builds ({MAX_PARAMETERS})"
            )),
            None => Some("the parameter count overflows".into()),
        }
    }

    /// This config as a Hugging Face `config.json` (transformers' Llama keys).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "torch_dtype": "float32",
        })
    }

    /// The number of parameters of the model this config describes (saturating; a config
    /// that passed [`Self::validate`] is far from that).
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    fn checked_num_parameters(&self) -> Option<usize> {
        let d = self.hidden_size;
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        // q and o are d x q each, k and v d x kv each.
        let attn = d.checked_mul(q.checked_add(kv)?.checked_mul(2)?)?;
        let mlp = d.checked_mul(self.intermediate_size)?.checked_mul(3)?;
        let per_layer = attn.checked_add(mlp)?.checked_add(d.checked_mul(2)?)?;
        let embed = self.vocab_size.checked_mul(d)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed
            .checked_add(head)?
            .checked_add(d)?
            .checked_add(self.num_hidden_layers.checked_mul(per_layer)?)
    }
}

impl HfLlamaConfig {
    pub fn into_config(self, source: &std::path::Path) -> Result<LlamaConfig> {
        let fail = |reason: String| Err(LlmError::bad_model(source, reason));
        if let Some(model_type) = &self.model_type
            && !matches!(model_type.as_str(), "llama" | "mistral")
        {
            return fail(format!(
                "model_type {model_type:?} is not a Llama-family decoder this engine supports (llama, mistral)"
            ));
        }
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return fail(format!("hidden_act {act:?} is not supported (silu)"));
        }
        if self.attention_bias || self.mlp_bias {
            return fail("attention_bias and mlp_bias are not supported".into());
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.clone());
        if let Some(rope_type) = rope_type
            && rope_type != "default"
        {
            return fail(format!(
                "rope_type {rope_type:?} is not supported (default)"
            ));
        }
        if let Some(scaling) = &self.rope_scaling
            && !scaling.is_null()
        {
            return fail(format!("rope_scaling {scaling} is not supported"));
        }
        let heads = self.num_attention_heads;
        let head_dim = match (self.head_dim, heads) {
            (Some(h), _) => h,
            (None, 0) => 0,
            (None, heads) => self.hidden_size / heads,
        };
        let rope_theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .unwrap_or(self.rope_theta);
        let config = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: first_token_id(self.bos_token_id.as_ref()),
            eos_token_ids: token_ids(self.eos_token_id.as_ref()),
        };
        config.validate(source)?;
        Ok(config)
    }
}

/// `eos_token_id` is a number or a list of numbers in config.json.
fn token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .into_iter()
            .collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

fn first_token_id(value: Option<&serde_json::Value>) -> Option<u32> {
    token_ids(value).first().copied()
}

/// Hyperparameters from GGUF metadata (`{arch}.block_count`, ...), as llama.cpp writes them.
pub fn from_gguf(file: &rsllm_gguf::GgufFile, source: &std::path::Path) -> Result<LlamaConfig> {
    let arch = file.architecture()?.to_owned();
    if arch != "llama" {
        return Err(LlmError::bad_model(
            source,
            format!("general.architecture is {arch:?}; this engine reads llama GGUF files"),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = file.get_u32(&key("embedding_length"))? as usize;
    let heads = file.get_u32(&key("attention.head_count"))? as usize;
    let kv_heads = if file.metadata.contains_key(&key("attention.head_count_kv")) {
        file.get_u32(&key("attention.head_count_kv"))? as usize
    } else {
        heads
    };
    let vocab_size = if file.metadata.contains_key(&key("vocab_size")) {
        file.get_u32(&key("vocab_size"))? as usize
    } else {
        file.get_str_array("tokenizer.ggml.tokens")?.len()
    };
    let head_dim = if file.metadata.contains_key(&key("attention.key_length")) {
        file.get_u32(&key("attention.key_length"))? as usize
    } else {
        hidden_size.checked_div(heads).unwrap_or(0)
    };
    let rope_theta = if file.metadata.contains_key(&key("rope.freq_base")) {
        f64::from(file.get_f32(&key("rope.freq_base"))?)
    } else {
        default_rope_theta()
    };
    let optional_id = |k: &str| -> Result<Option<u32>> {
        if file.metadata.contains_key(k) {
            Ok(Some(file.get_u32(k)?))
        } else {
            Ok(None)
        }
    };
    let config = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: file.get_u32(&key("feed_forward_length"))? as usize,
        num_hidden_layers: file.get_u32(&key("block_count"))? as usize,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rope_theta,
        rms_norm_eps: f64::from(file.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
        max_position_embeddings: file.get_u32(&key("context_length"))? as usize,
        // llama.cpp omits `output.weight` when the head is tied to the embeddings.
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        bos_token_id: optional_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: optional_id("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
    };
    config.validate(source)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_resolves_defaults_and_rope_parameters() {
        let _rng = crate::test_rng_lock();
        let json = r#"{"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
            "tie_word_embeddings": true, "eos_token_id": [2, 3], "bos_token_id": 1,
            "model_type": "llama"}"#;
        let hf: HfLlamaConfig = serde_json::from_str(json).unwrap();
        let c = hf.into_config(std::path::Path::new("config.json")).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
    }

    #[test]
    fn hf_config_refuses_what_the_model_code_does_not_implement() {
        let _rng = crate::test_rng_lock();
        let base = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4"#;
        for (extra, needle) in [
            (r#", "num_key_value_heads": 3"#, "multiple"),
            (r#", "model_type": "gpt2""#, "gpt2"),
            (r#", "rope_scaling": {"type": "yarn"}"#, "rope_scaling"),
            (r#", "hidden_act": "gelu""#, "gelu"),
        ] {
            let hf: HfLlamaConfig = serde_json::from_str(&format!("{{{base}{extra}}}")).unwrap();
            let err = hf
                .into_config(std::path::Path::new("cfg/config.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("cfg/config.json"), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn sizes_from_a_corrupt_header_are_refused_before_anything_is_built() {
        let _rng = crate::test_rng_lock();
        let path = std::path::Path::new("big.gguf");
        let mut c = LlamaConfig::smollm2_135m();
        c.num_hidden_layers = 4_000_000_000;
        let err = c.validate(path).unwrap_err().to_string();
        assert!(
            err.starts_with("big.gguf: num_hidden_layers (4000000000)"),
            "{err}"
        );
        let mut c = LlamaConfig::smollm2_135m();
        c.hidden_size = 1 << 20;
        c.intermediate_size = 1 << 20;
        let err = c.validate(path).unwrap_err().to_string();
        assert!(
            err.contains("parameters: more than this engine builds"),
            "{err}"
        );
        assert!(c.check_size().is_err());
        // Each dimension under the cap, the product past usize: no overflow, a refusal.
        let mut c = LlamaConfig::smollm2_135m();
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers) = (1 << 24, 1 << 24, 1 << 24);
        assert_eq!(c.num_parameters(), usize::MAX);
        assert!(c.check_size().is_err());
        assert!(LlamaConfig::smollm2_135m().check_size().is_ok());
    }

    #[test]
    fn parameter_count_of_smollm2_135m() {
        let _rng = crate::test_rng_lock();
        let c = LlamaConfig::smollm2_135m();
        // SmolLM2-135M: 134,515,008 parameters (HF model card rounds to 135M).
        assert_eq!(c.num_parameters(), 134_515_008);
    }
}
