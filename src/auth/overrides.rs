//! What the override headers `allow_override_headers` lets through make the app serve.
//!
//! keyward strips route and method overrides (SPEC 8) because it authorized the request
//! line and the app would serve something else. A deployment that lets some through (an app
//! behind a form that can only POST, an IIS rewrite) still gets only what was authorized:
//! the method or path an override names is authorized too, and both must pass. An override
//! whose value an app could read more than one way is refused rather than guessed.

use http::{HeaderMap, HeaderName, Method};

use super::reject::BadRequest;
use super::Reject;
use crate::header_names::{alias_eq, OVERRIDES};

/// What an override changes, by its [`OVERRIDES`] entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Method,
    Url,
    /// A host override or a framework marker: the route rules do not read either.
    Other,
}

fn kind(canonical: &str) -> Kind {
    match canonical {
        "x-original-method"
        | "x-http-method-override"
        | "x-http-method"
        | "x-method-override"
        | "x-forwarded-method" => Kind::Method,
        "x-original-url"
        | "x-original-uri"
        | "x-rewrite-url"
        | "x-override-url"
        | "x-envoy-original-path"
        | "x-forwarded-uri" => Kind::Url,
        _ => Kind::Other,
    }
}

/// The request an app that honours the overrides serves instead of the request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overridden {
    pub method: Method,
    /// Normalized; the override's own value was already in normal form.
    pub path: String,
}

/// The request the allowed overrides present in `headers` name, when they name another
/// method or path than `method` and `path` (the request line, `path` normalized). A value
/// that is repeated, disagrees with another override of its kind, is not one method token
/// or one origin-form path, or is a path whose normalization would change (the app reads
/// it as sent) is refused: 400 naming the override.
pub fn overridden(
    headers: &HeaderMap,
    allowed: &[HeaderName],
    method: &Method,
    path: &str,
    unforwarded_query_key: Option<&str>,
) -> Result<Option<Overridden>, Reject> {
    let mut alt_method: Option<Method> = None;
    let mut alt_path: Option<String> = None;
    for name in allowed {
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            continue;
        };
        let Some(canonical) = OVERRIDES
            .iter()
            .copied()
            .find(|o| alias_eq(name.as_str(), o))
        else {
            continue;
        };
        let refuse = || Reject::BadRequest(BadRequest::Override(canonical));
        if values.next().is_some() {
            return Err(refuse());
        }
        let value = value.to_str().map_err(|_| refuse())?.trim();
        match kind(canonical) {
            Kind::Method => {
                let m = override_method(value).ok_or_else(refuse)?;
                agree(&mut alt_method, m).map_err(|()| refuse())?;
            }
            Kind::Url => {
                let p = override_path(value, unforwarded_query_key).ok_or_else(refuse)?;
                agree(&mut alt_path, p).map_err(|()| refuse())?;
            }
            Kind::Other => {}
        }
    }
    let changed = alt_method.as_ref().is_some_and(|m| m != method)
        || alt_path.as_deref().is_some_and(|p| p != path);
    Ok(changed.then(|| Overridden {
        method: alt_method.unwrap_or_else(|| method.clone()),
        path: alt_path.unwrap_or_else(|| path.to_owned()),
    }))
}

/// The query parameters frameworks read as the request's method: `_method` (Symfony,
/// Laravel, Spring's `HiddenHttpMethodFilter`, Express's `method-override`, Hono's
/// `methodOverride`, Gorilla) and
/// the override header's names (ASP.NET MVC's `GetHttpMethodOverride` reads
/// `X-HTTP-Method-Override` from the query too). Rails and Laravel read `_method` from a
/// form body as well, which keyward does not read (SECURITY.md).
pub const METHOD_PARAMS: [&str; 4] = [
    "_method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Add the method a method parameter of the request's query names ([`METHOD_PARAMS`],
/// spelled as apps read names) to `alt`: the app may serve that method, and keyward cannot
/// take the parameter out without rewriting the query, so that method is authorized too.
/// Empty, it is ignored (as frameworks do); repeated with another value, unreadable, not
/// one method token, or beside an override header that names another request: refused,
/// 400 naming it. On whatever method the request has: most frameworks read one on a POST
/// only, but Hono's `methodOverride` reads it on every method but GET, and Express's
/// `method-override` on whichever its `methods` option lists (all, with `null`).
///
/// The query is read as keyward splits it and as an app that decodes (and NFKC-normalizes)
/// its URL before splitting it does: the query decoded (`a=1%26_method%3DDELETE`), and
/// the decoded `path` split at each `?` and `&` (`/x%3F_method=DELETE`, a fullwidth `？`, and
/// `/x&_method=DELETE`, which parsers that look for `&name=` anywhere in the URL read).
/// Every method any of them names must agree.
pub fn with_query_method(
    alt: Option<Overridden>,
    query: Option<&str>,
    method: &Method,
    path: &str,
) -> Result<Option<Overridden>, Reject> {
    let decoded_path = crate::path::as_decoded(path);
    let decoded_query = query.map(crate::path::as_decoded);
    let in_path = decoded_path
        .contains(['?', '&'])
        .then(|| decoded_path.replace('?', "&"));
    let in_path = in_path.as_deref();
    let mut named: Option<Method> = None;
    for query in [query, decoded_query.as_deref(), in_path]
        .into_iter()
        .flatten()
    {
        method_params(query, &mut named)?;
    }
    let refuse = || Reject::BadRequest(BadRequest::MethodParam(METHOD_PARAMS[0]));
    match (named, alt) {
        (None, alt) => Ok(alt),
        (Some(m), None) if m == *method => Ok(None),
        (Some(m), None) => Ok(Some(Overridden {
            method: m,
            path: path.to_owned(),
        })),
        (Some(m), Some(alt)) if m == *method || m == alt.method => Ok(Some(alt)),
        (Some(_), Some(_)) => Err(refuse()),
    }
}

/// Add the method each [`METHOD_PARAMS`] parameter of `query` names to `named`; refused
/// as [`with_query_method`] says.
fn method_params(query: &str, named: &mut Option<Method>) -> Result<(), Reject> {
    for param in METHOD_PARAMS {
        let refuse = || Reject::BadRequest(BadRequest::MethodParam(param));
        for value in crate::auth::credential::query_param_values(query, param) {
            let value = value.ok_or_else(refuse)?;
            let value = std::str::from_utf8(&value).map_err(|_| refuse())?.trim();
            if value.is_empty() {
                continue;
            }
            let m = override_method(value).ok_or_else(refuse)?;
            agree(named, m).map_err(|()| refuse())?;
        }
    }
    Ok(())
}

/// Set `slot` to `v`, or check it already holds `v`.
fn agree<T: PartialEq>(slot: &mut Option<T>, v: T) -> Result<(), ()> {
    match slot {
        Some(old) if *old != v => Err(()),
        Some(_) => Ok(()),
        None => {
            *slot = Some(v);
            Ok(())
        }
    }
}

/// One method token, upper-cased as Express, Symfony, Laravel and ASP.NET read it. A list
/// (`DELETE, GET`) is refused: frameworks differ on which one they take.
fn override_method(value: &str) -> Option<Method> {
    if value.is_empty() || value.bytes().any(|b| !b.is_ascii_graphic() || b == b',') {
        return None;
    }
    Method::from_bytes(value.to_ascii_uppercase().as_bytes()).ok()
}

/// The path of an origin-form value (`/admin/x?y=1`), in normal form. A fragment is
/// refused (as in a request target, SPEC 7: readers differ on it), and so is a query
/// carrying the query credential when keys are not forwarded (`unforwarded_query_key`): the
/// app would take an unchecked key from it.
fn override_path(value: &str, unforwarded_query_key: Option<&str>) -> Option<String> {
    if !value.starts_with('/') || value.starts_with("//") || value.contains('#') {
        return None;
    }
    let (path, query) = value.split_once('?').unwrap_or((value, ""));
    if unforwarded_query_key.is_some_and(|k| crate::auth::credential::has_query_param(query, k)) {
        return None;
    }
    let normal = crate::path::normalize(path).ok()?;
    // The app reads the value as sent: a path that normalizing changes would be authorized
    // as one route and served as another.
    (normal.len() == path.len() && normal.eq_ignore_ascii_case(path)).then(|| normal.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pairs: &[(&str, &str)], allowed: &[&str]) -> Result<Option<Overridden>, Reject> {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let allowed: Vec<HeaderName> = allowed.iter().map(|a| a.parse().unwrap()).collect();
        overridden(&h, &allowed, &Method::POST, "/items/1", Some("api_key"))
    }

    fn alt(method: &str, path: &str) -> Option<Overridden> {
        Some(Overridden {
            method: method.parse().unwrap(),
            path: path.into(),
        })
    }

    #[test]
    fn names_the_method_and_path_an_app_would_serve() {
        let m = "x-http-method-override";
        let u = "x-original-url";
        assert_eq!(run(&[(m, "DELETE")], &[m]), Ok(alt("DELETE", "/items/1")));
        assert_eq!(run(&[(m, " delete ")], &[m]), Ok(alt("DELETE", "/items/1")));
        assert_eq!(
            run(&[(u, "/admin/x?y=1")], &[u]),
            Ok(alt("POST", "/admin/x"))
        );
        assert_eq!(
            run(&[(m, "GET"), (u, "/admin/x")], &[m, u]),
            Ok(alt("GET", "/admin/x"))
        );
        // Not let through (stripped instead), or naming what the request line says.
        assert_eq!(run(&[(m, "DELETE")], &[u]), Ok(None));
        assert_eq!(run(&[(m, "POST"), (u, "/items/1")], &[m, u]), Ok(None));
        assert_eq!(run(&[("x-host", "other")], &["x-host"]), Ok(None));
    }

    #[test]
    fn a_method_parameter_of_a_post_is_authorized_too() {
        let post = Method::POST;
        let run = |q: &str| with_query_method(None, Some(q), &post, "/items/1");
        assert_eq!(run("_method=DELETE"), Ok(alt("DELETE", "/items/1")));
        // As apps read the name and the value: decoded, any case, PHP's mangling.
        for q in [
            "a=1&_method=delete",
            "%5Fmethod=DELETE",
            "%u005Fmethod=DELETE",
            "X%u002DHTTP-Method-Override=DELETE",
            "._method=DELETE",
            "%2E_method=DELETE",
            "]_method=DELETE",
            "._method]=DELETE",
            "+_method%00%=DELETE",
            "_method%00%26%=DELETE",
            "_METHOD=DELETE",
            ".method=DELETE",
            "_method[]=DELETE",
            "_method=%44ELETE",
            "x=1;_method=+DELETE+",
            "X-HTTP-Method-Override=DELETE",
            "x-http-method=delete",
            "_method=&x-method-override=DELETE",
        ] {
            assert_eq!(run(q), Ok(alt("DELETE", "/items/1")), "{q}");
        }
        for q in [
            "_method=POST",
            "method=DELETE&x_method=DELETE",
            "",
            "_method=",
            "_method",
        ] {
            assert_eq!(run(q), Ok(None), "{q}");
        }
        // Hidden from keyward's split of the target behind an encoded `?`, `&` or `=`, as an
        // app that decodes its URL before splitting it reads it.
        for q in [
            "a=1%26_method=DELETE",
            "a=%26_method%3DDELETE",
            "a=1%EF%BC%86_method=DELETE",
        ] {
            assert_eq!(run(q), Ok(alt("DELETE", "/items/1")), "{q}");
        }
        for path in [
            "/items/1%3F_method=DELETE",
            "/items/1%3fa=1%26_method=DELETE",
            "/items/1%EF%BC%9F_method=DELETE",
        ] {
            assert_eq!(
                with_query_method(None, None, &post, path),
                Ok(alt("DELETE", path)),
                "{path}"
            );
        }
        assert_eq!(
            run("_method=PUT&a=%26_method%3DDELETE"),
            Err(Reject::BadRequest(BadRequest::MethodParam("_method")))
        );
        assert_eq!(run("q=%5Fmethod%3DDELETE"), Ok(None));
        // Only a POST's: no framework reads one on another method.
        // On every method: Hono reads one on all but GET, Express's on those it is told.
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT] {
            let named = with_query_method(None, Some("_method=DELETE"), &m, "/items/1");
            assert_eq!(named, Ok(alt("DELETE", "/items/1")), "{m}");
        }
        assert_eq!(
            with_query_method(None, Some("_method=GET"), &Method::GET, "/items/1"),
            Ok(None)
        );
        // `&name=` in the path, which parsers that search the whole URL read.
        assert_eq!(
            with_query_method(None, None, &post, "/items/1&_method=DELETE"),
            Ok(alt("DELETE", "/items/1&_method=DELETE"))
        );
        let refused = |p| Err(Reject::BadRequest(BadRequest::MethodParam(p)));
        for (q, p) in [
            ("_method=DELETE&_method=PUT", "_method"),
            (
                "_method=DELETE&x-http-method-override=PUT",
                "x-http-method-override",
            ),
            ("_method=DEL%20ETE", "_method"),
            ("_method=%zz", "_method"),
        ] {
            assert_eq!(run(q), refused(p), "{q}");
        }
        // Beside an override header: agreeing or not changing the method passes.
        let header = alt("GET", "/admin/x");
        let both = |q| with_query_method(header.clone(), Some(q), &post, "/items/1");
        assert_eq!(both("_method=GET"), Ok(header.clone()));
        assert_eq!(both("_method=POST"), Ok(header.clone()));
        assert_eq!(both("_method=DELETE"), refused("_method"));
    }

    #[test]
    fn refuses_what_an_app_could_read_more_than_one_way() {
        let m = "x-http-method-override";
        let u = "x-original-url";
        let refused = |canonical| Err(Reject::BadRequest(BadRequest::Override(canonical)));
        for value in ["DELETE, GET", "", "DEL ETE"] {
            assert_eq!(run(&[(m, value)], &[m]), refused(m), "{value:?}");
        }
        assert_eq!(run(&[(m, "GET"), (m, "DELETE")], &[m]), refused(m));
        assert_eq!(
            run(
                &[(m, "GET"), ("x-method-override", "DELETE")],
                &[m, "x-method-override"]
            ),
            refused("x-method-override")
        );
        for value in [
            "admin",
            "//admin/x",
            "/a/../admin",
            "/%61dmin",
            "http://h/admin",
        ] {
            assert_eq!(run(&[(u, value)], &[u]), refused(u), "{value:?}");
        }
    }
}
