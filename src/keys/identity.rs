//! The identity headers sent upstream: their names (from the configured prefix) and each
//! key's values, pre-built so a request only clones reference-counted values.

use http::{HeaderName, HeaderValue};

use super::key::{Key, PrincipalType};

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
}
