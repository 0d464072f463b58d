//! Preparation end to end on hand-made tiny datasets in temp dirs, plus one test over the real
//! data when ../shared/data is present.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use super::*;
use crate::ItemId;

fn write(root: &Path, relative: &str, content: &str) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn ex(user: u32, history: &[ItemId], target: ItemId) -> (u32, Vec<ItemId>, ItemId) {
    (user, history.to_vec(), target)
}

/// Rows without their candidates, for comparing against hand-written expectations.
fn plain(rows: &[SeqExample]) -> Vec<(u32, Vec<ItemId>, ItemId)> {
    rows.iter()
        .map(|r| (r.user, r.history.clone(), r.target))
        .collect()
}

fn check_candidates(prepared: &PreparedDataset) {
    let num_items = prepared.catalog.num_items();
    let options = &prepared.manifest.options;
    for row in &prepared.train {
        assert!(row.candidates.is_empty());
    }
    for row in prepared.val.iter().chain(&prepared.test) {
        assert_eq!(row.candidates.len(), options.num_candidates);
        let distinct: HashSet<_> = row.candidates.iter().collect();
        assert_eq!(distinct.len(), options.num_candidates);
        assert_eq!(
            row.candidates.iter().filter(|&&c| c == row.target).count(),
            1
        );
        assert!(row.candidates.iter().all(|&c| (c as usize) < num_items));
        assert!(row.candidates.iter().all(|c| !row.history.contains(c)));
    }
}

/// 40 movies; users 1 (8 items, with a timestamp tie), 2 (5), 4 (10), 5 (4 of user 4's).
fn tiny_movielens(root: &Path) {
    let mut items = String::new();
    for id in 1..=40 {
        let title = if id == 5 {
            "Wizard of Oz, The (1939)".to_owned()
        } else {
            format!("Movie {id} (1990)")
        };
        items.push_str(&format!("{id}|{title}|01-Jan-1990||http://x|0|1\n"));
    }
    write(root, "movielens-100k/u.item", &items);
    let mut data = String::new();
    // User 1 rated items 2 and 1 in the same second, item 2 first in the file: the tie is broken
    // by item id, so the sequence starts 0, 1.
    data.push_str("1\t2\t3\t100\n1\t1\t4\t100\n");
    for (k, item) in (3..=8).enumerate() {
        data.push_str(&format!("1\t{item}\t3\t{}\n", 200 + k));
    }
    for (k, item) in (10..=14).enumerate() {
        data.push_str(&format!("2\t{item}\t3\t{}\n", 300 + k));
    }
    for (k, item) in (21..=30).enumerate() {
        data.push_str(&format!("4\t{item}\t3\t{}\n", 400 + k));
    }
    for (k, item) in (21..=24).enumerate() {
        data.push_str(&format!("5\t{item}\t3\t{}\n", 500 + k));
    }
    write(root, "movielens-100k/u.data", &data);
}

fn movielens_row(history: &[ItemId], next: ItemId) -> String {
    let mut seq: Vec<String> = history.iter().map(|i| format!("[{i},4]")).collect();
    seq.resize(10, "[40,0]".to_owned());
    format!(
        "{{\"seq\":[{}],\"len_seq\":{},\"next\":[{next},5]}}\n",
        seq.join(","),
        history.len()
    )
}

fn tiny_movielens_llara(root: &Path) {
    tiny_movielens(root);
    // Row 0 is held by users 4 and 5; row 1 is too short and matches nobody.
    let val = movielens_row(&[20, 21, 22], 23) + &movielens_row(&[30, 31], 32);
    write(root, "movielens-100k/llara/Val_data.jsonl", &val);
    write(
        root,
        "movielens-100k/llara/Test_data.jsonl",
        &movielens_row(&[9, 10, 11], 12),
    );
}

fn paths(data: &Path, cache: &Path) -> Paths {
    Paths::new(data, cache)
}

#[test]
fn movielens_loo_on_tiny_data() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    tiny_movielens(data.path());
    let options = PrepareOptions::default();
    let prepared = prepare(
        DatasetName::MovieLens,
        Protocol::Loo,
        &options,
        &paths(data.path(), cache.path()),
    )
    .unwrap();
    assert_eq!(
        plain(&prepared.test),
        vec![
            ex(1, &[0, 1, 2, 3, 4, 5, 6], 7),
            ex(2, &[9, 10, 11, 12], 13),
            ex(4, &[20, 21, 22, 23, 24, 25, 26, 27, 28], 29),
            ex(5, &[20, 21, 22], 23),
        ]
    );
    assert_eq!(
        plain(&prepared.val),
        vec![
            ex(1, &[0, 1, 2, 3, 4, 5], 6),
            ex(2, &[9, 10, 11], 12),
            ex(4, &[20, 21, 22, 23, 24, 25, 26, 27], 28),
        ]
    );
    let train = plain(&prepared.train);
    assert_eq!(
        train[..3],
        [
            ex(1, &[0, 1, 2], 3),
            ex(1, &[0, 1, 2, 3], 4),
            ex(1, &[0, 1, 2, 3, 4], 5)
        ]
    );
    assert_eq!(train.len(), 3 + 5);
    assert_eq!(train[7], ex(4, &[20, 21, 22, 23, 24, 25, 26], 27));
    let m = &prepared.manifest;
    assert_eq!((m.num_users, m.num_items, m.num_interactions), (4, 40, 27));
    assert_eq!(prepared.catalog.title(4), Some("The Wizard of Oz"));
    assert_eq!(m.rows.get("train"), Some(&8));
    assert!(m.sources.contains_key("movielens-100k/u.data"));
    check_candidates(&prepared);
}

#[test]
fn movielens_llara_leaves_out_every_user_holding_a_val_or_test_row() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    tiny_movielens_llara(data.path());
    let options = PrepareOptions::default();
    let prepared = prepare(
        DatasetName::MovieLens,
        Protocol::Llara,
        &options,
        &paths(data.path(), cache.path()),
    )
    .unwrap();
    // Users 2, 4 and 5 hold a row; only user 1 trains, on every prefix from 3 items on.
    let expected_train: Vec<_> = (3..8)
        .map(|t| ex(1, &(0..t).collect::<Vec<_>>(), t))
        .collect();
    assert_eq!(plain(&prepared.train), expected_train);
    assert_eq!(plain(&prepared.val), vec![ex(0, &[20, 21, 22], 23)]);
    assert_eq!(plain(&prepared.test), vec![ex(0, &[9, 10, 11], 12)]);
    assert_eq!(prepared.manifest.num_users, 4);
    let notes = prepared.manifest.notes.join("\n");
    assert!(notes.contains("3 users held out"), "{notes}");
    assert!(
        notes.contains("1 LLaRA val/test rows match no u.data user"),
        "{notes}"
    );
    check_candidates(&prepared);
}

#[test]
fn prepare_reuses_valid_files_and_rebuilds_corrupt_ones() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    tiny_movielens(data.path());
    let paths = paths(data.path(), cache.path());
    let options = PrepareOptions::default();
    let (first, outcome) =
        prepare_or_reuse(DatasetName::MovieLens, Protocol::Loo, &options, &paths).unwrap();
    assert_eq!(outcome, PrepareOutcome::Built);
    let dir = split_dir(&paths, DatasetName::MovieLens, Protocol::Loo);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "catalog.json",
            "manifest.json",
            "test.jsonl",
            "train.jsonl",
            "val.jsonl"
        ]
    );
    let train_path = dir.join("train.jsonl");
    let modified = fs::metadata(&train_path).unwrap().modified().unwrap();
    let original = fs::read(&train_path).unwrap();

    let (second, outcome) =
        prepare_or_reuse(DatasetName::MovieLens, Protocol::Loo, &options, &paths).unwrap();
    assert_eq!(outcome, PrepareOutcome::Reused);
    assert_eq!(
        fs::metadata(&train_path).unwrap().modified().unwrap(),
        modified
    );
    assert_eq!(second.manifest, first.manifest);
    assert_eq!(
        (&second.train, &second.val, &second.test),
        (&first.train, &first.val, &first.test)
    );

    // A flipped byte in a split file: rebuilt, same content as before.
    let mut corrupt = original.clone();
    corrupt[2] = b'9';
    fs::write(&train_path, &corrupt).unwrap();
    let (third, outcome) =
        prepare_or_reuse(DatasetName::MovieLens, Protocol::Loo, &options, &paths).unwrap();
    assert_eq!(outcome, PrepareOutcome::Built);
    assert_eq!(fs::read(&train_path).unwrap(), original);
    assert_eq!(third.manifest.version, first.manifest.version);

    // Other options: rebuilt with other candidates.
    let options = PrepareOptions {
        seed: 1,
        ..PrepareOptions::default()
    };
    let (fourth, outcome) =
        prepare_or_reuse(DatasetName::MovieLens, Protocol::Loo, &options, &paths).unwrap();
    assert_eq!(outcome, PrepareOutcome::Built);
    assert_ne!(fourth.manifest.version, first.manifest.version);
    assert_eq!(plain(&fourth.test), plain(&first.test));

    // A changed source: rebuilt.
    let u_data = data.path().join("movielens-100k/u.data");
    let mut text = fs::read_to_string(&u_data).unwrap();
    text.push_str("2\t40\t3\t999\n");
    fs::write(&u_data, text).unwrap();
    let (fifth, outcome) =
        prepare_or_reuse(DatasetName::MovieLens, Protocol::Loo, &options, &paths).unwrap();
    assert_eq!(outcome, PrepareOutcome::Built);
    assert_eq!(fifth.manifest.num_interactions, 28);
}

#[test]
fn candidates_are_the_same_in_any_cache() {
    let data = tempfile::tempdir().unwrap();
    tiny_movielens(data.path());
    let options = PrepareOptions::default();
    let versions: Vec<String> = (0..2)
        .map(|_| {
            let cache = tempfile::tempdir().unwrap();
            prepare(
                DatasetName::MovieLens,
                Protocol::Loo,
                &options,
                &paths(data.path(), cache.path()),
            )
            .unwrap()
            .manifest
            .version
        })
        .collect();
    assert_eq!(versions[0], versions[1]);
}

#[test]
fn missing_files_are_named_with_their_publisher() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let paths = paths(data.path(), cache.path());
    let err = prepare(
        DatasetName::MovieLens,
        Protocol::Llara,
        &PrepareOptions::default(),
        &paths,
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "movielens",
        "u.data",
        "u.item",
        "llara/Val_data.jsonl",
        "grouplens.org",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    let err = prepare(
        DatasetName::LastFm,
        Protocol::Loo,
        &PrepareOptions::default(),
        &paths,
    )
    .unwrap_err()
    .to_string();
    for needle in ["llara/train_data.jsonl", "hetrec-2011", "joyliao7777/LLaRA"] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

#[test]
fn a_bad_line_is_reported_with_file_and_line() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    tiny_movielens(data.path());
    let u_data = data.path().join("movielens-100k/u.data");
    let mut text = fs::read_to_string(&u_data).unwrap();
    text.push_str("3\t41\t3\t999\n");
    fs::write(&u_data, text).unwrap();
    let err = prepare(
        DatasetName::MovieLens,
        Protocol::Loo,
        &PrepareOptions::default(),
        &paths(data.path(), cache.path()),
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Parse { line: 28, .. }), "{err}");
    assert!(
        err.to_string()
            .contains("u.data:28: item 41 is not in u.item"),
        "{err}"
    );
}

fn plain_row(history: &[ItemId], next: ItemId, pad: ItemId) -> String {
    let mut seq: Vec<String> = history.iter().map(ItemId::to_string).collect();
    seq.resize(10, pad.to_string());
    let len_seq = history.len().max(1);
    format!(
        "{{\"row_index\":0,\"seq\":[{}],\"len_seq\":{len_seq},\"next\":{next}}}\n",
        seq.join(",")
    )
}

fn id2name(n: usize) -> String {
    (0..n).map(|i| format!("{i}::Name {i}\n")).collect()
}

/// Users A = 0..7 and B = 5..9 in the train file (every prefix, from the empty one), one val
/// user, two test users (one too short).
fn tiny_lastfm(root: &Path) {
    let pad = 30;
    write(root, "lastfm-hetrec2011-2k/llara/id2name.txt", &id2name(30));
    let mut train = String::new();
    for user in [(0..7).collect::<Vec<ItemId>>(), (5..9).collect()] {
        for t in 0..user.len() {
            train.push_str(&plain_row(&user[..t], user[t], pad));
        }
    }
    write(root, "lastfm-hetrec2011-2k/llara/train_data.jsonl", &train);
    write(
        root,
        "lastfm-hetrec2011-2k/llara/Val_data.jsonl",
        &plain_row(&[10, 11, 12], 13, pad),
    );
    let test = plain_row(&[14, 15, 16, 17], 18, pad) + &plain_row(&[19], 20, pad);
    write(root, "lastfm-hetrec2011-2k/llara/Test_data.jsonl", &test);
}

#[test]
fn lastfm_llara_uses_the_files_and_recovers_users() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    tiny_lastfm(data.path());
    let paths = paths(data.path(), cache.path());
    let options = PrepareOptions {
        num_candidates: 10,
        ..PrepareOptions::default()
    };
    let prepared = prepare(DatasetName::LastFm, Protocol::Llara, &options, &paths).unwrap();
    assert_eq!(
        plain(&prepared.train),
        vec![
            ex(0, &[0, 1, 2], 3),
            ex(0, &[0, 1, 2, 3], 4),
            ex(0, &[0, 1, 2, 3, 4], 5),
            ex(0, &[0, 1, 2, 3, 4, 5], 6),
            ex(1, &[5, 6, 7], 8),
        ]
    );
    assert_eq!(plain(&prepared.val), vec![ex(0, &[10, 11, 12], 13)]);
    assert_eq!(plain(&prepared.test), vec![ex(0, &[14, 15, 16, 17], 18)]);
    let m = &prepared.manifest;
    assert_eq!(
        (m.num_users, m.num_items, m.num_interactions),
        (5, 30, 7 + 4 + 4 + 5 + 2)
    );
    check_candidates(&prepared);

    let loo = prepare(DatasetName::LastFm, Protocol::Loo, &options, &paths).unwrap();
    assert_eq!(
        plain(&loo.test),
        vec![
            ex(0, &[0, 1, 2, 3, 4, 5], 6),
            ex(1, &[5, 6, 7], 8),
            ex(2, &[10, 11, 12], 13),
            ex(3, &[14, 15, 16, 17], 18),
        ]
    );
    assert_eq!(
        plain(&loo.val),
        vec![ex(0, &[0, 1, 2, 3, 4], 5), ex(3, &[14, 15, 16], 17)]
    );
    assert_eq!(
        plain(&loo.train),
        vec![ex(0, &[0, 1, 2], 3), ex(0, &[0, 1, 2, 3], 4)]
    );
    check_candidates(&loo);
}

/// Twelve validation users (5 history items each) and two test users; no train file.
fn tiny_steam(root: &Path) {
    let pad = 30;
    write(root, "steam/llara/id2name.txt", &id2name(30));
    let val: String = (0..12)
        .map(|i| plain_row(&(i..i + 5).collect::<Vec<_>>(), i + 5, pad))
        .collect();
    write(root, "steam/llara/Val_data.jsonl", &val);
    let test = plain_row(&[20, 21, 22], 23, pad) + &plain_row(&[24, 25, 26, 27], 28, pad);
    write(root, "steam/llara/Test_data.jsonl", &test);
    // A sample of train rows is not a train split and must not be taken for one.
    write(
        root,
        "steam/llara/train_data.sample1000.jsonl",
        &plain_row(&[1, 2, 3], 4, pad),
    );
}

#[test]
fn steam_without_train_split_points_to_valtrain() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    tiny_steam(data.path());
    let paths = paths(data.path(), cache.path());
    let options = PrepareOptions::default();
    let err = prepare(DatasetName::Steam, Protocol::Llara, &options, &paths).unwrap_err();
    let DataError::Missing { missing, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(missing, &vec!["llara/train_data.jsonl".to_owned()]);
    let message = err.to_string();
    for needle in [
        "steam-valtrain",
        "joyliao7777/LLaRA",
        "train_data.df",
        "jmcauley",
    ] {
        assert!(message.contains(needle), "{needle} not in {message}");
    }

    let valtrain = prepare(
        DatasetName::SteamValTrain,
        Protocol::Llara,
        &options,
        &paths,
    )
    .unwrap();
    // 12 val users: the last one validates, the other 11 train on prefixes t = 3, 4, 5.
    assert_eq!(valtrain.train.len(), 33);
    assert_eq!(
        plain(&valtrain.train[..3]),
        vec![
            ex(0, &[0, 1, 2], 3),
            ex(0, &[0, 1, 2, 3], 4),
            ex(0, &[0, 1, 2, 3, 4], 5),
        ]
    );
    assert!(valtrain.train.iter().all(|r| r.user < 11));
    assert_eq!(
        plain(&valtrain.val),
        vec![ex(11, &[11, 12, 13, 14, 15], 16)]
    );
    assert_eq!(
        plain(&valtrain.test),
        vec![ex(0, &[20, 21, 22], 23), ex(1, &[24, 25, 26, 27], 28)]
    );
    assert_eq!(valtrain.catalog.dataset, "steam-valtrain");
    assert!(
        valtrain
            .manifest
            .notes
            .iter()
            .any(|n| n.contains("trains on LLaRA's validation users"))
    );
    assert_eq!(valtrain.manifest.num_users, 14);
    check_candidates(&valtrain);

    let loo = prepare(DatasetName::Steam, Protocol::Loo, &options, &paths).unwrap();
    assert_eq!(loo.test.len(), 14);
    assert_eq!(loo.val.len(), 12 + 1);
    assert_eq!(loo.train.len(), 12);
    assert_eq!(
        plain(&loo.test[12..]),
        vec![ex(12, &[20, 21, 22], 23), ex(13, &[24, 25, 26, 27], 28)]
    );
}

#[test]
fn names_parse_and_print() {
    for dataset in DatasetName::ALL {
        assert_eq!(dataset.to_string().parse::<DatasetName>().unwrap(), dataset);
        let json = serde_json::to_string(&dataset).unwrap();
        assert_eq!(json, format!("\"{dataset}\""));
    }
    for protocol in Protocol::ALL {
        assert_eq!(protocol.to_string().parse::<Protocol>().unwrap(), protocol);
        assert_eq!(
            serde_json::to_string(&protocol).unwrap(),
            format!("\"{protocol}\"")
        );
    }
    let err = "movies".parse::<DatasetName>().unwrap_err().to_string();
    assert!(
        err.contains("movielens, lastfm, steam, steam-valtrain"),
        "{err}"
    );
    let err = "LOO".parse::<Protocol>().unwrap_err().to_string();
    assert!(err.contains("llara, loo"), "{err}");
    assert!(DatasetName::SteamValTrain.label().contains("valtrain"));
}

#[test]
fn options_are_checked() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    tiny_movielens(data.path());
    let paths = paths(data.path(), cache.path());
    for options in [
        PrepareOptions {
            num_candidates: 0,
            ..PrepareOptions::default()
        },
        PrepareOptions {
            min_history: 11,
            ..PrepareOptions::default()
        },
        PrepareOptions {
            num_candidates: 40,
            ..PrepareOptions::default()
        },
    ] {
        assert!(prepare(DatasetName::MovieLens, Protocol::Loo, &options, &paths).is_err());
    }
}

#[test]
fn catalog_loads_without_a_split() {
    let data = tempfile::tempdir().unwrap();
    tiny_movielens(data.path());
    tiny_lastfm(data.path());
    let paths = paths(data.path(), data.path());
    let movies = load_catalog(DatasetName::MovieLens, &paths).unwrap();
    assert_eq!(movies.num_items(), 40);
    assert_eq!(movies.padding_id(), 40);
    assert_eq!(
        load_catalog(DatasetName::LastFm, &paths).unwrap().title(3),
        Some("Name 3")
    );
    assert!(load_catalog(DatasetName::Steam, &paths).is_err());
}

/// The real data (../shared/data beside the repository), when present.
#[test]
fn real_data_counts() {
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if !data_dir.is_dir() {
        eprintln!(
            "\n*** real_data_counts skipped: no data at {} ***\n",
            data_dir.display()
        );
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let paths = paths(&data_dir, cache.path());
    let options = PrepareOptions::default();
    let count = |dataset, protocol| {
        let prepared = prepare(dataset, protocol, &options, &paths).unwrap();
        check_candidates(&prepared);
        let m = &prepared.manifest;
        eprintln!(
            "{dataset}-{protocol}: users {} items {} interactions {} rows train {} val {} test {}",
            m.num_users,
            m.num_items,
            m.num_interactions,
            prepared.train.len(),
            prepared.val.len(),
            prepared.test.len()
        );
        prepared
    };

    // ((users, items, interactions), (train, val, test rows)): one row of docs/data.md's table.
    let counts = |prepared: &PreparedDataset| {
        let m = &prepared.manifest;
        (
            (m.num_users, m.num_items, m.num_interactions),
            (
                prepared.train.len(),
                prepared.val.len(),
                prepared.test.len(),
            ),
        )
    };

    let ml = count(DatasetName::MovieLens, Protocol::Llara);
    assert_eq!(counts(&ml), ((943, 1682, 100_000), (58_598, 94, 95)));
    assert_eq!(ml.catalog.title(0), Some("Toy Story"));
    assert_eq!(ml.catalog.title(542), Some("Misérables, Les"));
    assert_eq!(ml.test[0].target, 3);
    assert_eq!(
        ml.test[0].history,
        vec![704, 155, 80, 698, 745, 95, 1403, 202, 731, 432]
    );
    assert_eq!(
        counts(&count(DatasetName::MovieLens, Protocol::Loo)),
        (
            (943, 1682, 100_000),
            (100_000 - 943 * 2 - 943 * 3, 943, 943)
        )
    );

    assert_eq!(
        counts(&count(DatasetName::LastFm, Protocol::Llara)),
        ((1220, 4606, 52_925), (47_872, 122, 122))
    );
    assert_eq!(
        counts(&count(DatasetName::LastFm, Protocol::Loo)),
        ((1220, 4606, 52_925), (46_931, 1_114, 1_220))
    );

    // Steam: both protocols over the same 2,388 users.
    let valtrain = count(DatasetName::SteamValTrain, Protocol::Llara);
    assert_eq!(valtrain.catalog.num_items(), 3581);
    assert_eq!(
        counts(&valtrain),
        ((2388, 3581, 22_513), (6_936, 119, 1194 - 8))
    );
    let loo_counts = ((2388, 3581, 22_513), (10_658, 2_324, 2_370));
    assert_eq!(
        counts(&count(DatasetName::SteamValTrain, Protocol::Loo)),
        loo_counts
    );
    assert_eq!(
        counts(&count(DatasetName::Steam, Protocol::Loo)),
        loo_counts
    );
    if !data_dir.join("steam/llara/train_data.jsonl").is_file() {
        let err = prepare(DatasetName::Steam, Protocol::Llara, &options, &paths).unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err}");
    }
}
