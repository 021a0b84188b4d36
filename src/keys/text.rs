//! [`Text`]: a checked identity value, held as the header value it is sent as.

use std::fmt;

use http::HeaderValue;
use serde::Serialize;

/// A checked identity value (visible ASCII), stored once as the header value it is sent as,
/// so a key holds no second copy of its identity for the headers.
#[derive(Clone, PartialEq, Eq)]
pub struct Text(HeaderValue);

/// Hashed as its text, so maps keyed by `Text` can be searched with a `&str`.
impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Text {
    /// `s` must already be checked (visible ASCII); the buffer is moved, not copied.
    pub(super) fn new(s: Box<str>) -> Text {
        let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(s.into_boxed_bytes()))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Text(v)
    }

    /// For tests: `s` must be visible ASCII.
    #[cfg(test)]
    pub(crate) fn for_test(s: &str) -> Text {
        Text::new(s.into())
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
