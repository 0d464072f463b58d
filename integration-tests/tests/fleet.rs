//! The whole fleet end to end: Recommend in both modes over retrieval and the prompt-service,
//! training jobs over gRPC, Redis going away and coming back, bad input, overload, draining
//! on SIGTERM during a burst, and the Python client generated from the protos.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rsllm_integration_tests::{Fleet, FleetBins, sample, scrape, wait_until};
use rsllm_proto::v1 as pb;
use rsllm_proto::v1::llm_service_client::LlmServiceClient;
use rsllm_proto::v1::prompt_service_client::PromptServiceClient;
use tonic::Code;
use tonic::transport::Channel;

const CALL: Duration = Duration::from_secs(600);

fn bins() -> FleetBins {
    FleetBins::new(
        env!("CARGO_BIN_EXE_rsllm-it-embedding-service"),
        env!("CARGO_BIN_EXE_rsllm-it-prompt-service"),
        env!("CARGO_BIN_EXE_rsllm-it-llm-service"),
    )
}

fn llm(f: &Fleet) -> LlmServiceClient<Channel> {
    LlmServiceClient::new(f.llm.channel()).max_decoding_message_size(64 << 20)
}

const HISTORY: [u32; 10] = [49, 180, 1, 120, 8, 55, 97, 226, 14, 302];

fn candidates() -> Vec<u32> {
    (0..20).map(|i| 400 + i * 13).collect()
}

fn recommend(
    history: &[u32],
    candidates: Vec<u32>,
    k: u32,
    mode: pb::RecommendMode,
) -> pb::RecommendRequest {
    pb::RecommendRequest {
        domain: "movielens".into(),
        history: history.to_vec(),
        candidates,
        k,
        mode: mode as i32,
        num_candidates: None,
        adapter_version: None,
    }
}

async fn call_recommend(
    c: &mut LlmServiceClient<Channel>,
    r: pb::RecommendRequest,
) -> Result<pb::RecommendResponse, tonic::Status> {
    let mut req = tonic::Request::new(r);
    req.set_timeout(CALL);
    c.recommend(req).await.map(tonic::Response::into_inner)
}

async fn expect_error(
    c: &mut LlmServiceClient<Channel>,
    r: pb::RecommendRequest,
    code: Code,
    needle: &str,
) {
    let status = call_recommend(c, r).await.expect_err("bad input must fail");
    assert_eq!(status.code(), code, "{needle}: {}", status.message());
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
}

/// StartTraining with `spec` must be refused as INVALID_ARGUMENT naming `needle`.
async fn expect_refused_job(c: &mut LlmServiceClient<Channel>, spec: pb::JobSpec, needle: &str) {
    let status = c
        .start_training(pb::StartTrainingRequest { spec: Some(spec) })
        .await
        .expect_err("a bad job spec must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "{needle:?} not in {:?}",
        status.message()
    );
}

/// Runs a job to its end and returns the last update.
async fn watch_to_end(c: &mut LlmServiceClient<Channel>, job_id: &str) -> pb::WatchJobResponse {
    let mut stream = c
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
        .expect("WatchJob")
        .into_inner();
    let mut last = None;
    let read = tokio::time::timeout(Duration::from_secs(600), async {
        while let Some(update) = stream.message().await.expect("stream") {
            last = Some(update);
        }
    });
    read.await.expect("job ended within 10 minutes");
    last.expect("at least one update")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_training_jobs_redis_outage_and_bad_inputs() {
    let mut fleet = Fleet::start(
        &bins(),
        &["--adapters", "movielens=zero-shot,lastfm=zero-shot"],
    )
    .await;
    let mut c = llm(&fleet);

    // Zero-shot adapter: ranking over given candidates, and Score agrees with it.
    let models = c
        .list_models(pb::LlmServiceListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.device, "cpu");
    let domains: Vec<(&str, &str)> = models
        .adapters
        .iter()
        .map(|a| (a.domain.as_str(), a.version.as_str()))
        .collect();
    assert_eq!(
        domains,
        [("lastfm", "zero-shot"), ("movielens", "zero-shot")]
    );
    let ranked = call_recommend(
        &mut c,
        recommend(&HISTORY, candidates(), 5, pb::RecommendMode::Ranking),
    )
    .await
    .expect("ranking");
    assert_eq!(ranked.items.len(), 5);
    assert!(
        ranked.items.windows(2).all(|w| w[0].score >= w[1].score),
        "best first"
    );
    assert!(
        ranked
            .items
            .iter()
            .all(|i| candidates().contains(&i.item_id) && !i.title.is_empty())
    );
    let versions = ranked.versions.clone().unwrap();
    assert_eq!(versions.adapter, "zero-shot");
    assert_eq!(versions.base_model, models.base_model_version);
    let scored = c
        .score(pb::ScoreRequest {
            domain: "movielens".into(),
            history: HISTORY.to_vec(),
            candidates: candidates(),
            adapter_version: None,
        })
        .await
        .expect("Score")
        .into_inner();
    assert_eq!(scored.scores.len(), 20);
    let best = candidates()[scored
        .scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0];
    assert_eq!(
        ranked.items[0].item_id, best,
        "Score and Recommend rank alike"
    );

    // No candidates: the embedding-service retrieves 20, none from the history.
    let retrieved = call_recommend(
        &mut c,
        recommend(&HISTORY, vec![], 3, pb::RecommendMode::Ranking),
    )
    .await
    .expect("ranking with retrieval");
    assert_eq!(retrieved.candidates.len(), 20);
    assert!(retrieved.candidates.iter().all(|i| !HISTORY.contains(i)));
    assert_eq!(retrieved.versions.unwrap().recommender.len(), 64);
    let embedding_metrics = scrape(fleet.embedding_metrics);
    assert!(
        sample(
            &embedding_metrics,
            "rsllm_rpc_duration_seconds_count{service=\"rsllm.v1.EmbeddingService\",method=\"TopK\",code=\"OK\"}"
        ) >= 1.0,
        "{embedding_metrics}"
    );
    let prompt_metrics = scrape(fleet.prompt_metrics);
    assert!(
        sample(
            &prompt_metrics,
            "rsllm_rpc_duration_seconds_count{service=\"rsllm.v1.PromptService\",method=\"BuildPrompt\",code=\"OK\"}"
        ) >= 2.0,
        "{prompt_metrics}"
    );

    // Bad input: the status code and the field named.
    use pb::RecommendMode::{Generative, Ranking};
    expect_error(
        &mut c,
        recommend(&[], candidates(), 1, Ranking),
        Code::InvalidArgument,
        "history is empty",
    )
    .await;
    expect_error(
        &mut c,
        recommend(&[99_999], candidates(), 1, Ranking),
        Code::InvalidArgument,
        "history[0] = 99999",
    )
    .await;
    expect_error(
        &mut c,
        recommend(&HISTORY, vec![1, 2, 1], 1, Ranking),
        Code::InvalidArgument,
        "candidates[2] = 1",
    )
    .await;
    expect_error(
        &mut c,
        recommend(&HISTORY, candidates(), 0, Ranking),
        Code::InvalidArgument,
        "k = 0",
    )
    .await;
    expect_error(
        &mut c,
        recommend(&HISTORY, candidates(), 21, Ranking),
        Code::InvalidArgument,
        "k = 21",
    )
    .await;
    let long: Vec<u32> = (0..10_000).map(|i| i % 1682).collect();
    expect_error(
        &mut c,
        recommend(&long, candidates(), 1, Ranking),
        Code::InvalidArgument,
        "history has 10000 items",
    )
    .await;
    let mut unknown = recommend(&HISTORY, candidates(), 1, Ranking);
    unknown.domain = "nope".into();
    expect_error(&mut c, unknown, Code::NotFound, "domain = \"nope\"").await;
    let mut bad_mode = recommend(&HISTORY, candidates(), 1, Ranking);
    bad_mode.mode = 0;
    expect_error(&mut c, bad_mode, Code::InvalidArgument, "mode = 0").await;
    let mut bad_adapter = recommend(&HISTORY, candidates(), 1, Ranking);
    bad_adapter.adapter_version = Some("f00".into());
    expect_error(
        &mut c,
        bad_adapter,
        Code::NotFound,
        "adapter_version = \"f00\"",
    )
    .await;
    // Over the 1 MiB request limit: refused by the transport before decoding.
    // 600,000 ids of 4 varint bytes each: 2.4 MB.
    let huge: Vec<u32> = vec![1 << 21; 600_000];
    let status = call_recommend(&mut c, recommend(&huge, candidates(), 1, Ranking))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "oversized: {status:?}"
    );
    for (spec, needle) in [
        (
            pb::JobSpec {
                stage: 3,
                dataset: "movielens".into(),
                ..Default::default()
            },
            "spec.stage = 3",
        ),
        (
            pb::JobSpec {
                stage: 1,
                dataset: "nope".into(),
                ..Default::default()
            },
            "spec.dataset = \"nope\"",
        ),
        (
            pb::JobSpec {
                stage: 1,
                dataset: "movielens".into(),
                micro_batch: Some(0),
                ..Default::default()
            },
            "spec.micro_batch = 0",
        ),
        (
            pb::JobSpec {
                stage: 1,
                dataset: "movielens".into(),
                micro_batch: Some(100_000),
                ..Default::default()
            },
            "spec.micro_batch = 100000: at most",
        ),
        (
            pb::JobSpec {
                stage: 2,
                dataset: "movielens".into(),
                projector_warmup_steps: u32::MAX,
                ..Default::default()
            },
            "spec.projector_warmup_steps = 4294967295: at most",
        ),
        (
            pb::JobSpec {
                stage: 1,
                dataset: "movielens".into(),
                ui_negatives: 9,
                ..Default::default()
            },
            "spec.ui_negatives = 9: not a UiNegatives",
        ),
        (
            pb::JobSpec {
                stage: 1,
                dataset: "movielens".into(),
                ui_similarity: -1,
                ..Default::default()
            },
            "spec.ui_similarity = -1: not a UiSimilarity",
        ),
    ] {
        expect_refused_job(&mut c, spec, needle).await;
    }
    let status = c
        .start_training(pb::StartTrainingRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = c
        .watch_job(pb::WatchJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // A stage-2 job over gRPC: one at a time, progress streamed, its adapter then serves.
    let spec = pb::JobSpec {
        stage: 2,
        dataset: "movielens".into(),
        train_limit: Some(4),
        max_steps: Some(1),
        micro_batch: Some(2),
        grad_accum: Some(1),
        ..Default::default()
    };
    let job = c
        .start_training(pb::StartTrainingRequest {
            spec: Some(spec.clone()),
        })
        .await
        .expect("StartTraining")
        .into_inner()
        .job_id;
    let busy = c
        .start_training(pb::StartTrainingRequest { spec: Some(spec) })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted, "{}", busy.message());
    let end = watch_to_end(&mut c, &job).await;
    assert_eq!(end.state, pb::JobState::Succeeded as i32, "{}", end.message);
    assert_eq!((end.step, end.total_steps), (1, 1));
    assert!(end.loss.is_finite() && end.loss > 0.0);
    assert_eq!(end.adapter_version.len(), 64);
    let models = c
        .list_models(pb::LlmServiceListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let trained = models
        .adapters
        .iter()
        .find(|a| a.version == end.adapter_version)
        .expect("listed");
    assert!(trained.serving && trained.stage == 2 && trained.job_id == job);

    // Unified prompts with the trained adapter, both modes; the second ranking reads the
    // projected vectors from Redis.
    for mode in [Ranking, Generative, Ranking] {
        let r = call_recommend(&mut c, recommend(&HISTORY, candidates(), 3, mode))
            .await
            .expect("unified");
        let v = r.versions.unwrap();
        assert_eq!(v.adapter, end.adapter_version);
        assert_eq!(v.recommender.len(), 64);
        match mode {
            Generative => {
                assert!(!r.generated_text.is_empty());
                assert!(r.items.iter().all(|i| candidates().contains(&i.item_id)));
            }
            pb::RecommendMode::Ranking | pb::RecommendMode::Unspecified => {
                assert_eq!(r.items.len(), 3)
            }
        }
    }
    // Another domain over the same base model: its own adapter (zero-shot, text-only),
    // picked by the request's domain, while MovieLens keeps the trained one.
    let mut lastfm = recommend(&HISTORY, candidates(), 3, Ranking);
    lastfm.domain = "lastfm".into();
    let r = call_recommend(&mut c, lastfm).await.expect("lastfm");
    assert_eq!(r.versions.unwrap().adapter, "zero-shot");
    assert_eq!(r.items.len(), 3);
    let again = call_recommend(&mut c, recommend(&HISTORY, candidates(), 3, Ranking))
        .await
        .unwrap();
    assert_eq!(again.versions.unwrap().adapter, end.adapter_version);
    let metrics = scrape(fleet.llm_metrics);
    assert!(
        sample(
            &metrics,
            "rsllm_llm_projection_cache_total{outcome=\"hit\"}"
        ) > 0.0,
        "projected vectors never read back from Redis:\n{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "rsllm_rpc_duration_seconds_count{service=\"rsllm.v1.LlmService\",method=\"Recommend\",code=\"OK\"}"
        ) >= 5.0
    );

    // The user-slot variant over gRPC (with a few projector warm-up steps, and L_ui over the
    // whole catalog with the item lengths kept): refused for stage 1; trained for stage 2, its
    // adapter serves with prompts whose user slot holds the embedding-service's user state.
    let user_spec = |stage: u32| pb::JobSpec {
        stage,
        dataset: "movielens".into(),
        train_limit: Some(4),
        max_steps: Some(1),
        micro_batch: Some(2),
        grad_accum: Some(1),
        user_slot: true,
        projector_warmup_steps: 3,
        ui_similarity: pb::UiSimilarity::UserNormalised as i32,
        ui_negatives: pb::UiNegatives::Catalog as i32,
        ..Default::default()
    };
    for (spec, needle) in [
        (
            pb::JobSpec {
                user_slot: false,
                ..user_spec(1)
            },
            "spec.projector_warmup_steps",
        ),
        (
            pb::JobSpec {
                user_slot: false,
                user_slot_last: true,
                ..user_spec(2)
            },
            "spec.user_slot_last",
        ),
        (user_spec(1), "spec.user_slot"),
    ] {
        expect_refused_job(&mut c, spec, needle).await;
    }
    let user_job = c
        .start_training(pb::StartTrainingRequest {
            spec: Some(user_spec(2)),
        })
        .await
        .expect("StartTraining (user slot)")
        .into_inner()
        .job_id;
    let user_end = watch_to_end(&mut c, &user_job).await;
    assert_eq!(
        user_end.state,
        pb::JobState::Succeeded as i32,
        "{}",
        user_end.message
    );
    // The stage trained with the L_ui settings the spec asked for.
    let stage_file = fleet
        .cache
        .path()
        .join("jobs")
        .join(&user_job)
        .join("stage.json");
    let stage: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&stage_file).unwrap_or_else(|e| panic!("{}: {e}", stage_file.display())),
    )
    .unwrap();
    let loss = &stage["train"]["loss"];
    assert_eq!(
        (
            loss["ui_similarity"].as_str(),
            loss["ui_negatives"].as_str()
        ),
        (Some("user-normalised"), Some("catalog")),
        "{loss}"
    );
    for mode in [Ranking, Generative] {
        let r = call_recommend(&mut c, recommend(&HISTORY, candidates(), 3, mode))
            .await
            .expect("user slot");
        assert_eq!(r.versions.unwrap().adapter, user_end.adapter_version);
    }
    let mut prompts = PromptServiceClient::new(fleet.prompt.channel());
    let built = prompts
        .build_prompt(pb::BuildPromptRequest {
            domain: "movielens".into(),
            history: HISTORY.to_vec(),
            candidates: candidates(),
            mode: pb::PromptMode::UnifiedWithUser as i32,
            template_index: None,
        })
        .await
        .expect("BuildPrompt with a user slot")
        .into_inner();
    let at = built
        .slots
        .iter()
        .position(|s| s.user)
        .expect("a user slot");
    assert_eq!(built.slots.iter().filter(|s| s.user).count(), 1);
    assert_eq!(at, HISTORY.len());
    let dim = built.slot_dim as usize;
    let state =
        pb::embedding_service_client::EmbeddingServiceClient::new(fleet.embedding.channel())
            .get_user_state(pb::GetUserStateRequest {
                model: "movielens-llara-sasrec".into(),
                history: HISTORY.to_vec(),
            })
            .await
            .expect("GetUserState")
            .into_inner();
    assert_eq!(state.model_version, built.recommender_version);
    assert_eq!(
        built.slot_vectors[at * dim..(at + 1) * dim],
        state.values[..]
    );
    // The `user-slot-last` placement: the same slot and vector, as the prompt's last token.
    let last = prompts
        .build_prompt(pb::BuildPromptRequest {
            domain: "movielens".into(),
            history: HISTORY.to_vec(),
            candidates: candidates(),
            mode: pb::PromptMode::UnifiedWithUserLast as i32,
            template_index: None,
        })
        .await
        .expect("BuildPrompt with the user slot last")
        .into_inner();
    let user = last.slots.last().expect("slots");
    assert!(user.user);
    assert_eq!(user.position as usize, last.input_ids.len() - 1);
    assert_eq!(last.slots.iter().filter(|s| s.user).count(), 1);
    let at = last.slots.len() - 1;
    assert_eq!(
        last.slot_vectors[at * dim..(at + 1) * dim],
        state.values[..]
    );

    // CancelJob stops at the next step and keeps the checkpoint.
    let long_job = c
        .start_training(pb::StartTrainingRequest {
            spec: Some(pb::JobSpec {
                stage: 1,
                dataset: "movielens".into(),
                train_limit: Some(200),
                micro_batch: Some(1),
                grad_accum: Some(1),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let mut stream = c
        .watch_job(pb::WatchJobRequest {
            job_id: long_job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(u) = stream.message().await.unwrap() {
            if u.step >= 1 {
                break;
            }
        }
    })
    .await
    .expect("a first step");
    let cancelled = c
        .cancel_job(pb::CancelJobRequest {
            job_id: long_job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    let latest = fleet
        .cache
        .path()
        .join("jobs")
        .join(&long_job)
        .join("checkpoints/latest.json");
    assert!(latest.is_file(), "{} kept", latest.display());

    // Redis killed: calls keep succeeding; back: the vectors are republished and read again.
    fleet.redis.kill();
    for mode in [Ranking, Generative] {
        call_recommend(&mut c, recommend(&HISTORY, candidates(), 2, mode))
            .await
            .expect("no Redis");
    }
    fleet.redis.restart();
    let mut prompts = PromptServiceClient::new(fleet.prompt.channel());
    wait_until(
        "slot vectors from Redis again",
        Duration::from_secs(30),
        || {
            let mut p = prompts.clone();
            async move {
                let r = p
                    .build_prompt(pb::BuildPromptRequest {
                        domain: "movielens".into(),
                        history: HISTORY.to_vec(),
                        candidates: candidates(),
                        mode: pb::PromptMode::Unified as i32,
                        template_index: None,
                    })
                    .await
                    .ok()?
                    .into_inner();
                r.vectors_from_cache.then_some(())
            }
        },
    )
    .await;
    let r = prompts
        .build_prompt(pb::BuildPromptRequest {
            domain: "movielens".into(),
            history: HISTORY.to_vec(),
            candidates: candidates(),
            mode: pb::PromptMode::Unified as i32,
            template_index: Some(7),
        })
        .await
        .unwrap_err();
    assert_eq!(r.code(), Code::InvalidArgument, "{}", r.message());
    call_recommend(&mut c, recommend(&HISTORY, candidates(), 2, Ranking))
        .await
        .expect("Redis back");

    // An independent client, generated from the protos by grpcio-tools, calls every rpc.
    match std::env::var_os("RSLLM_CI_PYTHON") {
        Some(python) => {
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/grpc-client-check.py"
            );
            let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
            let out = tokio::process::Command::new(python)
                .args([script, "--proto", proto])
                .args(["--embedding", &fleet.embedding.addr.to_string()])
                .args(["--prompt", &fleet.prompt.addr.to_string()])
                .args(["--llm", &fleet.llm.addr.to_string()])
                .output()
                .await
                .expect("run the python client");
            assert!(
                out.status.success(),
                "python client failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => eprintln!(
            "RSLLM_CI_PYTHON is unset: the Python client check did not run (scripts/test.sh sets it)"
        ),
    }

    // A dependency gone: UNAVAILABLE naming it, promptly (no hang).
    fleet.embedding.sigterm();
    fleet.embedding.wait_exit(Duration::from_secs(60)).await;
    let started = std::time::Instant::now();
    let status = call_recommend(&mut c, recommend(&HISTORY, vec![], 3, Ranking))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("embedding-service"),
        "{}",
        status.message()
    );
    // Promptly: well under the 60 s dependency timeout the fleet runs with, so the refused
    // connection answered, not a timer (the bound leaves room for a loaded 2-core machine).
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    // With candidates given, no retrieval is needed: the slot vectors are still in Redis,
    // for the unified adapter. The user-slot adapter needs the embedding-service for every
    // call (the user state is never cached), and says so.
    let mut with_user = recommend(&HISTORY, candidates(), 2, Ranking);
    with_user.adapter_version = Some(user_end.adapter_version.clone());
    let status = call_recommend(&mut c, with_user).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("GetUserState"),
        "{}",
        status.message()
    );
    let mut pinned = recommend(&HISTORY, candidates(), 2, Ranking);
    pinned.adapter_version = Some(end.adapter_version.clone());
    call_recommend(&mut c, pinned)
        .await
        .expect("no embedding-service needed");
    fleet.prompt.sigterm();
    fleet.prompt.wait_exit(Duration::from_secs(60)).await;
    let status = call_recommend(&mut c, recommend(&HISTORY, candidates(), 2, Ranking))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains("prompt-service"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_sigterm_drains_a_burst() {
    use pb::RecommendMode::Ranking;
    let one_candidate = || recommend(&HISTORY[..1], vec![500], 1, Ranking);

    // Beyond the queue: RESOURCE_EXHAUSTED with retry-after, never a timeout. Each batch
    // waits 300 ms first, so the queue is full whatever the machine's load spreads arrivals.
    let fleet = Fleet::start_with_env(
        &bins(),
        &["--max-batch", "1", "--queue-capacity", "2"],
        &[("RSLLM_LLM_TEST_DELAY_MS", "300")],
    )
    .await;
    let mut calls = Vec::new();
    for _ in 0..24 {
        let mut c = llm(&fleet);
        let r = one_candidate();
        calls.push(tokio::spawn(async move { call_recommend(&mut c, r).await }));
    }
    let (mut ok, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.metadata().get("retry-after-ms").is_some(), "{s:?}");
                refused += 1;
            }
            Err(s) => panic!("overload gave {s:?}, not RESOURCE_EXHAUSTED"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    drop(fleet);

    // SIGTERM while 200 accepted calls are in flight: every one of them succeeds.
    let mut fleet = Fleet::start(
        &bins(),
        &[
            "--max-batch",
            "16",
            "--queue-capacity",
            "256",
            // The drain is bounded by the calls themselves here, not by the default 30 s:
            // tests run in parallel on 2 cores, and 200 calls can take longer than that.
            "--drain-timeout-secs",
            "600",
        ],
    )
    .await;
    // A few connections with many streams on each, as a pooled client sends them.
    let channels: Vec<Channel> = (0..4).map(|_| fleet.llm.channel()).collect();
    let failed_early = Arc::new(Mutex::new(None::<tonic::Status>));
    let mut calls = Vec::new();
    for i in 0..200 {
        let mut c = LlmServiceClient::new(channels[i % channels.len()].clone());
        let r = one_candidate();
        let failed_early = failed_early.clone();
        calls.push(tokio::spawn(async move {
            let result = call_recommend(&mut c, r).await;
            if let Err(s) = &result {
                let mut first = failed_early.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert(s.clone());
            }
            result
        }));
    }
    let series =
        |name: &str| format!("{name}{{service=\"rsllm.v1.LlmService\",method=\"Recommend\"");
    let metrics_addr = fleet.llm_metrics;
    let started = std::time::Instant::now();
    let mut last = (0.0, 0.0);
    wait_until("200 calls accepted", Duration::from_secs(120), || {
        // A call that failed before the SIGTERM can never be counted: say why at once.
        let early = failed_early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(s) = early {
            panic!("a call failed before the drain began: {s:?}");
        }
        let text = scrape(metrics_addr);
        let in_flight = sample(&text, &(series("rsllm_rpc_in_flight") + "}"));
        let done = sample(
            &text,
            &(series("rsllm_rpc_duration_seconds_count") + ",code=\"OK\"}"),
        );
        if (in_flight, done) != last {
            eprintln!(
                "{:?}: {in_flight} in flight, {done} done",
                started.elapsed()
            );
            last = (in_flight, done);
        }
        async move { (in_flight + done >= 200.0).then_some(()) }
    })
    .await;
    fleet.llm.sigterm();
    for call in calls {
        call.await
            .unwrap()
            .expect("an accepted call failed during the drain");
    }
    let status = fleet.llm.wait_exit(Duration::from_secs(600)).await;
    assert!(status.success(), "llm-service exit: {status}");
}

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_recommend_is_one_trace_across_the_three_services() {
    let Some(python) = std::env::var_os("RSLLM_CI_PYTHON") else {
        eprintln!(
            "RSLLM_CI_PYTHON is unset: the OTLP receiver cannot run (scripts/test.sh sets it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spans = dir.path().join("spans.jsonl");
    let port = rsllm_integration_tests::free_port();
    let _receiver = Child(
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/otlp-receiver.py"
            ))
            .arg(format!("127.0.0.1:{port}"))
            .arg(&spans)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the OTLP receiver"),
    );
    wait_until(
        "the OTLP receiver",
        Duration::from_secs(30),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let fleet = Fleet::start_with_env(
        &bins(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let mut c = llm(&fleet);
    // No candidates: the llm-service calls the embedding-service (TopK) and the
    // prompt-service (BuildPrompt).
    call_recommend(
        &mut c,
        recommend(&HISTORY, vec![], 3, pb::RecommendMode::Ranking),
    )
    .await
    .expect("Recommend");
    let spans_path = spans.clone();
    let (root, children) = wait_until(
        "spans from all three services",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&spans_path).unwrap_or_default();
            async move {
                let all: Vec<serde_json::Value> = text
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                let root = all
                    .iter()
                    .find(|s| s["name"] == "rsllm.v1.LlmService/Recommend")?
                    .clone();
                let children: Vec<serde_json::Value> = all
                    .iter()
                    .filter(|s| {
                        s["trace_id"] == root["trace_id"] && s["parent_span_id"] == root["span_id"]
                    })
                    .cloned()
                    .collect();
                let has = |name: &str| children.iter().any(|s| s["name"] == name);
                (has("rsllm.v1.EmbeddingService/TopK") && has("rsllm.v1.PromptService/BuildPrompt"))
                    .then_some((root, children))
            }
        },
    )
    .await;
    assert_eq!(root["service"], "llm-service");
    let services: std::collections::BTreeSet<String> = children
        .iter()
        .filter_map(|s| s["service"].as_str().map(str::to_owned))
        .collect();
    assert!(
        services.contains("embedding-service") && services.contains("prompt-service"),
        "{services:?}"
    );
}
