//! What the service loads at startup: the tokenizer and, per domain, its titles and prompt
//! builder.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rsllm_core::{Catalog, DatasetName, Paths};
use rsllm_prompt::{LlmTokenizer, PromptBuilder, PromptOptions};

use crate::config::DomainSpec;
use crate::error::StartError;

/// One served domain.
#[derive(Debug)]
pub struct Domain {
    pub name: String,
    pub catalog: Catalog,
    pub builder: PromptBuilder,
    /// Model name on the embedding-service whose vectors fill the ID slots.
    pub recommender: String,
}

/// Everything a request needs, immutable once loaded.
#[derive(Debug)]
pub struct Domains {
    pub tokenizer: Arc<LlmTokenizer>,
    pub by_name: BTreeMap<String, Arc<Domain>>,
}

impl Domains {
    /// Loads the tokenizer (a GGUF file or a tokenizer.json) and each domain's catalog.
    pub fn load(
        tokenizer_path: &Path,
        specs: &[DomainSpec],
        paths: &Paths,
    ) -> Result<Domains, StartError> {
        let tokenizer = load_tokenizer(tokenizer_path)?;
        // The slot placeholder is the pad token, as in training (rsllm-trainer): its own
        // embedding is never read, the llm-service overwrites it at the slot positions.
        let slot = tokenizer.pad_id.unwrap_or(0);
        let mut by_name = BTreeMap::new();
        for spec in specs {
            let bad = |reason: String| StartError::Domain {
                domain: spec.dataset.clone(),
                reason,
            };
            let dataset: DatasetName = spec.dataset.parse().map_err(|e| bad(format!("{e}")))?;
            let catalog = rsllm_core::dataset::load_catalog(dataset, paths)
                .map_err(|e| bad(e.to_string()))?;
            let builder =
                PromptBuilder::with_builtin_templates(&spec.dataset, PromptOptions::new(slot))
                    .map_err(|e| bad(e.to_string()))?;
            tracing::info!(
                domain = %spec.dataset,
                items = catalog.num_items(),
                recommender = %spec.recommender,
                "domain loaded"
            );
            by_name.insert(
                spec.dataset.clone(),
                Arc::new(Domain {
                    name: spec.dataset.clone(),
                    catalog,
                    builder,
                    recommender: spec.recommender.clone(),
                }),
            );
        }
        Ok(Domains {
            tokenizer: Arc::new(tokenizer),
            by_name,
        })
    }

    /// The served domain names, comma separated (for error messages).
    pub fn served(&self) -> String {
        self.by_name.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn load_tokenizer(path: &Path) -> Result<LlmTokenizer, StartError> {
    LlmTokenizer::from_path(path).map_err(|e| StartError::Tokenizer {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
