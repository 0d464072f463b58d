//! The vocabulary every crate shares: item ids, catalogs and sequence examples.

use serde::{Deserialize, Serialize};

/// A dataset item id: 0-based, dense, LLaRA's numbering (MovieLens: `u.item` id - 1).
/// `Catalog::padding_id()` (= number of items) is never a real item.
pub type ItemId = u32;

/// The item ids of a dataset and their display titles (normalised as METHOD.md says).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// Dataset name this catalog belongs to, e.g. "movielens".
    pub dataset: String,
    /// `titles[i]` is the title of item `i`.
    pub titles: Vec<String>,
}

impl Catalog {
    pub fn num_items(&self) -> usize {
        self.titles.len()
    }

    /// The id used to pad histories: one past the last item.
    pub fn padding_id(&self) -> ItemId {
        self.titles.len() as ItemId
    }

    pub fn title(&self, id: ItemId) -> Option<&str> {
        self.titles.get(id as usize).map(String::as_str)
    }
}

/// One next-item example: the user's last items (oldest first, unpadded, at most the history
/// window), the true next item, and for validation/test rows the stored candidate set (the
/// target plus negatives, shuffled). Training rows have no stored candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqExample {
    /// A stable user index within the split source (not a raw dataset user id everywhere:
    /// LLaRA's split files carry no user ids, so it is the row's user ordinal there).
    pub user: u32,
    pub history: Vec<ItemId>,
    pub target: ItemId,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<ItemId>,
}

/// Which rows of a prepared dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitPart {
    Train,
    Val,
    Test,
}

impl SplitPart {
    pub const ALL: [SplitPart; 3] = [SplitPart::Train, SplitPart::Val, SplitPart::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            SplitPart::Train => "train",
            SplitPart::Val => "val",
            SplitPart::Test => "test",
        }
    }
}
