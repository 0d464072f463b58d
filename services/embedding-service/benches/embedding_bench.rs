//! Latency and throughput of the two ways to get item vectors: `GetItemEmbeddings` over
//! loopback gRPC, and `rsllm_itemvec::Reader` (one Redis round trip: GET of the version
//! pointer pipelined with an MGET of the item keys).
//!
//! Self-contained: starts `redis-server` on a free loopback port and the release
//! `embedding-service` binary (cargo builds it for benches) on an untrained MovieLens-sized
//! SASRec (1682 items, dim 64) in a temp dir, waits until the vectors are published, then
//! runs each path at each concurrency for `--secs` seconds after a warm-up.
//!
//! ```text
//! cargo bench -p rsllm-embedding-service --bench embedding_bench -- [--secs 5] [--ids 30]
//!     [--concurrency 1,32] [--paths grpc,redis] [--shared-connection] [--json-out FILE]
//! ```
//! A "client" is one task issuing calls back to back. By default each client has its own
//! connection (its own gRPC channel, or its own Reader with its own Redis connection);
//! `--shared-connection` gives all clients one channel / one Reader, as inside one process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rsllm_itemvec::{Reader, ReaderConfig, Source};
use rsllm_proto::v1::GetItemEmbeddingsRequest;
use rsllm_proto::v1::embedding_service_client::EmbeddingServiceClient;
use rsllm_recommender::{ModelKind, RecConfig, RecModel};
use tonic::transport::{Channel, Endpoint};

const MODEL: &str = "bench-llara-sasrec";
const ITEMS: usize = 1682;

#[derive(Debug, Clone)]
struct Args {
    secs: f64,
    ids: usize,
    concurrency: Vec<usize>,
    shared: bool,
    paths: Vec<String>,
    current_thread: bool,
    service_args: Vec<String>,
    warmup: Duration,
    json_out: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        secs: 5.0,
        ids: 30,
        concurrency: vec![1, 32],
        shared: false,
        paths: vec!["grpc".into(), "redis".into()],
        current_thread: false,
        service_args: Vec::new(),
        warmup: Duration::from_millis(700),
        json_out: None,
    };
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it:
    // then do a short smoke run unless --secs is given.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if !argv.iter().any(|a| a == "--bench" || a == "--secs") {
        args.secs = 0.2;
        args.warmup = Duration::from_millis(100);
    }
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => args.secs = it.next().unwrap().parse().unwrap(),
            "--ids" => args.ids = it.next().unwrap().parse().unwrap(),
            "--concurrency" => {
                args.concurrency = it
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|c| c.parse().unwrap())
                    .collect();
            }
            "--shared-connection" => args.shared = true,
            "--paths" => args.paths = it.next().unwrap().split(',').map(str::to_owned).collect(),
            "--json-out" => args.json_out = it.next(),
            "--current-thread" => args.current_thread = true,
            "--service-arg" => args.service_args.push(it.next().unwrap()),
            // `--bench` (from cargo bench) and anything unknown (a filter) are ignored.
            _ => {}
        }
    }
    args
}

/// CPU time (user + system, all threads) of a process so far, from /proc (Linux; 0 elsewhere).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" that closes the command name; utime and stime are fields 14, 15.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Busy CPU seconds of the whole machine so far (all cores), from /proc/stat.
fn machine_busy_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / 100.0
}

/// The processes whose CPU time is attributed to each request.
#[derive(Debug, Clone)]
struct Pids {
    client: String,
    service: String,
    redis: String,
}

impl Pids {
    fn snapshot(&self) -> [f64; 3] {
        [
            cpu_secs(&self.client),
            cpu_secs(&self.service),
            cpu_secs(&self.redis),
        ]
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deterministic pseudo-random ids (xorshift), different for every call.
struct Ids(u64);
impl Ids {
    fn next(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % ITEMS as u64) as u32
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    path: &'static str,
    concurrency: usize,
    requests: usize,
    errors: usize,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// CPU µs per request spent in the client, the service and redis-server.
    cpu_us: [f64; 3],
    /// CPU used by other processes during the run, in % of one core (interference).
    other_cpu_pct: f64,
}

impl Outcome {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    fn meets_target(&self) -> bool {
        self.errors == 0 && self.p99_us <= 2000.0 && self.rps() >= 10_000.0
    }
    fn json(&self) -> String {
        format!(
            "{{\"path\":\"{}\",\"concurrency\":{},\"requests\":{},\"errors\":{},\"secs\":{:.3},\
             \"rps\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\
             \"cpu_us_per_request\":{{\"client\":{:.1},\"service\":{:.1},\"redis\":{:.1}}},\
             \"other_cpu_pct\":{:.0},\"target_met\":{}}}",
            self.path,
            self.concurrency,
            self.requests,
            self.errors,
            self.secs,
            self.rps(),
            self.p50_us,
            self.p99_us,
            self.max_us,
            self.cpu_us[0],
            self.cpu_us[1],
            self.cpu_us[2],
            self.other_cpu_pct,
            self.meets_target()
        )
    }
}

#[derive(Clone)]
enum Client {
    Grpc(EmbeddingServiceClient<Channel>),
    Redis(Reader),
}

impl Client {
    /// One call; Ok(true) when it was answered as this path should answer it.
    async fn call(&mut self, ids: Vec<u32>) -> bool {
        match self {
            Client::Grpc(c) => c
                .get_item_embeddings(GetItemEmbeddingsRequest {
                    model: MODEL.into(),
                    item_ids: ids,
                })
                .await
                .is_ok_and(|r| !r.get_ref().values.is_empty()),
            Client::Redis(r) => r
                .get(MODEL, &ids)
                .await
                .is_ok_and(|v| v.source == Source::Redis),
        }
    }
}

async fn run_clients(
    clients: Vec<Client>,
    ids: usize,
    duration: Duration,
) -> (Vec<u64>, usize, f64) {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                let mut id_gen = Ids(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0usize;
                while Instant::now() < deadline {
                    let batch = id_gen.next(ids);
                    let t0 = Instant::now();
                    let ok = client.call(batch).await;
                    lat.push(t0.elapsed().as_nanos() as u64);
                    if !ok {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    (all, errors, started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

async fn measure(
    path: &'static str,
    concurrency: usize,
    make: &dyn Fn() -> Client,
    args: &Args,
    pids: &Pids,
) -> Outcome {
    let clients: Vec<Client> = if args.shared {
        let one = make();
        (0..concurrency).map(|_| one.clone()).collect()
    } else {
        (0..concurrency).map(|_| make()).collect()
    };
    // Warm-up: connections, caches, allocator.
    let _ = run_clients(clients.clone(), args.ids, args.warmup).await;
    let cpu_before = pids.snapshot();
    let busy_before = machine_busy_secs();
    let (mut lat, errors, secs) =
        run_clients(clients, args.ids, Duration::from_secs_f64(args.secs)).await;
    let cpu_after = pids.snapshot();
    let ours: f64 = (0..3).map(|i| cpu_after[i] - cpu_before[i]).sum();
    let other_cpu_pct = ((machine_busy_secs() - busy_before - ours) / secs * 100.0).max(0.0);
    let per_request = |i: usize| (cpu_after[i] - cpu_before[i]) * 1e6 / lat.len().max(1) as f64;
    let cpu_us = [per_request(0), per_request(1), per_request(2)];
    lat.sort_unstable();
    Outcome {
        path,
        concurrency,
        requests: lat.len(),
        errors,
        secs,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        max_us: lat.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
        cpu_us,
        other_cpu_pct,
    }
}

fn make_model(dir: &Path) -> String {
    let mut config = RecConfig::default_for(ModelKind::Sasrec);
    config.dim = 64;
    let mut model = RecModel::new_untrained(
        ModelKind::Sasrec,
        config,
        "movielens",
        ITEMS,
        tch::Device::Cpu,
    )
    .unwrap();
    model.save(&dir.join(MODEL)).unwrap().version
}

fn start_redis(port: u16, dir: &Path) -> Killed {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    Killed(child)
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

fn main() {
    let args = parse_args();
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    runtime.block_on(bench(args));
}

async fn bench(args: Args) {
    let tmp = tempfile::tempdir().unwrap();
    let models_dir = tmp.path().join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    let version = make_model(&models_dir);
    let redis_port = free_port();
    let redis = start_redis(redis_port, tmp.path());
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let service = Killed(
        Command::new(env!("CARGO_BIN_EXE_embedding-service"))
            .args(["--listen", &addr.to_string(), "--redis-url", &redis_url])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(&args.service_args)
            .arg("--models-dir")
            .arg(&models_dir)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start embedding-service"),
    );
    let endpoint = format!("http://{addr}");
    let channel = || {
        Endpoint::from_shared(endpoint.clone())
            .unwrap()
            .tcp_nodelay(true)
            .connect_lazy()
    };
    let probe = EmbeddingServiceClient::new(channel());
    wait_for("the service", || {
        let mut c = probe.clone();
        async move {
            c.get_item_embeddings(GetItemEmbeddingsRequest {
                model: MODEL.into(),
                item_ids: vec![0],
            })
            .await
            .is_ok()
        }
    })
    .await;
    let reader_config = ReaderConfig::new(&redis_url, endpoint.clone());
    let check = Reader::new(reader_config.clone()).unwrap();
    wait_for("the published vectors", || {
        let r = check.clone();
        async move {
            r.get(MODEL, &[0, 1])
                .await
                .is_ok_and(|v| v.source == Source::Redis)
        }
    })
    .await;
    // Both paths return the same vectors.
    let ids = Ids(42).next(args.ids);
    let via_grpc = probe
        .clone()
        .get_item_embeddings(GetItemEmbeddingsRequest {
            model: MODEL.into(),
            item_ids: ids.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let via_redis = check.get(MODEL, &ids).await.unwrap();
    assert_eq!(via_grpc.values, via_redis.values);
    assert_eq!(via_grpc.model_version, version);

    println!(
        "embedding-service bench: {} ids/request, {:.1} s per run, {} connections, machine: {}",
        args.ids,
        args.secs,
        if args.shared { "shared" } else { "per-client" },
        machine()
    );
    let pids = Pids {
        client: "self".into(),
        service: service.0.id().to_string(),
        redis: redis.0.id().to_string(),
    };
    let make_grpc = || Client::Grpc(EmbeddingServiceClient::new(channel()));
    let make_redis = || Client::Redis(Reader::new(reader_config.clone()).unwrap());
    let mut outcomes = Vec::new();
    for &c in &args.concurrency {
        if args.paths.iter().any(|p| p == "grpc") {
            outcomes.push(measure("grpc GetItemEmbeddings", c, &make_grpc, &args, &pids).await);
        }
        if args.paths.iter().any(|p| p == "redis") {
            outcomes.push(measure("redis Reader::get (MGET)", c, &make_redis, &args, &pids).await);
        }
    }
    println!(
        "\n| path | clients | requests | errors | req/s | p50 µs | p99 µs | max µs | CPU µs/req client+service+redis | other CPU % | target (p99 <= 2 ms, >= 10k req/s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}+{:.0}+{:.0} | {:.0} | {} |",
            o.path,
            o.concurrency,
            o.requests,
            o.errors,
            o.rps(),
            o.p50_us,
            o.p99_us,
            o.max_us,
            o.cpu_us[0],
            o.cpu_us[1],
            o.cpu_us[2],
            o.other_cpu_pct,
            if o.meets_target() { "met" } else { "NOT met" }
        );
    }
    let json = format!(
        "{{\"ids_per_request\":{},\"secs\":{},\"shared_connection\":{},\"machine\":\"{}\",\"results\":[{}]}}",
        args.ids,
        args.secs,
        args.shared,
        machine().replace('"', "'"),
        outcomes
            .iter()
            .map(Outcome::json)
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("\n{json}");
    if let Some(path) = &args.json_out {
        let path = Path::new(path);
        rsllm_core::artefact::write_atomic(path, format!("{json}\n").as_bytes())
            .unwrap_or_else(|e| panic!("--json-out {}: {e}", path.display()));
    }
}
