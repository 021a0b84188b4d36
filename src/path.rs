//! Path normalization (SPEC 7): the path is normalized once, and that one string is both
//! authorized and forwarded, so no spelling of a path can reach the upstream un-checked.
//!
//! A leaf: it knows neither the config (whose route rules must already be normalized)
//! nor the auth phases that use it.

use std::borrow::Cow;

/// Why a path was refused (400 `bad_request`): it cannot be normalized without guessing
/// what the upstream would make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("invalid percent-encoding")]
    BadPercent,
    #[error("encoded '/' or '\\' in path")]
    EncodedSeparator,
    #[error("backslash in path")]
    Backslash,
    #[error("NUL or control character in path")]
    Control,
    #[error("path parameters (';') are not accepted")]
    PathParameter,
    #[error("fragment in request target")]
    Fragment,
    /// Only reachable through the library API: a request's path never holds a raw `?`, and
    /// forwarding one would move the rest of the path into the query.
    #[error("'?' in path")]
    Query,
    #[error("'..' above the root")]
    AboveRoot,
    /// IIS and Win32 paths drop a segment's trailing dots and spaces, so `..%20` is `..` to
    /// them: a dot segment removed after keyward authorized the path.
    #[error("segment of dots and spaces")]
    DotsAndSpaces,
    /// More than [`MAX_ENCODED_CHARS`] percent-encoded non-ASCII characters, before or
    /// after NFKC: each is read under Unicode normalization (and case folding), which must
    /// stay a bounded cost.
    #[error("too many percent-encoded non-ASCII characters in path")]
    TooManyEncoded,
    /// An overlong UTF-8 form (`%C0%AE`, `%E0%80%AE`): no encoder writes one, and decoders
    /// that take it (old Tomcat, JDKs before 6u11, IIS 4/5) read `%C0%AE` as `.` and
    /// `%C0%AF` as `/`: a dot segment or a separator keyward never saw.
    #[error("overlong UTF-8 encoding in path")]
    Overlong,
}

/// Normalize an origin-form path (no query):
/// percent-decode unreserved characters (and upper-case the hex of the rest), merge
/// repeated slashes, and remove dot segments as in RFC 3986 5.2.4 — refusing anything
/// an upstream could read differently (encoded separators, `\`, `;`, NUL, `..` above root).
///
/// A path that is already normal (most are) comes back borrowed: nothing to decode, merge
/// or remove, so nothing is allocated.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path.as_bytes())?;
    remove_dot_segments(&decoded).map(Cow::Owned)
}

/// Would normalizing `path` (which starts with `/`) give it back unchanged? Only plain
/// characters (no `%`, nothing refused), no empty segment but a trailing one, no `.` or `..`
/// segment.
fn is_normal(path: &[u8]) -> bool {
    let plain = |b: &u8| !matches!(b, b'%' | b'\\' | b';' | b'#' | b'?' | 0..=0x20 | 0x7f..=0xff);
    if !path.iter().all(plain) {
        return false;
    }
    let mut segments = path[1..].split(|b| *b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || seg == b"." || seg == b".." {
            return false;
        }
    }
    true
}

fn decode_unreserved(input: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        match b {
            b'%' => {
                let hi = input.get(i + 1).and_then(|c| hex_val(*c));
                let lo = input.get(i + 2).and_then(|c| hex_val(*c));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadPercent);
                };
                let v = hi << 4 | lo;
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    b';' => return Err(PathError::PathParameter),
                    0..=0x1f | 0x7f => return Err(PathError::Control),
                    _ if is_unreserved(v) => out.push(v as char),
                    _ if overlong(input, i) => return Err(PathError::Overlong),
                    _ => push_escape(&mut out, v),
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter),
            b'#' => return Err(PathError::Fragment),
            b'?' => return Err(PathError::Query),
            0..=0x20 | 0x7f..=0xff => return Err(PathError::Control),
            _ => {
                out.push(b as char);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The byte `%HH` at `at` stands for, if one does.
fn encoded_byte(input: &[u8], at: usize) -> Option<u8> {
    match input.get(at..at + 3)? {
        [b'%', h, l] => Some(hex_val(*h)? << 4 | hex_val(*l)?),
        _ => None,
    }
}

/// Does the encoded UTF-8 sequence at `at` spell a character in more bytes than it takes
/// (RFC 3629 3: a 2-byte form of ASCII, a 3-byte form below U+0800, a 4-byte form below
/// U+10000), in RFC 2279's 5- and 6-byte forms, or as a UTF-16 surrogate (CESU-8, Java's
/// modified UTF-8: `%ED%A0%B5%ED%B0%9A` is `𝐚`, `a` under NFKC)? No encoder of UTF-8
/// writes one; lenient decoders read them. Only a whole sequence counts: Latin-1 text
/// (`%C0 la carte`, `men%FA%BB`) is not UTF-8 at all.
fn overlong(input: &[u8], at: usize) -> bool {
    let byte = |k: usize| encoded_byte(input, at + 3 * k);
    let continued = |n: usize| (1..=n).all(|k| matches!(byte(k), Some(0x80..=0xbf)));
    match (byte(0), byte(1)) {
        (Some(0xc0 | 0xc1), Some(0x80..=0xbf)) => true,
        (Some(0xe0), Some(0x80..=0x9f)) | (Some(0xed), Some(0xa0..=0xbf)) => continued(2),
        (Some(0xf0), Some(0x80..=0x8f)) => continued(3),
        (Some(0xf8..=0xfb), _) => continued(4),
        (Some(0xfc..=0xfd), _) => continued(5),
        _ => false,
    }
}

/// What an app may read a normalized `path` as, besides itself, each normalized in turn
/// (the route each meets is authorized too: see `Policy::reading_route`):
/// - cut at its first encoded `?` or `#`: an app that decodes its URL before splitting it
///   (`new URL(decodeURIComponent(url))`, a `req.url = decodeURIComponent(req.url)`
///   middleware) ends the path there, and routes `/admin%3F` as `/admin`, `/public/..%3F`
///   as `/`;
/// - with each percent-encoded character whose compatibility form (NFKC) holds ASCII
///   replaced by that form: an app that normalizes what it decoded (Python's `unicodedata`,
///   Java's `Normalizer`) reads fullwidth `／` as `/`, `‥` as `..`, `ａｄｍｉｎ` as
///   `admin`.
///
/// A reading that cannot be normalized itself (`/..%3F` is `/..` above the root; a fullwidth
/// `＼` a backslash) refuses the path. Most paths hold no `%`: nothing is done for them.
pub fn readings(path: &str) -> Result<Vec<String>, PathError> {
    if !path.contains('%') {
        return Ok(Vec::new());
    }
    let compat = compatibility_readings(path)?;
    let mut out = Vec::new();
    for p in std::iter::once(path).chain(compat.iter().map(String::as_str)) {
        if let Some(cut) = cut_at_delimiter(p) {
            out.push(normalize(cut)?.into_owned());
        }
    }
    out.extend(compat);
    out.dedup();
    Ok(out)
}

/// `path` up to its first encoded `?` or `#` (a normalized path's escapes are upper-case).
fn cut_at_delimiter(path: &str) -> Option<&str> {
    let at = [path.find("%3F"), path.find("%23")]
        .into_iter()
        .flatten()
        .min()?;
    Some(&path[..at])
}

/// `s` (a path or a query) as an app that decodes it once, then NFKC-normalizes it, reads
/// it: `%3F` and a fullwidth `？` are `?`, `%26` and `＆` are `&`, `ａ` is `a`.
pub fn as_decoded(s: &str) -> Cow<'_, str> {
    use unicode_normalization::UnicodeNormalization as _;
    if !s.contains('%') && s.is_ascii() {
        return Cow::Borrowed(s);
    }
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8_lossy();
    if decoded.is_ascii() {
        return Cow::Owned(decoded.into_owned());
    }
    Cow::Owned(decoded.nfkc().collect())
}

/// First of the private-use characters an ASCII escape (`%20`, `%3F`) of the path stands
/// as while the path is NFKC-normalized: NFKC leaves them be, so each comes back as written.
const ESCAPED: u32 = 0xE000;

/// Most percent-encoded non-ASCII characters a path may hold, as sent and as NFKC makes
/// them: each is NFKC-normalized (and, with `routes_case_insensitive`, case-folded) for
/// every reading, so a 15 KB path of them cost a hundred times a request, and 256 of `ﷺ`
/// (18 characters each under NFKC) 2.8 ms.
pub const MAX_ENCODED_CHARS: usize = 256;

/// `path` as apps that decode it and NFKC-normalize the result read it (the whole path at
/// once, so composition counts: `e` and a combining acute are `é`, halfwidth `ｶ` is `カ`,
/// `‥` is `..`), each encoded again and normalized. A `?`, `#`, `;` or `\` NFKC makes is
/// read both ways: as an app that decoded first splits there (cut at `?#;`, `\` as `/`),
/// and as one that takes it as data (an ordinary character, which dot segments after it
/// still climb past: `/public/a？/‥/‥/admin` is `/admin` to it). Empty when NFKC changes
/// nothing (see [`readings`]).
fn compatibility_readings(path: &str) -> Result<Vec<String>, PathError> {
    use unicode_normalization::UnicodeNormalization as _;
    let mut chars = encoded_chars(path).peekable();
    if chars.peek().is_none() {
        return Ok(Vec::new());
    }
    let mut decoded = String::with_capacity(path.len());
    let mut copied = 0;
    let mut count = 0;
    for (range, c) in chars {
        count += 1;
        if count > MAX_ENCODED_CHARS {
            return Err(PathError::TooManyEncoded);
        }
        push_ascii_part(&mut decoded, &path[copied..range.start]);
        decoded.push(c);
        copied = range.end;
    }
    push_ascii_part(&mut decoded, &path[copied..]);
    if unicode_normalization::is_nfkc_quick(decoded.chars())
        == unicode_normalization::IsNormalized::Yes
    {
        return Ok(Vec::new());
    }
    let read: String = decoded.nfkc().collect();
    if read == decoded {
        return Ok(Vec::new());
    }
    let made = read
        .chars()
        .filter(|&c| !c.is_ascii() && !is_escape_placeholder(c));
    if made.count() > MAX_ENCODED_CHARS {
        return Err(PathError::TooManyEncoded);
    }
    let (mut split, mut data) = (String::new(), String::new());
    let mut cut = false;
    for c in read.chars() {
        match c {
            '?' | '#' | ';' => {
                cut = true;
                data.push('_');
            }
            '\\' => {
                if !cut {
                    split.push('/');
                }
                data.push('_');
            }
            c => {
                if !cut {
                    push_as_read(&mut split, c);
                }
                push_as_read(&mut data, c);
            }
        }
    }
    let mut out = vec![normalize(&split)?.into_owned()];
    if data != split {
        out.push(normalize(&data)?.into_owned());
    }
    out.dedup();
    Ok(out)
}

/// The ASCII part of a path, its escapes each as one private-use character.
fn push_ascii_part(out: &mut String, part: &str) {
    let b = part.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let escape = match b.get(i..i + 3) {
            Some([b'%', h, l]) => hex_val(*h).zip(hex_val(*l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escape {
            Some(v) => {
                out.push(char::from_u32(ESCAPED + u32::from(v)).unwrap_or('\u{fffd}'));
                i += 3;
            }
            None => {
                out.push(char::from(b[i]));
                i += 1;
            }
        }
    }
}

/// One of the characters an ASCII escape of the path stands as ([`ESCAPED`]).
fn is_escape_placeholder(c: char) -> bool {
    (ESCAPED..ESCAPED + 0x80).contains(&u32::from(c))
}

/// `c` as it stands in a path once an app has decoded and normalized it: a separator, a dot,
/// a letter as themselves; a `%` or a space encoded (plain data); an ASCII escape of the
/// path as it was written; anything else percent-encoded.
fn push_as_read(out: &mut String, c: char) {
    match c {
        '%' | ' ' | '\0'..='\x1f' | '\x7f' => push_escape(out, c as u8),
        c if c.is_ascii() => out.push(c),
        c if is_escape_placeholder(c) => push_escape(out, (u32::from(c) - ESCAPED) as u8),
        c => push_encoded(out, c),
    }
}

/// `path` with each escape of an ASCII character that may stand as itself in a path
/// decoded: `%3A` is `:`, `%40` is `@`, `%2B` is `+`, as every framework reads them once it
/// has decoded the path, so a route rule with one (`/v1/items:purge`, `/v1/@admin/`) meets
/// both spellings of it. The form route rules and paths are compared in. Escapes that
/// would change the path's structure stay: `%2F`, `%5C` and `%3B` are refused before this,
/// `%3F` and `%23` cut readings of their own ([`readings`]), `%25` and `%20` are data.
pub fn delimiters_decoded(path: &str) -> Cow<'_, str> {
    // Most paths hold no escape: one scan, nothing built (this runs for every request).
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let b = path.as_bytes();
    let decodable = |at: usize| encoded_byte(b, at).filter(|v| stands_as_itself(*v));
    let Some(first) = (0..b.len()).find(|&i| b[i] == b'%' && decodable(i).is_some()) else {
        return Cow::Borrowed(path);
    };
    let mut out = String::with_capacity(path.len());
    out.push_str(&path[..first]);
    let mut i = first;
    while i < b.len() {
        match decodable(i) {
            Some(v) => {
                out.push(char::from(v));
                i += 3;
            }
            None => {
                // A '%' that stays, or any other byte: copied up to the next '%'.
                let next = path[i + 1..].find('%').map_or(b.len(), |n| i + 1 + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    Cow::Owned(out)
}

/// A route rule's path or prefix in the form requests are compared with it: escapes of
/// characters that stand as themselves decoded ([`delimiters_decoded`]) and, for a
/// protected rule, in NFKC form ([`nfkc_form`]) to meet what apps that normalize serve. A
/// public rule opens what it names, never what a normalization makes of it (a fullwidth
/// `/％ｐub/` public rule opened the plain `/pub/`).
pub fn rule_form(p: &str, public: bool) -> String {
    if public {
        return delimiters_decoded(p).into_owned();
    }
    delimiters_decoded(&nfkc_form(p)).into_owned()
}

/// With `routes_case_insensitive`, the path protected rules are matched on (and the form
/// they are kept in): each encoded character read as Unicode case folding reads it, after
/// NFKC: as the ASCII letters its case mapping holds, lower-cased (`ı`, `İ`, `ſ`, the
/// Kelvin sign, `ß` as `ss`, `ẞ`, `ﬆ`, `𝚤`), what Java, JS, Python and .NET's
/// `OrdinalIgnoreCase` make of them; any other letter lower-cased (`É` as `é`). So
/// `/adm%C4%B1n/x` meets the `/admin/` rule, and `/CAF%C3%89/` the `/caf%C3%A9/` one. The
/// path forwarded is unchanged.
pub fn fold_lookalikes(path: &str) -> std::borrow::Cow<'_, str> {
    let mut folded: Option<String> = None;
    let mut copied = 0;
    for (range, c) in encoded_chars(path) {
        let Some(read) = case_fold(c) else {
            continue;
        };
        let out = folded.get_or_insert_with(|| String::with_capacity(path.len()));
        out.push_str(&path[copied..range.start]);
        out.push_str(&read);
        copied = range.end;
    }
    match folded {
        Some(mut out) => {
            out.push_str(&path[copied..]);
            std::borrow::Cow::Owned(out)
        }
        None => std::borrow::Cow::Borrowed(path),
    }
}

/// `c` (encoded in a path) as [`fold_lookalikes`] reads it, if that differs: ASCII
/// letters as they are, anything else percent-encoded. Each character of its NFKC form is
/// read as the ASCII letters its case mapping holds (upper, lower, or upper of lower), else
/// as the lower case of its upper case (so final `ς` is `σ`, as full case folding has it).
fn case_fold(c: char) -> Option<String> {
    use unicode_normalization::UnicodeNormalization as _;
    let ascii = |mapped: &mut dyn Iterator<Item = char>| -> Option<String> {
        let s: String = mapped.filter(char::is_ascii_alphanumeric).collect();
        (!s.is_empty()).then(|| s.to_ascii_lowercase())
    };
    let mut out = String::new();
    let mut changed = false;
    for d in std::iter::once(c).nfkc() {
        changed |= d != c;
        if d.is_ascii() {
            out.push(d.to_ascii_lowercase());
            changed = true;
            continue;
        }
        let letters = ascii(&mut d.to_uppercase())
            .or_else(|| ascii(&mut d.to_lowercase()))
            .or_else(|| ascii(&mut d.to_lowercase().flat_map(char::to_uppercase)));
        if let Some(letters) = letters {
            out.push_str(&letters);
            changed = true;
            continue;
        }
        for l in d.to_uppercase().flat_map(char::to_lowercase) {
            changed |= l != d;
            push_encoded(&mut out, l);
        }
    }
    changed.then_some(out)
}

/// Printable ASCII that means nothing to a path's structure once decoded.
fn stands_as_itself(v: u8) -> bool {
    v.is_ascii_graphic() && !matches!(v, b'%' | b'/' | b'\\' | b';' | b'#' | b'?')
}

/// `%HH` of byte `b`, upper-case hex: the form a normalized path carries its escapes in.
fn push_escape(out: &mut String, b: u8) {
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 0xf)] as char);
}

/// `c` percent-encoded as UTF-8, as a normalized path carries it (`é` is `%C3%A9`).
pub fn push_encoded(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        push_escape(out, b);
    }
}

/// `path` (a route rule's, as written in the config) in the form [`readings`] compares:
/// NFKC, so a rule written `/caf%C3%A9/` meets `/cafe%CC%81/`'s reading.
pub fn nfkc_form(path: &str) -> String {
    match compatibility_readings(path) {
        Ok(read) if !read.is_empty() => read[0].clone(),
        _ => path.to_string(),
    }
}

/// The characters `path` spells in percent-encoded UTF-8 (`%C3%9F` is `ß`), each with the
/// byte range it takes in `path`. A byte that starts no valid sequence is U+FFFD, as
/// decoders read it. Nothing is allocated.
pub fn encoded_chars(path: &str) -> impl Iterator<Item = (std::ops::Range<usize>, char)> + '_ {
    let bytes = path.as_bytes();
    let high = move |at: usize| -> Option<u8> {
        match bytes.get(at..at + 3)? {
            [b'%', h, l] => Some(hex_val(*h)? << 4 | hex_val(*l)?).filter(|v| *v >= 0x80),
            _ => None,
        }
    };
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            let Some(first) = high(i) else {
                i += 1;
                continue;
            };
            let len = match first {
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf7 => 4,
                _ => 1,
            };
            let mut buf = [0u8; 4];
            let mut n = 0;
            while n < len {
                match high(i + 3 * n) {
                    Some(b) => buf[n] = b,
                    None => break,
                }
                n += 1;
            }
            let start = i;
            let (c, taken) = match std::str::from_utf8(&buf[..n]) {
                Ok(s) if n == len => (s.chars().next().unwrap_or('\u{fffd}'), n),
                _ => ('\u{fffd}', 1),
            };
            i += 3 * taken;
            return Some((start..i, c));
        }
        None
    })
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Dot-segment removal over `/`-separated segments, merging empty segments (`//`), keeping
/// a trailing slash. `..` that would climb above the root is an error, not clamped: a
/// request that tries it is not a mistake worth guessing about.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut stack: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in path.split('/').skip(1) {
        trailing_slash = false;
        match seg {
            "" | "." => trailing_slash = true,
            ".." => {
                stack.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            s if dots_and_spaces(s) => return Err(PathError::DotsAndSpaces),
            s => stack.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &stack {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// A segment of dots and encoded spaces alone, with both: `..%20`, `.%20.`, `%20..`. (A
/// name of dots alone, `...`, is a name to every server; `%20` alone is no dot segment.)
fn dots_and_spaces(seg: &str) -> bool {
    let mut rest = seg;
    while let Some(r) = rest.strip_prefix('.').or_else(|| rest.strip_prefix("%20")) {
        rest = r;
    }
    rest.is_empty() && seg.contains('.') && seg.contains("%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        let fast = normalize(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        // The borrowed answer is only ever what the full normalization gives.
        let full = decode_unreserved(p.as_bytes()).and_then(|d| remove_dot_segments(&d));
        assert_eq!(full.as_deref(), Ok(&*fast), "{p}");
        fast.into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a", "/a/b/", "/v1/items/42", "/a:b@c", "/a.b/..c/.d"] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
        for p in ["//a", "/a/./b", "/a/..", "/a%41", "/a/.", "/."] {
            assert!(matches!(normalize(p), Ok(Cow::Owned(_))), "{p}");
        }
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/v1/items/42",
            "/a%20b",
            "/caf%C3%A9",
            "/a:b@c",
            "/Admin",
        ] {
            assert_eq!(ok(p), p);
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(ok("/a/../admin"), "/admin");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("//admin"), "/admin");
        assert_eq!(ok("/a//b///c"), "/a/b/c");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/a/b/../../c"), "/c");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/x/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/x/%2E./admin"), "/admin");
        assert_eq!(ok("/a%7eb"), "/a~b");
        assert_eq!(ok("/a%3fb"), "/a%3Fb");
        assert_eq!(ok("/a%25b"), "/a%25b");
        assert_eq!(normalize("/a%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%5cb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize("/a%00"), Err(PathError::Control));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadPercent));
        assert_eq!(normalize("/a%2"), Err(PathError::BadPercent));
        assert_eq!(normalize("/a%"), Err(PathError::BadPercent));
    }

    #[test]
    fn refused_forms() {
        for p in [
            "/public/..%20/admin",
            "/public/.%20./admin",
            "/a/%20../b",
            "/a/..%2e%20/b",
            "/a/%20",
        ] {
            let want = if p == "/a/%20" {
                Ok("/a/%20".into())
            } else {
                Err(PathError::DotsAndSpaces)
            };
            assert_eq!(normalize(p).map(Cow::into_owned), want, "{p}");
        }
        assert_eq!(ok("/a/..b/.c./%20x"), "/a/..b/.c./%20x");
        assert_eq!(ok("/a/.../b"), "/a/.../b");
        assert_eq!(ok("/a/..%2e/b"), "/a/.../b");
        assert_eq!(normalize("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/../../admin"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/%2e%2e/admin"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/admin;x=1"), Err(PathError::PathParameter));
        assert_eq!(normalize("/admin%3bx"), Err(PathError::PathParameter));
        assert_eq!(normalize("/a\\admin"), Err(PathError::Backslash));
        assert_eq!(normalize("/a#frag"), Err(PathError::Fragment));
        // Found by proptest: a raw `?` was kept, and `Upstream::uri` would have forwarded
        // `/a?x/../admin` as path `/a` + query: not the path that was authorized.
        assert_eq!(normalize("/a?x/../admin"), Err(PathError::Query));
        assert_eq!(ok("/a%3Fx"), "/a%3Fx");
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a\u{1}"), Err(PathError::Control));
    }

    /// What an app may read a path as: cut at an encoded `?` or `#`, or its NFKC form
    /// (fullwidth `．／`, the two-dot leader, the small full stop, fullwidth letters,
    /// ligatures, the long s, the Kelvin sign); a reading that cannot be normalized refuses
    /// the path. Other non-ASCII gives no reading, and no path is refused for being read.
    #[test]
    fn readings_are_what_an_app_may_make_of_a_path() {
        let read = |p: &str| readings(&ok(p));
        for (p, want) in [
            ("/a%3Fb", vec!["/a"]),
            ("/public/..%3F", vec!["/"]),
            ("/admin%23x", vec!["/admin"]),
            ("/questions/tagged/c%23", vec!["/questions/tagged/c"]),
            ("/public/%E2%80%A5/admin/x", vec!["/admin/x"]),
            (
                "/public/x%EF%BC%8F..%EF%BC%8F..%EF%BC%8Fadmin/x",
                vec!["/admin/x"],
            ),
            ("/public/%EF%B9%92%EF%B9%92/admin", vec!["/admin"]),
            ("/%EF%BD%81dmin/x", vec!["/admin/x"]),
            ("/%EF%AC%86aff", vec!["/staff"]),
            ("/%C5%BFecret", vec!["/secret"]),
            ("/%E2%84%AAey", vec!["/Key"]),
            ("/a/%C2%BD-cup", vec!["/a/1%E2%81%842-cup"]),
            (
                "/docs/%E5%A4%A7%E9%98%AA%E3%80%80x",
                vec!["/docs/%E5%A4%A7%E9%98%AA%20x"],
            ),
        ] {
            assert_eq!(
                read(p),
                Ok(want.iter().map(|s| s.to_string()).collect()),
                "{p}"
            );
        }
        // A fullwidth `？` (`；`) reads as `?` (`;`): cut there, or as data; a fullwidth
        // `＼` as `/`, or as data. Dot segments after one climb in the data reading.
        let both = |a: &str, b: &str| Ok(vec![a.to_string(), b.to_string()]);
        assert_eq!(read("/a/b%EF%BC%9Fc"), both("/a/b", "/a/b_c"));
        assert_eq!(read("/docs/x%EF%BC%9By"), both("/docs/x", "/docs/x_y"));
        assert_eq!(read("/a/%EF%BC%BCb"), both("/a/b", "/a/_b"));
        assert_eq!(
            read("/public/a%EF%BC%9F/%E2%80%A5/%E2%80%A5/admin/x"),
            both("/public/a", "/admin/x")
        );
        assert_eq!(
            read("/public/x%EF%BC%BCy/%E2%80%A5/%E2%80%A5/admin/z"),
            both("/public/admin/z", "/admin/z")
        );
        // Past the bound of encoded characters, refused.
        let many = format!("/x/{}", "%C3%A9".repeat(MAX_ENCODED_CHARS + 1));
        assert_eq!(readings(&many), Err(PathError::TooManyEncoded));
        // Overlong forms (`.` and `/` to lenient decoders) are refused; shortest ones not.
        for p in [
            "/a/%C0%AE%C0%AE/b",
            "/a/%c0%af",
            "/a/%E0%80%AE",
            "/a/%F0%80%80%AE",
            "/%C1%81",
        ] {
            assert_eq!(normalize(p), Err(PathError::Overlong), "{p}");
        }
        for p in [
            "/%F8%80%80%80%AE",
            "/%FC%80%80%80%80%AE",
            "/%ED%A0%B5%ED%B0%9Admin",
        ] {
            assert_eq!(normalize(p), Err(PathError::Overlong), "{p}");
        }
        // Latin-1 text is not UTF-8 at all, overlong or not.
        for p in [
            "/docs/%C0%20la%20carte",
            "/%C1gua",
            "/caf%E9",
            "/men%FA%BB",
            "/%ED%A0x",
        ] {
            assert!(normalize(p).is_ok(), "{p}");
        }
        for p in ["/caf%C3%A9", "/%E0%A4%85", "/%F0%9F%98%80", "/%ED%9F%BF"] {
            assert!(normalize(p).is_ok(), "{p}");
        }
        // Few as sent, many as NFKC makes them: `ﷺ` is 18 characters, 15 not ASCII.
        let expands = format!("/x/{}", "%EF%B7%BA".repeat(18));
        assert_eq!(readings(&expands), Err(PathError::TooManyEncoded));
        let few = format!("/x/{}", "%EF%B7%BA".repeat(17));
        assert!(readings(&few).is_ok());
        // The whole path is normalized at once: composition counts.
        assert_eq!(read("/cafe%CC%81/x"), Ok(vec!["/caf%C3%A9/x".to_string()]));
        assert_eq!(
            read("/%E2%84%ABngstrom"),
            Ok(vec!["/%C3%85ngstrom".to_string()])
        );
        assert_eq!(
            read("/%EF%BD%B6%EF%BD%B0%EF%BE%84%EF%BE%9E/x"),
            Ok(vec!["/%E3%82%AB%E3%83%BC%E3%83%89/x".to_string()])
        );
        // An ASCII escape comes back as written; a fullwidth `％` is plain data.
        assert_eq!(
            read("/a%20b/%EF%BD%81%25"),
            Ok(vec!["/a%20b/a%25".to_string()])
        );
        assert_eq!(read("/a/%EF%BC%852F"), Ok(vec!["/a/%252F".to_string()]));
        for p in [
            "/caf%C3%A9",
            "/%E6%97%A5%E6%9C%AC",
            "/acce%C3%9F",
            "/adm%C4%B1n",
            "/%F0%9F%98%80",
            "/bad%FF%FE",
            "/cut%E2%80",
            "/plain/path",
        ] {
            assert_eq!(read(p), Ok(Vec::new()), "{p}");
        }
        assert_eq!(read("/..%3F"), Err(PathError::AboveRoot));
        assert_eq!(read("/%EF%BC%8E%EF%BC%8E/x"), Err(PathError::AboveRoot));
        let chars: Vec<_> = encoded_chars("/a%C3%A9b%E2%80%A5%FFz").collect();
        assert_eq!(
            chars,
            [(2..8, 'é'), (9..18, '\u{2025}'), (18..21, '\u{fffd}')]
        );
    }

    #[test]
    fn delimiters_are_compared_decoded() {
        for (path, want) in [
            ("/v1/items:purge", "/v1/items:purge"),
            ("/v1/items%3Apurge", "/v1/items:purge"),
            ("/v1/items%3apurge", "/v1/items:purge"),
            (
                "/v1/%40admin/%2B%2C%3D%21%24%26%27%28%29%2A",
                "/v1/@admin/+,=!$&'()*",
            ),
            // Structure and data stay encoded.
            ("/a%3Fb%23c%25d%20e", "/a%3Fb%23c%25d%20e"),
            ("/a%25%3A", "/a%25:"),
            ("/caf%C3%A9%3A", "/caf%C3%A9:"),
            ("/a%3", "/a%3"),
        ] {
            assert_eq!(delimiters_decoded(path), want, "{path}");
        }
        assert!(matches!(delimiters_decoded("/a%20b"), Cow::Borrowed(_)));
    }

    #[test]
    fn idempotent_on_samples() {
        for p in [
            "/a/../b/./c//d/",
            "/%7Euser/%41",
            "/x%20y/../z",
            "/a/b/c/../..",
        ] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
        }
    }

    /// Decode every `%XX` once, as an upstream framework typically does.
    fn decode_once(p: &str) -> Vec<u8> {
        let b = p.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let v = u8::from_str_radix(&p[i + 1..i + 3], 16).unwrap();
                out.push(v);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    /// What must hold for every path `normalize` accepts.
    fn check_normalized(
        input: &str,
        out: &str,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::{prop_assert, prop_assert_eq};
        prop_assert!(out.starts_with('/'), "{input:?} -> {out:?}");
        prop_assert!(!out.contains("//"), "{input:?} -> {out:?}");
        let segments: Vec<&str> = out.split('/').skip(1).collect();
        prop_assert!(
            segments.iter().all(|s| *s != "." && *s != ".."),
            "{input:?} -> {out:?}"
        );
        prop_assert!(
            !out.contains(['\\', ';', '#', '?']) && out.bytes().all(|b| b > 0x20 && b < 0x7f),
            "{input:?} -> {out:?}"
        );
        // Idempotent: normalizing what is forwarded changes nothing.
        let again = normalize(out);
        prop_assert_eq!(again.as_deref(), Ok(out), "{:?}", input);
        // An upstream that percent-decodes once sees the same segments, none of them a
        // dot segment: no encoding survives that could become `/`, `\` or `..` later.
        let decoded = decode_once(out);
        let decoded_segments: Vec<&[u8]> = decoded.split(|b| *b == b'/').skip(1).collect();
        prop_assert_eq!(decoded_segments.len(), segments.len(), "{:?}", input);
        prop_assert!(
            decoded_segments
                .iter()
                .all(|s| *s != b"." && *s != b".." && !s.contains(&b'\\')),
            "{input:?} -> {out:?}"
        );
        // What is authorized is what is forwarded: the URI keyward sends upstream carries
        // exactly this path (for any input hyper could have delivered as a request path).
        if http::uri::PathAndQuery::try_from(input).is_err() {
            return Ok(());
        }
        let upstream = crate::proxy::forward::Upstream::new(
            Some(&crate::config::UpstreamAddr::Http(http::Uri::from_static(
                "http://127.0.0.1:9",
            ))),
            &crate::config::Limits::default(),
            crate::config::UpstreamClient::Fast,
        );
        let uri = upstream.uri(out, Some("q=%2e%2e/x")).unwrap();
        prop_assert_eq!(uri.path(), out);
        Ok(())
    }

    /// Path-like strings: the pieces every traversal trick is made of.
    fn path_like() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop::sample::select(vec![
            "/",
            "/",
            "/",
            "a",
            "b",
            "admin",
            ".",
            "..",
            "...",
            "%2e",
            "%2E",
            "%2e%2e",
            ".%2e",
            "%2f",
            "%2F",
            "%5c",
            "\\",
            ";",
            "%3b",
            "#",
            "%",
            "%4",
            "%41",
            "%7e",
            "~",
            "%25",
            "%252e",
            "%20",
            "%00",
            "%ff",
            "%C3%A9",
            "%3f",
            "%23",
            "%EF%BC%8F",
            "%E2%80%A5",
            "-",
            "_",
            ":",
            "@",
            "!",
            "$",
            "&",
            "'",
            "(",
            "*",
            "+",
            ",",
            "=",
            "\u{0}",
            "\t",
            "é",
        ]);
        prop::collection::vec(piece, 0..24).prop_map(|v| format!("/{}", v.concat()))
    }

    proptest::proptest! {
        // Found cases become unit tests above, so no regression file is written.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2048,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn prop_normalized_paths_are_dot_free_and_idempotent(p in path_like()) {
            if let Ok(out) = normalize(&p) {
                check_normalized(&p, &out)?;
            }
        }

        #[test]
        fn prop_any_string_is_normalized_or_refused(p in "\\PC*") {
            // Never panics; whatever is accepted keeps every invariant.
            if let Ok(out) = normalize(&p) {
                check_normalized(&p, &out)?;
            }
        }

        #[test]
        fn prop_dot_segments_and_slashes_cannot_change_the_target(
            segs in proptest::collection::vec("[a-z]{1,3}", 1..6),
            at in 0usize..6,
            junk in proptest::sample::select(vec!["/zz/..", "/.", "/", "/./zz/../.", "/%2e", "/zz/%2E%2e"]),
        ) {
            let plain = format!("/{}", segs.join("/"));
            let at = at.min(segs.len());
            let tricked = format!(
                "/{}{}/{}",
                segs[..at].join("/"),
                junk,
                segs[at..].join("/")
            );
            let plain_out = normalize(&plain).unwrap();
            let tricked_out = normalize(&tricked).unwrap();
            // Same route, give or take the trailing slash of a directory.
            proptest::prop_assert_eq!(
                plain_out.trim_end_matches('/'),
                tricked_out.trim_end_matches('/'),
                "{:?} vs {:?}", plain, tricked
            );
        }

        #[test]
        fn prop_percent_encoded_unreserved_is_the_same_path(
            p in "/[a-zA-Z0-9._~/-]{0,24}",
            mask in proptest::collection::vec(proptest::bool::ANY, 24),
            lower in proptest::bool::ANY,
        ) {
            let encoded: String = p
                .chars()
                .zip(mask.iter().chain(std::iter::repeat(&false)))
                .map(|(c, enc)| match (c, enc) {
                    ('/', _) | (_, false) => c.to_string(),
                    (c, true) if lower => format!("%{:02x}", c as u8),
                    (c, true) => format!("%{:02X}", c as u8),
                })
                .collect();
            proptest::prop_assert_eq!(normalize(&p), normalize(&encoded), "{:?}", encoded);
        }
    }
}
