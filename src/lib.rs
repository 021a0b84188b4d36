//! keyward: an API-key authentication sidecar.
//!
//! The request path, file by file: [`proxy::server`] accepts → [`proxy::handler`] runs the
//! phases → [`path`] normalizes → [`auth::policy`] routes → [`auth::decision`] decides
//! (with [`auth::credential`] and the [`keys::KeyStore`] snapshot) → [`proxy::headers`] and
//! [`proxy::forward`] send it upstream over a [`proxy::pool`] connection → [`proxy::respond`] writes keyward's own answers.
//! The admin listener ([`admin`]) serves health, [`metrics`] and the control API. In decision
//! mode, [`decision`] answers an existing proxy's auth question through the same phases.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod decision;
pub mod demo;
pub mod file_watch;
mod key_host;
pub mod keygen;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::info;

use crate::auth::Policy;
use crate::cluster::limiter::Limiter;
use crate::cluster::revocations::Revocations;
use crate::cluster::usage::FleetUsage;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::keys::source::{KeyLoader, KeySource};
use crate::keys::usage::Usage;
use crate::keys::{IdentityNames, KeyStore};
use crate::metrics::Metrics;
use crate::proxy::forward::Upstream;

/// Everything a request or an admin call needs, shared as `Arc<App>`.
pub struct App {
    pub config: Config,
    pub policy: Policy,
    pub names: IdentityNames,
    pub store: KeyStore,
    pub key_source: KeySource,
    /// The key sources' commit lock and after-install hook.
    pub key_loader: KeyLoader,
    pub usage: Usage,
    pub limiter: Limiter,
    /// Redis, when `cluster` is configured (SPEC 14).
    pub cluster: Option<Arc<Cluster>>,
    pub revocations: Arc<Revocations>,
    pub fleet_usage: Option<Arc<FleetUsage>>,
    pub metrics: Metrics,
    pub upstream: Upstream,
    /// Set on SIGTERM: `/readyz` fails from then on.
    pub draining: AtomicBool,
    /// Fired by SIGHUP: reload the key file now.
    pub reload: Arc<Notify>,
}

/// Why keyward could not start. Each variant says which step failed and keeps the
/// underlying error as its `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity header names or the environment value cannot be built.
    #[error(transparent)]
    Identity(#[from] keys::IdentityError),
    #[error("keys: no source configured")]
    NoKeySource,
    #[error("metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    #[error(transparent)]
    Cluster(#[from] cluster::SetupError),
    /// The first snapshot load did not finish (its thread panicked or was cancelled).
    #[error("snapshot load: {0}")]
    SnapshotLoad(#[source] tokio::task::JoinError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl App {
    /// Build the shared state. Does not load keys (see [`keys::source::load_initial`]).
    pub fn new(config: Config) -> Result<Self, StartError> {
        let names = IdentityNames::new(&config.identity_headers.prefix, &config.environment)?;
        let key_source = KeySource::from_config(&config.keys).ok_or(StartError::NoKeySource)?;
        let metrics = Metrics::new(config.metrics.per_key)
            .map_err(StartError::Metrics)?
            .with_snapshot_safety(config.metrics.per_key_limit, config.keys.max_age);
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(Cluster::new(c, metrics.registry())?)),
            None => None,
        };
        Ok(Self {
            policy: Policy::new(&config),
            // Decision mode without a proxy listener has no upstream: the pool is never used.
            upstream: Upstream::new(
                config.upstream.as_ref().unwrap_or(&http::Uri::default()),
                &config.limits,
            ),
            names,
            store: KeyStore::new(),
            key_source,
            key_loader: KeyLoader::default(),
            usage: Usage::default(),
            limiter: Limiter::new(cluster.as_ref()),
            revocations: Arc::new(Revocations::new(cluster.as_ref())),
            fleet_usage: cluster.as_ref().map(|c| Arc::new(FleetUsage::new(c))),
            cluster,
            metrics,
            draining: AtomicBool::new(false),
            reload: Arc::new(Notify::new()),
            config,
        })
    }

    /// Ready: a snapshot is loaded and not older than `keys.max_age`, the fleet's
    /// revocations are read (with `cluster`), and we are not draining.
    pub fn is_ready(&self) -> bool {
        let fresh = self
            .store
            .guard()
            .as_ref()
            .is_some_and(|s| !s.is_stale(std::time::SystemTime::now()));
        fresh && self.revocations.is_ready() && !self.draining.load(Ordering::Acquire)
    }
}

/// A keyward instance with both listeners bound, ready to [`run`](Keyward::run).
pub struct Keyward {
    pub app: Arc<App>,
    /// The proxy listener (absent in decision mode without `listen`).
    listener: Option<TcpListener>,
    /// The decision listener (SPEC 15), with `decision.listen`.
    decision: Option<TcpListener>,
    admin: TcpListener,
    tls: Option<tls::TlsAcceptor>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// A traffic listener with `SO_REUSEPORT` (on Unix), so each worker thread can have its
/// own socket on the same port and the kernel spreads connections across them.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
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
            Some(addr) => {
                Some(bind_shared(addr).map_err(|source| StartError::Bind { addr, source })?)
            }
            None => None,
        };
        let decision = match &config.decision {
            Some(d) => Some(bind(d.listen).await?),
            None => None,
        };
        let admin = bind(config.admin_listen).await?;
        let mut app = App::new(config)?;
        app.key_loader = KeyLoader::new(after_install);
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

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.app.config.admin_listen)
    }

    /// Serve until `shutdown` resolves, then drain (SPEC 12): `/readyz` fails at once,
    /// traffic is still served for `drain_delay`, the listener closes, and in-flight
    /// requests get up to `grace` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Keyward {
            app,
            listener,
            decision,
            admin,
            tls,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut background = Vec::new();
        if let KeySource::File(path) = &app.key_source {
            background.push(tokio::spawn(keys::source::watch_file(
                app.clone(),
                path.clone(),
                app.reload.clone(),
            )));
        }
        background.extend(cluster::spawn(&app));
        if let (Some(acceptor), Some(t)) = (&tls, &app.config.tls) {
            background.push(tokio::spawn(tls::watch(acceptor.clone(), t.clone())));
        }
        let admin_task = tokio::spawn(admin::serve(app.clone(), admin, wait_true(stop_rx.clone())));
        let drain_delay = app.config.shutdown.drain_delay;
        let grace = app.config.shutdown.grace;
        let app2 = app.clone();
        let (decision_tx, decision_rx) = watch::channel(false);
        let stop_traffic = async move {
            shutdown.await;
            app2.draining.store(true, Ordering::Release);
            info!(
                ?drain_delay,
                "shutdown requested: readyz now fails; draining"
            );
            tokio::time::sleep(drain_delay).await;
            let _ = decision_tx.send(true);
        };
        let decision_task = decision.map(|l| {
            let stop = wait_true(decision_rx);
            tokio::spawn(decision::server::serve_on_threads(
                app.clone(),
                l,
                stop,
                grace,
            ))
        });
        match listener {
            Some(l) => serve_on_workers(app.clone(), l, tls, stop_traffic, grace).await,
            None => stop_traffic.await,
        }
        if let Some(task) = decision_task {
            let _ = task.await;
        }
        let _ = stop_tx.send(true);
        let _ = admin_task.await;
        for task in background {
            task.abort();
        }
        info!("keyward stopped");
    }
}

/// Thread per core: each worker thread runs its own single-threaded runtime accepting on
/// the shared listener, so a request (and its upstream connection) stays on one thread.
async fn serve_on_workers(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<tls::TlsAcceptor>,
    stop: impl Future<Output = ()> + Send,
    grace: std::time::Duration,
) {
    let workers = app
        .config
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let std_listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot share the listener");
            return;
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // One set of connection slots for all workers: `max_connections` is per process.
    let slots = proxy::server::connection_slots(&app.config.limits);
    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let listener = match worker_listener(&std_listener, i) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot share the listener");
                break;
            }
        };
        let (app, tls, stop_rx) = (app.clone(), tls.clone(), stop_rx.clone());
        let slots = slots.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("keyward-worker-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a worker runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot register the listener");
                            return;
                        }
                    };
                    app.upstream.spawn_reaper();
                    proxy::server::serve(app, listener, tls, slots, wait_true(stop_rx), grace)
                        .await;
                });
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }
    drop(std_listener);
    stop.await;
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
}

/// Worker 0 accepts on the bound listener; the others get their own `SO_REUSEPORT` socket
/// on the same address (or, where that fails, a handle to the same socket).
fn worker_listener(
    bound: &std::net::TcpListener,
    worker: usize,
) -> std::io::Result<std::net::TcpListener> {
    if worker > 0 {
        let own = bound
            .local_addr()
            .and_then(bind_shared)
            .and_then(|l| l.into_std());
        if let Ok(own) = own {
            return Ok(own);
        }
    }
    bound.try_clone()
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

    /// Resolves on SIGTERM or SIGINT; SIGHUP meanwhile triggers a key reload.
    pub async fn shutdown(mut self, reload: Arc<Notify>) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = self.term.recv() => { info!("SIGTERM received"); return; }
                _ = tokio::signal::ctrl_c() => { info!("SIGINT received"); return; }
                _ = self.hup.recv() => { info!("SIGHUP received: reloading keys"); reload.notify_one(); }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = reload;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
