//! Large snapshots read as a stream and parsed on every core.
//!
//! A snapshot has one big part, the `keys` list. A format's [`Cutter`] reads the document
//! piece by piece, finds where the list's items begin and end without parsing them, and
//! hands runs of [`ITEMS_PER_RUN`] whole items to every core as soon as each run is
//! complete; each item is built into its key as soon as it is parsed (see `stream`). What is
//! left, the envelope (`version` and the rest, with the list emptied), is parsed at the end.
//! Read from a file, a large snapshot is never held whole: only the runs waiting for a
//! thread.
//!
//! It never decides alone: a document it does not recognise (too few keys, or a shape the
//! cutter does not know) or any run that fails to parse goes back to the ordinary
//! whole-document parser, whose error messages name the entry exactly.

use std::io::{self, BufRead};
use std::sync::Arc;

use serde::de::DeserializeSeed;

use super::snapshot::{Format, Key, Meta, Snapshot, SnapshotDoc, SnapshotError};
use super::stream::{Built, Entries};

/// A document with at most this many items is parsed whole, on the calling thread.
pub const MIN_ITEMS: usize = 2_000;
/// Items per parse job. The YAML parser holds a job's whole event stream, several KB per
/// item, so small jobs keep a load's peak low: a 10k-key YAML load peaks at 14 MB in jobs of
/// 250, 16 MB in jobs of 500 and 22 MB in jobs of 1000 (46 MB parsed whole), all in the same
/// time.
pub const ITEMS_PER_RUN: usize = 250;
/// The most a cutter is fed at once, so that a document held in memory is copied into runs
/// only as fast as they are parsed.
const STEP: usize = 64 * 1024;

/// What reading a snapshot as a stream gave.
#[derive(Debug)]
pub enum Streamed {
    /// Read on every core: the version and the keys, or the first refused entry, named.
    Built(Result<Built, SnapshotError>),
    /// Not worth reading on every core (too few items, or not a shape the cutter knows),
    /// found while the text was still held: here it is whole, for the whole-document parser
    /// (empty unless [`Keep::Text`]).
    Whole(String),
    /// Something failed after the text read so far had been let go (a run that does not
    /// parse, a surprise late in the document): read it again, whole.
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

/// Not a shape the cutter knows: left to the whole-document parser.
#[derive(Debug, PartialEq)]
pub struct Unusual;

/// Finds the items of a document's `keys` list as the document is fed to it.
pub trait Cutter {
    /// The syntax of the runs and of the envelope.
    const FORMAT: Format;

    /// Take the next bytes of the document; each run completed is pushed to `done`.
    fn feed(&mut self, bytes: &[u8], done: &mut Vec<Run>) -> Result<(), Unusual>;

    /// At the end of the document: the last run, pushed to `done`, and the envelope.
    fn finish(self, done: &mut Vec<Run>) -> Result<Vec<u8>, Unusual>;
}

/// Whole items of the `keys` list, as a document of their own: a YAML block sequence or a
/// JSON array.
#[derive(Debug, PartialEq)]
pub struct Run {
    /// Its first item's index in the whole list.
    pub offset: usize,
    pub items: usize,
    pub text: Vec<u8>,
}

impl Run {
    pub fn new(offset: usize) -> Run {
        Run {
            offset,
            items: 0,
            text: Vec::new(),
        }
    }

    /// Its keys, built as they are parsed; the first refused entry; or `None` if it fails
    /// to parse or holds another number of items than the cutter counted.
    fn build(self, format: Format) -> Option<Result<Vec<Arc<Key>>, SnapshotError>> {
        let mut refused = None;
        let entries = Entries {
            offset: self.offset,
            refused: &mut refused,
        };
        let parsed = match format {
            Format::Yaml => entries
                .deserialize(serde_yaml::Deserializer::from_slice(&self.text))
                .ok(),
            Format::Json => {
                let mut de = serde_json::Deserializer::from_slice(&self.text);
                entries
                    .deserialize(&mut de)
                    .ok()
                    .filter(|_| de.end().is_ok())
            }
        };
        match parsed {
            Some(keys) if keys.len() == self.items => Some(Ok(keys)),
            Some(_) => None,
            None => refused.map(Err),
        }
    }
}

/// The envelope's own fields, if it parses and its `keys` list is empty.
fn envelope_version(envelope: &[u8], format: Format) -> Option<Meta> {
    let doc: SnapshotDoc = match format {
        Format::Yaml => serde_yaml::from_slice(envelope).ok()?,
        Format::Json => serde_json::from_slice(envelope).ok()?,
    };
    let meta = Meta::new(doc.version, doc.generated_at.as_deref()).ok()?;
    doc.keys.is_empty().then_some(meta)
}

/// Read a snapshot in `format` from `reader` to its end (unless it gives up), on every core
/// once it has more than [`MIN_ITEMS`] items. Each run's entries become keys on the thread
/// that parsed them, so a load never holds every parsed entry at once; a key equal to one
/// of `prior` (the snapshot in force, on a reload) is that one, so a reload does not hold
/// two copies of the keys that did not change.
pub fn read(
    reader: impl BufRead,
    format: Format,
    keep: Keep,
    prior: Option<&Snapshot>,
) -> io::Result<Streamed> {
    match format {
        Format::Json => stream(
            reader,
            super::json_chunks::Scanner::new(ITEMS_PER_RUN),
            keep,
            prior,
        ),
        Format::Yaml => stream(
            reader,
            super::yaml_chunks::Splitter::new(ITEMS_PER_RUN),
            keep,
            prior,
        ),
    }
}

/// A snapshot held in memory, read the same way: `None` when it should be parsed whole.
pub fn parse(text: &str, format: Format) -> Option<Result<Built, SnapshotError>> {
    match read(text.as_bytes(), format, Keep::Nothing, None) {
        Ok(Streamed::Built(built)) => Some(built),
        _ => None,
    }
}

fn stream<C: Cutter>(
    mut reader: impl BufRead,
    mut cutter: C,
    keep: Keep,
    prior: Option<&Snapshot>,
) -> io::Result<Streamed> {
    let mut held = Vec::new();
    let mut first = Vec::new();
    // Hold the text until there are enough items to be worth the threads.
    while first.len() * ITEMS_PER_RUN < MIN_ITEMS {
        let kept = (keep == Keep::Text).then_some(&mut held);
        match step(&mut reader, &mut cutter, &mut first, kept)? {
            None => return whole(held),
            Some(Ok(())) => {}
            Some(Err(Unusual)) => {
                if keep == Keep::Text {
                    reader.read_to_end(&mut held)?;
                }
                return whole(held);
            }
        }
    }
    drop(held);
    let (rest, built) = super::parallel::map_stream(
        |send| {
            first.into_iter().for_each(&mut *send);
            feed_rest(reader, cutter, send)
        },
        |run: Run| {
            Some(
                run.build(C::FORMAT)?
                    .map(|keys| Snapshot::reuse(prior, keys)),
            )
        },
    );
    let Ok(envelope) = rest? else {
        return Ok(Streamed::GaveUp);
    };
    let Some(version) = envelope_version(&envelope, C::FORMAT) else {
        return Ok(Streamed::GaveUp);
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

/// Feed `cutter` the next piece of the document (copied to `held` too, if given); `None`
/// at its end.
fn step<C: Cutter>(
    reader: &mut impl BufRead,
    cutter: &mut C,
    done: &mut Vec<Run>,
    held: Option<&mut Vec<u8>>,
) -> io::Result<Option<Result<(), Unusual>>> {
    let buf = reader.fill_buf()?;
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(STEP);
    if let Some(held) = held {
        held.extend_from_slice(&buf[..n]);
    }
    let fed = cutter.feed(&buf[..n], done);
    reader.consume(n);
    Ok(Some(fed))
}

/// The text held, as text: a document that is not UTF-8 is a read error, as it is when read
/// whole.
fn whole(held: Vec<u8>) -> io::Result<Streamed> {
    String::from_utf8(held)
        .map(Streamed::Whole)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The rest of the document after the first runs: every further run sent as it completes;
/// the envelope at the end.
fn feed_rest<C: Cutter>(
    mut reader: impl BufRead,
    mut cutter: C,
    send: &mut dyn FnMut(Run),
) -> io::Result<Result<Vec<u8>, Unusual>> {
    let mut done = Vec::new();
    while let Some(fed) = step(&mut reader, &mut cutter, &mut done, None)? {
        done.drain(..).for_each(&mut *send);
        if fed.is_err() {
            return Ok(Err(Unusual));
        }
    }
    let envelope = cutter.finish(&mut done);
    done.into_iter().for_each(send);
    Ok(envelope)
}
