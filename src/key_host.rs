//! The application as the key sources' [`Host`]: the store they publish into, and the
//! per-key state and metrics an install or a refusal updates.

use crate::config::KeysConfig;
use crate::keys::source::{Host, KeyLoader, KeySource};
use crate::keys::{KeyStore, Snapshot, Source};
use crate::App;

impl Host for App {
    fn key_store(&self) -> &KeyStore {
        &self.store
    }

    fn key_source(&self) -> &KeySource {
        &self.key_source
    }

    fn key_loader(&self) -> &KeyLoader {
        &self.key_loader
    }

    fn keys_config(&self) -> &KeysConfig {
        &self.config.keys
    }

    fn here(&self) -> crate::keys::diff::Here<'_> {
        // The fleet's revokes deny their keys' clients already: the guard does not count
        // those keys as usable (a new snapshot keeping only them would lock out everyone).
        crate::keys::diff::Here {
            revoked: Some(&*self.revocations),
            ..crate::keys::diff::Here::of(&self.config)
        }
    }

    fn installed(&self, snapshot: &Snapshot) {
        self.revocations.snapshot_changed();
        match &self.fleet_usage {
            // With a fleet, a key that left keeps its local counts until they are flushed.
            Some(fleet) => fleet.retain(&self.usage, snapshot),
            None => {
                self.usage.retain(snapshot);
            }
        }
        self.limiter.retain(snapshot);
        self.metrics.snapshot_loaded(snapshot);
    }

    fn snapshot_failed(&self, source: Source) {
        self.metrics.snapshot_failed(source);
    }

    fn snapshot_guarded(&self, source: Source) {
        self.metrics.snapshot_guarded(source);
    }

    fn snapshot_persisted(&self, source: Source) {
        self.metrics.snapshot_persisted(source);
    }
}
