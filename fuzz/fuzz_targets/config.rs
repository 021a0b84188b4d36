//! `keyward.yaml` parsing and validation, and everything built from a config that passed:
//! the policy, the HTTP server settings, and the shared application state.
#![no_main]

use keyward::auth::Policy;
use keyward::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut config) = Config::from_yaml(text) else {
        return;
    };
    let policy = Policy::new(&config);
    for path in ["/", "/healthz", "/admin/x", "/auth", "/v1/items"] {
        let _ = policy.route(path);
    }
    let _ = keyward::proxy::server::http_builder(&config.limits);
    // A config that validates must start (short of binding sockets and reading keys).
    // Its state file is claimed at start (a lock file beside it): one of ours, not a path
    // the input chose; the claim ends with each run's app.
    if let Some(control) = config.keys.control.as_mut() {
        control.state_file = std::env::temp_dir().join("keyward-fuzz-config/state.yaml");
    }
    if let Err(e) = keyward::App::new(config) {
        panic!("validated config refused at start: {e}");
    }
});
