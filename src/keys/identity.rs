//! The identity headers sent upstream: their names (from the configured prefix) and each
//! key's values, pre-built so a request only clones reference-counted values.

use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::key::{Key, PrincipalType};

/// One identity header of SPEC 8, named by the suffix after the prefix (the spelling
/// `identity_headers.include` takes: `subject-id`, `key-id`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityField {
    SubjectId,
    AccountId,
    EnterpriseId,
    SubjectEmail,
    AccountShortId,
    OrgId,
    PrincipalType,
    AccessType,
    DelegatedBy,
    KeyId,
    Scopes,
    Environment,
}

impl IdentityField {
    /// Every identity header, in SPEC 8's order (the order of the variants).
    pub const ALL: [IdentityField; 12] = [
        Self::SubjectId,
        Self::AccountId,
        Self::EnterpriseId,
        Self::SubjectEmail,
        Self::AccountShortId,
        Self::OrgId,
        Self::PrincipalType,
        Self::AccessType,
        Self::DelegatedBy,
        Self::KeyId,
        Self::Scopes,
        Self::Environment,
    ];

    /// The header name after the prefix.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::SubjectId => "subject-id",
            Self::AccountId => "account-id",
            Self::EnterpriseId => "enterprise-id",
            Self::SubjectEmail => "subject-email",
            Self::AccountShortId => "account-short-id",
            Self::OrgId => "org-id",
            Self::PrincipalType => "principal-type",
            Self::AccessType => "access-type",
            Self::DelegatedBy => "delegated-by",
            Self::KeyId => "key-id",
            Self::Scopes => "scopes",
            Self::Environment => "environment",
        }
    }
}

/// From its suffix; anything else is refused, listing the names there are.
impl<'de> Deserialize<'de> for IdentityField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::ALL
            .into_iter()
            .find(|f| f.suffix() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|f| f.suffix()).collect();
                serde::de::Error::custom(format!(
                    "{s:?} is not an identity header (name it without the prefix: {})",
                    known.join(", ")
                ))
            })
    }
}

/// Names of the identity headers, derived from the configured prefix, and which of them
/// are sent (`identity_headers.include`; all by default). The choice is made here, once:
/// a request only skips the names left out, it never compares names.
#[derive(Debug, Clone)]
pub struct IdentityNames {
    /// Every name, indexed by [`IdentityField`]: a decision answer names them all.
    all: [HeaderName; 12],
    /// The names sent, indexed the same way; `None` for a header left out.
    sent: [Option<HeaderName>; 12],
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
    /// Every identity header sent. `prefix` was validated by the config (lowercase token
    /// characters).
    pub fn new(prefix: &str, environment: &str) -> Result<Self, IdentityError> {
        let mut all = Vec::with_capacity(IdentityField::ALL.len());
        for field in IdentityField::ALL {
            let name = format!("{prefix}{}", field.suffix());
            all.push(
                HeaderName::try_from(name.as_str()).map_err(|_| IdentityError::HeaderName(name))?,
            );
        }
        let all: [HeaderName; 12] = all
            .try_into()
            .map_err(|_| IdentityError::HeaderName(prefix.to_owned()))?;
        Ok(Self {
            sent: all.clone().map(Some),
            all,
            environment_value: HeaderValue::try_from(environment)
                .map_err(|_| IdentityError::Environment)?,
        })
    }

    /// Send only the headers in `include` (`identity_headers.include`); `None` sends all.
    pub fn including(mut self, include: Option<&[IdentityField]>) -> Self {
        if let Some(include) = include {
            for field in IdentityField::ALL {
                if !include.contains(&field) {
                    self.sent[field as usize] = None;
                }
            }
        }
        self
    }

    /// The name of one identity header (sent or not).
    pub fn name(&self, field: IdentityField) -> &HeaderName {
        &self.all[field as usize]
    }

    /// Every identity header name, in SPEC 8's order, sent or not.
    pub fn all(&self) -> &[HeaderName; 12] {
        &self.all
    }

    /// The name to send for `field`, unless `identity_headers.include` leaves it out.
    fn sent(&self, field: IdentityField) -> Option<&HeaderName> {
        self.sent[field as usize].as_ref()
    }
}

impl PrincipalType {
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
}

impl Key {
    /// The identity headers sent for this key; `delegated` is the account acted for. Values
    /// are shared with the key (cloning one is a reference-count increment). Headers that
    /// `identity_headers.include` leaves out are skipped.
    pub fn identity_headers<'a>(
        &'a self,
        names: &'a IdentityNames,
        delegated: Option<&'a HeaderValue>,
    ) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
        self.identity_fields(names, delegated)
            .filter_map(|(f, v)| Some((names.sent(f)?, v)))
    }

    /// The value sent for each identity header, indexed by [`IdentityField`]: `None` where
    /// the key has none or `identity_headers.include` leaves the header out. A decision
    /// answer names every header once from this, in one pass.
    pub fn identity_values<'a>(
        &'a self,
        names: &'a IdentityNames,
        delegated: Option<&'a HeaderValue>,
    ) -> [Option<&'a HeaderValue>; 12] {
        let mut values = [None; 12];
        for (f, v) in self.identity_fields(names, delegated) {
            if names.sent(f).is_some() {
                values[f as usize] = Some(v);
            }
        }
        values
    }

    /// Every identity field this key has a value for, sent or not.
    fn identity_fields<'a>(
        &'a self,
        names: &'a IdentityNames,
        delegated: Option<&'a HeaderValue>,
    ) -> impl Iterator<Item = (IdentityField, &'a HeaderValue)> + 'a {
        use IdentityField as F;
        static ACCESS: HeaderValue = HeaderValue::from_static("access");
        static DELEGATED: HeaderValue = HeaderValue::from_static("delegated");
        let account = match delegated {
            Some(account) => [
                Some((F::AccountId, account)),
                Some((F::AccessType, &DELEGATED)),
                Some((F::DelegatedBy, self.account_id.header_value())),
            ],
            None => [
                Some((F::AccountId, self.account_id.header_value())),
                Some((F::AccessType, &ACCESS)),
                None,
            ],
        };
        let optional = [
            (F::EnterpriseId, self.enterprise_id()),
            (F::SubjectEmail, self.subject_email()),
            (F::AccountShortId, self.account_short_id()),
            (F::OrgId, self.org_id()),
        ]
        .into_iter()
        .filter_map(|(f, v)| v.map(|v| (f, v.header_value())));
        std::iter::once((F::SubjectId, self.subject_id.header_value()))
            .chain(account.into_iter().flatten())
            .chain(optional)
            .chain([
                (F::PrincipalType, self.principal_type.header_value()),
                (F::KeyId, self.id.header_value()),
                (F::Scopes, &self.scopes.value),
                (F::Environment, &names.environment_value),
            ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::fixtures::entry;
    use crate::keys::{Snapshot, Source, Text};

    fn names() -> IdentityNames {
        IdentityNames::new("x-auth-", "production").unwrap()
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
    fn include_sends_only_the_chosen_headers_in_the_same_order() {
        let s = Snapshot::parse(&entry("    org_id: o1\n"), Source::File).unwrap();
        let k = s.by_id("key_a").unwrap();
        let sent = |names: &IdentityNames| -> Vec<String> {
            k.identity_headers(names, None)
                .map(|(n, _)| n.as_str().to_owned())
                .collect()
        };
        let every = sent(&names());
        assert_eq!(every.len(), 8, "{every:?}");
        let some = names().including(Some(&[IdentityField::KeyId, IdentityField::SubjectId]));
        assert_eq!(sent(&some), ["x-auth-subject-id", "x-auth-key-id"]);
        assert_eq!(sent(&names().including(None)), every);
        // Every name stays known (a decision answer names them all), sent or not.
        assert_eq!(some.all().len(), 12);
        assert_eq!(some.name(IdentityField::OrgId), "x-auth-org-id");
        // Delegation headers follow the same choice.
        let delegated = HeaderValue::from_static("acct_child");
        let only = names().including(Some(&[IdentityField::DelegatedBy]));
        let got: Vec<_> = k.identity_headers(&only, Some(&delegated)).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "x-auth-delegated-by");
    }

    #[test]
    fn field_names_are_the_spec_suffixes() {
        for f in IdentityField::ALL {
            let parsed: IdentityField = serde_yaml::from_str(f.suffix()).unwrap();
            assert_eq!(parsed, f);
        }
        let names = names();
        let all: Vec<_> = names.all().iter().map(|n| n.as_str()).collect();
        assert_eq!(all[0], "x-auth-subject-id");
        assert_eq!(all[11], "x-auth-environment");
        assert!(serde_yaml::from_str::<IdentityField>("x-auth-key-id").is_err());
    }

    #[test]
    fn an_id_is_stored_once_as_its_header_value_and_found_by_its_text() {
        use std::hash::BuildHasher;
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        let k = s.by_id("key_demo_service").unwrap();
        assert_eq!(k.id.header_value(), "key_demo_service");
        let names = IdentityNames::new("x-auth-", "production").unwrap();
        let sent: Vec<_> = k.identity_headers(&names, None).collect();
        assert!(sent.contains(&(names.name(IdentityField::KeyId), k.id.header_value())));
        // Hashed as its text: a map keyed by `Text` is searched with a `&str`.
        let h = std::collections::hash_map::RandomState::new();
        assert_eq!(h.hash_one(&k.id), h.hash_one("key_demo_service"));
        let map: std::collections::HashMap<Text, u8> = [(k.id.clone(), 1)].into();
        assert_eq!(map.get("key_demo_service"), Some(&1));
        assert_eq!(map.get("key_demo"), None);
    }
}
