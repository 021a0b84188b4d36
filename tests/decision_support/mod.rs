//! Decision-mode harness: keyward with its decision listener on `127.0.0.1:0` (and, when
//! asked, its proxy listener too, to compare the two front doors), the demo keys plus a
//! rate-limited key, and the rules the tests need.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::support::DEMO_KEYS;

/// A key limited to a burst of 2 (and 1 more every 100 s).
pub const LIMITED_KEY: &str = "sta_decision_limited_key_0123456789abcdef";

/// Every identity header of SPEC 8, as an allowed decision names them.
pub const IDENTITY: [&str; 12] = [
    "x-auth-subject-id",
    "x-auth-account-id",
    "x-auth-enterprise-id",
    "x-auth-subject-email",
    "x-auth-account-short-id",
    "x-auth-org-id",
    "x-auth-principal-type",
    "x-auth-access-type",
    "x-auth-delegated-by",
    "x-auth-key-id",
    "x-auth-scopes",
    "x-auth-environment",
];

/// A key with a limit it does not reach in a test (100 a second): its answers carry the
/// quota headers.
pub const METERED_KEY: &str = "sta_decision_metered_key_0123456789abcdef";

pub fn keys_yaml() -> String {
    let sha = hex::encode(keyward::keys::digest(LIMITED_KEY.as_bytes()));
    let metered = hex::encode(keyward::keys::digest(METERED_KEY.as_bytes()));
    format!(
        "{DEMO_KEYS}  - {{ id: key_decision_limited, sha256: {sha}, type: service_account, subject_id: s_limited, account_id: acc_limited, scopes: [read, write], status: active, rate_limit: {{ per_second: 0.01, burst: 2 }} }}\n  - {{ id: key_decision_metered, sha256: {metered}, type: service_account, subject_id: s_metered, account_id: acc_metered, scopes: [read, write], status: active, rate_limit: {{ per_second: 100, burst: 100 }} }}\n"
    )
}

/// A running keyward with a decision listener.
pub struct Decider {
    pub decision: SocketAddr,
    /// The proxy listener, when the config has one.
    pub proxy: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub app: Arc<keyward::App>,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Decider {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.decision, path)
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.expect("a proxy listener"), path)
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The decision config: the routes and prefixes of the proxy tests, `extra` appended.
/// With `upstream`, the proxy listener is on too.
pub fn decision_config(
    upstream: Option<SocketAddr>,
    keys: &std::path::Path,
    extra: &str,
) -> String {
    let proxy = upstream.map_or(String::new(), |u| {
        format!("listen: 127.0.0.1:0\nupstream: http://{u}\n")
    });
    format!(
        "{proxy}decision: {{ listen: 127.0.0.1:0 }}\n\
         admin_listen: 127.0.0.1:0\n\
         environment: production\n\
         keys: {{ file: {keys} }}\n\
         prefixes: {{ sta_: [service_account], ste_: [enterprise_service_account], pat_: [personal] }}\n\
         routes:\n  - {{ path: /healthz, public: true }}\n  - {{ prefix: /public/, public: true }}\n  - {{ prefix: /admin/, any_of: [admin] }}\n\
         shutdown: {{ drain_delay: 0s, grace: 5s }}\n\
         log: {{ format: json, level: warn }}\n\
         {extra}",
        keys = keys.display()
    )
}

/// Start keyward in decision mode (no proxy listener unless `upstream` is given).
pub async fn spawn_decider(upstream: Option<SocketAddr>, extra: &str) -> Decider {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, keys_yaml()).unwrap();
    let config = keyward::config::Config::from_yaml(&decision_config(upstream, &keys, extra))
        .expect("decision config");
    let server = keyward::Keyward::bind(config).await.expect("keyward binds");
    let decision = server.decision_addr().expect("a decision listener");
    let proxy = upstream.map(|_| server.local_addr());
    let admin = server.admin_addr();
    let app = server.app.clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Decider {
        decision,
        proxy,
        admin,
        app,
        dir,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A free loopback port for a proxy under test (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
