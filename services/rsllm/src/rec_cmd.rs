//! `rsllm rec train|eval`: the ID-based sequential recommenders.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use rsllm_core::metrics::{MeanCi, RankingMetrics};
use rsllm_core::{Paths, SplitPart};
use rsllm_recommender::eval::Similarity;
use rsllm_recommender::{ModelKind, RecConfig, RecModel};

use crate::data_cmd::{SplitArgs, short};

#[derive(Debug, Subcommand)]
pub enum RecCommand {
    /// Trains a recommender with early stopping on validation HR@1 and stores the artefact.
    Train {
        #[command(flatten)]
        target: ModelArgs,
        /// Maximum epochs (early stopping usually ends sooner).
        #[arg(long, env = "RSLLM_REC_MAX_EPOCHS")]
        max_epochs: Option<usize>,
        /// Epochs without a better validation HR@1 before stopping.
        #[arg(long, env = "RSLLM_REC_PATIENCE")]
        patience: Option<usize>,
        /// Training seed.
        #[arg(long, env = "RSLLM_REC_SEED")]
        seed: Option<u64>,
        /// Learning rate.
        #[arg(long, env = "RSLLM_REC_LR")]
        lr: Option<f64>,
        /// Standard deviation of the item-embedding init (the default depends on --model).
        #[arg(long, env = "RSLLM_REC_ITEM_INIT_STD")]
        item_init_std: Option<f64>,
        /// Print the resulting manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evaluates trained recommenders on the split's stored candidates: HR@1, HR@5, NDCG@5 with
    /// 95% intervals. Without --model, every trained model of the split is listed.
    Eval {
        #[command(flatten)]
        split: SplitArgs,
        /// sasrec, gru4rec or caser; all trained ones when omitted.
        #[arg(long)]
        model: Option<Kind>,
        /// Which rows: test (default) or val.
        #[arg(long, default_value = "test")]
        part: Part,
        /// How candidates are scored: dot (the recommender's own scores) or cosine (item
        /// norms ignored, as RSLLM's alignment heads rank: what that costs the recommender).
        #[arg(long, default_value = "dot")]
        similarity: SimilarityArg,
        /// Print JSON (one object, or an array without --model).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub split: SplitArgs,
    /// sasrec, gru4rec or caser.
    #[arg(long, env = "RSLLM_REC_MODEL", default_value = "sasrec")]
    pub model: Kind,
    /// cpu, cuda or auto (CUDA when present).
    #[arg(long, env = "RSLLM_DEVICE", default_value = "auto")]
    pub device: DeviceArg,
}

/// clap-facing mirror of [`ModelKind`], kept here so the library needs no clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Sasrec,
    Gru4rec,
    Caser,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Sasrec, Kind::Gru4rec, Kind::Caser];

    pub fn model_kind(self) -> ModelKind {
        match self {
            Kind::Sasrec => ModelKind::Sasrec,
            Kind::Gru4rec => ModelKind::Gru4rec,
            Kind::Caser => ModelKind::Caser,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Sasrec => "sasrec",
            Kind::Gru4rec => "gru4rec",
            Kind::Caser => "caser",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SimilarityArg {
    Dot,
    Cosine,
}

impl SimilarityArg {
    fn similarity(self) -> Similarity {
        match self {
            SimilarityArg::Dot => Similarity::Dot,
            SimilarityArg::Cosine => Similarity::Cosine,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    Val,
    Test,
}

impl Part {
    pub fn split_part(self) -> SplitPart {
        match self {
            Part::Val => SplitPart::Val,
            Part::Test => SplitPart::Test,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> anyhow::Result<tch::Device> {
        match self {
            DeviceArg::Auto => Ok(tch::Device::cuda_if_available()),
            DeviceArg::Cpu => Ok(tch::Device::Cpu),
            DeviceArg::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
            DeviceArg::Cuda => anyhow::bail!("--device cuda: no CUDA device is available"),
        }
    }
}

/// `<cache>/models/rec/<dataset>-<protocol>-<model>`: also the model name the
/// embedding-service serves it under.
pub fn model_dir(paths: &Paths, split: &SplitArgs, kind: Kind) -> PathBuf {
    paths.models_dir().join("rec").join(format!(
        "{}-{}-{}",
        split.dataset,
        split.protocol,
        kind.name()
    ))
}

pub fn run(command: RecCommand) -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    match command {
        RecCommand::Train {
            target,
            max_epochs,
            patience,
            seed,
            lr,
            item_init_std,
            json,
        } => {
            let data = target.split.prepare(&paths)?;
            let mut config = RecConfig::default_for(target.model.model_kind());
            if let Some(v) = max_epochs {
                config.max_epochs = v;
            }
            if let Some(v) = patience {
                config.patience = v;
            }
            if let Some(v) = seed {
                config.seed = v;
            }
            if let Some(v) = lr {
                config.lr = v;
            }
            if let Some(v) = item_init_std {
                config.item_init_std = v;
            }
            let dir = model_dir(&paths, &target.split, target.model);
            let device = target.device.device()?;
            let manifest = rsllm_recommender::train::train(
                &data,
                target.model.model_kind(),
                &config,
                &dir,
                device,
                !json,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&manifest)?);
            } else {
                println!(
                    "trained {} on {}-{}: version {} in {}",
                    target.model.name(),
                    target.split.dataset,
                    target.split.protocol,
                    short(&manifest.version),
                    dir.display()
                );
            }
            Ok(())
        }
        RecCommand::Eval {
            split,
            model,
            part,
            similarity,
            json,
        } => {
            let data = split.prepare(&paths)?;
            let part = part.split_part();
            let kinds: Vec<Kind> = match model {
                Some(kind) => vec![kind],
                None => Kind::ALL
                    .into_iter()
                    .filter(|&k| model_dir(&paths, &split, k).join("manifest.json").exists())
                    .collect(),
            };
            anyhow::ensure!(
                !kinds.is_empty(),
                "no trained model for {}-{}: run `rsllm rec train --dataset {} --protocol {}` first",
                split.dataset,
                split.protocol,
                split.dataset,
                split.protocol
            );
            let mut results = Vec::new();
            for kind in kinds {
                let dir = model_dir(&paths, &split, kind);
                let model = RecModel::load(&dir, tch::Device::Cpu)
                    .with_context(|| format!("loading {}", dir.display()))?;
                anyhow::ensure!(
                    model.manifest.split_version == data.manifest.version,
                    "{} was trained on split version {}, but the prepared split is {}: retrain it",
                    dir.display(),
                    short(&model.manifest.split_version),
                    short(&data.manifest.version)
                );
                let metrics = rsllm_recommender::eval::evaluate_by(
                    &model,
                    data.rows(part),
                    similarity.similarity(),
                )?;
                results.push((kind, model.manifest.version.clone(), metrics));
            }
            if json {
                let objects: Vec<_> = results
                    .iter()
                    .map(|(kind, version, m)| {
                        let mut object = eval_json(&split, part, *kind, version, m);
                        if similarity != SimilarityArg::Dot {
                            object["similarity"] = "cosine".into();
                        }
                        object
                    })
                    .collect();
                let out = if model.is_some() {
                    objects.into_iter().next().unwrap_or_default()
                } else {
                    serde_json::Value::Array(objects)
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_table(&split, part, &results);
            }
            Ok(())
        }
    }
}

fn eval_json(
    split: &SplitArgs,
    part: SplitPart,
    kind: Kind,
    version: &str,
    m: &RankingMetrics,
) -> serde_json::Value {
    let ci = |c: &MeanCi| serde_json::json!([c.low, c.high]);
    serde_json::json!({
        "dataset": split.dataset.to_string(),
        "protocol": split.protocol.to_string(),
        "part": part.as_str(),
        "model": kind.name(),
        "version": version,
        "n": m.n,
        "hr1": m.hr1.mean,
        "hr5": m.hr5.mean,
        "ndcg5": m.ndcg5.mean,
        "ci95": { "hr1": ci(&m.hr1), "hr5": ci(&m.hr5), "ndcg5": ci(&m.ndcg5) },
    })
}

fn print_table(split: &SplitArgs, part: SplitPart, results: &[(Kind, String, RankingMetrics)]) {
    println!(
        "{}-{} {} rows, {} candidates each",
        split.dataset,
        split.protocol,
        part.as_str(),
        split.num_candidates
    );
    println!(
        "| model   | n    | HR@1  | 95% CI        | HR@5  | NDCG@5 | version      |\n\
         |---------|------|-------|---------------|-------|--------|--------------|"
    );
    for (kind, version, m) in results {
        println!(
            "| {:<7} | {:<4} | {:.3} | {:.3} - {:.3} | {:.3} | {:.3}  | {} |",
            kind.name(),
            m.n,
            m.hr1.mean,
            m.hr1.low,
            m.hr1.high,
            m.hr5.mean,
            m.ndcg5.mean,
            short(version)
        );
    }
}
