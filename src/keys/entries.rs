//! The snapshot document as serde reads it: one definition ([`Doc`]) used by every
//! loader, each entry of `keys` validated and built into its key as soon as it is
//! deserialized (a load never holds every parsed entry, which takes more memory than the
//! keys they become).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::error::SnapshotError;
use super::key::{Digest, Key};
use super::schema::Meta;
use super::scopes::ScopeCache;
use super::secret::names_a_digest;
use super::snapshot::Snapshot;
use super::validate::build_entry;

/// A visitor's answers to scalars it takes and does not keep.
macro_rules! skip_scalars {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// An entry after a refused one, read only for its digest: any shape is taken, and
/// nothing of it is held but a `sha256` of 64 characters (every other value is skipped
/// as it is read, as `IgnoredAny` skips it).
struct Rest(Vec<Digest>);

impl<'de> de::Deserialize<'de> for Rest {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RestVisitor)
    }
}

struct RestVisitor;

impl<'de> Visitor<'de> for RestVisitor {
    type Value = Rest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Rest, A::Error> {
        let mut found = Vec::new();
        while let Some(is_digest) = map.next_key::<IsDigestField>()? {
            match is_digest.0 {
                true => found.extend(map.next_value::<HexDigest>()?.0),
                false => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Rest(found))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rest, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Rest(Vec::new()))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Rest, E> {
        Ok(Rest(Vec::new()))
    }
    skip_scalars!(Rest(Vec::new()));
}

/// A field name, compared with `sha256` and not kept.
struct IsDigestField(bool);

impl<'de> de::Deserialize<'de> for IsDigestField {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IsDigestField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<IsDigestField, E> {
                Ok(IsDigestField(s == "sha256"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IsDigestField, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(IsDigestField(false))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IsDigestField, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(IsDigestField(false))
            }
            skip_scalars!(IsDigestField(false));
        }
        d.deserialize_any(V)
    }
}

/// A `sha256` value: the digest when it is 64 hex characters, else nothing (any shape).
struct HexDigest(Option<Digest>);

impl<'de> de::Deserialize<'de> for HexDigest {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HexDigest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a digest")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HexDigest, E> {
                let mut d = Digest::default();
                Ok(HexDigest(hex::decode_to_slice(s, &mut d).ok().map(|()| d)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HexDigest, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(HexDigest(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HexDigest, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(HexDigest(None))
            }
            skip_scalars!(HexDigest(None));
        }
        d.deserialize_any(V)
    }
}

/// A snapshot's own fields (`version`, `generated_at`) and its keys, built.
pub type Built = (Meta, Vec<Arc<Key>>);

/// Where a read of the `keys` list is: the entry being read, and the first refused entry
/// (the deserializer's own error only says that one was).
#[derive(Default)]
pub(super) struct Progress {
    pub(super) entry: Option<usize>,
    pub(super) refused: Option<SnapshotError>,
}

/// The snapshot document: `version` and `generated_at` (optional) and `keys` (required; `keys: []` is an
/// explicit empty snapshot), nothing else. The one definition of the document read by
/// every loader; `SnapshotDoc` writes it.
pub(super) struct Doc<'a> {
    pub(super) prior: Option<&'a Snapshot>,
    pub(super) progress: &'a mut Progress,
}

const FIELDS: &[&str] = &["version", "generated_at", "keys"];

impl<'de> DeserializeSeed<'de> for Doc<'_> {
    type Value = Built;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_struct("Snapshot", FIELDS, self)
    }
}

impl<'de> Visitor<'de> for Doc<'_> {
    type Value = Built;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a snapshot with `keys` (and an optional `version`)")
    }

    /// An empty document (or one of comments only).
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::missing_field("keys"))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::missing_field("keys"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut version, mut generated_at, mut keys) = (None, None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Version if version.is_some() => {
                    return Err(de::Error::duplicate_field("version"))
                }
                Field::GeneratedAt if generated_at.is_some() => {
                    return Err(de::Error::duplicate_field("generated_at"))
                }
                Field::Keys if keys.is_some() => return Err(de::Error::duplicate_field("keys")),
                Field::Version => version = Some(map.next_value::<Option<u64>>()?),
                Field::GeneratedAt => generated_at = Some(map.next_value::<Option<String>>()?),
                Field::Keys => {
                    keys = Some(map.next_value_seed(Entries {
                        prior: self.prior,
                        progress: &mut *self.progress,
                    })?)
                }
            }
        }
        let keys = keys.ok_or_else(|| de::Error::missing_field("keys"))?;
        let meta = Meta::new(version.flatten(), generated_at.flatten().as_deref())
            .map_err(de::Error::custom)?;
        Ok((meta, keys))
    }
}

/// A field of the document; anything else is refused.
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
                f.write_str("`version`, `generated_at` or `keys`")
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

/// The `keys` list, each entry checked and built as soon as it is parsed, and a key equal
/// in every field to the one of the same id in `prior` (the snapshot in force) replaced by
/// that one at once, so a reload holds one copy of each unchanged key.
struct Entries<'a> {
    prior: Option<&'a Snapshot>,
    progress: &'a mut Progress,
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
        let mut keys = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        let mut scopes = ScopeCache::default();
        loop {
            self.progress.entry = Some(keys.len());
            let Some(doc) = seq.next_element()? else {
                break;
            };
            match build_entry(keys.len(), doc, &mut scopes) {
                Ok(key) => keys.push(Snapshot::reuse(self.prior, key)),
                Err(mut entry) => {
                    // The rest is read (not built) so the error is this entry's, named; the
                    // digests of the others are kept to tell whether the id it names is one
                    // of their secrets (a short raw key pasted into `id` was logged).
                    let mut digests: HashSet<Digest> = keys.iter().map(|k| *k.digest()).collect();
                    while let Some(Rest(found)) = seq.next_element::<Rest>()? {
                        digests.extend(found);
                    }
                    let prior = self.prior;
                    let known = |d: &Digest| {
                        digests.contains(d) || prior.is_some_and(|p| p.lookup(d).is_some())
                    };
                    let secret = entry.shown_id().is_some_and(|id| names_a_digest(id, known));
                    if secret {
                        entry.withhold_id();
                    }
                    self.progress.refused = Some(entry);
                    return Err(de::Error::custom("refused entry"));
                }
            }
        }
        self.progress.entry = None;
        Ok(keys)
    }
}
