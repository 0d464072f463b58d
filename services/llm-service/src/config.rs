//! Command-line flags, each with an `RSLLM_LLM_*` environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::AdapterSource;
use crate::error::StartError;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    /// CUDA device 0 when available, else the CPU.
    Auto,
}

/// Configuration of the llm-service. Precedence: flag, then environment variable, then the
/// default shown in `--help`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "llm-service",
    version,
    about = "Serves RSLLM over gRPC (rsllm.v1.LlmService): Recommend, Score and training jobs."
)]
pub struct Config {
    /// Address to serve gRPC on (host:port; port 0 picks a free port, logged at startup).
    #[arg(long, env = "RSLLM_LLM_LISTEN", default_value = "127.0.0.1:50053")]
    pub listen: SocketAddr,

    /// Address of the Prometheus endpoint (`GET /metrics`); empty disables it.
    #[arg(
        long,
        env = "RSLLM_LLM_METRICS_LISTEN",
        default_value = "127.0.0.1:9103"
    )]
    pub metrics_listen: String,

    /// Base model: a GGUF file or a Hugging Face directory. Default: the default model under
    /// the rsllm cache (`<cache>/models/llm/SmolLM2-135M-Instruct.Q4_1.gguf`).
    #[arg(long, env = "RSLLM_LLM_MODEL")]
    pub model: Option<PathBuf>,

    /// Adapters as `domain=SOURCE` pairs, comma separated. SOURCE is a stage directory written
    /// by `rsllm train` (its latest checkpoint is served) or `zero-shot` (the base model with
    /// text-only prompts). The last adapter given for a domain is its serving one.
    #[arg(
        long,
        env = "RSLLM_LLM_ADAPTERS",
        value_delimiter = ',',
        default_value = "movielens=zero-shot"
    )]
    pub adapters: Vec<String>,

    /// Device: cpu, cuda or auto.
    #[arg(long, env = "RSLLM_LLM_DEVICE", value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,

    /// Compute dtype: f32 or bf16. bf16 pays on GPUs and on CPUs with bf16 matrix units (AMX:
    /// twice the Recommend throughput, docs/results.md); on CPUs without them it is slower.
    #[arg(long, env = "RSLLM_LLM_DTYPE", default_value = "f32")]
    pub dtype: rsllm_llm::Dtype,

    /// The prompt-service.
    #[arg(
        long,
        env = "RSLLM_LLM_PROMPT_ENDPOINT",
        default_value = "http://127.0.0.1:50052"
    )]
    pub prompt_endpoint: String,

    /// The embedding-service (candidate retrieval when a request gives none).
    #[arg(
        long,
        env = "RSLLM_LLM_EMBEDDING_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub embedding_endpoint: String,

    /// Redis for the projected ID vectors (keyed by adapter version); empty disables it.
    #[arg(
        long,
        env = "RSLLM_LLM_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Bound (milliseconds) on each call to a dependency, shortened to the caller's deadline.
    #[arg(long, env = "RSLLM_LLM_DEPENDENCY_TIMEOUT_MS", default_value_t = 5000)]
    pub dependency_timeout_ms: u64,

    /// Most requests batched into one forward; 1 turns dynamic batching off.
    #[arg(long, env = "RSLLM_LLM_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,

    /// How long (milliseconds) the first request of a batch waits for others.
    #[arg(long, env = "RSLLM_LLM_MAX_WAIT_MS", default_value_t = 5)]
    pub max_wait_ms: u64,

    /// Requests waiting for the model; beyond it, RESOURCE_EXHAUSTED with retry-after-ms.
    #[arg(long, env = "RSLLM_LLM_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,

    /// Most candidates per request (given or retrieved).
    #[arg(long, env = "RSLLM_LLM_MAX_CANDIDATES", default_value_t = 100)]
    pub max_candidates: usize,

    /// Longest history accepted; longer is INVALID_ARGUMENT.
    #[arg(long, env = "RSLLM_LLM_MAX_HISTORY_LEN", default_value_t = 1024)]
    pub max_history_len: usize,

    /// Generation cap in tokens (generative mode).
    #[arg(long, env = "RSLLM_LLM_MAX_NEW_TOKENS", default_value_t = 64)]
    pub max_new_tokens: usize,

    /// Largest request message in bytes.
    #[arg(long, env = "RSLLM_LLM_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Where training jobs write their stage directories. Default `<cache>/jobs`.
    #[arg(long, env = "RSLLM_LLM_JOBS_DIR")]
    pub jobs_dir: Option<PathBuf>,

    /// After SIGTERM, how long (seconds) in-flight calls may take before the process exits.
    #[arg(long, env = "RSLLM_LLM_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// Log one JSON object per line instead of human-readable text.
    #[arg(long, env = "RSLLM_LLM_JSON_LOGS")]
    pub json_logs: bool,

    /// Test hook: the model thread waits this many milliseconds before each batch (used to
    /// fill the queue deterministically in overload tests). Never set in production.
    #[arg(
        long,
        env = "RSLLM_LLM_TEST_DELAY_MS",
        default_value_t = 0,
        hide = true
    )]
    pub test_delay_ms: u64,
}

impl Config {
    /// Every default, for embedding the server in tests.
    pub fn defaults() -> Config {
        use clap::Parser;
        Config::parse_from(["llm-service"])
    }

    pub fn validate(&self) -> Result<(), StartError> {
        for (flag, value) in [
            ("--max-batch", self.max_batch as u64),
            ("--queue-capacity", self.queue_capacity as u64),
            ("--max-candidates", self.max_candidates as u64),
            ("--max-history-len", self.max_history_len as u64),
            ("--max-new-tokens", self.max_new_tokens as u64),
            ("--max-request-bytes", self.max_request_bytes as u64),
            ("--dependency-timeout-ms", self.dependency_timeout_ms),
        ] {
            if value == 0 {
                return Err(StartError::Config(format!("{flag} must be > 0")));
            }
        }
        self.adapter_sources()?;
        rsllm_common::metrics::parse_listen(&self.metrics_listen)
            .map_err(|e| StartError::Config(format!("--metrics-listen: {e}")))?;
        Ok(())
    }

    /// `--adapters`, parsed.
    pub fn adapter_sources(&self) -> Result<Vec<(String, AdapterSource)>, StartError> {
        let mut out = Vec::new();
        for pair in &self.adapters {
            let Some((domain, source)) = pair.split_once('=') else {
                return Err(StartError::Config(format!(
                    "--adapters: {pair:?} is not domain=SOURCE"
                )));
            };
            let (domain, source) = (domain.trim(), source.trim());
            if domain.is_empty() || source.is_empty() {
                return Err(StartError::Config(format!(
                    "--adapters: {pair:?} has an empty side"
                )));
            }
            let source = if source == "zero-shot" {
                AdapterSource::ZeroShot
            } else {
                AdapterSource::StageDir(PathBuf::from(source))
            };
            out.push((domain.to_owned(), source));
        }
        Ok(out)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        rsllm_common::metrics::parse_listen(&self.metrics_listen)
            .ok()
            .flatten()
    }

    pub fn tch_device(&self) -> Result<tch::Device, StartError> {
        match self.device {
            DeviceArg::Cpu => Ok(tch::Device::Cpu),
            DeviceArg::Auto => Ok(tch::Device::cuda_if_available()),
            DeviceArg::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
            DeviceArg::Cuda => Err(StartError::Config(
                "--device cuda: CUDA is not available on this machine".into(),
            )),
        }
    }

    pub fn dependency_timeout(&self) -> Duration {
        Duration::from_millis(self.dependency_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    pub fn resolved_jobs_dir(&self) -> PathBuf {
        self.jobs_dir.clone().unwrap_or_else(|| {
            rsllm_core::paths::cache_dir_from_env()
                .unwrap_or_else(|| PathBuf::from(".cache/rsllm"))
                .join("jobs")
        })
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
        assert_eq!(c.listen.to_string(), "127.0.0.1:50053");
        assert_eq!(
            c.adapter_sources().unwrap(),
            vec![("movielens".to_owned(), AdapterSource::ZeroShot)]
        );
        assert_eq!((c.max_batch, c.max_wait_ms, c.queue_capacity), (8, 5, 64));
    }

    #[test]
    fn bad_flags_are_named() {
        let c = Config::parse_from(["llm-service", "--adapters", "movielens"]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("domain=SOURCE")
        );
        let c = Config::parse_from(["llm-service", "--max-batch", "0"]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-batch")
        );
        let c = Config::parse_from(["llm-service", "--adapters", "movielens=runs/x/stage2"]);
        assert_eq!(
            c.adapter_sources().unwrap()[0].1,
            AdapterSource::StageDir("runs/x/stage2".into())
        );
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }
}
