//! The `keyward` command line, run as a process: `keys generate`, `keys hash` and `check`.

mod support;
use support::child::{run, run_stdin, ROOT};

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What `keys generate` printed: the raw key line and the snapshot entry.
struct Generated {
    raw: String,
    entry_text: String,
    entry: serde_yaml::Value,
}

fn generate(args: &[&str]) -> Generated {
    let mut all = vec!["keys", "generate"];
    all.extend_from_slice(args);
    let out = run(&all);
    assert!(out.status.success(), "generate failed: {}", stderr(&out));
    let text = stdout(&out);
    // Comment lines, one line with the key, then the entry (a list item for `keys:`).
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    let raw = lines.next().expect("a key line").to_string();
    let entry_text: String = lines.map(|l| format!("{l}\n")).collect();
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&format!("keys:\n{entry_text}")).expect("entry is YAML");
    let entry = doc["keys"][0].clone();
    Generated {
        raw,
        entry_text,
        entry,
    }
}

fn hash(input: &[u8]) -> String {
    let out = run_stdin(&["keys", "hash"], input);
    assert!(out.status.success(), "hash failed: {}", stderr(&out));
    stdout(&out).trim_end().to_string()
}

/// The shipped config with `keys.file` pointing at `keys` and `edit` applied, in `dir`.
fn config_with(dir: &Path, keys: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let base = std::fs::read_to_string(Path::new(ROOT).join("config/keyward.yaml")).unwrap();
    let text = base.replace(
        "file: config/keys.yaml",
        &format!("file: {}", keys.display()),
    );
    assert_ne!(
        text, base,
        "config/keyward.yaml names keys.file config/keys.yaml"
    );
    let path = dir.join("keyward.yaml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

#[test]
fn generate_then_hash_round_trip() {
    let g = generate(&[
        "--prefix",
        "sta_",
        "--type",
        "service_account",
        "--subject",
        "507f1f77bcf86cd799439099",
        "--account",
        "507f1f77bcf86cd799439012",
        "--scopes",
        "read,write",
        "--expires-at",
        "2030-01-01T00:00:00Z",
        "--environment",
        "production",
        "--id",
        "key_ci_bot",
    ]);
    let digest = g.entry["sha256"].as_str().unwrap().to_string();
    // `keys hash` of the printed key, as `keyward keys hash < key.txt` with or without a
    // trailing newline, gives the digest of the entry.
    assert_eq!(hash(format!("{}\n", g.raw).as_bytes()), digest);
    assert_eq!(hash(g.raw.as_bytes()), digest);
    assert_eq!(digest.len(), 64);

    let e = &g.entry;
    assert_eq!(e["id"], "key_ci_bot");
    assert_eq!(e["type"], "service_account");
    assert_eq!(e["subject_id"], "507f1f77bcf86cd799439099");
    assert_eq!(e["account_id"], "507f1f77bcf86cd799439012");
    assert_eq!(e["scopes"][0], "read");
    assert_eq!(e["scopes"][1], "write");
    assert_eq!(e["expires_at"], "2030-01-01T00:00:00Z");
    assert_eq!(e["environment"], "production");
    assert_eq!(e["status"], "active");
    assert!(
        !g.entry_text.contains(&g.raw),
        "the entry never holds the key"
    );

    // The entry, pasted under `keys:`, is a snapshot `keyward check` accepts.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::write(&keys, format!("version: 2\nkeys:\n{}", g.entry_text)).unwrap();
    let config = config_with(dir.path(), &keys, |t| t);
    let out = run(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 keys"), "{}", stdout(&out));
}

#[test]
fn generated_keys_are_random_urlsafe_and_prefixed() {
    let args = [
        "--prefix",
        "pat_",
        "--type",
        "personal",
        "--subject",
        "s",
        "--account",
        "a",
    ];
    let (a, b) = (generate(&args), generate(&args));
    assert_ne!(a.raw, b.raw);
    assert_ne!(a.entry["id"], b.entry["id"], "ids are generated per key");
    for g in [&a, &b] {
        let body = g.raw.strip_prefix("pat_").expect("prefix");
        assert!(
            body.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "URL-safe: {body}"
        );
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .expect("base64url");
        assert!(bytes.len() >= 32, "{} bytes of randomness", bytes.len());
        assert_eq!(g.entry["type"], "personal");
        // Defaults: read scope, active, no expiry.
        assert_eq!(g.entry["scopes"][0], "read");
        assert_eq!(g.entry["status"], "active");
        assert!(g.entry.get("expires_at").is_none());
    }
}

#[test]
fn generate_and_hash_refuse_bad_input() {
    let out = run(&[
        "keys",
        "generate",
        "--prefix",
        "sta_",
        "--type",
        "service_account",
        "--subject",
        "s",
        "--account",
        "a",
        "--expires-at",
        "next week",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("expires_at"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "no key printed for a refused entry");

    let out = run(&[
        "keys",
        "generate",
        "--type",
        "robot",
        "--subject",
        "s",
        "--account",
        "a",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--type"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    // With --config, a key the config's `prefixes` would refuse is not made at all.
    let base = ["keys", "generate", "--subject", "s", "--account", "a"];
    for extra in [
        &["--prefix", "zzz_", "--type", "service_account"][..],
        &["--prefix", "pat_", "--type", "service_account"][..],
    ] {
        let args: Vec<&str> = base
            .iter()
            .chain(extra)
            .chain(&["--config", "config/keyward.yaml"])
            .copied()
            .collect();
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        assert!(stderr(&out).contains("prefixes"), "{}", stderr(&out));
        assert!(out.stdout.is_empty(), "no key printed");
    }
    let args = [
        "--prefix",
        "pat_",
        "--type",
        "personal",
        "--config",
        "config/keyward.yaml",
    ];
    let out = run(&base.iter().chain(&args).copied().collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = run_stdin(&["keys", "hash"], b"\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no key on stdin"), "{}", stderr(&out));
}

#[test]
fn check_accepts_the_shipped_config() {
    let out = run(&["check", "--config", "config/keyward.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("config/keys.yaml: 6 keys"), "{text}");
    assert!(text.contains("config/keyward.yaml: ok"), "{text}");
    // Its admin token is the README's: fine for trying it, said out loud.
    assert!(
        stderr(&out).contains("digest of the demo token"),
        "{}",
        stderr(&out)
    );

    // KEYWARD_CONFIG names the file when --config is absent.
    let out = support::child::command(&["check"])
        .env("KEYWARD_CONFIG", "config/keyward.yaml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn check_rejects_bad_configs_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    let demo = std::fs::read_to_string(Path::new(ROOT).join("config/keys.yaml")).unwrap();
    std::fs::write(&keys, &demo).unwrap();

    let refuse = |edit: &dyn Fn(String) -> String| -> String {
        let config = config_with(dir.path(), &keys, edit);
        let out = run(&["check", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "stdout: {}", stdout(&out));
        stderr(&out)
    };
    let sub = |from: &'static str, to: &'static str| {
        move |t: String| {
            assert!(t.contains(from), "{from}");
            t.replacen(from, to, 1)
        }
    };

    let e = refuse(&sub("max_connections: 10000", "max_conections: 10000"));
    assert!(e.contains("limits.max_conections"), "{e}");
    assert!(e.contains("unknown field"), "{e}");

    let e = refuse(&|t| format!("{t}\nlisten_port: 8080\n"));
    assert!(e.contains("unknown field `listen_port`"), "{e}");

    let e = refuse(&sub("upstream_timeout: 60s", "upstream_timeout: sixty"));
    assert!(e.contains("limits.upstream_timeout"), "{e}");

    let e = refuse(&sub("drain_delay: 5s", "drain_delay: 5"));
    assert!(e.contains("shutdown.drain_delay"), "{e}");

    let e = refuse(&sub(
        "  prefix: x-auth-\n",
        "  prefix: x-auth-\n  include: [subject-id, nope]\n",
    ));
    // The item is named by its place; a quoted value from the file is never shown.
    assert!(e.contains("identity_headers.include[1]"), "{e}");
    let e = refuse(&sub(
        "  prefix: x-auth-\n",
        "  prefix: x-auth-\n  include: []\n",
    ));
    assert!(e.contains("identity_headers.include"), "{e}");

    // A unix: upstream must name an absolute socket path; it need not exist yet.
    let e = refuse(&sub(
        "upstream: http://127.0.0.1:3000",
        "upstream: unix:app.sock",
    ));
    assert!(e.contains("upstream: ") && e.contains("absolute"), "{e}");
    let socket = dir.path().join("not-yet.sock");
    let ok = config_with(dir.path(), &keys, |t| {
        t.replacen(
            "upstream: http://127.0.0.1:3000",
            &format!("upstream: unix:{}", socket.display()),
            1,
        )
    });
    let out = run(&["check", "--config", ok.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let e = refuse(&sub(
        "tls: null",
        "tls: { cert: /nonexistent/tls.crt, key: /nonexistent/tls.key }",
    ));
    assert!(e.contains("tls.cert: /nonexistent/tls.crt"), "{e}");
    // A certificate clients would refuse: expired.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let (cert, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, params.self_signed(&key).unwrap().pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let tls = format!(
        "tls: {{ cert: {}, key: {} }}",
        cert.display(),
        key_file.display()
    );
    let e = refuse(&|t: String| t.replacen("tls: null", &tls, 1));
    assert!(
        e.contains("tls.cert: ") && e.contains("expired at 2021-01-01T00:00:00Z"),
        "{e}"
    );

    // A bad entry in the key snapshot names the entry and the field.
    let bad_digest = demo.replacen(
        "sha256: 451b4043e4598c8b59570fe2073d3749196be7b9db7e0101cac04fdef07f0363",
        "sha256: 451b4043e4598c8b",
        1,
    );
    assert_ne!(bad_digest, demo);
    std::fs::write(&keys, bad_digest).unwrap();
    let e = refuse(&|t| t);
    assert!(e.contains("keys[1] id=key_demo_enterprise: sha256"), "{e}");

    let duplicate = demo.replacen("id: key_demo_enterprise", "id: key_demo_service", 1);
    std::fs::write(&keys, duplicate).unwrap();
    let e = refuse(&|t| t);
    assert!(
        e.contains("keys[1] id=key_demo_service: id: duplicate id"),
        "{e}"
    );

    // A key file that does not exist.
    std::fs::remove_file(&keys).unwrap();
    let e = refuse(&|t| t);
    assert!(e.contains(&keys.display().to_string()), "{e}");
}

/// `keyward run` under a shell whose open-files limits are `soft` and `hard` (and whose
/// core-file limit is as high as allowed): the limits it then runs with
/// (`/proc/<pid>/limits`), and its logs until it is listening.
fn run_with_open_files(soft: &str, hard: &str) -> (String, String) {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyward.yaml");
    let keys = Path::new(ROOT).join("config/keys.yaml");
    let text = format!(
        "listen: 127.0.0.1:0\nupstream: http://127.0.0.1:9\nadmin_listen: 127.0.0.1:0\nenvironment: production\nkeys: {{ file: {} }}\n",
        keys.display()
    );
    std::fs::write(&config, text).unwrap();
    let script = format!(
        "ulimit -Sc $(ulimit -Hc); ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" -c \"$1\" run"
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script, support::child::BIN, config.to_str().unwrap()])
        .env_remove("KEYWARD_LOG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let listening = stdout
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("keyward listening"));
    assert!(listening, "keyward did not start");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    (limits, stderr(&out))
}

/// The soft and hard values of the limit `named` in a `/proc/<pid>/limits` text.
fn limit(limits: &str, named: &str) -> (String, String) {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix(named))
        .unwrap_or_else(|| panic!("no {named} in {limits}"));
    let mut values = rest.split_whitespace();
    let mut next = || values.next().unwrap().to_string();
    (next(), next())
}

/// Each connection, client or upstream, is a descriptor: keyward raises its soft open-files
/// limit to the hard one, and warns at start when even that cannot hold what its limits allow
/// (`max_connections` + `max_in_flight`), before accepts and connects fail under load.
#[test]
fn the_open_files_limit_is_raised_and_a_low_one_named_at_start() {
    let (limits, logs) = run_with_open_files("256", "4096");
    assert_eq!(
        limit(&limits, "Max open files").0,
        "4096",
        "raised to the hard limit"
    );
    assert!(
        logs.contains("the open-files limit (ulimit -n) is below"),
        "{logs}"
    );
    assert!(logs.contains("\"open_files_limit\":4096"), "{logs}");
}

/// A core file would hold what the process held, raw keys in request headers included:
/// `keyward run` turns them off for good (soft and hard limit 0).
#[test]
fn core_dumps_are_off() {
    let (limits, _) = run_with_open_files("1024", "4096");
    let zero = ("0".to_string(), "0".to_string());
    assert_eq!(limit(&limits, "Max core file size"), zero, "{limits}");
}

/// Run `cmd` with `stdout` as its standard output and `input` (if any) on stdin, killed if
/// it has not ended within `limit` (a start that should have been refused): its status
/// (`None` when killed), its stderr, and how long it took.
fn finish_within(
    mut cmd: std::process::Command,
    stdout: std::process::Stdio,
    input: Option<&'static [u8]>,
    limit: std::time::Duration,
) -> (Option<i32>, String, std::time::Duration) {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let started = std::time::Instant::now();
    let mut child = cmd
        .env("RUST_BACKTRACE", "1")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || stdin.write_all(input));
    }
    let mut pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let took = started.elapsed();
    (status, stderr.join().unwrap(), took)
}

/// A stdout whose reader is gone (`keyward diff OLD NEW | head -1` once `head` has its line):
/// every write fails with a broken pipe.
fn closed_pipe() -> std::process::Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer.into()
}

fn dev_full() -> std::process::Stdio {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap()
        .into()
}

/// Every subcommand that prints, when its stdout cannot be written: a closed pipe ends it
/// quietly with 141 (128 + SIGPIPE, as a shell reports a command a broken pipe ended), any
/// other error is said on stderr with the command's error status (1; `diff`'s is 2, as
/// its 1 says the guard would refuse). Never a panic: `println!` panicked on both.
#[test]
fn a_stdout_that_cannot_be_written_ends_each_command_without_a_panic() {
    let key = b"sta_0123456789abcdefghij\n";
    let generate = [
        "keys",
        "generate",
        "--type",
        "personal",
        "--subject",
        "s",
        "--account",
        "a",
    ];
    // The arguments, stdin, and the status for a write error other than a closed pipe.
    type Case<'a> = (&'a [&'a str], Option<&'static [u8]>, i32);
    let commands: [Case; 6] = [
        (&["check", "--config", "config/keyward.yaml"], None, 1),
        (&["diff", "config/keys.yaml", "config/keys.yaml"], None, 2),
        (
            &["diff", "--json", "config/keys.yaml", "config/keys.yaml"],
            None,
            2,
        ),
        (&generate, None, 1),
        (&["keys", "hash"], Some(key), 1),
        (
            &["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
            None,
            1,
        ),
    ];
    let limit = std::time::Duration::from_secs(30);
    for (args, input, error_status) in commands {
        let (status, said, _) =
            finish_within(support::child::command(args), closed_pipe(), input, limit);
        assert_eq!(status, Some(141), "{args:?} to a closed pipe: {said}");
        assert!(
            !said.contains("panicked") && !said.contains("backtrace"),
            "{args:?}: {said}"
        );
        assert!(!said.contains("cannot write"), "quietly: {args:?}: {said}");

        let (status, said, _) =
            finish_within(support::child::command(args), dev_full(), input, limit);
        assert_eq!(status, Some(error_status), "{args:?} to /dev/full: {said}");
        assert!(
            !said.contains("panicked") && !said.contains("backtrace"),
            "{args:?}: {said}"
        );
        assert!(
            said.contains("keyward: cannot write the output: No space left on device"),
            "{args:?}: {said}"
        );
    }
}

/// `keys hash` reads at most 4 KiB and a byte of stdin: 1 MiB is refused at once, unread
/// and unshown (`keys hash < /dev/zero` took memory without end).
#[test]
fn keys_hash_refuses_more_than_a_key_unread() {
    use std::io::Write;
    use std::process::Stdio;
    let started = std::time::Instant::now();
    let mut child = support::child::command(&["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // How much of the MiB got into the pipe before keyward stopped reading it.
    let writer = std::thread::spawn(move || {
        let chunk = [b'k'; 4096];
        let mut written = 0;
        while written < 1 << 20 && stdin.write_all(&chunk).is_ok() {
            written += chunk.len();
        }
        written
    });
    let out = child.wait_with_output().unwrap();
    let written = writer.join().unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let said = stderr(&out);
    assert!(said.contains("more than 4096 bytes on stdin"), "{said}");
    assert!(!said.contains("kkkkkkkk"), "the input is not shown: {said}");
    assert!(out.stdout.is_empty());
    assert!(written < 1 << 20, "all {written} bytes were read");

    // A key of 512 bytes and its line end still hashes.
    let long = format!("sta_{}\n", "x".repeat(508));
    assert_eq!(hash(long.as_bytes()).len(), 64);
}

/// A state file that is there and is not a regular file (a FIFO, a symlink to one, a
/// directory) is refused by `run`, naming the field, as `keyward check` refuses it, and is
/// left as it was: `run` warned and started, then renamed its snapshot over it.
#[test]
fn run_refuses_a_state_file_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let directory = dir.path().join("directory");
    std::fs::create_dir(&directory).unwrap();
    let keys = Path::new(ROOT).join("config/keys.yaml");
    let file_source = |state: &Path| {
        format!(
            "keys: {{ file: {}, state_file: {} }}",
            keys.display(),
            state.display()
        )
    };
    let control =
        |state: &Path| format!("keys: {{ control: {{ state_file: {} }} }}", state.display());
    let cases = [
        (file_source(&fifo), "keys.state_file", &fifo, "a FIFO"),
        (file_source(&link), "keys.state_file", &link, "a FIFO"),
        (
            file_source(&directory),
            "keys.state_file",
            &directory,
            "a directory",
        ),
        (control(&fifo), "keys.control.state_file", &fifo, "a FIFO"),
        (control(&link), "keys.control.state_file", &link, "a FIFO"),
    ];
    for (keys_yaml, field, state, kind) in cases {
        let config = dir.path().join("keyward.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:0\nupstream: http://127.0.0.1:9\nadmin_listen: 127.0.0.1:0\nenvironment: production\n{keys_yaml}\n"
            ),
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let (status, said, _) = finish_within(
            support::child::command(&["run", "--config", config]),
            std::process::Stdio::null(),
            None,
            std::time::Duration::from_secs(15),
        );
        assert_eq!(status, Some(1), "{keys_yaml}: not refused: {said}");
        let refusal = format!(
            "keyward: {field} {}: {kind}, not a regular file",
            state.display()
        );
        assert!(said.contains(&refusal), "{keys_yaml}: {said}");
        let checked = run(&["check", "--config", config]);
        assert_eq!(checked.status.code(), Some(1), "{keys_yaml}");
        assert!(
            stderr(&checked).contains(&refusal),
            "{keys_yaml}: check says {}",
            stderr(&checked)
        );
        use std::os::unix::fs::FileTypeExt;
        let fifo_type = std::fs::symlink_metadata(&fifo).unwrap().file_type();
        assert!(fifo_type.is_fifo(), "{keys_yaml}: the FIFO was replaced");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::metadata(&directory).unwrap().is_dir());
    }
}

/// `keyward run` and `keyward check` on a config in `dir` with `keys_yaml`: run's exit
/// code (`None`: still running after 15 s) and stderr, then check's.
fn run_and_check(dir: &Path, keys_yaml: &str) -> ((Option<i32>, String), (Option<i32>, String)) {
    let config = dir.join("keyward.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nupstream: http://127.0.0.1:9\nadmin_listen: 127.0.0.1:0\nenvironment: production\n{keys_yaml}\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (status, said, _) = finish_within(
        support::child::command(&["run", "--config", config]),
        std::process::Stdio::null(),
        None,
        std::time::Duration::from_secs(15),
    );
    let checked = run(&["check", "--config", config]);
    ((status, said), (checked.status.code(), stderr(&checked)))
}

/// Another local user's state file (in a sticky directory, where anyone may create one
/// before the first push), a symlink of theirs there, or a link of ours to a file of
/// theirs: `run` and `check` refuse it, naming the field and the owner's uid, never the
/// content; what the link names is left as it was. (`run` loaded the file without a word,
/// and its keys authenticated.)
#[test]
fn run_and_check_refuse_a_state_file_another_user_owns() {
    use std::os::unix::fs::{chown, lchown, PermissionsExt};
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    let sticky = dir.path().join("st");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let snapshot = std::fs::read_to_string(Path::new(ROOT).join("config/keys.yaml")).unwrap();
    let planted = sticky.join("planted.json");
    std::fs::write(&planted, &snapshot).unwrap();
    chown(&planted, Some(NOBODY), Some(NOBODY)).unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "not a snapshot\n").unwrap();
    let their_link = sticky.join("their-link.json");
    std::os::unix::fs::symlink(&victim, &their_link).unwrap();
    lchown(&their_link, Some(NOBODY), Some(NOBODY)).unwrap();
    let dangling = sticky.join("dangling.json");
    std::os::unix::fs::symlink(dir.path().join("made-anywhere.json"), &dangling).unwrap();
    lchown(&dangling, Some(NOBODY), Some(NOBODY)).unwrap();
    let our_link = sticky.join("our-link.json");
    std::os::unix::fs::symlink(&planted, &our_link).unwrap();
    // A directory of theirs, and a link to a directory they own on the way (review 55:
    // swapped after start, it chose where revokes were written).
    let their_dir = sticky.join("theirs");
    std::fs::create_dir(&their_dir).unwrap();
    chown(&their_dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let in_their_dir = their_dir.join("state.json");
    let victim_dir = dir.path().join("victim-dir");
    std::fs::create_dir(&victim_dir).unwrap();
    let their_dir_link = sticky.join("d");
    std::os::unix::fs::symlink(&victim_dir, &their_dir_link).unwrap();
    lchown(&their_dir_link, Some(NOBODY), Some(NOBODY)).unwrap();
    let through_their_dir_link = their_dir_link.join("state.json");
    let keys = Path::new(ROOT).join("config/keys.yaml");
    let control =
        |state: &Path| format!("keys: {{ control: {{ state_file: {} }} }}", state.display());
    let cases = [
        (
            control(&planted),
            "keys.control.state_file",
            &planted,
            &planted,
        ),
        (
            control(&their_link),
            "keys.control.state_file",
            &their_link,
            &their_link,
        ),
        (
            control(&dangling),
            "keys.control.state_file",
            &dangling,
            &dangling,
        ),
        (
            control(&our_link),
            "keys.control.state_file",
            &our_link,
            &planted,
        ),
        (
            control(&in_their_dir),
            "keys.control.state_file",
            &in_their_dir,
            &their_dir,
        ),
        (
            control(&through_their_dir_link),
            "keys.control.state_file",
            &through_their_dir_link,
            &their_dir_link,
        ),
        (
            format!(
                "keys: {{ file: {}, state_file: {} }}",
                keys.display(),
                planted.display()
            ),
            "keys.state_file",
            &planted,
            &planted,
        ),
    ];
    for (keys_yaml, field, state, owned) in cases {
        let ((status, said), (checked, check_said)) = run_and_check(dir.path(), &keys_yaml);
        let refusal = format!(
            "keyward: {field} {}: {} is owned by uid {NOBODY}, not by keyward's user",
            state.display(),
            owned.display()
        );
        assert_eq!(status, Some(1), "{keys_yaml}: not refused: {said}");
        assert!(said.contains(&refusal), "{keys_yaml}: {said}");
        assert_eq!(checked, Some(1), "{keys_yaml}: check: {check_said}");
        assert!(
            check_said.contains(&refusal),
            "{keys_yaml}: check says {check_said}"
        );
        assert!(!said.contains("key_demo_service") && !check_said.contains("key_demo_service"));
    }
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "not a snapshot\n"
    );
    assert!(!dir.path().join("made-anywhere.json").exists());
    assert!(!victim_dir.join("state.json").exists());
    assert_eq!(std::fs::read_to_string(&planted).unwrap(), snapshot);
}

/// A path whose directory `run` cannot find (a loop of symlinks, a FIFO named with a
/// trailing slash) is refused by `keyward check` too, in the words of `run`: check said
/// ok, and run exited 1.
#[test]
fn check_refuses_a_state_file_path_run_cannot_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (loop1, loop2) = (dir.path().join("loop1"), dir.path().join("loop2"));
    std::os::unix::fs::symlink("loop2", &loop1).unwrap();
    std::os::unix::fs::symlink("loop1", &loop2).unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let cases = [
        (
            loop1.display().to_string(),
            "Too many levels of symbolic links",
        ),
        (format!("{}/", fifo.display()), "Not a directory"),
    ];
    for (state, why) in cases {
        let keys_yaml = format!("keys: {{ control: {{ state_file: {state} }} }}");
        let ((status, said), (checked, check_said)) = run_and_check(dir.path(), &keys_yaml);
        assert_eq!(status, Some(1), "{state}: run: {said}");
        assert_eq!(checked, Some(1), "{state}: check: {check_said}");
        let refusal = format!("keyward: keys.control.state_file {state}: cannot lock");
        for said in [&said, &check_said] {
            assert!(
                said.contains(&refusal) && said.contains(why),
                "{state}: {said}"
            );
        }
    }
}

/// `keyward run` with a key file it refuses and `env`: its stderr until it logged that no
/// snapshot is in force, or 20 seconds passed.
fn run_with_refused_keys(env: &[(&str, &str)]) -> String {
    run_with_refused_keys_and(env, "")
}

/// [`run_with_refused_keys`] with `extra` config lines.
fn run_with_refused_keys_and(env: &[(&str, &str)], extra: &str) -> String {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let (config, keys) = (
        dir.path().join("keyward.yaml"),
        dir.path().join("keys.yaml"),
    );
    std::fs::write(&keys, "keys: [{ id: broken }]\n").unwrap();
    let text = format!(
        "listen: 127.0.0.1:0\nupstream: http://127.0.0.1:9\nadmin_listen: 127.0.0.1:0\nenvironment: production\nkeys: {{ file: {} }}\n{extra}",
        keys.display()
    );
    std::fs::write(&config, text).unwrap();
    let mut command = support::child::command(&["run", "--config", config.to_str().unwrap()]);
    command
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            let done = line.contains("none is in force");
            seen.push_str(&line);
            seen.push('\n');
            if done {
                let _ = tx.send(());
            }
        }
        seen
    });
    let _ = rx.recv_timeout(std::time::Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap()
}

/// EnvFilter takes a bare word as a target, so a misspelt level (`inf0`) parsed, and turned
/// every other target off: keyward's own errors said nothing. Such a filter is ignored with
/// a warning; one that names targets only (`h2=debug`) gets keyward's default level.
#[test]
fn a_log_filter_typo_never_silences_keyward_errors() {
    let refused = "key snapshot refused and none is in force";
    for typo in ["inf0", "warnings", "garbage level", "info;x"] {
        let logs = run_with_refused_keys(&[("KEYWARD_LOG", typo)]);
        assert!(logs.contains(refused), "{typo}: {logs}");
        assert!(
            logs.contains("log filter does not parse; ignored") && logs.contains("KEYWARD_LOG"),
            "{typo}: {logs}"
        );
    }
    let logs = run_with_refused_keys(&[("RUST_LOG", "inf0")]);
    assert!(
        logs.contains(refused) && logs.contains("RUST_LOG"),
        "{logs}"
    );
    let logs = run_with_refused_keys(&[("KEYWARD_LOG", "h2=debug")]);
    assert!(logs.contains(refused), "{logs}");
    assert!(!logs.contains("does not parse"), "{logs}");
}

/// The config, like the key snapshot, goes through a pass before it is parsed: nesting
/// deeper than 64 levels (which serde_yaml reads in time quadratic in its depth: 100,000
/// levels took a minute) and YAML tags (ignored, or decoded, by serde_yaml) are refused,
/// naming where; and a `log.level` start would not obey is refused by `check` as by start.
#[test]
fn check_refuses_deep_nesting_tags_and_a_bad_log_level_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::copy(Path::new(ROOT).join("config/keys.yaml"), &keys).unwrap();
    let refuse = |edit: &dyn Fn(String) -> String| -> String {
        let config = config_with(dir.path(), &keys, edit);
        let out = run(&["check", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "stdout: {}", stdout(&out));
        stderr(&out)
    };
    let sub = |from: &'static str, to: String| {
        move |t: String| {
            assert!(t.contains(from), "{from}");
            t.replacen(from, &to, 1)
        }
    };

    let deep = 100_000;
    let nested = format!("trusted_proxies: {}{}", "[".repeat(deep), "]".repeat(deep));
    let started = std::time::Instant::now();
    let e = refuse(&sub("trusted_proxies: []", nested));
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    assert!(
        e.contains("trusted_proxies[0]") && e.contains("nested more than 64 levels deep (line "),
        "{e}"
    );

    let tags = "tags (`!name`, `%TAG`) are not accepted in the config (line ";
    for (from, to, field) in [
        (
            "environment: production",
            "environment: !!binary cHJvZHVjdGlvbg==",
            "environment",
        ),
        (
            "environment: production",
            "environment: !foo production",
            "environment",
        ),
        (
            "max_headers: 100",
            "max_headers: !!str 100",
            "limits.max_headers",
        ),
    ] {
        let e = refuse(&sub(from, to.to_string()));
        assert!(e.contains(&format!("{field}: {tags}")), "{to}: {e}");
    }

    for level in ["inf0", "'inf0 level'", "h2", "'info;x'"] {
        let e = refuse(&sub("  level: info", format!("  level: {level}")));
        assert!(
            e.contains("log.level: ") && e.contains("not a level"),
            "{level}: {e}"
        );
    }

    // A filter in the environment is not the config's: one line of warning, exit code 0.
    let ok = config_with(dir.path(), &keys, |t| t);
    let out = support::child::command(&["check", "--config", ok.to_str().unwrap()])
        .env("KEYWARD_LOG", "inf0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let warnings: Vec<_> = stderr(&out)
        .lines()
        .filter(|l| l.contains("KEYWARD_LOG"))
        .map(str::to_string)
        .collect();
    assert_eq!(warnings.len(), 1, "{}", stderr(&out));
    assert!(
        warnings[0].starts_with("warning: KEYWARD_LOG is not a log filter"),
        "{warnings:?}"
    );
}

/// A filter that would turn keyward's own targets below `error` (`off`, `keyward=off`,
/// `keyward::keys=off`) keeps its errors: they are raised to `error`, and that is said once
/// at start (and by `check`, which still accepts such a `log.level`).
#[test]
fn no_log_filter_silences_keyward_errors() {
    let refused = "key snapshot refused and none is in force";
    let kept = "log filter would silence keyward's errors; they are kept";
    for filter in [
        "keyward=off",
        "off",
        "error,keyward=off",
        "keyward::keys=off",
        "keyward::keys::source=off",
    ] {
        let logs = run_with_refused_keys(&[("KEYWARD_LOG", filter)]);
        assert!(logs.contains(refused), "{filter}: {logs}");
        assert_eq!(logs.matches(kept).count(), 1, "{filter}: {logs}");
    }
    let logs = run_with_refused_keys_and(&[], "log: { level: \"error,keyward=off\" }\n");
    assert!(logs.contains(refused), "{logs}");
    assert_eq!(logs.matches(kept).count(), 1, "{logs}");
    // Dependencies may still be turned off: no note.
    let logs = run_with_refused_keys(&[("KEYWARD_LOG", "error,h2=off")]);
    assert!(logs.contains(refused) && !logs.contains(kept), "{logs}");

    // `check` says so, and its verdict is the config's: a note, not a refusal.
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::copy(Path::new(ROOT).join("config/keys.yaml"), &keys).unwrap();
    let note = "would silence keyward's errors; they are kept";
    let ok = config_with(dir.path(), &keys, |t| t);
    let out = support::child::command(&["check", "--config", ok.to_str().unwrap()])
        .env("KEYWARD_LOG", "keyward=off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(note) && stderr(&out).contains("KEYWARD_LOG"),
        "{}",
        stderr(&out)
    );
    let quiet = config_with(dir.path(), &keys, |t| {
        t.replacen("  level: info", "  level: \"error,keyward=off\"", 1)
    });
    let out = run(&["check", "--config", quiet.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(note) && stderr(&out).contains("log.level"),
        "{}",
        stderr(&out)
    );
}

/// Every command with a stderr it cannot write (`2>/dev/full`): what it would say there is
/// lost, and its exit code is its own, as with a stderr it can write. `eprintln!` panicked
/// (with `panic = "abort"`, status 134), and `check` failed a config it accepts.
#[test]
fn an_unwritable_stderr_changes_no_exit_code() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.yaml");
    std::fs::copy(Path::new(ROOT).join("config/keys.yaml"), &keys).unwrap();
    // The shipped config has the demo token: `check` warns about it.
    let ok = config_with(dir.path(), &keys, |t| t);
    let ok = ok.to_str().unwrap();
    /// Arguments, environment, exit code.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], i32);
    let cases: [Case; 8] = [
        (&["keys", "hash"], &[], 1),
        (&["check", "--config", ok], &[], 0),
        (&["check", "--config", "/nonexistent/keyward.yaml"], &[], 1),
        (&["diff", "/nonexistent/old.yaml", "a"], &[], 2),
        (&["check", "--config", ok], &[("KEYWARD_LOG", "inf0")], 0),
        (&["check", "--config", ok], &[("KEYWARD_LOG", "off")], 0),
        (&["keys", "hash", "sta_not_here"], &[], 2),
        (&["diff", "--json", "/nonexistent/old.yaml", "a"], &[], 2),
    ];
    for (args, env, code) in cases {
        let said = support::child::command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(said.status.code(), Some(code), "{args:?} {env:?}");
        assert!(!said.stderr.is_empty(), "{args:?} {env:?}: says something");
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let status = support::child::command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(full)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(code), "{args:?} {env:?}: {status}");
    }
}

/// `keyward run` whose log pipe closes under it keeps serving: a log line it cannot write is
/// lost. tracing-subscriber reported the failed write with `eprintln!`, which panics on a
/// write error, and the release build (`panic = "abort"`) died with SIGABRT.
#[test]
fn run_keeps_serving_when_its_stderr_closes() {
    use std::io::Read;
    let (_dir, mut child, proxy) = run_with_piped_stderr();
    // Some of the log first, then the pipe closes: every line after fails to be written.
    let mut logs = child.stderr.take().unwrap();
    let mut first = [0u8; 1];
    logs.read_exact(&mut first).unwrap();
    drop(logs);
    let status_line = |path: &str| first_line_of_get(proxy, path);
    // Each request is logged (the access log, at info), each write fails.
    for n in 0..5 {
        let line = status_line(&format!("/v1/items/{n}"));
        assert!(line.starts_with("HTTP/1.1 401"), "request {n}: {line:?}");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exited, None, "keyward exited after its stderr closed");
}

/// A stderr its reader stopped reading (a stalled log collector) must not stall traffic:
/// with blocking writes from the request path, once the pipe's 64 KiB were full every task
/// that logged blocked, and ~50 refused requests with long paths stalled every request and
/// the control API while `/readyz` said ready. Lines go through a bounded queue now, and
/// what it cannot hold is dropped.
#[test]
fn run_keeps_serving_when_its_stderr_is_never_read() {
    let (_dir, mut child, proxy) = run_with_piped_stderr();
    // Held open, never read.
    let _stalled = child.stderr.take().unwrap();
    let status_line = |path: &str| first_line_of_get(proxy, path);
    // Each refusal logs ~1.5 KB: 300 of them are several times the pipe's buffer.
    let long = "p".repeat(1000);
    let started = std::time::Instant::now();
    for n in 0..300 {
        let line = status_line(&format!("/v1/{long}/{n}"));
        assert!(line.starts_with("HTTP/1.1 401"), "request {n}: {line:?}");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `keyward run` on the demo keys (logging every request), its stderr a pipe left to the
/// caller: its directory, the child, and the proxy's address.
fn run_with_piped_stderr() -> (tempfile::TempDir, std::process::Child, std::net::SocketAddr) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let (config, keys) = (
        dir.path().join("keyward.yaml"),
        dir.path().join("keys.yaml"),
    );
    std::fs::copy(Path::new(ROOT).join("config/keys.yaml"), &keys).unwrap();
    let text = format!(
        "listen: 127.0.0.1:0\nupstream: http://127.0.0.1:9\nadmin_listen: 127.0.0.1:0\nenvironment: production\nkeys: {{ file: {} }}\nlog: {{ format: json, level: debug }}\n",
        keys.display()
    );
    std::fs::write(&config, text).unwrap();
    let mut child = support::child::command(&["run", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let bound = loop {
        let line = lines.next().expect("a start-up line").unwrap();
        if let Some(b) = support::child::parse_listening(&line) {
            break b;
        }
    };
    (dir, child, bound.proxy.unwrap())
}

/// The status line of a `GET path` sent to `proxy` (empty if none came within 5 s).
fn first_line_of_get(proxy: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(proxy).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_string()
}
