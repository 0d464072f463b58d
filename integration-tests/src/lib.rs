//! Helpers for the end-to-end tests in `tests/`: real `redis-server` processes and service
//! processes on loopback ports, a tiny recommender artefact, and bounded polling.
//!
//! Nothing here sleeps to wait for something: [`wait_until`] polls a condition until a
//! deadline and fails with a message naming what it waited for.
//!
//! `redis-server` must be on `PATH` (`apt-get install redis-server`; CI installs it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rsllm_recommender::{ModelKind, RecConfig, RecManifest, RecModel};

/// Name of the test model's artefact directory.
pub const TEST_MODEL: &str = "tiny-llara-sasrec";
/// Items in the test model.
pub const TEST_ITEMS: usize = 50;
/// Vector width of the test model.
pub const TEST_DIM: usize = 64;
/// History window of the test model.
pub const TEST_WINDOW: usize = 10;

/// A port that was free a moment ago on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `timeout` with `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes an untrained SASRec artefact (seeded random weights: serving is under test, not
/// quality) to `models_dir/TEST_MODEL`: 50 items, dim 64, window 10.
pub fn make_test_model(models_dir: &Path) -> RecManifest {
    make_rec_model(models_dir, TEST_MODEL, "tiny", TEST_ITEMS)
}

/// Writes an untrained, seeded SASRec (dim 64, window 10) with `items` items as
/// `models_dir/name`.
pub fn make_rec_model(models_dir: &Path, name: &str, dataset: &str, items: usize) -> RecManifest {
    let mut config = RecConfig::default_for(ModelKind::Sasrec);
    config.dim = TEST_DIM;
    config.max_history = TEST_WINDOW;
    config.seed = 7;
    let mut model =
        RecModel::new_untrained(ModelKind::Sasrec, config, dataset, items, tch::Device::Cpu)
            .expect("untrained model");
    model.save(&models_dir.join(name)).expect("save test model")
}

/// Lines a child process printed (stdout and stderr), shared with reader threads.
#[derive(Debug, Clone, Default)]
pub struct LogLines(Arc<Mutex<Vec<String>>>);

impl LogLines {
    /// Copies `stream`'s lines in a thread that ends at end of file (when the process exits).
    fn capture(
        &self,
        stream: impl Read + Send + 'static,
        prefix: &'static str,
    ) -> std::thread::JoinHandle<()> {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{prefix}] {line}");
                lines.lock().unwrap().push(line);
            }
        })
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The address right after `marker` in the first line holding it.
    fn find_addr(&self, marker: &str) -> Option<SocketAddr> {
        let lines = self.0.lock().unwrap();
        lines.iter().find_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '/')
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
    }

    /// Everything so far, for failure messages.
    pub fn dump(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// A `redis-server` on 127.0.0.1 with no persistence, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING. A port taken between
    /// picking it and redis binding it (another test, an outgoing connection) makes redis exit
    /// at start: then another port is tried.
    pub fn start() -> RedisServer {
        let mut last = String::new();
        for _ in 0..5 {
            let mut server = RedisServer::new(free_port());
            match server.try_spawn() {
                Ok(()) => return server,
                Err(why) => last = why,
            }
        }
        panic!("{last} (five ports tried)")
    }

    /// Starts one on `port` and waits until it answers PING.
    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer::new(port);
        server.spawn();
        server
    }

    fn new(port: u16) -> RedisServer {
        RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        }
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("{why}");
        }
    }

    /// Starts redis-server on `self.port`; Err when it exits at start (the port is taken).
    fn try_spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed: run `apt-get install redis-server` (CI installs \
                 it); these tests start a real Redis on a loopback port"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Ours exiting is checked first: once it has (its port was taken), a PONG from the
            // server that holds the port does not pass for ours.
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                ));
            }
            if self.ping() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} never answered",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True when something on the port answers `PING` with `+PONG`.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_millis(200),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the server (no shutdown, data gone) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh (empty) server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A plain async connection for assertions.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A service process on a loopback port, its output captured; killed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub logs: LogLines,
    /// The threads filling `logs`; `wait_exit` lets them finish so no last line is missed.
    log_readers: Vec<std::thread::JoinHandle<()>>,
}

impl ServiceProcess {
    /// Starts `bin --listen 127.0.0.1:0 <args>` with extra environment `env`, and reads the
    /// port the service bound from its `listening on ADDR` line. Port 0 lets the kernel pick:
    /// a port picked here and bound there later could be taken in between (by another test's
    /// service, or by an outgoing connection's ephemeral port). When the process exits
    /// without listening (a startup failure a test expects), `addr` is 127.0.0.1:0.
    pub fn start(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> ServiceProcess {
        let mut cmd = Command::new(bin);
        cmd.arg("--listen").arg("127.0.0.1:0").args(args);
        // Keep the caller's environment from leaking service settings into the test.
        cmd.env("RUST_LOG", "info");
        // Services run side by side: metrics on a free port unless a flag names one.
        for service in ["EMBEDDING", "PROMPT", "LLM"] {
            cmd.env(format!("RSLLM_{service}_METRICS_LISTEN"), "127.0.0.1:0");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let logs = LogLines::default();
        let log_readers = vec![
            logs.capture(child.stdout.take().unwrap(), "service"),
            logs.capture(child.stderr.take().unwrap(), "service"),
        ];
        let mut service = ServiceProcess {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
            log_readers,
        };
        // The line comes right after the bind, before any model is loaded.
        if let Some(addr) = service.logged_addr("listening on ") {
            service.addr = addr;
        }
        service
    }

    /// Waits (bounded, blocking: the line is due within milliseconds) for the first log line
    /// holding `marker` followed by an address, and returns that address; None when the
    /// process exited without printing one.
    fn logged_addr(&mut self, marker: &str) -> Option<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(addr) = self.logs.find_addr(marker) {
                return Some(addr);
            }
            if self.try_exit_status().is_some() {
                // Its last lines may still be in the pipe.
                std::thread::sleep(Duration::from_millis(100));
                return self.logs.find_addr(marker);
            }
            assert!(
                Instant::now() < deadline,
                "no {marker:?} line after 60 s:\n{}",
                self.logs.dump()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Where the service serves `/metrics` (every service gets `127.0.0.1:0` unless a flag
    /// names a port), read from its `metrics on http://ADDR/metrics` line.
    pub fn metrics_addr(&mut self) -> SocketAddr {
        self.logged_addr("metrics on http://")
            .unwrap_or_else(|| panic!("no metrics endpoint:\n{}", self.logs.dump()))
    }

    /// `http://ADDR`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel to the service (connects lazily). A stopped service refuses the connection
    /// at once; the timeout is generous because on a loaded 2-core machine the test's own
    /// runtime can be starved long enough for a 1 s connect timeout to fire on a healthy
    /// service (a 200-call burst beside a training job saw "tcp connect error ... Elapsed").
    pub fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect_timeout(Duration::from_secs(15))
            .connect_lazy()
    }

    /// Waits until `grpc.health.v1` says SERVING for the whole server.
    pub async fn wait_serving(&mut self, timeout: Duration) {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let channel = self.channel();
        let deadline = Instant::now() + timeout;
        loop {
            let mut client = HealthClient::new(channel.clone());
            let status = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()
                .map(|r| r.into_inner().status);
            if status == Some(ServingStatus::Serving as i32) {
                return;
            }
            if let Some(exit) = self.try_exit_status() {
                panic!(
                    "service exited ({exit}) before serving:\n{}",
                    self.logs.dump()
                );
            }
            assert!(
                Instant::now() < deadline,
                "service not SERVING after {timeout:?} (last: {status:?}):\n{}",
                self.logs.dump()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM (through `kill`, the crate forbids unsafe code).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits (bounded) for the process to exit and its output to be read to the end, and
    /// returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit_status() {
                self.child = None;
                // The pipes close with the process; the readers may still hold its last lines.
                while self.log_readers.iter().any(|r| !r.is_finished()) {
                    assert!(
                        Instant::now() < deadline,
                        "service exited but its output is still open {timeout:?} later"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "service still running {timeout:?} later:\n{}",
                self.logs.dump()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A temporary models directory holding the test model.
#[derive(Debug)]
pub struct ModelsDir {
    pub dir: tempfile::TempDir,
    pub manifest: RecManifest,
}

impl ModelsDir {
    pub fn with_test_model() -> ModelsDir {
        let dir = tempfile::tempdir().unwrap();
        let manifest = make_test_model(dir.path());
        ModelsDir { dir, manifest }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn path_str(&self) -> String {
        self.dir
            .path()
            .to_str()
            .expect("utf-8 temp path")
            .to_owned()
    }
}

/// The datasets: `$RSLLM_DATA_DIR`, else `../shared/data` beside the checkout.
pub fn data_dir() -> PathBuf {
    std::env::var_os("RSLLM_DATA_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

/// The default LLM (scripts/setup.sh puts it in the cache).
pub fn llm_model_path() -> PathBuf {
    let path = rsllm_llm::default_model_path().expect("HOME or RSLLM_CACHE_DIR is set");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh (these tests use the real model)",
        path.display()
    );
    path
}

/// `GET /metrics` of a service, as text.
pub fn scrape(addr: SocketAddr) -> String {
    // Bounds that only catch hangs: the service may be saturated by the test's own burst.
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("connect /metrics");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read /metrics");
    out
}

/// The value of the first sample line of `/metrics` text that starts with `series` (a name
/// with its labels, as rendered); 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The service binaries a [`Fleet`] runs (the tests pass cargo's `CARGO_BIN_EXE_*` paths;
/// `RSLLM_IT_*_SERVICE_BIN` overrides each).
#[derive(Debug, Clone)]
pub struct FleetBins {
    pub embedding: PathBuf,
    pub prompt: PathBuf,
    pub llm: PathBuf,
}

impl FleetBins {
    pub fn new(embedding: &str, prompt: &str, llm: &str) -> FleetBins {
        let pick = |var: &str, built: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(built))
        };
        FleetBins {
            embedding: pick("RSLLM_IT_EMBEDDING_SERVICE_BIN", embedding),
            prompt: pick("RSLLM_IT_PROMPT_SERVICE_BIN", prompt),
            llm: pick("RSLLM_IT_LLM_SERVICE_BIN", llm),
        }
    }
}

/// The three services on loopback over one Redis, serving MovieLens and LastFM with untrained
/// SASRecs of their sizes (`movielens-llara-sasrec`, 1682 items; `lastfm-llara-sasrec`, 4606;
/// in a temporary models directory that is also the llm-service's cache, so training jobs
/// find them) and the real default LLM. The llm-service's adapters are its default
/// (`movielens=zero-shot`) unless `llm_args` give `--adapters`.
#[derive(Debug)]
pub struct Fleet {
    pub redis: RedisServer,
    pub embedding: ServiceProcess,
    pub prompt: ServiceProcess,
    pub llm: ServiceProcess,
    pub embedding_metrics: SocketAddr,
    pub prompt_metrics: SocketAddr,
    pub llm_metrics: SocketAddr,
    pub cache: tempfile::TempDir,
}

impl Fleet {
    /// Starts everything and waits until all three are SERVING. `llm_args` go to the
    /// llm-service after the fleet's own flags.
    pub async fn start(bins: &FleetBins, llm_args: &[&str]) -> Fleet {
        Fleet::start_with_env(bins, llm_args, &[]).await
    }

    /// [`Fleet::start`] with extra environment for all three services (e.g. `OTEL_*`).
    pub async fn start_with_env(
        bins: &FleetBins,
        llm_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Fleet {
        let redis = RedisServer::start();
        let cache = tempfile::tempdir().unwrap();
        let rec_dir = cache.path().join("models/rec");
        std::fs::create_dir_all(&rec_dir).unwrap();
        make_rec_model(&rec_dir, "movielens-llara-sasrec", "movielens", 1682);
        make_rec_model(&rec_dir, "lastfm-llara-sasrec", "lastfm", 4606);
        let data = data_dir();
        let data = data.to_str().unwrap().to_owned();
        let cache_str = cache.path().to_str().unwrap().to_owned();
        let model = llm_model_path();
        let model = model.to_str().unwrap().to_owned();
        let mut env = vec![
            ("RSLLM_DATA_DIR", data.as_str()),
            ("RSLLM_CACHE_DIR", cache_str.as_str()),
        ];
        env.extend_from_slice(extra_env);
        let redis_url = redis.url();
        let rec_dir = rec_dir.to_str().unwrap().to_owned();
        let mut embedding = ServiceProcess::start(
            &bins.embedding,
            &["--models-dir", &rec_dir, "--redis-url", &redis_url],
            &env,
        );
        let mut prompt = ServiceProcess::start(
            &bins.prompt,
            &[
                "--redis-url",
                &redis_url,
                "--embedding-endpoint",
                &embedding.endpoint(),
                "--tokenizer",
                &model,
                "--domains",
                "movielens=movielens-llara-sasrec,lastfm=lastfm-llara-sasrec",
                // Calls between services get a bound that only catches hangs: a stopped
                // dependency still fails at once (connection refused), and a slow one on a
                // loaded test machine must not fail a call the test expects to succeed.
                "--embedding-timeout-ms",
                "60000",
                "--redis-timeout-ms",
                "10000",
            ],
            &env,
        );
        let (emb_ep, prompt_ep) = (embedding.endpoint(), prompt.endpoint());
        let mut args = vec![
            "--redis-url",
            &redis_url,
            "--embedding-endpoint",
            &emb_ep,
            "--prompt-endpoint",
            &prompt_ep,
            "--model",
            &model,
            "--dependency-timeout-ms",
            "60000",
        ];
        args.extend_from_slice(llm_args);
        let mut llm = ServiceProcess::start(&bins.llm, &args, &env);
        let start = Duration::from_secs(120);
        embedding.wait_serving(start).await;
        prompt.wait_serving(start).await;
        llm.wait_serving(start).await;
        let (embedding_metrics, prompt_metrics, llm_metrics) = (
            embedding.metrics_addr(),
            prompt.metrics_addr(),
            llm.metrics_addr(),
        );
        Fleet {
            redis,
            embedding,
            prompt,
            llm,
            embedding_metrics,
            prompt_metrics,
            llm_metrics,
            cache,
        }
    }
}
