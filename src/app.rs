//! [`App`]: the state every request, admin call and background task shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::auth::Policy;
use crate::cluster::limiter::Limiter;
use crate::cluster::revocations::Revocations;
use crate::cluster::usage::FleetUsage;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::keys::source::{KeyLoader, KeySource, StateLock};
use crate::keys::usage::Usage;
use crate::keys::{IdentityNames, KeyStore};
use crate::metrics::Metrics;
use crate::proxy::forward::Upstream;
use crate::StartError;

/// Everything a request or an admin call needs, shared as `Arc<App>`.
pub struct App {
    pub config: Config,
    pub policy: Policy,
    pub names: IdentityNames,
    /// Shared with the fleet's revocations, which keep first what the snapshot holds.
    pub store: Arc<KeyStore>,
    pub key_source: KeySource,
    /// The key sources' commit lock and after-install hook.
    pub key_loader: KeyLoader,
    /// With a state file (`keys.control.state_file`, `keys.state_file`), this process's
    /// claim on it, held for as long as the app lives: a second keyward on the same file
    /// refuses to start rather than undo this one's pushes and revokes with its own writes.
    pub state_lock: Option<StateLock>,
    pub usage: Usage,
    pub limiter: Limiter,
    /// Redis, when `cluster` is configured (SPEC 14).
    pub cluster: Option<Arc<Cluster>>,
    pub revocations: Arc<Revocations>,
    pub fleet_usage: Option<Arc<FleetUsage>>,
    pub metrics: Metrics,
    pub upstream: Upstream,
    /// This process's hop in `Via`, which tells a request that looped back to it.
    pub hop: crate::proxy::hop::Hop,
    /// Set on SIGTERM: `/readyz` fails from then on.
    pub draining: AtomicBool,
    /// Fired by SIGHUP: reload the key file now.
    pub reload: Arc<Notify>,
    /// One snapshot push (or dry run) at a time: each spools up to 512 MiB and parses it
    /// (a YAML snapshot takes about 14 times its size in memory while parsed), so pushes
    /// side by side could exhaust the disk or the pod's memory.
    pub pushes: tokio::sync::Semaphore,
    /// Refusal bodies waiting for their clients, every listener's (see
    /// [`crate::proxy::writing::OWN_ANSWERS_WAITING_MAX`]).
    pub own_answers: crate::proxy::writing::OwnAnswerBudget,
    /// HTTP/2 streams every listener's connections may hold (`limits.h2_max_streams`).
    pub h2_streams: crate::proxy::streams::StreamBudget,
}

impl App {
    /// Build the shared state. Does not load keys: `Keyward::bind` does, before serving.
    /// The state file's claim ([`App::state_lock`]) is taken by [`crate::Keyward::bind`],
    /// which may wait for it.
    pub fn new(config: Config) -> Result<Self, StartError> {
        let names = IdentityNames::new(&config.identity_headers.prefix, &config.environment)?
            .including(config.identity_headers.include.as_deref());
        let key_source = KeySource::from_config(&config.keys).ok_or(StartError::NoKeySource)?;
        // A shard per worker thread: the proxy listener's, then the decision listener's.
        let metrics = Metrics::sharded(config.metrics.per_key, 2 * worker_count(&config))
            .map_err(StartError::Metrics)?
            .with_snapshot_safety(
                config.metrics.per_key_limit,
                config.keys.max_age,
                &config.environment,
            );
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(Cluster::new(c, metrics.registry())?)),
            None => None,
        };
        let store = Arc::new(KeyStore::new());
        Ok(Self {
            policy: Policy::new(&config),
            hop: crate::proxy::hop::Hop::default(),
            // Decision mode without a proxy listener has no upstream: the pool is never used.
            upstream: Upstream::new(
                config.upstream.as_ref(),
                &config.limits,
                config.upstream_client,
            )
            .reusing_after_body(config.upstream_reuse_after_body)
            .acking_at_once(config.upstream_ack_at_once)
            .reusing_across_keys(config.upstream_reuse_across_keys),
            names,
            store: store.clone(),
            key_source,
            key_loader: KeyLoader::default(),
            state_lock: None,
            usage: Usage::default(),
            limiter: Limiter::new(cluster.as_ref()),
            revocations: Arc::new(Revocations::new(cluster.as_ref(), store)),
            fleet_usage: cluster.as_ref().map(|c| Arc::new(FleetUsage::new(c))),
            cluster,
            metrics,
            draining: AtomicBool::new(false),
            reload: Arc::new(Notify::new()),
            pushes: tokio::sync::Semaphore::new(1),
            own_answers: crate::proxy::writing::OwnAnswerBudget::default(),
            h2_streams: crate::proxy::streams::StreamBudget::new(config.limits.h2_max_streams),
            config,
        })
    }

    /// What SIGHUP fires: the file watcher's trigger, or nothing for a control source (it
    /// has no file to re-read; pushes replace its snapshot).
    pub fn reload_trigger(&self) -> Option<Arc<Notify>> {
        matches!(self.key_source, KeySource::File { .. }).then(|| self.reload.clone())
    }

    /// Proxy worker threads: `workers`, or one per CPU.
    pub fn workers(&self) -> usize {
        worker_count(&self.config)
    }

    /// Ready: a snapshot is loaded and not older than `keys.max_age`, the fleet's
    /// revocations are read (with `cluster`), and we are not draining.
    pub fn is_ready(&self) -> bool {
        self.readiness() == Readiness::Ready
    }

    /// Ready, or the first reason not to be (the order `/readyz` reports them in).
    pub fn readiness(&self) -> Readiness {
        let snapshot = self.store.guard();
        if self.draining.load(Ordering::Acquire) {
            Readiness::Draining
        } else if !self.revocations.is_ready() {
            Readiness::RevocationsUnread
        } else if let Some(s) = snapshot.as_ref() {
            match s.is_stale(std::time::SystemTime::now()) {
                true => Readiness::SnapshotTooOld,
                false => Readiness::Ready,
            }
        } else {
            Readiness::NoSnapshot
        }
    }

    /// Say when readiness changes (a snapshot aging past `keys.max_age` changes it with no
    /// event of its own), and keep `keyward_ready` true between scrapes. Runs for the life
    /// of the process.
    pub async fn watch_readiness(self: Arc<Self>) {
        let mut was = None;
        loop {
            let now = self.readiness();
            self.metrics.set_ready(now == Readiness::Ready);
            if was != Some(now) {
                match now {
                    Readiness::Ready => tracing::info!("ready"),
                    // Draining is said where shutdown starts.
                    Readiness::Draining => {}
                    other => tracing::warn!(
                        reason = other.reason(),
                        "not ready: protected routes answer 503 auth_unavailable"
                    ),
                }
                was = Some(now);
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

/// Whether keyward can authenticate (`/readyz`, `keyward_ready`), or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Draining,
    /// With `cluster`: the fleet's revocations have never been read from Redis.
    RevocationsUnread,
    /// `keys.max_age` has passed since the snapshot's `generated_at`.
    SnapshotTooOld,
    NoSnapshot,
}

impl Readiness {
    /// What the log says.
    pub fn reason(self) -> &'static str {
        self.line().trim_end()
    }

    /// What `/readyz` answers.
    pub fn line(self) -> &'static str {
        match self {
            Readiness::Ready => "ready\n",
            Readiness::Draining => "draining\n",
            Readiness::RevocationsUnread => "fleet revocations not read from redis yet\n",
            Readiness::SnapshotTooOld => "key snapshot older than keys.max_age\n",
            Readiness::NoSnapshot => "no key snapshot loaded\n",
        }
    }
}

fn worker_count(config: &Config) -> usize {
    config
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
