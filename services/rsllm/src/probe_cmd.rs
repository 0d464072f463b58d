//! `rsllm probe-heads`: the alignment heads' ceiling with the LLM taken out
//! (`rsllm_trainer::probe`): what L_ui's heads reach when the user side is handed the
//! recommender's user state, beside the recommender itself on the same rows.

use anyhow::Context;
use clap::{Args, ValueEnum};
use rsllm_core::Paths;
use rsllm_core::metrics::RankingMetrics;
use rsllm_trainer::probe::{ProbeConfig, ProbeUser, probe_heads};
use rsllm_trainer::stage::item_table;

use crate::data_cmd::SplitArgs;
use crate::llm_cmd::ModelArgs;
use crate::rec_cmd::{Kind, model_dir};
use crate::train_cmd::{UiNegativesArg, UiSimilarityArg};

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    split: SplitArgs,
    /// The LLM whose input embeddings give the title vectors `t_i` (no transformer pass runs).
    #[command(flatten)]
    model: ModelArgs,
    /// The recommender whose item vectors and user states the heads read.
    #[arg(long, env = "RSLLM_REC_MODEL", default_value = "sasrec")]
    rec_model: Kind,
    /// The user side: state (`P(s_u)`, the recommender's user state) or history-mean (the mean
    /// of `P(e_j)` over the history: no sequence model).
    #[arg(long, default_value = "state")]
    user: UserArg,
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Training rows per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Peak learning rate (warm-up over 5 % of the steps, then cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.07)]
    tau: f64,
    #[arg(long, default_value = "cosine")]
    ui_similarity: UiSimilarityArg,
    /// L_ui's negatives: candidates (a row's drawn candidates and the batch's other targets,
    /// as a stage trains) or catalog (every item, as the recommenders train).
    #[arg(long, default_value = "candidates")]
    ui_negatives: UiNegativesArg,
    /// L_it's weight relative to L_ui's (a stage weighs both 0.1: 1).
    #[arg(long, default_value_t = 1.0)]
    lambda_it: f64,
    /// Leave the title vector out of the item side: `v_i = W_v P(e_i)`.
    #[arg(long)]
    no_item_text: bool,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UserArg {
    State,
    HistoryMean,
}

pub fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    let data = args.split.prepare(&paths)?;
    let dir = model_dir(&paths, &args.split, args.rec_model);
    if !dir.join("manifest.json").is_file() {
        anyhow::bail!(
            "no trained recommender at {}: run `rsllm rec train --dataset {} --model {}` first",
            dir.display(),
            args.split.dataset,
            args.rec_model.name()
        );
    }
    let base = args.model.load()?;
    let (items, version) = item_table(&base, &data.catalog, Some(&dir), true)?;
    let config = ProbeConfig {
        steps: args.steps,
        batch: args.batch,
        peak_lr: args.lr,
        tau: args.tau,
        similarity: args.ui_similarity.similarity(),
        negatives: args.ui_negatives.negatives(),
        lambda_it: args.lambda_it,
        item_text: !args.no_item_text,
        user: match args.user {
            UserArg::State => ProbeUser::State,
            UserArg::HistoryMean => ProbeUser::HistoryMean,
        },
        num_candidates: args.split.num_candidates,
        seed: args.seed,
    };
    let started = std::time::Instant::now();
    let report = probe_heads(
        &base.model,
        &items,
        &data.train,
        &[("test", &data.test), ("val", &data.val)],
        config,
    )
    .with_context(|| format!("heads probe on {}", args.split.dataset))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let cell = |m: &RankingMetrics| {
        format!(
            "{:.3} [{:.3}, {:.3}] / {:.3} / {:.3}",
            m.hr1.mean, m.hr1.low, m.hr1.high, m.hr5.mean, m.ndcg5.mean
        )
    };
    println!(
        "heads probe on {} ({} {}, {:?}): {} steps of {} of {} training rows in {:.0} s; loss {:.3} -> {:.3}",
        args.split.dataset,
        args.rec_model.name(),
        version.as_deref().unwrap_or("?"),
        base.model.device(),
        report.config.steps,
        report.config.batch,
        report.train_rows,
        started.elapsed().as_secs_f64(),
        report.loss_first,
        report.loss_last
    );
    println!(
        "part | rows | heads HR@1 [95 %] / HR@5 / NDCG@5 | recommender (dot) | recommender (cosine)"
    );
    for part in &report.parts {
        println!(
            "{} | {} | {} | {} | {}",
            part.part,
            part.heads.n,
            cell(&part.heads),
            cell(&part.recommender_dot),
            cell(&part.recommender_cosine)
        );
    }
    Ok(())
}
