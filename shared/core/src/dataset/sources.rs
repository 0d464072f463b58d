//! Reading source files: existence checks with the publisher's name, hashing of everything
//! read (recorded in the manifest), and LLaRA's split files in their `.jsonl` form.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::artefact::sha256_hex;
use crate::titles::{lines, parse_error};
use crate::{DataError, DatasetName, ItemId};

/// Reads files under the data directory and remembers the sha256 of each, keyed by its path
/// relative to the data directory (so a moved data directory is still the same source).
pub(crate) struct Sources<'a> {
    data_dir: &'a Path,
    pub hashes: BTreeMap<String, String>,
}

impl<'a> Sources<'a> {
    pub fn new(data_dir: &'a Path) -> Self {
        Sources {
            data_dir,
            hashes: BTreeMap::new(),
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.data_dir.join(relative)
    }

    /// The file's bytes and its full path (for error messages).
    pub fn read(&mut self, relative: &str) -> Result<(PathBuf, Vec<u8>), DataError> {
        let path = self.path(relative);
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        self.hashes.insert(relative.to_owned(), sha256_hex(&bytes));
        Ok((path, bytes))
    }

    /// Fails with `DataError::Missing` naming every absent file of `files` (relative to
    /// `sub_dir`) and where the publisher offers them.
    pub fn require(
        &self,
        dataset: DatasetName,
        sub_dir: &str,
        files: &[&str],
        hint: &str,
    ) -> Result<(), DataError> {
        let dir = self.data_dir.join(sub_dir);
        let missing: Vec<String> = files
            .iter()
            .filter(|file| !dir.join(file).is_file())
            .map(|file| (*file).to_owned())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(DataError::Missing {
                dataset: dataset.as_str().to_owned(),
                dir,
                missing,
                hint: hint.to_owned(),
            })
        }
    }
}

/// One row of a LLaRA split file with its padding removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LlaraRow {
    /// The non-padding items of `seq`, the first `len_seq` of them, oldest first.
    pub history: Vec<ItemId>,
    pub next: ItemId,
    /// Slots of `seq` (10): LLaRA's own history window.
    pub window: usize,
}

/// How items are written in a LLaRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemFormat {
    /// `12` (LastFM, Steam).
    Plain,
    /// `[12, 4]`: item and rating (MovieLens); the rating is ignored.
    WithRating,
}

#[derive(Deserialize)]
struct RawRow<T> {
    seq: Vec<T>,
    len_seq: i64,
    next: T,
}

/// Parses a LLaRA `.jsonl` split (`{"row_index","seq","len_seq","next"}` per line). The
/// padding id is `num_items`; the history is `[x for x in seq if x != pad][:len_seq]`, as
/// bench/llara_anchor.py reads it, which is right whether the padding sits after the real items
/// (LLaRA's convention) or before them.
pub(crate) fn parse_llara_rows(
    bytes: &[u8],
    path: &Path,
    num_items: usize,
    format: ItemFormat,
) -> Result<Vec<LlaraRow>, DataError> {
    match format {
        ItemFormat::Plain => parse_rows::<i64>(bytes, path, num_items, |&item| item),
        ItemFormat::WithRating => {
            parse_rows::<(i64, f64)>(bytes, path, num_items, |&(item, _rating)| item)
        }
    }
}

fn parse_rows<T: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    num_items: usize,
    item_of: impl Fn(&T) -> i64,
) -> Result<Vec<LlaraRow>, DataError> {
    let pad = num_items as i64;
    let mut rows = Vec::new();
    for (line_no, line) in lines(bytes) {
        let raw: RawRow<T> = serde_json::from_slice(line)
            .map_err(|err| parse_error(path, line_no, format!("not a LLaRA row: {err}")))?;
        let len_seq = usize::try_from(raw.len_seq)
            .map_err(|_| parse_error(path, line_no, format!("negative len_seq {}", raw.len_seq)))?;
        let mut history = Vec::new();
        for item in raw.seq.iter().map(&item_of) {
            if item == pad {
                continue;
            }
            history.push(item_id(item, num_items, path, line_no, "seq")?);
        }
        history.truncate(len_seq);
        let next = item_id(item_of(&raw.next), num_items, path, line_no, "next")?;
        rows.push(LlaraRow {
            history,
            next,
            window: raw.seq.len(),
        });
    }
    Ok(rows)
}

fn item_id(
    item: i64,
    num_items: usize,
    path: &Path,
    line: usize,
    field: &str,
) -> Result<ItemId, DataError> {
    match usize::try_from(item) {
        Ok(id) if id < num_items => ItemId::try_from(id)
            .map_err(|_| parse_error(path, line, format!("{field}: item {item} too large"))),
        Ok(_) | Err(_) => Err(parse_error(
            path,
            line,
            format!("{field}: item {item} is not an id of the {num_items}-item catalog"),
        )),
    }
}

/// The users of a LLaRA train file, recovered from its row order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TrainUsers {
    /// Each user's full sequence: its first row's history, then the `next` of each of its rows.
    pub sequences: Vec<Vec<ItemId>>,
    /// `row_user[i]`: the user (index into `sequences`) of file row `i`.
    pub row_user: Vec<u32>,
    /// Rows that neither start with an empty history nor continue the previous row's user;
    /// each starts a new user. 0 in LastFM's file.
    pub unexpected_starts: usize,
}

/// LLaRA writes every prefix of a training user in order, the first with an all-padding `seq`.
/// So a row with an empty history starts a user, and a row whose history is the tail of the
/// current user's items (as LLaRA's window shows it) continues that user. Anything else also
/// starts a user, counted in `unexpected_starts` so the caller can report it.
pub(crate) fn train_users(rows: &[LlaraRow]) -> TrainUsers {
    let mut users = TrainUsers {
        sequences: Vec::new(),
        row_user: Vec::new(),
        unexpected_starts: 0,
    };
    for row in rows {
        let continues = match users.sequences.last() {
            Some(current) if !row.history.is_empty() => {
                let tail = &current[current.len().saturating_sub(row.window)..];
                tail == row.history.as_slice()
            }
            Some(_) | None => false,
        };
        if !continues {
            if !row.history.is_empty() {
                users.unexpected_starts += 1;
            }
            users.sequences.push(row.history.clone());
        }
        let user = users.sequences.len() - 1;
        if let Some(current) = users.sequences.last_mut() {
            current.push(row.next);
        }
        users.row_user.push(user as u32);
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llara_rows_drop_padding_and_respect_len_seq() {
        let path = Path::new("Val_data.jsonl");
        let text = "{\"row_index\":0,\"seq\":[4,5,6,9,9],\"len_seq\":3,\"next\":7}\n\
                    {\"row_index\":1,\"seq\":[9,9,9,9,9],\"len_seq\":1,\"next\":0}\n\
                    {\"row_index\":2,\"seq\":[1,2,9,9,9],\"len_seq\":1,\"next\":3}\n";
        let rows = parse_llara_rows(text.as_bytes(), path, 9, ItemFormat::Plain).unwrap();
        let histories: Vec<_> = rows.iter().map(|r| r.history.clone()).collect();
        assert_eq!(histories, vec![vec![4, 5, 6], vec![], vec![1]]);
        assert_eq!(rows[0].next, 7);
        assert_eq!(rows[0].window, 5);

        let movielens = "{\"seq\":[[3,5],[1,4],[9,0]],\"len_seq\":2,\"next\":[2,3]}\n";
        let rows = parse_llara_rows(movielens.as_bytes(), path, 9, ItemFormat::WithRating);
        assert_eq!(
            rows.unwrap()[0],
            LlaraRow {
                history: vec![3, 1],
                next: 2,
                window: 3
            }
        );
    }

    #[test]
    fn bad_llara_rows_name_file_and_line() {
        let path = Path::new("x.jsonl");
        let cases = [
            "{\"seq\":[1],\"len_seq\":1,\"next\":10}",
            "{\"seq\":[-1],\"len_seq\":1,\"next\":1}",
            "{\"seq\":[1],\"len_seq\":-1,\"next\":1}",
            "{\"seq\":[1],\"next\":1}",
            "not json",
        ];
        for case in cases {
            let text = format!("{{\"seq\":[1],\"len_seq\":1,\"next\":2}}\n{case}\n");
            let err = parse_llara_rows(text.as_bytes(), path, 9, ItemFormat::Plain).unwrap_err();
            assert!(err.to_string().starts_with("x.jsonl:2: "), "{case}: {err}");
        }
    }

    #[test]
    fn train_users_follow_the_prefix_rows() {
        let r = |history: &[ItemId], next| LlaraRow {
            history: history.to_vec(),
            next,
            window: 3,
        };
        let rows = vec![
            r(&[], 1),
            r(&[1], 2),
            r(&[1, 2], 3),
            r(&[1, 2, 3], 4),
            r(&[2, 3, 4], 5),
            r(&[], 7),
            r(&[7], 8),
            r(&[5, 6], 9),
        ];
        let users = train_users(&rows);
        assert_eq!(
            users.sequences,
            vec![vec![1, 2, 3, 4, 5], vec![7, 8], vec![5, 6, 9]]
        );
        assert_eq!(users.row_user, vec![0, 0, 0, 0, 0, 1, 1, 2]);
        assert_eq!(users.unexpected_starts, 1);
    }
}
