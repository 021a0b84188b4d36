//! The `log.format: json` line, written straight into the buffer tracing-subscriber's fmt
//! layer hands its formatter.
//!
//! At `info` every request writes one (the access line), and the stock JSON formatter
//! (`fmt().json()`) cost more than a third of the request: serde_json driven through
//! tracing-serde, a UTF-8 check on every small chunk its `io::Write` adaptor passed on, and a
//! calendar computation for every timestamp. [`JsonLine`] writes the same bytes
//! (`flatten_event(true)`, `with_current_span(false)`; the tests compare the two), so what
//! reads the logs sees no change.

use std::cell::Cell;
use std::fmt::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::{LookupSpan, SpanRef};

/// One JSON object per event: `timestamp`, `level`, the event's fields in the order they
/// are recorded, `target`, and `spans` when the event is inside one (the stock formatter's
/// span list, on by default; keyward opens no spans, a dependency might).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A line from the `log` crate (rustls logs through it) comes with target `log`, and
        // its own target in a field; the stock formatter showed the latter.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        timestamp(&mut writer)?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_char('"')?;
        let mut fields = Fields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        string(&mut writer, meta.target())?;
        spans(ctx, event, &mut writer)?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`. The first error ends the line: the fmt layer then
/// writes none of it, rather than half an object.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = entry(self.out, field.name(), value);
        }
    }
}

/// `,"name":` and the value. Each write is a call through the `Writer`, so the punctuation
/// goes in as few as there can be.
fn entry(
    out: &mut Writer<'_>,
    name: &str,
    value: impl FnOnce(&mut Writer<'_>) -> fmt::Result,
) -> fmt::Result {
    out.write_str(",\"")?;
    escaped(out, name)?;
    out.write_str("\":")?;
    value(out)
}

/// `,"name":"value"`, for the commonest field, a string.
fn str_entry(out: &mut Writer<'_>, name: &str, value: &str) -> fmt::Result {
    out.write_str(",\"")?;
    escaped(out, name)?;
    out.write_str("\":\"")?;
    escaped(out, value)?;
    out.write_str("\"")
}

/// The same methods tracing-serde's visitor implements; the rest (`i128`, bytes, errors)
/// reach `record_debug` through `Visit`'s defaults in both, as their `Debug` (an error's
/// `Display`).
impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = str_entry(self.out, field.name(), value);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, |out| float(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| {
            out.write_str("\"")?;
            write!(Escaped(&mut *out), "{value:?}")?;
            out.write_str("\"")
        });
    }
}

/// `value` as serde_json writes an f64 (its shortest round-trip digits; `null` when not
/// finite), by serde_json itself into a buffer on the stack: the digits are its
/// formatter's, whichever that is in the version in the tree.
fn float(out: &mut impl Write, value: f64) -> fmt::Result {
    let mut buf = [0u8; 32];
    let mut rest = &mut buf[..];
    serde_json::to_writer(&mut rest, &value).map_err(|_| fmt::Error)?;
    let len = 32 - rest.len();
    out.write_str(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)
}

/// `s` as a JSON string.
fn string(out: &mut impl Write, s: &str) -> fmt::Result {
    out.write_str("\"")?;
    escaped(out, s)?;
    out.write_str("\"")
}

/// `s` escaped as serde_json escapes it: `"` and `\`, and the control characters (`\b \t
/// \n \f \r`, the others as `\u00xx`); everything else, DEL and all of Unicode, as it is.
fn escaped(out: &mut (impl Write + ?Sized), s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(i) = first_to_escape(rest.as_bytes()) {
        if i > 0 {
            out.write_str(&rest[..i])?;
        }
        out.write_str(escape(rest.as_bytes()[i], &mut [0; 6]))?;
        rest = &rest[i + 1..];
    }
    if rest.is_empty() {
        return Ok(());
    }
    out.write_str(rest)
}

/// Whether JSON escapes `b`.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Where the first byte [`needs_escape`] is in `bytes`, looked for eight bytes at a time
/// (most strings have none, and a byte at a time cost more than the rest of the line): a
/// word has a byte below 0x20, or one equal to `"` or `\` (that XOR makes zero), exactly
/// when the classic SWAR tests say so; the byte itself is then found one at a time.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH;
    let mut start = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        if below(w, 0x20) | below(quote, 1) | below(backslash, 1) != 0 {
            break;
        }
        start += 8;
    }
    let found = bytes[start..].iter().position(|&b| needs_escape(b))?;
    Some(start + found)
}

/// What [`escaped`] writes for a byte that [`needs_escape`], built in `buf` if need be.
fn escape(b: u8, buf: &mut [u8; 6]) -> &str {
    match b {
        b'"' => "\\\"",
        b'\\' => "\\\\",
        0x08 => "\\b",
        b'\t' => "\\t",
        b'\n' => "\\n",
        0x0c => "\\f",
        b'\r' => "\\r",
        _ => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            *buf = [
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ];
            std::str::from_utf8(buf).unwrap_or_default()
        }
    }
}

/// A `Debug` value's text escaped on its way through, without a `String` in between.
struct Escaped<'a, W: ?Sized>(&'a mut W);

impl<W: Write + ?Sized> Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escaped(self.0, s)
    }
}

/// `,"spans":[...]`, root first, as the stock formatter wrote it: when the event has a
/// span (its explicit parent, else the current one), the current span's scope.
fn spans<S, N>(ctx: &FmtContext<'_, S, N>, event: &Event<'_>, out: &mut Writer<'_>) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    let has_span = event
        .parent()
        .and_then(|id| ctx.span(id))
        .or_else(|| ctx.lookup_current())
        .is_some();
    if !has_span {
        return Ok(());
    }
    out.write_str(",\"spans\":[")?;
    if let Some(leaf) = ctx.lookup_current() {
        for (i, span) in leaf.scope().from_root().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            span_object::<S, N>(&span, out)?;
        }
    }
    out.write_char(']')
}

/// One span: its fields (kept as a JSON object by the layer's `JsonFields`), then `name`.
/// The fields go through serde_json as in the stock formatter, which is rare enough not
/// to matter, and keeps what it wrote for fields that are not an object (its release
/// build's `field`/`field_error`).
fn span_object<S, N>(span: &SpanRef<'_, S>, out: &mut Writer<'_>) -> fmt::Result
where
    S: for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    out.write_char('{')?;
    let ext = span.extensions();
    let data = ext.get::<FormattedFields<N>>().ok_or(fmt::Error)?;
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(serde_json::Value::Object(fields)) => {
            for (name, value) in &fields {
                member(out, name, &value.to_string())?;
            }
        }
        Ok(value) => {
            member(out, "field", &value.to_string())?;
            member(out, "field_error", "\"field was no a valid object\"")?;
        }
        Err(e) => member(
            out,
            "field_error",
            &serde_json::Value::from(e.to_string()).to_string(),
        )?,
    }
    out.write_str("\"name\":")?;
    string(out, span.metadata().name())?;
    out.write_char('}')
}

/// `"name":json,` (`json` already written as JSON).
fn member(out: &mut Writer<'_>, name: &str, json: &str) -> fmt::Result {
    string(out, name)?;
    out.write_char(':')?;
    out.write_str(json)?;
    out.write_char(',')
}

/// The last second (the end of year 9999) that the stock format writes as four digits
/// and humantime formats.
const LAST_SECOND: u64 = 253_402_300_799;

thread_local! {
    /// The last second this thread wrote a line in, and its `YYYY-MM-DDTHH:MM:SS`: lines
    /// come many a second, and the calendar need not be worked out for each.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// Now, as the stock formatter writes it: RFC 3339 in UTC with microseconds,
/// `2026-12-07T22:31:37.350912Z`.
fn timestamp(out: &mut Writer<'_>) -> fmt::Result {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .filter(|d| d.as_secs() <= LAST_SECOND);
    let Some(since) = since else {
        // A clock before 1970 or past 9999: the stock timer's own text, read anew.
        return tracing_subscriber::fmt::time::SystemTime.format_time(out);
    };
    let secs = since.as_secs();
    let prefix = SECOND.with(|cached| match cached.get() {
        (second, prefix) if second == secs => Ok(prefix),
        _ => second_prefix(secs).inspect(|prefix| cached.set((secs, *prefix))),
    })?;
    let mut stamp = [0; 27];
    stamp[..19].copy_from_slice(&prefix);
    stamp[19] = b'.';
    micros(&mut stamp[20..26], since.subsec_micros());
    stamp[26] = b'Z';
    out.write_str(std::str::from_utf8(&stamp).map_err(|_| fmt::Error)?)
}

/// `YYYY-MM-DDTHH:MM:SS` of a second since the epoch (at most [`LAST_SECOND`]).
fn second_prefix(secs: u64) -> Result<[u8; 19], fmt::Error> {
    let mut text = StackText::<20>::default();
    let at = UNIX_EPOCH + Duration::from_secs(secs);
    write!(text, "{}", humantime::format_rfc3339_seconds(at))?;
    // `YYYY-MM-DDTHH:MM:SSZ`: all but the `Z`.
    let mut prefix = [0; 19];
    prefix.copy_from_slice(text.bytes().get(..19).ok_or(fmt::Error)?);
    Ok(prefix)
}

/// `us` (below a million) as the six digits of `digits`, zero-padded.
fn micros(digits: &mut [u8], mut us: u32) {
    for d in digits.iter_mut().rev() {
        *d = b'0' + (us % 10) as u8;
        us /= 10;
    }
}

/// Text of at most `N` bytes, written on the stack; more is an error.
struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for StackText<N> {
    fn default() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> StackText<N> {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;
    use crate::logging::subscriber;
    use crate::logging::tests::Buffer;

    /// Where the timestamp's value is in a line, and how long it is.
    const STAMP: std::ops::Range<usize> = 14..41;

    /// The lines `emit` makes keyward's subscriber write and the stock JSON formatter, each
    /// with its timestamp blanked (after checking ours has the stock shape).
    fn both(emit: impl Fn()) -> (Vec<String>, Vec<String>) {
        let ours = Buffer::default();
        let sub = subscriber(LogFormat::Json, "trace", ours.clone());
        tracing::subscriber::with_default(sub, &emit);
        let stock = Buffer::default();
        let sub = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_writer(stock.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(sub, &emit);
        let ours = ours.text();
        for line in ours.lines() {
            assert_stamp_shape(&line[STAMP]);
        }
        (blank_stamps(&ours), blank_stamps(&stock.text()))
    }

    fn blank_stamps(text: &str) -> Vec<String> {
        text.split_inclusive('\n')
            .map(|line| {
                assert!(line.starts_with("{\"timestamp\":\""), "{line}");
                format!("{}T{}", &line[..STAMP.start], &line[STAMP.end..])
            })
            .collect()
    }

    /// `2026-12-07T22:31:37.350912Z`.
    fn assert_stamp_shape(stamp: &str) {
        let shape: String = stamp
            .chars()
            .map(|c| if c.is_ascii_digit() { 'd' } else { c })
            .collect();
        assert_eq!(shape, "dddd-dd-ddTdd:dd:dd.ddddddZ", "{stamp}");
    }

    fn assert_same(emit: impl Fn()) {
        let (ours, stock) = both(emit);
        assert!(!stock.is_empty());
        for (ours, stock) in ours.iter().zip(&stock) {
            assert_eq!(ours, stock);
        }
        assert_eq!(ours.len(), stock.len());
    }

    #[derive(Debug)]
    #[allow(dead_code)] // read by Debug only
    struct Custom {
        name: &'static str,
        n: Option<i32>,
    }

    #[test]
    fn the_line_is_the_stock_formatters() {
        let every_control: String = (0u8..0x20).map(char::from).collect();
        let err = std::io::Error::other("broken \"pipe\"\n");
        assert_same(|| {
            tracing::info!(
                target: "keyward::escapes",
                controls = every_control.as_str(),
                q = "quote \" backslash \\ slash / del \x7f end",
                "message \"with\" \\ and\nnewline\tand {} args",
                2
            );
            tracing::warn!(target: "keyward::unicode", s = "é 中文 🦀 \u{2028} \u{feff}", "ünïcode");
            tracing::error!(
                target: "keyward::numbers",
                u = u64::MAX,
                i = i64::MIN,
                neg = -5i64,
                zero = 0u64,
                small = 7u8,
                short = -3i16,
                wide = i128::MIN,
                uwide = u128::MAX,
                usize = usize::MAX,
            );
            tracing::debug!(
                target: "keyward::floats",
                a = 8.73802,
                b = 0.1,
                c = 1.0,
                d = -0.0,
                e = 1e300,
                f = 1e-7,
                g = f64::MAX,
                h = f64::MIN_POSITIVE,
                i = 5e-324,
                j = -123456.789,
                k = 1e16,
                l = 123_456_789_012_345_680.0,
                nan = f64::NAN,
                inf = f64::INFINITY,
                ninf = f64::NEG_INFINITY,
                single = 0.1f32,
            );
            tracing::trace!(target: "keyward::bools", yes = true, no = false);
            tracing::info!(
                target: "keyward::options",
                some = Some("x"),
                none = None::<&str>,
                some_n = Some(3u64),
                none_f = None::<f64>,
                some_f = Some(2.5),
            );
            tracing::info!(
                target: "keyward::debug",
                v = ?vec!["a\"b", "c\n"],
                d = %"dis\tplay",
                m = ?Some("x"),
                c = ?Custom { name: "n\u{1}", n: Some(-1) },
                pretty = format_args!("{:#?}", Custom { name: "p", n: None }),
                "{} {:?}",
                1,
                "fmt"
            );
            tracing::error!(
                target: "keyward::error",
                error = &err as &(dyn std::error::Error + 'static),
                "failed"
            );
            tracing::info!(target: "keyward::bytes", b = &b"\x00\xffab"[..]);
            tracing::info!(target: "keyward::names", r#type = "raw", "dotted.name" = 1, "");
            tracing::info!(target: "keyward::empty", "");
            tracing::info!(target: "keyward::no_message", only = 1);
            tracing::info!(target: "keyward::\"odd\\target", "a target to escape");
        });
    }

    #[test]
    fn the_access_line_is_the_stock_formatters() {
        let key = Some(("key_demo_service", "service_account"));
        assert_same(|| {
            for (status, upstream) in [(200u16, Some(8.73802)), (401, None)] {
                let key = key.filter(|_| status == 200);
                tracing::info!(
                    target: "keyward::access",
                    correlation_id = "e32e2b1c-27d5-4a39-9f6b-0c1d2e3f4a5b",
                    method = "GET",
                    path = "/v1/x?",
                    status,
                    code = "ok",
                    key_id = key.map(|k| k.0),
                    principal_type = key.map(|k| k.1),
                    upstream_ms = upstream,
                    total_ms = 8.798619,
                );
            }
        });
    }

    #[test]
    fn a_line_from_the_log_crate_is_the_stock_formatters() {
        use tracing_log::log::{Level, Record};
        assert_same(|| {
            let _ = tracing_log::format_trace(
                &Record::builder()
                    .level(Level::Warn)
                    .target("somelib::conn")
                    .module_path(Some("somelib::conn"))
                    .file(Some("src/conn.rs"))
                    .line(Some(42))
                    .args(format_args!("said \"{}\"", 1))
                    .build(),
            );
            let _ =
                tracing_log::format_trace(&Record::builder().args(format_args!("bare")).build());
        });
    }

    #[test]
    fn the_span_list_is_the_stock_formatters() {
        assert_same(|| {
            let outer = tracing::info_span!("outer", n = 3, s = "a\"b", f = 1.5);
            let _entered = outer.enter();
            let late = tracing::debug_span!("late", a = tracing::field::Empty, b = 1u64);
            late.record("a", "later");
            late.record("b", 2u64);
            late.in_scope(|| tracing::info!(x = 1, "in two spans"));
            tracing::info!(parent: None, "no parent");
            let empty = tracing::info_span!("empty");
            empty.in_scope(|| tracing::info!("in three spans"));
        });
        // An explicit parent and no current span: the stock list is empty.
        assert_same(|| {
            let detached = tracing::info_span!("detached", k = "v");
            tracing::info!(parent: &detached, "explicit parent");
        });
    }

    #[test]
    fn the_timestamp_is_the_stock_formatters() {
        let stock = || {
            let mut s = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut s))
                .unwrap();
            s
        };
        // Taken between two readings of the stock timer in the same second, ours is in it.
        let (before, ours, after) = loop {
            let (before, ours, after) = (
                stock(),
                {
                    let mut s = String::new();
                    timestamp(&mut Writer::new(&mut s)).unwrap();
                    s
                },
                stock(),
            );
            if before[..19] == after[..19] {
                break (before, ours, after);
            }
        };
        assert_eq!(ours[..19], before[..19]);
        assert!(
            before[..] <= ours[..] && ours[..] <= after[..],
            "{before} {ours} {after}"
        );
        assert_stamp_shape(&ours);
    }

    #[test]
    fn seconds_and_microseconds_are_written_as_the_stock_timer_writes_them() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_796_682_697, "2026-12-07T22:31:37"),
            (LAST_SECOND, "9999-12-31T23:59:59"),
        ] {
            assert_eq!(second_prefix(secs).unwrap(), text.as_bytes(), "{secs}");
        }
        for (us, text) in [
            (0, "000000"),
            (7, "000007"),
            (350_912, "350912"),
            (999_999, "999999"),
        ] {
            let mut digits = [0; 6];
            micros(&mut digits, us);
            assert_eq!(digits, text.as_bytes());
        }
    }

    #[test]
    fn the_word_at_a_time_scan_finds_what_a_byte_at_a_time_finds() {
        let naive = |bytes: &[u8]| bytes.iter().position(|&b| needs_escape(b));
        for filler in [b'a', b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xc3, 0xff] {
            for len in 0..20 {
                let mut bytes = vec![filler; len];
                assert_eq!(first_to_escape(&bytes), naive(&bytes), "{filler} {len}");
                for at in 0..len {
                    for b in 0..=255u8 {
                        bytes[at] = b;
                        assert_eq!(first_to_escape(&bytes), naive(&bytes), "{filler} {at} {b}");
                        // And after one that needs it, the first is still found.
                        if at + 1 < len {
                            bytes[at + 1] = b'"';
                            assert_eq!(first_to_escape(&bytes), naive(&bytes));
                            bytes[at + 1] = filler;
                        }
                    }
                    bytes[at] = filler;
                }
            }
        }
    }

    /// A value whose `Debug` fails.
    struct Fails;

    impl fmt::Debug for Fails {
        fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
            Err(fmt::Error)
        }
    }

    #[test]
    fn a_value_that_cannot_be_formatted_loses_its_line_only() {
        // The stock formatter panicked here (serde_json expects the error to be its
        // writer's), so there is nothing to compare with.
        let buf = Buffer::default();
        let sub = subscriber(LogFormat::Json, "info", buf.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::info!(v = ?Fails, "lost");
            tracing::info!("kept");
        });
        let out = buf.text();
        assert!(!out.contains("lost") && out.contains("kept"), "{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
    }
}
