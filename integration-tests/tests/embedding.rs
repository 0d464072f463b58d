//! embedding-service end to end: Redis publishing and the reader's fallback, bad input,
//! health and reflection, draining on SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use rsllm_integration_tests::{
    ModelsDir, RedisServer, ServiceProcess, TEST_DIM, TEST_ITEMS, TEST_MODEL, TEST_WINDOW,
    free_port, wait_until,
};
use rsllm_itemvec::{Reader, ReaderConfig, RedisOptions, Source, item_key, meta_key, model_key};
use rsllm_proto::v1::embedding_service_client::EmbeddingServiceClient;
use rsllm_proto::v1::{
    GetItemEmbeddingsRequest, GetUserStateRequest, ListModelsRequest, ScoreCandidatesRequest,
    TopKRequest,
};
use tonic::Code;
use tonic::transport::Channel;

const START: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);

fn service_bin() -> PathBuf {
    std::env::var_os("RSLLM_IT_EMBEDDING_SERVICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rsllm-it-embedding-service")))
}

/// Starts the service on the test model with extra flags.
async fn start_service(models: &ModelsDir, args: &[&str]) -> ServiceProcess {
    let dir = models.path_str();
    let mut all = vec!["--models-dir", dir.as_str()];
    all.extend_from_slice(args);
    let mut svc = ServiceProcess::start(&service_bin(), &all, &[]);
    svc.wait_serving(START).await;
    svc
}

fn client(svc: &ServiceProcess) -> EmbeddingServiceClient<Channel> {
    EmbeddingServiceClient::new(svc.channel())
}

async fn grpc_vectors(
    c: &mut EmbeddingServiceClient<Channel>,
    model: &str,
    ids: &[u32],
) -> Vec<f32> {
    c.get_item_embeddings(GetItemEmbeddingsRequest {
        model: model.into(),
        item_ids: ids.to_vec(),
    })
    .await
    .expect("GetItemEmbeddings")
    .into_inner()
    .values
}

async fn redis_exists(redis: &RedisServer, key: &str) -> bool {
    let Ok(client) = redis::Client::open(redis.url()) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<bool>(&mut conn)
        .await
        .unwrap_or(false)
}

fn ids30() -> Vec<u32> {
    (0..30).map(|i| (i * 7 + 3) % TEST_ITEMS as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_are_published_read_back_and_survive_a_redis_restart() {
    let models = ModelsDir::with_test_model();
    let version = models.manifest.version.clone();
    let mut redis = RedisServer::start();
    let redis_url = redis.url();
    let svc = start_service(
        &models,
        &["--redis-url", &redis_url, "--redis-check-ms", "100"],
    )
    .await;

    // Versioned keys appear: every item, the meta record, and the name -> version pointer
    // (written last, so once it is there everything is).
    wait_until("the model pointer", WAIT, || async {
        redis_exists(&redis, &model_key(TEST_MODEL))
            .await
            .then_some(())
    })
    .await;
    let mut conn = redis.connection().await;
    let item_keys: Vec<String> = (0..TEST_ITEMS as u32)
        .map(|id| item_key(&version, id))
        .collect();
    let present: usize = redis::cmd("EXISTS")
        .arg(&item_keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(present, TEST_ITEMS);
    let pointer: String = redis::cmd("GET")
        .arg(model_key(TEST_MODEL))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pointer, version);
    let meta: String = redis::cmd("GET")
        .arg(meta_key(&version))
        .query_async(&mut conn)
        .await
        .unwrap();
    let meta: rsllm_itemvec::Meta = serde_json::from_str(&meta).unwrap();
    assert_eq!(
        (meta.dim as usize, meta.count as usize),
        (TEST_DIM, TEST_ITEMS)
    );
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(item_key(&version, 7))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw.len(), TEST_DIM * 4, "f32 little-endian, no header");

    // The reader gets exactly what GetItemEmbeddings returns, from Redis, by name or version.
    let mut grpc = client(&svc);
    let ids = ids30();
    let expected = grpc_vectors(&mut grpc, TEST_MODEL, &ids).await;
    assert_eq!(expected.len(), ids.len() * TEST_DIM);
    let mut first7 = Vec::new();
    rsllm_itemvec::decode_vector_into(&raw, &mut first7).unwrap();
    assert_eq!(first7, grpc_vectors(&mut grpc, TEST_MODEL, &[7]).await);

    let reader = Reader::new(patient_reader_config(&redis_url, svc.endpoint())).unwrap();
    let got = reader.get(TEST_MODEL, &ids).await.unwrap();
    assert_eq!(
        (got.source, got.dim, got.model_version.as_str()),
        (Source::Redis, TEST_DIM, version.as_str())
    );
    assert_eq!(got.values, expected);
    let by_version = reader.get(&version, &ids).await.unwrap();
    assert_eq!(
        (by_version.source, &by_version.values),
        (Source::Redis, &expected)
    );
    let before_kill = reader.stats();
    assert_eq!(
        (before_kill.hits, before_kill.fallbacks),
        (2, 0),
        "{before_kill:?}"
    );

    // Redis dies: the reader falls back to gRPC and the service keeps answering.
    redis.kill();
    let got = reader.get(TEST_MODEL, &ids).await.unwrap();
    assert_eq!((got.source, &got.values), (Source::Grpc, &expected));
    let after_kill = reader.stats();
    assert!(
        after_kill.fallbacks > before_kill.fallbacks,
        "{after_kill:?}"
    );
    assert!(
        after_kill.redis_errors > before_kill.redis_errors,
        "{after_kill:?}"
    );
    assert_eq!(grpc_vectors(&mut grpc, TEST_MODEL, &ids).await, expected);
    let top = grpc
        .top_k(TopKRequest {
            model: TEST_MODEL.into(),
            history: vec![1, 2, 3],
            k: 5,
            exclude_history: false,
        })
        .await
        .expect("TopK with Redis down");
    assert_eq!(top.into_inner().items.len(), 5);
    wait_until("the service to log that Redis is down", WAIT, || async {
        (svc.logs.count("redis unavailable") > 0).then_some(())
    })
    .await;

    // Redis comes back empty on the same port: the service republishes, the reader reads
    // from Redis again.
    redis.restart();
    wait_until("the vectors to be republished", WAIT, || async {
        redis_exists(&redis, &meta_key(&version))
            .await
            .then_some(())
    })
    .await;
    let hits_before = reader.stats().hits;
    let got = wait_until("the reader to hit Redis again", WAIT, || async {
        let v = reader.get(TEST_MODEL, &ids).await.unwrap();
        (v.source == Source::Redis).then_some(v)
    })
    .await;
    assert_eq!(got.values, expected);
    assert!(reader.stats().hits > hits_before, "{:?}", reader.stats());
    wait_until("the service to log that Redis is back", WAIT, || async {
        (svc.logs.count("redis reachable again") > 0).then_some(())
    })
    .await;
}

/// A reader whose timeouts only catch hangs: the defaults (250 ms per Redis call, 1 s to
/// connect over gRPC) are for request paths, and on a loaded 2-core test machine one slow
/// call would send a read to the fallback (or mark Redis down) and fail an exact assertion.
/// A killed Redis or service still fails at once (connection refused).
fn patient_reader_config(redis_url: &str, endpoint: String) -> ReaderConfig {
    let mut config = ReaderConfig::new(redis_url, endpoint);
    config.redis = Some(RedisOptions {
        connect_timeout: Duration::from_secs(10),
        response_timeout: Duration::from_secs(10),
        retry_after: Duration::ZERO,
        ..RedisOptions::new(redis_url)
    });
    config.grpc_connect_timeout = Duration::from_secs(15);
    config.grpc_timeout = Duration::from_secs(60);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_back_fills_what_it_fetched_over_grpc() {
    let models = ModelsDir::with_test_model();
    let version = models.manifest.version.clone();
    let redis = RedisServer::start();
    // The service does not publish (no Redis for it); the reader does have Redis.
    let svc = start_service(&models, &["--redis-url", ""]).await;
    let reader = Reader::new(patient_reader_config(&redis.url(), svc.endpoint())).unwrap();
    let ids = [4u32, 9, 4];
    let first = reader.get(TEST_MODEL, &ids).await.unwrap();
    assert_eq!(first.source, Source::Grpc);
    wait_until("the back-fill", WAIT, || async {
        (reader.stats().backfilled_items >= 2).then_some(())
    })
    .await;
    // No pointer was published, so address the model by version: now a Redis hit.
    let second = reader.get(&version, &ids).await.unwrap();
    assert_eq!(
        (second.source, &second.values),
        (Source::Redis, &first.values)
    );
    // A partly cached request merges Redis rows with gRPC rows.
    let mixed = reader.get(&version, &[4, 5]).await.unwrap();
    assert_eq!(mixed.source, Source::Mixed);
    assert_eq!(mixed.row(0), first.row(0));
    // Unknown models keep the service's status code.
    let err = reader.get("no-such-model", &[1]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_starts_without_redis_and_publishes_once_it_appears() {
    let models = ModelsDir::with_test_model();
    let version = models.manifest.version.clone();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let svc = start_service(&models, &["--redis-url", &url, "--redis-check-ms", "100"]).await;
    let mut grpc = client(&svc);
    assert_eq!(
        grpc_vectors(&mut grpc, TEST_MODEL, &[0, 1]).await.len(),
        2 * TEST_DIM
    );
    let redis = RedisServer::start_on(port);
    wait_until("the first publication", WAIT, || async {
        redis_exists(&redis, &meta_key(&version))
            .await
            .then_some(())
    })
    .await;
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("expected an error status");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not mention {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_breaks_nothing() {
    let models = ModelsDir::with_test_model();
    let svc = start_service(
        &models,
        &[
            "--redis-url",
            "",
            "--max-ids-per-request",
            "100",
            "--max-history-len",
            "200",
        ],
    )
    .await;
    let mut c = client(&svc);
    let m = || TEST_MODEL.to_owned();
    let get = |model: String, item_ids: Vec<u32>| GetItemEmbeddingsRequest { model, item_ids };
    let score = |history: Vec<u32>, candidates: Vec<u32>| ScoreCandidatesRequest {
        model: TEST_MODEL.into(),
        history,
        candidates,
    };
    let topk = |history: Vec<u32>, k: u32| TopKRequest {
        model: TEST_MODEL.into(),
        history,
        k,
        exclude_history: false,
    };

    assert_status(
        c.get_item_embeddings(get("no-such-model".into(), vec![1]))
            .await,
        Code::NotFound,
        "no-such-model",
    );
    assert_status(
        c.get_item_embeddings(get(String::new(), vec![1])).await,
        Code::InvalidArgument,
        "model is empty",
    );
    assert_status(
        c.get_item_embeddings(get(m(), vec![1, 50])).await,
        Code::InvalidArgument,
        "item_ids[1] = 50",
    );
    assert_status(
        c.get_item_embeddings(get(m(), vec![u32::MAX])).await,
        Code::InvalidArgument,
        "item_ids[0] = 4294967295",
    );
    assert_status(
        c.get_item_embeddings(get(m(), vec![])).await,
        Code::InvalidArgument,
        "item_ids is empty",
    );
    assert_status(
        c.get_item_embeddings(get(m(), vec![0; 101])).await,
        Code::InvalidArgument,
        "item_ids has 101 items, more than the limit of 100",
    );
    assert_status(
        c.score_candidates(score(vec![], vec![1])).await,
        Code::InvalidArgument,
        "history is empty",
    );
    assert_status(
        c.score_candidates(score(vec![1, 60], vec![1])).await,
        Code::InvalidArgument,
        "history[1] = 60",
    );
    assert_status(
        c.score_candidates(score(vec![1], vec![999])).await,
        Code::InvalidArgument,
        "candidates[0] = 999",
    );
    assert_status(
        c.score_candidates(score(vec![1], vec![])).await,
        Code::InvalidArgument,
        "candidates is empty",
    );
    assert_status(
        c.top_k(topk(vec![], 5)).await,
        Code::InvalidArgument,
        "history is empty",
    );
    assert_status(
        c.top_k(topk(vec![1], 0)).await,
        Code::InvalidArgument,
        "k = 0",
    );
    assert_status(
        c.top_k(topk(vec![1], 51)).await,
        Code::InvalidArgument,
        "k = 51",
    );
    assert_status(
        c.top_k(topk(vec![1; 201], 5)).await,
        Code::InvalidArgument,
        "history has 201 items",
    );
    assert_status(
        c.top_k(TopKRequest {
            model: "no-such-model".into(),
            history: vec![1],
            k: 1,
            exclude_history: false,
        })
        .await,
        Code::NotFound,
        "no-such-model",
    );

    let user = |history: Vec<u32>| GetUserStateRequest {
        model: TEST_MODEL.into(),
        history,
    };
    assert_status(
        c.get_user_state(user(vec![])).await,
        Code::InvalidArgument,
        "history is empty",
    );
    assert_status(
        c.get_user_state(user(vec![1, 60])).await,
        Code::InvalidArgument,
        "history[1] = 60",
    );
    assert_status(
        c.get_user_state(GetUserStateRequest {
            model: "no-such-model".into(),
            history: vec![1],
        })
        .await,
        Code::NotFound,
        "no-such-model",
    );

    // A history longer than the window is accepted and cut to its last TEST_WINDOW items.
    let long: Vec<u32> = (0..45).collect();
    let tail = long[long.len() - TEST_WINDOW..].to_vec();
    let cands: Vec<u32> = (0..TEST_ITEMS as u32).collect();
    let long_scores = c
        .score_candidates(score(long.clone(), cands.clone()))
        .await
        .unwrap()
        .into_inner();
    let tail_scores = c
        .score_candidates(score(tail.clone(), cands.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(long_scores.scores, tail_scores.scores);
    assert_eq!(long_scores.model_version, models.manifest.version);
    // The user state is what the scores are made of: state . item vector = score.
    let state = c
        .get_user_state(user(long.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.model_version, models.manifest.version);
    let tail_state = c
        .get_user_state(user(tail.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.values, tail_state.values);
    let table = c
        .get_item_embeddings(get(m(), cands.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.values.len(), table.dim as usize);
    for (row, score) in table
        .values
        .chunks(table.dim as usize)
        .zip(&long_scores.scores)
    {
        let dot: f32 = row.iter().zip(&state.values).map(|(a, b)| a * b).sum();
        assert!((dot - score).abs() < 1e-4, "{dot} vs {score}");
    }
    let long_top = c.top_k(topk(long.clone(), 10)).await.unwrap().into_inner();
    let tail_top = c.top_k(topk(tail, 10)).await.unwrap().into_inner();
    assert_eq!(long_top.items, tail_top.items);

    // TopK is ScoreCandidates sorted; exclude_history drops every history item.
    let items = &long_top.items;
    assert!(items.windows(2).all(|w| w[0].score >= w[1].score));
    for it in items {
        assert!((it.score - long_scores.scores[it.item_id as usize]).abs() < 1e-4);
    }
    let excluded = c
        .top_k(TopKRequest {
            model: m(),
            history: long.clone(),
            k: TEST_ITEMS as u32,
            exclude_history: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(excluded.items.len(), TEST_ITEMS - long.len());
    assert!(excluded.items.iter().all(|it| !long.contains(&it.item_id)));

    // Nothing broke: good calls still work, by name and by version.
    let listed = c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].name.as_str(),
            listed[0].item_count,
            listed[0].dim,
            listed[0].max_history
        ),
        (
            TEST_MODEL,
            TEST_ITEMS as u32,
            TEST_DIM as u32,
            TEST_WINDOW as u32
        )
    );
    let by_version = grpc_vectors(&mut c, &models.manifest.version, &[3]).await;
    assert_eq!(by_version, grpc_vectors(&mut c, TEST_MODEL, &[3]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_list_the_public_service() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let models = ModelsDir::with_test_model();
    let svc = start_service(&models, &["--redis-url", ""]).await;
    let mut health = HealthClient::new(svc.channel());
    for service in ["", "rsllm.v1.EmbeddingService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(svc.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["rsllm.v1.EmbeddingService".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_models_dir_is_a_clear_startup_failure() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap().to_owned();
    let mut svc = ServiceProcess::start(
        &service_bin(),
        &["--models-dir", &dir, "--redis-url", ""],
        &[],
    );
    let status = svc.wait_exit(START).await;
    assert_eq!(status.code(), Some(1), "{}", svc.logs.dump());
    assert!(
        svc.logs.count("no model artefacts") > 0,
        "{}",
        svc.logs.dump()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_then_exits_zero() {
    let models = ModelsDir::with_test_model();
    let dir = models.path_str();
    // Every RPC is held for 1.5 s (hidden test hook, set through its env fallback), so calls
    // are reliably in flight when SIGTERM arrives.
    let mut svc = ServiceProcess::start(
        &service_bin(),
        &["--models-dir", &dir, "--redis-url", ""],
        &[("RSLLM_EMBEDDING_TEST_DELAY_MS", "1500")],
    );
    svc.wait_serving(START).await;
    let mut calls = Vec::new();
    for i in 0..4u32 {
        let mut c = client(&svc);
        calls.push(tokio::spawn(async move {
            c.get_item_embeddings(GetItemEmbeddingsRequest {
                model: TEST_MODEL.into(),
                item_ids: vec![i],
            })
            .await
            .map(|r| r.into_inner().values.len())
        }));
    }
    for _ in 0..2 {
        let mut c = client(&svc);
        calls.push(tokio::spawn(async move {
            c.top_k(TopKRequest {
                model: TEST_MODEL.into(),
                history: vec![1, 2],
                k: 3,
                exclude_history: true,
            })
            .await
            .map(|r| r.into_inner().items.len())
        }));
    }
    wait_until("all six calls to reach the service", WAIT, || async {
        (svc.logs.count("test delay: holding the call") >= 6).then_some(())
    })
    .await;
    svc.sigterm();
    let mut lens = Vec::new();
    for call in calls {
        lens.push(
            call.await
                .unwrap()
                .expect("an in-flight call completes during the drain"),
        );
    }
    assert_eq!(lens, vec![TEST_DIM, TEST_DIM, TEST_DIM, TEST_DIM, 3, 3]);
    let status = svc.wait_exit(WAIT).await;
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        svc.logs.dump()
    );
    assert!(svc.logs.count("shutting down") > 0);
}
