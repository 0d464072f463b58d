//! Prompt templates as data. The defaults are LLaRA's three templates per domain
//! (`templates/{movielens,steam,lastfm}.json`, compiled in); `Templates::from_file` reads a
//! custom set in the same format, so a template ablation needs no code change.
//!
//! File format (JSON, unknown fields rejected so a typo cannot be silently ignored):
//! ```json
//! {
//!   "domain": "movielens",
//!   "source": "free text: where the wording comes from",
//!   "item_separator": ", ",
//!   "templates": ["This user has watched {history} in the previous. ... {num_candidates} ... {candidates}. Answer:"]
//! }
//! ```
//! - `domain`: the template domain, `movielens`, `steam` or `lastfm` (`steam-valtrain` uses
//!   `steam`'s templates).
//! - `item_separator` (default `", "`, as LLaRA joins titles): between items of a list.
//! - Each template holds exactly one `{history}` and one `{candidates}`, and any number of
//!   `{num_candidates}` (replaced by the real candidate count, where LLaRA's text says "10"
//!   although it uses 20 candidates). Any other `{...}` or a lone brace is an error, so a
//!   misspelt placeholder cannot reach a prompt as literal text.
//! - Templates are trimmed on load, as LLaRA strips its template lines: a prompt never ends in
//!   whitespace, which the answer rule (a leading space) relies on.

use std::path::Path;
use std::str::FromStr;

use rsllm_core::DatasetName;
use serde::Deserialize;

use crate::error::PromptError;

pub const HISTORY_PLACEHOLDER: &str = "{history}";
pub const CANDIDATES_PLACEHOLDER: &str = "{candidates}";
pub const NUM_CANDIDATES_PLACEHOLDER: &str = "{num_candidates}";

const MOVIELENS_JSON: &str = include_str!("../templates/movielens.json");
const STEAM_JSON: &str = include_str!("../templates/steam.json");
const LASTFM_JSON: &str = include_str!("../templates/lastfm.json");

/// One parsed piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Literal(String),
    History,
    Candidates,
    NumCandidates,
}

/// One template: its text as written and its parsed pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    pub(crate) pieces: Vec<Piece>,
}

impl Template {
    /// The template text with its placeholders, as in the file (trimmed).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// A validated set of templates for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    domain: String,
    source_name: String,
    description: String,
    item_separator: String,
    templates: Vec<Template>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    domain: String,
    #[serde(default)]
    source: String,
    #[serde(default = "default_separator")]
    item_separator: String,
    templates: Vec<String>,
}

fn default_separator() -> String {
    ", ".to_owned()
}

/// The template domain a dataset uses: its own name, except `steam-valtrain`, which is Steam
/// data and so takes Steam's templates.
pub fn template_domain(dataset: &str) -> Result<&'static str, PromptError> {
    let name = DatasetName::from_str(dataset).map_err(|_| PromptError::UnknownDomain {
        domain: dataset.to_owned(),
        valid: DatasetName::ALL
            .iter()
            .map(|name| name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    Ok(match name {
        DatasetName::MovieLens => "movielens",
        DatasetName::LastFm => "lastfm",
        DatasetName::Steam | DatasetName::SteamValTrain => "steam",
    })
}

impl Templates {
    /// The compiled-in LLaRA templates for a dataset (`movielens`, `lastfm`, `steam`,
    /// `steam-valtrain`).
    pub fn builtin(dataset: &str) -> Result<Templates, PromptError> {
        let (json, name) = match template_domain(dataset)? {
            "movielens" => (MOVIELENS_JSON, "templates/movielens.json (built in)"),
            "lastfm" => (LASTFM_JSON, "templates/lastfm.json (built in)"),
            _ => (STEAM_JSON, "templates/steam.json (built in)"),
        };
        Templates::from_json_str(json, name)
    }

    /// A custom template file in the format of the module docs.
    pub fn from_file(path: &Path) -> Result<Templates, PromptError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| PromptError::TemplateFile {
            source_name: source_name.clone(),
            problem: format!("cannot read: {err}"),
        })?;
        let templates = Templates::from_json_str(&text, &source_name)?;
        tracing::debug!(
            file = %source_name,
            domain = %templates.domain,
            count = templates.len(),
            "loaded prompt templates"
        );
        Ok(templates)
    }

    /// Parses and validates template JSON; `source_name` names it in errors.
    pub fn from_json_str(json: &str, source_name: &str) -> Result<Templates, PromptError> {
        let file_error = |problem: String| PromptError::TemplateFile {
            source_name: source_name.to_owned(),
            problem,
        };
        let file: TemplateFile =
            serde_json::from_str(json).map_err(|err| file_error(format!("not valid: {err}")))?;
        // The domain must be one the builder can check catalogs against.
        let domain = file.domain.trim().to_owned();
        if !["movielens", "steam", "lastfm"].contains(&domain.as_str()) {
            return Err(file_error(format!(
                "domain {:?} is not a template domain; expected movielens, steam or lastfm",
                file.domain
            )));
        }
        if file.item_separator.is_empty() {
            return Err(file_error(
                "item_separator is empty: titles would run together".to_owned(),
            ));
        }
        if file.templates.is_empty() {
            return Err(file_error("templates is empty".to_owned()));
        }
        let templates = file
            .templates
            .iter()
            .enumerate()
            .map(|(index, text)| {
                parse_template(text).map_err(|problem| PromptError::Template {
                    source_name: source_name.to_owned(),
                    index,
                    problem,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Templates {
            domain,
            source_name: source_name.to_owned(),
            description: file.source,
            item_separator: file.item_separator,
            templates,
        })
    }

    /// The template domain (`movielens`, `steam` or `lastfm`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Where the templates came from (a path, or the built-in file's name).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The file's free-text `source` field.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn item_separator(&self) -> &str {
        &self.item_separator
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Never true for a loaded set (validation rejects an empty list); here for clippy's
    /// `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&Template> {
        self.templates.get(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Template> {
        self.templates.iter()
    }
}

/// Splits a template into literal text and placeholders; the error says what is wrong.
fn parse_template(raw: &str) -> Result<Template, String> {
    let text = raw.trim();
    if text.is_empty() {
        return Err("template is empty".to_owned());
    }
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err(format!(
                "lone '}}' at byte {}; placeholders are {HISTORY_PLACEHOLDER}, \
                 {CANDIDATES_PLACEHOLDER} and {NUM_CANDIDATES_PLACEHOLDER}",
                text.len() - rest.len() + open
            ));
        }
        literal.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err(format!(
                "unclosed '{{' at byte {}",
                text.len() - rest.len() + open
            ));
        };
        let placeholder = &rest[open..open + close + 1];
        let piece = match placeholder {
            HISTORY_PLACEHOLDER => Piece::History,
            CANDIDATES_PLACEHOLDER => Piece::Candidates,
            NUM_CANDIDATES_PLACEHOLDER => Piece::NumCandidates,
            other => {
                return Err(format!(
                    "unknown placeholder {other}; expected {HISTORY_PLACEHOLDER}, \
                     {CANDIDATES_PLACEHOLDER} or {NUM_CANDIDATES_PLACEHOLDER}"
                ));
            }
        };
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut literal)));
        }
        pieces.push(piece);
        rest = &rest[open + close + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    for (wanted, placeholder) in [
        (Piece::History, HISTORY_PLACEHOLDER),
        (Piece::Candidates, CANDIDATES_PLACEHOLDER),
    ] {
        let count = pieces.iter().filter(|piece| **piece == wanted).count();
        if count != 1 {
            return Err(format!(
                "{placeholder} occurs {count} times; exactly one is required"
            ));
        }
    }
    Ok(Template {
        text: text.to_owned(),
        pieces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_load_with_three_templates_each() {
        for dataset in ["movielens", "lastfm", "steam", "steam-valtrain"] {
            let templates = Templates::builtin(dataset).unwrap();
            assert_eq!(templates.len(), 3, "{dataset}");
            assert_eq!(templates.item_separator(), ", ");
            for template in templates.iter() {
                assert!(!template.text().contains("10"), "{}", template.text());
            }
        }
        assert_eq!(
            Templates::builtin("steam-valtrain").unwrap().domain(),
            "steam"
        );
        assert_eq!(Templates::builtin("lastfm").unwrap().domain(), "lastfm");
    }

    #[test]
    fn the_count_placeholder_stands_where_llara_wrote_10() {
        // LLaRA's template 2 of each domain and template 1 of movie.txt name the count.
        let movies = Templates::builtin("movielens").unwrap();
        let counts: Vec<usize> = movies
            .iter()
            .map(|t| t.text().matches(NUM_CANDIDATES_PLACEHOLDER).count())
            .collect();
        assert_eq!(counts, [1, 1, 0]);
        let games = Templates::builtin("steam").unwrap();
        let counts: Vec<usize> = games
            .iter()
            .map(|t| t.text().matches(NUM_CANDIDATES_PLACEHOLDER).count())
            .collect();
        assert_eq!(counts, [0, 1, 0]);
    }

    #[test]
    fn parse_splits_literals_and_placeholders() {
        let t =
            parse_template("  A {history} B {num_candidates}: {candidates}. Answer:  ").unwrap();
        assert_eq!(
            t.text(),
            "A {history} B {num_candidates}: {candidates}. Answer:"
        );
        assert_eq!(
            t.pieces,
            vec![
                Piece::Literal("A ".into()),
                Piece::History,
                Piece::Literal(" B ".into()),
                Piece::NumCandidates,
                Piece::Literal(": ".into()),
                Piece::Candidates,
                Piece::Literal(". Answer:".into()),
            ]
        );
    }

    #[test]
    fn broken_templates_are_named_by_file_index_and_problem() {
        let cases = [
            ("{candidates} only", "{history} occurs 0 times"),
            (
                "{history} {history} {candidates}",
                "{history} occurs 2 times",
            ),
            ("{history} and nothing", "{candidates} occurs 0 times"),
            ("{history} {candidate}", "unknown placeholder {candidate}"),
            ("{history} {candidates} {", "unclosed '{'"),
            ("{history} } {candidates}", "lone '}'"),
            ("   ", "template is empty"),
        ];
        for (template, problem) in cases {
            let json = serde_json::json!({
                "domain": "movielens",
                "templates": ["{history} {candidates}", template],
            })
            .to_string();
            let err = Templates::from_json_str(&json, "custom.json").unwrap_err();
            assert!(
                matches!(&err, PromptError::Template { index: 1, .. }),
                "{template}: {err:?}"
            );
            let message = err.to_string();
            assert!(message.contains("custom.json"), "{message}");
            assert!(message.contains("template 1"), "{message}");
            assert!(message.contains(problem), "{message}");
        }
    }

    #[test]
    fn broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.json");
        let err = Templates::from_file(&missing).unwrap_err().to_string();
        assert!(
            err.contains("absent.json") && err.contains("cannot read"),
            "{err}"
        );

        let cases = [
            ("not json", "not valid"),
            (r#"{"domain": "movielens"}"#, "missing field `templates`"),
            (
                r#"{"domain": "movielens", "templates": ["{history}{candidates}"], "extra": 1}"#,
                "unknown field `extra`",
            ),
            (
                r#"{"domain": "books", "templates": ["{history}{candidates}"]}"#,
                "books",
            ),
            (
                r#"{"domain": "movielens", "templates": []}"#,
                "templates is empty",
            ),
            (
                r#"{"domain": "movielens", "item_separator": "", "templates": ["{history}{candidates}"]}"#,
                "item_separator is empty",
            ),
        ];
        for (index, (json, problem)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("bad{index}.json"));
            std::fs::write(&path, json).unwrap();
            let err = Templates::from_file(&path).unwrap_err();
            assert!(matches!(err, PromptError::TemplateFile { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains(&format!("bad{index}.json")), "{message}");
            assert!(message.contains(problem), "{message}");
        }
    }

    #[test]
    fn a_custom_file_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.json");
        std::fs::write(
            &path,
            r#"{"domain": "lastfm", "item_separator": "; ",
                "templates": ["Heard {history}. Pick from {num_candidates}: {candidates}. Answer:"]}"#,
        )
        .unwrap();
        let templates = Templates::from_file(&path).unwrap();
        assert_eq!(templates.domain(), "lastfm");
        assert_eq!(templates.item_separator(), "; ");
        assert_eq!(templates.len(), 1);
        assert!(templates.source_name().ends_with("mine.json"));
    }

    #[test]
    fn unknown_dataset_lists_the_valid_ones() {
        let err = Templates::builtin("netflix").unwrap_err().to_string();
        assert!(
            err.contains("netflix") && err.contains("steam-valtrain"),
            "{err}"
        );
    }
}
