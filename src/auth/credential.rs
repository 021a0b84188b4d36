//! Credential extraction (SPEC 3): find exactly one API key in the request, or say why not.

use std::borrow::Cow;

use http::HeaderMap;

use crate::config::CredentialSource;

pub use crate::keys::{MAX_KEY_LEN, MIN_KEY_LEN};

/// Why no usable credential was found. All are 401 `invalid_auth_header`; `Missing` omits
/// the `error` attribute of `WWW-Authenticate` (RFC 6750 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialError {
    Missing,
    Malformed,
    Ambiguous,
}

/// Find the key in the configured sources, in order. Every source is inspected, so two
/// different keys in two places are refused instead of silently picking one.
pub fn extract<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    sources: &[CredentialSource],
) -> Result<Cow<'a, [u8]>, CredentialError> {
    let mut found: Option<Cow<'a, [u8]>> = None;
    let mut malformed = false;
    for source in sources {
        let candidate = match source {
            CredentialSource::Scheme { header, scheme } => from_scheme(headers, header, scheme),
            CredentialSource::Header { header } => from_header(headers, header),
            CredentialSource::Query { name } => from_query(query, name),
        };
        match candidate {
            Candidate::Absent => {}
            Candidate::Malformed => malformed = true,
            Candidate::Duplicate => return Err(CredentialError::Ambiguous),
            Candidate::Key(k) => match &found {
                Some(prev) if *prev != k => return Err(CredentialError::Ambiguous),
                Some(_) => {}
                None => found = Some(k),
            },
        }
    }
    match (found, malformed) {
        (Some(k), false) => Ok(k),
        (_, true) => Err(CredentialError::Malformed),
        (None, false) => Err(CredentialError::Missing),
    }
}

/// Whether a header that a scheme source reads carries a value no configured scheme reads
/// (another scheme's, `Basic`, `Digest`, a bare word), which [`extract`] leaves alone as
/// not its own. Forwarded (`forward_credential: true`), such a value reaches the app as
/// sent, beside the identity of the key checked: an app that reads its key from
/// `Authorization` acts as whatever key it holds, revoked, expired or another's. No scan
/// of the value can tell a key in it (a key need have no prefix, and apps decode values
/// every way: lenient base64, percent-encoding, `Credential=K/...`), and a scan cost a
/// client ~50 times a request's CPU with 16 KB of pieces; so any such value counts.
pub fn carries_unread_value(headers: &HeaderMap, sources: &[CredentialSource]) -> bool {
    sources.iter().any(|source| {
        let CredentialSource::Scheme { header, .. } = source else {
            return false;
        };
        headers.get_all(header).iter().any(|value| {
            !sources.iter().any(|s| {
                matches!(s, CredentialSource::Scheme { header: h, scheme }
                    if h == header && has_scheme(value.as_bytes(), scheme))
            })
        })
    })
}

/// `value` starts with `scheme` and a space (any case), as [`from_scheme`] reads it.
fn has_scheme(value: &[u8], scheme: &str) -> bool {
    let n = scheme.len();
    value.len() > n && value[..n].eq_ignore_ascii_case(scheme.as_bytes()) && value[n] == b' '
}

enum Candidate<'a> {
    Absent,
    Malformed,
    Duplicate,
    Key(Cow<'a, [u8]>),
}

fn single<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Result<Option<&'a [u8]>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first.map(|v| v.as_bytes()))
}

fn from_scheme<'a>(headers: &'a HeaderMap, name: &http::HeaderName, scheme: &str) -> Candidate<'a> {
    let value = match single(headers, name) {
        Err(()) => return Candidate::Duplicate,
        Ok(None) => return Candidate::Absent,
        Ok(Some(v)) => v,
    };
    let Some(space) = value.iter().position(|b| *b == b' ') else {
        // A bare word: either a scheme with no token, or something else entirely.
        return if value.eq_ignore_ascii_case(scheme.as_bytes()) {
            Candidate::Malformed
        } else {
            Candidate::Absent
        };
    };
    let (given, rest) = value.split_at(space);
    if !given.eq_ignore_ascii_case(scheme.as_bytes()) {
        // Another scheme (e.g. Basic, or the next configured one): not ours to judge.
        return Candidate::Absent;
    }
    checked(&rest[1..])
}

fn from_header<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Candidate<'a> {
    match single(headers, name) {
        Err(()) => Candidate::Duplicate,
        Ok(None) => Candidate::Absent,
        Ok(Some(v)) => checked(v),
    }
}

/// The query credential, read with `;` separating parameters as `&` does (Rack 2, Perl's
/// CGI and older Python `parse_qs` split on both), as [`has_query_param`] and
/// [`strip_query_param`] read it: `x=1;api_key=A` beside a header key is two keys
/// (ambiguous), never the header's checked and `A` handed to such an app unchecked. A key
/// followed by `;` is malformed: an app splitting on `&` alone reads `A;x=1`, not the `A`
/// checked.
fn from_query<'a>(query: Option<&'a str>, name: &str) -> Candidate<'a> {
    let Some(query) = query else {
        return Candidate::Absent;
    };
    let name = ParamName::new(name);
    let mut found = None;
    let mut rest = query;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let pair = &rest[..end];
        let (k, v) = split_pair(pair);
        let v = v.unwrap_or("");
        if name.matches(k) {
            if found.is_some() {
                return Candidate::Duplicate;
            }
            found = Some((v, rest[end..].starts_with(';')));
        }
        if end == rest.len() {
            break;
        }
        rest = &rest[end + 1..];
    }
    match found {
        None => Candidate::Absent,
        Some((_, true)) => Candidate::Malformed,
        // Present but empty, as generated clients send an unset optional parameter: no
        // credential, as frameworks read it (and as an empty `_method` is ignored).
        Some(("", false)) => Candidate::Absent,
        Some((v, false)) => match percent_decode(v) {
            Some(bytes) if well_formed(&bytes) => Candidate::Key(Cow::Owned(bytes)),
            _ => Candidate::Malformed,
        },
    }
}

/// Exactly one token of visible ASCII, `MIN_KEY_LEN..=MAX_KEY_LEN` bytes.
fn checked(token: &[u8]) -> Candidate<'_> {
    if well_formed(token) {
        Candidate::Key(Cow::Borrowed(token))
    } else {
        Candidate::Malformed
    }
}

fn well_formed(token: &[u8]) -> bool {
    (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&token.len())
        && token.iter().all(|b| (0x21..0x7f).contains(b))
}

/// Decode a query value as a form does: `+` is a space, `%XX` a byte. A `%` not followed
/// by two hex digits is refused (percent-encoding would pass it through as it is).
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let escapes_ok = s.split('%').skip(1).all(|rest| {
        rest.get(..2)
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if !escapes_ok {
        return None;
    }
    let spaced = s.replace('+', " ");
    Some(percent_encoding::percent_decode_str(&spaced).collect())
}

/// `s` with each `%uXXXX` escape as the character it names, as ASP.NET's (System.Web)
/// `HttpUtility.UrlDecode`, classic ASP and JavaScript's `unescape` read it: an ASP.NET MVC
/// app reads `X%u002DHTTP-Method-Override` as `X-HTTP-Method-Override`. An escape that
/// names no character (a surrogate) is left as written.
pub fn decode_u_escapes(s: &str) -> Cow<'_, str> {
    if !s.contains("%u") && !s.contains("%U") {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at + 1..at + 6).and_then(|e| {
            let hex = e.strip_prefix(['u', 'U'])?;
            char::from_u32(u32::from_str_radix(hex, 16).ok()?)
                .filter(|_| hex.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        match escape {
            Some(c) => {
                out.push(c);
                rest = &rest[at + 6..];
            }
            None => {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Whether the parameter spelled `k` is `name` as some app reads parameter names: decoded
/// (`api%5Fkey`, `api%u005Fkey`), cut at a NUL, in any ASCII case (ASP.NET Core), and as PHP mangles names
/// (leading spaces dropped, ` ` `.` and an unmatched `[` read as `_`, `api_key[]` and
/// `[api_key]` (qs, Rack) read as
/// `api_key`, as Rails does too); as Rack 2 reads it (leading `[` and `]` dropped, the name
/// ending at the next bracket: `]api_key`, `[[api_key`, `api_key]`); and as `qs` with
/// `allowDots` reads it (a leading `.` opens a bracket: `.api_key`). So such a spelling is
/// read as the credential (and so is ambiguous beside `api_key`) and stripped like it.
pub fn is_param(k: &str, name: &str) -> bool {
    k == name || ParamName::new(name).matches(k)
}

/// A parameter name as apps read it (see [`is_param`]), made once per query: a query of
/// thousands of parameters (`&&&&…`, sent without a key) then costs a comparison per plain
/// parameter, and a decoding per other one (its readings only when it decodes to at least
/// the name's length): a 14 KB query of 900 escaped names costs 0.5 ms.
struct ParamName(Vec<u8>);

impl ParamName {
    fn new(name: &str) -> Self {
        Self(app_name(name))
    }

    fn matches(&self, k: &str) -> bool {
        // Bytes that decoding, case folding or PHP's mangling change; a name with none of
        // them is read as it is.
        let plain = !k.bytes().any(|b| {
            matches!(b, b'%' | b'+' | b'.' | b' ' | b'[' | b']' | 0) || b.is_ascii_uppercase()
        });
        match plain {
            true => k.as_bytes() == self.0,
            false => {
                // Every reading is at most as long as the decoded name: a shorter one (most
                // of a junk query's `%41%42=`) is out before the readings are built.
                let decoded = decoded_name(k);
                decoded.len() >= self.0.len() && app_names(decoded).contains(&self.0)
            }
        }
    }
}

/// The names apps read the parameter spelled `k` as (see [`is_param`]): PHP's and Rails'
/// ([`app_name`]), Rack 2's, and `qs`'s with `allowDots`; each in lower case.
fn app_names(decoded: Vec<u8>) -> [Vec<u8>; 3] {
    // Rack 2 (`normalize_params`, `/\A[\[\]]*([^\[\]]+)\]*/`): the first run without brackets.
    let rack = decoded
        .split(|&b| b == b'[' || b == b']')
        .find(|run| !run.is_empty())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let dotted = qs_name(&with_dots_as_brackets(&decoded)).to_ascii_lowercase();
    [php_rails_name(decoded), rack, dotted]
}

/// `qs` with `allowDots`: each `.` followed by a run of bytes other than `.` and `[` makes
/// that run a bracket (`/\.([^.[]+)/g` → `[$1]`): `.api_key` is `[api_key]`, `api_key.x`
/// is `api_key[x]`, `.api_key]` is `[api_key]]`.
fn with_dots_as_brackets(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    let mut i = 0;
    // Each run is scanned once, from its dot: linear in the name, however long.
    while i < name.len() {
        let run = match name[i] {
            b'.' => name[i + 1..]
                .iter()
                .take_while(|&&b| b != b'.' && b != b'[')
                .count(),
            _ => 0,
        };
        if run > 0 {
            out.push(b'[');
            out.extend_from_slice(&name[i + 1..i + 1 + run]);
            out.push(b']');
            i += 1 + run;
        } else {
            out.push(name[i]);
            i += 1;
        }
    }
    out
}

/// The top-level name `qs` reads (`parseKeys`): what comes before the first bracket pair
/// holding no bracket, or, when nothing does, what that pair holds (`[api_key]`).
fn qs_name(name: &[u8]) -> &[u8] {
    // From each `[` to the next bracket only: linear in the name, however long.
    let pair = name.iter().enumerate().find_map(|(open, &b)| {
        if b != b'[' {
            return None;
        }
        let inner = &name[open + 1..];
        let close = inner.iter().position(|&c| c == b'[' || c == b']')?;
        (inner[close] == b']').then_some((open, open + 1 + close))
    });
    match pair {
        Some((0, close)) => &name[1..close],
        Some((open, _)) => &name[..open],
        None => name,
    }
}

/// `k` decoded (`%XX` and `%uXXXX`) and cut at a NUL, as every app reads a name first.
/// Escape by escape, as PHP decodes a name: a `%` that starts no escape stays as it is and
/// the others are still decoded (`+_method%00%` is `_method` to PHP), and `+` is a space.
fn decoded_name(k: &str) -> Vec<u8> {
    let mut k = decode_u_escapes(k);
    if k.contains('+') {
        k = Cow::Owned(k.replace('+', " "));
    }
    let mut name: Vec<u8> = percent_encoding::percent_decode_str(&k).collect();
    if let Some(end) = name.iter().position(|&b| b == 0) {
        name.truncate(end);
    }
    name
}

/// The name PHP and Rails read the parameter spelled `k` as.
fn app_name(k: &str) -> Vec<u8> {
    php_rails_name(decoded_name(k))
}

fn php_rails_name(mut name: Vec<u8>) -> Vec<u8> {
    let start = name.iter().take_while(|&&b| b == b' ').count();
    name.drain(..start);
    // `[api_key]=…`: qs (Express's query parser) and Rack read a name in brackets with
    // nothing before them as that name.
    if name.first() == Some(&b'[') {
        if let Some(close) = name.iter().position(|&b| b == b']') {
            name.truncate(close);
            name.remove(0);
        }
    }
    match name.iter().position(|&b| b == b'[') {
        // `api_key[]`, `api_key[x]`: the array `api_key`.
        Some(open) if name[open..].contains(&b']') => name.truncate(open),
        // An unmatched `[` is read as `_`, like a space or a dot.
        _ => {}
    }
    for b in &mut name {
        *b = match *b {
            b' ' | b'.' | b'[' => b'_',
            other => other.to_ascii_lowercase(),
        };
    }
    name
}

/// The name of one `k=v` (or bare `k`) parameter.
fn param_name(pair: &str) -> &str {
    split_pair(pair).0
}

/// One parameter's name and value (none without `=`), split as the most lenient parsers
/// split it: `=` and `?` at its start skipped (Spring WebFlux's and Netty's decoders skip an
/// `=` that starts a pair, so `=api_key=K` is `api_key`; `URLSearchParams` drops a `?` that
/// starts its string, so `??api_key=K` is too), then cut at the first `=`.
fn split_pair(pair: &str) -> (&str, Option<&str>) {
    let pair = pair.trim_start_matches(['=', '?']);
    match pair.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (pair, None),
    }
}

/// Whether `query` holds the `name` parameter, however spelled (see [`is_param`]), `;`
/// separating parameters as in [`strip_query_param`].
pub fn has_query_param(query: &str, name: &str) -> bool {
    let name = ParamName::new(name);
    query
        .split(['&', ';'])
        .any(|pair| name.matches(param_name(pair)))
}

/// How many times `query` (up to a `#`) gives the `name` parameter a value (`name=`),
/// however spelled (see [`is_param`]), `;` separating parameters as `&` does.
pub fn assigns_param(query: &str, name: &str) -> usize {
    let name = ParamName::new(name);
    let query = query.split('#').next().unwrap_or_default();
    query
        .split(['&', ';'])
        .filter_map(|pair| match split_pair(pair) {
            (k, Some(v)) => Some((k, v)),
            (_, None) => None,
        })
        .filter(|(k, _)| name.matches(k))
        .count()
}

/// The values `query` gives the `name` parameter (`name=value`; `&` and `;` separate
/// parameters, and so does `?` when `question_splits`), however spelled (see [`is_param`]),
/// each percent-decoded when `decode` (a value that does not decode is kept as written).
pub fn assigned_values(
    query: &str,
    name: &str,
    question_splits: bool,
    decode: bool,
) -> Vec<Vec<u8>> {
    let name = ParamName::new(name);
    let separators: &[char] = if question_splits {
        &['&', ';', '?']
    } else {
        &['&', ';']
    };
    query
        .split(separators)
        .filter_map(|pair| match split_pair(pair) {
            (k, Some(v)) if name.matches(k) => Some(v),
            _ => None,
        })
        .map(|v| match decode {
            true => percent_decode(v).unwrap_or_else(|| v.as_bytes().to_vec()),
            false => v.as_bytes().to_vec(),
        })
        .collect()
}

/// The values of every `name` parameter in `query`, however spelled (see [`is_param`]),
/// percent-decoded as a form is (`None` for a value that does not decode).
pub fn query_param_values<'q>(
    query: &'q str,
    name: &str,
) -> impl Iterator<Item = Option<Vec<u8>>> + 'q {
    let name = ParamName::new(name);
    query.split(['&', ';']).filter_map(move |pair| {
        let (k, v) = split_pair(pair);
        name.matches(k).then(|| percent_decode(v.unwrap_or("")))
    })
}

/// Remove the `name` parameter, however spelled (see [`is_param`]), from a query string
/// (for forwarding without the key). `;` separates parameters here as `&` does, as some
/// frameworks read it; the separators of what is kept are kept.
pub fn strip_query_param(query: &str, name: &str) -> String {
    let name = ParamName::new(name);
    let mut out = String::with_capacity(query.len());
    let mut sep = "";
    let mut rest = query;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let pair = &rest[..end];
        if !name.matches(param_name(pair)) {
            if !out.is_empty() {
                out.push_str(sep);
            }
            out.push_str(pair);
        }
        if end == rest.len() {
            return out;
        }
        sep = &rest[end..=end];
        rest = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A value of a scheme header that no configured scheme reads counts, whatever it
    /// holds; one a configured scheme reads (any case) does not.
    #[test]
    fn a_value_no_configured_scheme_reads_is_unread() {
        let sources = [
            CredentialSource::Scheme {
                header: http::header::AUTHORIZATION,
                scheme: "Bearer".into(),
            },
            CredentialSource::Scheme {
                header: http::header::AUTHORIZATION,
                scheme: "Token".into(),
            },
            CredentialSource::Header {
                header: http::HeaderName::from_static("x-api-key"),
            },
        ];
        let unread = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, HeaderValue::from_static(value));
            carries_unread_value(&h, &sources)
        };
        for read in ["token K1", "Bearer K1", "BEARER K1"] {
            assert!(!unread(read), "{read}");
        }
        for other in [
            "K2",
            "ApiKey K2",
            "Basic dXNlcjpLMg==",
            "Digest username=\"K2\"",
            "Bearer",
        ] {
            assert!(unread(other), "{other}");
        }
        assert!(!carries_unread_value(&HeaderMap::new(), &sources));
    }

    /// PHP decodes a name escape by escape: an escape that is no escape does not stop the
    /// others (`%00` cuts the name there), and `+` is a space (dropped at the front).
    #[test]
    fn a_name_is_decoded_escape_by_escape() {
        for k in [
            "+api_key%00%",
            "api_key%00%26%",
            "%20api%5Fkey%00%23%",
            "+api.key%00%",
            "api%5Fkey%00%zz",
        ] {
            assert!(is_param(k, "api_key"), "{k}");
        }
        for k in ["+_method%00%", "_method%00%26%", ".method%00%3B%"] {
            assert!(is_param(k, "_method"), "{k}");
        }
        assert!(!is_param("api_key%zz", "api_key"));
    }

    /// Spring WebFlux and Netty skip an `=` that starts a pair; `URLSearchParams` a `?`
    /// that starts its string.
    #[test]
    fn a_pair_is_split_as_the_most_lenient_parser_splits_it() {
        let q = vec![CredentialSource::Query {
            name: "api_key".into(),
        }];
        let h = HeaderMap::new();
        for query in [
            "=api_key=sta_Abcdefgh",
            "==api_key=sta_Abcdefgh",
            "?api_key=sta_Abcdefgh",
            "a=1&=%61pi_key=sta_Abcdefgh",
        ] {
            assert_eq!(
                &*extract(&h, Some(query), &q).unwrap(),
                b"sta_Abcdefgh",
                "{query}"
            );
            assert_eq!(assigns_param(query, "api_key"), 1, "{query}");
            assert!(
                !strip_query_param(query, "api_key").contains("sta_"),
                "{query}"
            );
        }
        assert_eq!(strip_query_param("a=1&=b", "api_key"), "a=1&=b");
    }

    /// A long name costs time in proportion to its length, whatever it holds: one 14 KB
    /// name without a dot or a bracket was scanned once per byte (quadratic).
    #[test]
    fn a_long_name_is_read_in_linear_time() {
        for name in [
            "a".repeat(200_000),
            "[a".repeat(100_000),
            ".a[".repeat(60_000),
        ] {
            let started = std::time::Instant::now();
            assert!(!is_param(&format!("%41{name}"), "api_key"));
            assert!(
                started.elapsed() < std::time::Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
        }
    }

    /// ASP.NET (System.Web), classic ASP and `unescape` read `%uXXXX` as the character.
    #[test]
    fn a_u_escape_in_a_name_is_read_as_its_character() {
        for k in [
            "api%u005Fkey",
            "api%U005fkey",
            "%u0061pi_key",
            "API%u005FKEY",
        ] {
            assert!(is_param(k, "api_key"), "{k}");
        }
        for k in ["api%u005key", "api%uD800key", "api%u", "api%u005Gkey"] {
            assert!(!is_param(k, "api_key"), "{k}");
        }
        assert_eq!(decode_u_escapes("a%u0062c%41"), "abc%41");
        assert_eq!(decode_u_escapes("%u00e9%"), "é%");
    }

    /// `api_key` as Rack 2 and `qs` with `allowDots` spell it.
    const RACK_AND_QS: [&str; 12] = [
        "]api_key",
        "api_key]",
        "[[api_key",
        "[]api_key",
        "]]api_key]]",
        "%5Dapi_key",
        ".api_key",
        "%2Eapi_key",
        ".api_key.x",
        ".api_key]",
        ".api_key]]",
        "api_key.x",
    ];

    /// Rack 2 drops leading brackets and a trailing `]`; `qs` with `allowDots` reads a
    /// leading `.` as a bracket: each is the name at the top of the params to that app.
    #[test]
    fn rack_and_qs_spellings_are_read_as_the_name() {
        for k in RACK_AND_QS {
            assert!(is_param(k, "api_key"), "{k}");
        }
        // Nested under another name, to each of them.
        for k in [
            "x[api_key]",
            "x.api_key",
            "..api_key",
            "api_keys]",
            "[x]api_key",
        ] {
            assert!(!is_param(k, "api_key"), "{k}");
        }
    }

    /// The comparison made once per parameter reads every name as the decoding does.
    #[test]
    fn a_param_name_matches_as_decoded() {
        let spellings = [
            "",
            "api_key",
            "API_KEY",
            "api%5Fkey",
            "api.key",
            "api+key",
            " api_key",
            "api[key",
            "api_key[]",
            "[api_key]",
            "%5Bapi_key%5D",
            "[api_key",
            "api_key\0x",
            "api_keys",
            "api-key",
            "apikey",
            "a",
            "api%zz",
            "api%u005Fkey",
            "api%U005fkey",
            "%u0061pi_key",
            "api%u005",
            "api%uD800key",
            "api%u",
            "..api_key",
            "x.api_key",
            "x[api_key]",
        ];
        for name in ["api_key", "Api.Key", "token"] {
            let want = ParamName::new(name);
            for k in spellings.into_iter().chain(RACK_AND_QS) {
                assert_eq!(
                    want.matches(k),
                    app_names(decoded_name(k)).contains(&app_name(name)),
                    "{name} {k:?}"
                );
            }
        }
    }

    const KEY: &str = "sta_0123456789abcdef";

    fn sources() -> Vec<CredentialSource> {
        crate::config::default_credentials()
    }

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn run(pairs: &[(&'static str, &str)]) -> Result<String, CredentialError> {
        let h = map(pairs);
        extract(&h, None, &sources()).map(|k| String::from_utf8(k.into_owned()).unwrap())
    }

    #[test]
    fn each_source_works() {
        assert_eq!(
            run(&[("authorization", &format!("Token {KEY}"))]).unwrap(),
            KEY
        );
        assert_eq!(
            run(&[("authorization", &format!("bearer {KEY}"))]).unwrap(),
            KEY
        );
        assert_eq!(
            run(&[("authorization", &format!("BEARER {KEY}"))]).unwrap(),
            KEY
        );
        assert_eq!(run(&[("x-api-key", KEY)]).unwrap(), KEY);
    }

    #[test]
    fn missing_and_malformed() {
        assert_eq!(run(&[]), Err(CredentialError::Missing));
        assert_eq!(
            run(&[("authorization", "Basic dXNlcjpwYXNz")]),
            Err(CredentialError::Missing)
        );
        assert_eq!(
            run(&[("authorization", "Bearer")]),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            run(&[("authorization", "Bearer short")]),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            run(&[("authorization", &format!("Bearer {KEY} extra"))]),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            run(&[("authorization", &format!("Bearer  {KEY}"))]),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            run(&[("x-api-key", &"k".repeat(513))]),
            Err(CredentialError::Malformed)
        );
        assert_eq!(run(&[("x-api-key", &"k".repeat(512))]).unwrap().len(), 512);
        assert_eq!(run(&[("x-api-key", "")]), Err(CredentialError::Malformed));
    }

    #[test]
    fn ambiguity_is_refused() {
        assert_eq!(
            run(&[
                ("authorization", &format!("Token {KEY}")),
                ("x-api-key", "sta_other_key_123")
            ]),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            run(&[
                ("authorization", &format!("Token {KEY}")),
                ("authorization", &format!("Token {KEY}"))
            ]),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            run(&[("x-api-key", KEY), ("x-api-key", KEY)]),
            Err(CredentialError::Ambiguous)
        );
        // The same key in two places is not ambiguous.
        assert_eq!(
            run(&[
                ("authorization", &format!("Token {KEY}")),
                ("x-api-key", KEY)
            ])
            .unwrap(),
            KEY
        );
    }

    #[test]
    fn query_source() {
        let h = HeaderMap::new();
        let q = vec![CredentialSource::Query {
            name: "api_key".into(),
        }];
        let k = extract(&h, Some("a=1&api_key=sta_%41bcdefgh"), &q).unwrap();
        assert_eq!(&*k, b"sta_Abcdefgh");
        assert_eq!(
            extract(&h, Some("api_key=a&api_key=b"), &q),
            Err(CredentialError::Ambiguous)
        );
        // A name that decodes to the source's is the same parameter to an app.
        let k = extract(&h, Some("api%5Fkey=sta_Abcdefgh"), &q).unwrap();
        assert_eq!(&*k, b"sta_Abcdefgh");
        assert_eq!(
            extract(&h, Some("api_key=sta_Abcdefgh&api%5fkey=sta_Zbcdefgh"), &q),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            extract(&h, Some("api_key=%zz"), &q),
            Err(CredentialError::Malformed)
        );
        assert_eq!(extract(&h, Some("x=1"), &q), Err(CredentialError::Missing));
        // Present but empty: no credential (and beside a header key, no ambiguity); twice,
        // still two.
        assert_eq!(
            extract(&h, Some("api_key=&x=1"), &q),
            Err(CredentialError::Missing)
        );
        assert_eq!(
            extract(&h, Some("api_key=&api_key=sta_Abcdefgh"), &q),
            Err(CredentialError::Ambiguous)
        );
        // `;` separates parameters as `&` does, as the stripping reads it: a key after one
        // is read, and beside a header key (or another query key) is ambiguous.
        let k = extract(&h, Some("x=1;api_key=sta_Abcdefgh"), &q).unwrap();
        assert_eq!(&*k, b"sta_Abcdefgh");
        let mut both = q.clone();
        both.insert(
            0,
            CredentialSource::Header {
                header: http::HeaderName::from_static("x-api-key"),
            },
        );
        let header = map(&[("x-api-key", KEY)]);
        assert_eq!(
            &*extract(&header, Some("api_key="), &both).unwrap(),
            KEY.as_bytes()
        );
        assert_eq!(
            extract(&header, Some("x=1;api_key=sta_Abcdefgh"), &both),
            Err(CredentialError::Ambiguous)
        );
        assert_eq!(
            extract(&h, Some("api_key=sta_Abcdefgh;API_KEY=sta_Zbcdefgh"), &q),
            Err(CredentialError::Ambiguous)
        );
        // A key followed by `;` is `sta_Abcdefgh;x=1` to an app splitting on `&` alone.
        assert_eq!(
            extract(&h, Some("api_key=sta_Abcdefgh;x=1"), &q),
            Err(CredentialError::Malformed)
        );
        let k = extract(&h, Some("api_key=sta_%2B%25%7e12345"), &q).unwrap();
        assert_eq!(&*k, b"sta_+%~12345", "escapes decode once; `%2B` is a plus");
        for bad in [
            "sta_abc+defgh",
            "sta_abcdefgh%",
            "sta_abcdefgh%4",
            "sta_%+1bcdefgh",
        ] {
            assert_eq!(
                extract(&h, Some(&format!("api_key={bad}")), &q),
                Err(CredentialError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(strip_query_param("a=1&api_key=k&b=2", "api_key"), "a=1&b=2");
        assert_eq!(
            strip_query_param("a=1&api%5Fkey=k&%61pi_key=j&api_keys=2", "api_key"),
            "a=1&api_keys=2"
        );
        // Names as PHP, Rails and old parsers read them; `;` as a separator.
        assert_eq!(
            strip_query_param(
                "api.key=k&api+key=k&api%20key=k&api_key[]=k&api_key%5B%5D=k&api_key%00=k&[api_key]=k&%5BAPI_KEY%5D=k&b=%zz&c=a+b%2Fc;api_key=k;d=1",
                "api_key"
            ),
            "b=%zz&c=a+b%2Fc;d=1"
        );
        assert_eq!(strip_query_param("", "api_key"), "");
        assert_eq!(
            strip_query_param(
                "%20api_key=k&api[key=k&api%5Bkey=k&API_KEY=k&Api_Key=k&api_keys=1&myapi_key=2&api-key=3",
                "api_key"
            ),
            "api_keys=1&myapi_key=2&api-key=3"
        );
        assert_eq!(strip_query_param("api_key=k", "api_key"), "");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 1024,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn prop_accepted_keys_are_one_visible_ascii_token(
            auth in proptest::collection::vec(0x20u8..0x7f, 0..600),
            api in proptest::option::of(proptest::collection::vec(0x09u8..0xff, 0..600)),
            query in proptest::option::of("[a-z_=&%0-9A-F+]{0,64}"),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&auth) {
                h.insert("authorization", v);
            }
            if let Some(Ok(v)) = api.as_deref().map(HeaderValue::from_bytes) {
                h.insert("x-api-key", v);
            }
            let mut all = sources();
            all.push(CredentialSource::Query { name: "api_key".into() });
            if let Ok(k) = extract(&h, query.as_deref(), &all) {
                proptest::prop_assert!((MIN_KEY_LEN..=MAX_KEY_LEN).contains(&k.len()));
                proptest::prop_assert!(k.iter().all(|b| (0x21..0x7f).contains(b)));
            }
        }

        #[test]
        fn prop_scheme_is_case_insensitive_and_token_exact(
            key in "[!-~]{8,64}",
            upper in proptest::collection::vec(proptest::bool::ANY, 6),
        ) {
            let scheme: String = "bearer"
                .chars()
                .zip(&upper)
                .map(|(c, u)| if *u { c.to_ascii_uppercase() } else { c })
                .collect();
            let got = run(&[("authorization", &format!("{scheme} {key}"))]);
            proptest::prop_assert_eq!(got, Ok(key.clone()));
            let padded = run(&[("authorization", &format!("{scheme} {key} "))]);
            proptest::prop_assert_eq!(padded, Err(CredentialError::Malformed));
        }
    }
}
