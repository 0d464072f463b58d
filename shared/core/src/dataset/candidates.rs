//! The one-time candidate draw for validation/test rows (METHOD.md: drawn once with a recorded
//! seed and stored with the split, so every model is scored on the very same sets).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::{DataError, ItemId, SplitPart};

/// The random stream of one split part: `seed` XOR the first 8 bytes of
/// sha256("rsllm candidates <part>"), so val and test draw independent streams and adding rows
/// to one never shifts the other's candidates.
pub fn candidate_rng(seed: u64, part: SplitPart) -> ChaCha8Rng {
    let digest = Sha256::digest(format!("rsllm candidates {}", part.as_str()).as_bytes());
    let mut salt = [0u8; 8];
    salt.copy_from_slice(&digest[..8]);
    ChaCha8Rng::seed_from_u64(seed ^ u64::from_le_bytes(salt))
}

/// `num_candidates` distinct items: `target` plus `num_candidates - 1` negatives drawn
/// uniformly without replacement from the items in `0..num_items` that are neither in
/// `history` nor the target, in shuffled order (LLaRA's `negative_sampling`).
pub fn draw_candidates<R: Rng + ?Sized>(
    history: &[ItemId],
    target: ItemId,
    num_items: usize,
    num_candidates: usize,
    rng: &mut R,
) -> Result<Vec<ItemId>, DataError> {
    if target as usize >= num_items {
        return Err(DataError::Invalid(format!(
            "target item {target} is outside the catalog of {num_items} items"
        )));
    }
    let Some(num_negatives) = num_candidates.checked_sub(1) else {
        return Err(DataError::Invalid(
            "num_candidates must be at least 1".to_owned(),
        ));
    };
    let mut excluded = vec![false; num_items];
    for &item in history.iter().chain(std::iter::once(&target)) {
        if let Some(slot) = excluded.get_mut(item as usize) {
            *slot = true;
        }
    }
    // Ascending ids, so the draw depends only on the seed and the row, not on hash order.
    let mut pool: Vec<ItemId> = (0..num_items as ItemId)
        .filter(|&item| !excluded[item as usize])
        .collect();
    if num_negatives > pool.len() {
        return Err(DataError::Invalid(format!(
            "{num_candidates} candidates need {num_negatives} negatives, but only {} items are \
             outside the history and target",
            pool.len()
        )));
    }
    // Partial Fisher-Yates: the first `num_negatives` slots become a uniform sample.
    for slot in 0..num_negatives {
        let pick = rng.random_range(slot..pool.len());
        pool.swap(slot, pick);
    }
    pool.truncate(num_negatives);
    pool.push(target);
    shuffle(&mut pool, rng);
    Ok(pool)
}

/// Fisher-Yates, written out so that stored candidates depend only on the RNG stream.
fn shuffle<T, R: Rng + ?Sized>(items: &mut [T], rng: &mut R) {
    for last in (1..items.len()).rev() {
        let pick = rng.random_range(0..=last);
        items.swap(last, pick);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn candidates_hold_the_target_once_and_avoid_the_history() {
        let mut rng = candidate_rng(7, SplitPart::Test);
        let history = [0, 3, 5, 7, 9, 11];
        for target in [2u32, 4, 29] {
            for _ in 0..200 {
                let cands = draw_candidates(&history, target, 30, 20, &mut rng).unwrap();
                assert_eq!(cands.len(), 20);
                let distinct: HashSet<_> = cands.iter().collect();
                assert_eq!(distinct.len(), 20);
                assert_eq!(cands.iter().filter(|&&c| c == target).count(), 1);
                assert!(
                    cands
                        .iter()
                        .all(|c| !history.contains(c) && (*c as usize) < 30)
                );
            }
        }
    }

    #[test]
    fn the_draw_is_deterministic_and_the_parts_differ() {
        let draw = |part| {
            let mut rng = candidate_rng(4321, part);
            (0..5)
                .map(|t| draw_candidates(&[1, 2], t + 10, 100, 20, &mut rng).unwrap())
                .collect()
        };
        let a: Vec<Vec<ItemId>> = draw(SplitPart::Val);
        assert_eq!(a, draw(SplitPart::Val));
        assert_ne!(a, draw(SplitPart::Test));
    }

    #[test]
    fn the_target_position_is_shuffled() {
        let mut rng = candidate_rng(1, SplitPart::Val);
        let positions: HashSet<usize> = (0..200)
            .map(|_| {
                let cands = draw_candidates(&[], 3, 50, 20, &mut rng).unwrap();
                cands.iter().position(|&c| c == 3).unwrap()
            })
            .collect();
        assert!(positions.len() > 10, "{positions:?}");
    }

    #[test]
    fn too_small_a_pool_is_an_error() {
        let mut rng = candidate_rng(1, SplitPart::Val);
        // 10 items, 3 in history, 1 target: 6 eligible negatives.
        assert_eq!(
            draw_candidates(&[0, 1, 2], 3, 10, 7, &mut rng)
                .unwrap()
                .len(),
            7
        );
        let err = draw_candidates(&[0, 1, 2], 3, 10, 8, &mut rng).unwrap_err();
        assert!(err.to_string().contains("only 6 items"), "{err}");
        assert!(draw_candidates(&[], 10, 10, 2, &mut rng).is_err());
        assert!(draw_candidates(&[], 1, 10, 0, &mut rng).is_err());
    }
}
