//! The one error type of rsllm-prompt. Every variant names the offending field and value, so a
//! service can hand the message to its caller as an INVALID_ARGUMENT / NOT_FOUND detail as is.

use rsllm_core::ItemId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("unknown domain {domain:?}; expected one of: {valid}")]
    UnknownDomain { domain: String, valid: String },

    /// A template file could not be read or is not the expected JSON.
    #[error("template file {source_name}: {problem}")]
    TemplateFile {
        source_name: String,
        problem: String,
    },

    /// One template of a file is malformed (placeholders missing, repeated or unknown).
    #[error("template file {source_name}, template {index}: {problem}")]
    Template {
        source_name: String,
        index: usize,
        problem: String,
    },

    #[error(
        "templates of domain {templates_domain:?} ({source_name}) cannot serve domain {domain:?}, \
         which needs {expected:?} templates"
    )]
    TemplateDomainMismatch {
        templates_domain: String,
        source_name: String,
        domain: String,
        expected: String,
    },

    #[error("catalog of dataset {catalog:?} passed to the prompt builder of domain {domain:?}")]
    CatalogMismatch { catalog: String, domain: String },

    #[error("option {field} = {value}: {problem}")]
    InvalidOption {
        field: &'static str,
        value: String,
        problem: String,
    },

    #[error("history is empty: at least one item is needed")]
    EmptyHistory,

    #[error("candidates is empty: at least one item is needed")]
    NoCandidates,

    #[error("candidates has {count} items, more than max_candidates = {max}")]
    TooManyCandidates { count: usize, max: usize },

    /// An id that is not an item of the catalog (the padding id included).
    #[error("{field}[{index}] = {item} is not an item of {dataset} (ids 0..{num_items})")]
    UnknownItem {
        field: &'static str,
        index: usize,
        item: ItemId,
        dataset: String,
        num_items: usize,
    },

    #[error("candidates[{second}] = {item} repeats candidates[{first}]")]
    DuplicateCandidate {
        item: ItemId,
        first: usize,
        second: usize,
    },

    #[error("target = {target} is not among the {count} candidates")]
    TargetNotInCandidates { target: ItemId, count: usize },

    #[error("template index {index} out of range: the domain has {count} templates")]
    TemplateIndexOutOfRange { index: usize, count: usize },

    /// The tokenizer failed, or its offsets do not cover the text it was given.
    #[error("tokenizer failed on {text:?}: {message}")]
    Encoder { text: String, message: String },
}

/// Shortened text for error messages: prompts are long, the first characters identify them.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(MAX_CHARS).collect();
    if chars.next().is_some() {
        format!("{head}...")
    } else {
        head
    }
}
