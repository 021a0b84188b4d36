//! The blast-radius guard (SPEC 16): a new snapshot that removes or disables too large a
//! share of the keys in force, an empty one replacing a non-empty one, or a push whose
//! `version` is older than the one in force (SPEC 4: versions only increase), is refused
//! like an invalid one unless it is forced. The verdict is drawn from [`diff`](super::diff::diff).

use std::fmt;

use serde::Serialize;

use super::diff::{diff, Here, Sides, SnapshotDiff};
use super::Snapshot;
use crate::config::GuardConfig;

/// Why the guard refuses a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An empty snapshot would replace a non-empty one, or one with no usable key (it lets
    /// nobody in, as an empty one) one with a usable key.
    Empty,
    /// A push not newer than the snapshot in force: a stale writer (a retried job, a second
    /// pipeline), which would undo every change made since, revokes included. Its
    /// `version` is below the one in force, or equal to it while adding or enabling a key
    /// (a disable through the API keeps the version: a retried push of that version lifted
    /// the revoke, and so did one renaming the key or two in a row removing and restoring
    /// it; a retry, or a change that only takes away, passes), or missing while one is in
    /// force (versions only increase, and an unversioned push in force let any older
    /// version in after it).
    Rollback,
    /// Too large a fraction of the keys in force would be removed or disabled.
    Fraction,
}

/// The guard's verdict on a diff, with the counts it was drawn from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub would_refuse: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The diff's sizes and versions: `usable_in_force` is the fraction's denominator, the
    /// versions are what the rollback rule reads.
    #[serde(flatten)]
    pub sides: Sides,
    /// Usable keys in force that the new snapshot removes.
    pub removed: usize,
    /// Usable keys in force that the new snapshot disables.
    pub disabled: usize,
    /// Usable keys in force that stay active but refuse their clients (see
    /// [`SnapshotDiff::locked_out`]).
    pub locked_out: usize,
    /// Keys disabled in force that the new snapshot enables.
    pub enabled: usize,
    /// `(removed + disabled + locked_out) / usable_in_force` (0 when none is usable).
    pub fraction: f64,
    /// `keys.guard.max_removed_fraction`.
    pub limit: f64,
    /// `keys.guard.min_keys`: below this many keys in force (SPEC 16: usable or not), only
    /// the empty and rollback rules apply.
    pub min_keys: usize,
    /// Set when the keys were counted against the snapshot in force a [`WINDOW`] ago, which
    /// another replaced this many seconds ago, rather than the one in force now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_secs: Option<u64>,
    /// With `since_secs`: the version of that snapshot, the one the counts are of
    /// (`version_in_force` stays the version in force now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_version: Option<u64>,
}

/// A new snapshot is also judged against the one in force this long ago (when another has
/// replaced it since): a snapshot that adds a hundred new keys, then one that keeps only
/// those, each removed a small share of the keys in force and together all the keys clients
/// used (review: every real client refused by two unforced pushes 10 ms apart). Sliding, so
/// two steps seconds apart are never judged apart; a forced snapshot starts afresh from
/// the snapshot it installs. A key disabled through the API does not (a no-op disable
/// reset the window, and a push after it escaped the changes before it): the window's
/// snapshots count the key as disabled too.
pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Judge a diff by the guard's settings.
pub fn judge(d: &SnapshotDiff, cfg: &GuardConfig) -> Verdict {
    let (removed, disabled, locked_out) = (d.removed_usable, d.disabled.len(), d.locked_out.len());
    let sides = d.sides;
    let usable_in_force = sides.usable_in_force;
    let fraction = if usable_in_force == 0 {
        0.0
    } else {
        (removed + disabled + locked_out) as f64 / usable_in_force as f64
    };
    let rollback = d.pushed
        && match (sides.version_in_force, sides.version) {
            (Some(old), Some(new)) => new < old || (new == old && d.grants()),
            (Some(_), None) => true,
            (None, _) => false,
        };
    // SPEC 16: an empty snapshot replacing a non-empty one, whatever `min_keys`; and, as
    // empty, one with no usable key (all disabled, expired, not yet valid, bound to another
    // environment, revoked by the fleet) replacing one with a usable key: it lets nobody
    // in, as an empty one does (review: three keys all disabled went live unguarded below
    // `min_keys`). Force takes either. `min_keys` counts the keys in force, as SPEC 16
    // says, not the usable ones: disabled or fleet-revoked keys must not bring a large
    // snapshot under it (30 keys, 21 disabled: removing the other 9 is removing every
    // usable key).
    // A key counts as usable only if some `scopes` rule lets it use a method and the
    // snapshot is not already past `keys.max_age` (see `diff`): below `min_keys`, every key
    // given `scopes: [bogus]` went live and every request got 403 (review 53).
    let empty =
        (sides.keys == 0 && sides.in_force > 0) || (sides.usable == 0 && sides.usable_in_force > 0);
    let reason = if empty {
        Some(Reason::Empty)
    } else if rollback {
        Some(Reason::Rollback)
    } else if sides.in_force >= cfg.min_keys && fraction > cfg.max_removed_fraction {
        Some(Reason::Fraction)
    } else {
        None
    };
    Verdict {
        would_refuse: reason.is_some(),
        reason,
        sides,
        removed,
        disabled,
        locked_out,
        enabled: d.enabled.len(),
        fraction,
        limit: cfg.max_removed_fraction,
        min_keys: cfg.min_keys,
        since_secs: None,
        since_version: None,
    }
}

/// `Ok` unless `new` removes, disables or locks out too large a share of the keys usable in
/// `baseline`, the snapshot in force `age` ago when this window's changes began (only the
/// fraction rule: the others are for the snapshot `new` replaces, `current`).
pub fn admit_since(
    baseline: &Snapshot,
    age: std::time::Duration,
    current: Option<&Snapshot>,
    new: &Snapshot,
    cfg: &GuardConfig,
    here: Here<'_>,
) -> Result<(), Box<Verdict>> {
    let mut verdict = judge(&diff(baseline, new, here), cfg);
    if verdict.reason != Some(Reason::Fraction) {
        return Ok(());
    }
    verdict.since_secs = Some(age.as_secs());
    verdict.since_version = baseline.version;
    verdict.sides.version_in_force = current.and_then(|c| c.version);
    Err(Box::new(verdict))
}

/// `Ok` when `new` may replace `current` (nothing in force, or the guard lets it through);
/// otherwise the refusing verdict.
pub fn admit(
    current: Option<&Snapshot>,
    new: &Snapshot,
    cfg: &GuardConfig,
    here: Here<'_>,
) -> Result<(), Box<Verdict>> {
    let Some(current) = current else {
        return Ok(());
    };
    let verdict = judge(&diff(current, new, here), cfg);
    if verdict.would_refuse {
        Err(Box::new(verdict))
    } else {
        Ok(())
    }
}

impl Verdict {
    /// "removes R, disables D and locks out L of N usable keys in force": every verdict
    /// says it.
    fn counts(&self) -> String {
        format!(
            "removes {}, disables {} and locks out {} of {} usable keys in force",
            self.removed, self.disabled, self.locked_out, self.sides.usable_in_force
        )
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Some(Reason::Empty) if self.sides.keys == 0 => write!(
                f,
                "snapshot guard: an empty snapshot would replace {} keys in force",
                self.sides.in_force
            ),
            Some(Reason::Empty) => write!(
                f,
                "snapshot guard: none of the new snapshot's {} keys is usable here (disabled, expired, not yet valid, bound to another environment, revoked, with scopes no rule asks for, or the snapshot past keys.max_age): like an empty one, it would let nobody in in place of {} usable keys in force; force it if that is the intent",
                self.sides.keys, self.sides.usable_in_force
            ),
            Some(Reason::Rollback) => {
                let in_force = self.sides.version_in_force.unwrap_or_default();
                match self.sides.version {
                    Some(v) if v == in_force => write!(
                        f,
                        "snapshot guard: version {v} is the version in force, and it adds or enables keys ({} enabled; a revoke through the API keeps the version, and a stale writer would lift it); push a newer version, or force",
                        self.enabled
                    ),
                    Some(v) => write!(
                        f,
                        "snapshot guard: version {v} is older than version {in_force} in force (a rollback; it {})",
                        self.counts()
                    ),
                    None => write!(
                        f,
                        "snapshot guard: the snapshot has no version and version {in_force} is in force (versions only increase; a rollback?); push a newer version, or force"
                    ),
                }
            }
            Some(Reason::Fraction) => match self.since_secs {
                None => write!(
                    f,
                    "snapshot guard: the new snapshot {} ({:.2} > keys.guard.max_removed_fraction {:.2})",
                    self.counts(),
                    self.fraction,
                    self.limit
                ),
                Some(secs) => write!(
                    f,
                    "snapshot guard: with the changes of the last {secs} s, the new snapshot {} as they were then ({:.2} > keys.guard.max_removed_fraction {:.2}; changes within {} s of each other are judged together); force it, or wait",
                    self.counts(),
                    self.fraction,
                    self.limit,
                    WINDOW.as_secs()
                ),
            },
            None if self.sides.in_force < self.min_keys => write!(
                f,
                "snapshot guard: passes ({}; below keys.guard.min_keys {}, only a snapshot that lets nobody in is refused)",
                self.counts(),
                self.min_keys
            ),
            None => write!(
                f,
                "snapshot guard: passes ({}, {:.2} <= {:.2})",
                self.counts(),
                self.fraction,
                self.limit
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(in_force: usize, keys: usize, removed: usize, disabled: usize) -> SnapshotDiff {
        SnapshotDiff {
            sides: Sides {
                in_force,
                keys,
                usable_in_force: in_force,
                usable: keys,
                ..Sides::default()
            },
            removed_usable: removed,
            removed: (0..removed).map(|i| format!("r{i}")).collect(),
            disabled: (0..disabled).map(|i| format!("d{i}")).collect(),
            ..SnapshotDiff::default()
        }
    }

    const DEFAULTS: GuardConfig = GuardConfig {
        max_removed_fraction: 0.5,
        min_keys: 10,
    };

    #[test]
    fn removing_or_disabling_more_than_the_fraction_is_refused() {
        assert!(
            !judge(&d(10, 5, 5, 0), &DEFAULTS).would_refuse,
            "0.5 is allowed"
        );
        let v = judge(&d(10, 5, 5, 1), &DEFAULTS);
        assert!(v.would_refuse);
        assert_eq!(v.reason, Some(Reason::Fraction));
        assert_eq!((v.removed, v.disabled), (5, 1));
        assert!((v.fraction - 0.6).abs() < 1e-9);
        assert!(
            judge(&d(10, 10, 0, 6), &DEFAULTS).would_refuse,
            "disabling counts"
        );
    }

    #[test]
    fn below_min_keys_only_the_empty_rule_applies() {
        assert!(!judge(&d(9, 1, 8, 0), &DEFAULTS).would_refuse);
        let v = judge(&d(3, 0, 3, 0), &DEFAULTS);
        assert_eq!(v.reason, Some(Reason::Empty));
        let zero = GuardConfig {
            min_keys: 0,
            ..DEFAULTS
        };
        assert!(judge(&d(1, 1, 1, 0), &zero).would_refuse);
        assert!(
            !judge(&d(0, 0, 0, 0), &zero).would_refuse,
            "nothing in force"
        );
    }

    #[test]
    fn an_empty_snapshot_replacing_a_non_empty_one_is_refused_whatever_the_settings() {
        let lax = GuardConfig {
            max_removed_fraction: 1.0,
            min_keys: 1000,
        };
        let v = judge(&d(1, 0, 1, 0), &lax);
        assert!(v.would_refuse, "{v}");
        assert!(v.to_string().contains("empty"));
        assert!(!judge(&d(10, 1, 9, 0), &lax).would_refuse);
    }

    /// A snapshot with no usable key lets nobody in, as an empty one: refused in place of
    /// one with a usable key whatever the settings, and not in place of one without.
    #[test]
    fn a_snapshot_with_no_usable_key_is_refused_as_empty() {
        let lax = GuardConfig {
            max_removed_fraction: 1.0,
            min_keys: 1000,
        };
        let mut none_usable = d(3, 3, 0, 3);
        none_usable.sides.usable = 0;
        let v = judge(&none_usable, &lax);
        assert_eq!(v.reason, Some(Reason::Empty), "{v}");
        assert!(
            v.to_string()
                .contains("none of the new snapshot's 3 keys is usable"),
            "{v}"
        );
        none_usable.sides.usable_in_force = 0;
        assert!(
            !judge(&none_usable, &lax).would_refuse,
            "nobody was let in before"
        );
    }

    #[test]
    fn an_older_version_is_refused_whatever_the_counts() {
        let versioned = |old, new| {
            let mut diff = SnapshotDiff {
                pushed: true,
                ..d(3, 3, 0, 0)
            };
            (diff.sides.version_in_force, diff.sides.version) = (old, new);
            diff
        };
        let v = judge(&versioned(Some(8), Some(7)), &DEFAULTS);
        assert_eq!(v.reason, Some(Reason::Rollback), "{v}");
        assert!(
            v.to_string().contains("version 7 is older than version 8"),
            "{v}"
        );
        let file = SnapshotDiff {
            pushed: false,
            ..versioned(Some(8), Some(7))
        };
        assert!(
            !judge(&file, &DEFAULTS).would_refuse,
            "a file is the operator's"
        );
        for (old, new) in [(Some(8), Some(9)), (None, Some(1)), (None, None)] {
            assert!(
                !judge(&versioned(old, new), &DEFAULTS).would_refuse,
                "{old:?} -> {new:?}"
            );
        }
        let mut adds = versioned(Some(8), Some(8));
        assert!(!judge(&adds, &DEFAULTS).would_refuse, "a retry");
        adds.added = vec!["key_1b".into()];
        assert!(
            judge(&adds, &DEFAULTS).would_refuse,
            "the version in force adding a key (a rename of a revoked one, say)"
        );
        let v = judge(&versioned(Some(8), None), &DEFAULTS);
        assert_eq!(v.reason, Some(Reason::Rollback), "{v}");
        assert!(v.to_string().contains("has no version"), "{v}");
    }

    #[test]
    fn the_version_in_force_may_not_enable_a_key_disabled_in_force() {
        let mut same = SnapshotDiff {
            pushed: true,
            enabled: vec!["k4".into()],
            ..d(3, 3, 0, 0)
        };
        let retry = SnapshotDiff {
            pushed: true,
            sides: Sides {
                version_in_force: Some(11),
                version: Some(11),
                ..same.sides
            },
            ..SnapshotDiff::default()
        };
        assert!(
            !judge(&retry, &DEFAULTS).would_refuse,
            "a retry of the content in force"
        );
        (same.sides.version_in_force, same.sides.version) = (Some(11), Some(11));
        let v = judge(&same, &DEFAULTS);
        assert_eq!(v.reason, Some(Reason::Rollback), "{v}");
        assert!(
            v.to_string().contains("version 11 is the version in force"),
            "{v}"
        );
        same.sides.version = Some(12);
        assert!(!judge(&same, &DEFAULTS).would_refuse, "a newer version may");
        same.sides.version = Some(11);
        same.pushed = false;
        assert!(
            !judge(&same, &DEFAULTS).would_refuse,
            "a file is the operator's"
        );
    }

    #[test]
    fn nothing_in_force_admits_anything() {
        let empty = Snapshot::empty(crate::keys::Source::File);
        assert!(admit(None, &empty, &DEFAULTS, Here::unknown()).is_ok());
    }
}
