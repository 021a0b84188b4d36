//! Path normalization (SPEC 7): the path is normalized once, and that one string is both
//! authorized and forwarded, so no spelling of a path can reach the upstream un-checked.

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
    #[error("'..' above the root")]
    AboveRoot,
}

/// Normalize an origin-form path (no query):
/// percent-decode unreserved characters (and upper-case the hex of the rest), merge
/// repeated slashes, and remove dot segments as in RFC 3986 5.2.4 — refusing anything
/// an upstream could read differently (encoded separators, `\`, `;`, NUL, `..` above root).
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path.as_bytes())?;
    remove_dot_segments(&decoded)
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
                    _ => {
                        out.push('%');
                        out.push(HEX[usize::from(hi)] as char);
                        out.push(HEX[usize::from(lo)] as char);
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter),
            b'#' => return Err(PathError::Fragment),
            0..=0x20 | 0x7f..=0xff => return Err(PathError::Control),
            _ => {
                out.push(b as char);
                i += 1;
            }
        }
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        normalize(p).unwrap_or_else(|e| panic!("{p}: {e}"))
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
        assert_eq!(ok("/a/..."), "/a/...");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/x/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/x/%2E./admin"), "/admin");
        assert_eq!(ok("/a%7eb"), "/a~b");
        assert_eq!(ok("/a%3fb"), "/a%3Fb");
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
        assert_eq!(normalize("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/../../admin"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/%2e%2e/admin"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/admin;x=1"), Err(PathError::PathParameter));
        assert_eq!(normalize("/admin%3bx"), Err(PathError::PathParameter));
        assert_eq!(normalize("/a\\admin"), Err(PathError::Backslash));
        assert_eq!(normalize("/a#frag"), Err(PathError::Fragment));
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalize("/a\u{1}"), Err(PathError::Control));
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
}
