//! A tiny tokenizer built in code, for tests here and in crates that use prompts: the real
//! model's tokenizer.json (3.5 MB) cannot live in the repository, and tests must not need files
//! CI lacks. It is the real tokenizer's kind (byte-level BPE behind SmolLM2's pre-tokenizer:
//! single digits, then GPT-2's byte-level split without a prefix space), trained on the text the
//! test will encode, so it merges words the way a real BPE does and decodes back exactly.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// The special token the tiny tokenizer reserves at id 0; tests use it as the slot token.
pub const PAD_TOKEN: &str = "<pad>";
pub const PAD_ID: u32 = 0;

/// A byte-level BPE with up to `vocab_size` tokens trained on `corpus`; `<pad>` is id 0.
/// Any text encodes (the 256 byte tokens are always there), so untrained words just split
/// into smaller pieces.
pub fn tiny_tokenizer<S: AsRef<str> + Send + Sync>(
    corpus: &[S],
    vocab_size: usize,
) -> Result<Tokenizer, String> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]))));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(PAD_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(&mut trainer, corpus.iter().map(|text| text.as_ref()))
        .map_err(|err| format!("training the tiny tokenizer: {err}"))?;
    match tokenizer.token_to_id(PAD_TOKEN) {
        Some(PAD_ID) => Ok(tokenizer),
        other => Err(format!("{PAD_TOKEN} got id {other:?}, expected {PAD_ID}")),
    }
}
