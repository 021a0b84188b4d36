//! The key snapshot: parsed, validated and indexed by SHA-256 digest off the request path,
//! then published whole through the [`KeyStore`](super::KeyStore).

use std::collections::HashSet;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::index::{Duplicate, KeyIndex};
pub use super::load::Format;
use super::load::{self, Built};

/// A SHA-256 digest of a raw key.
pub type Digest = [u8; 32];

/// Hash a presented key. The only thing ever done with a raw key.
pub fn digest(raw: &[u8]) -> Digest {
    Sha256::digest(raw).into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalType {
    ServiceAccount,
    EnterpriseServiceAccount,
    Personal,
}

impl PrincipalType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServiceAccount => "service_account",
            Self::EnterpriseServiceAccount => "enterprise_service_account",
            Self::Personal => "personal",
        }
    }

    /// The `x-auth-principal-type` value.
    pub fn header_value(self) -> &'static HeaderValue {
        static SERVICE: HeaderValue = HeaderValue::from_static("service_account");
        static ENTERPRISE: HeaderValue = HeaderValue::from_static("enterprise_service_account");
        static PERSONAL: HeaderValue = HeaderValue::from_static("personal");
        match self {
            Self::ServiceAccount => &SERVICE,
            Self::EnterpriseServiceAccount => &ENTERPRISE,
            Self::Personal => &PERSONAL,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "service_account" => Some(Self::ServiceAccount),
            "enterprise_service_account" => Some(Self::EnterpriseServiceAccount),
            "personal" => Some(Self::Personal),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Disabled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
        }
    }
}

/// Which accounts an enterprise key may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delegation {
    None,
    Any,
    Only(HashSet<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

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

impl Meta {
    /// `generated_at` as written in the document, checked.
    pub fn new(version: Option<u64>, generated_at: Option<&str>) -> Result<Meta, SnapshotError> {
        let generated_at = parse_time("generated_at", generated_at)
            .map_err(|(field, reason)| SnapshotError::Parse(format!("{field}: {reason}")))?;
        Ok(Meta {
            version,
            generated_at,
        })
    }
}

/// One entry of the snapshot file. Loosely typed on purpose: [`Key::from_doc`] checks each
/// field so that an error can name the entry and the field. Entries are read one at a time
/// and built into keys at once (`load`); `Snapshot::to_doc` writes them back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDoc {
    #[serde(default)]
    pub id: Box<str>,
    #[serde(default)]
    pub sha256: Box<str>,
    #[serde(default, rename = "type")]
    pub kind: Box<str>,
    #[serde(default)]
    pub subject_id: Box<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_email: Option<Box<str>>,
    #[serde(default)]
    pub account_id: Box<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_short_id: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enterprise_id: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<Box<str>>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate_accounts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A refused snapshot: which entry, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot: {0}")]
    Parse(String),
    #[error("keys[{index}] id={id}: {field}: {reason}")]
    Entry {
        index: usize,
        id: String,
        field: &'static str,
        reason: String,
    },
}

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
    fn new(s: Box<str>) -> Text {
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

/// A validated key with everything a request needs pre-built.
///
/// Kept small because a snapshot holds one per key (a million, at the high end): fields most
/// keys leave unset live behind one pointer, and keys with the same scopes share them.
/// Equality is every field's (derived, so a new field counts): a reload keeps the keys that
/// did not change (see [`Snapshot::reuse`]).
#[derive(Clone, PartialEq)]
pub struct Key {
    /// The public id, stored once as the `x-auth-key-id` value it is sent as.
    pub id: Text,
    pub subject_id: Text,
    pub account_id: Text,
    scopes: Arc<Scopes>,
    pub not_before: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    /// The stored digest, kept so an edited snapshot (emergency revoke) can be written back.
    digest: Digest,
    /// `None` when the entry sets none of the optional fields.
    extra: Option<Box<Extra>>,
    pub principal_type: PrincipalType,
    pub status: Status,
}

/// The optional fields of a key.
#[derive(Clone, PartialEq)]
struct Extra {
    subject_email: Option<Text>,
    account_short_id: Option<Text>,
    enterprise_id: Option<Text>,
    org_id: Option<Text>,
    environment: Option<Box<str>>,
    rate_limit: Option<RateLimit>,
    delegation: Delegation,
    delegate_accounts: Option<Vec<String>>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        // No `..`: a new field must be counted here.
        let Extra {
            subject_email,
            account_short_id,
            enterprise_id,
            org_id,
            environment,
            rate_limit,
            delegation,
            delegate_accounts,
        } = self;
        subject_email.is_none()
            && account_short_id.is_none()
            && enterprise_id.is_none()
            && org_id.is_none()
            && environment.is_none()
            && rate_limit.is_none()
            && *delegation == Delegation::None
            && delegate_accounts.is_none()
    }
}

/// A key's scopes and their `x-auth-scopes` value, shared by the keys of one build run (a
/// few thousand keys, built on one thread) that list the same scopes.
#[derive(Debug, PartialEq)]
struct Scopes {
    list: Vec<String>,
    value: HeaderValue,
}

impl Scopes {
    fn new(list: Vec<String>) -> Scopes {
        let value =
            HeaderValue::from_str(&list.join(" ")).unwrap_or_else(|_| HeaderValue::from_static(""));
        Scopes { list, value }
    }
}

/// While one run of keys is built: each distinct scope list, built once and held once.
#[derive(Default)]
pub(super) struct ScopeCache {
    built: hashbrown::HashTable<Arc<Scopes>>,
    hasher: foldhash::fast::RandomState,
}

impl ScopeCache {
    fn get(&mut self, list: Vec<String>) -> Arc<Scopes> {
        let h = &self.hasher;
        self.built
            .entry(
                h.hash_one(&list),
                |s| s.list == list,
                |s| h.hash_one(&s.list),
            )
            .or_insert_with(|| Arc::new(Scopes::new(list)))
            .get()
            .clone()
    }
}

/// Keys and digests never print: `Debug` shows the public id only.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("type", &self.principal_type)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Names of the identity headers, derived from the configured prefix.
#[derive(Debug, Clone)]
pub struct IdentityNames {
    pub subject_id: HeaderName,
    pub account_id: HeaderName,
    pub enterprise_id: HeaderName,
    pub subject_email: HeaderName,
    pub account_short_id: HeaderName,
    pub org_id: HeaderName,
    pub principal_type: HeaderName,
    pub access_type: HeaderName,
    pub delegated_by: HeaderName,
    pub key_id: HeaderName,
    pub scopes: HeaderName,
    pub environment: HeaderName,
    /// The sidecar's environment, the value of `<prefix>environment`.
    pub environment_value: HeaderValue,
}

/// Why the identity headers cannot be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0} is not a header name")]
    HeaderName(String),
    #[error("environment is not a valid header value")]
    Environment,
}

impl IdentityNames {
    /// `prefix` was validated by the config (lowercase token characters).
    pub fn new(prefix: &str, environment: &str) -> Result<Self, IdentityError> {
        let name = |suffix: &str| {
            let name = format!("{prefix}{suffix}");
            HeaderName::try_from(name.as_str()).map_err(|_| IdentityError::HeaderName(name))
        };
        Ok(Self {
            subject_id: name("subject-id")?,
            account_id: name("account-id")?,
            enterprise_id: name("enterprise-id")?,
            subject_email: name("subject-email")?,
            account_short_id: name("account-short-id")?,
            org_id: name("org-id")?,
            principal_type: name("principal-type")?,
            access_type: name("access-type")?,
            delegated_by: name("delegated-by")?,
            key_id: name("key-id")?,
            scopes: name("scopes")?,
            environment: name("environment")?,
            environment_value: HeaderValue::try_from(environment)
                .map_err(|_| IdentityError::Environment)?,
        })
    }
}

/// Validate and build entry `index` of the document.
pub(super) fn build_entry(
    index: usize,
    doc: KeyDoc,
    scopes: &mut ScopeCache,
) -> Result<Key, SnapshotError> {
    Key::from_doc(doc, scopes).map_err(|((field, reason), id)| SnapshotError::Entry {
        index,
        id,
        field,
        reason,
    })
}

/// Where a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Control,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Control => "control",
        }
    }
}

/// An immutable, validated set of keys.
pub struct Snapshot {
    index: KeyIndex,
    pub version: Option<u64>,
    /// SHA-256 of the content it was parsed from (hex), to tell snapshots apart.
    pub content_digest: String,
    pub source: Source,
    pub loaded_at: SystemTime,
    /// The document's `generated_at`.
    pub generated_at: Option<SystemTime>,
    /// From this time on the snapshot is too old to authenticate with (`keys.max_age`).
    stale_at: Option<SystemTime>,
}

/// Digests never print: `Debug` shows the metadata only.
impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("keys", &self.len())
            .field("version", &self.version)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Parse YAML or JSON (JSON when it is JSON, see `load`) and validate every entry.
    pub fn parse(text: &str, source: Source) -> Result<Snapshot, SnapshotError> {
        Self::parse_as(text, Format::Yaml, source)
    }

    /// Parse in a declared format ([`Format::Json`]: JSON only).
    pub fn parse_as(text: &str, format: Format, source: Source) -> Result<Snapshot, SnapshotError> {
        let content_digest = hex::encode(digest(text.as_bytes()));
        let (meta, keys) = load::from_slice(text.as_bytes(), format, None)?;
        Self::assemble(meta, keys, source, content_digest)
    }

    /// A document read elsewhere (as a stream from a file, see `source`), whose text had
    /// the digest `content_digest`.
    pub(super) fn from_built(
        (meta, keys): Built,
        source: Source,
        content_digest: String,
    ) -> Result<Snapshot, SnapshotError> {
        Self::assemble(meta, keys, source, content_digest)
    }

    /// Index built keys by digest and by id; a duplicate of either refuses the snapshot.
    fn assemble(
        meta: Meta,
        keys: Vec<Arc<Key>>,
        source: Source,
        content_digest: String,
    ) -> Result<Snapshot, SnapshotError> {
        let mut index = KeyIndex::with_capacity(keys.len());
        for (i, key) in keys.into_iter().enumerate() {
            if let Err((dup, key)) = index.insert(key) {
                let (field, reason) = match dup {
                    Duplicate::Id => ("id", "duplicate id"),
                    Duplicate::Digest => ("sha256", "duplicate sha256"),
                };
                return Err(SnapshotError::Entry {
                    index: i,
                    id: key.id.to_string(),
                    field,
                    reason: reason.into(),
                });
            }
        }
        Ok(Snapshot {
            index,
            version: meta.version,
            content_digest,
            source,
            loaded_at: SystemTime::now(),
            generated_at: meta.generated_at,
            stale_at: None,
        })
    }

    /// An empty snapshot (for tests and benchmarks).
    pub fn empty(source: Source) -> Snapshot {
        Snapshot {
            index: KeyIndex::default(),
            version: None,
            content_digest: hex::encode(digest(b"")),
            source,
            loaded_at: SystemTime::now(),
            generated_at: None,
            stale_at: None,
        }
    }

    /// With `keys.max_age`: the snapshot fails closed once its `generated_at` is older than
    /// that. One without `generated_at` never ages (its age is unknown).
    pub fn set_max_age(&mut self, max_age: Option<std::time::Duration>) {
        self.stale_at = max_age.and_then(|age| self.generated_at?.checked_add(age));
    }

    /// When this snapshot becomes too old to authenticate with, if ever.
    pub fn stale_at(&self) -> Option<SystemTime> {
        self.stale_at
    }

    /// Too old at `now` (see [`set_max_age`](Self::set_max_age)): one comparison.
    pub fn is_stale(&self, now: SystemTime) -> bool {
        self.stale_at.is_some_and(|at| now >= at)
    }

    pub fn lookup(&self, d: &Digest) -> Option<&Arc<Key>> {
        self.index.by_digest(d)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Key>> {
        self.index.by_id(id)
    }

    /// `key`, or `prior`'s key of the same id where the two are equal in every field: a
    /// reload built against the snapshot in force holds one copy of each unchanged key, not
    /// two, and the new copy is freed as soon as it is built.
    pub(super) fn reuse(prior: Option<&Snapshot>, key: Key) -> Arc<Key> {
        match prior.and_then(|p| p.by_id(&key.id)) {
            Some(old) if **old == key => old.clone(),
            _ => Arc::new(key),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.index.iter()
    }

    /// The document form, entries ordered by id, for persisting an edited snapshot.
    pub fn to_doc(&self) -> SnapshotDoc {
        let mut keys: Vec<KeyDoc> = self.index.iter().map(|k| k.to_doc()).collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        SnapshotDoc {
            version: self.version,
            generated_at: self
                .generated_at
                .map(|t| humantime::format_rfc3339_seconds(t).to_string().into()),
            keys,
        }
    }
}

type FieldError = (&'static str, String);

impl Key {
    /// Checks every field by reference (so a refusal can name the entry without copying
    /// its id up front), then builds the key by moving the document's strings.
    fn from_doc(doc: KeyDoc, scopes: &mut ScopeCache) -> Result<Key, (FieldError, String)> {
        match Checked::of(&doc) {
            Ok(c) => Ok(Self::build(doc, c, scopes)),
            // An id that is not one is not echoed: it may be anything, of any length.
            Err(e) if check_id("id", &doc.id).is_err() => Err((e, "(invalid)".into())),
            Err(e) => Err((e, doc.id.into())),
        }
    }

    fn build(doc: KeyDoc, c: Checked, scopes: &mut ScopeCache) -> Key {
        let extra = Extra {
            subject_email: doc.subject_email.map(Text::new),
            account_short_id: doc.account_short_id.map(Text::new),
            enterprise_id: doc.enterprise_id.map(Text::new),
            org_id: doc.org_id.map(Text::new),
            environment: doc.environment,
            rate_limit: doc.rate_limit,
            delegation: c.delegation,
            delegate_accounts: doc.delegate_accounts,
        };
        Key {
            id: Text::new(doc.id),
            subject_id: Text::new(doc.subject_id),
            account_id: Text::new(doc.account_id),
            scopes: scopes.get(doc.scopes),
            not_before: c.not_before,
            expires_at: c.expires_at,
            digest: c.digest,
            extra: (!extra.is_empty()).then(|| Box::new(extra)),
            principal_type: c.principal_type,
            status: c.status,
        }
    }

    /// The stored SHA-256 digest (never logged: `Debug` leaves it out).
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    fn extra(&self) -> Option<&Extra> {
        self.extra.as_deref()
    }

    pub fn subject_email(&self) -> Option<&Text> {
        self.extra()?.subject_email.as_ref()
    }

    pub fn account_short_id(&self) -> Option<&Text> {
        self.extra()?.account_short_id.as_ref()
    }

    pub fn enterprise_id(&self) -> Option<&Text> {
        self.extra()?.enterprise_id.as_ref()
    }

    pub fn org_id(&self) -> Option<&Text> {
        self.extra()?.org_id.as_ref()
    }

    /// The one environment this key is valid in; `None`: any.
    pub fn environment(&self) -> Option<&str> {
        self.extra()?.environment.as_deref()
    }

    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.extra()?.rate_limit
    }

    pub fn delegation(&self) -> &Delegation {
        static NONE: Delegation = Delegation::None;
        self.extra().map_or(&NONE, |e| &e.delegation)
    }

    pub fn scopes(&self) -> &[String] {
        &self.scopes.list
    }

    /// The identity headers for this key; `delegated` is the account acted for. Values are
    /// shared with the key (cloning one is a reference-count increment).
    pub fn identity_headers<'a>(
        &'a self,
        names: &'a IdentityNames,
        delegated: Option<&'a HeaderValue>,
    ) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
        static ACCESS: HeaderValue = HeaderValue::from_static("access");
        static DELEGATED: HeaderValue = HeaderValue::from_static("delegated");
        let account = match delegated {
            Some(account) => [
                Some((&names.account_id, account)),
                Some((&names.access_type, &DELEGATED)),
                Some((&names.delegated_by, self.account_id.header_value())),
            ],
            None => [
                Some((&names.account_id, self.account_id.header_value())),
                Some((&names.access_type, &ACCESS)),
                None,
            ],
        };
        let optional = [
            (&names.enterprise_id, self.enterprise_id()),
            (&names.subject_email, self.subject_email()),
            (&names.account_short_id, self.account_short_id()),
            (&names.org_id, self.org_id()),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v.header_value())));
        std::iter::once((&names.subject_id, self.subject_id.header_value()))
            .chain(account.into_iter().flatten())
            .chain(optional)
            .chain([
                (&names.principal_type, self.principal_type.header_value()),
                (&names.key_id, self.id.header_value()),
                (&names.scopes, &self.scopes.value),
                (&names.environment, &names.environment_value),
            ])
    }

    /// The snapshot entry this key was loaded from (times in canonical RFC 3339 form).
    pub fn to_doc(&self) -> KeyDoc {
        let time = |t: Option<SystemTime>| {
            t.map(|t| humantime::format_rfc3339_seconds(t).to_string().into())
        };
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

    pub fn has_any_scope(&self, wanted: &[String]) -> bool {
        wanted.iter().any(|w| self.scopes().iter().any(|s| s == w))
    }
}

/// The fields of a key document that needed parsing, once every check has passed.
struct Checked {
    digest: Digest,
    principal_type: PrincipalType,
    status: Status,
    not_before: Option<SystemTime>,
    expires_at: Option<SystemTime>,
    delegation: Delegation,
}

impl Checked {
    fn of(doc: &KeyDoc) -> Result<Checked, FieldError> {
        check_id("id", &doc.id)?;
        let d = parse_digest(&doc.sha256)?;
        let principal_type = PrincipalType::parse(&doc.kind).ok_or_else(|| {
            (
                "type",
                "unknown type (service_account | enterprise_service_account | personal)".into(),
            )
        })?;
        let status = match doc.status.as_deref() {
            None | Some("active") => Status::Active,
            Some("disabled") => Status::Disabled,
            Some(_) => return Err(("status", "unknown status (active | disabled)".into())),
        };
        check_value("subject_id", &doc.subject_id, true)?;
        check_value("account_id", &doc.account_id, true)?;
        for (field, v) in [
            ("subject_email", &doc.subject_email),
            ("account_short_id", &doc.account_short_id),
            ("enterprise_id", &doc.enterprise_id),
            ("org_id", &doc.org_id),
            ("environment", &doc.environment),
        ] {
            if let Some(v) = v {
                check_value(field, v, true)?;
            }
        }
        for s in &doc.scopes {
            check_id("scopes", s)?;
        }
        let not_before = parse_time("not_before", doc.not_before.as_deref())?;
        let expires_at = parse_time("expires_at", doc.expires_at.as_deref())?;
        if let (Some(nb), Some(exp)) = (not_before, expires_at) {
            if exp <= nb {
                return Err(("expires_at", "must be later than not_before".into()));
            }
        }
        let delegation = parse_delegation(principal_type, doc.delegate_accounts.as_deref())?;
        if let Some(rl) = doc.rate_limit {
            if !(rl.per_second.is_finite() && rl.per_second > 0.0) || rl.burst == 0 {
                return Err(("rate_limit", "per_second and burst must be positive".into()));
            }
        }
        Ok(Checked {
            digest: d,
            principal_type,
            status,
            not_before,
            expires_at,
            delegation,
        })
    }
}

fn parse_digest(s: &str) -> Result<Digest, FieldError> {
    let mut d = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut d).is_err() {
        // The value itself is not echoed: it may be a pasted raw key.
        return Err(("sha256", "must be 64 hex characters".into()));
    }
    Ok(d)
}

/// Ids and scopes: short tokens that are safe in headers, logs and metric labels.
fn check_id(field: &'static str, s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'));
    if ok {
        Ok(())
    } else {
        // The value is not echoed: it may be anything, of any length (a pasted raw key).
        Err((field, "must be 1..128 of [A-Za-z0-9_.:/-]".into()))
    }
}

/// Values copied into identity headers: visible ASCII, so nothing can inject a header.
fn check_value(field: &'static str, s: &str, required: bool) -> Result<(), FieldError> {
    if s.is_empty() {
        return if required {
            Err((field, "is required".into()))
        } else {
            Ok(())
        };
    }
    if s.len() > 256 || !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err((field, "must be 1..256 visible ASCII characters".into()));
    }
    Ok(())
}

fn parse_time(field: &'static str, s: Option<&str>) -> Result<Option<SystemTime>, FieldError> {
    s.map(|s| {
        humantime::parse_rfc3339_weak(s.trim()).map_err(|_| {
            (
                field,
                "is not an RFC 3339 UTC time like 2027-01-01T00:00:00Z".into(),
            )
        })
    })
    .transpose()
}

fn parse_delegation(
    principal_type: PrincipalType,
    accounts: Option<&[String]>,
) -> Result<Delegation, FieldError> {
    let Some(accounts) = accounts else {
        return Ok(Delegation::None);
    };
    if principal_type != PrincipalType::EnterpriseServiceAccount {
        return Err((
            "delegate_accounts",
            "only enterprise_service_account keys may delegate".into(),
        ));
    }
    if accounts.iter().any(|a| a == "*") {
        return Ok(Delegation::Any);
    }
    for a in accounts {
        check_id("delegate_accounts", a)?;
    }
    Ok(Delegation::Only(accounts.iter().cloned().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> IdentityNames {
        IdentityNames::new("x-auth-", "production").unwrap()
    }

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn entry(extra: &str) -> String {
        format!(
            "keys:\n  - id: key_a\n    sha256: {SHA}\n    type: service_account\n    subject_id: s1\n    account_id: a1\n    scopes: [read]\n{extra}"
        )
    }

    fn refuse(text: &str) -> String {
        Snapshot::parse(text, Source::File)
            .expect_err("snapshot should be refused")
            .to_string()
    }

    #[test]
    fn shipped_demo_keys_parse() {
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s.version, Some(1));
        let k = s
            .lookup(&digest(b"sta_demo_service_key_0123456789abcdef"))
            .unwrap();
        assert_eq!(&*k.id, "key_demo_service");
    }

    #[test]
    fn json_is_accepted() {
        let json = format!(
            r#"{{"version": 3, "keys": [{{"id": "k", "sha256": "{SHA}", "type": "personal", "subject_id": "s", "account_id": "a", "scopes": ["read"]}}]}}"#
        );
        let s = Snapshot::parse(&json, Source::Control).unwrap();
        assert_eq!(s.version, Some(3));
        assert!(s.lookup(&digest(b"test")).is_some());
    }

    #[test]
    fn identity_headers_are_prebuilt() {
        let s = Snapshot::parse(&entry("    org_id: o1\n"), Source::File).unwrap();
        let k = s.by_id("key_a").unwrap();
        let get = |n: &str| {
            k.identity_headers(&names(), None)
                .find(|(h, _)| *h == n)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("x-auth-subject-id").as_deref(), Some("s1"));
        assert_eq!(get("x-auth-access-type").as_deref(), Some("access"));
        assert_eq!(get("x-auth-org-id").as_deref(), Some("o1"));
        assert_eq!(get("x-auth-environment").as_deref(), Some("production"));
        assert_eq!(get("x-auth-enterprise-id"), None);
    }

    #[test]
    fn duplicate_id_and_digest_are_refused() {
        let two = format!(
            "{}  - id: key_a\n    sha256: {}\n    type: personal\n    subject_id: s\n    account_id: a\n",
            entry(""),
            "0".repeat(64)
        );
        assert_eq!(refuse(&two), "keys[1] id=key_a: id: duplicate id");
        let two = format!(
            "{}  - id: key_b\n    sha256: {SHA}\n    type: personal\n    subject_id: s\n    account_id: a\n",
            entry("")
        );
        assert_eq!(refuse(&two), "keys[1] id=key_b: sha256: duplicate sha256");
        // The same entry twice: its id is what is reported.
        let two = entry("") + &entry("").replacen("keys:\n", "", 1);
        assert_eq!(refuse(&two), "keys[1] id=key_a: id: duplicate id");
    }

    /// Stored digests are whatever the writer put there: ones that differ only in their
    /// last bytes are all distinct keys, each found by its own digest.
    #[test]
    fn digests_alike_but_for_their_last_bytes_are_distinct_keys() {
        let n = 3000;
        let text: String = (0..n)
            .map(|i| {
                format!("  - {{id: k{i}, sha256: {i:064x}, type: personal, subject_id: s, account_id: a}}\n")
            })
            .collect();
        let s = Snapshot::parse(&format!("keys:\n{text}"), Source::File).unwrap();
        assert_eq!(s.len(), n);
        for i in [0, 1, 255, 256, n - 1] {
            let mut d = [0u8; 32];
            d[24..].copy_from_slice(&(i as u64).to_be_bytes());
            assert_eq!(&*s.lookup(&d).unwrap().id, format!("k{i}"));
        }
    }

    #[test]
    fn bad_fields_name_entry_and_field() {
        let bad_digest = entry("").replace(SHA, "abc");
        assert!(refuse(&bad_digest).starts_with("keys[0] id=key_a: sha256"));
        let bad_type = entry("").replace("service_account", "robot");
        assert!(refuse(&bad_type).starts_with("keys[0] id=key_a: type"));
        assert!(refuse(&entry("    status: paused\n")).starts_with("keys[0] id=key_a: status"));
        assert!(refuse(&entry("    expires_at: tomorrow\n")).contains("expires_at"));
        let e = refuse(&entry(
            "    not_before: 2027-01-01T00:00:00Z\n    expires_at: 2026-01-01T00:00:00Z\n",
        ));
        assert!(e.starts_with("keys[0] id=key_a: expires_at"), "{e}");
        let e = refuse(&entry("    delegate_accounts: [\"*\"]\n"));
        assert!(e.starts_with("keys[0] id=key_a: delegate_accounts"), "{e}");
        assert!(refuse(&entry("    subject_email: \"a\\nb\"\n")).contains("subject_email"));
        assert!(
            refuse(&entry("    rate_limit: { per_second: 0, burst: 1 }\n")).contains("rate_limit")
        );
        assert!(refuse(&entry("    colour: red\n")).contains("colour"));
        let no_subject = entry("").replace("    subject_id: s1\n", "");
        assert!(refuse(&no_subject).contains("subject_id"));
    }

    #[test]
    fn digest_errors_do_not_echo_the_value() {
        let raw = "sta_this_is_a_pasted_raw_key_not_a_digest";
        let e = refuse(&entry("").replace(SHA, raw));
        assert!(!e.contains(raw), "{e}");
    }

    #[test]
    #[cfg(all(unix, target_pointer_width = "64"))] // sizes of `SystemTime`, `Arc`, `Bytes`
    fn a_key_fits_a_small_allocation() {
        // `Arc<Key>` (two counters + the key) must stay within jemalloc's 224-byte class:
        // a snapshot holds one per key, a million at the high end.
        assert!(
            std::mem::size_of::<Key>() + 16 <= 224,
            "{}",
            std::mem::size_of::<Key>()
        );
    }

    #[test]
    fn an_id_is_stored_once_as_its_header_value_and_found_by_its_text() {
        use std::hash::BuildHasher;
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        let k = s.by_id("key_demo_service").unwrap();
        assert_eq!(k.id.header_value(), "key_demo_service");
        let names = IdentityNames::new("x-auth-", "production").unwrap();
        let sent: Vec<_> = k.identity_headers(&names, None).collect();
        assert!(sent.contains(&(&names.key_id, k.id.header_value())));
        // Hashed as its text: a map keyed by `Text` is searched with a `&str`.
        let h = std::collections::hash_map::RandomState::new();
        assert_eq!(h.hash_one(&k.id), h.hash_one("key_demo_service"));
        let map: std::collections::HashMap<Text, u8> = [(k.id.clone(), 1)].into();
        assert_eq!(map.get("key_demo_service"), Some(&1));
        assert_eq!(map.get("key_demo"), None);
    }

    #[test]
    fn keys_with_the_same_scopes_share_them_and_unset_fields_cost_nothing() {
        let second = format!(
            "  - id: key_b\n    sha256: {}\n    type: service_account\n    subject_id: s2\n    account_id: a1\n    scopes: [read]\n    org_id: o1\n",
            hex::encode(digest(b"b"))
        );
        let s = Snapshot::parse(&(entry("") + &second), Source::File).unwrap();
        let (a, b) = (s.by_id("key_a").unwrap(), s.by_id("key_b").unwrap());
        assert!(Arc::ptr_eq(&a.scopes, &b.scopes));
        assert_eq!(a.scopes(), ["read"]);
        assert!(a.extra.is_none() && a.org_id().is_none());
        assert_eq!(b.org_id().map(|t| t.as_str()), Some("o1"));
    }

    #[test]
    fn delegation_forms() {
        let ent = |d: &str| {
            entry(&format!("    delegate_accounts: {d}\n"))
                .replace("type: service_account", "type: enterprise_service_account")
        };
        let s = Snapshot::parse(&ent("[\"*\"]"), Source::File).unwrap();
        assert_eq!(*s.by_id("key_a").unwrap().delegation(), Delegation::Any);
        let s = Snapshot::parse(&ent("[c1, c2]"), Source::File).unwrap();
        assert!(
            matches!(s.by_id("key_a").unwrap().delegation(), Delegation::Only(set) if set.len() == 2)
        );
    }

    #[test]
    fn to_doc_round_trips() {
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        let text = serde_yaml::to_string(&s.to_doc()).unwrap();
        let again = Snapshot::parse(&text, Source::Control).unwrap();
        assert_eq!(again.len(), s.len());
        assert_eq!(again.version, s.version);
    }

    /// A large YAML snapshot loads, and an error names the bad entry.
    #[test]
    fn large_yaml_snapshot_loads_and_names_a_bad_entry() {
        let n = 3_005;
        let item = |i: usize, scopes: &str| {
            format!(
                "  - id: k{i}\n    sha256: {}\n    type: personal\n    subject_id: s{i}\n    account_id: a\n    scopes: {scopes}\n",
                hex::encode(digest(format!("key-{i}").as_bytes()))
            )
        };
        let good: String = (0..n).map(|i| item(i, "[read]")).collect();
        let s = Snapshot::parse(&format!("version: 4\nkeys:\n{good}"), Source::File).unwrap();
        assert_eq!((s.len(), s.version), (n, Some(4)));
        let k = s
            .lookup(&digest(format!("key-{}", n - 1).as_bytes()))
            .unwrap();
        assert_eq!(k.subject_id.as_str(), format!("s{}", n - 1));

        // Entries past the first parse job, in different jobs.
        let (wrong_type, wrong_field) = (n * 3 / 5, n - 3);
        let bad: String = (0..n)
            .map(|i| item(i, if i == wrong_type { "5" } else { "[read]" }))
            .collect();
        let e = refuse(&format!("keys:\n{bad}"));
        assert!(
            e.contains(&format!("keys[{wrong_type}].scopes")),
            "a YAML error: {e}"
        );
        let raw = format!("key-{wrong_field}");
        let bad = good.replace(&hex::encode(digest(raw.as_bytes())), "nope");
        let e = refuse(&format!("keys:\n{bad}"));
        assert!(
            e.starts_with(&format!("keys[{wrong_field}] id=k{wrong_field}: sha256")),
            "a bad field: {e}"
        );
    }

    #[test]
    fn debug_hides_material() {
        let s = Snapshot::parse(&entry(""), Source::File).unwrap();
        let dbg = format!("{:?}", s.by_id("key_a").unwrap());
        assert!(!dbg.contains(SHA) && dbg.contains("key_a"));
    }
}
