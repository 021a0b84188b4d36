//! Snapshots built entry by entry as they are read: each parsed entry becomes a key at once,
//! so a load never holds every parsed entry as well as the keys (entries take more memory
//! than the keys they become). Small documents are read this way whole, large ones run by
//! run on every core (`runs`).

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::snapshot::{build_entry, Format, Key, KeyDoc, Meta, ScopeCache, SnapshotError};

/// A snapshot's own fields (`version`, `generated_at`) and its keys, built.
pub type Built = (Meta, Vec<Arc<Key>>);

/// A snapshot read whole, on the calling thread, in `format` (what a streamed read falls
/// back to, see `runs`).
pub fn parse_whole(text: &str, format: Format) -> Result<Built, SnapshotError> {
    match format {
        Format::Json => parse_json(text),
        Format::Yaml => parse_yaml(text),
    }
}

/// A JSON snapshot's `version` and its keys, built. A refused entry is reported as
/// [`SnapshotError::Entry`] naming it.
pub fn parse_json(text: &str) -> Result<Built, SnapshotError> {
    let mut refused = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let doc = Doc {
        refused: &mut refused,
    };
    let parsed = doc
        .deserialize(&mut de)
        .and_then(|doc| de.end().map(|()| doc));
    outcome(parsed.map_err(|e| e.to_string()), refused)
}

/// A YAML snapshot read whole, the same way; a syntax or type error names where it is
/// (`keys[3].scopes: invalid type ...`).
pub fn parse_yaml(text: &str) -> Result<Built, SnapshotError> {
    let mut refused = None;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(
        serde_yaml::Deserializer::from_str(text),
        &mut track,
    );
    let doc = Doc {
        refused: &mut refused,
    };
    let parsed = doc.deserialize(de);
    outcome(
        parsed.map_err(|e| crate::config::located(&track.path(), &e)),
        refused,
    )
}

/// A refused entry, when there was one, is the error: the deserializer's own only says that
/// one was refused.
fn outcome(
    parsed: Result<Built, String>,
    refused: Option<SnapshotError>,
) -> Result<Built, SnapshotError> {
    match (parsed, refused) {
        (_, Some(entry)) => Err(entry),
        (Ok(built), None) => Ok(built),
        (Err(e), None) => Err(SnapshotError::Parse(e)),
    }
}

/// The document, with where the first refused entry is kept while serde unwinds.
struct Doc<'a> {
    refused: &'a mut Option<SnapshotError>,
}

impl<'de> DeserializeSeed<'de> for Doc<'_> {
    type Value = Built;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

const FIELDS: &[&str] = &["version", "generated_at", "keys"];

impl<'de> Visitor<'de> for Doc<'_> {
    type Value = Built;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a snapshot with `version` and `keys`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut version, mut keys, mut generated_at) = (None, None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Version if version.is_some() => {
                    return Err(de::Error::duplicate_field("version"))
                }
                Field::Keys if keys.is_some() => return Err(de::Error::duplicate_field("keys")),
                Field::GeneratedAt if generated_at.is_some() => {
                    return Err(de::Error::duplicate_field("generated_at"))
                }
                Field::Version => version = Some(map.next_value::<Option<u64>>()?),
                Field::GeneratedAt => generated_at = Some(map.next_value::<Option<String>>()?),
                Field::Keys => {
                    keys = Some(map.next_value_seed(Entries {
                        offset: 0,
                        refused: &mut *self.refused,
                    })?)
                }
            }
        }
        let meta = Meta::new(version.flatten(), generated_at.flatten().as_deref())
            .map_err(de::Error::custom)?;
        Ok((meta, keys.unwrap_or_default()))
    }
}

/// A field of the document; anything else is refused, as `SnapshotDoc` refuses it.
enum Field {
    Version,
    GeneratedAt,
    Keys,
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`version` or `keys`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                match v {
                    "version" => Ok(Field::Version),
                    "generated_at" => Ok(Field::GeneratedAt),
                    "keys" => Ok(Field::Keys),
                    other => Err(E::unknown_field(other, FIELDS)),
                }
            }
        }
        d.deserialize_identifier(Name)
    }
}

/// A list of snapshot entries, each checked and built as soon as it is parsed. The first
/// refused entry is kept in `refused` (the deserializer's own error only says that one was).
pub struct Entries<'a> {
    /// The first entry's index in the whole `keys` list.
    pub offset: usize,
    pub refused: &'a mut Option<SnapshotError>,
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = Vec<Arc<Key>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = Vec<Arc<Key>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of keys")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut keys = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        let mut scopes = ScopeCache::default();
        while let Some(doc) = seq.next_element::<KeyDoc>()? {
            match build_entry(self.offset + keys.len(), doc, &mut scopes) {
                Ok(key) => keys.push(key),
                Err(entry) => {
                    *self.refused = Some(entry);
                    return Err(de::Error::custom("refused entry"));
                }
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::snapshot::{digest, SnapshotDoc};

    fn item(id: &str, secret: &str) -> String {
        let sha = hex::encode(digest(secret.as_bytes()));
        format!(
            r#"{{"id": "{id}", "sha256": "{sha}", "type": "personal", "subject_id": "s-{id}", "account_id": "a", "scopes": ["read"]}}"#
        )
    }

    fn doc(items: &[String]) -> String {
        format!(r#"{{"version": 7, "keys": [{}]}}"#, items.join(", "))
    }

    #[test]
    fn builds_the_same_keys_as_the_parsed_document() {
        let items: Vec<_> = (0..50)
            .map(|i| item(&format!("k{i}"), &format!("secret-{i}")))
            .collect();
        let text = doc(&items);
        let (version, keys) = parse_json(&text).unwrap();
        let whole: SnapshotDoc = serde_json::from_str(&text).unwrap();
        assert_eq!(version.version, Some(7));
        assert_eq!(keys.len(), whole.keys.len());
        for (k, d) in keys.iter().zip(&whole.keys) {
            assert_eq!(*k.id, *d.id);
            assert_eq!(hex::encode(k.digest()), *d.sha256);
            assert!(k.scopes().iter().eq(d.scopes.iter()));
        }
        // JSON is YAML too: the YAML reader builds the same keys.
        let (yaml_version, from_yaml) = parse_yaml(&text).unwrap();
        assert_eq!(yaml_version, version);
        assert!(keys
            .iter()
            .zip(&from_yaml)
            .all(|(a, b)| a.id == b.id && a.digest() == b.digest()));
        assert_eq!(parse_json(r#"{"keys": []}"#).unwrap().1.len(), 0);
        let (version, keys) = parse_json("{}").unwrap();
        assert!(version.version.is_none() && keys.is_empty());
    }

    #[test]
    fn a_refused_entry_is_named_and_stops_the_read() {
        let bad = item("k1", "x").replace("personal", "robot");
        let text = doc(&[item("k0", "a"), bad, "not json at all".into()]);
        match parse_json(&text) {
            Err(SnapshotError::Entry {
                index, id, field, ..
            }) => assert_eq!((index, id.as_str(), field), (1, "k1", "type")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn anything_but_a_snapshot_is_a_parse_error() {
        for text in [
            r#"{"keys": [], "extra": 1}"#,
            r#"{"keys": [], "keys": []}"#,
            r#"{"keys": null}"#,
            r#"{"keys": [{"id": 5}]}"#,
            r#"{"keys": []} trailing"#,
            r#"["keys"]"#,
            r#"{"keys": ["#,
        ] {
            assert!(
                matches!(parse_json(text), Err(SnapshotError::Parse(_))),
                "{text}"
            );
        }
    }
}
