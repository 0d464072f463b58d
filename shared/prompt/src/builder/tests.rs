use std::path::{Path, PathBuf};
use std::time::Instant;

use rsllm_core::{DatasetName, PrepareOptions, Protocol};
use tokenizers::Tokenizer;

use super::*;
use crate::encoder::TokenOffsets;
use crate::testing::{PAD_ID, tiny_tokenizer};

/// Titles chosen for their edges: a comma inside a title, non-ASCII, digits, a title ending in
/// punctuation, an apostrophe.
const TITLES: [&str; 14] = [
    "Toy Story",
    "Titanic",
    "The Wizard of Oz",
    "Misérables, Les",
    "That Darn Cat!",
    "Se7en",
    "12 Angry Men",
    "Monty Python's Life of Brian",
    "Star Wars",
    "Heat",
    "Roman Holiday",
    "Fargo",
    "Casablanca",
    "Alien",
];

fn catalog(dataset: &str) -> Catalog {
    Catalog {
        dataset: dataset.to_owned(),
        titles: TITLES.iter().map(|t| (*t).to_owned()).collect(),
    }
}

/// Trained on the templates and the titles, each on its own: nothing teaches it to merge
/// across a title's edge, so whole-string and segment-wise encodings agree.
fn tokenizer() -> Tokenizer {
    let mut corpus: Vec<String> = Vec::new();
    for dataset in ["movielens", "steam", "lastfm"] {
        for template in Templates::builtin(dataset).unwrap().iter() {
            corpus.push(template.text().to_owned());
        }
    }
    for _ in 0..3 {
        corpus.extend(TITLES.iter().map(|t| format!(" {t}")));
    }
    tiny_tokenizer(&corpus, 400).unwrap()
}

fn builder(dataset: &str) -> PromptBuilder {
    PromptBuilder::with_builtin_templates(dataset, PromptOptions::new(PAD_ID)).unwrap()
}

const HISTORY: [ItemId; 5] = [0, 3, 4, 6, 7];
const CANDIDATES: [ItemId; 6] = [1, 5, 8, 2, 9, 10];

/// `(dataset, template index, prompt)` for every built-in template of every domain in `mode`.
fn every_template(mode: PromptMode) -> Vec<(&'static str, usize, BuiltPrompt)> {
    let mut built = Vec::new();
    for dataset in ["movielens", "steam", "lastfm"] {
        let b = builder(dataset);
        for template in 0..b.templates().len() {
            let p = b
                .build(
                    &tokenizer(),
                    &catalog(dataset),
                    &HISTORY,
                    &CANDIDATES,
                    Some(8),
                    mode,
                    TemplateChoice::Fixed(template),
                )
                .unwrap();
            built.push((dataset, template, p));
        }
    }
    built
}

fn build(mode: PromptMode, template: usize) -> BuiltPrompt {
    builder("movielens")
        .build(
            &tokenizer(),
            &catalog("movielens"),
            &HISTORY,
            &CANDIDATES,
            Some(8),
            mode,
            TemplateChoice::Fixed(template),
        )
        .unwrap()
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    tokenizer.decode(ids, false).unwrap()
}

#[test]
fn text_only_prompt_reads_as_llara_template_one() {
    let prompt = build(PromptMode::TextOnly, 0);
    assert_eq!(
        prompt.text,
        "This user has watched Toy Story, Misérables, Les, That Darn Cat!, 12 Angry Men, \
         Monty Python's Life of Brian in the previous. Please predict the next movie this user \
         will watch. Choose the answer from the following 6 movie titles: Titanic, Se7en, \
         Star Wars, The Wizard of Oz, Heat, Roman Holiday. Answer:"
    );
    assert!(prompt.slots.is_empty());
    assert_eq!(prompt.answer_text, " Star Wars\n");
    assert_eq!(prompt.target_index, Some(2));
    assert_eq!(prompt.template_index, 0);
    assert_eq!(prompt.history, HISTORY);
    assert_eq!(prompt.candidates, CANDIDATES);
}

#[test]
fn text_only_ids_are_the_whole_string_encoding() {
    let tokenizer = tokenizer();
    for template in 0..3 {
        let prompt = build(PromptMode::TextOnly, template);
        assert_eq!(
            prompt.input_ids,
            TextEncoder::encode(&tokenizer, &prompt.text).unwrap()
        );
        assert_eq!(decode(&tokenizer, &prompt.input_ids), prompt.text);
    }
}

#[test]
fn unified_prompt_has_one_slot_after_each_title() {
    let tokenizer = tokenizer();
    for template in 0..3 {
        let prompt = build(PromptMode::Unified, template);
        assert!(
            prompt
                .text
                .contains("Toy Story [ID], Misérables, Les [ID], That Darn Cat! [ID],"),
            "{}",
            prompt.text
        );
        // One slot per item: history (oldest first) then candidates, as the templates read.
        let expected: Vec<(ItemId, SlotRole)> = HISTORY
            .iter()
            .map(|&i| (i, SlotRole::History))
            .chain(CANDIDATES.iter().map(|&i| (i, SlotRole::Candidate)))
            .collect();
        let got: Vec<(ItemId, SlotRole)> = prompt.slots.iter().map(|s| (s.item, s.role)).collect();
        assert_eq!(got, expected);
        for slot in &prompt.slots {
            assert_eq!(prompt.input_ids[slot.position], PAD_ID);
        }
        // Each slot sits right after its title's tokens.
        let spans: Vec<&ItemSpan> = prompt
            .history_spans
            .iter()
            .chain(&prompt.candidate_spans)
            .collect();
        for (slot, span) in prompt.slots.iter().zip(spans) {
            assert_eq!((slot.item, slot.position), (span.item, span.end));
        }
        // The slot positions are the only pad ids: the tiny tokenizer never makes one from text.
        let pads = prompt.input_ids.iter().filter(|&&id| id == PAD_ID).count();
        assert_eq!(pads, prompt.slots.len());
        assert_eq!(prompt.text.matches(SLOT_MARKER).count(), prompt.slots.len());
        // Without its slots, the unified prompt is the text-only prompt, token for token.
        let text_only = build(PromptMode::TextOnly, template);
        let without_slots: Vec<u32> = prompt
            .input_ids
            .iter()
            .enumerate()
            .filter(|(position, _)| !prompt.slots.iter().any(|s| s.position == *position))
            .map(|(_, &id)| id)
            .collect();
        assert_eq!(without_slots, text_only.input_ids, "template {template}");
        assert_eq!(prompt.text.replace(" [ID]", ""), text_only.text);
        assert_eq!(decode(&tokenizer, &without_slots), text_only.text);
    }
}

#[test]
fn every_span_decodes_to_its_title_in_both_modes() {
    let tokenizer = tokenizer();
    let catalog = catalog("movielens");
    for mode in [PromptMode::TextOnly, PromptMode::Unified] {
        for template in 0..3 {
            let prompt = build(mode, template);
            let spans =
                |spans: &[ItemSpan]| -> Vec<ItemId> { spans.iter().map(|s| s.item).collect() };
            assert_eq!(spans(&prompt.candidate_spans), CANDIDATES);
            assert_eq!(spans(&prompt.history_spans), HISTORY);
            for span in prompt.history_spans.iter().chain(&prompt.candidate_spans) {
                let text = decode(&tokenizer, &prompt.input_ids[span.start..span.end]);
                assert_eq!(
                    text.trim_start(),
                    catalog.title(span.item).unwrap(),
                    "{mode:?} template {template}"
                );
            }
        }
    }
}

#[test]
fn the_candidate_count_is_the_real_one() {
    for mode in [PromptMode::TextOnly, PromptMode::Unified] {
        assert!(
            build(mode, 0)
                .text
                .contains("from the following 6 movie titles:")
        );
        assert!(
            build(mode, 1)
                .text
                .contains("Given the following 6 movie titles:")
        );
        assert!(!build(mode, 2).text.contains('6'));
    }
    let prompt = builder("steam")
        .build(
            &tokenizer(),
            &catalog("steam"),
            &HISTORY,
            &CANDIDATES[..4],
            None,
            PromptMode::TextOnly,
            TemplateChoice::Fixed(1),
        )
        .unwrap();
    assert!(
        prompt
            .text
            .contains("Given the following 4 game titles, Titanic,")
    );
}

#[test]
fn the_answer_is_space_title_newline_encoded_alone() {
    let tokenizer = tokenizer();
    let prompt = build(PromptMode::Unified, 0);
    assert!(prompt.text.ends_with("Answer:"));
    assert_eq!(prompt.answer_text, " Star Wars\n");
    assert_eq!(
        prompt.answer_ids,
        TextEncoder::encode(&tokenizer, " Star Wars\n").unwrap()
    );
    assert_eq!(decode(&tokenizer, &prompt.answer_ids), " Star Wars\n");

    let b = builder("movielens");
    let (text, ids) = b
        .continuation(&tokenizer, &catalog("movielens"), 4)
        .unwrap();
    assert_eq!(text, " That Darn Cat!\n");
    assert_eq!(decode(&tokenizer, &ids), text);

    let mut options = PromptOptions::new(PAD_ID);
    options.answer_leading_space = false;
    let b = PromptBuilder::with_builtin_templates("movielens", options).unwrap();
    let (text, _) = b
        .continuation(&tokenizer, &catalog("movielens"), 4)
        .unwrap();
    assert_eq!(text, "That Darn Cat!\n");
}

#[test]
fn candidate_answers_are_each_candidates_continuation_in_prompt_order() {
    let tokenizer = tokenizer();
    let mut prompt = build(PromptMode::Unified, 0);
    assert!(
        prompt.candidate_answer_ids.is_empty(),
        "only when asked for"
    );
    let b = builder("movielens");
    b.add_candidate_answers(&tokenizer, &catalog("movielens"), &mut prompt)
        .unwrap();
    assert_eq!(prompt.candidate_answer_ids.len(), CANDIDATES.len());
    for (&item, ids) in CANDIDATES.iter().zip(&prompt.candidate_answer_ids) {
        let (_, expected) = b
            .continuation(&tokenizer, &catalog("movielens"), item)
            .unwrap();
        assert_eq!(ids, &expected);
    }
    let target = prompt.target_index.unwrap();
    assert_eq!(prompt.candidate_answer_ids[target], prompt.answer_ids);
}

#[test]
fn an_unknown_target_gives_no_answer() {
    let prompt = builder("movielens")
        .build(
            &tokenizer(),
            &catalog("movielens"),
            &HISTORY,
            &CANDIDATES,
            None,
            PromptMode::Unified,
            TemplateChoice::Fixed(0),
        )
        .unwrap();
    assert!(prompt.answer_ids.is_empty() && prompt.answer_text.is_empty());
    assert_eq!((prompt.target, prompt.target_index), (None, None));
}

#[test]
fn long_histories_keep_their_last_items() {
    let history: Vec<ItemId> = (0..14).collect();
    let mut options = PromptOptions::new(PAD_ID);
    options.max_history = 10;
    let prompt = PromptBuilder::with_builtin_templates("movielens", options)
        .unwrap()
        .build(
            &tokenizer(),
            &catalog("movielens"),
            &history,
            &[0, 1],
            Some(1),
            PromptMode::Unified,
            TemplateChoice::Fixed(0),
        )
        .unwrap();
    assert_eq!(prompt.history, (4..14).collect::<Vec<_>>());
    let history_slots: Vec<ItemId> = prompt
        .slots
        .iter()
        .filter(|s| s.role == SlotRole::History)
        .map(|s| s.item)
        .collect();
    assert_eq!(history_slots, prompt.history);
    assert!(
        prompt
            .text
            .starts_with("This user has watched That Darn Cat! [ID], Se7en [ID],")
    );
}

#[test]
fn template_choice_fixed_and_seeded() {
    let b = builder("lastfm");
    assert_eq!(b.template_index(TemplateChoice::Fixed(2)).unwrap(), 2);
    assert_eq!(
        b.template_index(TemplateChoice::Fixed(3)).unwrap_err(),
        PromptError::TemplateIndexOutOfRange { index: 3, count: 3 }
    );
    let draws: Vec<usize> = (0..60)
        .map(|seed| b.template_index(TemplateChoice::Seeded(seed)).unwrap())
        .collect();
    let again: Vec<usize> = (0..60)
        .map(|seed| b.template_index(TemplateChoice::Seeded(seed)).unwrap())
        .collect();
    assert_eq!(draws, again);
    for index in 0..3 {
        let count = draws.iter().filter(|&&d| d == index).count();
        assert!(count >= 10, "template {index} drawn {count} times of 60");
    }
}

#[test]
fn every_domain_and_template_builds() {
    let tokenizer = tokenizer();
    for dataset in ["movielens", "lastfm", "steam", "steam-valtrain"] {
        let b = builder(dataset);
        for template in 0..3 {
            for mode in [PromptMode::TextOnly, PromptMode::Unified] {
                let prompt = b
                    .build(
                        &tokenizer,
                        &catalog(dataset),
                        &HISTORY,
                        &CANDIDATES,
                        Some(1),
                        mode,
                        TemplateChoice::Fixed(template),
                    )
                    .unwrap();
                assert!(!prompt.text.contains('{'), "{}", prompt.text);
                assert!(!prompt.text.ends_with(char::is_whitespace));
                assert_eq!(prompt.candidate_spans.len(), CANDIDATES.len());
            }
        }
    }
}

#[test]
fn bad_input_is_named() {
    let tokenizer = tokenizer();
    let catalog = catalog("movielens");
    let b = builder("movielens");
    let run = |history: &[ItemId], candidates: &[ItemId], target: Option<ItemId>| {
        b.build(
            &tokenizer,
            &catalog,
            history,
            candidates,
            target,
            PromptMode::Unified,
            TemplateChoice::Fixed(0),
        )
        .unwrap_err()
    };
    assert_eq!(run(&[], &[1], Some(1)), PromptError::EmptyHistory);
    assert_eq!(run(&[0], &[], None), PromptError::NoCandidates);
    let padding = catalog.padding_id();
    let err = run(&[0, padding], &[1], Some(1));
    assert_eq!(
        err,
        PromptError::UnknownItem {
            field: "history",
            index: 1,
            item: 14,
            dataset: "movielens".into(),
            num_items: 14
        }
    );
    assert_eq!(
        err.to_string(),
        "history[1] = 14 is not an item of movielens (ids 0..14)"
    );
    assert!(matches!(
        run(&[0], &[1, 99], Some(1)),
        PromptError::UnknownItem {
            field: "candidates",
            index: 1,
            item: 99,
            ..
        }
    ));
    assert!(matches!(
        run(&[0], &[1], Some(99)),
        PromptError::UnknownItem {
            field: "target",
            item: 99,
            ..
        }
    ));
    assert_eq!(
        run(&[0], &[1, 2, 1], Some(1)),
        PromptError::DuplicateCandidate {
            item: 1,
            first: 0,
            second: 2
        }
    );
    let err = run(&[0], &[1, 2], Some(3));
    assert_eq!(
        err,
        PromptError::TargetNotInCandidates {
            target: 3,
            count: 2
        }
    );
    assert_eq!(err.to_string(), "target = 3 is not among the 2 candidates");

    let mut options = PromptOptions::new(PAD_ID);
    options.max_candidates = 2;
    let small = PromptBuilder::with_builtin_templates("movielens", options).unwrap();
    let err = small
        .build(
            &tokenizer,
            &catalog,
            &[0],
            &[1, 2, 3],
            None,
            PromptMode::TextOnly,
            TemplateChoice::Fixed(0),
        )
        .unwrap_err();
    assert_eq!(err, PromptError::TooManyCandidates { count: 3, max: 2 });

    let err = b
        .build(
            &tokenizer,
            &catalog,
            &[0],
            &[1],
            None,
            PromptMode::TextOnly,
            TemplateChoice::Fixed(7),
        )
        .unwrap_err();
    assert_eq!(
        err,
        PromptError::TemplateIndexOutOfRange { index: 7, count: 3 }
    );
}

#[test]
fn mismatched_domains_catalogs_and_options_are_refused() {
    let err = PromptBuilder::with_builtin_templates("books", PromptOptions::new(0)).unwrap_err();
    assert!(matches!(err, PromptError::UnknownDomain { .. }), "{err:?}");
    assert!(err.to_string().contains("\"books\""));

    let err = PromptBuilder::new(
        "lastfm",
        Templates::builtin("movielens").unwrap(),
        PromptOptions::new(0),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("\"movielens\"") && err.contains("\"lastfm\""),
        "{err}"
    );

    // steam-valtrain shares steam's catalog and templates; lastfm's catalog is refused.
    let b = builder("steam-valtrain");
    let tokenizer = tokenizer();
    let ok = b.build(
        &tokenizer,
        &catalog("steam"),
        &[0],
        &[1],
        None,
        PromptMode::TextOnly,
        TemplateChoice::Fixed(0),
    );
    assert!(ok.is_ok());
    let err = b
        .build(
            &tokenizer,
            &catalog("lastfm"),
            &[0],
            &[1],
            None,
            PromptMode::TextOnly,
            TemplateChoice::Fixed(0),
        )
        .unwrap_err();
    assert_eq!(
        err,
        PromptError::CatalogMismatch {
            catalog: "lastfm".into(),
            domain: "steam-valtrain".into()
        }
    );

    for field in ["max_history", "max_candidates"] {
        let mut options = PromptOptions::new(0);
        match field {
            "max_history" => options.max_history = 0,
            _ => options.max_candidates = 0,
        }
        let err = PromptBuilder::with_builtin_templates("movielens", options).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("option {field} = 0")),
            "{err}"
        );
    }
}

#[test]
fn trailing_whitespace_moves_to_the_next_text_segment() {
    let seg = |kind, text: &str| Segment {
        kind,
        text: text.to_owned(),
    };
    let segments = vec![
        seg(SegmentKind::Literal, "watched "),
        seg(SegmentKind::Title(0, SlotRole::History), "Toy Story"),
        seg(SegmentKind::Slot(0, SlotRole::History), ""),
        seg(SegmentKind::Literal, ", "),
        seg(SegmentKind::Title(1, SlotRole::History), "Heat "),
        seg(SegmentKind::Slot(1, SlotRole::History), ""),
        seg(SegmentKind::Literal, " in  "),
        seg(SegmentKind::Title(2, SlotRole::Candidate), "Fargo"),
        seg(SegmentKind::Literal, ". Answer: "),
    ];
    let moved: Vec<String> = move_trailing_whitespace(&segments)
        .into_iter()
        .map(|s| s.text)
        .collect();
    assert_eq!(
        moved,
        [
            "watched",
            " Toy Story",
            "",
            ",",
            " Heat ",
            "",
            " in",
            "  Fargo",
            ". Answer: "
        ]
    );
}

#[test]
fn overlap_spans_cover_partial_tokens() {
    // "ab cd," tokenised as "ab", " cd,": title "cd" at bytes 3..5.
    let offsets = [(0, 2), (2, 6)];
    assert_eq!(
        overlapping_tokens(&offsets, 7, 3, 5),
        ItemSpan {
            item: 7,
            start: 1,
            end: 2
        }
    );
    // An empty title gets an empty span at the next token.
    assert_eq!(
        overlapping_tokens(&offsets, 7, 2, 2),
        ItemSpan {
            item: 7,
            start: 1,
            end: 1
        }
    );
}

/// A tokenizer whose offsets do not fit the text is an error, not a panic.
#[test]
fn bad_offsets_are_an_error() {
    struct Broken;
    impl TextEncoder for Broken {
        fn encode(&self, _: &str) -> Result<Vec<u32>, String> {
            Err("boom".into())
        }
        fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, TokenOffsets), String> {
            Ok((vec![1], vec![(0, text.len() + 5)]))
        }
    }
    let b = builder("movielens");
    let catalog = catalog("movielens");
    for mode in [PromptMode::TextOnly, PromptMode::Unified] {
        let err = b
            .build(
                &Broken,
                &catalog,
                &[0],
                &[1],
                None,
                mode,
                TemplateChoice::Fixed(0),
            )
            .unwrap_err();
        assert!(matches!(err, PromptError::Encoder { .. }), "{err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The real MovieLens test rows with the real SmolLM2 tokenizer, when both are on this machine.

fn real_tokenizer() -> Option<Tokenizer> {
    let path = match std::env::var_os("RSLLM_TEST_TOKENIZER") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("RSLLM_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/rsllm")))?
            .join("models/llm/SmolLM2-135M-Instruct-hf/tokenizer.json"),
    };
    Tokenizer::from_file(&path).ok()
}

/// LLaRA's MovieLens test rows, prepared into a temporary cache from ../shared/data.
fn real_movielens() -> Option<rsllm_core::PreparedDataset> {
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if !data_dir.join("movielens-100k").is_dir() {
        return None;
    }
    let cache = tempfile::tempdir().ok()?;
    rsllm_core::dataset::prepare(
        DatasetName::MovieLens,
        Protocol::Llara,
        &PrepareOptions::default(),
        &rsllm_core::Paths::new(data_dir, cache.path()),
    )
    .ok()
}

/// Measures, on the 95 test rows x 3 templates: (a) how often segment-wise encoding of the
/// text-only prompt differs from whole-string encoding (why text-only encodes the whole
/// string), (b) how often the unified prompt minus its slots differs from the text-only ids,
/// (c) how often encoding prompt + answer at once differs from the concatenation, and the cost
/// of one build per mode.
#[test]
fn real_movielens_tokenisation_rules() {
    let (Some(tokenizer), Some(data)) = (real_tokenizer(), real_movielens()) else {
        eprintln!(
            "\n*** real_movielens_tokenisation_rules skipped: needs ../shared/data/movielens-100k \
             and the SmolLM2 tokenizer.json (RSLLM_TEST_TOKENIZER or the rsllm cache) ***\n"
        );
        return;
    };
    let pad = tokenizer.token_to_id("<|endoftext|>").unwrap();
    let b = PromptBuilder::with_builtin_templates("movielens", PromptOptions::new(pad)).unwrap();
    let (mut prompts, mut segment_differs, mut unified_differs, mut joint_differs) = (0, 0, 0, 0);
    let mut examples = Vec::new();
    let mut spans_not_exact = [0usize; 2];
    let mut merged_suffixes: std::collections::BTreeMap<String, usize> = Default::default();
    let mut timings = [0.0f64; 2];
    for row in &data.test {
        for template in 0..3 {
            let build = |mode| {
                b.build(
                    &tokenizer,
                    &data.catalog,
                    &row.history,
                    &row.candidates,
                    Some(row.target),
                    mode,
                    TemplateChoice::Fixed(template),
                )
                .unwrap()
            };
            let start = Instant::now();
            let text_only = build(PromptMode::TextOnly);
            timings[0] += start.elapsed().as_secs_f64();
            let start = Instant::now();
            let unified = build(PromptMode::Unified);
            timings[1] += start.elapsed().as_secs_f64();
            prompts += 1;

            let segments = b
                .segments(
                    &data.catalog,
                    template,
                    &text_only.history,
                    &row.candidates,
                    PromptMode::TextOnly,
                )
                .unwrap();
            let segmentwise = encode_segmentwise(&tokenizer, &segments, pad).unwrap().ids;
            if segmentwise != text_only.input_ids {
                segment_differs += 1;
                if examples.len() < 3 {
                    examples.push(first_difference(
                        &tokenizer,
                        &segmentwise,
                        &text_only.input_ids,
                    ));
                }
            }
            let without_slots: Vec<u32> = unified
                .input_ids
                .iter()
                .enumerate()
                .filter(|(p, _)| !unified.slots.iter().any(|s| s.position == *p))
                .map(|(_, &id)| id)
                .collect();
            if without_slots != text_only.input_ids {
                unified_differs += 1;
            }
            for slot in &unified.slots {
                assert_eq!(unified.input_ids[slot.position], pad);
            }
            let joint = TextEncoder::encode(
                &tokenizer,
                &format!("{}{}", text_only.text, text_only.answer_text),
            )
            .unwrap();
            let concatenated = [text_only.input_ids.clone(), text_only.answer_ids.clone()].concat();
            if joint != concatenated {
                joint_differs += 1;
            }
            for (mode, prompt) in [&text_only, &unified].into_iter().enumerate() {
                for span in &prompt.candidate_spans {
                    let text = decode(&tokenizer, &prompt.input_ids[span.start..span.end]);
                    let title = data.catalog.title(span.item).unwrap();
                    if text.trim_start() != title {
                        spans_not_exact[mode] += 1;
                        // Only a merge with the punctuation after the title: "Kolya (Kolya)," .
                        let rest = text.trim_start().strip_prefix(title).unwrap_or_else(|| {
                            panic!("span {text:?} does not start with {title:?}")
                        });
                        assert!(
                            rest.chars().all(|c| c.is_ascii_punctuation()),
                            "span {text:?} of {title:?}"
                        );
                        let last = title.chars().last().unwrap_or(' ');
                        *merged_suffixes.entry(format!("{last}{rest}")).or_default() += 1;
                    }
                }
            }
        }
    }
    eprintln!(
        "\nreal MovieLens test rows x 3 templates = {prompts} prompts (SmolLM2 tokenizer):\n  \
         text-only, segment-wise != whole-string: {segment_differs}\n  \
         unified minus slots != text-only whole-string: {unified_differs}\n  \
         prompt+answer encoded jointly != concatenated: {joint_differs}\n  \
         candidate spans not decoding exactly to the title, of {} per mode: text-only {}, \
         unified {}; merged tokens at the title's end: {merged_suffixes:?}\n  \
         build time per prompt: text-only {:.0} us, unified {:.0} us\n  first differences: {examples:#?}",
        prompts * 20,
        spans_not_exact[0],
        spans_not_exact[1],
        timings[0] / prompts as f64 * 1e6,
        timings[1] / prompts as f64 * 1e6,
    );
    assert_eq!(joint_differs, 0, "the answer boundary must not merge");
    assert_eq!(
        spans_not_exact[1], 0,
        "unified spans are exactly the title's tokens"
    );
}

/// The tokens around the first position where two encodings part, for the report.
fn first_difference(tokenizer: &Tokenizer, a: &[u32], b: &[u32]) -> String {
    let at = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let piece =
        |ids: &[u32]| -> Vec<String> { ids.iter().map(|&id| decode(tokenizer, &[id])).collect() };
    let from = at.saturating_sub(2);
    format!(
        "segment-wise {:?} vs whole {:?}",
        piece(&a[from..(at + 3).min(a.len())]),
        piece(&b[from..(at + 3).min(b.len())])
    )
}

#[test]
fn id_only_prompts_carry_slots_and_no_titles() {
    let tokenizer = tokenizer();
    let unified = build(PromptMode::Unified, 0);
    let ids_only = build(PromptMode::IdOnly, 0);
    assert_eq!(ids_only.slots.len(), unified.slots.len());
    assert!(ids_only.candidate_spans.is_empty() && ids_only.history_spans.is_empty());
    for title in TITLES {
        assert!(
            !ids_only.text.contains(title),
            "{title} in {:?}",
            ids_only.text
        );
    }
    assert!(ids_only.text.contains(SLOT_MARKER));
    for slot in &ids_only.slots {
        assert_eq!(ids_only.input_ids[slot.position], PAD_ID);
    }
    // Slots in the same order, for the same items; the answer is still the title.
    let items = |p: &BuiltPrompt| p.slots.iter().map(|s| (s.item, s.role)).collect::<Vec<_>>();
    assert_eq!(items(&ids_only), items(&unified));
    assert_eq!(ids_only.answer_text, " Star Wars\n");
    assert!(ids_only.input_ids.len() < unified.input_ids.len());
    assert_eq!(
        decode(&tokenizer, &ids_only.answer_ids),
        decode(&tokenizer, &unified.answer_ids)
    );
}

#[test]
fn unified_with_user_adds_one_user_slot_after_the_history() {
    let unified = build(PromptMode::Unified, 0);
    let with_user = build(PromptMode::UnifiedWithUser, 0);
    assert_eq!(with_user.slots.len(), unified.slots.len() + 1);
    let users: Vec<&Slot> = with_user
        .slots
        .iter()
        .filter(|s| s.role == SlotRole::User)
        .collect();
    assert_eq!(users.len(), 1);
    let user = users[0];
    // Right after the newest history item's slot, before the first candidate's title.
    let newest = with_user
        .slots
        .iter()
        .rfind(|s| s.role == SlotRole::History)
        .unwrap();
    assert_eq!(user.item, *HISTORY.last().unwrap());
    assert_eq!(user.position, newest.position + 1);
    assert!(user.position < with_user.candidate_spans[0].start);
    assert_eq!(with_user.input_ids[user.position], PAD_ID);
    assert!(
        with_user.text.contains(&format!(
            "Brian {SLOT_MARKER} {USER_SLOT_MARKER} in the previous"
        )),
        "{}",
        with_user.text
    );
    // Everything else is the unified prompt with one more token.
    let mut ids = with_user.input_ids.clone();
    ids.remove(user.position);
    assert_eq!(ids, unified.input_ids);
    let without: Vec<(ItemId, SlotRole)> = with_user
        .slots
        .iter()
        .filter(|s| s.role != SlotRole::User)
        .map(|s| (s.item, s.role))
        .collect();
    let expected: Vec<(ItemId, SlotRole)> =
        unified.slots.iter().map(|s| (s.item, s.role)).collect();
    assert_eq!(without, expected);
    assert_eq!(with_user.answer_ids, unified.answer_ids);
    // Every template of every domain gets exactly one, after the history.
    for (dataset, template, p) in every_template(PromptMode::UnifiedWithUser) {
        let roles: Vec<SlotRole> = p.slots.iter().map(|s| s.role).collect();
        let at = roles.iter().position(|r| *r == SlotRole::User).unwrap();
        assert_eq!(at, HISTORY.len(), "{dataset} template {template}");
        assert_eq!(roles.iter().filter(|r| **r == SlotRole::User).count(), 1);
    }
}

#[test]
fn unified_with_user_last_ends_the_prompt_with_the_user_slot() {
    let unified = build(PromptMode::Unified, 0);
    let last = build(PromptMode::UnifiedWithUserLast, 0);
    assert_eq!(last.mode, PromptMode::UnifiedWithUserLast);
    let user = *last.slots.last().unwrap();
    assert_eq!(user.role, SlotRole::User);
    assert_eq!(user.item, *HISTORY.last().unwrap());
    // The last prompt token, right before the answer, and the only user slot.
    assert_eq!(user.position, last.input_ids.len() - 1);
    assert_eq!(last.input_ids[user.position], PAD_ID);
    assert_eq!(
        last.slots
            .iter()
            .filter(|s| s.role == SlotRole::User)
            .count(),
        1
    );
    assert!(
        last.text.ends_with(&format!("Answer: {USER_SLOT_MARKER}")),
        "{}",
        last.text
    );
    // Everything before it is the unified prompt, spans and answer included.
    assert_eq!(&last.input_ids[..user.position], &unified.input_ids[..]);
    assert_eq!(&last.slots[..last.slots.len() - 1], &unified.slots[..]);
    assert_eq!(last.candidate_spans, unified.candidate_spans);
    assert_eq!(last.answer_ids, unified.answer_ids);
    // Every template of every domain ends with it.
    for (dataset, template, p) in every_template(PromptMode::UnifiedWithUserLast) {
        let user = p.slots.last().unwrap();
        assert_eq!(user.role, SlotRole::User, "{dataset} template {template}");
        assert_eq!(user.position, p.input_ids.len() - 1);
        assert_eq!(
            p.slots.iter().filter(|s| s.role == SlotRole::User).count(),
            1
        );
    }
}
