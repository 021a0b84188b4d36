//! The deployment artifacts, checked without a container engine or a cluster: the
//! Kubernetes manifests parse and refer to each other consistently, the configs they carry
//! pass `keyward check`, the alerts and dashboard use the metrics of the contract, and the
//! Dockerfile builds the way the release build does. `kubectl kustomize` runs when kubectl
//! is installed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyward::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn path(rel: &str) -> PathBuf {
    Path::new(ROOT).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a multi-document YAML text (empty documents skipped).
fn docs_of(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn docs(rel: &str) -> Vec<Value> {
    docs_of(&read(rel), rel)
}

fn yaml_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(path(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    files.sort();
    files
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The Kubernetes objects of the base, by `kind/name`.
fn objects() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for file in yaml_files("deploy/kubernetes")
        .into_iter()
        .chain(["deploy/prometheus/alerts.yaml".to_string()])
    {
        if file.ends_with("/keyward.yaml") {
            continue; // the keyward config, not an object
        }
        for doc in docs(&file) {
            let kind = s(&doc["kind"]).to_string();
            assert!(
                doc["apiVersion"].is_string(),
                "{file}: {kind} has no apiVersion"
            );
            let name = match kind.as_str() {
                "Kustomization" => file.clone(),
                _ => s(&doc["metadata"]["name"]).to_string(),
            };
            let key = format!("{kind}/{name}");
            assert!(out.insert(key.clone(), doc).is_none(), "{key} twice");
        }
    }
    out
}

fn object<'a>(all: &'a BTreeMap<String, Value>, key: &str) -> &'a Value {
    all.get(key)
        .unwrap_or_else(|| panic!("{key} missing; have {:?}", all.keys()))
}

fn pod_config() -> Config {
    Config::from_yaml(&read("deploy/kubernetes/keyward.yaml")).expect("pod config")
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn named_port(c: &Value, name: &str) -> u16 {
    let port = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("container {:?} has no port {name}", c["name"]));
    port["containerPort"].as_u64().unwrap() as u16
}

/// Does `selector` (matchLabels or a plain map) select an object with `labels`?
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.get("matchLabels").unwrap_or(selector);
    let sel = sel.as_mapping().expect("selector labels");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn manifests_parse_and_the_kustomization_lists_them() {
    let all = objects();
    for kind in [
        "Deployment/app",
        "Service/app",
        "Service/app-keyward-admin",
        "Secret/keyward-keys",
        "ServiceMonitor/app-keyward",
        "PodDisruptionBudget/app",
        "NetworkPolicy/app",
        "PrometheusRule/keyward",
    ] {
        object(&all, kind);
    }
    let k = object(&all, "Kustomization/deploy/kubernetes/kustomization.yaml");
    let resources: Vec<&str> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    for r in &resources {
        let p = path("deploy/kubernetes").join(r);
        assert!(
            p.is_file() || p.join("kustomization.yaml").is_file(),
            "kustomization resource {r} does not exist"
        );
    }
    // Every object file of the directory is deployed (a file left out of `resources` is
    // silently not applied).
    for file in yaml_files("deploy/kubernetes") {
        let name = file.rsplit('/').next().unwrap();
        if name != "kustomization.yaml" && name != "keyward.yaml" {
            assert!(resources.contains(&name), "{file} is not in resources");
        }
    }
    let generator = &k["configMapGenerator"][0];
    assert_eq!(generator["name"], "keyward-config");
    for f in generator["files"].as_sequence().unwrap() {
        assert!(path("deploy/kubernetes").join(s(f)).is_file(), "{f:?}");
    }
    let prometheus = docs("deploy/prometheus/kustomization.yaml");
    assert!(prometheus[0]["resources"]
        .as_sequence()
        .unwrap()
        .contains(&Value::from("alerts.yaml")));
}

#[test]
fn deployment_service_config_and_secret_agree() {
    let all = objects();
    let config = pod_config();
    let deployment = object(&all, "Deployment/app");
    let template = &deployment["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    let pod = &template["spec"];
    assert!(selects(&deployment["spec"]["selector"], labels));

    // Ports: the container's named ports are keyward's listeners.
    let kw = container(pod, "keyward");
    assert_eq!(named_port(kw, "http"), config.listen.unwrap().port());
    assert_eq!(named_port(kw, "admin"), config.admin_listen.port());
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "admin_listen on loopback: probes and Prometheus could not reach it"
    );

    // The traffic Service targets keyward's traffic port, never the admin port.
    let svc = object(&all, "Service/app");
    assert!(selects(&svc["spec"]["selector"], labels));
    let targets: Vec<&Value> = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| &p["targetPort"])
        .collect();
    assert!(!targets.is_empty());
    for t in targets {
        let port = t
            .as_u64()
            .map(|p| p as u16)
            .unwrap_or_else(|| named_port(kw, s(t)));
        assert_eq!(
            port,
            config.listen.unwrap().port(),
            "Service app targets {t:?}"
        );
    }

    // The ServiceMonitor scrapes /metrics on the admin Service's admin port.
    let admin_svc = object(&all, "Service/app-keyward-admin");
    assert!(selects(&admin_svc["spec"]["selector"], labels));
    let sm = object(&all, "ServiceMonitor/app-keyward");
    assert!(selects(
        &sm["spec"]["selector"],
        &admin_svc["metadata"]["labels"]
    ));
    assert!(
        !selects(&sm["spec"]["selector"], &svc["metadata"]["labels"]),
        "the ServiceMonitor must not scrape the traffic Service"
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let admin_port = admin_svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .expect("ServiceMonitor port names an admin Service port");
    assert_eq!(
        named_port(kw, s(&admin_port["targetPort"])),
        config.admin_listen.port()
    );

    // PDB and NetworkPolicy select the pod; the policy admits exactly keyward's ports.
    let pdb = object(&all, "PodDisruptionBudget/app");
    assert!(selects(&pdb["spec"]["selector"], labels));
    let np = object(&all, "NetworkPolicy/app");
    assert!(selects(&np["spec"]["podSelector"], labels));
    let allowed: BTreeSet<u64> = np["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().unwrap().iter())
        .map(|p| p["port"].as_u64().expect("numeric port"))
        .collect();
    let expected: BTreeSet<u64> = [config.listen.unwrap().port(), config.admin_listen.port()]
        .into_iter()
        .map(u64::from)
        .collect();
    assert_eq!(allowed, expected);

    // Config and keys arrive through the volume mounted where the args and
    // keys.file expect them.
    let mount = &kw["volumeMounts"][0];
    let mount_path = Path::new(s(&mount["mountPath"]));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let mut files = BTreeMap::new();
    for source in volume["projected"]["sources"].as_sequence().unwrap() {
        for (kind, obj) in [("configMap", "ConfigMap"), ("secret", "Secret")] {
            if let Some(src) = source.get(kind) {
                for item in src["items"].as_sequence().unwrap() {
                    files.insert(
                        mount_path.join(s(&item["path"])),
                        (
                            obj,
                            s(&src["name"]).to_string(),
                            s(&item["key"]).to_string(),
                        ),
                    );
                }
            }
        }
    }
    let args: Vec<&str> = kw["args"].as_sequence().unwrap().iter().map(s).collect();
    let config_arg = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    assert_eq!(
        files.get(Path::new(config_arg)),
        Some(&(
            "ConfigMap",
            "keyward-config".to_string(),
            "keyward.yaml".to_string()
        )),
        "--config {config_arg} is the ConfigMap's keyward.yaml"
    );
    let keys_file = config.keys.file.clone().expect("keys.file");
    let (_, secret_name, secret_key) = files
        .get(&keys_file)
        .unwrap_or_else(|| panic!("keys.file {} is not mounted", keys_file.display()));
    let secret = object(&all, &format!("Secret/{secret_name}"));
    assert!(secret["stringData"][secret_key.as_str()].is_string());

    // The app is reachable only on loopback, where `upstream` points.
    let upstream = config
        .upstream
        .as_ref()
        .unwrap()
        .authority()
        .unwrap()
        .as_str()
        .to_string();
    assert!(upstream.starts_with("127.0.0.1:"), "{upstream}");
    let app = container(pod, "app");
    let app_args = serde_yaml::to_string(&app["args"]).unwrap();
    assert!(
        app_args.contains(&upstream),
        "app does not listen on {upstream}"
    );
    assert!(app.get("ports").is_none(), "the app declares no pod port");
}

#[test]
fn pod_is_hardened_probed_and_outlives_the_drain() {
    let all = objects();
    let config = pod_config();
    let pod = &object(&all, "Deployment/app")["spec"]["template"]["spec"];
    let kw = container(pod, "keyward");

    for (probe, want) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &kw[probe]["httpGet"];
        assert_eq!(get["path"], want, "{probe}");
        let port = get["port"]
            .as_u64()
            .map(|p| p as u16)
            .unwrap_or_else(|| named_port(kw, s(&get["port"])));
        assert_eq!(
            port,
            config.probe_listen.unwrap_or(config.admin_listen).port(),
            "{probe} on the probe listener"
        );
    }

    // After the grace, up to 3 s more: the admin listener's requests, the last usage flush
    // (2 s), blocking work they left (1 s).
    let needed = config.shutdown.drain_delay + config.shutdown.grace + Duration::from_secs(3);
    let tgps = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    assert!(
        tgps > needed,
        "{tgps:?} <= drain_delay + grace + 3s {needed:?}"
    );

    let pod_non_root = pod["securityContext"]["runAsNonRoot"] == true;
    for c in pod["containers"].as_sequence().unwrap() {
        let name = s(&c["name"]);
        let sc = &c["securityContext"];
        assert!(
            pod_non_root || sc["runAsNonRoot"] == true,
            "{name}: runAsNonRoot"
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        let drop = sc["capabilities"]["drop"].as_sequence().unwrap();
        assert!(drop.contains(&Value::from("ALL")), "{name}: drop ALL");
        for r in ["requests", "limits"] {
            for what in ["cpu", "memory"] {
                assert!(c["resources"][r][what].is_string(), "{name}: {r}.{what}");
            }
        }
        // A subPath mount never sees updates: the rotated keys would stay unseen.
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            assert!(m.get("subPath").is_none(), "{name}: subPath mount");
        }
    }
    assert_eq!(kw["securityContext"]["runAsNonRoot"], true);
}

/// The Secret's snapshot, as a file.
fn secret_keys(dir: &Path) -> PathBuf {
    let all = objects();
    let text = s(&object(&all, "Secret/keyward-keys")["stringData"]["keys.yaml"]).to_string();
    assert!(
        !text.contains("sta_demo_service_key"),
        "no raw key in the Secret"
    );
    let p = dir.join("keys.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `keyward check` on `config_rel` with `keys.file` pointed at `keys`.
fn check_with_keys(config_rel: &str, keys: &Path, dir: &Path) -> String {
    let mut cfg: Value = serde_yaml::from_str(&read(config_rel)).unwrap();
    cfg["keys"]["file"] = Value::from(keys.display().to_string());
    let copy = dir.join(config_rel.replace('/', "_"));
    std::fs::write(&copy, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let out = support::child::command(&["check", "--config"])
        .arg(&copy)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "keyward check {config_rel}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn shipped_configs_pass_keyward_check() {
    let dir = tempfile::tempdir().unwrap();
    let keys = secret_keys(dir.path());
    for rel in [
        "deploy/kubernetes/keyward.yaml",
        "deploy/docker/keyward.yaml",
    ] {
        let config = Config::from_yaml(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(config.tls.is_none(), "{rel}: TLS is opt-in");
        let out = check_with_keys(rel, &keys, dir.path());
        assert!(out.contains("2 keys"), "{rel}: {out}");
    }
    // The image's config reads the snapshot from the path the Dockerfile documents.
    let docker = Config::from_yaml(&read("deploy/docker/keyward.yaml")).unwrap();
    assert_eq!(
        docker.keys.file.as_deref(),
        Some(Path::new("/etc/keyward/keys.yaml"))
    );
}

/// The metric names of the contract (SPEC 10).
const METRICS: &[&str] = &[
    "keyward_requests_total",
    "keyward_request_duration_seconds",
    "keyward_auth_duration_seconds",
    "keyward_upstream_duration_seconds",
    "keyward_upstream_errors_total",
    "keyward_in_flight_requests",
    "keyward_snapshot_keys",
    "keyward_snapshot_version",
    "keyward_snapshot_reloads_total",
    "keyward_snapshot_last_reload_timestamp_seconds",
    "keyward_key_expiry_timestamp_seconds",
    "keyward_snapshot_generated_timestamp_seconds",
    "keyward_snapshot_max_age_seconds",
    "keyward_ready",
    "keyward_snapshot_refused",
    // With `tls`.
    "keyward_tls_cert_expiry_timestamp_seconds",
    "keyward_tls_crl_next_update_timestamp_seconds",
    // SPEC 14 (with `cluster`).
    "keyward_cluster_up",
    "keyward_cluster_errors_total",
    "keyward_cluster_call_duration_seconds",
    "keyward_revocation_lag_seconds",
];

fn unknown_metrics(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("keyward_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|b| b.ends_with("_seconds"))
            })
            .unwrap_or(name);
        if !METRICS.contains(&base) {
            out.push(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn alerts_and_dashboard_use_the_contract_metrics() {
    let all = objects();
    let rule = object(&all, "PrometheusRule/keyward");
    let readme = read("deploy/README.md");
    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_sequence().unwrap() {
        for r in group["rules"].as_sequence().unwrap() {
            let expr = s(&r["expr"]);
            assert_eq!(unknown_metrics(expr), Vec::<String>::new(), "{expr}");
            if let Some(name) = r.get("alert") {
                let name = s(name).to_string();
                assert!(r["labels"]["severity"].is_string(), "{name}: severity");
                assert!(r["annotations"]["summary"].is_string(), "{name}: summary");
                let runbook = s(&r["annotations"]["runbook_url"]);
                assert!(runbook.ends_with(&format!("#runbook-{}", name.to_lowercase())));
                assert!(
                    readme.contains(&format!("### Runbook: {name}\n")),
                    "{name}: no runbook section in deploy/README.md"
                );
                alerts.insert(name);
            }
        }
    }
    for needed in [
        "KeywardAuthUnavailable",
        "KeywardSnapshotReloadFailing",
        "KeywardDeniedRatioHigh",
        "KeywardUpstreamErrors",
        "KeywardSnapshotGuarded",
        "KeywardSnapshotTooOld",
    ] {
        assert!(alerts.contains(needed), "alert {needed} missing");
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/keyward-dashboard.json")).unwrap();
    let text = dashboard.to_string();
    let mut exprs = 0;
    fn walk(v: &serde_json::Value, f: &mut dyn FnMut(&str)) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v.as_str()) {
                        ("expr", Some(e)) => f(e),
                        _ => walk(v, f),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, f)),
            _ => {}
        }
    }
    walk(&dashboard, &mut |e| {
        exprs += 1;
        assert_eq!(unknown_metrics(e), Vec::<String>::new(), "{e}");
    });
    assert!(exprs > 5, "{exprs} queries in the dashboard");
    assert_eq!(unknown_metrics(&text), Vec::<String>::new());
}

/// Dockerfile instructions with continuation lines joined, as (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (ins, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((ins.to_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_builds_a_locked_release_and_runs_as_non_root() {
    let ins = dockerfile();
    let all = |name: &str| -> Vec<&str> {
        ins.iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert!(froms.len() >= 2, "multi-stage");
    let runtime = froms.last().unwrap();
    assert!(
        runtime.contains("distroless/cc")
            || (runtime.contains("debian:") && runtime.contains("slim")),
        "small runtime image: {runtime}"
    );

    // Every build is `--release --locked`, and the last one installs the binary.
    let builds: Vec<&str> = all("RUN")
        .into_iter()
        .filter(|r| r.contains("cargo build"))
        .collect();
    assert!(
        builds.len() >= 2,
        "a cached dependency layer, then the crate"
    );
    for b in &builds {
        assert!(b.contains("cargo build --release --locked"), "{b}");
    }
    assert!(builds.last().unwrap().contains("target/release/keyward"));

    // The runtime stage runs as a non-root user.
    let user = all("USER").last().copied().expect("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "USER {user}");
    let user_after_from = ins.iter().rposition(|(i, _)| i == "USER").unwrap()
        > ins.iter().rposition(|(i, _)| i == "FROM").unwrap();
    assert!(user_after_from, "USER is set in the runtime stage");

    // Both ports of the baked-in config are exposed.
    let config = Config::from_yaml(&read("deploy/docker/keyward.yaml")).unwrap();
    let exposed: BTreeSet<u16> = all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    let ports: BTreeSet<u16> = [config.listen.unwrap().port(), config.admin_listen.port()].into();
    assert_eq!(exposed, ports);

    // The config lands where KEYWARD_CONFIG and the command look for it.
    assert!(all("COPY")
        .iter()
        .any(|c| c.starts_with("deploy/docker/keyward.yaml /out/etc/keyward/keyward.yaml")));
    assert!(all("ENV")
        .iter()
        .any(|e| e.contains("KEYWARD_CONFIG=/etc/keyward/keyward.yaml")));
    assert!(all("CMD")
        .last()
        .unwrap()
        .contains("\"/etc/keyward/keyward.yaml\""));

    // What COPY needs from the context is not excluded by .dockerignore.
    let ignore = read(".dockerignore");
    let included: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .collect();
    assert!(ignore.lines().any(|l| l.trim() == "*"), "allow-list style");
    for copy in all("COPY") {
        if copy.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = copy.split_whitespace().collect();
        for src in &words[..words.len() - 1] {
            assert!(
                included.contains(src),
                "COPY {src}: excluded by .dockerignore"
            );
            assert!(path(src).exists(), "COPY {src}: missing");
        }
    }
}

/// Run the Dockerfile's dependency-layer script on a copy of Cargo.toml and Cargo.lock,
/// with `cargo metadata` in place of the build: the stub targets it writes satisfy the
/// manifest, and `--locked` holds (Cargo.lock is current), so the image build does not
/// stop at its first step.
#[test]
fn dockerfile_dependency_layer_accepts_the_manifest() {
    let run = dockerfile()
        .into_iter()
        .find(|(i, a)| i == "RUN" && a.contains("fn main() {}"))
        .expect("the stub RUN")
        .1;
    let script = run.replace(
        "cargo build --release --locked",
        "cargo metadata --locked --offline --format-version 1 \
         --filter-platform \"$(rustc -vV | sed -n 's/^host: //p')\" > metadata.json",
    );
    assert_ne!(script, run);
    let dir = tempfile::tempdir().unwrap();
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(path(f), dir.path().join(f)).unwrap();
    }
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "dependency layer script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("metadata.json")).unwrap()).unwrap();
    let keyward = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "keyward")
        .unwrap();
    let kinds: BTreeSet<String> = keyward["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}:{}",
                t["kind"][0].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect();
    assert!(kinds.contains("bin:keyward"), "{kinds:?}");
}

#[test]
fn kustomize_renders_the_base() {
    let out = match Command::new("kubectl")
        .args(["kustomize", "deploy/kubernetes"])
        .current_dir(ROOT)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("note: kubectl not found; `kubectl kustomize deploy/kubernetes` skipped");
            return;
        }
        Err(e) => panic!("kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = docs_of(&String::from_utf8_lossy(&out.stdout), "rendered base");
    let by_kind =
        |kind: &str| -> Vec<&Value> { rendered.iter().filter(|d| d["kind"] == kind).collect() };
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PrometheusRule",
    ] {
        assert!(!by_kind(kind).is_empty(), "{kind} not rendered");
    }
    // The generated ConfigMap holds the config verbatim, and the Deployment refers to
    // its hashed name.
    let cm = by_kind("ConfigMap")[0];
    assert_eq!(
        s(&cm["data"]["keyward.yaml"]),
        read("deploy/kubernetes/keyward.yaml")
    );
    Config::from_yaml(s(&cm["data"]["keyward.yaml"])).expect("rendered config");
    let cm_name = s(&cm["metadata"]["name"]);
    assert!(cm_name.starts_with("keyward-config-"), "{cm_name}");
    let deployment = serde_yaml::to_string(by_kind("Deployment")[0]).unwrap();
    assert!(
        deployment.contains(&format!("name: {cm_name}\n")),
        "{deployment}"
    );
    // The image is rewritten by the kustomization's `images`.
    assert!(deployment.contains("image: keyward:0.1.0"), "{deployment}");
}

/// The unix-socket component: its config is the base's with only `upstream` changed, to a
/// socket in a volume the app and keyward mount and no other container; it passes `keyward
/// check`; and the overlay renders with that config in place of the base's.
#[test]
fn unix_socket_component_shares_the_socket_with_the_app_only() {
    const DIR: &str = "deploy/kubernetes/components/unix-socket";
    let rel = format!("{DIR}/keyward.yaml");
    let mut component: Value = serde_yaml::from_str(&read(&rel)).unwrap();
    let base: Value = serde_yaml::from_str(&read("deploy/kubernetes/keyward.yaml")).unwrap();
    let upstream = s(&component["upstream"]).to_string();
    component["upstream"] = base["upstream"].clone();
    assert_eq!(
        component, base,
        "{rel} differs from the base beyond `upstream`"
    );
    let config = Config::from_yaml(&read(&rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let socket = config
        .upstream
        .as_ref()
        .and_then(|u| u.unix_path())
        .unwrap();
    assert_eq!(format!("unix:{}", socket.display()), upstream);
    let dir = tempfile::tempdir().unwrap();
    let out = check_with_keys(&rel, &secret_keys(dir.path()), dir.path());
    assert!(out.contains("2 keys"), "{out}");

    // The patch mounts one in-memory emptyDir at the socket's directory, in the app and
    // keyward.
    let patch = &docs(&format!("{DIR}/socket-volume.yaml"))[0];
    let pod = &patch["spec"]["template"]["spec"];
    let volume = &pod["volumes"][0];
    assert_eq!(volume["emptyDir"]["medium"], "Memory");
    let name = s(&volume["name"]);
    let mounted: Vec<&str> = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|c| {
            c["volumeMounts"].as_sequence().is_some_and(|ms| {
                ms.iter().any(|m| {
                    m["name"] == name && Path::new(s(&m["mountPath"])) == socket.parent().unwrap()
                })
            })
        })
        .map(|c| s(&c["name"]))
        .collect();
    assert_eq!(mounted, ["app", "keyward"]);

    let out = match Command::new("kubectl")
        .args(["kustomize", "deploy/overlays/unix-socket"])
        .current_dir(ROOT)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("note: kubectl not found; the unix-socket overlay is not rendered");
            return;
        }
        Err(e) => panic!("kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = docs_of(&String::from_utf8_lossy(&out.stdout), "unix-socket overlay");
    let cms: Vec<&Value> = rendered
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .collect();
    assert_eq!(cms.len(), 1, "the component's config replaces the base's");
    assert_eq!(s(&cms[0]["data"]["keyward.yaml"]), read(&rel));
    let deployment = rendered.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let text = serde_yaml::to_string(deployment).unwrap();
    assert!(text.contains(s(&cms[0]["metadata"]["name"])), "{text}");
    assert_eq!(text.matches("name: app-socket").count(), 3, "{text}");
}
