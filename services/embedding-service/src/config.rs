//! Command-line flags, each with an `RSLLM_EMBEDDING_*` environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::StartError;

/// Where the recommender runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// Always the CPU.
    Cpu,
    /// CUDA device 0; fails at startup when CUDA is not available.
    Cuda,
    /// CUDA device 0 when available, else the CPU.
    Auto,
}

/// Configuration of the embedding-service. Precedence: flag, then environment variable, then
/// the default shown in `--help`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "embedding-service",
    version,
    about = "Serves the ID recommenders over gRPC (rsllm.v1.EmbeddingService) and publishes \
             their item vectors to Redis."
)]
pub struct Config {
    /// Address to serve gRPC on (host:port; port 0 picks a free port, logged at startup).
    #[arg(
        long,
        env = "RSLLM_EMBEDDING_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Address of the Prometheus endpoint (`GET /metrics`); empty disables it.
    #[arg(
        long,
        env = "RSLLM_EMBEDDING_METRICS_LISTEN",
        default_value = "127.0.0.1:9101"
    )]
    pub metrics_listen: String,

    /// Directory with one artefact directory per model (`<name>/manifest.json` and the
    /// weights file it names). Default: `$RSLLM_CACHE_DIR/models/rec`, else
    /// `$HOME/.cache/rsllm/models/rec` (where `rsllm rec train` writes).
    #[arg(long, env = "RSLLM_EMBEDDING_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,

    /// Models to load, by artefact name, comma separated (e.g.
    /// `movielens-llara-sasrec,steam-llara-sasrec`). Default: every artefact in the models
    /// directory.
    #[arg(long, env = "RSLLM_EMBEDDING_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,

    /// Redis that holds the fleet's copy of the item vectors. Empty disables publishing.
    /// Redis is a cache: the service answers from memory whether or not it is reachable.
    #[arg(
        long,
        env = "RSLLM_EMBEDDING_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// How often (milliseconds) to check that each model's vectors are still in Redis, and
    /// to republish them when they are not (Redis restarted, flushed, or evicted them) or
    /// when Redis comes back after being down.
    #[arg(long, env = "RSLLM_EMBEDDING_REDIS_CHECK_MS", default_value_t = 1000)]
    pub redis_check_ms: u64,

    /// Bound (milliseconds) on connecting to Redis and on one Redis command or publish
    /// pipeline.
    #[arg(long, env = "RSLLM_EMBEDDING_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,

    /// Most ids in one request: `item_ids` of GetItemEmbeddings, `candidates` of
    /// ScoreCandidates. More is INVALID_ARGUMENT.
    #[arg(long, env = "RSLLM_EMBEDDING_MAX_IDS", default_value_t = 4096)]
    pub max_ids_per_request: usize,

    /// Longest history accepted. Histories longer than a model's window but within this
    /// limit are cut to their last `max_history` items (the model's window); longer than this
    /// is INVALID_ARGUMENT.
    #[arg(long, env = "RSLLM_EMBEDDING_MAX_HISTORY_LEN", default_value_t = 1024)]
    pub max_history_len: usize,

    /// Scoring calls (ScoreCandidates, TopK) waiting for or using one model before further
    /// calls get RESOURCE_EXHAUSTED.
    #[arg(long, env = "RSLLM_EMBEDDING_MAX_PENDING_SCORES", default_value_t = 64)]
    pub max_pending_scores: usize,

    /// Largest request message in bytes; larger ones are rejected by the transport
    /// (OUT_OF_RANGE / RESOURCE_EXHAUSTED, depending on the client).
    #[arg(long, env = "RSLLM_EMBEDDING_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Device for scoring: cpu, cuda or auto.
    #[arg(long, env = "RSLLM_EMBEDDING_DEVICE", value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,

    /// After SIGTERM, how long (seconds) in-flight calls may take to finish before the
    /// process exits anyway.
    #[arg(long, env = "RSLLM_EMBEDDING_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// Tokio worker threads for the gRPC server (0: one per CPU core). Scoring runs on
    /// separate blocking threads.
    #[arg(long, env = "RSLLM_EMBEDDING_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Log one JSON object per line instead of human-readable text.
    #[arg(long, env = "RSLLM_EMBEDDING_JSON_LOGS")]
    pub json_logs: bool,

    /// Test hook: every RPC waits this many milliseconds before answering (used to test
    /// draining). Never set in production.
    #[arg(
        long,
        env = "RSLLM_EMBEDDING_TEST_DELAY_MS",
        default_value_t = 0,
        hide = true
    )]
    pub test_delay_ms: u64,
}

impl Config {
    /// A configuration with every default, for embedding the server in tests and benchmarks.
    pub fn with_models_dir(models_dir: impl Into<PathBuf>) -> Config {
        use clap::Parser;
        let mut config = Config::parse_from(["embedding-service"]);
        config.models_dir = Some(models_dir.into());
        // Embedded servers (tests, benchmarks) run side by side: no fixed metrics port.
        config.metrics_listen.clear();
        config
    }

    /// Cross-field and range checks, run right after parsing.
    pub fn validate(&self) -> Result<(), StartError> {
        let positive = [
            ("--max-ids-per-request", self.max_ids_per_request as u64),
            ("--max-history-len", self.max_history_len as u64),
            ("--max-pending-scores", self.max_pending_scores as u64),
            ("--max-request-bytes", self.max_request_bytes as u64),
            ("--redis-check-ms", self.redis_check_ms),
            ("--redis-timeout-ms", self.redis_timeout_ms),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(StartError::Config(format!("{flag} must be > 0")));
            }
        }
        self.metrics_addr()?;
        if let Some(bad) = self.models.iter().find(|m| m.is_empty() || m.contains('/')) {
            return Err(StartError::Config(format!(
                "--models: {bad:?} is not an artefact directory name"
            )));
        }
        Ok(())
    }

    /// `--metrics-listen`, or None when empty.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, StartError> {
        rsllm_common::metrics::parse_listen(&self.metrics_listen)
            .map_err(|e| StartError::Config(format!("--metrics-listen: {e}")))
    }

    /// `--models-dir`, or the default under the rsllm cache directory.
    pub fn resolved_models_dir(&self) -> PathBuf {
        self.models_dir.clone().unwrap_or_else(default_models_dir)
    }

    pub fn redis_check_interval(&self) -> Duration {
        Duration::from_millis(self.redis_check_ms)
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// The tch device for `--device`.
    pub fn tch_device(&self) -> Result<tch::Device, StartError> {
        match self.device {
            DeviceArg::Cpu => Ok(tch::Device::Cpu),
            DeviceArg::Auto => Ok(tch::Device::cuda_if_available()),
            DeviceArg::Cuda => {
                if tch::Cuda::is_available() {
                    Ok(tch::Device::Cuda(0))
                } else {
                    Err(StartError::Config(
                        "--device cuda: CUDA is not available on this machine".to_owned(),
                    ))
                }
            }
        }
    }
}

/// `<cache>/models/rec`, the cache being `$RSLLM_CACHE_DIR` or `$HOME/.cache/rsllm` (the rule
/// of `rsllm_core::Paths`; resolved here without `Paths::from_env`, which also insists on a
/// data directory the service does not need).
pub fn default_models_dir() -> PathBuf {
    // Neither variable set: relative to the working directory, as before.
    let cache_dir = rsllm_core::paths::cache_dir_from_env()
        .unwrap_or_else(|| PathBuf::from(".cache").join("rsllm"));
    rsllm_core::Paths::new(PathBuf::new(), cache_dir)
        .models_dir()
        .join("rec")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::parse_from(["embedding-service"]);
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(c.max_ids_per_request, 4096);
        assert_eq!(c.max_history_len, 1024);
        assert_eq!(c.device, DeviceArg::Cpu);
        assert!(c.models.is_empty());
    }

    #[test]
    fn flags_parse_and_zero_limits_are_rejected() {
        let c = Config::parse_from([
            "embedding-service",
            "--models",
            "a,b",
            "--redis-url",
            "",
            "--max-ids-per-request",
            "0",
        ]);
        assert_eq!(c.models, vec!["a", "b"]);
        assert!(c.redis_url.is_empty());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--max-ids-per-request"), "{err}");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
