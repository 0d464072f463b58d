//! LastFM and Steam: LLaRA's processed split files (`seq` of 10 plain ids padded at the end
//! with the item count) and `id2name.txt` titles.

use super::rows::{Rows, UserSequence, leave_last_out, prefix_rows, row};
use super::sources::{ItemFormat, LlaraRow, Sources, parse_llara_rows, train_users};
use super::{Assembled, DatasetName, PrepareOptions, Protocol};
use crate::titles::parse_id2name;
use crate::{DataError, ItemId, SeqExample};

pub(crate) const LASTFM_DIR: &str = "lastfm-hetrec2011-2k";
pub(crate) const STEAM_DIR: &str = "steam";

const LASTFM_HINT: &str = "the Last.fm data is published by GroupLens (HetRec 2011): \
    https://grouplens.org/datasets/hetrec-2011/ ; LLaRA's processed splits and id2name.txt are \
    on Hugging Face (joyliao7777/LLaRA, lastfm/), the .df files converted to .jsonl as \
    lastfm-hetrec2011-2k/PROVENANCE.md describes";

const STEAM_HINT: &str = "LLaRA's Steam splits and id2name.txt are on Hugging Face \
    (joyliao7777/LLaRA, steam/), the .df files converted to .jsonl as steam/PROVENANCE.md \
    describes; the underlying data is UCSD's Steam data \
    (https://cseweb.ucsd.edu/~jmcauley/datasets.html)";

const STEAM_TRAIN_HINT: &str = "LLaRA's Steam training split is published on Hugging Face \
    (joyliao7777/LLaRA, steam/train_data.df); convert it to steam/llara/train_data.jsonl \
    (one {\"row_index\",\"seq\",\"len_seq\",\"next\"} object per line, as steam/PROVENANCE.md \
    describes for Val/Test). train_data.sample1000.jsonl is a 1000-row sample, not a training \
    split. Without it, use `--dataset steam-valtrain` (trains on LLaRA's validation users)";

/// Where a LLaRA-file dataset lives.
struct Layout {
    dataset: DatasetName,
    dir: &'static str,
    hint: &'static str,
}

const LASTFM: Layout = Layout {
    dataset: DatasetName::LastFm,
    dir: LASTFM_DIR,
    hint: LASTFM_HINT,
};

fn steam(dataset: DatasetName) -> Layout {
    Layout {
        dataset,
        dir: STEAM_DIR,
        hint: STEAM_HINT,
    }
}

impl Layout {
    fn file(&self, name: &str) -> String {
        format!("{}/llara/{name}", self.dir)
    }

    fn require(&self, sources: &Sources, files: &[&str]) -> Result<(), DataError> {
        let files: Vec<String> = files.iter().map(|name| format!("llara/{name}")).collect();
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        sources.require(self.dataset, self.dir, &files, self.hint)
    }

    fn titles(&self, sources: &mut Sources) -> Result<Vec<String>, DataError> {
        let (path, bytes) = sources.read(&self.file("id2name.txt"))?;
        parse_id2name(&bytes, &path)
    }

    fn split(
        &self,
        sources: &mut Sources,
        name: &str,
        num_items: usize,
    ) -> Result<Vec<LlaraRow>, DataError> {
        let (path, bytes) = sources.read(&self.file(name))?;
        parse_llara_rows(&bytes, &path, num_items, ItemFormat::Plain)
    }
}

/// The titles of a LLaRA-file dataset (for `load_catalog`).
pub(crate) fn titles(
    dataset: DatasetName,
    sources: &mut Sources,
) -> Result<Vec<String>, DataError> {
    let layout = match dataset {
        DatasetName::LastFm => LASTFM,
        DatasetName::Steam | DatasetName::SteamValTrain => steam(dataset),
        DatasetName::MovieLens => {
            return Err(DataError::Invalid(
                "movielens has no id2name.txt".to_owned(),
            ));
        }
    };
    layout.require(sources, &["id2name.txt"])?;
    layout.titles(sources)
}

/// A user's whole known sequence from a val/test row: its history, then its target.
fn row_sequence(row: &LlaraRow) -> Vec<ItemId> {
    let mut items = row.history.clone();
    items.push(row.next);
    items
}

/// LLaRA's val/test rows, `user` = row index, short histories dropped.
fn eval_rows(llara_rows: &[LlaraRow], options: &PrepareOptions) -> Vec<SeqExample> {
    llara_rows
        .iter()
        .enumerate()
        .filter_map(|(index, r)| row(index as u32, &r.history, r.next, options))
        .collect()
}

/// Sum of the sequence lengths, the interaction count we can reconstruct.
fn interactions<'a>(sequences: impl IntoIterator<Item = &'a Vec<ItemId>>) -> usize {
    sequences.into_iter().map(Vec::len).sum()
}

/// LastFM (llara, loo) and Steam (llara) from the three LLaRA split files.
fn with_train_file(
    layout: &Layout,
    protocol: Protocol,
    options: &PrepareOptions,
    sources: &mut Sources,
) -> Result<Assembled, DataError> {
    let name = layout.dataset.as_str();
    let files = [
        "id2name.txt",
        "train_data.jsonl",
        "Val_data.jsonl",
        "Test_data.jsonl",
    ];
    match layout.dataset {
        DatasetName::Steam => {
            // Name every missing file, but explain the (usually) missing train split first.
            let train_missing = layout.require(sources, &["train_data.jsonl"]).is_err();
            if let Err(DataError::Missing {
                dataset,
                dir,
                missing,
                hint,
            }) = layout.require(sources, &files)
            {
                let hint = if train_missing {
                    format!("{STEAM_TRAIN_HINT}. {hint}")
                } else {
                    hint
                };
                return Err(DataError::Missing {
                    dataset,
                    dir,
                    missing,
                    hint,
                });
            }
        }
        DatasetName::MovieLens | DatasetName::LastFm | DatasetName::SteamValTrain => {
            layout.require(sources, &files)?;
        }
    }
    let titles = layout.titles(sources)?;
    let num_items = titles.len();
    let train = layout.split(sources, "train_data.jsonl", num_items)?;
    let val = layout.split(sources, "Val_data.jsonl", num_items)?;
    let test = layout.split(sources, "Test_data.jsonl", num_items)?;

    let users = train_users(&train);
    let num_train_users = users.sequences.len();
    let val_sequences: Vec<Vec<ItemId>> = val.iter().map(row_sequence).collect();
    let test_sequences: Vec<Vec<ItemId>> = test.iter().map(row_sequence).collect();
    let num_users = num_train_users + val.len() + test.len();
    let num_interactions = interactions(&users.sequences)
        + interactions(&val_sequences)
        + interactions(&test_sequences);

    let mut notes = vec![format!(
        "{name}: {num_train_users} training users recovered from train_data (a user starts at a \
         row with an all-padding seq) + {} val + {} test users; interactions = each training \
         user's first history plus the `next` of its rows, plus history + next of each val/test \
         row (LLaRA's val/test files show at most the last 11 items of those users)",
        val.len(),
        test.len()
    )];
    if users.unexpected_starts > 0 {
        tracing::warn!(
            dataset = name,
            rows = users.unexpected_starts,
            "train rows that do not continue the previous row's user; each starts a new user"
        );
        notes.push(format!(
            "{} train_data rows did not continue the previous row's user and started a new one",
            users.unexpected_starts
        ));
    }

    let rows = match protocol {
        Protocol::Llara => {
            notes.push(format!(
                "{name}/llara: LLaRA's train/val/test rows as they are; `user` = training user \
                 ordinal for train rows, row index for val/test rows"
            ));
            let train_rows = train
                .iter()
                .zip(&users.row_user)
                .filter_map(|(r, &user)| row(user, &r.history, r.next, options))
                .collect();
            Rows {
                train: train_rows,
                val: eval_rows(&val, options),
                test: eval_rows(&test, options),
            }
        }
        Protocol::Loo => {
            let val_base = num_train_users;
            let test_base = val_base + val.len();
            notes.push(format!(
                "{name}/loo: leave-last-out over all users; `user` = training user ordinal \
                 (0..{val_base}), then {val_base} + val row index, then {test_base} + test row \
                 index"
            ));
            let all = users
                .sequences
                .into_iter()
                .chain(val_sequences)
                .chain(test_sequences)
                .enumerate()
                .map(|(user, items)| UserSequence {
                    user: user as u32,
                    items,
                })
                .collect::<Vec<_>>();
            leave_last_out(&all, options)
        }
    };
    Ok(Assembled {
        titles,
        rows,
        num_users,
        num_interactions,
        notes,
    })
}

/// Steam without a train file: LLaRA's validation users train, its test users test
/// (`steam-valtrain`, llara), or leave-last-out over both (`steam`/`steam-valtrain`, loo).
fn from_eval_users(
    layout: &Layout,
    protocol: Protocol,
    options: &PrepareOptions,
    sources: &mut Sources,
) -> Result<Assembled, DataError> {
    let name = layout.dataset.as_str();
    layout.require(
        sources,
        &["id2name.txt", "Val_data.jsonl", "Test_data.jsonl"],
    )?;
    let titles = layout.titles(sources)?;
    let num_items = titles.len();
    let val = layout.split(sources, "Val_data.jsonl", num_items)?;
    let test = layout.split(sources, "Test_data.jsonl", num_items)?;
    let val_sequences: Vec<Vec<ItemId>> = val.iter().map(row_sequence).collect();
    let test_sequences: Vec<Vec<ItemId>> = test.iter().map(row_sequence).collect();
    let num_users = val.len() + test.len();
    let num_interactions = interactions(&val_sequences) + interactions(&test_sequences);
    let mut notes = vec![format!(
        "{name}: users are LLaRA's {} validation and {} test users, each sequence its row's \
         history + next (at most 11 items); Steam's training split is not used",
        val.len(),
        test.len()
    )];

    let rows = match protocol {
        Protocol::Llara => {
            // The last 10% of the validation users (file order, at least one) validate; the
            // rest train on every prefix of their sequence.
            let held = (val.len() / 10).max(1).min(val.len());
            let first_held = val.len() - held;
            notes.push(format!(
                "steam-valtrain: trains on LLaRA's validation users, tests on its test users \
                 (Steam's training split is not available); validation rows are the last {held} \
                 validation users' rows (row index {first_held} on), training rows every prefix \
                 of the other {first_held}; `user` = row index in LLaRA's Val/Test file"
            ));
            let mut rows = Rows::default();
            for (index, items) in val_sequences.iter().enumerate() {
                if index < first_held {
                    rows.train.extend(prefix_rows(index as u32, items, options));
                }
            }
            rows.val = eval_rows(&val[first_held..], options)
                .into_iter()
                .map(|mut example| {
                    example.user += first_held as u32;
                    example
                })
                .collect();
            rows.test = eval_rows(&test, options);
            rows
        }
        Protocol::Loo => {
            let test_base = val.len();
            notes.push(format!(
                "{name}/loo: leave-last-out over those users; `user` = val row index, then \
                 {test_base} + test row index"
            ));
            let all = val_sequences
                .into_iter()
                .chain(test_sequences)
                .enumerate()
                .map(|(user, items)| UserSequence {
                    user: user as u32,
                    items,
                })
                .collect::<Vec<_>>();
            leave_last_out(&all, options)
        }
    };
    Ok(Assembled {
        titles,
        rows,
        num_users,
        num_interactions,
        notes,
    })
}

pub(crate) fn assemble(
    dataset: DatasetName,
    protocol: Protocol,
    options: &PrepareOptions,
    sources: &mut Sources,
) -> Result<Assembled, DataError> {
    match (dataset, protocol) {
        (DatasetName::LastFm, Protocol::Llara | Protocol::Loo) => {
            with_train_file(&LASTFM, protocol, options, sources)
        }
        (DatasetName::Steam, Protocol::Llara) => {
            with_train_file(&steam(dataset), protocol, options, sources)
        }
        (DatasetName::Steam, Protocol::Loo)
        | (DatasetName::SteamValTrain, Protocol::Llara | Protocol::Loo) => {
            from_eval_users(&steam(dataset), protocol, options, sources)
        }
        (DatasetName::MovieLens, Protocol::Llara | Protocol::Loo) => Err(DataError::Invalid(
            "movielens is not a LLaRA-file dataset".to_owned(),
        )),
    }
}
