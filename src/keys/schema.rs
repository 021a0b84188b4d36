//! The snapshot document's types: what a snapshot file holds (`SnapshotDoc`, `KeyDoc`,
//! `Meta`) and how a key is written back as an entry. Read by the one loader (`load`),
//! checked by `validate`.

use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize};

use super::key::{Key, RateLimit};
use super::text::Text;

/// A snapshot document to write (an edited snapshot persisted, a generated entry). Read
/// back by the one loader (`load`), which defines the document: `keys` is required.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// When the snapshot's source generated it (RFC 3339); see `keys.max_age`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated_at: Option<Box<str>>,
    pub keys: Vec<KeyDoc>,
}

/// A snapshot document's own fields, besides its keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    pub version: Option<u64>,
    pub generated_at: Option<SystemTime>,
}

/// One entry of the snapshot file. Loosely typed on purpose: `validate` checks each
/// field so that an error can name the entry and the field. Entries are read one at a time
/// and built into keys at once (`load`); `Snapshot::to_doc` writes them back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDoc {
    #[serde(default, deserialize_with = "required")]
    pub id: Box<str>,
    #[serde(default, deserialize_with = "required")]
    pub sha256: Box<str>,
    #[serde(default, rename = "type", deserialize_with = "required")]
    pub kind: Box<str>,
    #[serde(default, deserialize_with = "required")]
    pub subject_id: Box<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_email: Option<Box<str>>,
    #[serde(default, deserialize_with = "required")]
    pub account_id: Box<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_short_id: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enterprise_id: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Box<str>>,
    #[serde(default, deserialize_with = "items")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Box<str>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_items"
    )]
    pub delegate_accounts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A required string field, null read as empty (which `validate` refuses as it refuses a
/// missing value, naming the entry and the field). Asked for a string, serde_yaml reads
/// YAML's null (`null`, `~`, `Null`, `NULL`, unquoted) as that text, so `subject_id: null`
/// was a subject named `null` where JSON's `"subject_id": null` was refused; read as an
/// option first, null is null in both, as it is for the optional fields. A quoted `"null"`
/// is a string, and stays one.
fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Box<str>, D::Error> {
    Ok(Option::<Box<str>>::deserialize(d)?.unwrap_or_default())
}

/// A list of ids or scopes, a null item read as empty (refused by `validate`), for the
/// same reason as [`required`]: `scopes: [null]` is no scope named `null`.
fn items<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let items = Vec::<Option<String>>::deserialize(d)?;
    Ok(items.into_iter().map(Option::unwrap_or_default).collect())
}

/// [`items`] for an optional list (null or absent: none).
fn optional_items<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let items = Option::<Vec<Option<String>>>::deserialize(d)?;
    Ok(items.map(|i| i.into_iter().map(Option::unwrap_or_default).collect()))
}

impl Key {
    /// The snapshot entry this key was loaded from (times in canonical RFC 3339 form, to the
    /// nanosecond they were given to: a revoke rewriting the snapshot moves no other key).
    pub fn to_doc(&self) -> KeyDoc {
        let time =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339(t).to_string().into());
        let text = |t: Option<&Text>| t.map(|t| t.as_str().into());
        KeyDoc {
            id: self.id.as_str().into(),
            sha256: hex::encode(self.digest).into(),
            kind: self.principal_type.as_str().into(),
            subject_id: self.subject_id.as_str().into(),
            subject_email: text(self.subject_email()),
            account_id: self.account_id.as_str().into(),
            account_short_id: text(self.account_short_id()),
            enterprise_id: text(self.enterprise_id()),
            org_id: text(self.org_id()),
            scopes: self.scopes().to_vec(),
            environment: self.environment().map(Into::into),
            status: Some(self.status.as_str().into()),
            not_before: time(self.not_before),
            expires_at: time(self.expires_at),
            delegate_accounts: self.extra().and_then(|e| e.delegate_accounts.clone()),
            rate_limit: self.rate_limit(),
        }
    }
}
