//! Turning item sequences into next-item rows: prefixes for training, one held-out row per
//! user for evaluation, leave-last-out.

use crate::{ItemId, PrepareOptions, SeqExample};

/// A user's sequence (oldest first) with its `user` number for the rows it yields.
pub(crate) struct UserSequence {
    pub user: u32,
    pub items: Vec<ItemId>,
}

/// Train, validation and test rows, before candidates are drawn.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Rows {
    pub train: Vec<SeqExample>,
    pub val: Vec<SeqExample>,
    pub test: Vec<SeqExample>,
}

/// The row "these items, then `target`": the history is the last `history_len` of `before`,
/// and the row is dropped (None) when that leaves fewer than `min_history` items.
pub(crate) fn row(
    user: u32,
    before: &[ItemId],
    target: ItemId,
    options: &PrepareOptions,
) -> Option<SeqExample> {
    let history = &before[before.len().saturating_sub(options.history_len)..];
    (history.len() >= options.min_history).then(|| SeqExample {
        user,
        history: history.to_vec(),
        target,
        candidates: Vec::new(),
    })
}

/// Every prefix of `items` as a training row: (items[..t] windowed, items[t]) for each t from
/// `min_history` on.
pub(crate) fn prefix_rows(
    user: u32,
    items: &[ItemId],
    options: &PrepareOptions,
) -> impl Iterator<Item = SeqExample> {
    (options.min_history..items.len())
        .filter_map(move |t| row(user, &items[..t], items[t], options))
}

/// Leave-last-out: each user's last item is its test row, the one before its validation row,
/// and every prefix of the rest a training row, so no evaluation target is ever trained on.
pub(crate) fn leave_last_out(users: &[UserSequence], options: &PrepareOptions) -> Rows {
    let mut rows = Rows::default();
    for UserSequence { user, items } in users {
        let user = *user;
        let Some(test_at) = items.len().checked_sub(1) else {
            continue;
        };
        rows.test
            .extend(row(user, &items[..test_at], items[test_at], options));
        let Some(val_at) = test_at.checked_sub(1) else {
            continue;
        };
        rows.val
            .extend(row(user, &items[..val_at], items[val_at], options));
        rows.train
            .extend(prefix_rows(user, &items[..val_at], options));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(user: u32, history: &[ItemId], target: ItemId) -> SeqExample {
        SeqExample {
            user,
            history: history.to_vec(),
            target,
            candidates: Vec::new(),
        }
    }

    fn opts(history_len: usize, min_history: usize) -> PrepareOptions {
        PrepareOptions {
            history_len,
            min_history,
            ..PrepareOptions::default()
        }
    }

    #[test]
    fn prefixes_are_windowed_and_short_ones_dropped() {
        let rows: Vec<_> = prefix_rows(7, &[1, 2, 3, 4, 5, 6], &opts(3, 2)).collect();
        assert_eq!(
            rows,
            vec![
                ex(7, &[1, 2], 3),
                ex(7, &[1, 2, 3], 4),
                ex(7, &[2, 3, 4], 5),
                ex(7, &[3, 4, 5], 6)
            ]
        );
    }

    #[test]
    fn leave_last_out_holds_out_the_last_two_items() {
        let users = vec![
            UserSequence {
                user: 1,
                items: vec![10, 11, 12, 13, 14, 15],
            },
            UserSequence {
                user: 2,
                items: vec![20, 21, 22, 23],
            },
            UserSequence {
                user: 3,
                items: vec![30],
            },
            UserSequence {
                user: 4,
                items: vec![],
            },
        ];
        let rows = leave_last_out(&users, &opts(10, 2));
        assert_eq!(
            rows.test,
            vec![ex(1, &[10, 11, 12, 13, 14], 15), ex(2, &[20, 21, 22], 23)]
        );
        assert_eq!(
            rows.val,
            vec![ex(1, &[10, 11, 12, 13], 14), ex(2, &[20, 21], 22)]
        );
        assert_eq!(
            rows.train,
            vec![ex(1, &[10, 11], 12), ex(1, &[10, 11, 12], 13)]
        );
    }
}
