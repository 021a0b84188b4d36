//! A snapshot file read and validated: JSON as a stream, YAML whole, hashed as it is read
//! (the digest a watcher compares and a snapshot carries).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::key::digest;
use super::load::{self, Format, ReadError, YAML_MAX_BYTES};
use super::load_error::{io_error, LoadError};
use super::snapshot::{Snapshot, Source};

/// Snapshot files are read in pieces of this size.
const READ_BUF: usize = 64 * 1024;

/// A reader that hashes every byte it reads: the digest of a file read as a stream.
struct Hashing<'h, R> {
    inner: R,
    hasher: &'h mut Sha256,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Largest snapshot file read (the size of the largest push, about a million keys).
pub const FILE_MAX_BYTES: u64 = 512 * 1024 * 1024;

/// The key file: a regular file no larger than [`FILE_MAX_BYTES`] (see
/// [`crate::regular_file`]).
fn open_regular(path: &Path) -> std::io::Result<File> {
    crate::regular_file::open(path, FILE_MAX_BYTES)
}

fn open<'h>(
    path: &Path,
    hasher: &'h mut Sha256,
) -> Result<BufReader<Hashing<'h, File>>, LoadError> {
    // A file that grows while it is read is cut at the bound, and refused as invalid.
    let file = open_regular(path).map_err(|e| io_error(path, e))?;
    Ok(BufReader::with_capacity(
        READ_BUF,
        Hashing {
            inner: file,
            hasher,
        },
    ))
}

/// The SHA-256 of a file's content (hex), read in pieces: to tell whether it changed.
pub(super) fn file_digest(path: &Path) -> Result<String, LoadError> {
    let mut hasher = Sha256::new();
    let mut reader = open(path, &mut hasher)?;
    std::io::copy(
        &mut (&mut reader).take(FILE_MAX_BYTES + 1),
        &mut std::io::sink(),
    )
    .map_err(|e| io_error(path, e))?;
    drop(reader);
    Ok(hex::encode(hasher.finalize()))
}

/// Read and validate the snapshot in `path`: JSON as a stream (a large document is never
/// held whole, so a reload holds the old snapshot and the new keys but not the file's
/// text), YAML whole. How the syntax is decided, from the document alone, is `load`'s: the
/// same bytes load the same way whether pushed, reloaded or read at start.
pub fn read_file(path: &Path, source: Source) -> Result<Snapshot, LoadError> {
    read_file_as(path, source, Format::Yaml, None)
}

/// [`read_file`] in a declared format ([`Format::Json`]: JSON only); keys equal to those
/// of `prior`, the snapshot in force, are shared with it.
pub(super) fn read_file_as(
    path: &Path,
    source: Source,
    format: Format,
    prior: Option<&Snapshot>,
) -> Result<Snapshot, LoadError> {
    let mut hasher = Sha256::new();
    let reader = open(path, &mut hasher)?;
    // A document read whole (YAML) is read again from the file, and its digest is that
    // read's; a JSON one's is the stream's, read to its end.
    let mut whole_digest = None;
    let reopen = || {
        let bytes = load::read_bounded(open_regular(path)?, YAML_MAX_BYTES)?;
        whole_digest = Some(hex::encode(digest(&bytes)));
        Ok(bytes)
    };
    let built = load::from_reader(reader, format, prior, reopen).map_err(|e| match e {
        ReadError::Invalid(e) => LoadError::Invalid(e),
        ReadError::Io(e) => io_error(path, e),
    })?;
    let digest = whole_digest.unwrap_or_else(|| hex::encode(hasher.finalize()));
    Ok(Snapshot::from_built(built, source, digest, prior)?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::keys::{digest, Status};

    fn item(i: usize) -> String {
        format!(
            "  - id: key_{i}\n    sha256: {}\n    type: personal\n    subject_id: s{i}\n    account_id: a\n    scopes: [read]\n",
            hex::encode(digest(format!("secret-{i}").as_bytes()))
        )
    }

    fn yaml(n: usize) -> String {
        format!(
            "version: 4\nkeys:\n{}",
            (0..n).map(item).collect::<String>()
        )
    }

    /// A reload against the snapshot in force keeps the keys that did not change (one copy
    /// of each, not two); a key changed in any field, and a new one, are the file's. YAML
    /// and JSON, large and small, alike.
    #[test]
    fn a_reread_file_shares_the_unchanged_keys_with_the_snapshot_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        for n in [5_000, 10] {
            std::fs::write(&path, yaml(n)).unwrap();
            let prior = read_file(&path, Source::File).unwrap();
            let changed = yaml(n + 1).replace(
                "id: key_7\n    sha256",
                "id: key_7\n    status: disabled\n    sha256",
            );
            let json =
                serde_json::to_string(&Snapshot::parse(&changed, Source::File).unwrap().to_doc())
                    .unwrap();
            for (format, text) in [(Format::Yaml, changed), (Format::Json, json)] {
                std::fs::write(&path, text).unwrap();
                let next = read_file_as(&path, Source::File, format, Some(&prior)).unwrap();
                let case = format!("{n} keys, {format:?}");
                assert_eq!(next.len(), n + 1, "{case}");
                let shared =
                    |id: &str| Arc::ptr_eq(next.by_id(id).unwrap(), prior.by_id(id).unwrap());
                assert!(
                    shared("key_0") && shared("key_9"),
                    "{case}: unchanged keys are shared"
                );
                assert!(!shared("key_7"), "{case}: a changed key is not");
                assert_eq!(
                    next.by_id("key_7").unwrap().status,
                    Status::Disabled,
                    "{case}"
                );
                let new = format!("key_{n}");
                assert!(
                    prior.by_id(&new).is_none() && next.by_id(&new).is_some(),
                    "{case}"
                );
            }
        }
    }

    /// Every shape of file reads to the snapshot its text parses to, with the digest of the
    /// file's bytes (what the watcher compares).
    #[test]
    fn a_file_reads_as_its_text_parses_with_the_digest_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let large = yaml(5_000);
        let json = serde_json::to_string(&Snapshot::parse(&large, Source::File).unwrap().to_doc())
            .unwrap();
        let flow = format!(
            "keys: [{}]\n",
            (0..3_000)
                .map(|i| serde_json::to_string(
                    &Snapshot::parse(&format!("keys:\n{}", item(i)), Source::File)
                        .unwrap()
                        .to_doc()
                        .keys[0]
                )
                .unwrap())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (name, text) in [
            ("large.yaml", large.clone()),
            ("small.yaml", yaml(10)),
            (
                "demo.yaml",
                include_str!("../../config/keys.yaml").to_string(),
            ),
            (
                "demo.json",
                serde_json::to_string(
                    &Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File)
                        .unwrap()
                        .to_doc(),
                )
                .unwrap(),
            ),
            ("large.json", format!("\n  {json}\n")),
            // Nothing but white space in the first read: taken for YAML, which reads JSON.
            (
                "spaced.json",
                format!("{}{json}", " ".repeat(READ_BUF + 10)),
            ),
            ("flow.yaml", flow),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &text).unwrap();
            let read = read_file(&path, Source::File).unwrap();
            let parsed = Snapshot::parse(&text, Source::File).unwrap();
            assert_eq!(
                read.content_digest,
                hex::encode(digest(text.as_bytes())),
                "{name}"
            );
            assert_eq!(read.content_digest, file_digest(&path).unwrap(), "{name}");
            assert_eq!(read.version, parsed.version, "{name}");
            assert_eq!(read.len(), parsed.len(), "{name}");
            assert!(
                parsed
                    .keys()
                    .all(|k| read.lookup(k.digest()).is_some_and(|r| r.id == k.id)),
                "{name}"
            );
        }
    }

    /// An entry refused far into a large file is named, in YAML and in JSON.
    #[test]
    fn a_refused_entry_far_into_a_large_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        let text = yaml(4_000).replacen(
            "  - id: key_3500\n",
            "  - id: key_3500\n    colour: blue\n",
            1,
        );
        std::fs::write(&path, text).unwrap();
        let e = read_file(&path, Source::File).unwrap_err().to_string();
        assert!(e.contains("keys[3500]") && e.contains("colour"), "{e}");
        let doc = Snapshot::parse(&yaml(4_000), Source::File)
            .unwrap()
            .to_doc();
        let at = doc.keys.iter().position(|k| &*k.id == "key_3500").unwrap();
        let json = serde_json::to_string(&doc).unwrap().replacen(
            r#"{"id":"key_3500","#,
            r#"{"id":"key_3500","colour":"blue","#,
            1,
        );
        std::fs::write(&path, json).unwrap();
        let e = read_file(&path, Source::File).unwrap_err().to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(e.contains(&format!("keys[{at}]")), "{e}");
    }

    /// A small file refused is refused as its text is.
    #[test]
    fn a_file_is_refused_as_its_text_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "keys: {").unwrap();
        let e = read_file(&path, Source::File).unwrap_err();
        assert!(matches!(e, LoadError::Invalid(_)), "{e}");
        let whole = Snapshot::parse("keys: {", Source::File).unwrap_err();
        assert_eq!(e.to_string(), whole.to_string());
    }

    #[test]
    fn unreadable_files_are_io_errors_naming_the_file_and_bytes_not_utf8_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let e = read_file(&missing, Source::File).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }));
        assert!(e.to_string().contains("missing.yaml"), "{e}");
        let binary = dir.path().join("binary.yaml");
        let mut bytes = yaml(3_000).into_bytes();
        bytes.extend_from_slice(b"  - id: \xff\n");
        std::fs::write(&binary, bytes).unwrap();
        let e = read_file(&binary, Source::File).unwrap_err();
        assert!(matches!(e, LoadError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}
