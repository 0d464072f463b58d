//! Parity with Hugging Face transformers on the default model (SmolLM2-135M-Instruct, the
//! Q4_1 GGUF that scripts/setup.sh installs): token ids, decoded text, log-probs of
//! prompt + continuation pairs, last-position logits and 8 greedy tokens, against
//! `tests/fixtures/smollm2-135m-instruct-q4_1.hf.json`, which `scripts/llm-fixtures.py`
//! regenerates with transformers on the same file.
//!
//! The model is loaded once per dtype for the whole module (about two seconds each).

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::Deserialize;
use tch::{Device, Kind};

use crate::{GenerateOptions, LlmTokenizer, LoadedModel, Sampling, generate, score_continuations};

#[derive(Debug, Deserialize)]
struct Fixture {
    gguf_file: String,
    gguf_sha256: String,
    tokenize: Vec<TokenizeCase>,
    decode: Vec<DecodeCase>,
    score: Vec<ScoreCase>,
    greedy: Vec<GreedyCase>,
    last_logits: Vec<LogitsCase>,
}

#[derive(Debug, Deserialize)]
struct TokenizeCase {
    text: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DecodeCase {
    ids: Vec<u32>,
    text: String,
}

#[derive(Debug, Deserialize)]
struct ScoreCase {
    prompt: String,
    continuation: String,
    prompt_ids: Vec<u32>,
    continuation_ids: Vec<u32>,
    token_logprobs: Vec<f64>,
    sum_logprob: f64,
}

#[derive(Debug, Deserialize)]
struct GreedyCase {
    prompt: String,
    prompt_ids: Vec<u32>,
    new_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct LogitsCase {
    prompt_ids: Vec<u32>,
    top10_ids: Vec<i64>,
    top10_logits: Vec<f64>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smollm2-135m-instruct-q4_1.hf.json");
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

/// The set-up default model; a missing file fails with the command that installs it.
fn model_path() -> PathBuf {
    let path = crate::default_model_path().expect("HOME or RSLLM_CACHE_DIR is set");
    assert!(
        path.is_file(),
        "{} is missing: run `bash scripts/setup.sh` first",
        path.display()
    );
    assert_eq!(
        path.file_name().and_then(|n| n.to_str()),
        Some(fixture().gguf_file.as_str())
    );
    path
}

fn loaded(kind: Kind) -> MutexGuard<'static, LoadedModel> {
    static F32: OnceLock<Mutex<LoadedModel>> = OnceLock::new();
    static BF16: OnceLock<Mutex<LoadedModel>> = OnceLock::new();
    let cell = if kind == Kind::BFloat16 { &BF16 } else { &F32 };
    let model = cell.get_or_init(|| {
        let path = model_path();
        let hash = rsllm_gguf_sha256(&path);
        assert_eq!(
            hash,
            fixture().gguf_sha256,
            "the fixture was made from another file"
        );
        Mutex::new(crate::load(&path, Device::Cpu, kind).unwrap())
    });
    model
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn rsllm_gguf_sha256(path: &std::path::Path) -> String {
    rsllm_core::artefact::sha256_file(path).unwrap()
}

fn gguf_tokenizer() -> LlmTokenizer {
    let path = model_path();
    let file = rsllm_gguf::GgufFile::open(&path).unwrap();
    LlmTokenizer::from_gguf(&file, &path).unwrap()
}

fn check_tokenizer(tokenizer: &LlmTokenizer, label: &str) {
    for case in &fixture().tokenize {
        let ids = tokenizer.encode(&case.text).unwrap();
        assert_eq!(ids, case.ids, "{label}: ids of {:?}", case.text);
        let tokens: Vec<String> = ids
            .iter()
            .map(|&id| tokenizer.id_to_token(id).unwrap())
            .collect();
        assert_eq!(tokens, case.tokens, "{label}: tokens of {:?}", case.text);
    }
    for case in &fixture().decode {
        assert_eq!(
            tokenizer.decode(&case.ids, false).unwrap(),
            case.text,
            "{label}: decode {:?}",
            case.ids
        );
    }
}

#[test]
fn gguf_tokenizer_gives_transformers_ids() {
    let _rng = crate::test_rng_lock();
    let tokenizer = gguf_tokenizer();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.eos_id, Some(2));
    check_tokenizer(&tokenizer, "from GGUF");
}

#[test]
fn tokenizer_json_round_trip_gives_the_same_ids() {
    let _rng = crate::test_rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, gguf_tokenizer().to_json().unwrap()).unwrap();
    check_tokenizer(
        &LlmTokenizer::from_file(&path).unwrap(),
        "from tokenizer.json",
    );
}

#[test]
fn f32_log_probs_match_transformers_within_1e_3() {
    let _rng = crate::test_rng_lock();
    let model = loaded(Kind::Float);
    for case in &fixture().score {
        let prompt = model.tokenizer.encode(&case.prompt).unwrap();
        let cont = model.tokenizer.encode(&case.continuation).unwrap();
        assert_eq!(prompt, case.prompt_ids);
        assert_eq!(cont, case.continuation_ids);
        let score = score_continuations(&model.model, &prompt, &[cont]).unwrap();
        let got = &score[0];
        for (i, (a, b)) in got
            .token_logprobs
            .iter()
            .zip(&case.token_logprobs)
            .enumerate()
        {
            assert!(
                (f64::from(*a) - b).abs() < 1e-3,
                "{:?} + {:?}: token {i}: {a} vs HF {b}",
                case.prompt,
                case.continuation
            );
        }
        assert!(
            (got.sum_logprob - case.sum_logprob).abs() < 1e-3 * case.continuation_ids.len() as f64
        );
    }
}

#[test]
fn f32_last_logits_match_transformers() {
    let _rng = crate::test_rng_lock();
    let model = loaded(Kind::Float);
    for case in &fixture().last_logits {
        let ids: Vec<i64> = case.prompt_ids.iter().map(|&i| i64::from(i)).collect();
        let ids = tch::Tensor::from_slice(&ids).view([1, -1]);
        let logits = tch::no_grad(|| {
            let hidden = model.model.forward_ids(&ids, None).unwrap();
            model.model.last_logits(&hidden).unwrap()
        });
        let (values, indices) = logits.get(0).topk(10, -1, true, true);
        let indices = Vec::<i64>::try_from(indices).unwrap();
        let values = Vec::<f64>::try_from(values.to_kind(Kind::Double)).unwrap();
        assert_eq!(indices, case.top10_ids);
        for (a, b) in values.iter().zip(&case.top10_logits) {
            assert!((a - b).abs() < 2e-3, "logit {a} vs HF {b}");
        }
    }
}

#[test]
fn the_default_model_has_the_smollm2_135m_shape() {
    let _rng = crate::test_rng_lock();
    let got = loaded(Kind::Float).model.config.clone();
    let mut expected = crate::LlamaConfig::smollm2_135m();
    // GGUF stores the epsilon as an f32 (1e-5 reads back as 9.99999975e-6).
    assert!((got.rms_norm_eps - expected.rms_norm_eps).abs() < 1e-12);
    expected.rms_norm_eps = got.rms_norm_eps;
    assert_eq!(got, expected);
}

#[test]
fn greedy_generation_matches_transformers() {
    let _rng = crate::test_rng_lock();
    let model = loaded(Kind::Float);
    let options = GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::Greedy,
        // The fixture continues past EOS, as an argmax loop does.
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let prompts: Vec<Vec<u32>> = fixture()
        .greedy
        .iter()
        .map(|c| model.tokenizer.encode(&c.prompt).unwrap())
        .collect();
    for (p, case) in prompts.iter().zip(&fixture().greedy) {
        assert_eq!(p, &case.prompt_ids);
    }
    // One prompt at a time, then all together (left-padded batch): the same tokens.
    for (p, case) in prompts.iter().zip(&fixture().greedy) {
        let g = generate(
            &model.model,
            &model.tokenizer,
            std::slice::from_ref(p),
            &options,
        )
        .unwrap();
        assert_eq!(g[0].token_ids, case.new_ids, "{:?}", case.prompt);
    }
    let batched = generate(&model.model, &model.tokenizer, &prompts, &options).unwrap();
    for (g, case) in batched.iter().zip(&fixture().greedy) {
        assert_eq!(g.token_ids, case.new_ids, "batched: {:?}", case.prompt);
    }
}

#[test]
fn bf16_stays_close_to_transformers_f32() {
    let _rng = crate::test_rng_lock();
    let model = loaded(Kind::BFloat16);
    assert_eq!(model.model.kind(), Kind::BFloat16);
    for case in &fixture().score {
        let score = score_continuations(
            &model.model,
            &case.prompt_ids,
            std::slice::from_ref(&case.continuation_ids),
        )
        .unwrap();
        // bf16 keeps 8 bits of mantissa: sums of a few tokens stay within a few tenths.
        let tolerance = 0.15 * case.continuation_ids.len() as f64 + 0.1 * case.sum_logprob.abs();
        assert!(
            (score[0].sum_logprob - case.sum_logprob).abs() < tolerance,
            "{:?}: bf16 {} vs HF f32 {}",
            case.continuation,
            score[0].sum_logprob,
            case.sum_logprob
        );
    }
}

/// Stop rules and sampling on the real model (greedy continues "The capital of France is"
/// with " Paris.\n\nThe answer is:", per the fixture).
#[test]
fn generation_stops_and_samples_as_configured() {
    let _rng = crate::test_rng_lock();
    let model = loaded(Kind::Float);
    let prompt = model.tokenizer.encode("The capital of France is").unwrap();
    let run = |options: GenerateOptions| {
        generate(
            &model.model,
            &model.tokenizer,
            std::slice::from_ref(&prompt),
            &options,
        )
        .unwrap()
        .remove(0)
    };
    let base = GenerateOptions {
        max_new_tokens: 8,
        ..GenerateOptions::default()
    };
    let newline = run(GenerateOptions {
        stop_on_newline: true,
        ..base.clone()
    });
    assert_eq!(newline.finish_reason, crate::FinishReason::Newline);
    assert_eq!(
        newline.token_ids,
        vec![7042, 30, 198],
        "' Paris', '.', newline"
    );
    // A leading newline does not end the answer (LLaRA strips before taking the first line):
    // the LLaRA prompt's greedy answer starts with one.
    let llara = &fixture().greedy[2];
    assert_eq!(
        llara.new_ids[0], 198,
        "the fixture's LLaRA answer starts with a newline"
    );
    let skipped = generate(
        &model.model,
        &model.tokenizer,
        std::slice::from_ref(&llara.prompt_ids),
        &GenerateOptions {
            stop_on_newline: true,
            ..base.clone()
        },
    )
    .unwrap()
    .remove(0);
    assert!(skipped.token_ids.len() > 1, "{:?}", skipped.token_ids);
    assert_eq!(
        skipped.token_ids[..],
        llara.new_ids[..skipped.token_ids.len()]
    );
    let stop = run(GenerateOptions {
        stop_strings: vec!["answer".into()],
        ..base.clone()
    });
    assert_eq!(stop.finish_reason, crate::FinishReason::StopString);
    assert_eq!(stop.text, " Paris.\n\nThe ");
    let capped = run(GenerateOptions {
        max_new_tokens: 2,
        ..base.clone()
    });
    assert_eq!(capped.finish_reason, crate::FinishReason::Length);
    assert_eq!(capped.token_ids.len(), 2);

    // A vanishing top-p keeps only the most likely token: greedy again.
    let narrow = run(GenerateOptions {
        sampling: Sampling::TopP {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 1,
        },
        ..base.clone()
    });
    assert_eq!(narrow.token_ids, fixture().greedy[0].new_ids);
    // Hot sampling differs from greedy, and the same seed repeats it exactly.
    let hot = |seed| {
        run(GenerateOptions {
            sampling: Sampling::TopP {
                temperature: 2.0,
                top_p: 1.0,
                seed,
            },
            stop_on_eos: false,
            ..base.clone()
        })
        .token_ids
    };
    let (a, b) = (hot(7), hot(7));
    assert_eq!(a, b, "same seed, same tokens");
    assert_ne!(
        a,
        fixture().greedy[0].new_ids,
        "temperature 2 should leave the greedy path"
    );
    let bad = generate(
        &model.model,
        &model.tokenizer,
        std::slice::from_ref(&prompt),
        &GenerateOptions {
            sampling: Sampling::TopP {
                temperature: 0.0,
                top_p: 0.9,
                seed: 0,
            },
            ..base
        },
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("temperature"), "{bad}");
}

/// Overrides in a left-padded batch land on the same prompt tokens as when each prompt runs
/// alone (the padding shift is applied), so batched and single generation agree.
#[test]
fn overrides_in_a_padded_batch_match_single_prompts() {
    let _rng = crate::test_rng_lock();
    let model = loaded(Kind::Float);
    let prompts: Vec<Vec<u32>> = fixture()
        .greedy
        .iter()
        .map(|c| c.prompt_ids.clone())
        .collect();
    tch::manual_seed(3);
    let vectors =
        tch::Tensor::randn([prompts.len() as i64, 576], (Kind::Float, Device::Cpu)) * 0.05;
    let options = GenerateOptions {
        max_new_tokens: 4,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let overrides = |rows: &[i64], which: &[i64]| crate::SlotOverrides {
        batch: tch::Tensor::from_slice(rows),
        position: tch::Tensor::from_slice(&vec![2i64; rows.len()]),
        vectors: vectors.index_select(0, &tch::Tensor::from_slice(which)),
    };
    let all: Vec<i64> = (0..prompts.len() as i64).collect();
    let batched = crate::generate_with(
        &model.model,
        &model.tokenizer,
        &prompts,
        Some(&overrides(&all, &all)),
        &options,
    )
    .unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let single = crate::generate_with(
            &model.model,
            &model.tokenizer,
            std::slice::from_ref(prompt),
            Some(&overrides(&[0], &[i as i64])),
            &options,
        )
        .unwrap();
        assert_eq!(single[0].token_ids, batched[i].token_ids, "prompt {i}");
    }
    // The overrides must matter, or the comparison above proves nothing.
    let plain = crate::generate(&model.model, &model.tokenizer, &prompts, &options).unwrap();
    assert!(
        plain
            .iter()
            .zip(&batched)
            .any(|(p, b)| p.token_ids != b.token_ids),
        "overriding a prompt token changed no generation"
    );
}
