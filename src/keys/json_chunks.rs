//! Where the items of a JSON snapshot's `keys` array begin and end, for reading it on every
//! core (`runs`).
//!
//! A scan of the bytes that knows only strings (and their escapes) and nesting finds the
//! top-level `"keys": [` and the commas between its items, however the document is laid out
//! (one line or many). Anything else it meets (a `keys` spelt with escapes, a missing or
//! extra comma, a truncated document) it leaves to the runs or the envelope to fail, and so
//! to the whole-document parser.

use super::runs::{Cutter, Run, Unusual};
use super::snapshot::Format;

/// Where the scanner is in the document.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    /// Before the `keys` array.
    Head,
    /// Inside it.
    Items(Item),
    /// After it.
    Tail,
}

/// Where the scanner is among the items, at the array's own level.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Item {
    /// After `[`: an item or `]`.
    First,
    /// Inside an item.
    In,
    /// After a comma: an item.
    Next,
}

/// Cuts a JSON document, fed byte by byte, into runs of whole items of the top-level `keys`
/// array (each run an array of its own) and the envelope: the rest, with `keys` emptied.
pub(super) struct Scanner {
    part: Part,
    per_run: usize,
    /// Nesting of objects and arrays; the document itself is at 1, the items at 2.
    depth: usize,
    in_string: bool,
    escaped: bool,
    envelope: Vec<u8>,
    /// Where the last string at the document's own level began in `envelope`: a name, when
    /// an array follows it.
    last_name: Option<usize>,
    run: Run,
}

impl Cutter for Scanner {
    const FORMAT: Format = Format::Json;

    fn feed(&mut self, bytes: &[u8], done: &mut Vec<Run>) -> Result<(), Unusual> {
        for &b in bytes {
            if self.in_string {
                self.string_byte(b);
                continue;
            }
            match self.part {
                Part::Head => self.head(b),
                Part::Items(item) => {
                    if let Some(run) = self.items(b, item)? {
                        done.push(run);
                    }
                }
                Part::Tail => self.envelope.push(b),
            }
        }
        Ok(())
    }

    fn finish(mut self, done: &mut Vec<Run>) -> Result<Vec<u8>, Unusual> {
        if self.part != Part::Tail || self.in_string {
            return Err(Unusual);
        }
        if self.run.items > 0 {
            self.run.text.push(b']');
            done.push(self.run);
        }
        Ok(self.envelope)
    }
}

impl Scanner {
    pub(super) fn new(per_run: usize) -> Self {
        Scanner {
            part: Part::Head,
            per_run,
            depth: 0,
            in_string: false,
            escaped: false,
            envelope: Vec::new(),
            last_name: None,
            run: Run::new(0),
        }
    }

    /// Where the bytes of the part being read go.
    fn sink(&mut self) -> &mut Vec<u8> {
        match self.part {
            Part::Items(_) => &mut self.run.text,
            Part::Head | Part::Tail => &mut self.envelope,
        }
    }

    fn string_byte(&mut self, b: u8) {
        self.sink().push(b);
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
        }
    }

    fn head(&mut self, b: u8) {
        match b {
            b'"' => {
                if self.depth == 1 {
                    self.last_name = Some(self.envelope.len());
                }
                self.in_string = true;
            }
            b'[' if self.depth == 1 && self.after_keys_name() => {
                self.envelope.extend_from_slice(b"[]");
                self.depth = 2;
                self.part = Part::Items(Item::First);
                return;
            }
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
        self.envelope.push(b);
    }

    /// Is the envelope at `"keys":`, the array that follows being the list of keys?
    fn after_keys_name(&self) -> bool {
        let Some(at) = self.last_name else {
            return false;
        };
        self.envelope[at..]
            .strip_prefix(b"\"keys\"")
            .and_then(|rest| rest.trim_ascii_start().strip_prefix(b":"))
            .is_some_and(|rest| rest.trim_ascii().is_empty())
    }

    /// A byte inside the `keys` array; a run is returned once the item after its last one
    /// begins.
    fn items(&mut self, b: u8, item: Item) -> Result<Option<Run>, Unusual> {
        if self.depth > 2 {
            self.nested(b)?;
            return Ok(None);
        }
        match (b, item) {
            (b' ' | b'\t' | b'\n' | b'\r', _) => {}
            (b',', Item::In) => self.part = Part::Items(Item::Next),
            (b']', Item::First | Item::In) => {
                self.depth = 1;
                self.part = Part::Tail;
            }
            (b',' | b']', _) => return Err(Unusual),
            (_, Item::In) => self.nested(b)?,
            (_, Item::First | Item::Next) => {
                let full = self.begin_item();
                self.part = Part::Items(Item::In);
                self.nested(b)?;
                return Ok(full);
            }
        }
        Ok(None)
    }

    /// A byte of an item: copied, and followed into strings and nesting. A bracket that
    /// would close the array from inside an item is not the plain shape.
    fn nested(&mut self, b: u8) -> Result<(), Unusual> {
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' if self.depth > 2 => self.depth -= 1,
            b'}' | b']' => return Err(Unusual),
            _ => {}
        }
        self.run.text.push(b);
        Ok(())
    }

    /// The next item begins: the run it joins gets its separator, and a full run is closed
    /// and returned.
    fn begin_item(&mut self) -> Option<Run> {
        let full = (self.run.items == self.per_run).then(|| {
            let next = Run::new(self.run.offset + self.run.items);
            let mut full = std::mem::replace(&mut self.run, next);
            full.text.push(b']');
            full
        });
        self.run
            .text
            .push(if self.run.items == 0 { b'[' } else { b',' });
        self.run.items += 1;
        full
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::keys::runs::{self, Keep, Streamed};
    use crate::keys::stream::Built;
    use crate::keys::SnapshotError;

    fn read(reader: &[u8], keep: Keep) -> io::Result<Streamed> {
        runs::read(reader, Format::Json, keep, None)
    }

    fn parse(text: &str) -> Option<Result<Built, SnapshotError>> {
        runs::parse(text, Format::Json)
    }
    use crate::keys::{digest, SnapshotDoc};

    fn item(i: usize) -> String {
        format!(
            r#"{{"id": "key_{i}", "sha256": "{}", "type": "personal", "subject_id": "s{i}", "account_id": "a", "scopes": ["read"], "org_id": "o\"]}},{{[\\{i}"}}"#,
            hex::encode(digest(format!("secret-{i}").as_bytes()))
        )
    }

    fn doc(n: usize, sep: &str) -> String {
        let items: Vec<String> = (0..n).map(item).collect();
        format!(
            r#"{{"version": 9,{sep}"keys": [{sep}{}{sep}]}}"#,
            items.join(&format!(",{sep}"))
        )
    }

    /// The runs (as text) and the envelope, `text` fed in pieces of `step` bytes.
    fn cut(text: &str, per_run: usize, step: usize) -> Result<(Vec<String>, String), Unusual> {
        let mut scanner = Scanner::new(per_run);
        let mut runs = Vec::new();
        for piece in text.as_bytes().chunks(step) {
            scanner.feed(piece, &mut runs)?;
        }
        let envelope = scanner.finish(&mut runs)?;
        let texts = runs.into_iter().map(|r| String::from_utf8(r.text).unwrap());
        Ok((texts.collect(), String::from_utf8(envelope).unwrap()))
    }

    #[test]
    fn cuts_between_items_whatever_the_layout_and_the_pieces() {
        for sep in ["", "\n  ", " "] {
            let text = doc(5, sep);
            let (runs, envelope) = cut(&text, 2, text.len()).unwrap();
            assert_eq!(
                runs,
                [
                    format!("[{},{}]", item(0), item(1)),
                    format!("[{},{}]", item(2), item(3)),
                    format!("[{}]", item(4)),
                ],
                "{sep:?}"
            );
            assert_eq!(envelope, format!(r#"{{"version": 9,{sep}"keys": []}}"#));
            for step in [1, 3, 64] {
                assert_eq!(
                    cut(&text, 2, step).unwrap(),
                    (runs.clone(), envelope.clone())
                );
            }
        }
        let (runs, envelope) = cut(r#"{"keys": [], "version": 1}"#, 2, 4).unwrap();
        assert!(runs.is_empty());
        assert_eq!(envelope, r#"{"keys": [], "version": 1}"#);
    }

    #[test]
    fn only_the_top_level_keys_array_is_cut() {
        let text = format!(r#"{{"x\"keys": [1], "version": 1, "keys": [{}]}}"#, item(0));
        let (runs, envelope) = cut(&text, 2, 7).unwrap();
        assert_eq!(runs, [format!("[{}]", item(0))]);
        assert_eq!(envelope, r#"{"x\"keys": [1], "version": 1, "keys": []}"#);
    }

    #[test]
    fn broken_lists_are_left_to_the_full_parser() {
        for text in [
            r#"{"keys": [{"id": "a"},]}"#,
            r#"{"keys": [,{"id": "a"}]}"#,
            r#"{"keys": [{"id": "a"},,{"id": "b"}]}"#,
            r#"{"keys": [{"id": "a"}"#,
            r#"{"version": 1}"#,
            r#"{"keys": [{"id": "a}]}"#,
        ] {
            assert_eq!(cut(text, 1, 3), Err(Unusual), "{text}");
        }
    }

    #[test]
    fn parallel_parse_matches_the_whole_document_parse() {
        for sep in ["", "\n"] {
            let text = doc(runs::MIN_ITEMS * 2 + 7, sep);
            let (version, fast) = parse(&text).expect("parsed in runs").unwrap();
            let whole: SnapshotDoc = serde_json::from_str(&text).unwrap();
            assert_eq!(version.version, Some(9));
            assert_eq!(fast.len(), whole.keys.len());
            assert!(fast.iter().zip(&whole.keys).all(|(a, b)| *a.id == *b.id
                && hex::encode(a.digest()) == *b.sha256
                && a.scopes().iter().eq(b.scopes.iter())
                && a.org_id().map(|o| o.as_str()) == b.org_id.as_deref()));
        }
    }

    #[test]
    fn a_refused_entry_is_named_in_the_whole_list() {
        let text = doc(runs::MIN_ITEMS + 1_500, "").replace(
            r#""id": "key_2600", "sha256": ""#,
            r#""id": "key_2600", "sha256": "zz"#,
        );
        match parse(&text) {
            Some(Err(SnapshotError::Entry {
                index, id, field, ..
            })) => assert_eq!((index, id.as_str(), field), (2600, "key_2600", "sha256")),
            other => panic!("{:?}", other.map(|r| r.map(|(v, k)| (v, k.len())))),
        }
    }

    #[test]
    fn a_failing_run_or_envelope_gives_up() {
        let text = doc(runs::MIN_ITEMS + 1_500, "");
        let missing_comma = text.replacen(&format!("{},", item(3000)), &item(3000), 1);
        let unknown_field = text.replacen(r#""version": 9"#, r#""version": 9, "colour": 1"#, 1);
        let trailing = format!("{text} x");
        for broken in [missing_comma, unknown_field, trailing] {
            assert!(matches!(
                read(broken.as_bytes(), Keep::Text),
                Ok(Streamed::GaveUp)
            ));
        }
        let small = doc(10, "");
        match read(small.as_bytes(), Keep::Text).unwrap() {
            Streamed::Whole(text) => assert_eq!(text, small),
            other => panic!("{other:?}"),
        }
    }
}
