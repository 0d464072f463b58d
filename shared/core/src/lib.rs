//! rsllm-core: the datasets (MovieLens-100K, LastFM, Steam) under the `llara` and `loo`
//! protocols, stored candidate sets, ranking metrics and the artefact helpers (atomic writes,
//! content hashes) that every other crate uses. No tch here, so data work builds fast.

pub mod artefact;
pub mod dataset;
pub mod error;
pub mod metrics;
pub mod paths;
pub mod titles;
pub mod types;

pub use dataset::{
    DatasetName, PrepareOptions, PrepareOutcome, PreparedDataset, Protocol, SplitManifest,
};
pub use error::DataError;
pub use paths::Paths;
pub use types::{Catalog, ItemId, SeqExample, SplitPart};
