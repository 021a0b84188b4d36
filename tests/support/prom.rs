//! A tiny Prometheus text-format parser for `/metrics` scrapes, and the assertions the
//! observability tests make with it.

use std::collections::{BTreeMap, BTreeSet};

use keyward::auth::Code;

use crate::support::get;

/// One `/metrics` scrape: the text, and every sample by its normalized series name
/// (`name{a="1",b="2"}`, labels sorted).
pub struct Scrape {
    pub text: String,
    pub samples: BTreeMap<String, f64>,
}

pub fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels = labels.to_vec();
    labels.sort();
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

pub fn parse_sample(line: &str) -> (String, f64) {
    let (head, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("not a sample: {line}"));
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("bad value: {line}"));
    let Some((name, rest)) = head.split_once('{') else {
        return (head.to_string(), value);
    };
    let body = rest
        .strip_suffix('}')
        .unwrap_or_else(|| panic!("unterminated labels: {line}"));
    let mut labels = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"").expect("label name");
        let end = after.find('"').expect("label value");
        labels.push((k.trim_start_matches(','), &after[..end]));
        rest = &after[end + 1..];
    }
    (series(name, &labels), value)
}

impl Scrape {
    pub fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample)
            .collect();
        Scrape { text, samples }
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = series(name, labels);
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("{key} not exported:\n{}", self.text))
    }

    pub fn has_family(&self, name: &str) -> bool {
        self.samples
            .keys()
            .any(|k| k == name || k.starts_with(&format!("{name}{{")))
    }
}

pub async fn scrape(admin: &str) -> Scrape {
    let r = get(admin, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape::parse(r.text())
}

/// The `decision` label SPEC 10 puts next to each code (the library's own table).
pub fn decision(code: Code) -> &'static str {
    keyward::metrics::decision_label(code)
}

pub fn requests(s: &Scrape, code: Code) -> f64 {
    s.get(
        "keyward_requests_total",
        &[("code", code.as_str()), ("decision", decision(code))],
    )
}

/// Exactly the listed codes moved, by the listed amounts; every other code series stayed.
pub fn assert_requests_moved(before: &Scrape, after: &Scrape, moved: &[(Code, f64)]) {
    for code in Code::ALL {
        let want = moved
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0.0, |(_, n)| *n);
        let got = requests(after, code) - requests(before, code);
        assert_eq!(
            got,
            want,
            "keyward_requests_total{{code={:?}}} moved by {got}, expected {want}",
            code.as_str()
        );
    }
}

pub fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.get(name, labels) - before.get(name, labels)
}

/// What keyward exports: metric name (with `_bucket`/`_count`/`_sum`) → label → values.
pub type Exported = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

pub fn exported(s: &Scrape) -> Exported {
    let mut out = Exported::new();
    for key in s.samples.keys() {
        let (name, labels) = key.split_once('{').unwrap_or((key, "}"));
        let entry = out.entry(name.to_string()).or_default();
        let labels = labels.strip_suffix('}').unwrap();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap();
            entry
                .entry(k.to_string())
                .or_default()
                .insert(v.trim_matches('"').to_string());
        }
    }
    out
}
