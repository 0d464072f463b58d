//! Item titles: MovieLens `u.item` (Latin-1, titles normalised as LLaRA does) and LLaRA's
//! `id2name.txt` (LastFM, Steam; UTF-8 `id::name`).

use std::path::Path;

use crate::DataError;

/// ISO-8859-1 decoding: every byte is the Unicode code point of the same value, so this never
/// fails (u.item is Latin-1, e.g. `Mis\xe9rables, Les (1995)`).
pub fn decode_latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&byte| char::from(byte)).collect()
}

/// LLaRA's MovieLens title text (METHOD.md): drop a trailing " (YYYY)", then move a trailing
/// ", The" / ", A" / ", An" to the front: "Wizard of Oz, The (1939)" -> "The Wizard of Oz".
///
/// Same end-anchored checks as `norm_title` in bench/llara_anchor.py, except that the input is
/// trimmed first: three u.item titles end in a space after the year ("Two Friends (1986) "),
/// which the anchor leaves with their year.
pub fn normalize_movielens_title(raw: &str) -> String {
    let title = strip_year(raw.trim()).trim_end();
    for article in [", The", ", A", ", An"] {
        if let Some(stem) = title.strip_suffix(article) {
            return format!("{} {}", &article[2..], stem.trim_end());
        }
    }
    title.to_owned()
}

/// `title` without a trailing " (dddd)".
fn strip_year(title: &str) -> &str {
    let Some(open) = title.len().checked_sub(7) else {
        return title;
    };
    match title.get(open..).map(str::as_bytes) {
        Some([b' ', b'(', y1, y2, y3, y4, b')'])
            if [y1, y2, y3, y4].iter().all(|digit| digit.is_ascii_digit()) && open > 0 =>
        {
            &title[..open]
        }
        Some(_) | None => title,
    }
}

/// Splits a file into (1-based line number, line without its line ending), skipping empty
/// lines (the trailing newline, stray blank lines).
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    bytes
        .split(|&byte| byte == b'\n')
        .enumerate()
        .map(|(index, line)| (index + 1, line.strip_suffix(b"\r").unwrap_or(line)))
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
}

pub(crate) fn parse_error(path: &Path, line: usize, reason: impl Into<String>) -> DataError {
    DataError::Parse {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Places `title` at `index` of a dense id table, rejecting duplicates. A file of `rows`
/// lines can only hold ids 0..rows-1 densely: a larger id is refused here, before it sizes
/// the table (one corrupt id must not allocate gigabytes).
fn place(
    titles: &mut Vec<Option<String>>,
    (index, rows): (usize, usize),
    title: String,
    path: &Path,
    line: usize,
) -> Result<(), DataError> {
    if index >= rows {
        return Err(parse_error(
            path,
            line,
            format!(
                "item id out of range: item {index} (counted from 0) in a file of {rows} items, \
                 whose ids must be dense"
            ),
        ));
    }
    if titles.len() <= index {
        titles.resize(index + 1, None);
    }
    match &titles[index] {
        Some(_) => Err(parse_error(
            path,
            line,
            format!("duplicate item id {index}"),
        )),
        None => {
            titles[index] = Some(title);
            Ok(())
        }
    }
}

/// All ids 0..n-1 present, else the first gap is reported.
fn dense(titles: Vec<Option<String>>, path: &Path, what: &str) -> Result<Vec<String>, DataError> {
    if titles.is_empty() {
        return Err(DataError::Invalid(format!("{}: no items", path.display())));
    }
    titles
        .into_iter()
        .enumerate()
        .map(|(index, title)| {
            title.ok_or_else(|| {
                DataError::Invalid(format!(
                    "{}: {what} ids are not dense: id {index} is missing",
                    path.display()
                ))
            })
        })
        .collect()
}

/// MovieLens `u.item` (`id|title|date|...`, Latin-1) -> normalised titles indexed by LLaRA id
/// (`u.item` id - 1). Ids must be exactly 1..=n.
pub fn parse_movielens_items(bytes: &[u8], path: &Path) -> Result<Vec<String>, DataError> {
    let rows = lines(bytes).count();
    let mut titles: Vec<Option<String>> = Vec::new();
    for (line_no, line) in lines(bytes) {
        let text = decode_latin1(line);
        let mut fields = text.split('|');
        let (Some(id), Some(title)) = (fields.next(), fields.next()) else {
            return Err(parse_error(path, line_no, "expected `id|title|...`"));
        };
        let id: usize = id
            .trim()
            .parse()
            .map_err(|_| parse_error(path, line_no, format!("item id {id:?} is not a number")))?;
        let Some(index) = id.checked_sub(1) else {
            return Err(parse_error(
                path,
                line_no,
                "item id 0: u.item ids start at 1",
            ));
        };
        place(
            &mut titles,
            (index, rows),
            normalize_movielens_title(title),
            path,
            line_no,
        )?;
    }
    dense(titles, path, "u.item")
}

/// LLaRA's `id2name.txt` (`id::name` per line, UTF-8, ids 0..n-1) -> names indexed by id.
pub fn parse_id2name(bytes: &[u8], path: &Path) -> Result<Vec<String>, DataError> {
    let rows = lines(bytes).count();
    let mut titles: Vec<Option<String>> = Vec::new();
    for (line_no, line) in lines(bytes) {
        let text = std::str::from_utf8(line)
            .map_err(|err| parse_error(path, line_no, format!("not UTF-8: {err}")))?;
        let Some((id, name)) = text.split_once("::") else {
            return Err(parse_error(path, line_no, "expected `id::name`"));
        };
        let id: usize = id
            .trim()
            .parse()
            .map_err(|_| parse_error(path, line_no, format!("item id {id:?} is not a number")))?;
        place(
            &mut titles,
            (id, rows),
            name.trim().to_owned(),
            path,
            line_no,
        )?;
    }
    dense(titles, path, "id2name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn movielens_titles_lose_year_and_move_articles() {
        let cases = [
            ("Wizard of Oz, The (1939)", "The Wizard of Oz"),
            ("Affair to Remember, An (1957)", "An Affair to Remember"),
            ("Time to Kill, A (1996)", "A Time to Kill"),
            ("Toy Story (1995)", "Toy Story"),
            ("Two Friends (1986) ", "Two Friends"),
            ("unknown", "unknown"),
            (
                "Horseman on the Roof, The (Hussard sur le toit, Le) (1995)",
                "Horseman on the Roof, The (Hussard sur le toit, Le)",
            ),
            (
                "Good, The Bad and The Ugly, The (1966)",
                "The Good, The Bad and The Ugly",
            ),
            ("Misérables, Les (1995)", "Misérables, Les"),
            (
                "Á köldum klaka (Cold Fever) (1994)",
                "Á köldum klaka (Cold Fever)",
            ),
            ("Theatre", "Theatre"),
            ("(1995)", "(1995)"),
        ];
        for (raw, expected) in cases {
            assert_eq!(normalize_movielens_title(raw), expected, "{raw}");
        }
    }

    #[test]
    fn latin1_bytes_decode_to_their_code_points() {
        assert_eq!(
            decode_latin1(b"Mis\xe9rables, Les (1995)"),
            "Misérables, Les (1995)"
        );
        assert_eq!(decode_latin1(b"\xc1 k\xf6ldum"), "Á köldum");
    }

    #[test]
    fn u_item_parsing_decodes_latin1_and_checks_density() {
        let path = Path::new("u.item");
        let bytes = b"1|Toy Story (1995)|01-Jan-1995||http://x|0|1\n\
                      2|Mis\xe9rables, Les (1995)|x\r\n3|Wizard of Oz, The (1939)|x\n";
        let titles = parse_movielens_items(bytes, path).unwrap();
        assert_eq!(
            titles,
            vec!["Toy Story", "Misérables, Les", "The Wizard of Oz"]
        );

        // Two lines with a gap: some id is past the end of a dense table of two.
        let gap = parse_movielens_items(b"1|A (1990)|\n3|B (1991)|\n", path).unwrap_err();
        assert!(
            gap.to_string()
                .starts_with("u.item:2: item id out of range"),
            "{gap}"
        );
        let bad = parse_movielens_items(b"1|A|\nx|B|\n", path).unwrap_err();
        assert!(bad.to_string().starts_with("u.item:2:"), "{bad}");
        let dup = parse_movielens_items(b"1|A|\n1|B|\n", path).unwrap_err();
        assert!(dup.to_string().contains("duplicate"), "{dup}");
    }

    #[test]
    fn id2name_parsing() {
        let path = Path::new("id2name.txt");
        let titles = parse_id2name("1::Enigma\n0::Café Del Mar\r\n2::A::B\n".as_bytes(), path);
        assert_eq!(titles.unwrap(), vec!["Café Del Mar", "Enigma", "A::B"]);
        let err = parse_id2name(b"0::a\nbroken\n", path).unwrap_err();
        assert!(err.to_string().starts_with("id2name.txt:2:"), "{err}");
        assert!(parse_id2name(b"0::a\n2::c\n", path).is_err());
        // A corrupt huge id is refused by its line, before it sizes anything.
        for huge in ["99999999999999", "18446744073709551615"] {
            let err = parse_id2name(format!("0::a\n{huge}::b\n").as_bytes(), path).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("id2name.txt:2: item id out of range"),
                "{err}"
            );
        }
        assert!(parse_id2name(b"0::\xff\n", path).is_err());
    }
}
