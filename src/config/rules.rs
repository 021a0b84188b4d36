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
        if rule.any_of.is_empty() {
            return Err(invalid(format!("scopes[{i}].any_of"), "must not be empty"));
        }
    }
    Ok(())
}

pub(super) fn validate_routes(routes: &[RouteRule]) -> Result<(), ConfigError> {
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
    }
    Ok(())
}

pub(super) fn check_route_path(field: &str, p: &str) -> Result<(), ConfigError> {
    let normalized = crate::path::normalize(p).ok();
    if !p.starts_with('/') || normalized.as_deref() != Some(p) {
        return Err(invalid(
            field,
            format!("{p:?} must be an absolute, already-normalized path"),
        ));
    }
    Ok(())
}
