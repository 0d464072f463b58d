//! Dataset loading, protocols and prepared splits. See docs/data.md.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Catalog, DataError, Paths, SeqExample, SplitPart};

pub mod candidates;
mod llara_files;
mod movielens;
mod rows;
mod sources;
mod store;

use rows::Rows;
use sources::Sources;

/// Datasets by CLI name: `movielens`, `lastfm`, `steam`, `steam-valtrain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DatasetName {
    #[serde(rename = "movielens")]
    MovieLens,
    #[serde(rename = "lastfm")]
    LastFm,
    #[serde(rename = "steam")]
    Steam,
    /// Steam without its (unavailable) training split: trains on LLaRA's validation users and
    /// tests on its test users. Always labelled as such in reports.
    #[serde(rename = "steam-valtrain")]
    SteamValTrain,
}

impl DatasetName {
    pub const ALL: [DatasetName; 4] = [
        DatasetName::MovieLens,
        DatasetName::LastFm,
        DatasetName::Steam,
        DatasetName::SteamValTrain,
    ];

    /// The CLI / directory name.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::MovieLens => "movielens",
            DatasetName::LastFm => "lastfm",
            DatasetName::Steam => "steam",
            DatasetName::SteamValTrain => "steam-valtrain",
        }
    }

    /// Human-readable name for reports and tables.
    pub fn label(self) -> &'static str {
        match self {
            DatasetName::MovieLens => "MovieLens-100K",
            DatasetName::LastFm => "LastFM (hetrec2011-2k)",
            DatasetName::Steam => "Steam",
            DatasetName::SteamValTrain => {
                "Steam (valtrain variant: trained on LLaRA's validation users)"
            }
        }
    }

    /// The folder of the data directory that holds the dataset's files.
    pub fn data_subdir(self) -> &'static str {
        match self {
            DatasetName::MovieLens => movielens::DIR,
            DatasetName::LastFm => llara_files::LASTFM_DIR,
            DatasetName::Steam | DatasetName::SteamValTrain => llara_files::STEAM_DIR,
        }
    }
}

/// Split protocols of METHOD.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Llara,
    Loo,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Llara, Protocol::Loo];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Llara => "llara",
            Protocol::Loo => "loo",
        }
    }
}

/// An unknown dataset or protocol name; the message lists the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?}; expected one of: {valid}")]
pub struct UnknownName {
    kind: &'static str,
    given: String,
    valid: String,
}

fn parse_name<T: Copy>(
    given: &str,
    kind: &'static str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, UnknownName> {
    all.iter()
        .copied()
        .find(|&value| name(value) == given.trim())
        .ok_or_else(|| UnknownName {
            kind,
            given: given.to_owned(),
            valid: all
                .iter()
                .map(|&value| name(value))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

impl FromStr for DatasetName {
    type Err = UnknownName;

    fn from_str(given: &str) -> Result<Self, Self::Err> {
        parse_name(given, "dataset", &DatasetName::ALL, DatasetName::as_str)
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = UnknownName;

    fn from_str(given: &str) -> Result<Self, Self::Err> {
        parse_name(given, "protocol", &Protocol::ALL, Protocol::as_str)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Knobs of preparation; all recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareOptions {
    /// Candidates per val/test row, target included (20).
    pub num_candidates: usize,
    /// Seed of the candidate draw (and of anything else random in preparation).
    pub seed: u64,
    /// History window (10).
    pub history_len: usize,
    /// Rows with fewer history items are dropped (3, as LLaRA's loader).
    pub min_history: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            num_candidates: 20,
            seed: 4321,
            history_len: 10,
            min_history: 3,
        }
    }
}

impl PrepareOptions {
    fn validate(&self) -> Result<(), DataError> {
        if self.num_candidates == 0 {
            return Err(DataError::Invalid(
                "num_candidates must be at least 1".to_owned(),
            ));
        }
        if self.history_len == 0 {
            return Err(DataError::Invalid(
                "history_len must be at least 1".to_owned(),
            ));
        }
        if self.min_history > self.history_len {
            return Err(DataError::Invalid(format!(
                "min_history {} exceeds history_len {}: every row would be dropped",
                self.min_history, self.history_len
            )));
        }
        Ok(())
    }
}

/// Bumped whenever preparation would produce different files from the same sources and
/// options, so caches written by older code are rebuilt rather than trusted.
pub const PREPARE_FORMAT: u32 = 1;

/// What was prepared, from what, with which options; stored as `manifest.json` beside the
/// split files. `version` is the sha256 of the split files' hashes: models trained on a split
/// record it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitManifest {
    pub dataset: DatasetName,
    pub protocol: Protocol,
    pub options: PrepareOptions,
    pub num_users: usize,
    pub num_items: usize,
    pub num_interactions: usize,
    pub rows: std::collections::BTreeMap<String, usize>,
    /// sha256 of each written file (catalog.json, train.jsonl, val.jsonl, test.jsonl).
    pub files: std::collections::BTreeMap<String, String>,
    /// sha256 of each source file read, keyed by its path relative to the data directory.
    pub sources: std::collections::BTreeMap<String, String>,
    pub version: String,
    /// Free-text notes, e.g. "steam-valtrain: trains on LLaRA's validation users".
    pub notes: Vec<String>,
    /// `PREPARE_FORMAT` of the code that wrote it (0 when absent).
    #[serde(default)]
    pub format: u32,
}

/// A prepared split in memory.
#[derive(Debug, Clone)]
pub struct PreparedDataset {
    pub manifest: SplitManifest,
    pub catalog: Catalog,
    pub train: Vec<SeqExample>,
    pub val: Vec<SeqExample>,
    pub test: Vec<SeqExample>,
}

impl PreparedDataset {
    pub fn rows(&self, part: SplitPart) -> &[SeqExample] {
        match part {
            SplitPart::Train => &self.train,
            SplitPart::Val => &self.val,
            SplitPart::Test => &self.test,
        }
    }
}

/// Whether `prepare_or_reuse` found a valid prepared split or built one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareOutcome {
    Reused,
    Built,
}

/// `paths.prepared_dir()/<dataset>-<protocol>`.
pub fn split_dir(paths: &Paths, dataset: DatasetName, protocol: Protocol) -> PathBuf {
    paths.prepared_dir().join(format!("{dataset}-{protocol}"))
}

/// A dataset read from its sources under one protocol, before candidates are drawn.
pub(crate) struct Assembled {
    pub titles: Vec<String>,
    pub rows: Rows,
    pub num_users: usize,
    pub num_interactions: usize,
    pub notes: Vec<String>,
}

/// Prepares (or reuses, when a manifest with the same options exists and its files hash as
/// recorded) the split under `paths.prepared_dir()/<dataset>-<protocol>/`.
pub fn prepare(
    dataset: DatasetName,
    protocol: Protocol,
    options: &PrepareOptions,
    paths: &Paths,
) -> Result<PreparedDataset, DataError> {
    prepare_or_reuse(dataset, protocol, options, paths).map(|(prepared, _)| prepared)
}

/// `prepare`, also saying whether the stored split was reused.
pub fn prepare_or_reuse(
    dataset: DatasetName,
    protocol: Protocol,
    options: &PrepareOptions,
    paths: &Paths,
) -> Result<(PreparedDataset, PrepareOutcome), DataError> {
    options.validate()?;
    let dir = split_dir(paths, dataset, protocol);
    match store::load(&dir, dataset, protocol, options, paths) {
        store::Cached::Valid(prepared) => return Ok((*prepared, PrepareOutcome::Reused)),
        store::Cached::Absent => {}
        store::Cached::Stale(reason) => {
            tracing::warn!(dir = %dir.display(), %reason, "rebuilding prepared split");
        }
    }
    let mut sources = Sources::new(&paths.data_dir);
    let assembled = match dataset {
        DatasetName::MovieLens => movielens::assemble(protocol, options, &mut sources)?,
        DatasetName::LastFm | DatasetName::Steam | DatasetName::SteamValTrain => {
            llara_files::assemble(dataset, protocol, options, &mut sources)?
        }
    };
    let mut prepared = finish(dataset, protocol, options, assembled, sources.hashes)?;
    store::save(&dir, &mut prepared)?;
    tracing::info!(
        dir = %dir.display(),
        train = prepared.train.len(),
        val = prepared.val.len(),
        test = prepared.test.len(),
        "prepared split"
    );
    Ok((prepared, PrepareOutcome::Built))
}

/// Draws the candidates and fills in the manifest (all but the file hashes, which `store`
/// adds once the bytes exist).
fn finish(
    dataset: DatasetName,
    protocol: Protocol,
    options: &PrepareOptions,
    assembled: Assembled,
    sources: BTreeMap<String, String>,
) -> Result<PreparedDataset, DataError> {
    let Assembled {
        titles,
        rows,
        num_users,
        num_interactions,
        notes,
    } = assembled;
    let Rows {
        train,
        mut val,
        mut test,
    } = rows;
    let num_items = titles.len();
    for (part, rows) in [(SplitPart::Val, &mut val), (SplitPart::Test, &mut test)] {
        let mut rng = candidates::candidate_rng(options.seed, part);
        for (index, row) in rows.iter_mut().enumerate() {
            row.candidates = candidates::draw_candidates(
                &row.history,
                row.target,
                num_items,
                options.num_candidates,
                &mut rng,
            )
            .map_err(|err| {
                DataError::Invalid(format!(
                    "{dataset}-{protocol} {} row {index}: {err}",
                    part.as_str()
                ))
            })?;
        }
    }
    for (part, rows) in [
        (SplitPart::Train, &train),
        (SplitPart::Val, &val),
        (SplitPart::Test, &test),
    ] {
        if rows.is_empty() {
            return Err(DataError::Invalid(format!(
                "{dataset}-{protocol}: no {} rows with at least {} history items",
                part.as_str(),
                options.min_history
            )));
        }
    }
    let rows = [
        (SplitPart::Train, train.len()),
        (SplitPart::Val, val.len()),
        (SplitPart::Test, test.len()),
    ]
    .into_iter()
    .map(|(part, count)| (part.as_str().to_owned(), count))
    .collect();
    let manifest = SplitManifest {
        dataset,
        protocol,
        options: options.clone(),
        num_users,
        num_items,
        num_interactions,
        rows,
        files: BTreeMap::new(),
        sources,
        version: String::new(),
        notes,
        format: PREPARE_FORMAT,
    };
    let catalog = Catalog {
        dataset: dataset.as_str().to_owned(),
        titles,
    };
    Ok(PreparedDataset {
        manifest,
        catalog,
        train,
        val,
        test,
    })
}

/// The dataset's item titles straight from its source files (no split needed): MovieLens
/// `u.item` normalised, LastFM/Steam `id2name.txt`.
pub fn load_catalog(dataset: DatasetName, paths: &Paths) -> Result<Catalog, DataError> {
    let mut sources = Sources::new(&paths.data_dir);
    let titles = match dataset {
        DatasetName::MovieLens => movielens::titles(&mut sources)?,
        DatasetName::LastFm | DatasetName::Steam | DatasetName::SteamValTrain => {
            llara_files::titles(dataset, &mut sources)?
        }
    };
    Ok(Catalog {
        dataset: dataset.as_str().to_owned(),
        titles,
    })
}

#[cfg(test)]
mod tests;
