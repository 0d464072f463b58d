//! MovieLens-100K: raw `u.data` / `u.item` from GroupLens, LLaRA's val/test rows.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::rows::{Rows, UserSequence, leave_last_out, prefix_rows, row};
use super::sources::{ItemFormat, Sources, parse_llara_rows};
use super::{Assembled, DatasetName, PrepareOptions, Protocol};
use crate::titles::{lines, parse_error, parse_movielens_items};
use crate::{DataError, ItemId};

pub(crate) const DIR: &str = "movielens-100k";
const U_DATA: &str = "movielens-100k/u.data";
const U_ITEM: &str = "movielens-100k/u.item";
const VAL: &str = "movielens-100k/llara/Val_data.jsonl";
const TEST: &str = "movielens-100k/llara/Test_data.jsonl";

const HINT: &str = "MovieLens-100K (u.data, u.item) is published by GroupLens: \
    https://grouplens.org/datasets/movielens/100k/ ; LLaRA's val/test splits are on Hugging Face \
    (joyliao7777/LLaRA, movielens/Val_data.df, Test_data.df), converted to .jsonl as \
    movielens-100k/PROVENANCE.md describes";

/// The raw data: titles by LLaRA id and each user's items in time order.
struct Raw {
    titles: Vec<String>,
    /// u.data user id -> items, sorted by (timestamp, item id).
    users: BTreeMap<u32, Vec<ItemId>>,
    num_interactions: usize,
}

pub(crate) fn titles(sources: &mut Sources) -> Result<Vec<String>, DataError> {
    sources.require(DatasetName::MovieLens, DIR, &["u.item"], HINT)?;
    let (path, bytes) = sources.read(U_ITEM)?;
    parse_movielens_items(&bytes, &path)
}

fn read_raw(sources: &mut Sources) -> Result<Raw, DataError> {
    let titles = titles(sources)?;
    let (path, bytes) = sources.read(U_DATA)?;
    let (users, num_interactions) = parse_u_data(&bytes, &path, titles.len())?;
    Ok(Raw {
        titles,
        users,
        num_interactions,
    })
}

/// `user\titem\trating\ttimestamp` lines -> each user's LLaRA item ids in time order, and the
/// number of lines.
fn parse_u_data(
    bytes: &[u8],
    path: &Path,
    num_items: usize,
) -> Result<(BTreeMap<u32, Vec<ItemId>>, usize), DataError> {
    let mut events: BTreeMap<u32, Vec<(u64, ItemId)>> = BTreeMap::new();
    let mut num_interactions = 0;
    for (line_no, line) in lines(bytes) {
        let text =
            std::str::from_utf8(line).map_err(|_| parse_error(path, line_no, "not ASCII text"))?;
        let fields: Vec<&str> = text.split_ascii_whitespace().collect();
        let [user, item, _rating, timestamp] = fields.as_slice() else {
            return Err(parse_error(
                path,
                line_no,
                "expected `user item rating timestamp`",
            ));
        };
        let number = |field: &str, what: &str| {
            field.parse::<u64>().map_err(|_| {
                parse_error(path, line_no, format!("{what} {field:?} is not a number"))
            })
        };
        let user = u32::try_from(number(user, "user")?)
            .map_err(|_| parse_error(path, line_no, "user id too large"))?;
        let item = number(item, "item")?;
        let timestamp = number(timestamp, "timestamp")?;
        let id = item
            .checked_sub(1)
            .filter(|&id| id < num_items as u64)
            .ok_or_else(|| parse_error(path, line_no, format!("item {item} is not in u.item")))?;
        events
            .entry(user)
            .or_default()
            .push((timestamp, id as ItemId));
        num_interactions += 1;
    }
    // Ties in time (common: ratings given in one session) are broken by item id, as the
    // (timestamp, item) tuple sort of bench/llara_anchor.py does, so our training rows are the
    // anchor's. LLaRA's own order is unknown (its val/test rows follow neither item nor file
    // order within ties).
    let users = events
        .into_iter()
        .map(|(user, mut items)| {
            items.sort_unstable();
            (user, items.into_iter().map(|(_, item)| item).collect())
        })
        .collect();
    Ok((users, num_interactions))
}

pub(crate) fn assemble(
    protocol: Protocol,
    options: &PrepareOptions,
    sources: &mut Sources,
) -> Result<Assembled, DataError> {
    let files: &[&str] = match protocol {
        Protocol::Llara => &[
            "u.data",
            "u.item",
            "llara/Val_data.jsonl",
            "llara/Test_data.jsonl",
        ],
        Protocol::Loo => &["u.data", "u.item"],
    };
    sources.require(DatasetName::MovieLens, DIR, files, HINT)?;
    let raw = read_raw(sources)?;
    let (rows, notes) = match protocol {
        Protocol::Llara => llara_rows(&raw, options, sources)?,
        Protocol::Loo => {
            let users: Vec<UserSequence> = raw
                .users
                .iter()
                .map(|(&user, items)| UserSequence {
                    user,
                    items: items.clone(),
                })
                .collect();
            let note = "movielens/loo: leave-last-out over all u.data users (time order, ties by \
                        item id); `user` is the u.data user id"
                .to_owned();
            (leave_last_out(&users, options), vec![note])
        }
    };
    Ok(Assembled {
        titles: raw.titles,
        rows,
        num_users: raw.users.len(),
        num_interactions: raw.num_interactions,
        notes,
    })
}

/// LLaRA's val/test rows as they are; training rows from every u.data user who holds none of
/// them. A user "holds" a row when the row's history and target are all among the user's
/// items (bench/llara_anchor.py): LLaRA's rows carry no user id, and a user matched by a
/// held-out row must not be trained on.
fn llara_rows(
    raw: &Raw,
    options: &PrepareOptions,
    sources: &mut Sources,
) -> Result<(Rows, Vec<String>), DataError> {
    let num_items = raw.titles.len();
    let (val_path, val_bytes) = sources.read(VAL)?;
    let val = parse_llara_rows(&val_bytes, &val_path, num_items, ItemFormat::WithRating)?;
    let (test_path, test_bytes) = sources.read(TEST)?;
    let test = parse_llara_rows(&test_bytes, &test_path, num_items, ItemFormat::WithRating)?;

    let item_sets: Vec<(u32, HashSet<ItemId>)> = raw
        .users
        .iter()
        .map(|(&user, items)| (user, items.iter().copied().collect()))
        .collect();
    let mut held: HashSet<u32> = HashSet::new();
    let mut unmatched = 0;
    for llara_row in val.iter().chain(&test) {
        let needed = llara_row
            .history
            .iter()
            .chain(std::iter::once(&llara_row.next));
        let holders: Vec<u32> = item_sets
            .iter()
            .filter(|(_, set)| needed.clone().all(|item| set.contains(item)))
            .map(|(user, _)| *user)
            .collect();
        if holders.is_empty() {
            unmatched += 1;
        }
        held.extend(holders);
    }
    if unmatched > 0 {
        tracing::warn!(
            unmatched,
            "movielens/llara: val/test rows that match no u.data user"
        );
    }

    let mut rows = Rows::default();
    for (&user, items) in &raw.users {
        if !held.contains(&user) {
            rows.train.extend(prefix_rows(user, items, options));
        }
    }
    let eval_rows = |llara_rows: &[super::sources::LlaraRow]| {
        llara_rows
            .iter()
            .enumerate()
            .filter_map(|(index, r)| row(index as u32, &r.history, r.next, options))
            .collect::<Vec<_>>()
    };
    rows.val = eval_rows(&val);
    rows.test = eval_rows(&test);

    let mut notes = vec![format!(
        "movielens/llara: val/test rows are LLaRA's (llara/Val_data, Test_data; `user` = row \
         index); training rows are every prefix of the {} u.data users holding none of them \
         ({} users held out, as bench/llara_anchor.py; `user` = u.data user id)",
        raw.users.len() - held.len(),
        held.len()
    )];
    if unmatched > 0 {
        notes.push(format!(
            "{unmatched} LLaRA val/test rows match no u.data user"
        ));
    }
    Ok((rows, notes))
}
