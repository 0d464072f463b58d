//! Assembles one prompt: template + history + candidates -> text, token ids, ID-slot positions,
//! candidate token spans, and the answer tokens.
//!
//! Tokenisation rules (why two):
//! - Text-only prompts are encoded as one whole string, exactly as a tokenizer would encode the
//!   text it reads, so a text-only model sees the same ids at training, at evaluation and in any
//!   other stack fed the same text (the PyTorch anchor). Candidate spans come from the token
//!   offsets: a candidate's span is every token that overlaps its title's bytes.
//! - Unified prompts cannot be encoded as one string: each ID slot must be exactly one token
//!   position holding `slot_token_id`, whatever the tokenizer would make of a marker text. They
//!   are encoded segment by segment (template literals, each title, each separator) and
//!   concatenated, with the slot ids spliced in after each title. Before encoding, the trailing
//!   whitespace of a segment moves to the front of the next text segment, so each word keeps its
//!   leading space as in whole-string encoding with byte-level BPE or SentencePiece ("watched" +
//!   " Toy Story", "," + " Titanic", not "watched " + "Toy Story"). What is left differs from
//!   whole-string encoding only where a tokenizer would merge across a segment boundary (a
//!   title's final punctuation with the following "," or "."). Measured with SmolLM2's tokenizer
//!   on LLaRA's 95 MovieLens test rows x 3 templates (`real_movielens_tokenisation_rules`): 234
//!   of 285 text-only prompts would differ if encoded segment-wise, mostly through titles ending
//!   in ")" ("Convent, The (Convento, O)," -> `"),"`), also `"!,"`, `".,"`, `"',"`, `")."`.
//!   That is why text-only prompts are whole strings. In unified mode the slot token stands
//!   between a title and its "," anyway, so no such merge can happen there, and its title spans
//!   are exactly the title's tokens; text-only candidate spans include such a merged punctuation
//!   token (375 of 5,700 spans).
//! - A slot is the title's tokens followed directly by the slot token: no space token between
//!   (LLaRA's slow Llama tokenizer also strips the space before its added `[HistoryEmb]` token).
//!   `BuiltPrompt::text` shows it as `" [ID]"` for humans only.
//!
//! The answer (METHOD.md: target title followed by "\n") is encoded on its own as
//! `" " + title + "\n"`: the prompt ends with "Answer:" or "The answer is" and no whitespace, and
//! the leading space is the word separator, as in LLaRA (its SentencePiece tokenizer adds the
//! space marker to the pair's second sequence) and in the PyTorch anchor (bench/llara_anchor.py
//! encodes `" " + title + "\n"` separately). Encoding prompt and answer as one string gives the
//! same ids on all 285 measured prompts. `input_ids ++ answer_ids` is the training sequence;
//! the same continuation scores a candidate in ranking evaluation (`PromptBuilder::continuation`).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rsllm_core::{Catalog, ItemId};
use serde::{Deserialize, Serialize};

use crate::encoder::TextEncoder;
use crate::error::{PromptError, excerpt};
use crate::templates::{Piece, Templates, template_domain};

/// How a slot is shown in `BuiltPrompt::text` (display only; the ids hold `slot_token_id`).
pub const SLOT_MARKER: &str = "[ID]";
/// How the user slot is shown in `BuiltPrompt::text` (display only, as `SLOT_MARKER`).
pub const USER_SLOT_MARKER: &str = "[USER]";

/// Text-only (stage 1: titles only) or unified Text-ID (stage 2: each title followed by one ID
/// slot). Note LLaRA's own text-only prompts keep a `[PH]` placeholder token after each title;
/// METHOD.md's text-only prompt has titles only, and so does this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptMode {
    TextOnly,
    Unified,
    /// ID slots without titles: the "without titles" ablation. The answer is still the
    /// title (it is what generation is judged on), so the model must name items it was shown
    /// only as ID vectors.
    IdOnly,
    /// Unified, plus one user slot right after the history (`... Titanic [ID] [USER] in the
    /// previous ...`) whose vector is the recommender's user state after the shown history:
    /// the vector the recommender itself scores items with. Our choice, beyond METHOD.md (the
    /// paper's "users' sequential behaviours as a language" read literally): with it the LLM
    /// need not rebuild the recommender's sequence model from the item slots.
    UnifiedWithUser,
    /// `UnifiedWithUser` with the user slot as the prompt's last token, right before the
    /// answer (`... Answer: [USER]`): the position that predicts the answer's first token
    /// then starts from the user state itself, one attention step from the candidates' ID
    /// slots. Our choice too (the `user-slot-last` variant).
    UnifiedWithUserLast,
}

impl PromptMode {
    /// Whether the prompt carries ID slots.
    pub fn has_slots(self) -> bool {
        self != PromptMode::TextOnly
    }
}

/// Which template of the domain to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateChoice {
    /// This index (evaluation uses 0 unless configured).
    Fixed(usize),
    /// Uniformly drawn from a ChaCha8 generator seeded with this value: the trainer passes a
    /// seed derived from (run seed, epoch, row), so a run's template draws are reproducible and
    /// do not depend on the order rows are built in.
    Seeded(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotRole {
    History,
    Candidate,
    /// The user slot of `PromptMode::UnifiedWithUser` and `UnifiedWithUserLast`; its `item` is
    /// the newest history item (bookkeeping only: its vector is the recommender's user state
    /// after `BuiltPrompt::history`, never an item vector).
    User,
}

/// One ID slot: `input_ids[position] == slot_token_id`; its embedding is to be replaced by the
/// projected ID embedding of `item` (for `SlotRole::User`: of the user state, see there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub position: usize,
    pub item: ItemId,
    pub role: SlotRole,
}

/// The token range `start..end` of an item's title in `input_ids` (the slot excluded). With
/// byte-level BPE the first token carries the space before the title (" Toy"); where a tokenizer
/// merges the title's last character with the following punctuation (text-only mode), that
/// token is included too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemSpan {
    pub item: ItemId,
    pub start: usize,
    pub end: usize,
}

/// The span of a candidate's title.
pub type CandidateSpan = ItemSpan;

/// Knobs of prompt assembly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptOptions {
    /// The placeholder token id put at each ID slot (e.g. the tokenizer's pad or unk id). Its
    /// own embedding is never used: consumers replace it at `BuiltPrompt::slots` positions. Do
    /// not find slots by scanning for this id: the text itself may contain it.
    pub slot_token_id: u32,
    /// Longer histories keep their last `max_history` items (the most recent ones), in order.
    pub max_history: usize,
    /// More candidates than this is an error (never truncated: the target must stay in).
    pub max_candidates: usize,
    /// Put a space before the answer title (see the module docs). Default true.
    pub answer_leading_space: bool,
}

impl PromptOptions {
    /// Defaults: history 10 (METHOD.md), at most 100 candidates, leading space in the answer.
    pub fn new(slot_token_id: u32) -> PromptOptions {
        PromptOptions {
            slot_token_id,
            max_history: 10,
            max_candidates: 100,
            answer_leading_space: true,
        }
    }
}

/// One assembled prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltPrompt {
    pub mode: PromptMode,
    /// The prompt text; in unified mode each slot shows as `" [ID]"` after its title.
    pub text: String,
    /// Prompt tokens, ending right before the answer. No BOS is added.
    pub input_ids: Vec<u32>,
    /// Modes with slots: one slot per history item (then, in `UnifiedWithUser` mode, the user
    /// slot), then one per candidate (then, in `UnifiedWithUserLast` mode, the user slot), in
    /// prompt order (history oldest first). Empty in text-only mode.
    pub slots: Vec<Slot>,
    /// Token spans of the history titles, in prompt order.
    pub history_spans: Vec<ItemSpan>,
    /// Token spans of the candidate titles, in prompt order.
    pub candidate_spans: Vec<CandidateSpan>,
    /// The history items shown (after keeping the last `max_history`), oldest first.
    pub history: Vec<ItemId>,
    /// The candidates in prompt order (as given).
    pub candidates: Vec<ItemId>,
    pub target: Option<ItemId>,
    /// Index of the target in `candidates`.
    pub target_index: Option<usize>,
    /// `" " + target title + "\n"` encoded (empty when the target is unknown).
    pub answer_ids: Vec<u32>,
    pub answer_text: String,
    pub template_index: usize,
    /// Each candidate's answer as [`PromptBuilder::continuation`] encodes it, in prompt
    /// order, once [`PromptBuilder::add_candidate_answers`] has filled it (a listwise
    /// ranking loss scores them all); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidate_answer_ids: Vec<Vec<u32>>,
}

/// Builds prompts of one domain.
#[derive(Debug, Clone)]
pub struct PromptBuilder {
    domain: String,
    templates: Templates,
    options: PromptOptions,
}

/// What a text segment of a prompt is, for tokenisation and bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SegmentKind {
    Literal,
    Title(ItemId, SlotRole),
    Slot(ItemId, SlotRole),
}

#[derive(Debug, Clone)]
struct Segment {
    kind: SegmentKind,
    /// Empty for slots.
    text: String,
}

impl PromptBuilder {
    /// `domain` is a dataset name (`movielens`, `lastfm`, `steam`, `steam-valtrain`); the
    /// templates must be of its template domain.
    pub fn new(
        domain: &str,
        templates: Templates,
        options: PromptOptions,
    ) -> Result<PromptBuilder, PromptError> {
        let expected = template_domain(domain)?;
        if templates.domain() != expected {
            return Err(PromptError::TemplateDomainMismatch {
                templates_domain: templates.domain().to_owned(),
                source_name: templates.source_name().to_owned(),
                domain: domain.to_owned(),
                expected: expected.to_owned(),
            });
        }
        if options.max_history == 0 {
            return Err(PromptError::InvalidOption {
                field: "max_history",
                value: "0".to_owned(),
                problem: "must be at least 1".to_owned(),
            });
        }
        if options.max_candidates == 0 {
            return Err(PromptError::InvalidOption {
                field: "max_candidates",
                value: "0".to_owned(),
                problem: "must be at least 1".to_owned(),
            });
        }
        Ok(PromptBuilder {
            domain: domain.trim().to_owned(),
            templates,
            options,
        })
    }

    /// `new` with the built-in LLaRA templates of the domain.
    pub fn with_builtin_templates(
        domain: &str,
        options: PromptOptions,
    ) -> Result<PromptBuilder, PromptError> {
        PromptBuilder::new(domain, Templates::builtin(domain)?, options)
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    pub fn options(&self) -> &PromptOptions {
        &self.options
    }

    /// The template index a choice resolves to.
    pub fn template_index(&self, choice: TemplateChoice) -> Result<usize, PromptError> {
        let count = self.templates.len();
        match choice {
            TemplateChoice::Fixed(index) if index < count => Ok(index),
            TemplateChoice::Fixed(index) => {
                Err(PromptError::TemplateIndexOutOfRange { index, count })
            }
            TemplateChoice::Seeded(seed) => {
                Ok(ChaCha8Rng::seed_from_u64(seed).random_range(0..count))
            }
        }
    }

    /// The answer continuation of `item`: its text (`" " + title + "\n"` by default) and ids,
    /// encoded on their own. Training appends the target's; ranking scores each candidate's.
    pub fn continuation(
        &self,
        encoder: &dyn TextEncoder,
        catalog: &Catalog,
        item: ItemId,
    ) -> Result<(String, Vec<u32>), PromptError> {
        let title = title_of(catalog, "item", 0, item)?;
        let space = if self.options.answer_leading_space {
            " "
        } else {
            ""
        };
        let text = format!("{space}{title}\n");
        let ids = encode(encoder, &text)?;
        Ok((text, ids))
    }

    /// Fills `prompt.candidate_answer_ids`: each candidate's continuation, in prompt order
    /// (the target's is `prompt.answer_ids`).
    pub fn add_candidate_answers(
        &self,
        encoder: &dyn TextEncoder,
        catalog: &Catalog,
        prompt: &mut BuiltPrompt,
    ) -> Result<(), PromptError> {
        prompt.candidate_answer_ids = prompt
            .candidates
            .iter()
            .map(|&item| Ok(self.continuation(encoder, catalog, item)?.1))
            .collect::<Result<_, PromptError>>()?;
        Ok(())
    }

    /// Assembles one prompt. `history` is oldest first (as `SeqExample::history`); candidates
    /// appear in the order given; `target`, when known, must be one of them.
    // Each argument is a distinct input of the prompt; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &self,
        encoder: &dyn TextEncoder,
        catalog: &Catalog,
        history: &[ItemId],
        candidates: &[ItemId],
        target: Option<ItemId>,
        mode: PromptMode,
        template: TemplateChoice,
    ) -> Result<BuiltPrompt, PromptError> {
        self.check_catalog(catalog)?;
        if history.is_empty() {
            return Err(PromptError::EmptyHistory);
        }
        if candidates.is_empty() {
            return Err(PromptError::NoCandidates);
        }
        if candidates.len() > self.options.max_candidates {
            return Err(PromptError::TooManyCandidates {
                count: candidates.len(),
                max: self.options.max_candidates,
            });
        }
        for (index, &item) in history.iter().enumerate() {
            title_of(catalog, "history", index, item)?;
        }
        let mut first_seen: HashMap<ItemId, usize> = HashMap::with_capacity(candidates.len());
        for (index, &item) in candidates.iter().enumerate() {
            title_of(catalog, "candidates", index, item)?;
            if let Some(&first) = first_seen.get(&item) {
                return Err(PromptError::DuplicateCandidate {
                    item,
                    first,
                    second: index,
                });
            }
            first_seen.insert(item, index);
        }
        let target_index = match target {
            None => None,
            Some(item) => {
                title_of(catalog, "target", 0, item)?;
                let index = first_seen.get(&item).copied();
                Some(index.ok_or(PromptError::TargetNotInCandidates {
                    target: item,
                    count: candidates.len(),
                })?)
            }
        };
        let template_index = self.template_index(template)?;
        // Histories are oldest first: keep the most recent items.
        let history = &history[history.len().saturating_sub(self.options.max_history)..];

        let segments = self.segments(catalog, template_index, history, candidates, mode)?;
        let text = display_text(&segments);
        let encoded = match mode {
            PromptMode::TextOnly => encode_whole(encoder, &segments, &text)?,
            PromptMode::Unified
            | PromptMode::IdOnly
            | PromptMode::UnifiedWithUser
            | PromptMode::UnifiedWithUserLast => {
                encode_segmentwise(encoder, &segments, self.options.slot_token_id)?
            }
        };
        let (answer_text, answer_ids) = match target {
            Some(item) => self.continuation(encoder, catalog, item)?,
            None => (String::new(), Vec::new()),
        };
        Ok(BuiltPrompt {
            mode,
            text,
            input_ids: encoded.ids,
            slots: encoded.slots,
            history_spans: encoded.history_spans,
            candidate_spans: encoded.candidate_spans,
            history: history.to_vec(),
            candidates: candidates.to_vec(),
            target,
            target_index,
            answer_ids,
            answer_text,
            template_index,
            candidate_answer_ids: Vec::new(),
        })
    }

    /// A catalog of another template domain would give the wrong titles for every id.
    fn check_catalog(&self, catalog: &Catalog) -> Result<(), PromptError> {
        let same = template_domain(&catalog.dataset)
            .map(|domain| Ok(domain) == template_domain(&self.domain))
            .unwrap_or(false);
        if same {
            Ok(())
        } else {
            Err(PromptError::CatalogMismatch {
                catalog: catalog.dataset.clone(),
                domain: self.domain.clone(),
            })
        }
    }

    /// The prompt as segments in reading order; slots only in unified mode.
    fn segments(
        &self,
        catalog: &Catalog,
        template_index: usize,
        history: &[ItemId],
        candidates: &[ItemId],
        mode: PromptMode,
    ) -> Result<Vec<Segment>, PromptError> {
        let template =
            self.templates
                .get(template_index)
                .ok_or(PromptError::TemplateIndexOutOfRange {
                    index: template_index,
                    count: self.templates.len(),
                })?;
        let separator = self.templates.item_separator();
        let mut segments = Vec::with_capacity(4 * (history.len() + candidates.len()) + 8);
        // Literal text and the candidate count are gathered into one literal segment.
        let mut literal = String::new();
        for piece in &template.pieces {
            let (items, role, field) = match piece {
                Piece::Literal(text) => {
                    literal.push_str(text);
                    continue;
                }
                Piece::NumCandidates => {
                    literal.push_str(&candidates.len().to_string());
                    continue;
                }
                Piece::History => (history, SlotRole::History, "history"),
                Piece::Candidates => (candidates, SlotRole::Candidate, "candidates"),
            };
            for (index, &item) in items.iter().enumerate() {
                if index > 0 {
                    literal.push_str(separator);
                }
                if !literal.is_empty() {
                    segments.push(Segment {
                        kind: SegmentKind::Literal,
                        text: std::mem::take(&mut literal),
                    });
                }
                let title = title_of(catalog, field, index, item)?;
                if mode != PromptMode::IdOnly {
                    segments.push(Segment {
                        kind: SegmentKind::Title(item, role),
                        text: title.to_owned(),
                    });
                }
                if mode.has_slots() {
                    segments.push(Segment {
                        kind: SegmentKind::Slot(item, role),
                        text: String::new(),
                    });
                }
            }
            if let (PromptMode::UnifiedWithUser, SlotRole::History, Some(&newest)) =
                (mode, role, items.last())
            {
                segments.push(Segment {
                    kind: SegmentKind::Slot(newest, SlotRole::User),
                    text: String::new(),
                });
            }
        }
        if !literal.is_empty() {
            segments.push(Segment {
                kind: SegmentKind::Literal,
                text: literal,
            });
        }
        if let (PromptMode::UnifiedWithUserLast, Some(&newest)) = (mode, history.last()) {
            segments.push(Segment {
                kind: SegmentKind::Slot(newest, SlotRole::User),
                text: String::new(),
            });
        }
        Ok(segments)
    }
}

fn title_of<'c>(
    catalog: &'c Catalog,
    field: &'static str,
    index: usize,
    item: ItemId,
) -> Result<&'c str, PromptError> {
    catalog.title(item).ok_or_else(|| PromptError::UnknownItem {
        field,
        index,
        item,
        dataset: catalog.dataset.clone(),
        num_items: catalog.num_items(),
    })
}

fn encode(encoder: &dyn TextEncoder, text: &str) -> Result<Vec<u32>, PromptError> {
    encoder
        .encode(text)
        .map_err(|message| PromptError::Encoder {
            text: excerpt(text),
            message,
        })
}

/// The human-readable prompt: segments concatenated, a slot shown as `" [ID]"`.
fn display_text(segments: &[Segment]) -> String {
    let mut text = String::new();
    for segment in segments {
        match segment.kind {
            SegmentKind::Slot(_, SlotRole::User) => {
                text.push(' ');
                text.push_str(USER_SLOT_MARKER);
            }
            SegmentKind::Slot(..) => {
                text.push(' ');
                text.push_str(SLOT_MARKER);
            }
            SegmentKind::Literal | SegmentKind::Title(..) => text.push_str(&segment.text),
        }
    }
    text
}

/// The token side of a prompt, before the answer is added.
#[derive(Debug, Default)]
struct Encoded {
    ids: Vec<u32>,
    slots: Vec<Slot>,
    history_spans: Vec<ItemSpan>,
    candidate_spans: Vec<ItemSpan>,
}

impl Encoded {
    fn push_span(&mut self, role: SlotRole, span: ItemSpan) {
        match role {
            SlotRole::History => self.history_spans.push(span),
            SlotRole::Candidate => self.candidate_spans.push(span),
            // A user slot has no title, so no span.
            SlotRole::User => {}
        }
    }
}

/// Text-only mode: the whole text encoded at once; title spans from the token offsets.
fn encode_whole(
    encoder: &dyn TextEncoder,
    segments: &[Segment],
    text: &str,
) -> Result<Encoded, PromptError> {
    let (ids, offsets) =
        encoder
            .encode_with_offsets(text)
            .map_err(|message| PromptError::Encoder {
                text: excerpt(text),
                message,
            })?;
    if offsets.len() != ids.len() || offsets.iter().any(|&(_, end)| end > text.len()) {
        return Err(PromptError::Encoder {
            text: excerpt(text),
            message: format!(
                "{} offsets for {} tokens, or an offset past the text's {} bytes",
                offsets.len(),
                ids.len(),
                text.len()
            ),
        });
    }
    let mut encoded = Encoded::default();
    let mut byte = 0;
    for segment in segments {
        let start = byte;
        byte += segment.text.len();
        if let SegmentKind::Title(item, role) = segment.kind {
            encoded.push_span(role, overlapping_tokens(&offsets, item, start, byte));
        }
    }
    encoded.ids = ids;
    Ok(encoded)
}

/// The tokens whose byte ranges overlap `start..end`. An empty title (no overlap) gets an empty
/// span where the next token starts.
fn overlapping_tokens(
    offsets: &[(usize, usize)],
    item: ItemId,
    start: usize,
    end: usize,
) -> ItemSpan {
    let overlaps = |&(from, to): &(usize, usize)| from < end && to > start;
    match (
        offsets.iter().position(overlaps),
        offsets.iter().rposition(overlaps),
    ) {
        (Some(first), Some(last)) => ItemSpan {
            item,
            start: first,
            end: last + 1,
        },
        _ => {
            let at = offsets
                .iter()
                .position(|&(from, _)| from >= end)
                .unwrap_or(offsets.len());
            ItemSpan {
                item,
                start: at,
                end: at,
            }
        }
    }
}

/// Unified mode: segments encoded one by one (trailing whitespace moved to the next text
/// segment first, see the module docs), slot ids spliced in.
fn encode_segmentwise(
    encoder: &dyn TextEncoder,
    segments: &[Segment],
    slot_token_id: u32,
) -> Result<Encoded, PromptError> {
    let segments = move_trailing_whitespace(segments);
    let mut out = Encoded::default();
    // Literals repeat (every separator is the same text): encode each distinct one once.
    let mut literal_ids: HashMap<&str, Vec<u32>> = HashMap::new();
    for segment in &segments {
        match segment.kind {
            SegmentKind::Slot(item, role) => {
                out.slots.push(Slot {
                    position: out.ids.len(),
                    item,
                    role,
                });
                out.ids.push(slot_token_id);
            }
            SegmentKind::Title(item, role) => {
                let start = out.ids.len();
                out.ids.extend(encode(encoder, &segment.text)?);
                let end = out.ids.len();
                out.push_span(role, ItemSpan { item, start, end });
            }
            SegmentKind::Literal => {
                if segment.text.is_empty() {
                    continue;
                }
                if let Some(cached) = literal_ids.get(segment.text.as_str()) {
                    out.ids.extend_from_slice(cached);
                } else {
                    let encoded = encode(encoder, &segment.text)?;
                    out.ids.extend_from_slice(&encoded);
                    literal_ids.insert(&segment.text, encoded);
                }
            }
        }
    }
    Ok(out)
}

/// Moves each text segment's trailing whitespace to the front of the following text segment
/// (not across a slot), so words keep their leading space. The concatenated text is unchanged.
fn move_trailing_whitespace(segments: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    let mut carry = String::new();
    for (index, segment) in segments.iter().enumerate() {
        let mut segment = segment.clone();
        if matches!(segment.kind, SegmentKind::Slot(..)) {
            out.push(segment);
            continue;
        }
        if !carry.is_empty() {
            segment.text.insert_str(0, &std::mem::take(&mut carry));
        }
        let next_is_text = segments
            .get(index + 1)
            .is_some_and(|next| !matches!(next.kind, SegmentKind::Slot(..)));
        if next_is_text {
            let kept = segment.text.trim_end().len();
            carry = segment.text.split_off(kept);
        }
        out.push(segment);
    }
    out
}

#[cfg(test)]
mod tests;
