//! Parser messages made fit to show: they go into logs and into the answer to a push, and
//! must never carry the document (or a secret in it) with them.

use std::fmt;

/// How long an error message about a document may be: it goes into logs and into the
/// answer to a push, and must never carry the document with it.
pub const MAX_ERROR_CHARS: usize = 200;

/// `message` fit to show: every double-quoted value replaced by `"…"` (a value the parser
/// quotes may be a pasted raw key or digest), back-quoted names longer than 32 characters
/// likewise, and the whole cut to [`MAX_ERROR_CHARS`].
pub fn excerpt(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_ERROR_CHARS + 4));
    let mut rest = message;
    while let Some(at) = rest.find(['"', '`']) {
        out.push_str(&rest[..at]);
        let quote = &rest[at..at + 1];
        let after = &rest[at + 1..];
        let Some(len) = after.find(quote) else {
            out.push_str(quote);
            out.push('…');
            rest = "";
            break;
        };
        let inner = &after[..len];
        out.push_str(quote);
        out.push_str(if quote == "`" && inner.chars().count() <= 32 {
            inner
        } else {
            "…"
        });
        out.push_str(quote);
        rest = &after[len + 1..];
        if out.len() > MAX_ERROR_CHARS * 4 {
            break;
        }
    }
    out.push_str(rest);
    match out.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => {
            out.truncate(cut);
            out.push('…');
            out
        }
        None => out,
    }
}

/// The error with where it is (`keys[3].scopes: ...`), as the config's errors are; a
/// segment of the path is a name from the document, so a long one is not echoed.
pub(super) fn located(path: &serde_path_to_error::Path, e: &impl fmt::Display) -> String {
    let path: Vec<String> = path
        .to_string()
        .split('.')
        .map(|s| {
            if s.chars().count() > 32 {
                "…".into()
            } else {
                s.to_string()
            }
        })
        .collect();
    crate::config::locate(&path.join("."), e.to_string())
}
