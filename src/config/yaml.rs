//! YAML and field parsing shared by every section: [`parse_yaml`] with the failing field's
//! path, durations, header names and methods.
//!
//! serde_yaml is deprecated upstream, so it is only ever called from [`parse_yaml`]: swapping
//! it for a maintained YAML crate touches this one function.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, Method};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A document that does not deserialize: where in it (`limits.upstream_timeout`) and why.
#[derive(Debug)]
pub struct YamlError {
    path: String,
    source: serde_yaml::Error,
}

impl YamlError {
    /// The dotted path of the failing field (`.` or empty for the document itself).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The path and the message may hold a secret pasted into the wrong field.
        f.write_str(&super::redact(&locate(&self.path, self.source.to_string())))
    }
}

impl std::error::Error for YamlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Deserialize YAML (JSON is a subset) reporting the dotted path of a failing field.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    // YAML allows a byte order mark at the start, and editors on Windows write one; parsed
    // as text, it made the first field name another ("missing field `environment`").
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| YamlError {
        path: e.path().to_string(),
        source: e.into_inner(),
    })
}

/// An error message led by where in the document it is (`keys[3].scopes: ...`), once:
/// serde_yaml's own message often starts with the same path already, or a shorter one
/// (custom errors, unknown fields): the exact one takes its place.
pub fn located(path: &serde_path_to_error::Path, e: &impl std::fmt::Display) -> String {
    locate(&path.to_string(), e.to_string())
}

/// `message` prefixed with `path` unless it already starts with it; the one shape of a
/// located error, for the config's errors and the snapshot's.
pub(crate) fn locate(path: &str, message: String) -> String {
    let split = message.split_once(": ");
    let named = split.is_some_and(|(head, _)| head == path);
    if path.is_empty() || path == "." || named {
        return message;
    }
    // serde_yaml names a list (`a.b`) where the exact path has the item (`a.b[1]`), or a
    // section (`limits`) where it has the field (`limits.upstream_timeout`).
    if let Some((head, rest)) = split {
        if path
            .strip_prefix(head)
            .is_some_and(|i| i.starts_with(['[', '.']))
        {
            return format!("{path}: {rest}");
        }
    }
    format!("{path}: {message}")
}

pub(super) fn one_second() -> Duration {
    Duration::from_secs(1)
}

/// A duration as the config writes them: whole numbers, each with a unit of `ms`, `s`, `m`,
/// `h` or `d`, one after the other (`10s`, `250ms`, `1h30m`). Nothing else: a general parser
/// read `90M` as 90 months (a `keys.max_age` that never fails closed) and `1y` as a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("{s:?} is not a duration: whole numbers with units ms, s, m, h or d, like 10s, 250ms or 90m")
    };
    let text = s.trim();
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let unit_len = rest[digits..]
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        if digits == 0 || unit_len == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = match &rest[digits..digits + unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        let part = u32::try_from(n)
            .ok()
            .and_then(|n| unit.checked_mul(n))
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = &rest[digits + unit_len..];
    }
    if total > MAX_DURATION {
        return Err(format!(
            "{s:?} is longer than 3650d, the longest duration keyward takes"
        ));
    }
    Ok(total)
}

/// The longest duration any setting takes (ten years): a deadline is `now` plus it, and
/// one past what a clock holds (`4294967295d` parsed) panicked on the first request.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

pub(super) fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

pub(super) fn de_opt_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

pub(super) fn de_header_names<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<HeaderName>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|n| {
            HeaderName::try_from(n.to_ascii_lowercase())
                .map_err(|_| serde::de::Error::custom(format!("{n:?} is not a header name")))
        })
        .collect()
}

/// A mapping whose keys are unique: serde's own map reading lets a repeated key replace
/// the first silently (a templated config listing `sta_:` twice would widen or narrow
/// what the prefix admits without a word), while a repeated struct field is refused.
pub(super) fn de_unique_map<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(k) = a.next_key::<String>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom("the same key is listed twice"));
                }
                let v = a.next_value()?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}

pub(super) fn de_methods<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Method>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| serde::de::Error::custom(format!("{m:?} is not an HTTP method")))
        })
        .collect()
}
