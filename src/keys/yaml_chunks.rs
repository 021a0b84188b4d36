//! Large YAML snapshots parsed on every core.
//!
//! The YAML scanner is the cost of loading a big snapshot (JSON parses about three times
//! faster), and it is single-threaded. A snapshot has one big part, the block sequence under
//! the top-level `keys:`, whose items start at a fixed indentation. This module finds those
//! item boundaries by looking at line starts only, reads runs of items on all cores (each
//! item built into its key as soon as it is parsed, see `stream`), and parses what is left
//! (`version:` and the rest) with `keys:` emptied.
//!
//! It never decides alone: any document it does not recognise (flow style, several
//! documents, directives, too few keys) or any chunk that fails to parse goes back to the
//! ordinary whole-document parser, whose error messages name the entry exactly.

use std::sync::Arc;

use serde::de::DeserializeSeed;

use super::snapshot::{Key, SnapshotDoc, SnapshotError};
use super::stream::{Built, Entries};

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
    /// Items in all runs.
    items: usize,
}

/// A large YAML snapshot read on every core: its `version` and its keys, built, or the
/// first refused entry, named. `None` when the document does not have the plain shape, or
/// when any part fails to parse (the caller then parses it whole).
///
/// Each run's entries become keys on the thread that parsed them, as they are read, so a
/// load never holds every parsed entry at once.
pub fn parse(text: &str) -> Option<Result<Built, SnapshotError>> {
    let split = split(text, MIN_ITEMS, ITEMS_PER_CHUNK)?;
    let envelope: SnapshotDoc = serde_yaml::from_str(&split.envelope).ok()?;
    if !envelope.keys.is_empty() {
        return None;
    }
    let keys = build_chunks(&split.chunks, split.items)?;
    Some(keys.map(|keys| (envelope.version, keys)))
}

/// Every chunk's keys, read and built on all cores (each thread a contiguous run of
/// chunks), in document order; the first refused entry; or `None` if any chunk fails to
/// parse or holds another number of items than its boundaries said.
fn build_chunks(chunks: &[&str], items: usize) -> Option<Result<Vec<Arc<Key>>, SnapshotError>> {
    let built = super::parallel::map_parts(super::parallel::runs(chunks), |(first, run)| {
        let mut keys = Vec::with_capacity(run.len() * ITEMS_PER_CHUNK);
        for (i, chunk) in run.iter().enumerate() {
            let offset = (first + i) * ITEMS_PER_CHUNK;
            let expected = ITEMS_PER_CHUNK.min(items - offset);
            let mut refused = None;
            let entries = Entries {
                offset,
                refused: &mut refused,
            };
            match entries.deserialize(serde_yaml::Deserializer::from_str(chunk)) {
                Ok(run_keys) if run_keys.len() == expected => keys.extend(run_keys),
                Ok(_) => return None,
                Err(_) => return refused.map(Err),
            }
        }
        Some(Ok(keys))
    });
    let mut keys = Vec::with_capacity(items);
    for run in built {
        match run?? {
            Ok(run) => keys.extend(run),
            Err(refused) => return Some(Err(refused)),
        }
    }
    Some(Ok(keys))
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
    Some(Split {
        envelope,
        chunks,
        items: items.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: usize) -> String {
        format!(
            "  - id: key_{i}\n    sha256: {i:064x}\n    type: personal\n    subject_id: s{i}\n    account_id: a\n    scopes: [read]\n"
        )
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
        let (version, fast) = parse(&text).expect("parsed in chunks").unwrap();
        let whole: SnapshotDoc = serde_yaml::from_str(&text).unwrap();
        assert_eq!(version, Some(2));
        assert_eq!(fast.len(), whole.keys.len());
        assert!(fast.iter().zip(&whole.keys).all(|(a, b)| *a.id == *b.id
            && hex::encode(a.digest()) == *b.sha256
            && a.scopes().iter().eq(b.scopes.iter())));
    }

    /// A refused entry in a later run is named by its index in the whole list.
    #[test]
    fn a_refused_entry_is_named_in_the_whole_list() {
        let mut text = String::from("keys:\n");
        for i in 0..(MIN_ITEMS + 10) {
            let entry = item(i);
            text.push_str(&if i == 1500 {
                entry.replace("personal", "robot")
            } else {
                entry
            });
        }
        match parse(&text) {
            Some(Err(SnapshotError::Entry {
                index, id, field, ..
            })) => {
                assert_eq!((index, field), (1500, "type"));
                assert_eq!(id, "key_1500");
            }
            other => panic!("{:?}", other.map(|r| r.map(|(v, k)| (v, k.len())))),
        }
    }

    #[test]
    fn any_failing_chunk_gives_up() {
        let mut text = String::from("keys:\n");
        for i in 0..MIN_ITEMS {
            text.push_str(&item(i));
        }
        text.push_str("  - id: bad\n    unknown_field: 1\n");
        assert!(parse(&text).is_none());
        let first = item(MIN_ITEMS).replacen("  - ", "  - &a\n    ", 1);
        let alias = format!("keys:\n{first}{}  - *a\n", item(0).repeat(MIN_ITEMS));
        assert!(parse(&alias).is_none(), "an alias across chunks");
    }
}
