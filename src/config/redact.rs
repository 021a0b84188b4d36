//! Parser messages made fit to show: they go into logs, into the answer to a push and onto
//! an operator's terminal, and must never carry the document (or a secret pasted into it)
//! with them, nor a line break or a control character that forges a log line.
//!
//! A parser quotes what it read in two ways: a value in double quotes, escaped as Rust's
//! `{:?}` escapes it (so its end is found exactly), and a name in back-quotes, written
//! raw (so a name holding a back-quote has no findable end). Quoted values are therefore
//! cut out whole, and then every word is shown only when it is plainly not a secret: a
//! field name or a word of the parser's own, a number, a path to a field. Everything else
//! (a pasted key, a digest, anything with a quote, a control character or a non-ASCII
//! letter in it) is shown as `…`.

/// How long an error message about a document may be: it goes into logs and into the
/// answer to a push, and must never carry the document with it.
pub const MAX_ERROR_CHARS: usize = 200;

/// The longest word shown: a field or variant name (`enterprise_service_account`). A
/// generated key is longer (43 characters and more), a digest is 64.
const MAX_WORD: usize = 32;

/// A message about a key snapshot, where keys live: [`redact`], then also every word the
/// parser echoed from the document of 8 characters or more (a key's least) and every word
/// of that length that mixes case (generated keys do), cut to [`MAX_ERROR_CHARS`]. A typo
/// of a field name that long is not shown either: the path and line say where it is.
pub fn excerpt(message: &str) -> String {
    let mut out = redact_with(message, true);
    if let Some((cut, _)) = out.char_indices().nth(MAX_ERROR_CHARS) {
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// `message` with every quoted value and every word that may be one replaced by `…`, and
/// its white space (line breaks included) made single spaces.
pub fn redact(message: &str) -> String {
    redact_with(message, false)
}

/// [`redact`]; `strict` for a key snapshot's messages (see [`excerpt`]).
fn redact_with(message: &str, strict: bool) -> String {
    let message = cut_document_words(message, strict);
    let unquoted = cut_quoted_values(&message);
    let mut out = String::with_capacity(unquoted.len());
    for word in unquoted.split_whitespace() {
        let hidden = strict && mixes_case(word);
        let shown = if !hidden && is_shown(word) {
            word
        } else {
            "…"
        };
        if shown == "…" && out.ends_with('…') {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(shown);
    }
    out
}

/// Every `"…"` value replaced by `"…"` unless it is a number, a time or a URL path
/// (`"/admin/*"`); its end is found past `\"` and `\\` escapes, and an unterminated one
/// runs to the end. A name-like value is cut too: a parser quotes what the document holds,
/// and a short key pasted in the wrong field (`scopes: "sta_live_x"`) looks like a name.
fn cut_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find('"') {
        out.push_str(&rest[..=at]);
        let inner = &rest[at + 1..];
        let Some(len) = closing_quote(inner) else {
            out.push('…');
            return out;
        };
        let value = &inner[..len];
        let plain = !value.is_empty()
            && !value.contains(['\\', '"'])
            && value.is_ascii()
            && (is_amount(value) || is_time(value) || is_url_path(value));
        out.push_str(if plain { value } else { "…" });
        out.push('"');
        rest = &inner[len + 1..];
    }
    out.push_str(rest);
    out
}

/// What a parser echoes from the document in back-quotes, a name or a number it did not
/// expect: `unknown field `X``, `unknown variant `X``, `integer `N``. Any of 8 characters or
/// more (a key's least) is cut wherever it appears, the path to the error included (the
/// path names an unknown map key too); shorter ones are no key, and help a typo. In a
/// config's messages a name is kept when it is a typo of a name the parser expected
/// ([`is_typo_of_expected`]), which a key pasted as a field name or a value never is, or
/// when it does not look like a key ([`looks_like_a_key`]: `listen_port`).
const DOCUMENT_WORDS: [&str; 4] = [
    "unknown field `",
    "unknown variant `",
    "integer `",
    "floating point `",
];

fn cut_document_words(message: &str, strict: bool) -> std::borrow::Cow<'_, str> {
    let mut words: Vec<&str> = Vec::new();
    for marker in DOCUMENT_WORDS {
        let is_name = marker.starts_with("unknown");
        for (at, _) in message.match_indices(marker) {
            let rest = &message[at + marker.len()..];
            if let Some(end) = rest.find('`') {
                let word = &rest[..end];
                let shown = !strict
                    && is_name
                    && (is_typo_of_expected(word, message) || !looks_like_a_key(word));
                if word.chars().count() >= 8 && !shown {
                    words.push(word);
                }
            }
        }
    }
    if words.is_empty() {
        return std::borrow::Cow::Borrowed(message);
    }
    let mut out = message.to_string();
    for word in words {
        out = out.replace(word, "…");
    }
    std::borrow::Cow::Owned(out)
}

/// A name a config's parser echoed that may be a pasted key rather than an invented field
/// name (`listen_port`): mixed case (generated keys), four digits or more, 24 characters
/// or more, or a short prefix and a long rest (`sta_bluecheesemoonwalk_live`).
fn looks_like_a_key(word: &str) -> bool {
    let digits = word.bytes().filter(u8::is_ascii_digit).count();
    let prefixed = word.split_once('_').is_some_and(|(head, rest)| {
        (2..=4).contains(&head.len())
            && head.bytes().all(|b| b.is_ascii_lowercase())
            && rest.len() >= 12
    });
    mixes_case(word) || digits >= 4 || word.len() >= 24 || prefixed
}

/// `word` is a few edits from one of the names the message says were expected (serde's
/// `expected one of `a`, `b``, `expected `json` or `pretty``): an operator's typo, worth
/// showing. A key (random, 8 characters and more) is never that close to a schema name.
fn is_typo_of_expected(word: &str, message: &str) -> bool {
    let Some((_, expected)) = message.split_once("expected ") else {
        return false;
    };
    let near = |name: &str| {
        let edits = strsim::damerau_levenshtein(word, name);
        edits <= 2.max(name.len() / 5)
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .any(|name| !name.is_empty() && near(name))
}

/// Where the quoted value `s` (after its opening quote) ends, past escapes.
fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// Punctuation a parser puts around a name, a number or a path (and the `…` put for a
/// value cut out).
const AROUND: &[char] = &['`', '\'', '"', ',', ':', ';', '(', ')', '.', '…'];

/// Whether `word` is plainly not a value from the document: punctuation alone, or around a
/// core that is ASCII without a quote in it and is a number, a number with a unit
/// (`250ms`) or a dotted path of names (`keys[3].scopes`).
fn is_shown(word: &str) -> bool {
    let core = word.trim_matches(AROUND);
    // Punctuation alone (`'-'`, `~`, `->`): too short to be a key, and not made of one.
    if core.len() <= 4 && core.chars().all(|c| c.is_ascii_punctuation()) {
        return true;
    }
    core.is_ascii()
        && !core.contains(['`', '"', '\\'])
        && (is_amount(core)
            || is_time(core)
            || is_url_path(core)
            || is_scheme(core)
            || core.split('.').all(is_segment))
}

/// A word of 8 characters or more that mixes case: a key (8 bytes at least) as generated
/// keys are (`sta_live_ABCDEF123` reads as a field name otherwise). Schema names are lower
/// case; environment variables (`KEYWARD_CONFIG`) and acronyms are upper case.
fn mixes_case(word: &str) -> bool {
    let core = word.trim_matches(AROUND);
    core.len() >= 8
        && core.bytes().any(|b| b.is_ascii_uppercase())
        && core.bytes().any(|b| b.is_ascii_lowercase())
        && !is_time(core)
}

/// `http://`, `rediss://`: a URL scheme as a message names it.
fn is_scheme(s: &str) -> bool {
    s.strip_suffix("://").is_some_and(|name| {
        !name.is_empty() && name.len() <= 8 && name.bytes().all(|b| b.is_ascii_lowercase())
    })
}

/// `2026-01-01T00:00:00Z`: a time as examples and limits are written (a date first:
/// `dddd-dd-dd`, so a key of digits and dashes is not one).
fn is_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b"-:TZ.+".contains(&b))
}

/// `/admin/`, `/v1/items`: a path whose every segment is a name (a route, a listener's
/// introspection path).
fn is_url_path(s: &str) -> bool {
    s.starts_with('/')
        && s.split('/')
            .all(|seg| seg.is_empty() || seg == "*" || is_segment(seg))
}

/// `12`, `250ms`, `1m`: a number, at most a two-letter unit after it.
fn is_amount(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let unit = &s[digits..];
    (1..=12).contains(&digits) && unit.len() <= 2 && unit.bytes().all(|b| b.is_ascii_lowercase())
}

/// One step of a path: a name (`scopes`, `x-api-key`, `sha256`) with list indexes after it
/// (`keys[3]`), or a bare number.
fn is_segment(s: &str) -> bool {
    let name = s.split('[').next().unwrap_or_default();
    let indexes = &s[name.len()..];
    let indexed = indexes.split_terminator(']').all(|i| {
        i.strip_prefix('[')
            .is_some_and(|n| (1..=9).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
    });
    indexed && (is_name(name) || (name.is_empty() && !indexes.is_empty()) || is_amount(name))
}

/// A name as schemas spell them: letters, digits (three at most: `sha256`, `http1_server`),
/// `_` and `-`, led by a letter or `_`, at most [`MAX_WORD`] long. A generated key or a
/// digest is not one.
fn is_name(s: &str) -> bool {
    // `keyward's`: the message's own English.
    let s = s.strip_suffix("'s").unwrap_or(s);
    s.len() <= MAX_WORD
        && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.bytes().filter(u8::is_ascii_digit).count() <= 3
}

/// A file path from the config as a message shows it: as given, unless it is plainly not a
/// path but something pasted in its place, a secret as likely as not (a PEM key inline in
/// `tls.key`, a key in `keys.file`): a line break or another control character, a PEM
/// armour line, more than 1024 bytes, or a last component that looks like a key. Such a
/// path is shown as `…`.
pub fn shown_path(path: &std::path::Path) -> String {
    let text = path.display().to_string();
    let last = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pasted = text.chars().any(char::is_control)
        || text.contains("-----")
        || text.len() > 1024
        || (!last.contains('.') && last.len() >= 8 && looks_like_a_key(&last));
    if pasted {
        "…".to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sta_demo_service_key_0123456789abcdef";
    const DIGEST: &str = "c6ffcb30297a172f564779bcdcf7d47394ea14a71fcc078d857361dc65a8bf7e";

    #[test]
    fn names_numbers_and_paths_are_shown() {
        for message in [
            "unknown field `colour`, expected `keys`",
            "keys[3].scopes: invalid type: integer `7`, expected a sequence",
            "unknown variant `x`, expected one of `service_account`, `enterprise_service_account`",
            "keys[0].sha256: did not find expected '-' indicator at line 3 column 5",
            "limits.upstream_timeout: invalid type: string \"…\", expected a duration like 10s or 250ms",
            "x-api-key: EOF while parsing a value at line 1 column 12",
            "http1_server: unknown variant `nginx`, expected `fast` or `hyper`",
            "routes[1]: is never reached: routes[0] (prefix /admin/) matches every path it does first",
            "generated_at: is not an RFC 3339 time like 2026-01-01T00:00:00Z",
            "upstream: is keyward's own `listen`: every request would loop back in",
            "upstream: must be an http:// URL (the app on loopback)",
            "credentials[0].query: a parameter name is letters, digits, '-', '.', '_' and '~'",
            "routes[0].prefix: \"/admin/*\": `*` is not a wildcard here",
        ] {
            assert_eq!(redact(message), message);
        }
    }

    #[test]
    fn quoted_values_go_whole_even_with_escaped_quotes_inside() {
        assert_eq!(
            redact(r#"invalid type: string "nope", expected u64"#),
            r#"invalid type: string "…", expected u64"#
        );
        let short_key =
            r#"keys[0].scopes: invalid type: string "sta_live_SUPERSECRET", expected a sequence"#;
        assert!(
            !redact(short_key).contains("SUPERSECRET"),
            "{}",
            redact(short_key)
        );
        assert_eq!(
            redact(r#"x: "250ms" "/v1/items" "2026-01-01T00:00:00Z""#),
            r#"x: "250ms" "/v1/items" "2026-01-01T00:00:00Z""#
        );
        let escaped = format!(
            r#"invalid type: string "{{\"sha256\": \"{DIGEST}\", \"id\": \"k\"}}", expected a key"#
        );
        assert_eq!(
            redact(&escaped),
            r#"invalid type: string "…", expected a key"#
        );
        let back = format!(r#"invalid value: string "a\\" {KEY} \\"", expected u64"#);
        assert!(!redact(&back).contains(KEY), "{}", redact(&back));
        assert_eq!(redact("cut \"open"), "cut \"…");
        let spaced = r#"invalid type: string "my secret key", expected u64"#;
        assert_eq!(redact(spaced), r#"invalid type: string "…", expected u64"#);
    }

    #[test]
    fn anything_that_may_be_a_secret_or_forge_a_line_is_not_shown() {
        for (message, leak) in [
            (format!("unknown field `a`{KEY}`, expected `keys`"), KEY),
            (format!("unknown field `{DIGEST}`"), DIGEST),
            (
                "unknown field `0123456789abcdef0123456789abcdef`".into(),
                "0123456789abcdef",
            ),
            (
                format!(
                    "snapshot.{}.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB: x",
                    "A".repeat(40)
                ),
                "AAAA",
            ),
            (
                "unknown field `x\n2026 INFO keyward: FORGED\u{1b}[31m`".into(),
                "\u{1b}",
            ),
            ("unknown field `sécret_with_accent`".into(), "sécret"),
        ] {
            let shown = redact(&message);
            assert!(!shown.contains(leak), "{shown}");
            assert!(!shown.contains(['\n', '\r']), "{shown}");
        }
    }

    #[test]
    fn a_short_key_that_mixes_case_is_not_shown_as_a_name() {
        for (message, leak) in [
            (
                "snapshot: keys[0].sta_live_ABCDEF123: unknown field `sta_live_ABCDEF123`, expected `id`",
                "ABCDEF",
            ),
            ("log.format: unknown variant `sta_live_ABCDEF123`, expected `json`", "ABCDEF"),
            ("unknown field `xoxb-AbCdEfGhIjKl-MnOpQrStUv`", "AbCd"),
            ("unknown field `sk.AbcdEfghIjkl.UvwxYzAbcd`", "Abcd"),
        ] {
            let shown = excerpt(message);
            assert!(!shown.contains(leak), "{shown}");
        }
        assert_eq!(
            excerpt("unknown field `colour`, expected `keys`"),
            "unknown field `colour`, expected `keys`"
        );
        // A config's messages keep a typo of a field's name.
        let typo = "limits.max_conections: unknown field `max_conections`, expected one of `max_headers`, `max_connections`";
        assert_eq!(redact(typo), typo);
    }

    #[test]
    fn a_config_shows_an_unknown_name_only_when_it_is_a_typo_of_an_expected_one() {
        for (message, leak) in [
            (
                "log.format: unknown variant `pat_Q7wErTyUiOpAsDfGhJkLzXcVb`, expected `json` or `pretty`",
                "Q7wEr",
            ),
            (
                "sta_bluecheesemoonwalk_live: unknown field `sta_bluecheesemoonwalk_live`, expected one of `listen`, `upstream`, `upstream_client`",
                "bluecheese",
            ),
            ("unknown field `sta_bluecheesemoonwalk_live`", "bluecheese"),
        ] {
            let shown = redact(message);
            assert!(!shown.contains(leak), "{shown}");
        }
        let typo = "upstram_client: unknown field `upstram_client`, expected one of `listen`, `upstream_client`";
        assert_eq!(redact(typo), typo);
        let invented = "listen_port: unknown field `listen_port`, expected one of `listen`";
        assert_eq!(redact(invented), invented);
        let typo = "log.format: unknown variant `prety`, expected `json` or `pretty`";
        assert_eq!(redact(typo), typo);
    }

    #[test]
    fn words_the_parser_echoes_from_the_document_are_cut_in_one_case_or_any() {
        for (message, leak) in [
            (
                "snapshot: keys[0].sta_livesecretkeyabcdefgh: unknown field `sta_livesecretkeyabcdefgh`, expected `id`",
                "livesecret",
            ),
            ("log.format: unknown variant `supersecretpass`, expected `json` or `pretty`", "supersecret"),
            ("unknown field `STA_LIVESECRETKEYABCDEFGH`", "LIVESECRET"),
            ("unknown field `sk.abcdefghijklmnopqrstuvwxyz.abcdefghijklmnopqrstuvwxyz.abc123`", "abcdefghij"),
            ("keys[0].scopes: invalid type: integer `123456789012`, expected a sequence", "123456789012"),
            (r#"invalid type: string "2024-1234-5678-9012", expected f64"#, "5678"),
        ] {
            let shown = excerpt(message);
            assert!(!shown.contains(leak), "{shown}");
        }
        // Short ones are no key, and help a typo.
        assert_eq!(
            excerpt("unknown field `colour`, expected `keys`"),
            "unknown field `colour`, expected `keys`"
        );
        assert_eq!(
            excerpt("expected `service_account`"),
            "expected `service_account`"
        );
    }

    #[test]
    fn a_path_is_shown_unless_something_else_was_pasted_in_its_place() {
        use std::path::Path;
        for shown in [
            "/etc/keyward/tls/tls.key",
            "config/keys.yaml",
            "/var/lib/keyward/kept.yaml",
        ] {
            assert_eq!(shown_path(Path::new(shown)), shown);
        }
        for pasted in [
            "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n",
            "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg",
            "sta_bluecheesemoonwalk_live",
            "/etc/keyward/pat_Q7wErTyUiOpAsDfGhJkLzXcVb",
        ] {
            assert_eq!(shown_path(Path::new(pasted)), "…", "{pasted}");
        }
    }

    #[test]
    fn an_excerpt_is_cut_short() {
        let long = "word ".repeat(500);
        assert_eq!(excerpt(&long).chars().count(), MAX_ERROR_CHARS + 1);
        assert_eq!(excerpt(&"é".repeat(500)), "…");
    }
}
