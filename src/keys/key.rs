//! The key model: a validated [`Key`] and the typed values it is made of. Built by
//! `validate` from a document entry, indexed by `index`, shared by every snapshot that holds
//! it unchanged.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::scopes::Scopes;
use super::text::Text;

/// A SHA-256 digest of a raw key.
pub type Digest = [u8; 32];

/// The lengths a raw key may have: a credential outside them is malformed.
pub const MIN_KEY_LEN: usize = 8;
pub const MAX_KEY_LEN: usize = 512;

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

    pub(super) fn parse(s: &str) -> Option<Self> {
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

/// A validated key with everything a request needs pre-built.
///
/// Kept small because a snapshot holds one per key (a million, at the high end): fields most
/// keys leave unset live behind one pointer, and keys with the same scopes share them.
/// Equality is every field's (derived, so a new field counts): a reload keeps the keys that
/// did not change (see `Snapshot::reuse`).
#[derive(Clone, PartialEq)]
pub struct Key {
    /// The public id, stored once as the `x-auth-key-id` value it is sent as.
    pub id: Text,
    pub subject_id: Text,
    pub account_id: Text,
    pub(super) scopes: Arc<Scopes>,
    pub not_before: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    /// The stored digest, kept so an edited snapshot (emergency revoke) can be written back.
    pub(super) digest: Digest,
    /// `None` when the entry sets none of the optional fields.
    pub(super) extra: Option<Box<Extra>>,
    pub principal_type: PrincipalType,
    pub status: Status,
}

/// The optional fields of a key.
#[derive(Clone, PartialEq)]
pub(super) struct Extra {
    pub(super) subject_email: Option<Text>,
    pub(super) account_short_id: Option<Text>,
    pub(super) enterprise_id: Option<Text>,
    pub(super) org_id: Option<Text>,
    pub(super) environment: Option<Box<str>>,
    pub(super) rate_limit: Option<RateLimit>,
    pub(super) delegation: Delegation,
    pub(super) delegate_accounts: Option<Vec<String>>,
}

impl Extra {
    pub(super) fn is_empty(&self) -> bool {
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

impl Key {
    /// The stored SHA-256 digest (never logged: `Debug` leaves it out).
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub(super) fn extra(&self) -> Option<&Extra> {
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

    /// Does `other` let in what this key let in, as the same principal: the same id,
    /// subject (and its email), account (with its short id, enterprise and org: every
    /// identity value the app was told and may serve by), type, status, time window,
    /// environment, scopes and delegation? (A rate limit says nothing about what a request
    /// may reach.)
    pub fn grants_as(&self, other: &Key) -> bool {
        self.id == other.id
            && self.subject_id == other.subject_id
            && self.subject_email() == other.subject_email()
            && self.account_id == other.account_id
            && self.account_short_id() == other.account_short_id()
            && self.enterprise_id() == other.enterprise_id()
            && self.org_id() == other.org_id()
            && self.principal_type == other.principal_type
            && self.status == other.status
            && self.not_before == other.not_before
            && self.expires_at == other.expires_at
            && self.scopes() == other.scopes()
            && self.environment() == other.environment()
            && self.delegation() == other.delegation()
    }

    pub fn has_any_scope(&self, wanted: &[String]) -> bool {
        wanted.iter().any(|w| self.scopes().iter().any(|s| s == w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::fixtures::{entry, SHA};
    use crate::keys::{Snapshot, Source};

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
    fn debug_hides_material() {
        let s = Snapshot::parse(&entry(""), Source::File).unwrap();
        let dbg = format!("{:?}", s.by_id("key_a").unwrap());
        assert!(!dbg.contains(SHA) && dbg.contains("key_a"));
    }
}
