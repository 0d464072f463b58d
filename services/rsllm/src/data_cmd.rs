//! `rsllm data prepare|stats`.

use clap::{Args, Subcommand};
use rsllm_core::{DatasetName, Paths, PrepareOptions, PreparedDataset, Protocol, SplitPart};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Prepares a split (once; later calls reuse it) and prints where it lives.
    Prepare(SplitArgs),
    /// Prints users, items, interactions and rows per split (prepares first if needed).
    Stats {
        #[command(flatten)]
        split: SplitArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Which split of which dataset, with the preparation knobs recorded in its manifest.
#[derive(Debug, Clone, Args)]
pub struct SplitArgs {
    /// movielens, lastfm, steam or steam-valtrain.
    #[arg(long, env = "RSLLM_DATASET", default_value = "movielens")]
    pub dataset: DatasetName,
    /// llara (LLaRA's user split, its own files where they exist) or loo (leave-last-out).
    #[arg(long, env = "RSLLM_PROTOCOL", default_value = "llara")]
    pub protocol: Protocol,
    /// Candidates per validation/test row, the target included.
    #[arg(long, env = "RSLLM_NUM_CANDIDATES", default_value_t = 20)]
    pub num_candidates: usize,
    /// Seed of the one-time candidate draw.
    #[arg(long, env = "RSLLM_SPLIT_SEED", default_value_t = 4321)]
    pub split_seed: u64,
}

impl SplitArgs {
    pub fn options(&self) -> PrepareOptions {
        PrepareOptions {
            num_candidates: self.num_candidates,
            seed: self.split_seed,
            ..PrepareOptions::default()
        }
    }

    /// Prepares the split, or reuses it when it is already prepared with these settings.
    pub fn prepare(&self, paths: &Paths) -> anyhow::Result<PreparedDataset> {
        Ok(rsllm_core::dataset::prepare(
            self.dataset,
            self.protocol,
            &self.options(),
            paths,
        )?)
    }
}

pub fn run(command: DataCommand) -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    match command {
        DataCommand::Prepare(split) => {
            let data = split.prepare(&paths)?;
            println!(
                "prepared {}-{} (version {}) in {}",
                split.dataset,
                split.protocol,
                short(&data.manifest.version),
                paths
                    .prepared_dir()
                    .join(format!("{}-{}", split.dataset, split.protocol))
                    .display()
            );
            Ok(())
        }
        DataCommand::Stats { split, json } => {
            let data = split.prepare(&paths)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats_json(&data))?);
            } else {
                print_stats(&data);
            }
            Ok(())
        }
    }
}

fn stats_json(data: &PreparedDataset) -> serde_json::Value {
    let m = &data.manifest;
    serde_json::json!({
        "dataset": m.dataset,
        "protocol": m.protocol,
        "users": m.num_users,
        "items": m.num_items,
        "interactions": m.num_interactions,
        "rows": {
            "train": data.train.len(),
            "val": data.val.len(),
            "test": data.test.len(),
        },
        "num_candidates": m.options.num_candidates,
        "seed": m.options.seed,
        "version": m.version,
        "notes": m.notes,
    })
}

fn print_stats(data: &PreparedDataset) {
    let m = &data.manifest;
    println!("dataset       {} ({} protocol)", m.dataset, m.protocol);
    println!("users         {}", m.num_users);
    println!("items         {}", m.num_items);
    println!("interactions  {}", m.num_interactions);
    for part in SplitPart::ALL {
        println!("rows {:<8} {}", part.as_str(), data.rows(part).len());
    }
    println!(
        "candidates    {} per val/test row, seed {}",
        m.options.num_candidates, m.options.seed
    );
    println!("version       {}", m.version);
    for note in &m.notes {
        println!("note          {note}");
    }
}

/// First 12 hex digits: enough to tell versions apart in human output.
pub fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}
