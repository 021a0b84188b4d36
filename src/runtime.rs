//! The process around [`App`]: binding the listeners ([`Keyward::bind`]), the worker
//! threads that serve traffic, the admin and decision listeners, background tasks, the
//! drain on shutdown ([`Keyward::run`]), and the signals that drive it ([`Signals`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::app::App;
use crate::config::Config;
use crate::keys::source::{KeyLoader, KeySource, StateLock};
use crate::proxy::server::Phase;
use crate::StartError;
use crate::{admin, decision, keys, proxy, tls};

/// A keyward instance with both listeners bound, ready to [`run`](Keyward::run).
pub struct Keyward {
    pub app: Arc<App>,
    /// The proxy listener (absent in decision mode without `listen`).
    listener: Option<TcpListener>,
    /// The decision listener (SPEC 15), with `decision.listen`.
    decision: Option<TcpListener>,
    admin: TcpListener,
    /// The probe listener, with `probe_listen`.
    probe: Option<TcpListener>,
    tls: Option<tls::TlsAcceptor>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

impl Keyward {
    /// Bind the listeners and load the first snapshot. Once this returns, both addresses
    /// accept connections, so tests and probes need no sleep.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        Self::bind_with(config, None).await
    }

    /// [`bind`](Self::bind), with `after_install` run after every snapshot install.
    pub async fn bind_with(
        config: Config,
        after_install: Option<fn()>,
    ) -> Result<Self, StartError> {
        let tls = match &config.tls {
            Some(t) => Some(tls::TlsAcceptor::load(
                t,
                config.limits.header_read_timeout,
            )?),
            None => None,
        };
        let listener = match config.listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let decision = match &config.decision {
            Some(d) => Some(bind(d.listen).await?),
            None => None,
        };
        let admin = bind(config.admin_listen).await?;
        let probe = match config.probe_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let mut app = App::new(config)?;
        // Claimed before anything reads or writes the state file (the first load follows).
        if let Some((state_file, field)) = app.key_source.state_file() {
            app.state_lock = Some(StateLock::take(state_file, field).await?);
        }
        let own = [
            listener.as_ref(),
            decision.as_ref(),
            Some(&admin),
            probe.as_ref(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|l| l.local_addr().ok())
        .collect();
        app.upstream.refuse_loops_to(own);
        app.key_loader = KeyLoader::new(after_install);
        if let Some(t) = &tls {
            let gauges = std::iter::once(t.expiry_gauge()).chain(t.crl_gauge());
            for gauge in gauges {
                app.metrics
                    .registry()
                    .register(Box::new(gauge))
                    .map_err(StartError::Metrics)?;
            }
        }
        let app = Arc::new(app);
        let app2 = app.clone();
        tokio::task::spawn_blocking(move || keys::source::load_initial(&app2))
            .await
            .map_err(StartError::SnapshotLoad)?;
        Ok(Self {
            app,
            listener,
            decision,
            admin,
            probe,
            tls,
        })
    }

    /// The proxy listener's address (`0.0.0.0:0` when there is none: decision mode only).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .or(self.app.config.listen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The decision listener's address, with `decision.listen`.
    pub fn decision_addr(&self) -> Option<SocketAddr> {
        let configured = self.app.config.decision.as_ref().map(|d| d.listen);
        self.decision
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .or(configured)
    }

    /// The probe listener's address, with `probe_listen`.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.app.config.admin_listen)
    }

    /// Serve until `shutdown` resolves, then drain (SPEC 12): `/readyz` fails at once,
    /// traffic is still served for `drain_delay` while connections are let go (HTTP/2 gets
    /// a GOAWAY, HTTP/1.1 closes after its next response), the listeners close, and
    /// in-flight requests (and tunnels) get up to `grace` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Keyward {
            app,
            listener,
            decision,
            admin,
            probe,
            tls,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut background = Vec::new();
        if let KeySource::File { path, .. } = &app.key_source {
            background.push(tokio::spawn(keys::source::watch_file(
                app.clone(),
                path.clone(),
                app.reload.clone(),
            )));
        }
        let (cluster_tasks, usage_task) = spawn_cluster(&app, stop_rx.clone());
        background.extend(cluster_tasks);
        background.push(tokio::spawn(app.clone().watch_readiness()));
        if let (Some(acceptor), Some(t)) = (&tls, &app.config.tls) {
            background.push(tokio::spawn(tls::watch(acceptor.clone(), t.clone())));
        }
        let admin_task = tokio::spawn(admin::serve(
            app.clone(),
            admin,
            admin::Surface::Admin,
            wait_true(stop_rx.clone()),
        ));
        let probe_task = probe.map(|probe| {
            tokio::spawn(admin::serve(
                app.clone(),
                probe,
                admin::Surface::Probes,
                wait_true(stop_rx.clone()),
            ))
        });
        let drain_delay = app.config.shutdown.drain_delay;
        let grace = app.config.shutdown.grace;
        let app2 = app.clone();
        // Both traffic listeners follow it: Serving → Draining → Closing.
        let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
        let stop_traffic = async move {
            shutdown.await;
            // Before the connections hear of it: their responses read it.
            app2.draining.store(true, Ordering::Release);
            let _ = phase_tx.send(Phase::Draining);
            info!(
                ?drain_delay,
                "shutdown requested: readyz now fails; draining"
            );
            tokio::time::sleep(drain_delay).await;
            let _ = phase_tx.send(Phase::Closing);
        };
        let decision_task = decision.map(|l| {
            tokio::spawn(decision::server::serve_on_threads(
                app.clone(),
                l,
                tls.clone(),
                phase_rx.clone(),
                grace,
            ))
        });
        match listener {
            Some(l) => {
                let threads = proxy::threads::Threads {
                    name: "keyward-worker",
                    first_shard: 0,
                    upstream: true,
                };
                let door = proxy::handler::handle;
                let (app, tls) = (app.clone(), tls);
                let serve =
                    proxy::threads::serve_on_threads(app, l, tls, threads, phase_rx, grace, door);
                tokio::join!(stop_traffic, serve);
            }
            None => stop_traffic.await,
        }
        if let Some(task) = decision_task {
            let _ = task.await;
        }
        let _ = stop_tx.send(true);
        // What is left after the traffic's grace ends within one bound, side by side: the
        // admin listener's own requests, the probes, and the counts since the last usage
        // flush (a stopping replica lost up to its last second of usage). One after the
        // other, an admin request that never finished its head held the exit its own 5 s
        // past `shutdown.grace`, and the last flush waited behind it (review 42).
        let rest = [Some(admin_task), probe_task, usage_task];
        let mut rest: Vec<Task> = rest.into_iter().flatten().collect();
        let all = futures_util::future::join_all(rest.iter_mut());
        if tokio::time::timeout(AFTER_GRACE, all).await.is_err() {
            // Past the bound they are stopped: a last flush would go on trying.
            for task in &rest {
                task.abort();
            }
        }
        for task in background {
            task.abort();
        }
        info!("keyward stopped");
    }
}

/// How long a stopping process waits, after `shutdown.grace`, for its admin listener's
/// requests, its probes and its last usage flush.
const AFTER_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

type Task = tokio::task::JoinHandle<()>;

/// Start the cluster's background tasks (none without `cluster`): connection upkeep,
/// revocation reads and subscription, and the usage flushes, returned apart: they end on
/// `stop` with a last flush, which the shutdown waits for.
fn spawn_cluster(app: &Arc<App>, stop: watch::Receiver<bool>) -> (Vec<Task>, Option<Task>) {
    let Some(cluster) = &app.cluster else {
        return (Vec::new(), None);
    };
    let tasks = vec![
        tokio::spawn(cluster.clone().maintain()),
        tokio::spawn(app.revocations.clone().run_sync()),
        tokio::spawn(app.revocations.clone().run_subscriber()),
    ];
    let usage = app.fleet_usage.as_ref().map(|fleet| {
        let (fleet, app) = (fleet.clone(), app.clone());
        tokio::spawn(async move { fleet.run(&app.usage, wait_true(stop)).await })
    });
    (tasks, usage)
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The process signals keyward reacts to. Installed before the listeners bind, so a
/// SIGTERM that arrives while starting is not lost (nor kills the process).
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside the runtime.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Start `server` (a `Keyward::bind`), unless SIGTERM or SIGINT comes first (a start
    /// may wait up to 30 s for a state file's lock): then `None`, and the start is dropped.
    /// A SIGHUP meanwhile is left for [`Self::shutdown`] to see.
    pub async fn unless_stopped<T>(&mut self, server: impl Future<Output = T>) -> Option<T> {
        #[cfg(unix)]
        {
            tokio::select! {
                started = server => Some(started),
                _ = self.term.recv() => { info!("SIGTERM received while starting"); None }
                _ = tokio::signal::ctrl_c() => { info!("SIGINT received while starting"); None }
            }
        }
        #[cfg(not(unix))]
        Some(server.await)
    }

    /// Resolves on SIGTERM or SIGINT; SIGHUP meanwhile triggers a key reload (`reload`:
    /// none for a control source, which has no file to re-read).
    pub async fn shutdown(mut self, reload: Option<Arc<Notify>>) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = self.term.recv() => { info!("SIGTERM received"); return; }
                _ = tokio::signal::ctrl_c() => { info!("SIGINT received"); return; }
                _ = self.hup.recv() => match &reload {
                    Some(reload) => { info!("SIGHUP received: reloading keys"); reload.notify_one(); }
                    None => warn!("SIGHUP received: ignored, a control source has no file to reload (PUT /v1/snapshot)"),
                },
            }
        }
        #[cfg(not(unix))]
        {
            let _ = reload;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The memory limit this process runs under (cgroup v2 `memory.max`, else v1
/// `memory.limit_in_bytes`), if one is set.
pub fn memory_limit() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let text = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))?;
    parse_memory_limit(&text)
}

/// `max` (v2) and v1's "no limit" (a page-rounded `i64::MAX`) are none.
fn parse_memory_limit(text: &str) -> Option<u64> {
    let n: u64 = text.trim().parse().ok()?;
    (n < 1 << 62).then_some(n)
}

/// What clients (and the app) can make the process hold at most, with no key needed:
/// - each connection its state (about 20 KB, measured) and a head up to
///   `limits.max_header_bytes`, or an HTTP/2 header block being assembled (the h2 crate
///   buffers up to six 16 KiB frames of one, in a buffer that grows by doubling: 169 KB a
///   connection measured), on each traffic listener; an HTTP/1.1 connection's request in
///   flight fits in that too (its response is held to 64 KiB ahead of its client);
/// - each HTTP/2 stream, answered or not, until its answer is written: up to about 48 KB
///   (1,024 in flight to a client that never reads: 49 KB each, measured), and the streams
///   of all connections are held to `limits.h2_max_streams` (plus one a connection);
/// - with a proxy listener, each request in flight what its client may send ahead of the
///   app reading it (an HTTP/2 stream's window, `limits.h2_stream_window`; a body on its
///   way up is also buffered by the upstream client, up to 64 KiB) and the app's response
///   head, up to 64 KiB ([`crate::proxy::h1::codec::MAX_HEAD_BYTES`]): 512 slow uploads at
///   the 256 KiB window, with 64 KB heads, took 331 MB beside the rest;
/// - and 32 MiB for the rest of the process.
pub fn connection_memory(config: &crate::config::Config) -> u64 {
    const PER_CONNECTION: u64 = 20 * 1024;
    const H2_HEADER_BLOCK: u64 = 160 * 1024;
    const PER_STREAM: u64 = 48 * 1024;
    const UPSTREAM_WRITE: u64 = 64 * 1024;
    const REST: u64 = 32 << 20;
    let l = &config.limits;
    let listeners = u64::from(config.listen.is_some()) + u64::from(config.decision.is_some());
    let each = PER_CONNECTION + (l.max_header_bytes as u64).max(H2_HEADER_BLOCK);
    let in_flight = match config.listen {
        Some(_) => {
            let head = crate::proxy::h1::codec::MAX_HEAD_BYTES as u64;
            l.max_in_flight as u64 * (u64::from(l.h2_stream_window) + UPSTREAM_WRITE + head)
        }
        None => 0,
    };
    let streams = (l.h2_max_streams + listeners as usize * l.max_connections) as u64 * PER_STREAM;
    listeners * l.max_connections as u64 * each + streams + in_flight + REST
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn memory_limits_are_read_and_sized_against() {
        assert_eq!(parse_memory_limit("268435456\n"), Some(268_435_456));
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("9223372036854771712\n"), None);
        let shipped = include_str!("../deploy/kubernetes/keyward.yaml");
        let config = crate::config::Config::from_yaml(shipped).unwrap();
        // The shipped sidecar fits the shipped 256 MiB limit.
        assert!(
            connection_memory(&config) < 256 << 20,
            "{}",
            connection_memory(&config)
        );
        // The central decision Deployment: 512 MiB.
        let decision = include_str!("../deploy/decision/kubernetes/keyward.yaml");
        let config = crate::config::Config::from_yaml(decision).unwrap();
        assert!(
            connection_memory(&config) < 512 << 20,
            "{}",
            connection_memory(&config)
        );
    }
}
