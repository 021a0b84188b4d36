//! A PromQL scanner, just enough to check that dashboards and alerts name real metrics and
//! labels: it finds `keyward_*` selectors and the labels used in groupings and templates.

/// Labels Prometheus adds from the scrape target, not keyward.
pub const TARGET_LABELS: [&str; 4] = ["job", "instance", "pod", "namespace"];

/// A selector `name{label op "value", ...}` found in a PromQL expression.
pub struct Selector {
    pub name: String,
    pub matchers: Vec<(String, String, String)>,
}

pub fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `keyward_*` selector in `expr`, and every label named in `by`/`without`/`on`/
/// `ignoring` groupings and in `{{label}}` templates.
pub fn promql_refs(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let mut selectors = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("keyward_") {
        let preceded = rest[..i].chars().next_back().is_some_and(is_ident);
        let tail = &rest[i..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut after = &tail[end..];
        let mut matchers = Vec::new();
        if let Some(body) = after.strip_prefix('{') {
            let close = body.find('}').expect("closing brace");
            for m in body[..close]
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
            {
                let op_at = m.find(['=', '!']).expect("matcher operator");
                let (label, tail) = m.split_at(op_at);
                let op_len = tail.find('"').expect("quoted value");
                let value = tail[op_len..].trim_matches('"');
                matchers.push((
                    label.trim().to_string(),
                    tail[..op_len].to_string(),
                    value.to_string(),
                ));
            }
            after = &body[close + 1..];
        }
        if !preceded {
            selectors.push(Selector { name, matchers });
        }
        rest = after;
    }
    let mut labels = Vec::new();
    for word in ["by", "without", "on", "ignoring"] {
        let mut rest = expr;
        while let Some(i) = rest.find(&format!("{word} (")) {
            let preceded = rest[..i].chars().next_back().is_some_and(is_ident);
            let body = &rest[i + word.len() + 2..];
            let close = body.find(')').unwrap();
            if !preceded {
                labels.extend(body[..close].split(',').map(|l| l.trim().to_string()));
            }
            rest = &body[close..];
        }
    }
    let mut rest = expr;
    while let Some(i) = rest.find("{{") {
        let body = &rest[i + 2..];
        let close = body.find("}}").unwrap();
        let inner = body[..close].trim();
        if let Some(label) = inner.strip_prefix("$labels.") {
            labels.push(label.to_string());
        } else if inner.chars().all(is_ident) && !["end", "else"].contains(&inner) {
            // A Grafana legend `{{label}}` (Go template keywords aside).
            labels.push(inner.to_string());
        }
        rest = &body[close..];
    }
    (selectors, labels)
}
