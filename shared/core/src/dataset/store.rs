//! The prepared split on disk: `catalog.json`, `{train,val,test}.jsonl` and, written last,
//! `manifest.json` with the sha256 of each. A stored split is only reused when everything it
//! was made from and everything it holds still hashes as recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;

use super::{
    DatasetName, PREPARE_FORMAT, PrepareOptions, PreparedDataset, Protocol, SplitManifest,
};
use crate::artefact::{
    sha256_file, sha256_hex, to_json_pretty_bytes, write_atomic, write_json_atomic,
};
use crate::titles::lines;
use crate::{Catalog, DataError, Paths, SeqExample, SplitPart};

const MANIFEST: &str = "manifest.json";
const CATALOG: &str = "catalog.json";

fn part_file(part: SplitPart) -> String {
    format!("{}.jsonl", part.as_str())
}

/// What the split directory holds.
pub(crate) enum Cached {
    /// No manifest: never prepared (or a preparation died before its last write).
    Absent,
    /// A manifest that must not be trusted, and why.
    Stale(String),
    Valid(Box<PreparedDataset>),
}

/// sha256 over the sorted `name:hash\n` lines of the split files.
pub(crate) fn version_of(files: &BTreeMap<String, String>) -> String {
    let lines: String = files
        .iter()
        .map(|(name, hash)| format!("{name}:{hash}\n"))
        .collect();
    sha256_hex(lines.as_bytes())
}

pub(crate) fn load(
    dir: &Path,
    dataset: DatasetName,
    protocol: Protocol,
    options: &PrepareOptions,
    paths: &Paths,
) -> Cached {
    let manifest = match std::fs::read(dir.join(MANIFEST)) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Cached::Absent,
        Err(err) => return Cached::Stale(format!("{MANIFEST}: {err}")),
    };
    match load_checked(dir, &manifest, dataset, protocol, options, paths) {
        Ok(prepared) => Cached::Valid(Box::new(prepared)),
        Err(reason) => Cached::Stale(reason),
    }
}

fn load_checked(
    dir: &Path,
    manifest: &[u8],
    dataset: DatasetName,
    protocol: Protocol,
    options: &PrepareOptions,
    paths: &Paths,
) -> Result<PreparedDataset, String> {
    let manifest: SplitManifest =
        serde_json::from_slice(manifest).map_err(|err| format!("{MANIFEST}: {err}"))?;
    if manifest.format != PREPARE_FORMAT {
        return Err(format!(
            "prepared by format {}, this code writes format {PREPARE_FORMAT}",
            manifest.format
        ));
    }
    if (manifest.dataset, manifest.protocol, &manifest.options) != (dataset, protocol, options) {
        return Err(format!(
            "prepared as {}-{} with {:?}, now asked for {dataset}-{protocol} with {options:?}",
            manifest.dataset, manifest.protocol, manifest.options
        ));
    }
    for (relative, recorded) in &manifest.sources {
        match sha256_file(&paths.data_dir.join(relative)) {
            Ok(hash) if &hash == recorded => {}
            Ok(_) => return Err(format!("source {relative} changed since preparation")),
            Err(err) => return Err(format!("source {relative}: {err}")),
        }
    }
    let expected: BTreeSet<String> = std::iter::once(CATALOG.to_owned())
        .chain(SplitPart::ALL.into_iter().map(part_file))
        .collect();
    let listed: BTreeSet<String> = manifest.files.keys().cloned().collect();
    if listed != expected {
        return Err(format!(
            "{MANIFEST} lists {listed:?}, expected {expected:?}"
        ));
    }
    if manifest.version != version_of(&manifest.files) {
        return Err(format!(
            "{MANIFEST}: version does not match the file hashes"
        ));
    }

    let read_verified = |name: &str| -> Result<Vec<u8>, String> {
        let bytes = std::fs::read(dir.join(name)).map_err(|err| format!("{name}: {err}"))?;
        match manifest.files.get(name) {
            Some(recorded) if *recorded == sha256_hex(&bytes) => Ok(bytes),
            Some(_) | None => Err(format!("{name}: sha256 differs from {MANIFEST}")),
        }
    };
    let catalog: Catalog = serde_json::from_slice(&read_verified(CATALOG)?)
        .map_err(|err| format!("{CATALOG}: {err}"))?;
    if catalog.num_items() != manifest.num_items {
        return Err(format!(
            "{CATALOG}: {} items, manifest says {}",
            catalog.num_items(),
            manifest.num_items
        ));
    }
    let mut parts = Vec::with_capacity(3);
    for part in SplitPart::ALL {
        let name = part_file(part);
        let bytes = read_verified(&name)?;
        let rows = lines(&bytes)
            .map(|(line, text)| {
                serde_json::from_slice::<SeqExample>(text)
                    .map_err(|err| format!("{name}:{line}: {err}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if manifest.rows.get(part.as_str()) != Some(&rows.len()) {
            return Err(format!(
                "{name}: {} rows, manifest says {:?}",
                rows.len(),
                manifest.rows
            ));
        }
        parts.push(rows);
    }
    let [train, val, test]: [Vec<SeqExample>; 3] = parts
        .try_into()
        .map_err(|_| "three split parts expected".to_owned())?;
    Ok(PreparedDataset {
        manifest,
        catalog,
        train,
        val,
        test,
    })
}

fn jsonl(rows: &[SeqExample]) -> Result<Vec<u8>, DataError> {
    let mut bytes = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut bytes, row)
            .map_err(|err| DataError::Invalid(format!("cannot serialise a row: {err}")))?;
        bytes.push(b'\n');
    }
    Ok(bytes)
}

/// Writes the split files, then the manifest (with their hashes and the version) last, each
/// atomically, so a reader sees either the old complete manifest or the new one.
pub(crate) fn save(dir: &Path, prepared: &mut PreparedDataset) -> Result<(), DataError> {
    let io_error = |name: &str| {
        let path = dir.join(name);
        move |source| DataError::Io { path, source }
    };
    let mut contents: Vec<(String, Vec<u8>)> = vec![(
        CATALOG.to_owned(),
        to_json_pretty_bytes(&prepared.catalog).map_err(io_error(CATALOG))?,
    )];
    for part in SplitPart::ALL {
        contents.push((part_file(part), jsonl(prepared.rows(part))?));
    }
    let files: BTreeMap<String, String> = contents
        .iter()
        .map(|(name, bytes)| (name.clone(), sha256_hex(bytes)))
        .collect();
    prepared.manifest.version = version_of(&files);
    prepared.manifest.files = files;
    for (name, bytes) in &contents {
        write_atomic(&dir.join(name), bytes).map_err(io_error(name))?;
    }
    write_json_atomic(&dir.join(MANIFEST), &prepared.manifest).map_err(io_error(MANIFEST))
}
