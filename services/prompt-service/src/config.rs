//! Command-line flags, each with an `RSLLM_PROMPT_*` environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::StartError;

/// Configuration of the prompt-service. Precedence: flag, then environment variable, then the
/// default shown in `--help`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "prompt-service",
    version,
    about = "Builds RSLLM's unified Text-ID prompts over gRPC (rsllm.v1.PromptService)."
)]
pub struct Config {
    /// Address to serve gRPC on (host:port; port 0 picks a free port, logged at startup).
    #[arg(long, env = "RSLLM_PROMPT_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,

    /// Address of the Prometheus endpoint (`GET /metrics`); empty disables it.
    #[arg(
        long,
        env = "RSLLM_PROMPT_METRICS_LISTEN",
        default_value = "127.0.0.1:9102"
    )]
    pub metrics_listen: String,

    /// The tokenizer: the LLM's GGUF file or a tokenizer.json. Default: the default model
    /// under the rsllm cache (`<cache>/models/llm/SmolLM2-135M-Instruct.Q4_1.gguf`).
    #[arg(long, env = "RSLLM_PROMPT_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// Served domains as `dataset=recommender` pairs, comma separated: the dataset gives the
    /// templates and titles, the recommender (a model name on the embedding-service) the
    /// ID-slot vectors.
    #[arg(
        long,
        env = "RSLLM_PROMPT_DOMAINS",
        value_delimiter = ',',
        default_value = "movielens=movielens-llara-sasrec"
    )]
    pub domains: Vec<String>,

    /// Datasets directory (titles). Default: `$RSLLM_DATA_DIR`, else ./data, else
    /// ../shared/data.
    #[arg(long, env = "RSLLM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Redis holding the item vectors the embedding-service publishes; empty reads over gRPC
    /// only.
    #[arg(
        long,
        env = "RSLLM_PROMPT_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// The embedding-service, asked for vectors Redis does not have.
    #[arg(
        long,
        env = "RSLLM_PROMPT_EMBEDDING_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub embedding_endpoint: String,

    /// Bound (milliseconds) on one embedding-service call (shortened to the caller's
    /// deadline when that is sooner).
    #[arg(
        long,
        env = "RSLLM_PROMPT_EMBEDDING_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub embedding_timeout_ms: u64,

    /// Bound (milliseconds) on connecting to Redis and on each Redis reply; a slower Redis is
    /// skipped for that call (the vectors come from the embedding-service instead).
    #[arg(long, env = "RSLLM_PROMPT_REDIS_TIMEOUT_MS", default_value_t = 250)]
    pub redis_timeout_ms: u64,

    /// Longest history accepted; longer is INVALID_ARGUMENT. The prompt shows the last 10.
    #[arg(long, env = "RSLLM_PROMPT_MAX_HISTORY_LEN", default_value_t = 1024)]
    pub max_history_len: usize,

    /// Most candidates in one prompt; more is INVALID_ARGUMENT.
    #[arg(long, env = "RSLLM_PROMPT_MAX_CANDIDATES", default_value_t = 100)]
    pub max_candidates: usize,

    /// Largest request message in bytes.
    #[arg(long, env = "RSLLM_PROMPT_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    pub max_request_bytes: usize,

    /// After SIGTERM, how long (seconds) in-flight calls may take before the process exits.
    #[arg(long, env = "RSLLM_PROMPT_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// Log one JSON object per line instead of human-readable text.
    #[arg(long, env = "RSLLM_PROMPT_JSON_LOGS")]
    pub json_logs: bool,
}

/// One `dataset=recommender` pair of `--domains`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub dataset: String,
    pub recommender: String,
}

impl Config {
    /// Every default, for embedding the server in tests.
    pub fn defaults() -> Config {
        use clap::Parser;
        Config::parse_from(["prompt-service"])
    }

    /// `--domains`, parsed.
    pub fn domain_specs(&self) -> Result<Vec<DomainSpec>, StartError> {
        let mut out: Vec<DomainSpec> = Vec::new();
        for pair in &self.domains {
            let Some((dataset, recommender)) = pair.split_once('=') else {
                return Err(StartError::Config(format!(
                    "--domains: {pair:?} is not dataset=recommender"
                )));
            };
            let (dataset, recommender) = (dataset.trim(), recommender.trim());
            if dataset.is_empty() || recommender.is_empty() {
                return Err(StartError::Config(format!(
                    "--domains: {pair:?} has an empty side"
                )));
            }
            if out.iter().any(|d| d.dataset == dataset) {
                return Err(StartError::Config(format!(
                    "--domains: {dataset:?} is listed twice"
                )));
            }
            out.push(DomainSpec {
                dataset: dataset.to_owned(),
                recommender: recommender.to_owned(),
            });
        }
        if out.is_empty() {
            return Err(StartError::Config("--domains is empty".into()));
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<(), StartError> {
        for (flag, value) in [
            ("--max-history-len", self.max_history_len as u64),
            ("--max-candidates", self.max_candidates as u64),
            ("--max-request-bytes", self.max_request_bytes as u64),
            ("--embedding-timeout-ms", self.embedding_timeout_ms),
            ("--redis-timeout-ms", self.redis_timeout_ms),
        ] {
            if value == 0 {
                return Err(StartError::Config(format!("{flag} must be > 0")));
            }
        }
        self.domain_specs()?;
        self.metrics_addr()?;
        Ok(())
    }

    /// `--metrics-listen`, or None when empty.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, StartError> {
        rsllm_common::metrics::parse_listen(&self.metrics_listen)
            .map_err(|e| StartError::Config(format!("--metrics-listen: {e}")))
    }

    pub fn embedding_timeout(&self) -> Duration {
        Duration::from_millis(self.embedding_timeout_ms)
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:50052");
        assert_eq!(
            c.domain_specs().unwrap(),
            vec![DomainSpec {
                dataset: "movielens".into(),
                recommender: "movielens-llara-sasrec".into()
            }]
        );
    }

    #[test]
    fn bad_domain_lists_are_rejected_with_the_pair_named() {
        for (value, needle) in [
            ("movielens", "not dataset=recommender"),
            ("movielens=", "empty side"),
            ("a=b,a=c", "listed twice"),
        ] {
            let c = Config::parse_from(["prompt-service", "--domains", value]);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{value}: {err}");
        }
        let c = Config::parse_from(["prompt-service", "--max-candidates", "0"]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-candidates")
        );
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
