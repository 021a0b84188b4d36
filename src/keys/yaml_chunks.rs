//! Where the items of a YAML snapshot's `keys:` list begin and end, for reading it on every
//! core (`runs`).
//!
//! The YAML scanner is the cost of loading a big snapshot, and it is single-threaded. The
//! items of the block sequence under the top-level `keys:` start at a fixed indentation, so
//! their boundaries show in the line starts alone. Flow style, several documents and
//! directives are left to the whole-document parser.

use super::runs::{Cutter, Run, Unusual};
use super::snapshot::Format;

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
pub(super) struct Splitter {
    part: Part,
    per_run: usize,
    envelope: Vec<u8>,
    run: Run,
    /// Lines fed so far.
    lines: usize,
    /// The start of a line whose end has not been fed yet.
    partial: Vec<u8>,
}

impl Cutter for Splitter {
    const FORMAT: Format = Format::Yaml;

    fn feed(&mut self, mut bytes: &[u8], done: &mut Vec<Run>) -> Result<(), Unusual> {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = bytes.split_at(end + 1);
            bytes = rest;
            let run = if self.partial.is_empty() {
                self.line(line)?
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole)?
            };
            done.extend(run);
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    fn finish(mut self, done: &mut Vec<Run>) -> Result<Vec<u8>, Unusual> {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            done.extend(self.line(&last)?);
        }
        match self.part {
            Part::Head | Part::KeysLine => return Err(Unusual),
            Part::Items { .. } => self.envelope.extend_from_slice(b"  []\n"),
            Part::Tail => {}
        }
        done.push(self.run);
        Ok(self.envelope)
    }
}

impl Splitter {
    pub(super) fn new(per_run: usize) -> Self {
        Splitter {
            part: Part::Head,
            per_run,
            envelope: Vec::new(),
            run: Run::new(0),
            lines: 0,
            partial: Vec::new(),
        }
    }

    /// Take one line (with its line break); a run is returned once the line after its last
    /// item starts another one.
    fn line(&mut self, raw: &[u8]) -> Result<Option<Run>, Unusual> {
        // Not UTF-8: the whole-document reader reports it.
        let line = std::str::from_utf8(raw)
            .map_err(|_| Unusual)?
            .trim_end_matches(['\n', '\r']);
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
                self.envelope.extend_from_slice(raw);
            }
            Part::KeysLine if is_filler(line) => self.envelope.extend_from_slice(raw),
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
                    self.run.text.extend_from_slice(raw);
                } else if item_at(line, indent) {
                    return Ok(self.item(raw));
                } else if indent_of(line) <= indent {
                    self.part = Part::Tail;
                    self.envelope.extend_from_slice(b"  []\n");
                    self.envelope.extend_from_slice(raw);
                } else {
                    self.run.text.extend_from_slice(raw);
                }
            }
            Part::Tail => self.envelope.extend_from_slice(raw),
        }
        Ok(None)
    }

    /// A line that starts an item: it starts a new run when the current one is full.
    fn item(&mut self, raw: &[u8]) -> Option<Run> {
        let full = (self.run.items == self.per_run).then(|| {
            let next = Run::new(self.run.offset + self.run.items);
            std::mem::replace(&mut self.run, next)
        });
        self.run.items += 1;
        self.run.text.extend_from_slice(raw);
        full
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
    use std::io;

    use super::*;
    use crate::keys::runs::{self, Keep, Streamed};
    use crate::keys::stream::Built;
    use crate::keys::SnapshotError;

    fn read(reader: &[u8], keep: Keep) -> io::Result<Streamed> {
        runs::read(reader, Format::Yaml, keep, None)
    }

    fn parse(text: &str) -> Option<Result<Built, SnapshotError>> {
        runs::parse(text, Format::Yaml)
    }
    use crate::keys::SnapshotDoc;

    fn item(i: usize) -> String {
        format!(
            "  - id: key_{i}\n    sha256: {i:064x}\n    type: personal\n    subject_id: s{i}\n    account_id: a\n    scopes: [read]\n"
        )
    }

    /// The runs and the envelope, `text` fed in pieces of `step` bytes.
    fn runs(text: &str, per_run: usize, step: usize) -> Result<(Vec<Run>, String), Unusual> {
        let mut splitter = Splitter::new(per_run);
        let mut runs = Vec::new();
        for piece in text.as_bytes().chunks(step) {
            splitter.feed(piece, &mut runs)?;
        }
        let envelope = splitter.finish(&mut runs)?;
        Ok((runs, String::from_utf8(envelope).unwrap()))
    }

    /// The envelope and the runs' texts, or `Unusual`; the same whatever the pieces.
    fn cut(text: &str, per_run: usize) -> Result<(String, Vec<String>), Unusual> {
        let (runs, envelope) = runs(text, per_run, text.len().max(1))?;
        for step in [1, 2, 7, 64] {
            assert_eq!(
                self::runs(text, per_run, step).map(|r| r.1),
                Ok(envelope.clone())
            );
        }
        let texts = runs.into_iter().map(|r| String::from_utf8(r.text).unwrap());
        Ok((envelope, texts.collect()))
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
        let (runs, _) = runs(&text, 2, 10).unwrap();
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
        let flow = format!("keys: [{}]\n", "{id: a}, ".repeat(runs::MIN_ITEMS));
        match read(flow.as_bytes(), Keep::Text).unwrap() {
            Streamed::Whole(text) => assert_eq!(text, flow, "unusual: handed back whole"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parallel_parse_matches_the_whole_document_parse() {
        let mut text = String::from("version: 2\nkeys:\n");
        for i in 0..(runs::MIN_ITEMS * 3 + 3) {
            text.push_str(&item(i));
            if i % 1000 == 0 {
                text.push_str("  # a comment between items\n\n");
            }
        }
        let (version, fast) = parse(&text).expect("parsed in runs").unwrap();
        let whole: SnapshotDoc = serde_yaml::from_str(&text).unwrap();
        assert_eq!(version.version, Some(2));
        assert_eq!(fast.len(), whole.keys.len());
        assert!(fast.iter().zip(&whole.keys).all(|(a, b)| *a.id == *b.id
            && hex::encode(a.digest()) == *b.sha256
            && a.scopes().iter().eq(b.scopes.iter())));
    }

    /// A refused entry in a later run is named by its index in the whole list.
    #[test]
    fn a_refused_entry_is_named_in_the_whole_list() {
        let mut text = String::from("keys:\n");
        for i in 0..(runs::MIN_ITEMS + 1000) {
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
        for i in 0..(runs::MIN_ITEMS + 1500) {
            text.push_str(&item(i));
        }
        let bad = format!("{text}  - id: bad\n    unknown_field: 1\n");
        assert!(matches!(
            read(bad.as_bytes(), Keep::Text),
            Ok(Streamed::GaveUp)
        ));
        let first = item(runs::MIN_ITEMS).replacen("  - ", "  - &a\n    ", 1);
        let alias = format!("keys:\n{first}{}  - *a\n", item(0).repeat(runs::MIN_ITEMS));
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
    fn text_that_is_not_utf8_is_a_read_error_or_read_again() {
        let mut text = String::from("keys:\n").into_bytes();
        text.extend_from_slice(b"  - id: \xff\n");
        let e = read(&text[..], Keep::Text).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "found while held");
        let mut late = String::from("keys:\n").into_bytes();
        for i in 0..(runs::MIN_ITEMS + 1500) {
            late.extend_from_slice(item(i).as_bytes());
        }
        late.extend_from_slice(b"  - id: \xff\n");
        assert!(matches!(read(&late[..], Keep::Text), Ok(Streamed::GaveUp)));
    }
}
