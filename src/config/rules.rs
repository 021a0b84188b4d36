//! `scopes` and `routes`: which scopes a method needs, and per-path rules.

use http::Method;
use serde::Deserialize;

use super::error::{invalid, ConfigError};
use super::yaml::de_methods;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeRule {
    #[serde(deserialize_with = "de_methods")]
    pub methods: Vec<Method>,
    pub any_of: Vec<String>,
}

/// A path rule. Exactly one of `path` (exact match) or `prefix`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub any_of: Vec<String>,
}

impl RouteRule {
    /// `path` matches exactly, with or without one trailing slash (`/reports/export` also covers
    /// `/reports/export/`, which Express, Spring and most routers send to the same handler);
    /// `prefix` matches by string prefix, and a prefix ending in `/` also covers the bare
    /// directory (`/admin/` covers `/admin`), so neither rule can be side-stepped by adding or
    /// dropping the slash. A `public` rule opens less, never more: widening a rule that asks
    /// for more is safe, widening one that asks for nothing is not. A public `prefix:
    /// /files/` opens what is under `/files/`, not `/files` nor `/files/` itself, which
    /// Express, ASP.NET Core and Spring route to the collection next to it (`POST /files`);
    /// a public `path` opens that path exactly. With `fold_case`, ASCII case is ignored.
    pub fn matches(&self, path: &str, fold_case: bool) -> bool {
        let same = |a: &str, b: &str| {
            if fold_case {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        let widen = !self.public;
        if let Some(p) = &self.path {
            let bare = |s: &str| -> usize {
                s.len() - usize::from(widen && s.len() > 1 && s.ends_with('/'))
            };
            return same(&p[..bare(p)], &path[..bare(path)]);
        }
        match &self.prefix {
            Some(p) => {
                let starts = path.get(..p.len()).is_some_and(|head| same(head, p));
                if !widen && p.ends_with('/') {
                    return starts && path.len() > p.len();
                }
                starts || widen && p.strip_suffix('/').is_some_and(|dir| same(dir, path))
            }
            None => false,
        }
    }

    /// Whether every path `later` matches is matched by this rule first (so `later` is
    /// never reached): a path this rule matches, or a prefix that starts with this one's.
    /// This rule with its path or prefix in the form requests are compared with it
    /// ([`crate::path::rule_form`]).
    pub fn compared(&self) -> RouteRule {
        let form =
            |p: &Option<String>| p.as_deref().map(|p| crate::path::rule_form(p, self.public));
        RouteRule {
            path: form(&self.path),
            prefix: form(&self.prefix),
            ..self.clone()
        }
    }

    /// This rule as an app that normalizes (NFKC) and, with `routes_case_insensitive`, folds
    /// case reads its path or prefix: a public rule that covers a protected one in this form
    /// opens that rule's paths to such an app in another spelling (`/adm%C4%B1n/` public
    /// above `/admin/`, a fullwidth `/%EF%BD%81dmin` above `/admin`).
    fn as_read(&self, fold_case: bool) -> RouteRule {
        let form = |p: &Option<String>| {
            p.as_deref().map(|p| {
                let read = crate::path::rule_form(p, false);
                match fold_case {
                    true => crate::path::fold_lookalikes(&read).into_owned(),
                    false => read,
                }
            })
        };
        RouteRule {
            path: form(&self.path),
            prefix: form(&self.prefix),
            ..self.clone()
        }
    }

    fn shadows(&self, later: &RouteRule, fold_case: bool) -> bool {
        match (&later.path, &later.prefix, &self.prefix) {
            (Some(p), _, _) => self.matches(p, fold_case),
            (None, Some(q), Some(p)) => q.get(..p.len()).is_some_and(|head| {
                if fold_case {
                    head.eq_ignore_ascii_case(p)
                } else {
                    head == p
                }
            }),
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match (&self.path, &self.prefix) {
            (Some(p), _) => format!("path {p}"),
            (_, Some(p)) => format!("prefix {p}"),
            _ => String::new(),
        }
    }
}

pub(super) fn default_scopes() -> Vec<ScopeRule> {
    vec![
        ScopeRule {
            methods: vec![Method::GET, Method::HEAD, Method::OPTIONS],
            any_of: vec!["read".into(), "write".into()],
        },
        ScopeRule {
            methods: vec![Method::POST, Method::PUT, Method::PATCH, Method::DELETE],
            any_of: vec!["write".into()],
        },
    ]
}

pub(super) fn validate_scopes(scopes: &[ScopeRule]) -> Result<(), ConfigError> {
    for (i, rule) in scopes.iter().enumerate() {
        if rule.methods.is_empty() {
            return Err(invalid(format!("scopes[{i}].methods"), "must not be empty"));
        }
        if rule.methods.iter().any(|m| m.as_str() == "*") {
            return Err(invalid(
                format!("scopes[{i}].methods"),
                "`*` is not a wildcard: list the methods",
            ));
        }
        check_scope_names(&format!("scopes[{i}].any_of"), &rule.any_of)?;
        // A method is governed by the first rule naming it: a later rule for it would
        // never apply, and silently (`DELETE` asking `admin` below a rule that lets
        // `read` delete).
        for m in &rule.methods {
            if let Some(j) = scopes[..i].iter().position(|e| e.methods.contains(m)) {
                return Err(invalid(
                    format!("scopes[{i}].methods"),
                    format!(
                        "{m} is already governed by scopes[{j}] (any_of {}): list each method in one rule",
                        scopes[j].any_of.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Scope names as keys carry them (SPEC 4): a name no key can hold would make the rule
/// refuse every key.
fn check_scope_names(field: &str, names: &[String]) -> Result<(), ConfigError> {
    if names.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    match names.iter().find(|n| !crate::keys::is_token(n)) {
        Some(bad) => Err(invalid(
            field,
            format!("{bad:?} is not a scope a key can hold (1..128 of [A-Za-z0-9_.:/-])"),
        )),
        None => Ok(()),
    }
}

/// Each rule well formed, and each reachable: rules are tried in order and the first match
/// wins, so a rule an earlier one covers entirely never applies (and a public rule above a
/// protected one would leave it open).
pub(super) fn validate_routes(routes: &[RouteRule], fold_case: bool) -> Result<(), ConfigError> {
    // Each rule's two forms, made once: made again for every pair, 20,000 rules took 9 s
    // to check (and to start).
    let forms: Vec<(RouteRule, RouteRule)> = routes
        .iter()
        .map(|r| (r.compared(), r.as_read(fold_case)))
        .collect();
    for (i, r) in routes.iter().enumerate() {
        let field = format!("routes[{i}]");
        match (&r.path, &r.prefix) {
            (Some(p), None) => check_route_path(&format!("{field}.path"), p)?,
            (None, Some(p)) => check_route_path(&format!("{field}.prefix"), p)?,
            _ => return Err(invalid(field, "set exactly one of `path` or `prefix`")),
        }
        if r.public && !r.any_of.is_empty() {
            return Err(invalid(
                format!("{field}.any_of"),
                "a public route takes no scopes",
            ));
        }
        if !r.public && r.any_of.is_empty() {
            return Err(invalid(field, "set `public: true` or a non-empty `any_of`"));
        }
        if !r.public {
            check_scope_names(&format!("{field}.any_of"), &r.any_of)?;
        }
        // In the forms requests meet them (`/a%3Ab` is `/a:b` to every rule): a public
        // rule in one spelling above a protected one in another left it open.
        let (later, later_read) = &forms[i];
        let covers = |(e, e_read): &(RouteRule, RouteRule)| {
            e.shadows(later, fold_case)
                || (e.public && !r.public && e_read.shadows(later_read, fold_case))
        };
        if let Some(j) = forms[..i].iter().position(covers) {
            return Err(invalid(
                field,
                format!(
                    "is never reached: routes[{j}] ({}) matches every path it does first",
                    routes[j].describe()
                ),
            ));
        }
    }
    Ok(())
}

pub(super) fn check_route_path(field: &str, p: &str) -> Result<(), ConfigError> {
    let normalized = crate::path::normalize(p).ok();
    if !p.starts_with('/') || normalized.as_deref() != Some(p) {
        return Err(invalid(
            field,
            format!("{p:?} must be an absolute, already-normalized path (percent-encode what is not ASCII)"),
        ));
    }
    if p.contains('*') {
        return Err(invalid(
            field,
            format!("{p:?}: `*` is not a wildcard here (a prefix rule already covers everything under it)"),
        ));
    }
    Ok(())
}
