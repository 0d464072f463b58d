//! The tokenizer seen through a two-method trait, so this crate needs neither tch nor the LLM
//! engine: the engine implements `TextEncoder` for its own tokenizer wrapper, and tests and the
//! prompt-service can use a plain Hugging Face `tokenizers::Tokenizer`.

/// Per token, the byte range `(start, end)` of the text it came from.
pub type TokenOffsets = Vec<(usize, usize)>;

/// Text to token ids, never adding special tokens (no BOS/EOS): prompts are assembled from
/// pieces, and whoever runs the model decides about BOS.
pub trait TextEncoder {
    /// The token ids of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;

    /// The token ids of `text` and, for each token, the byte range `(start, end)` of `text` it
    /// came from. Byte-level tokenizers may give the same range to several tokens when they split
    /// one multi-byte character; the ranges must still be non-decreasing.
    fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, TokenOffsets), String>;
}

impl TextEncoder for tokenizers::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        // encode_fast skips offset tracking; the ids are the same as `encode`'s.
        self.encode_fast(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|err| err.to_string())
    }

    fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, TokenOffsets), String> {
        // The inherent `encode` (not this trait's) reports byte offsets into the original text
        // (OffsetType::Byte); deref reaches it past the trait method of the same name.
        let encoding = std::ops::Deref::deref(self)
            .encode(text, false)
            .map_err(|err| err.to_string())?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }
}
