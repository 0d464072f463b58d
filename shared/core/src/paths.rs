//! Where data is read from and where prepared artefacts are written.

use std::path::PathBuf;

/// Resolved locations. The data directory is read-only input (it may be `../shared/data`,
/// mounted without write bits); everything we produce goes under `cache_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Holds `movielens-100k/`, `lastfm-hetrec2011-2k/`, `steam/` as laid out in ../shared/data.
    pub data_dir: PathBuf,
    /// Root for prepared splits (`prepared/`), recommender models (`models/`), the libtorch
    /// venv and the default LLM. Default `$RSLLM_CACHE_DIR`, else `~/.cache/rsllm`.
    pub cache_dir: PathBuf,
}

impl Paths {
    /// Data: `$RSLLM_DATA_DIR`, else `./data`, else `../shared/data` (relative to the current
    /// directory), else the first of those that exists walking up from the executable is not
    /// attempted: the error names what was searched. Cache: `$RSLLM_CACHE_DIR`, else
    /// `$HOME/.cache/rsllm`.
    pub fn from_env() -> Result<Paths, crate::DataError> {
        todo!("helper A")
    }

    pub fn prepared_dir(&self) -> PathBuf {
        self.cache_dir.join("prepared")
    }

    pub fn models_dir(&self) -> PathBuf {
        self.cache_dir.join("models")
    }
}
