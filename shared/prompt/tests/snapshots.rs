//! Snapshots of the exact prompt text (template 0, both modes) for LLaRA's MovieLens test row 0,
//! so any change to templates, title joining or slot display shows up as a diff in review.
//!
//! - `tests/fixtures/movielens_llara_test_row0.json` holds the row (history, target, the stored
//!   candidates of the `llara` split with the default seed) with made-up titles
//!   ([`synthetic_title`]): MovieLens' licence forbids redistributing its data, titles
//!   included, so none are checked in. The snapshot test runs without the dataset (CI). When
//!   ../shared/data is present, `fixture_matches_the_real_row` checks the row's ids against
//!   the real prepared split.
//! - `tests/snapshots/movielens_test0_template0_{text_only,unified}.txt` hold the prompt text
//!   followed by the answer text (" title\n"), i.e. the training sequence as text.
//!
//! Regenerate both after an intended change:
//! `UPDATE_SNAPSHOTS=1 CARGO_TARGET_DIR=/tmp/target-prompt cargo test -p rsllm-prompt --release --test snapshots`
//! (the fixture is rewritten only where the data is present).

// Test code: the helpers outside #[test] functions panic on purpose to fail the test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use rsllm_core::{Catalog, DatasetName, ItemId, PrepareOptions, Protocol, SeqExample};
use rsllm_prompt::testing::{PAD_ID, tiny_tokenizer};
use rsllm_prompt::{PromptBuilder, PromptMode, PromptOptions, TemplateChoice, Templates};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Fixture {
    source: String,
    row: SeqExample,
    /// `(id, title)` for every id of the row.
    titles: Vec<(ItemId, String)>,
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_path() -> PathBuf {
    crate_dir().join("tests/fixtures/movielens_llara_test_row0.json")
}

/// A made-up title for item `id`, in a few shapes real titles have (leading article,
/// subtitle after a colon, trailing punctuation) so the joining rules are exercised.
fn synthetic_title(id: ItemId) -> String {
    match id % 4 {
        0 => format!("Film {id}"),
        1 => format!("The Film {id}"),
        2 => format!("Film {id}: Part II"),
        _ => format!("Film {id}!"),
    }
}

fn updating() -> bool {
    std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1")
}

fn read_fixture() -> Fixture {
    let text = std::fs::read_to_string(fixture_path()).unwrap_or_else(|err| {
        panic!(
            "{}: {err}; generate it with UPDATE_SNAPSHOTS=1 where ../shared/data is present",
            fixture_path().display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// A catalog holding the fixture's titles at their ids (other ids get filler titles that no
/// prompt of the fixture refers to).
fn fixture_catalog(fixture: &Fixture) -> Catalog {
    let len = fixture
        .titles
        .iter()
        .map(|(id, _)| *id as usize + 1)
        .max()
        .unwrap();
    let mut titles: Vec<String> = (0..len)
        .map(|id| format!("(item {id} not in fixture)"))
        .collect();
    for (id, title) in &fixture.titles {
        titles[*id as usize] = title.clone();
    }
    Catalog {
        dataset: "movielens".to_owned(),
        titles,
    }
}

fn compare_or_update(path: &Path, actual: &str) {
    if updating() {
        std::fs::write(path, actual).unwrap();
        eprintln!("updated {}", path.display());
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|err| {
        panic!(
            "{}: {err}; run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs; if the change is intended, rerun with UPDATE_SNAPSHOTS=1",
        path.display()
    );
}

#[test]
fn template_zero_snapshots_in_both_modes() {
    let fixture = read_fixture();
    let catalog = fixture_catalog(&fixture);
    let templates = Templates::builtin("movielens").unwrap();
    let mut corpus: Vec<String> = templates.iter().map(|t| t.text().to_owned()).collect();
    corpus.extend(fixture.titles.iter().map(|(_, t)| format!(" {t}")));
    let tokenizer = tiny_tokenizer(&corpus, 500).unwrap();
    let builder = PromptBuilder::new("movielens", templates, PromptOptions::new(PAD_ID)).unwrap();
    let row = &fixture.row;
    for (mode, name) in [
        (PromptMode::TextOnly, "text_only"),
        (PromptMode::Unified, "unified"),
    ] {
        let prompt = builder
            .build(
                &tokenizer,
                &catalog,
                &row.history,
                &row.candidates,
                Some(row.target),
                mode,
                TemplateChoice::Fixed(0),
            )
            .unwrap();
        assert!(
            prompt
                .text
                .contains(&format!("following {} movie titles", row.candidates.len()))
        );
        for span in &prompt.candidate_spans {
            let text = tokenizer
                .decode(&prompt.input_ids[span.start..span.end], false)
                .unwrap();
            assert_eq!(text.trim_start(), catalog.title(span.item).unwrap());
        }
        let path = crate_dir().join(format!(
            "tests/snapshots/movielens_test0_template0_{name}.txt"
        ));
        compare_or_update(&path, &format!("{}{}", prompt.text, prompt.answer_text));
    }
}

/// The fixture is LLaRA's MovieLens test row 0 as `rsllm_core` prepares it (default options).
#[test]
fn fixture_matches_the_real_row() {
    let data_dir = crate_dir().join("../../../shared/data");
    if !data_dir.join("movielens-100k").is_dir() {
        eprintln!(
            "\n*** fixture_matches_the_real_row skipped: no data at {} ***\n",
            data_dir.display()
        );
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let options = PrepareOptions::default();
    let data = rsllm_core::dataset::prepare(
        DatasetName::MovieLens,
        Protocol::Llara,
        &options,
        &rsllm_core::Paths::new(&data_dir, cache.path()),
    )
    .unwrap();
    let row = data.test[0].clone();
    let mut ids: Vec<ItemId> = row
        .history
        .iter()
        .chain(&row.candidates)
        .copied()
        .chain([row.target])
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let real = Fixture {
        source: format!(
            "rsllm_core prepare movielens/llara (seed {}, {} candidates), test row 0; made-up \
             titles (the dataset's may not be redistributed)",
            options.seed, options.num_candidates
        ),
        titles: ids.iter().map(|&id| (id, synthetic_title(id))).collect(),
        row,
    };
    if updating() {
        let json = serde_json::to_string_pretty(&real).unwrap() + "\n";
        std::fs::write(fixture_path(), json).unwrap();
        eprintln!("updated {}", fixture_path().display());
        return;
    }
    assert_eq!(read_fixture(), real);
}
