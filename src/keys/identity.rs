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

impl IdentityNames {
    /// `prefix` was validated by the config (lowercase token characters).
    pub fn new(prefix: &str, environment: &str) -> Result<Self, String> {
        let name = |suffix: &str| {
            HeaderName::try_from(format!("{prefix}{suffix}"))
                .map_err(|_| format!("{prefix}{suffix} is not a header name"))
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
                .map_err(|_| "environment is not a valid header value".to_string())?,
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
