//! Where data is read from and where prepared artefacts are written.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::DataError;

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

/// The cache directory alone: `$RSLLM_CACHE_DIR`, else `$HOME/.cache/rsllm`; None when
/// neither is set. For services that need the cache but not the datasets.
pub fn cache_dir_from_env() -> Option<PathBuf> {
    cache_dir_from(&|name: &str| std::env::var_os(name))
}

/// The cache rule, with the environment passed in (an empty variable counts as unset).
fn cache_dir_from(var: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("RSLLM_CACHE_DIR").or_else(|| set("HOME").map(|home| home.join(".cache").join("rsllm")))
}

impl Paths {
    pub fn new(data_dir: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> Paths {
        Paths {
            data_dir: data_dir.into(),
            cache_dir: cache_dir.into(),
        }
    }

    /// Data: `$RSLLM_DATA_DIR`, else `./data`, else `../shared/data` (relative to the current
    /// directory), else the first of those that exists walking up from the executable is not
    /// attempted: the error names what was searched. Cache: `$RSLLM_CACHE_DIR`, else
    /// `$HOME/.cache/rsllm`.
    pub fn from_env() -> Result<Paths, DataError> {
        let cwd = std::env::current_dir().map_err(|source| DataError::Io {
            path: PathBuf::from("."),
            source,
        })?;
        Paths::resolve(|name| std::env::var_os(name), &cwd)
    }

    /// `from_env` with the environment and current directory passed in (testable without
    /// touching the process environment).
    fn resolve(var: impl Fn(&str) -> Option<OsString>, cwd: &Path) -> Result<Paths, DataError> {
        // An empty variable counts as unset, as shells make `VAR=` easy to write by accident.
        let set = |name: &str| {
            var(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        // An explicit RSLLM_DATA_DIR is taken as given even if absent: the dataset loaders then
        // name it in their "missing file" errors, which is clearer than a silent fallback.
        let data_dir = match set("RSLLM_DATA_DIR") {
            Some(dir) => dir,
            None => {
                let candidates = [cwd.join("data"), cwd.join("../shared/data")];
                match candidates.iter().find(|dir| dir.is_dir()) {
                    Some(dir) => dir.clone(),
                    None => {
                        return Err(DataError::Missing {
                            dataset: "(any)".to_owned(),
                            dir: cwd.to_path_buf(),
                            missing: vec![
                                "$RSLLM_DATA_DIR (unset)".to_owned(),
                                "./data".to_owned(),
                                "../shared/data".to_owned(),
                            ],
                            hint: "set RSLLM_DATA_DIR to the directory holding movielens-100k/, \
                                   lastfm-hetrec2011-2k/ and steam/ (see docs/data.md)"
                                .to_owned(),
                        });
                    }
                }
            }
        };
        let Some(cache_dir) = cache_dir_from(&var) else {
            return Err(DataError::Invalid(
                "neither RSLLM_CACHE_DIR nor HOME is set: no cache directory".to_owned(),
            ));
        };
        Ok(Paths {
            data_dir,
            cache_dir,
        })
    }

    pub fn prepared_dir(&self) -> PathBuf {
        self.cache_dir.join("prepared")
    }

    pub fn models_dir(&self) -> PathBuf {
        self.cache_dir.join("models")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn explicit_variables_win() {
        let cwd = tempfile::tempdir().unwrap();
        let paths = Paths::resolve(
            env(&[
                ("RSLLM_DATA_DIR", "/d"),
                ("RSLLM_CACHE_DIR", "/c"),
                ("HOME", "/h"),
            ]),
            cwd.path(),
        )
        .unwrap();
        assert_eq!(paths, Paths::new("/d", "/c"));
        assert_eq!(paths.prepared_dir(), PathBuf::from("/c/prepared"));
    }

    #[test]
    fn falls_back_to_local_data_then_shared_data() {
        let root = tempfile::tempdir().unwrap();
        let cwd = root.path().join("main");
        std::fs::create_dir_all(root.path().join("shared/data")).unwrap();
        std::fs::create_dir_all(&cwd).unwrap();
        let paths = Paths::resolve(env(&[("HOME", "/h")]), &cwd).unwrap();
        assert_eq!(paths.data_dir, cwd.join("../shared/data"));
        assert_eq!(paths.cache_dir, PathBuf::from("/h/.cache/rsllm"));

        std::fs::create_dir_all(cwd.join("data")).unwrap();
        let paths = Paths::resolve(env(&[("HOME", "/h"), ("RSLLM_DATA_DIR", "")]), &cwd).unwrap();
        assert_eq!(paths.data_dir, cwd.join("data"));
    }

    #[test]
    fn no_data_dir_names_all_three_places() {
        let cwd = tempfile::tempdir().unwrap();
        let err = Paths::resolve(env(&[("HOME", "/h")]), cwd.path())
            .unwrap_err()
            .to_string();
        for needle in ["RSLLM_DATA_DIR", "./data", "../shared/data"] {
            assert!(err.contains(needle), "{err}");
        }
    }
}
