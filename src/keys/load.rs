//! The one snapshot loader: serde_json or serde_yaml over the whole document, through one
//! definition of the document ([`Doc`]), each entry of `keys` validated and built into its
//! key as soon as it is deserialized (a load never holds every parsed entry, which takes
//! more memory than the keys they become).
//!
//! Which parser reads a document is decided by the document alone, so that the same bytes
//! always load the same way, whether pushed, reloaded or read at start: a document whose
//! first character (after a UTF-8 byte order mark and white space) is `{` and that is JSON
//! is read as JSON; anything else is read as YAML, which reads JSON too. JSON is the bulk
//! and control-plane format (read as a stream, any size up to the push limit); YAML is for
//! files people edit, parsed whole and refused above [`YAML_MAX_BYTES`].

use std::fmt;
use std::io::{self, BufRead, Read};

use serde::de::DeserializeSeed;

pub use super::entries::Built;
use super::entries::{Doc, Progress};
use super::error::SnapshotError;
use super::key::digest;
use super::nesting;
use super::snapshot::{Snapshot, Source};
use crate::config::located;
pub use crate::config::{excerpt, MAX_ERROR_CHARS};

/// Largest YAML document read (pushed or from a file): a YAML parse holds the whole
/// document's events, several KB per key, so bulk snapshots are written as JSON, which is
/// read as a stream. About 250k keys of YAML.
pub const YAML_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// A document's syntax, as a push declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON only (`content-type: application/json`): anything else is refused.
    Json,
    /// YAML, which includes JSON: read as JSON when it is JSON (see the module doc).
    Yaml,
}

/// Why a document did not load.
#[derive(Debug)]
pub enum ReadError {
    Invalid(SnapshotError),
    Io(io::Error),
}

impl From<SnapshotError> for ReadError {
    fn from(e: SnapshotError) -> Self {
        ReadError::Invalid(e)
    }
}

fn parse_error(message: impl fmt::Display) -> SnapshotError {
    SnapshotError::Parse(excerpt(&message.to_string()))
}

/// Read a document held in memory (see the module doc for how its syntax is decided).
pub fn from_slice(
    bytes: &[u8],
    format: Format,
    prior: Option<&Snapshot>,
) -> Result<Built, SnapshotError> {
    let body = strip_bom(bytes);
    // Leading white space skipped as a stream read skips it, so errors point alike.
    let body = match body.iter().position(|b| !b.is_ascii_whitespace()) {
        Some(start) => &body[start..],
        None => &[],
    };
    if format == Format::Json || body.first() == Some(&b'{') {
        let mut de = serde_json::Deserializer::from_slice(body);
        match json(&mut de, prior) {
            Ok(built) => return Ok(built),
            Err(JsonError::Failed(e)) => return Err(e),
            Err(JsonError::Io(e)) => return Err(parse_error(e)),
            Err(JsonError::NotJson(e)) if format == Format::Json => return Err(e),
            Err(JsonError::NotJson(json_error)) => {
                return yaml_bytes(bytes, prior).map_err(|e| neither(&json_error, &e))
            }
        }
    }
    yaml_bytes(bytes, prior)
}

/// Read a document from `reader`, never holding it whole unless it is YAML: then
/// `reopen` gives the whole document again from its start (the reader has moved on).
///
/// On success a JSON document has been read to its end (nothing may follow it). The reader
/// is taken by value: serde_json reads it byte by byte, which the standard library makes
/// cheap for a `BufReader` it owns.
pub fn from_reader<R: BufRead>(
    mut reader: R,
    format: Format,
    prior: Option<&Snapshot>,
    reopen: impl FnOnce() -> io::Result<Vec<u8>>,
) -> Result<Built, ReadError> {
    let json_like = skip_bom_and_space(&mut reader).map_err(ReadError::Io)? == Some(b'{');
    if format == Format::Json || json_like {
        let mut de = serde_json::Deserializer::from_reader(reader);
        match json(&mut de, prior) {
            Ok(built) => return Ok(built),
            Err(JsonError::Failed(e)) => return Err(e.into()),
            Err(JsonError::Io(e)) => return Err(ReadError::Io(e)),
            Err(JsonError::NotJson(e)) if format == Format::Json => return Err(e.into()),
            Err(JsonError::NotJson(json_error)) => {
                let bytes = reopen().map_err(ReadError::Io)?;
                return yaml_bytes(&bytes, prior).map_err(|e| neither(&json_error, &e).into());
            }
        }
    }
    let bytes = reopen().map_err(ReadError::Io)?;
    Ok(yaml_bytes(&bytes, prior)?)
}

/// Read `reader` to its end, refusing more than `limit` bytes (the bound of a YAML read).
pub fn read_bounded(reader: impl Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(limit + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Neither JSON nor YAML: both parsers' errors, the YAML one first since a document that is
/// not JSON is taken for YAML.
fn neither(json: &SnapshotError, yaml: &SnapshotError) -> SnapshotError {
    let strip = |e: &SnapshotError| match e {
        SnapshotError::Parse(m) => m.clone(),
        other => other.to_string(),
    };
    SnapshotError::Parse(excerpt(&format!(
        "not YAML ({}) nor JSON ({})",
        strip(yaml),
        strip(json)
    )))
}

const BOM: &[u8] = b"\xef\xbb\xbf";

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(BOM).unwrap_or(bytes)
}

/// Consume a byte order mark and leading white space; the first other byte, if any.
fn skip_bom_and_space<R: BufRead>(reader: &mut R) -> io::Result<Option<u8>> {
    let buf = reader.fill_buf()?;
    if buf.starts_with(BOM) {
        reader.consume(BOM.len());
    }
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let first = buf[i];
                reader.consume(i);
                return Ok(Some(first));
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// How a JSON read failed.
enum JsonError {
    /// The document is JSON up to a value that is wrong (a refused entry, a field of the
    /// wrong type, an unknown field): that is the answer.
    Failed(SnapshotError),
    /// Not JSON (a syntax error, or the document ended early): perhaps YAML.
    NotJson(SnapshotError),
    Io(io::Error),
}

/// A JSON document. Read without tracking the path of every value (that doubles the
/// time of a bulk load): an error inside an entry is named by the entry's index, which
/// the list visitor keeps, and the parser's line and column.
fn json<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
    prior: Option<&Snapshot>,
) -> Result<Built, JsonError> {
    let mut progress = Progress::default();
    let parsed = Doc {
        prior,
        progress: &mut progress,
    }
    .deserialize(&mut *de)
    .and_then(|built| de.end().map(|()| built));
    match (parsed, progress) {
        (
            _,
            Progress {
                refused: Some(entry),
                ..
            },
        ) => Err(JsonError::Failed(entry)),
        (Ok(built), _) => Ok(built),
        (Err(e), Progress { entry, .. }) => {
            let located = parse_error(match entry {
                Some(i) => format!("keys[{i}]: {e}"),
                None => e.to_string(),
            });
            Err(match e.classify() {
                serde_json::error::Category::Io => JsonError::Io(io::Error::from(e)),
                serde_json::error::Category::Data => JsonError::Failed(located),
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    JsonError::NotJson(located)
                }
            })
        }
    }
}

/// A YAML document, parsed whole: refused above [`YAML_MAX_BYTES`] or when not UTF-8.
fn yaml_bytes(bytes: &[u8], prior: Option<&Snapshot>) -> Result<Built, SnapshotError> {
    if bytes.len() as u64 > YAML_MAX_BYTES {
        return Err(SnapshotError::Parse(format!(
            "a YAML snapshot may be at most {} MiB; write larger ones as JSON",
            YAML_MAX_BYTES / (1024 * 1024)
        )));
    }
    let text = std::str::from_utf8(strip_bom(bytes))
        .map_err(|_| SnapshotError::Parse("the document is not UTF-8".into()))?;
    yaml(text, prior)
}

/// A YAML document read whole; a syntax or type error names where it is
/// (`keys[3].scopes: invalid type ...`).
fn yaml(text: &str, prior: Option<&Snapshot>) -> Result<Built, SnapshotError> {
    if let Err(refused) = nesting::check(text.as_bytes(), nesting::MAX_DEPTH) {
        let reason = refused.reason("a snapshot");
        return Err(SnapshotError::Parse(match refused.line_column() {
            Some((line, column)) => format!("line {line} column {column}: {reason}"),
            None => reason,
        }));
    }
    let mut progress = Progress::default();
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(
        serde_yaml::Deserializer::from_str(text),
        &mut track,
    );
    let parsed = Doc {
        prior,
        progress: &mut progress,
    }
    .deserialize(de);
    match (parsed, progress.refused) {
        (_, Some(entry)) => Err(entry),
        (Ok(built), None) => Ok(built),
        (Err(e), None) => Err(parse_error(located(&track.path(), &e))),
    }
}

impl Snapshot {
    /// Parse YAML or JSON (JSON when it is JSON, see `load`) and validate every entry.
    pub fn parse(text: &str, source: Source) -> Result<Snapshot, SnapshotError> {
        Self::parse_as(text, Format::Yaml, source)
    }

    /// Parse in a declared format ([`Format::Json`]: JSON only).
    pub fn parse_as(text: &str, format: Format, source: Source) -> Result<Snapshot, SnapshotError> {
        let content_digest = hex::encode(digest(text.as_bytes()));
        let (meta, keys) = from_slice(text.as_bytes(), format, None)?;
        Self::assemble(meta, keys, source, content_digest, None)
    }

    /// A document read elsewhere (as a stream from a file, see `source`), whose text had
    /// the digest `content_digest`, to replace `prior` (whose secrets it must not show).
    pub(super) fn from_built(
        (meta, keys): Built,
        source: Source,
        content_digest: String,
        prior: Option<&Snapshot>,
    ) -> Result<Snapshot, SnapshotError> {
        Self::assemble(meta, keys, source, content_digest, prior)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest;

    fn item(id: &str, secret: &str) -> String {
        let sha = hex::encode(digest(secret.as_bytes()));
        format!(
            r#"{{"id": "{id}", "sha256": "{sha}", "type": "personal", "subject_id": "s-{id}", "account_id": "a", "scopes": ["read"]}}"#
        )
    }

    #[test]
    fn a_yaml_document_nested_too_deep_is_refused_before_the_parse_naming_where() {
        // Read whole, 100,000 levels keep libyaml busy for about a minute.
        let deep = format!(
            "version: 1\nkeys: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let err = Snapshot::parse(&deep, Source::File)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2 column 70: nested more than 64 levels deep"),
            "{err}"
        );
    }

    fn doc(items: &[String]) -> String {
        format!(r#"{{"version": 7, "keys": [{}]}}"#, items.join(", "))
    }

    fn load(text: &str, format: Format) -> Result<Built, SnapshotError> {
        from_slice(text.as_bytes(), format, None)
    }

    fn from_file(text: &str, format: Format) -> Result<Built, SnapshotError> {
        let bytes = text.as_bytes();
        let reader = io::BufReader::with_capacity(16, bytes);
        from_reader(reader, format, None, || Ok(bytes.to_vec())).map_err(|e| match e {
            ReadError::Invalid(e) => e,
            ReadError::Io(e) => panic!("{e}"),
        })
    }

    /// JSON, YAML in block and flow style, with a byte order mark, with CRLF line ends: each
    /// loads the same keys, held in memory or read as a stream.
    #[test]
    fn every_style_loads_the_same_keys_in_memory_and_as_a_stream() {
        let sha = hex::encode(digest(b"secret"));
        let json = doc(&[item("k1", "secret")]);
        let block = format!(
            "version: 7\nkeys:\n  - id: k1\n    sha256: {sha}\n    type: personal\n    subject_id: s-k1\n    account_id: a\n    scopes: [read]\n"
        );
        let flow = format!(
            "{{version: 7, keys: [{{id: k1, sha256: {sha}, type: personal, subject_id: s-k1, account_id: a, scopes: [read]}}]}}"
        );
        let mixed = format!(r#"{{"version": 7, keys: [{}]}}"#, item("k1", "secret"));
        for (name, text) in [
            ("json", json.clone()),
            ("json, spaced", format!("\n\n   {json}\n")),
            ("block", block.clone()),
            ("flow", flow.clone()),
            ("flow, mixed", mixed),
            ("json, bom", format!("\u{feff}{json}")),
            ("block, bom", format!("\u{feff}{block}")),
            ("flow, bom", format!("\u{feff}{flow}")),
            ("json, crlf", json.replace(", ", ",\r\n")),
            ("block, crlf", block.replace('\n', "\r\n")),
            ("flow, crlf", flow.replace(", ", ",\r\n")),
        ] {
            for (how, got) in [
                ("in memory", load(&text, Format::Yaml)),
                ("as a stream", from_file(&text, Format::Yaml)),
            ] {
                let (version, keys) = got.unwrap_or_else(|e| panic!("{name}, {how}: {e}"));
                assert_eq!(version.version, Some(7), "{name}, {how}");
                assert_eq!(keys.len(), 1, "{name}, {how}");
                assert_eq!(*keys[0].digest(), digest(b"secret"), "{name}, {how}");
            }
        }
        // A push declared JSON must be JSON.
        assert!(load(&json, Format::Json).is_ok());
        assert!(load(&format!("\u{feff}{json}"), Format::Json).is_ok());
        for not_json in [&flow, &block] {
            assert!(load(not_json, Format::Json).is_err());
            assert!(from_file(not_json, Format::Json).is_err());
        }
    }

    /// Held in memory or read as a stream, every prefix of every style loads alike: the
    /// same keys, or the same error.
    #[test]
    fn a_document_loads_alike_held_or_streamed() {
        let sha = hex::encode(digest(b"secret"));
        let json = doc(&[item("k1", "secret"), item("k2", "other")]);
        let flow = format!(
            "\u{feff} {{version: 7, keys: [{{id: k1, sha256: {sha}, type: personal, subject_id: s, account_id: a}}]}}"
        );
        for text in [json.clone(), format!("\r\n {json}"), flow] {
            for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let part = &text[..end];
                for format in [Format::Json, Format::Yaml] {
                    let held = load(part, format);
                    let streamed = from_file(part, format);
                    match (&held, &streamed) {
                        (Ok((v1, k1)), Ok((v2, k2))) => {
                            assert_eq!(v1, v2, "{part:?}");
                            assert!(k1.iter().zip(k2).all(|(a, b)| **a == **b), "{part:?}");
                            assert_eq!(k1.len(), k2.len(), "{part:?}");
                        }
                        (Err(a), Err(b)) => assert_eq!(a, b, "{part:?}"),
                        _ => panic!("{part:?}: {held:?} / {streamed:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn keys_is_required_and_may_be_empty() {
        for text in [
            "",
            "  \n",
            "{}",
            "version: 9\n",
            "# comments only\n# and more\n",
            r#"{"version": 9}"#,
            "\u{feff}",
        ] {
            for got in [load(text, Format::Yaml), from_file(text, Format::Yaml)] {
                let e = got.expect_err(text).to_string();
                assert!(e.contains("keys"), "{text:?}: {e}");
            }
        }
        let e = load(r#"{"version": 9}"#, Format::Json).unwrap_err();
        assert!(e.to_string().contains("missing field `keys`"), "{e}");
        for text in ["keys: []", r#"{"keys": []}"#, "{keys: []}"] {
            assert_eq!(load(text, Format::Yaml).unwrap().1.len(), 0, "{text}");
        }
    }

    #[test]
    fn a_refused_entry_is_named_and_stops_the_build() {
        let bad = item("k1", "x").replace("personal", "robot");
        let text = doc(&[item("k0", "a"), bad, item("k2", "b")]);
        for got in [load(&text, Format::Json), from_file(&text, Format::Yaml)] {
            match got {
                Err(SnapshotError::Entry {
                    index, id, field, ..
                }) => assert_eq!((index, id.as_str(), field), (1, "k1", "type")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn anything_but_a_snapshot_is_a_parse_error() {
        for text in [
            r#"{"keys": [], "extra": 1}"#,
            r#"{"keys": [], "keys": []}"#,
            r#"{"keys": null}"#,
            r#"{"keys": [{"id": 5}]}"#,
            r#"{"keys": []} trailing"#,
            r#"["keys"]"#,
            r#"{"keys": ["#,
            "keys: {",
        ] {
            for format in [Format::Json, Format::Yaml] {
                assert!(
                    matches!(load(text, format), Err(SnapshotError::Parse(_))),
                    "{text}"
                );
            }
        }
        let e = load(r#"{"keys": [{"id": "k", "scopes": 5}]}"#, Format::Yaml).unwrap_err();
        assert!(e.to_string().contains("keys[0]: invalid type"), "{e}");
        let e = load("keys: [{id: k, scopes: 5}]", Format::Yaml).unwrap_err();
        assert!(e.to_string().contains("keys[0].scopes"), "{e}");
    }

    #[test]
    fn errors_are_short_and_do_not_echo_values() {
        let raw = "sta_this_is_a_pasted_raw_key_not_a_digest_0123456789";
        for text in [
            format!("version: {raw}\nkeys: []\n"),
            format!("keys: []\n{raw}: 1\n"),
            format!(r#"{{"keys": [], "version": "{raw}"}}"#),
            format!("keys: [{}]", "x".repeat(100_000)),
            format!("keys:\n  - id: {}\n", "y".repeat(100_000)),
        ] {
            let e = load(&text, Format::Yaml).unwrap_err().to_string();
            assert!(!e.contains(raw), "{e}");
            assert!(e.chars().count() <= MAX_ERROR_CHARS + 40, "{e}");
        }
        assert_eq!(
            excerpt("unknown field `colour`, expected `keys`"),
            "unknown field `colour`, expected `keys`"
        );
        assert_eq!(
            excerpt(r#"invalid type: string "abc1234", expected u64"#),
            r#"invalid type: string "…", expected u64"#
        );
        assert_eq!(excerpt("cut \"open"), "cut \"…");
    }

    #[test]
    fn yaml_is_bounded_and_json_is_not() {
        let big = format!("keys: []\n#{}\n", " ".repeat(YAML_MAX_BYTES as usize));
        let e = load(&big, Format::Yaml).unwrap_err().to_string();
        assert!(e.contains("JSON"), "{e}");
        let big = format!("{{\"keys\": []{}}}", " ".repeat(YAML_MAX_BYTES as usize));
        assert!(load(&big, Format::Yaml).is_ok());
    }
}
