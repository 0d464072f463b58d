//! rsllm-prompt: prompt assembly for RSLLM (METHOD.md, "Item representations and prompts").
//!
//! Given a domain's templates (LLaRA's three per domain, kept as data in `templates/*.json`), a
//! catalog of titles, a history and a candidate set, `PromptBuilder::build` gives the prompt
//! text, its token ids, the positions of the ID slots (unified Text-ID mode: one slot token
//! after each title, whose embedding the LLM side replaces with the projected ID embedding),
//! the token span of each title, and the answer tokens (target title and "\n").
//!
//! No tch here: the model's tokenizer ([`LlmTokenizer`], from tokenizer.json or GGUF metadata)
//! lives here too, and prompt assembly reaches any tokenizer through the `TextEncoder` trait,
//! so the prompt-service shares this code with the trainer without linking libtorch.

pub mod builder;
pub mod encoder;
pub mod error;
pub mod templates;
pub mod testing;
pub mod tokenizer;

pub use builder::{
    BuiltPrompt, CandidateSpan, ItemSpan, PromptBuilder, PromptMode, PromptOptions, SLOT_MARKER,
    Slot, SlotRole, TemplateChoice,
};
pub use encoder::{TextEncoder, TokenOffsets};
pub use error::PromptError;
pub use templates::{Template, Templates, template_domain};
pub use tokenizer::{LlmTokenizer, TokenizerError};
