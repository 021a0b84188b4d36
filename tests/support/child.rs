//! The real `keyward` binary as a child process: one harness for every test that spawns it.
//!
//! `keyward run` prints `keyward listening proxy=… admin=… decision=…` on stdout once its
//! listeners are bound, so configs say `127.0.0.1:0` and the harness reads the real ports
//! from that line instead of guessing free ports (bind-then-drop races other tests).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::support::client;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyward");
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `keyward <args>` from the repository root, with no configuration or log filter leaking in
/// from the environment the tests run in.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(ROOT)
        .env_remove("KEYWARD_CONFIG")
        .env_remove("KEYWARD_LOG")
        .env_remove("KEYWARD_REDIS_URL")
        .env_remove("RUST_LOG");
    c
}

/// Run `keyward <args>` to completion.
pub fn run(args: &[&str]) -> Output {
    command(args).output().expect("run keyward")
}

/// Run `keyward <args>` with `input` on stdin.
pub fn run_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyward");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// The addresses from the start-up line.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub proxy: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub decision: Option<SocketAddr>,
}

/// Parse `keyward listening proxy=A admin=B decision=C` (`none` for a listener not set).
pub fn parse_listening(line: &str) -> Option<Bound> {
    let rest = line.strip_prefix("keyward listening ")?;
    let mut proxy = None;
    let mut admin = None;
    let mut decision = None;
    for field in rest.split_whitespace() {
        let (k, v) = field.split_once('=')?;
        let addr = if v == "none" {
            None
        } else {
            Some(v.parse().ok()?)
        };
        match k {
            "proxy" => proxy = addr,
            "admin" => admin = addr,
            "decision" => decision = addr,
            _ => {}
        }
    }
    Some(Bound {
        proxy,
        admin: admin?,
        decision,
    })
}

type Lines = Arc<Mutex<Vec<String>>>;

/// Collect `pipe` line by line on a thread; hand the start-up line's addresses to `bound`.
fn collect(
    pipe: impl std::io::Read + Send + 'static,
    mut bound: Option<oneshot::Sender<Bound>>,
) -> (Lines, std::thread::JoinHandle<()>) {
    let lines: Lines = Arc::default();
    let lines2 = lines.clone();
    let handle = std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            // Kept before the addresses are handed over: a test that has them reads it.
            let listening = parse_listening(&line);
            lines2.lock().unwrap().push(line);
            if let Some(b) = listening {
                if let Some(tx) = bound.take() {
                    let _ = tx.send(b);
                }
            }
        }
    });
    (lines, handle)
}

/// `keyward run` as a child process, its stderr (the logs) and stdout collected line by line.
/// Dropping it kills the process, so a failed test leaves nothing running.
pub struct Keyward {
    child: Option<Child>,
    /// The traffic listener (panics in `url` when the config has none).
    pub proxy: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub decision: Option<SocketAddr>,
    pub stderr: Lines,
    pub stdout: Lines,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Holds the config (`keyward.yaml`) and whatever else the test put there.
    pub dir: tempfile::TempDir,
}

impl Drop for Keyward {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Keyward {
    /// Write `config` to `dir/keyward.yaml`, run keyward on it with `env` set, wait for the
    /// start-up line, then for `/readyz` to answer 200.
    pub async fn start(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Keyward {
        let mut k = Keyward::spawn(dir, config, env).await;
        k.wait_ready().await;
        k
    }

    /// Like [`Keyward::start`], returning once the listeners are bound, ready or not.
    pub async fn spawn(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Keyward {
        let path = dir.path().join("keyward.yaml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = command(&["run", "--config"]);
        cmd.arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("keyward binary starts");
        let (tx, rx) = oneshot::channel();
        let (stderr, e) = collect(child.stderr.take().unwrap(), None);
        let (stdout, o) = collect(child.stdout.take().unwrap(), Some(tx));
        let mut k = Keyward {
            child: Some(child),
            proxy: None,
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            decision: None,
            stderr,
            stdout,
            readers: vec![e, o],
            dir,
        };
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(b)) => {
                k.proxy = b.proxy;
                k.admin = b.admin;
                k.decision = b.decision;
                k
            }
            // The stdout reader ended without the line: the process exited.
            Ok(Err(_)) => {
                let status = k.child.as_mut().unwrap().wait().unwrap();
                k.join_readers();
                panic!(
                    "keyward exited before it bound its listeners ({status}):\n{}",
                    k.logs().join("\n")
                )
            }
            Err(_) => panic!("no start-up line within 20 s:\n{}", k.logs().join("\n")),
        }
    }

    /// The config file the process runs on.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("keyward.yaml")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.expect("keyward has a traffic listener")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The log lines so far (stderr).
    pub fn logs(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process running").id()
    }

    /// Send `sig` (`-HUP`, `-TERM`, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    }

    /// `/readyz`'s status, or `None` while nothing answers.
    pub async fn readyz(&self) -> Option<u16> {
        readyz(self.admin).await
    }

    /// Poll `/readyz` (the readiness signal) until 200; fail early if the process exits.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.join_readers();
                panic!(
                    "keyward exited before it was ready ({status}):\n{}",
                    self.logs().join("\n")
                );
            }
            if self.readyz().await == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "keyward not ready:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Wait (bounded) for the process to exit; its status and the stderr and stdout lines.
    pub async fn wait_exit(mut self) -> (ExitStatus, Vec<String>, Vec<String>) {
        let mut child = self.child.take().unwrap();
        let readers = std::mem::take(&mut self.readers);
        let wait = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            for r in readers {
                let _ = r.join();
            }
            status
        });
        let status = tokio::time::timeout(Duration::from_secs(15), wait)
            .await
            .expect("keyward exits within 15 s")
            .unwrap()
            .unwrap();
        let stderr = self.stderr.lock().unwrap().clone();
        let stdout = self.stdout.lock().unwrap().clone();
        (status, stderr, stdout)
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub async fn terminate(self) -> (ExitStatus, Vec<String>, Vec<String>) {
        self.signal("-TERM");
        self.wait_exit().await
    }
}

/// A GET of `http://{admin}/readyz`: its status, or `None` while nothing answers.
pub async fn readyz(admin: SocketAddr) -> Option<u16> {
    status_of(&format!("http://{admin}/readyz")).await
}

/// A GET's status, or `None` when the request fails (nothing listening, reset, 2 s timeout).
pub async fn status_of(url: &str) -> Option<u16> {
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    match tokio::time::timeout(Duration::from_secs(2), client().request(req)).await {
        Ok(Ok(r)) => Some(r.status().as_u16()),
        _ => None,
    }
}
