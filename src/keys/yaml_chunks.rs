//! Large YAML snapshots read as a stream and parsed on every core.
//!
//! The YAML scanner is the cost of loading a big snapshot (JSON parses about three times
//! faster), and it is single-threaded. A snapshot has one big part, the block sequence under
//! the top-level `keys:`, whose items start at a fixed indentation. This module reads the
//! document line by line, finds those item boundaries by looking at line starts only, hands
//! runs of items to every core as soon as each run is complete (each item built into its key
//! as soon as it is parsed, see `stream`), and parses what is left (`version:` and the rest)
//! with `keys:` emptied. Read from a file, a large snapshot is never held whole: only the
//! runs waiting for a thread.
//!
//! It never decides alone: any document it does not recognise (flow style, several
//! documents, directives, too few keys) or any run that fails to parse goes back to the
//! ordinary whole-document parser, whose error messages name the entry exactly.

use std::io::{self, BufRead};
use std::sync::Arc;

use serde::de::DeserializeSeed;

use super::snapshot::{Key, SnapshotDoc, SnapshotError};
use super::stream::{Built, Entries};

/// A document with at most this many items is parsed whole, on the calling thread.
pub const MIN_ITEMS: usize = 2_000;
/// Items per parse job. The YAML parser holds a document's whole event stream, several KB
/// per item, so small jobs keep a load's peak low: at 10k keys, 25 MB in jobs of 1000
/// against 46 MB whole, and in half the time.
const ITEMS_PER_CHUNK: usize = 1_000;

/// What reading a YAML snapshot as a stream gave.
#[derive(Debug)]
pub enum Streamed {
    /// Read on every core: the version and the keys, or the first refused entry, named.
    Built(Result<Built, SnapshotError>),
    /// Not worth reading on every core (too few items, or not the plain shape), found while
    /// the text was still held: here it is whole, for the whole-document parser (empty
    /// unless [`Keep::Text`]).
    Whole(String),
    /// Something failed after the text read so far had been let go (a run that does not
    /// parse, an unusual line late in the document): read it again, whole.
    GaveUp,
}

/// Whether the text read before the work is spread over every core is kept, to be handed
/// back whole if the document is small or unusual. A caller holding the text says
/// [`Keep::Nothing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Text,
    Nothing,
}

/// Read a YAML snapshot from `reader` to its end (unless it gives up), on every core once
/// it has [`MIN_ITEMS`] items. Each run's entries become keys on the thread that parsed
/// them, as they are read, so a load never holds every parsed entry at once.
pub fn read(mut reader: impl BufRead, keep: Keep) -> io::Result<Streamed> {
    let mut splitter = Splitter::new(ITEMS_PER_CHUNK);
    let mut held = String::new();
    let mut first = Vec::new();
    let mut line = String::new();
    // Hold the text until there are enough items to be worth the threads.
    while first.len() * ITEMS_PER_CHUNK < MIN_ITEMS {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(Streamed::Whole(held));
        }
        if keep == Keep::Text {
            held.push_str(&line);
        }
        match splitter.feed(&line) {
            Ok(Some(run)) => first.push(run),
            Ok(None) => {}
            Err(Unusual) => {
                if keep == Keep::Text {
                    reader.read_to_string(&mut held)?;
                }
                return Ok(Streamed::Whole(held));
            }
        }
    }
    drop(held);
    let (rest, built) = super::parallel::map_stream(
        |send| {
            first.into_iter().for_each(&mut *send);
            read_runs(reader, splitter, send)
        },
        |run: Run| run.build(),
    );
    let envelope = match rest? {
        Ok(envelope) => envelope,
        Err(Unusual) => return Ok(Streamed::GaveUp),
    };
    let version = match serde_yaml::from_str::<SnapshotDoc>(&envelope) {
        Ok(doc) if doc.keys.is_empty() => doc.version,
        _ => return Ok(Streamed::GaveUp),
    };
    let mut keys = Vec::new();
    for run in built {
        match run.flatten() {
            Some(Ok(run)) => keys.extend(run),
            Some(Err(refused)) => return Ok(Streamed::Built(Err(refused))),
            None => return Ok(Streamed::GaveUp),
        }
    }
    Ok(Streamed::Built(Ok((version, keys))))
}

/// A YAML snapshot held in memory, read the same way: `None` when it should be parsed
/// whole.
pub fn parse(text: &str) -> Option<Result<Built, SnapshotError>> {
    match read(text.as_bytes(), Keep::Nothing) {
        Ok(Streamed::Built(built)) => Some(built),
        _ => None,
    }
}

/// The rest of the document after the first runs: every further run sent as it completes;
/// the envelope at the end.
fn read_runs(
    mut reader: impl BufRead,
    mut splitter: Splitter,
    send: &mut dyn FnMut(Run),
) -> io::Result<Result<String, Unusual>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        match splitter.feed(&line) {
            Ok(Some(run)) => send(run),
            Ok(None) => {}
            Err(Unusual) => return Ok(Err(Unusual)),
        }
    }
    Ok(splitter.finish().map(|(envelope, last)| {
        if let Some(run) = last {
            send(run);
        }
        envelope
    }))
}

/// A run of whole items of the `keys:` sequence: a valid YAML block sequence on its own.
#[derive(Debug, PartialEq)]
struct Run {
    /// Its first item's index in the whole list.
    offset: usize,
    items: usize,
    text: String,
}

impl Run {
    /// Its keys, built as they are parsed; the first refused entry; or `None` if it fails
    /// to parse or holds another number of items than its boundaries said.
    fn build(self) -> Option<Result<Vec<Arc<Key>>, SnapshotError>> {
        let mut refused = None;
        let entries = Entries {
            offset: self.offset,
            refused: &mut refused,
        };
        match entries.deserialize(serde_yaml::Deserializer::from_str(&self.text)) {
            Ok(keys) if keys.len() == self.items => Some(Ok(keys)),
            Ok(_) => None,
            Err(_) => refused.map(Err),
        }
    }
}

/// Not the plain shape: left to the whole-document parser.
#[derive(Debug, PartialEq)]
struct Unusual;

/// Where the splitter is in the document.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    /// Before the top-level `keys:` line.
    Head,
    /// After `keys:`, before its first item.
    KeysLine,
    /// Inside the sequence, whose items start at `indent` spaces.
    Items { indent: usize },
    /// After the sequence.
    Tail,
}

/// Cuts a document, fed line by line, into runs of whole items of the top-level `keys:`
/// block sequence and the envelope: the rest, with the sequence replaced by `[]`.
struct Splitter {
    part: Part,
    per_run: usize,
    envelope: String,
    run: Run,
    /// Lines fed so far.
    lines: usize,
}

impl Splitter {
    fn new(per_run: usize) -> Self {
        Splitter {
            part: Part::Head,
            per_run,
            envelope: String::new(),
            run: Run {
                offset: 0,
                items: 0,
                text: String::new(),
            },
            lines: 0,
        }
    }

    /// Take one line (with its line break); a run is returned once the line after its last
    /// item starts another one.
    fn feed(&mut self, raw: &str) -> Result<Option<Run>, Unusual> {
        let line = raw.trim_end_matches(['\n', '\r']);
        self.lines += 1;
        // Several documents and directives are left to the full parser.
        if line.starts_with("---") || (self.lines == 1 && line.starts_with('%')) {
            return Err(Unusual);
        }
        match self.part {
            Part::Head => {
                if is_keys_line(line) {
                    self.part = Part::KeysLine;
                }
                self.envelope.push_str(raw);
            }
            Part::KeysLine if is_filler(line) => self.envelope.push_str(raw),
            Part::KeysLine => {
                let indent = indent_of(line);
                if !item_at(line, indent) {
                    return Err(Unusual);
                }
                self.part = Part::Items { indent };
                return Ok(self.item(raw));
            }
            Part::Items { indent } => {
                if is_filler(line) {
                    self.run.text.push_str(raw);
                } else if item_at(line, indent) {
                    return Ok(self.item(raw));
                } else if indent_of(line) <= indent {
                    self.part = Part::Tail;
                    self.envelope.push_str("  []\n");
                    self.envelope.push_str(raw);
                } else {
                    self.run.text.push_str(raw);
                }
            }
            Part::Tail => self.envelope.push_str(raw),
        }
        Ok(None)
    }

    /// A line that starts an item: it starts a new run when the current one is full.
    fn item(&mut self, raw: &str) -> Option<Run> {
        let full = (self.run.items == self.per_run).then(|| {
            let offset = self.run.offset + self.run.items;
            std::mem::replace(
                &mut self.run,
                Run {
                    offset,
                    items: 0,
                    text: String::new(),
                },
            )
        });
        self.run.items += 1;
        self.run.text.push_str(raw);
        full
    }

    /// The envelope and the last run, at the end of the document.
    fn finish(mut self) -> Result<(String, Option<Run>), Unusual> {
        match self.part {
            Part::Head | Part::KeysLine => Err(Unusual),
            Part::Items { .. } => {
                self.envelope.push_str("  []\n");
                Ok((self.envelope, Some(self.run)))
            }
            Part::Tail => Ok((self.envelope, Some(self.run))),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: usize) -> String {
        format!(
            "  - id: key_{i}\n    sha256: {i:064x}\n    type: personal\n    subject_id: s{i}\n    account_id: a\n    scopes: [read]\n"
        )
    }

    /// The envelope and the runs' texts, or `Unusual`.
    fn cut(text: &str, per_run: usize) -> Result<(String, Vec<String>), Unusual> {
        let mut splitter = Splitter::new(per_run);
        let mut runs = Vec::new();
        for line in text.split_inclusive('\n') {
            runs.extend(splitter.feed(line)?);
        }
        let (envelope, last) = splitter.finish()?;
        runs.extend(last);
        Ok((envelope, runs.into_iter().map(|r| r.text).collect()))
    }

    #[test]
    fn splits_at_item_starts_and_keeps_the_rest() {
        let text = format!(
            "version: 7\n# keys follow\nkeys:\n  # first\n{}{}\n{}",
            item(0),
            item(1),
            item(2)
        );
        let (envelope, runs) = cut(&text, 2).expect("plain shape");
        assert_eq!(runs, [format!("{}{}\n", item(0), item(1)), item(2)]);
        assert_eq!(
            envelope,
            "version: 7\n# keys follow\nkeys:\n  # first\n  []\n"
        );
    }

    #[test]
    fn sequence_at_column_zero_and_fields_after_it() {
        let text = "keys:\n- id: a\n  scopes:\n  - read\n- id: b\nversion: 3\n";
        let (envelope, runs) = cut(text, 1).expect("plain shape");
        assert_eq!(runs, ["- id: a\n  scopes:\n  - read\n", "- id: b\n"]);
        assert_eq!(envelope, "keys:\n  []\nversion: 3\n");
    }

    #[test]
    fn runs_know_their_place_in_the_whole_list() {
        let text = format!("keys:\n{}", (0..5).map(item).collect::<String>());
        let mut splitter = Splitter::new(2);
        let mut runs = Vec::new();
        for line in text.split_inclusive('\n') {
            runs.extend(splitter.feed(line).unwrap());
        }
        runs.extend(splitter.finish().unwrap().1);
        let places: Vec<_> = runs.iter().map(|r| (r.offset, r.items)).collect();
        assert_eq!(places, [(0, 2), (2, 2), (4, 1)]);
    }

    #[test]
    fn other_shapes_are_left_to_the_full_parser() {
        for text in [
            "keys: []\n",
            "keys: [{id: a}]\n",
            "---\nkeys:\n  - id: a\n",
            "keys:\n  - id: a\n---\nkeys:\n  - id: b\n",
            "%YAML 1.2\n---\nkeys:\n  - id: a\n",
            "keys:\n  id: a\n",
            "keys:\n\t- id: a\n",
            "version: 1\n",
        ] {
            assert_eq!(cut(text, 1), Err(Unusual), "{text:?}");
        }
        let small = format!("keys:\n{}", item(0));
        match read(small.as_bytes(), Keep::Text).unwrap() {
            Streamed::Whole(text) => assert_eq!(text, small, "too few items: handed back whole"),
            other => panic!("{other:?}"),
        }
        let flow = format!("keys: [{}]\n", "{id: a}, ".repeat(MIN_ITEMS));
        match read(flow.as_bytes(), Keep::Text).unwrap() {
            Streamed::Whole(text) => assert_eq!(text, flow, "unusual: handed back whole"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parallel_parse_matches_the_whole_document_parse() {
        let mut text = String::from("version: 2\nkeys:\n");
        for i in 0..(MIN_ITEMS * 3 + 3) {
            text.push_str(&item(i));
            if i % 1000 == 0 {
                text.push_str("  # a comment between items\n\n");
            }
        }
        let (version, fast) = parse(&text).expect("parsed in runs").unwrap();
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
        for i in 0..(MIN_ITEMS + 1000) {
            let entry = item(i);
            text.push_str(&if i == 2500 {
                entry.replace("personal", "robot")
            } else {
                entry
            });
        }
        match parse(&text) {
            Some(Err(SnapshotError::Entry {
                index, id, field, ..
            })) => {
                assert_eq!((index, field), (2500, "type"));
                assert_eq!(id, "key_2500");
            }
            other => panic!("{:?}", other.map(|r| r.map(|(v, k)| (v, k.len())))),
        }
    }

    #[test]
    fn any_failing_run_or_late_surprise_gives_up() {
        // Enough items that the work is on every core before the end.
        let mut text = String::from("keys:\n");
        for i in 0..=MIN_ITEMS {
            text.push_str(&item(i));
        }
        let bad = format!("{text}  - id: bad\n    unknown_field: 1\n");
        assert!(matches!(
            read(bad.as_bytes(), Keep::Text),
            Ok(Streamed::GaveUp)
        ));
        let first = item(MIN_ITEMS).replacen("  - ", "  - &a\n    ", 1);
        let alias = format!("keys:\n{first}{}  - *a\n", item(0).repeat(MIN_ITEMS));
        assert!(parse(&alias).is_none(), "an alias across runs");
        let late = format!("{text}---\nkeys: []\n");
        assert!(matches!(
            read(late.as_bytes(), Keep::Text),
            Ok(Streamed::GaveUp)
        ));
        let envelope = format!("{text}unknown: 1\n");
        assert!(matches!(
            read(envelope.as_bytes(), Keep::Text),
            Ok(Streamed::GaveUp)
        ));
    }

    #[test]
    fn a_read_error_is_an_error() {
        let mut text = String::from("keys:\n").into_bytes();
        for i in 0..(MIN_ITEMS + 10) {
            text.extend_from_slice(item(i).as_bytes());
        }
        text.extend_from_slice(b"  - id: \xff\n");
        let e = read(&text[..], Keep::Text).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
