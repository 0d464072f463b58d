//! `rsllm eval`: the LLM on a split's stored candidates, in generative and ranking mode, with
//! per-row outputs in a CSV. Without trained adapters this is the zero-shot row of the table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rsllm_core::Paths;
use rsllm_prompt::{PromptBuilder, PromptMode, PromptOptions};
use rsllm_trainer::eval::{EvalOptions, Evaluated, evaluate, write_csv};
use serde_json::json;

use crate::data_cmd::SplitArgs;
use crate::llm_cmd::ModelArgs;
use crate::rec_cmd::Part;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Modes {
    Both,
    Generative,
    Ranking,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    split: SplitArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Which rows: test (default) or val.
    #[arg(long, default_value = "test")]
    part: Part,
    /// Which evaluation modes to run (ranking also ranks by a trained stage's alignment heads).
    #[arg(long, default_value = "both")]
    modes: Modes,
    /// A trained stage's output directory (from `rsllm train`): its adapters, projector and
    /// prompt mode are used. Without it the base model is evaluated zero-shot.
    #[arg(long)]
    stage_dir: Option<PathBuf>,
    /// Evaluate only the first N rows (quick looks; reported as such).
    #[arg(long)]
    limit: Option<usize>,
    /// Rows generated together.
    #[arg(long, default_value_t = 8)]
    generation_batch: usize,
    /// Where rows.csv and metrics.json go (default: runs/eval-<dataset>-<protocol>-<part>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    let data = args.split.prepare(&paths)?;
    let part = args.part.split_part();
    let mut rows = data.rows(part).to_vec();
    if let Some(limit) = args.limit {
        rows.truncate(limit);
    }
    let mut loaded = args.model.load()?;
    let slot = loaded.tokenizer.pad_id.unwrap_or(0);
    let builder = PromptBuilder::with_builtin_templates(
        &args.split.dataset.to_string(),
        PromptOptions::new(slot),
    )?;
    let defaults = EvalOptions::default();
    let (trained, prompt_mode, method, heads) = match &args.stage_dir {
        None => (
            None,
            PromptMode::TextOnly,
            "zero-shot".to_owned(),
            (defaults.alignment_tau, defaults.alignment_similarity),
        ),
        Some(dir) => {
            let (spec, rsllm, step) =
                rsllm_trainer::stage::open_stage(&mut loaded, dir, &data.catalog)?;
            if spec.dataset != args.split.dataset.to_string() {
                anyhow::bail!(
                    "{} was trained on {}, not {}",
                    dir.display(),
                    spec.dataset,
                    args.split.dataset
                );
            }
            let method = format!("stage {} ({}, step {step})", spec.stage, dir.display());
            let loss = &spec.train.loss;
            let heads = (loss.tau, loss.ui_similarity);
            (Some(rsllm), spec.prompt_mode(), method, heads)
        }
    };
    let evaluated = Evaluated {
        model: &loaded.model,
        tokenizer: &loaded.tokenizer,
        heads: trained.as_ref().map(|t| &t.heads),
        items: trained.as_ref().map(|t| &t.items),
    };
    let options = EvalOptions {
        prompt_mode,
        generative: args.modes != Modes::Ranking,
        ranking: args.modes != Modes::Generative,
        // With ranking: the alignment heads' ranking too (a trained stage's, one prompt
        // forward per row).
        alignment: args.modes != Modes::Generative,
        alignment_tau: heads.0,
        alignment_similarity: heads.1,
        generation_batch: args.generation_batch,
        ..EvalOptions::default()
    };
    let bar = indicatif::ProgressBar::new((rows.len() * options.passes(trained.is_some())) as u64);
    let started = Instant::now();
    let report = evaluate(
        &evaluated,
        &builder,
        &data.catalog,
        &rows,
        &options,
        &mut |k| bar.inc(k as u64),
    )?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let out = match args.out {
        Some(out) => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            out
        }
        None => new_default_dir(&format!(
            "eval-{}-{}-{}-{}",
            args.split.dataset,
            args.split.protocol,
            part.as_str(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ))?,
    };
    let rows_path = out.join("rows.csv");
    write_csv(&rows_path, &report)?;
    // metrics.json goes last and names the rows file's hash: a rows.csv left by another
    // evaluation into the same --out does not pass for this one's.
    let rows_sha256 = rsllm_core::artefact::sha256_file(&rows_path)
        .with_context(|| format!("hashing {}", rows_path.display()))?;
    let metrics = json!({
        "method": method,
        "dataset": args.split.dataset.to_string(),
        "protocol": args.split.protocol.to_string(),
        "part": part.as_str(),
        "model": loaded.path,
        "dtype": args.model.dtype,
        "n": report.n,
        "limit": args.limit,
        "valid_ratio": report.valid_ratio,
        "hr1_generative": report.hr1_generative,
        "ranking": report.ranking,
        "alignment": report.alignment,
        "combined": report.combined,
        "seconds": seconds,
        "rows_csv": {"file": "rows.csv", "sha256": rows_sha256},
    });
    rsllm_core::artefact::write_json_atomic(&out.join("metrics.json"), &metrics)?;
    if args.json {
        println!("{metrics}");
    } else {
        println!("| mode | n | HR@1 | ValidRatio | HR@5 | NDCG@5 |");
        println!("|---|---|---|---|---|---|");
        let ci = |m: &rsllm_core::metrics::MeanCi| {
            format!("{:.3} [{:.3}, {:.3}]", m.mean, m.low, m.high)
        };
        if let (Some(hr), Some(valid)) = (&report.hr1_generative, &report.valid_ratio) {
            println!(
                "| generative | {} | {} | {} | | |",
                report.n,
                ci(hr),
                ci(valid)
            );
        }
        for (mode, ranked) in [
            ("ranking", &report.ranking),
            ("alignment heads", &report.alignment),
            ("likelihood + alignment", &report.combined),
        ] {
            if let Some(r) = ranked {
                println!(
                    "| {mode} | {} | {} | 1 | {} | {} |",
                    r.n,
                    ci(&r.hr1),
                    ci(&r.hr5),
                    ci(&r.ndcg5)
                );
            }
        }
        println!("rows and metrics: {} ({seconds:.0} s)", out.display());
    }
    Ok(())
}

/// Creates `runs/<name>` (or `runs/<name>-2`, `-3`, ... when taken): two evaluations started
/// in the same second never write into one directory.
fn new_default_dir(name: &str) -> anyhow::Result<PathBuf> {
    new_dir_under(Path::new("runs"), name)
}

fn new_dir_under(parent: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    for n in 1..=1000 {
        let dir = if n == 1 {
            parent.join(name)
        } else {
            parent.join(format!("{name}-{n}"))
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    anyhow::bail!(
        "{}: 1000 directories named {name}-N exist",
        parent.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_directories_are_never_shared() {
        let parent = tempfile::tempdir().unwrap();
        let first = new_dir_under(parent.path(), "eval-x").unwrap();
        let second = new_dir_under(parent.path(), "eval-x").unwrap();
        assert_eq!(first, parent.path().join("eval-x"));
        assert_eq!(second, parent.path().join("eval-x-2"));
    }
}
