//! A typed builder for test configs: the test base (loopback listeners on port 0, the demo
//! prefixes, routes and admin token, a 50 ms key poll) with fields set by name instead of
//! YAML strings spliced with `replacen`. Setting a field replaces it; `extra` merges a YAML
//! fragment of top-level fields over the base.

use std::net::SocketAddr;
use std::path::Path;

use serde_yaml::{Mapping, Value};

/// sha256 of `DEMO_ADMIN_TOKEN`.
pub const DEMO_ADMIN_TOKEN_SHA256: &str =
    "3f9967c81c5db39ca184a821f85aec50cb0d3ef30ecf1de704d001f48f998d35";

#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    doc: Mapping,
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("test YAML ({e}): {text}"))
}

impl ConfigBuilder {
    /// The test base in front of `upstream`, reading keys from `keys_file`.
    pub fn new(upstream: SocketAddr, keys_file: &Path) -> Self {
        let base = format!(
            "listen: 127.0.0.1:0\n\
             admin_listen: 127.0.0.1:0\n\
             upstream: http://{upstream}\n\
             environment: production\n\
             keys: {{ file: {keys}, poll_interval: 50ms }}\n\
             prefixes: {{ sta_: [service_account], ste_: [enterprise_service_account], pat_: [personal] }}\n\
             routes:\n  - {{ path: /healthz, public: true }}\n  - {{ prefix: /public/, public: true }}\n  - {{ prefix: /admin/, any_of: [admin] }}\n\
             admin: {{ token_sha256: {DEMO_ADMIN_TOKEN_SHA256} }}\n\
             shutdown: {{ drain_delay: 0s, grace: 5s }}\n\
             log: {{ format: json, level: warn }}\n",
            keys = keys_file.display()
        );
        match yaml(&base) {
            Value::Mapping(doc) => ConfigBuilder { doc },
            _ => unreachable!("the base is a mapping"),
        }
    }

    /// Set top-level `field` to a YAML value (`"{ format: json, level: info }"`).
    pub fn set(mut self, field: &str, value: &str) -> Self {
        self.doc.insert(field.into(), yaml(value));
        self
    }

    /// Set `field.sub` (the parent mapping must exist in the base or have been set).
    pub fn set_in(mut self, field: &str, sub: &str, value: &str) -> Self {
        let parent = self
            .doc
            .get_mut(field)
            .and_then(Value::as_mapping_mut)
            .unwrap_or_else(|| panic!("no mapping `{field}` in the test config"));
        parent.insert(sub.into(), yaml(value));
        self
    }

    /// Merge the fields of a YAML flow mapping (`"{ guard: { ... } }"`) into top-level
    /// mapping `field`.
    pub fn merge_in(mut self, field: &str, fragment: &str) -> Self {
        let parent = self
            .doc
            .get_mut(field)
            .and_then(Value::as_mapping_mut)
            .unwrap_or_else(|| panic!("no mapping `{field}` in the test config"));
        match yaml(fragment) {
            Value::Null => {}
            Value::Mapping(m) => parent.extend(m),
            other => panic!("fragment for `{field}` is not a mapping: {other:?}"),
        }
        self
    }

    /// Put route rules (a YAML sequence) before the base's own rules.
    pub fn prepend_routes(mut self, rules: &str) -> Self {
        let mut first = match yaml(rules) {
            Value::Null => Vec::new(),
            Value::Sequence(s) => s,
            other => panic!("route rules are not a sequence: {other:?}"),
        };
        if let Some(Value::Sequence(base)) = self.doc.get("routes") {
            first.extend(base.iter().cloned());
        }
        self.doc.insert("routes".into(), Value::Sequence(first));
        self
    }

    /// Keys from the control API, persisted to `state_file` (the file source stays too).
    pub fn control(self, state_file: &Path) -> Self {
        self.set_in(
            "keys",
            "control",
            &format!("{{ state_file: {} }}", state_file.display()),
        )
    }

    /// Drop top-level `field`.
    pub fn remove(mut self, field: &str) -> Self {
        self.doc.remove(field);
        self
    }

    /// Merge the top-level fields of a YAML fragment over the config.
    pub fn extra(mut self, fragment: &str) -> Self {
        match yaml(fragment) {
            Value::Null => {}
            Value::Mapping(m) => self.doc.extend(m),
            other => panic!("extra config is not a mapping: {other:?}"),
        }
        self
    }

    pub fn listen(self, addr: &str) -> Self {
        self.set("listen", addr)
    }

    pub fn admin_listen(self, addr: &str) -> Self {
        self.set("admin_listen", addr)
    }

    /// `keys.poll_interval`, e.g. `"1h"` when only a signal may explain a reload.
    pub fn poll_interval(self, interval: &str) -> Self {
        self.set_in("keys", "poll_interval", interval)
    }

    pub fn shutdown(self, drain_delay: &str, grace: &str) -> Self {
        self.set(
            "shutdown",
            &format!("{{ drain_delay: {drain_delay}, grace: {grace} }}"),
        )
    }

    /// `log: { format, level }`.
    pub fn log(self, format: &str, level: &str) -> Self {
        self.set("log", &format!("{{ format: {format}, level: {level} }}"))
    }

    pub fn routes(self, routes: &[&str]) -> Self {
        self.set("routes", &format!("[{}]", routes.join(", ")))
    }

    pub fn yaml(&self) -> String {
        serde_yaml::to_string(&self.doc).expect("test config serializes")
    }

    pub fn config(&self) -> keyward::config::Config {
        keyward::config::Config::from_yaml(&self.yaml()).expect("test config")
    }
}
