//! Large YAML snapshots parsed on every core.
//!
//! The YAML scanner is the cost of loading a big snapshot (JSON parses about three times
//! faster), and it is single-threaded. A snapshot has one big part, the block sequence under
//! the top-level `keys:`, whose items start at a fixed indentation. This module finds those
//! item boundaries by looking at line starts only, parses runs of items on all cores, and
//! parses what is left (`version:` and the rest) with `keys:` emptied.
//!
//! It never decides alone: any document it does not recognise (flow style, several
//! documents, directives, too few keys) or any chunk that fails to parse goes back to the
//! ordinary whole-document parser, whose error messages name the entry exactly.

use super::snapshot::{KeyDoc, SnapshotDoc};

/// Below this many items the whole document is parsed on the calling thread.
pub const MIN_ITEMS: usize = 2_000;
/// Items per parse job. The YAML parser holds a document's whole event stream, several KB
/// per item, so small jobs keep a load's peak low: at 10k keys, 25 MB in jobs of 1000
/// against 46 MB whole, and in half the time.
const ITEMS_PER_CHUNK: usize = 1_000;

/// A document cut into the part around `keys:` and runs of whole sequence items.
#[derive(Debug, PartialEq)]
struct Split<'a> {
    /// The document with the `keys:` sequence replaced by `[]`.
    envelope: String,
    /// Runs of whole items, in document order; each a valid YAML block sequence.
    chunks: Vec<&'a str>,
}

/// Parse `text` in parallel when it has the plain shape of a large snapshot; `None` when it
/// does not, or when any part fails to parse (the caller then parses it whole).
///
/// Keys are built afterwards, not by the thread that parsed them: interleaving the
/// parser's short-lived allocations with long-lived keys fragments glibc's heap, and
/// measured 1.4 s → 2.0 s for 200k keys.
pub fn parse(text: &str) -> Option<SnapshotDoc> {
    let split = split(text, MIN_ITEMS, ITEMS_PER_CHUNK)?;
    let mut doc: SnapshotDoc = serde_yaml::from_str(&split.envelope).ok()?;
    if !doc.keys.is_empty() {
        return None;
    }
    doc.keys = parse_chunks(&split.chunks)?;
    Some(doc)
}

/// Every chunk's items, parsed on all cores (each thread a contiguous run of chunks), in
/// document order; `None` if any fails.
fn parse_chunks(chunks: &[&str]) -> Option<Vec<KeyDoc>> {
    let threads = super::parallel::threads_for(chunks.len(), 1);
    let parts: Vec<&[&str]> = chunks
        .chunks(chunks.len().div_ceil(threads).max(1))
        .collect();
    let parsed = super::parallel::map_parts(parts, |run| {
        let mut docs = Vec::with_capacity(run.len() * ITEMS_PER_CHUNK);
        for chunk in run {
            docs.extend(serde_yaml::from_str::<Vec<KeyDoc>>(chunk).ok()?);
        }
        Some(docs)
    });
    let mut keys = Vec::with_capacity(chunks.len() * ITEMS_PER_CHUNK);
    for docs in parsed {
        keys.extend(docs??);
    }
    Some(keys)
}

/// A line's content without its line break, and where it starts in `text`.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split_inclusive('\n').scan(0, |at, line| {
        let start = *at;
        *at += line.len();
        Some((start, line.trim_end_matches(['\n', '\r'])))
    })
}

/// Blank, or only a comment: such a line belongs to no item in particular.
fn is_filler(line: &str) -> bool {
    let t = line.trim_start_matches(' ');
    t.is_empty() || t.starts_with('#')
}

/// `keys:` at the top level, with nothing after it but a comment.
fn is_keys_line(line: &str) -> bool {
    line.strip_prefix("keys:").is_some_and(|rest| {
        let rest = rest.trim_start_matches(' ');
        rest.is_empty() || rest.starts_with('#')
    })
}

/// Does the line open a sequence item at exactly `indent` spaces?
fn item_at(line: &str, indent: usize) -> bool {
    let bytes = line.as_bytes();
    bytes.len() > indent
        && bytes[..indent].iter().all(|&b| b == b' ')
        && bytes[indent] == b'-'
        && matches!(bytes.get(indent + 1), None | Some(b' '))
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Find the item boundaries of the top-level `keys:` block sequence.
fn split(text: &str, min_items: usize, per_chunk: usize) -> Option<Split<'_>> {
    // Several documents and directives are left to the full parser.
    if text.starts_with("---") || text.contains("\n---") || text.starts_with('%') {
        return None;
    }
    let mut it = lines(text).skip_while(|(_, l)| !is_keys_line(l));
    it.next()?;
    let mut it = it.skip_while(|(_, l)| is_filler(l)).peekable();
    let &(first, first_line) = it.peek()?;
    let indent = indent_of(first_line);
    if !item_at(first_line, indent) {
        return None;
    }
    let mut items = Vec::new();
    let mut end = text.len();
    for (at, line) in it {
        if is_filler(line) {
            continue;
        }
        if item_at(line, indent) {
            items.push(at);
        } else if indent_of(line) <= indent {
            end = at;
            break;
        }
    }
    if items.len() < min_items {
        return None;
    }
    let chunks = items
        .chunks(per_chunk)
        .enumerate()
        .map(|(i, run)| {
            let stop = items.get((i + 1) * per_chunk).copied().unwrap_or(end);
            &text[run[0]..stop]
        })
        .collect();
    let envelope = format!("{}  []\n{}", &text[..first], &text[end..]);
    Some(Split { envelope, chunks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: usize) -> String {
        format!("  - id: key_{i}\n    sha256: {i:064x}\n    scopes: [read]\n")
    }

    #[test]
    fn splits_at_item_starts_and_keeps_the_rest() {
        let text = format!(
            "version: 7\n# keys follow\nkeys:\n  # first\n{}{}\n{}",
            item(0),
            item(1),
            item(2)
        );
        let s = split(&text, 1, 2).expect("plain shape");
        assert_eq!(s.chunks, [format!("{}{}\n", item(0), item(1)), item(2)]);
        assert_eq!(
            s.envelope,
            "version: 7\n# keys follow\nkeys:\n  # first\n  []\n"
        );
    }

    #[test]
    fn sequence_at_column_zero_and_fields_after_it() {
        let text = "keys:\n- id: a\n  scopes:\n  - read\n- id: b\nversion: 3\n";
        let s = split(text, 1, 1).expect("plain shape");
        assert_eq!(s.chunks, ["- id: a\n  scopes:\n  - read\n", "- id: b\n"]);
        assert_eq!(s.envelope, "keys:\n  []\nversion: 3\n");
    }

    #[test]
    fn other_shapes_are_left_to_the_full_parser() {
        for text in [
            "keys: []\n",
            "keys: [{id: a}]\n",
            "---\nkeys:\n  - id: a\n",
            "%YAML 1.2\n---\nkeys:\n  - id: a\n",
            "keys:\n  id: a\n",
            "keys:\n\t- id: a\n",
            "version: 1\n",
        ] {
            assert_eq!(split(text, 1, 1), None, "{text:?}");
        }
        assert_eq!(split("keys:\n  - id: a\n", 2, 1), None, "too few items");
    }

    #[test]
    fn parallel_parse_matches_the_whole_document_parse() {
        let mut text = String::from("version: 2\nkeys:\n");
        for i in 0..(MIN_ITEMS + 3) {
            text.push_str(&item(i));
            if i % 1000 == 0 {
                text.push_str("  # a comment between items\n\n");
            }
        }
        let fast = parse(&text).expect("parsed in chunks");
        let whole: SnapshotDoc = serde_yaml::from_str(&text).unwrap();
        assert_eq!(fast.version, Some(2));
        assert_eq!(fast.keys.len(), whole.keys.len());
        assert!(fast
            .keys
            .iter()
            .zip(&whole.keys)
            .all(|(a, b)| a.id == b.id && a.sha256 == b.sha256 && a.scopes == b.scopes));
    }

    #[test]
    fn any_failing_chunk_gives_up() {
        let mut text = String::from("keys:\n");
        for i in 0..MIN_ITEMS {
            text.push_str(&item(i));
        }
        text.push_str("  - id: bad\n    unknown_field: 1\n");
        assert!(parse(&text).is_none());
        let alias = format!(
            "keys:\n  - &a {{id: x}}\n{}  - *a\n",
            item(0).repeat(MIN_ITEMS)
        );
        assert!(parse(&alias).is_none(), "an alias across chunks");
    }
}
