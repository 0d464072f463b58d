//! What a training step's batching costs before the model runs: how fast the loader thread
//! builds prompts from a prepared split, and how many token positions the micro-batches
//! compute (each pads to its longest row) with and without grouping rows by length
//! (`TrainConfig::group_by_length`), and with steps dealt out of windows of `--window` steps
//! regrouped by length (`TrainConfig::length_window_steps`); with `--rank-negatives K`, rows
//! as L_rank packs them (the prompt, then the target's and K other candidates' answers).
//! Needs the prepared split and the set-up model's tokenizer; no libtorch work.
//!
//! ```text
//! cargo bench -p rsllm-trainer --bench batching_bench -- [--dataset movielens]
//!     [--micro-batch 64] [--grad-accum 2] [--steps 40] [--window 16] [--mode unified|text-only]
//!     [--rank-negatives K]
//! ```
//! One JSON line on stdout; a sentence on stderr.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rsllm_core::{DatasetName, PrepareOptions, Protocol};
use rsllm_prompt::PromptMode;
use rsllm_prompt::tokenizer::{LlmTokenizer, default_model_path};
use rsllm_trainer::ExampleSource;
use rsllm_trainer::batch::sequence_len;
use rsllm_trainer::stage::{Domain, MixedRows, TrainSubset};
use rsllm_trainer::train_loop::{group_window, micro_batches, padded_positions};

fn main() {
    let (mut dataset, mut micro, mut accum, mut steps, mut window, mut mode) = (
        "movielens".to_owned(),
        64usize,
        2usize,
        40usize,
        16usize,
        PromptMode::Unified,
    );
    let mut ranking: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match flag.as_str() {
            "--dataset" => dataset = value(),
            "--micro-batch" => micro = value().parse().expect("--micro-batch N"),
            "--grad-accum" => accum = value().parse().expect("--grad-accum N"),
            "--steps" => steps = value().parse().expect("--steps N"),
            "--window" => window = value().parse().expect("--window N"),
            "--rank-negatives" => {
                ranking = Some(value().parse().expect("--rank-negatives K"));
            }
            "--mode" => {
                mode = match value().as_str() {
                    "unified" => PromptMode::Unified,
                    "text-only" => PromptMode::TextOnly,
                    other => panic!("--mode unified|text-only, not {other}"),
                }
            }
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    let name: DatasetName = dataset
        .parse()
        .expect("--dataset movielens|lastfm|steam...");
    let paths = rsllm_core::Paths::from_env().expect("data and cache directories");
    let (data, _) = rsllm_core::dataset::prepare_or_reuse(
        name,
        Protocol::Llara,
        &PrepareOptions::default(),
        &paths,
    )
    .expect("the prepared split");
    let model = default_model_path().expect("a cache directory");
    let tokenizer = LlmTokenizer::from_path(&model).expect("the set-up model's tokenizer");
    let domain = Domain {
        dataset: &dataset,
        catalog: &data.catalog,
        rows: &data.train,
    };
    let slot = tokenizer.pad_id.unwrap_or(0);
    let source = MixedRows::new(
        &tokenizer,
        &[domain],
        slot,
        mode,
        20,
        (None, TrainSubset::Spread),
    )
    .expect("training rows")
    .with_candidate_answers(ranking.is_some());
    let per_step = micro * accum;
    let mut order: Vec<usize> = (0..source.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(1234));
    let (mut real, mut plain, mut grouped, mut built) = (0usize, 0usize, 0usize, 0usize);
    let mut length = std::collections::HashMap::new();
    let started = Instant::now();
    for (step, rows) in order.chunks(per_step).take(steps).enumerate() {
        let lengths: Vec<usize> = rows
            .iter()
            .map(|&i| {
                let p = source.build(i, (step * per_step + i) as u64, None).unwrap();
                let n = sequence_len(&p, ranking);
                length.insert(i, n);
                n
            })
            .collect();
        built += rows.len();
        real += lengths.iter().sum::<usize>();
        plain += padded_positions(&lengths, &micro_batches(&lengths, micro, false));
        grouped += padded_positions(&lengths, &micro_batches(&lengths, micro, true));
    }
    let seconds = started.elapsed().as_secs_f64();
    // The same rows dealt out of windows regrouped by length, then grouped within each step.
    let drawn = &order[..built];
    let mut windowed = 0usize;
    for (w, rows) in drawn.chunks(window.max(1) * per_step).enumerate() {
        let dealt = if window > 1 {
            group_window(rows, per_step, |i| length[&i], w as u64)
        } else {
            rows.to_vec()
        };
        for step_rows in dealt.chunks(per_step) {
            let lengths: Vec<usize> = step_rows.iter().map(|i| length[i]).collect();
            windowed += padded_positions(&lengths, &micro_batches(&lengths, micro, true));
        }
    }
    let line = serde_json::json!({
        "dataset": dataset, "mode": format!("{mode:?}"), "micro_batch": micro,
        "grad_accum": accum, "steps": steps, "prompts": built,
        "ms_per_prompt": seconds * 1e3 / built as f64,
        "real_tokens_per_prompt": real as f64 / built as f64,
        "computed_per_real": plain as f64 / real as f64,
        "computed_per_real_grouped": grouped as f64 / real as f64,
        "window": window, "rank_negatives": ranking,
        "computed_per_real_windowed": windowed as f64 / real as f64,
    });
    println!("{line}");
    eprintln!(
        "{dataset} {mode:?}, {micro} x {accum} rows per step: {:.3} ms per prompt built; \
         computed / real tokens {:.3} as drawn, {:.3} grouped by length within a step, \
         {:.3} dealt out of windows of {window} steps",
        seconds * 1e3 / built as f64,
        plain as f64 / real as f64,
        grouped as f64 / real as f64,
        windowed as f64 / real as f64
    );
}
