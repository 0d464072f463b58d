//! Recommend throughput and latency through the whole fleet (real processes on loopback:
//! redis-server, embedding-service, prompt-service, llm-service), ranking mode with
//! retrieval (each request: TopK for 20 candidates, BuildPrompt, the model scores them), at
//! several concurrency levels, with dynamic batching on (`--max-batch 8`) and off (`1`).
//!
//!   cargo bench -p rsllm-integration-tests --bench recommend_bench -- \
//!       [--secs 30] [--concurrency 1,8,64] [--adapter runs/.../stage2] [--dtype f32|bf16]
//!       [--mode ranking|generative] [--json-out /abs/path]
//!
//! `--mode generative` has the model answer by greedy decoding instead (LLaRA's mode): its
//! per-token decoding steps are where batching requests pays on a CPU.
//!
//! `--dtype` is the llm-service's compute dtype (f32 by default; bf16 pays on CPUs with native
//! bf16 matrix units, such as AMX).
//!
//! Closed loop: each of N clients sends its next request as soon as the last one returns.
//! A warm-up of a few calls per setting is not counted. Refusals (RESOURCE_EXHAUSTED) count
//! as errors; the queue is sized so that none happen at these concurrencies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use rsllm_integration_tests::{Fleet, FleetBins};
use rsllm_proto::v1 as pb;
use rsllm_proto::v1::llm_service_client::LlmServiceClient;

struct Args {
    secs: u64,
    concurrency: Vec<usize>,
    adapter: Option<String>,
    dtype: String,
    mode: pb::RecommendMode,
    json_out: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        secs: 30,
        concurrency: vec![1, 8, 64],
        adapter: None,
        dtype: "f32".to_owned(),
        mode: pb::RecommendMode::Ranking,
        json_out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--secs" => args.secs = value().parse().expect("--secs N"),
            "--concurrency" => {
                args.concurrency = value()
                    .split(',')
                    .map(|c| c.parse().expect("--concurrency 1,8,64"))
                    .collect();
            }
            "--adapter" => args.adapter = Some(value()),
            "--dtype" => args.dtype = value(),
            "--mode" => {
                args.mode = match value().as_str() {
                    "ranking" => pb::RecommendMode::Ranking,
                    "generative" => pb::RecommendMode::Generative,
                    other => panic!("--mode ranking|generative, not {other:?}"),
                }
            }
            "--json-out" => args.json_out = Some(value()),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    args
}

fn history(i: usize) -> Vec<u32> {
    (0..10)
        .map(|j| ((i * 7919 + j * 104_729) % 1682) as u32)
        .collect()
}

struct Run {
    latencies: Vec<Duration>,
    errors: usize,
    wall: Duration,
}

async fn run(fleet: &Fleet, mode: pb::RecommendMode, clients: usize, secs: u64) -> Run {
    let channel = fleet.llm.channel();
    // Warm-up: a few calls, not counted.
    for i in 0..3 {
        one(&mut LlmServiceClient::new(channel.clone()), mode, i)
            .await
            .ok();
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = LlmServiceClient::new(channel);
            let (mut lat, mut errors, mut i) = (Vec::new(), 0, c * 100_000);
            while Instant::now() < until {
                let t = Instant::now();
                match one(&mut client, mode, i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
    }
    Run {
        latencies,
        errors,
        wall: started.elapsed(),
    }
}

async fn one(
    client: &mut LlmServiceClient<tonic::transport::Channel>,
    mode: pb::RecommendMode,
    i: usize,
) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(pb::RecommendRequest {
        domain: "movielens".into(),
        history: history(i),
        candidates: Vec::new(),
        k: 5,
        mode: mode as i32,
        num_candidates: Some(20),
        adapter_version: None,
    });
    req.set_timeout(Duration::from_secs(600));
    client.recommend(req).await.map(|_| ())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    let bins = FleetBins::new(
        env!("CARGO_BIN_EXE_rsllm-it-embedding-service"),
        env!("CARGO_BIN_EXE_rsllm-it-prompt-service"),
        env!("CARGO_BIN_EXE_rsllm-it-llm-service"),
    );
    let adapter_flag = args
        .adapter
        .as_ref()
        .map(|dir| format!("movielens={dir}"))
        .unwrap_or_else(|| "movielens=zero-shot".to_owned());
    let mut rows = Vec::new();
    println!("| batching | clients | requests | errors | throughput (req/s) | p50 (s) | p99 (s) |");
    println!("|---|---|---|---|---|---|---|");
    for max_batch in ["8", "1"] {
        let fleet = Fleet::start(
            &bins,
            &[
                "--max-batch",
                max_batch,
                "--queue-capacity",
                "256",
                "--adapters",
                &adapter_flag,
                "--dtype",
                &args.dtype,
            ],
        )
        .await;
        for &clients in &args.concurrency {
            let mut r = run(&fleet, args.mode, clients, args.secs).await;
            r.latencies.sort();
            let n = r.latencies.len();
            let throughput = n as f64 / r.wall.as_secs_f64();
            let (p50, p99) = (
                percentile(&r.latencies, 0.5),
                percentile(&r.latencies, 0.99),
            );
            let label = if max_batch == "1" {
                "off"
            } else {
                "on (max 8)"
            };
            println!(
                "| {label} | {clients} | {n} | {} | {throughput:.2} | {p50:.3} | {p99:.3} |",
                r.errors
            );
            rows.push(serde_json::json!({
                "max_batch": max_batch.parse::<u32>().unwrap(),
                "clients": clients,
                "requests": n,
                "errors": r.errors,
                "seconds": r.wall.as_secs_f64(),
                "throughput_rps": throughput,
                "p50_s": p50,
                "p99_s": p99,
            }));
        }
    }
    if let Some(path) = args.json_out {
        let doc = serde_json::json!({
            "adapter": adapter_flag, "dtype": args.dtype, "secs": args.secs,
            "mode": args.mode.as_str_name(), "rows": rows,
        });
        let path = std::path::Path::new(&path);
        let text = serde_json::to_string_pretty(&doc).unwrap();
        rsllm_core::artefact::write_atomic(path, text.as_bytes())
            .unwrap_or_else(|e| panic!("--json-out {}: {e}", path.display()));
    }
}
