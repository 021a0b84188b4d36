//! `credentials`: where a request's API key is read from (SPEC 2).

use http::HeaderName;
use serde::Deserialize;

/// Where a credential is read from: `{header, scheme?}` or `{query}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawCredentialSource")]
pub enum CredentialSource {
    /// `Authorization: <scheme> <key>`-style header (scheme compared case-insensitively).
    Scheme { header: HeaderName, scheme: String },
    /// The whole header value is the key (`X-API-KEY`).
    Header { header: HeaderName },
    /// A query parameter (off by default: query strings end up in logs).
    Query { name: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentialSource {
    header: Option<String>,
    scheme: Option<String>,
    query: Option<String>,
}

impl TryFrom<RawCredentialSource> for CredentialSource {
    type Error = String;
    fn try_from(raw: RawCredentialSource) -> Result<Self, String> {
        match (raw.header, raw.scheme, raw.query) {
            (Some(h), scheme, None) => {
                let header = HeaderName::try_from(h.to_ascii_lowercase())
                    .map_err(|_| format!("header: {h:?} is not a valid header name"))?;
                match scheme {
                    Some(s) if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                        Err(format!("scheme: {s:?} must be a single word"))
                    }
                    Some(scheme) => Ok(Self::Scheme { header, scheme }),
                    None => Ok(Self::Header { header }),
                }
            }
            (None, None, Some(q)) if !q.is_empty() => Ok(Self::Query { name: q }),
            _ => Err(
                "exactly one of `header` (with optional `scheme`) or `query` is required".into(),
            ),
        }
    }
}

/// `Authorization: Token`, `Authorization: Bearer`, then `X-API-KEY` (SPEC 2's default).
pub fn default_credentials() -> Vec<CredentialSource> {
    let auth = HeaderName::from_static("authorization");
    vec![
        CredentialSource::Scheme {
            header: auth.clone(),
            scheme: "Token".into(),
        },
        CredentialSource::Scheme {
            header: auth,
            scheme: "Bearer".into(),
        },
        CredentialSource::Header {
            header: HeaderName::from_static("x-api-key"),
        },
    ]
}
