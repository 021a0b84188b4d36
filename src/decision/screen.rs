//! What a decision request may not carry. The proxy strips these names before the app sees
//! a request (SPEC 8); a front proxy asking for a decision passes them on to the app, so a
//! decision refuses them instead. Four rules, one walk over the header names: most names are
//! ruled out by their first byte, from a table built once per listener.

use http::header::HeaderName;
use http::HeaderMap;

use super::Endpoint;
use crate::auth::reject::BadRequest;
use crate::auth::Reject;
use crate::header_names::{is_asserted, may_be_listed, same_name, INGRESS_NGINX_REDIRECT};
use crate::keys::IdentityNames;
use crate::proxy::headers;
use crate::App;

/// The rules, in the order their refusals are reported when a request breaks several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rule {
    /// A route, method or host override (other than the endpoint's own protocol's, and the
    /// names `allow_override_headers` lets through, exactly as spelled): the app would serve
    /// a request other than the one authorized.
    Override(&'static str),
    /// A `_` or `.` spelling of an identity, delegation, forwarding or credential header: a
    /// front proxy overwrites or strips only the names as spelled, and a CGI/WSGI app reads
    /// `X_Auth_Org_Id` as the real one (or `x_api_key` as a key keyward never checked).
    Misspelled,
    /// A name under the identity prefix that keyward does not answer with: nginx and Envoy
    /// overwrite only the names keyward sends, so a client's `X-Auth-Role` would reach the app.
    UnknownIdentity,
    /// What another gateway asserts about the client (`Remote-User`, Kong's `X-Consumer-*`,
    /// ...), unless the front proxy asking is in `trusted_proxies` (it, or an edge before
    /// it, set them).
    Asserted,
}

impl Rule {
    fn reject(self) -> Reject {
        Reject::BadRequest(match self {
            Self::Override(name) => BadRequest::Override(name),
            Self::Misspelled => BadRequest::Misspelled,
            Self::UnknownIdentity => BadRequest::UnknownIdentity,
            Self::Asserted => BadRequest::Asserted,
        })
    }
}

/// The rules' settings, and the first bytes a name needs for any rule to apply.
pub struct Screen {
    candidate: [bool; 256],
    prefix: String,
    allowed_overrides: Vec<HeaderName>,
    credentials: Vec<HeaderName>,
}

impl Screen {
    pub fn new(app: &App) -> Self {
        let prefix = app.config.identity_headers.prefix.clone();
        let credentials = app.policy.credential_headers().to_vec();
        let mut candidate = [false; 256];
        for (b, slot) in candidate.iter_mut().enumerate() {
            *slot = may_be_listed(b as u8);
        }
        let firsts = prefix.bytes().next().into_iter();
        let firsts = firsts.chain(credentials.iter().filter_map(|c| c.as_str().bytes().next()));
        for first in firsts {
            // A spelling differs from the name only where the name has a separator.
            let spellings: &[u8] = match first {
                b if crate::header_names::is_separator(b) => b"!#$%&'*+-.^_`|~",
                _ => std::slice::from_ref(&first),
            };
            for &b in spellings {
                candidate[usize::from(b.to_ascii_lowercase())] = true;
            }
        }
        Self {
            candidate,
            prefix,
            allowed_overrides: app.config.allow_override_headers.clone(),
            credentials,
        }
    }

    /// Refuse the request if any of its header names breaks a rule: the first rule of
    /// [`Rule`]'s order that any name breaks.
    pub fn check(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        names: &IdentityNames,
        caller_trusted: bool,
    ) -> Result<(), Reject> {
        let mut worst: Option<Rule> = None;
        for name in headers.keys() {
            let first = name
                .as_str()
                .as_bytes()
                .first()
                .copied()
                .unwrap_or_default();
            if !self.candidate[usize::from(first)] {
                continue;
            }
            if let Some(rule) = self.broken(endpoint, name, names, caller_trusted) {
                if matches!(rule, Rule::Override(_)) {
                    return Err(rule.reject());
                }
                worst = Some(worst.map_or(rule, |w| w.min(rule)));
            }
        }
        worst.map_or(Ok(()), |rule| Err(rule.reject()))
    }

    /// The first rule `name` breaks.
    fn broken(
        &self,
        endpoint: Endpoint,
        name: &HeaderName,
        names: &IdentityNames,
        caller_trusted: bool,
    ) -> Option<Rule> {
        let n = name.as_str();
        if let Some(o) = headers::override_of(name, &self.allowed_overrides) {
            if !endpoint.protocol_headers().contains(name) {
                return Some(Rule::Override(o));
            }
        }
        let credential_spelling = || {
            self.credentials
                .iter()
                .any(|c| c != name && same_name(n, c.as_str()))
        };
        if headers::is_misspelled_trusted(name, &self.prefix) || credential_spelling() {
            return Some(Rule::Misspelled);
        }
        // Header names are lower-case, and so is a validated prefix.
        if n.starts_with(self.prefix.as_str())
            && !names.all().contains(name)
            && !(endpoint == Endpoint::AuthRequest && n == INGRESS_NGINX_REDIRECT)
        {
            return Some(Rule::UnknownIdentity);
        }
        (!caller_trusted && is_asserted(n)).then_some(Rule::Asserted)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::config::Config;

    fn app(extra: &str) -> App {
        let yaml = format!(
            "decision: {{ listen: 127.0.0.1:0 }}\nenvironment: production\nkeys: {{ file: k.yaml }}\n{extra}"
        );
        App::new(Config::from_yaml(&yaml).unwrap()).unwrap()
    }

    fn verdict(app: &App, endpoint: Endpoint, names: &[&str], trusted: bool) -> Result<(), Reject> {
        let mut h = HeaderMap::new();
        for n in names {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        Screen::new(app).check(endpoint, &h, &app.names, trusted)
    }

    fn refused(r: Result<(), Reject>) -> BadRequest {
        match r {
            Err(Reject::BadRequest(b)) => b,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn each_rule_refuses_its_names_and_lets_the_rest_through() {
        let app = app("");
        let ar = Endpoint::AuthRequest;
        let plain = [
            "host",
            "accept",
            "x-api-key",
            "x-original-uri",
            "x-original-method",
        ];
        assert!(verdict(&app, ar, &plain, false).is_ok());
        assert!(verdict(
            &app,
            ar,
            &["x-auth-subject-id", "x-auth-request-redirect"],
            false
        )
        .is_ok());
        assert!(verdict(
            &app,
            ar,
            &["x-authenticated-user", "x-forwarded-for"],
            false
        )
        .is_ok());
        assert!(matches!(
            refused(verdict(
                &app,
                Endpoint::ExtAuthz,
                &["x-original-uri"],
                false
            )),
            BadRequest::Override(_)
        ));
        for misspelled in [
            "x_auth_org_id",
            "x.delegate.account.id",
            "x_forwarded_host",
            "x_api_key",
        ] {
            let r = verdict(&app, ar, &[misspelled], false);
            assert_eq!(refused(r), BadRequest::Misspelled, "{misspelled}");
        }
        let r = verdict(&app, ar, &["x-auth-role"], false);
        assert_eq!(refused(r), BadRequest::UnknownIdentity);
        for asserted in [
            "remote-user",
            "x-consumer-id",
            "x-forwarded-user",
            "ssl-client-verify",
        ] {
            let r = verdict(&app, ar, &[asserted], false);
            assert_eq!(refused(r), BadRequest::Asserted, "{asserted}");
            assert!(verdict(&app, ar, &[asserted], true).is_ok(), "{asserted}");
        }
    }

    #[test]
    fn several_broken_rules_report_the_first_in_order_whatever_the_header_order() {
        let app = app("");
        let names = [
            "remote-user",
            "x-auth-role",
            "x_auth_org_id",
            "x-original-url",
        ];
        let mut order = names;
        for _ in 0..names.len() {
            order.rotate_left(1);
            let r = verdict(&app, Endpoint::ForwardAuth, &order, false);
            assert!(matches!(refused(r), BadRequest::Override(_)), "{order:?}");
        }
        let r = verdict(&app, Endpoint::ForwardAuth, &names[..3], false);
        assert_eq!(refused(r), BadRequest::Misspelled);
        let r = verdict(&app, Endpoint::ForwardAuth, &names[..2], false);
        assert_eq!(refused(r), BadRequest::UnknownIdentity);
    }

    #[test]
    fn a_configured_credential_or_prefix_widens_the_first_bytes_looked_at() {
        let app =
            app("credentials: [ { header: api_token } ]\nidentity_headers: { prefix: kw-id- }\n");
        let ar = Endpoint::AuthRequest;
        assert_eq!(
            refused(verdict(&app, ar, &["api-token"], false)),
            BadRequest::Misspelled
        );
        assert_eq!(
            refused(verdict(&app, ar, &["kw-id-role"], false)),
            BadRequest::UnknownIdentity
        );
        assert_eq!(
            refused(verdict(&app, ar, &["kw_id_key_id"], false)),
            BadRequest::Misspelled
        );
        assert!(verdict(&app, ar, &["api_token", "kw-id-key-id"], false).is_ok());
    }
}
