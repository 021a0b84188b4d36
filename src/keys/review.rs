//! A new snapshot reviewed before it is taken: the dry run of `PUT /v1/snapshot` and
//! `keyward diff OLD NEW`. Both are the [`diff`] and the guard's [`Verdict`]; a dry run
//! adds the keys it would deny that were used recently. No digest or raw key in either.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::diff::{diff, Here, SnapshotDiff};
use super::guard::{judge, Verdict};
use super::load::Format;
use super::load_error::LoadError;
use super::read::read_file_as;
use super::{Snapshot, Source};
use crate::config::GuardConfig;

/// How far back a removed or disabled key counts as recently used.
pub const RECENT: Duration = Duration::from_secs(24 * 3600);

/// What a new snapshot would change, and whether the guard would refuse it.
#[derive(Debug, Clone, Serialize)]
pub struct Review {
    #[serde(flatten)]
    pub diff: SnapshotDiff,
    pub guard: Verdict,
    /// Dry run only: removed or disabled keys used within [`RECENT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_deny_recently_used: Option<Vec<RecentUse>>,
}

/// A key the new snapshot would deny that was used recently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentUse {
    pub key_id: String,
    /// `removed` or `disabled`.
    pub change: &'static str,
    /// RFC 3339, UTC.
    pub last_used: String,
    pub requests: u64,
}

/// Review `new` against `current` (nothing in force: against an empty snapshot), its keys
/// judged usable or not `here`.
pub fn review(
    current: Option<&Snapshot>,
    new: &Snapshot,
    guard: &GuardConfig,
    here: Here<'_>,
) -> Review {
    let empty;
    let current = match current {
        Some(c) => c,
        None => {
            empty = Snapshot::empty(new.source);
            &empty
        }
    };
    let diff = diff(current, new, here);
    Review {
        guard: judge(&diff, guard),
        diff,
        would_deny_recently_used: None,
    }
}

/// The dry run of a push: [`review`] plus the removed or disabled keys used since
/// `now - RECENT`, most recently used first. `last_used` gives a key id's last use and
/// request count: this replica's [`super::usage::Usage`], or the fleet's with `cluster`.
pub fn dry_run(
    current: Option<&Snapshot>,
    new: &Snapshot,
    guard: &GuardConfig,
    last_used: &dyn Fn(&str) -> Option<(SystemTime, u64)>,
    here: Here<'_>,
) -> Review {
    let mut r = review(current, new, guard, here);
    let since = here
        .now
        .checked_sub(RECENT)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let removed = r.diff.removed.iter().map(|id| (id, "removed"));
    let disabled = r.diff.disabled.iter().map(|id| (id, "disabled"));
    let mut recent: Vec<(SystemTime, RecentUse)> = removed
        .chain(disabled)
        .filter_map(|(id, change)| {
            let (last, requests) = last_used(id)?;
            (last >= since).then(|| {
                let used = RecentUse {
                    key_id: id.clone(),
                    change,
                    last_used: super::usage::rfc3339_millis(last),
                    requests,
                };
                (last, used)
            })
        })
        .collect();
    recent.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.key_id.cmp(&b.1.key_id)));
    r.would_deny_recently_used = Some(recent.into_iter().map(|(_, u)| u).collect());
    r
}

impl Review {
    /// For people: the diff, then the guard's verdict.
    pub fn to_text(&self) -> String {
        format!("{}{}\n", self.diff.to_text(), self.guard)
    }
}

/// A file `keyward diff` could not read or parse; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .error { LoadError::Io { .. } => .error.to_string(), e => format!("{}: {e}", .path.display()) })]
pub struct FileError {
    pub path: PathBuf,
    pub error: LoadError,
}

/// `keyward diff OLD NEW`: both files read and validated as snapshots, then reviewed
/// `here` (the config's environment and scope rules, when one is given). NEW is judged as
/// coming from `source`: a push (`Control`, for a config with a control source) is held to
/// the rollback rule, a file is not.
pub fn diff_files(
    old: &Path,
    new: &Path,
    guard: &GuardConfig,
    here: Here<'_>,
    source: Source,
    max_age: Option<std::time::Duration>,
) -> Result<Review, FileError> {
    // NEW is read as a push replacing OLD is: OLD's secrets must not show in it either.
    let read = |path: &Path, source, prior: Option<&Snapshot>| {
        let fail = |error| FileError {
            path: path.to_owned(),
            error,
        };
        let mut snapshot = read_file_as(path, source, Format::Yaml, prior).map_err(fail)?;
        // Judged with the config's `keys.max_age`, as the sidecar judges it.
        if max_age.is_some() {
            super::source::stamped_in_the_past(&snapshot, here.now).map_err(fail)?;
        }
        snapshot.set_max_age(max_age, None);
        Ok(snapshot)
    };
    let old = read(old, Source::File, None)?;
    let new = read(new, source, Some(&old))?;
    Ok(review(Some(&old), &new, guard, here))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::digest;

    fn snap(ids: &[&str], disabled: &[&str]) -> Snapshot {
        let entries: String = ids
            .iter()
            .map(|id| {
                let status = if disabled.contains(id) {
                    "disabled"
                } else {
                    "active"
                };
                format!(
                    "  - {{id: {id}, sha256: {}, type: personal, subject_id: s, account_id: a, status: {status}}}\n",
                    hex::encode(digest(format!("raw-{id}").as_bytes()))
                )
            })
            .collect();
        Snapshot::parse(&format!("keys:\n{entries}"), Source::Control).unwrap()
    }

    #[test]
    fn dry_run_lists_recently_used_keys_it_would_deny() {
        let old = snap(&["a", "b", "c", "d"], &[]);
        let new = snap(&["a", "c"], &["c"]);
        let usage = crate::keys::usage::Usage::default();
        let now = SystemTime::now();
        let text = |s: &str| old.by_id(s).unwrap().id.clone();
        usage.record(&text("a"), now, 0);
        usage.record(&text("b"), now - Duration::from_secs(60), 0);
        usage.record(&text("c"), now - Duration::from_secs(3600), 0);
        usage.record(&text("d"), now - Duration::from_secs(3 * 24 * 3600), 0);
        let last_used = |id: &str| usage.last_used(id);
        let here = Here {
            environment: Some("production"),
            now,
            ..Here::unknown()
        };
        let r = dry_run(Some(&old), &new, &GuardConfig::default(), &last_used, here);
        let used = r.would_deny_recently_used.clone().unwrap();
        let ids: Vec<_> = used.iter().map(|u| (u.key_id.as_str(), u.change)).collect();
        assert_eq!(
            ids,
            [("b", "removed"), ("c", "disabled")],
            "d is too old, a stays"
        );
        assert_eq!((r.diff.removed.len(), r.diff.disabled.len()), (2, 1));
        assert!(!r.guard.would_refuse, "below min_keys");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["removed"], serde_json::json!(["b", "d"]));
        assert_eq!(json["guard"]["would_refuse"], false);
    }

    #[test]
    fn nothing_in_force_reviews_against_an_empty_snapshot() {
        let new = snap(&["a"], &[]);
        let r = review(None, &new, &GuardConfig::default(), Here::unknown());
        assert_eq!(r.diff.added, ["a"]);
        assert!(!r.guard.would_refuse);
        assert!(r.would_deny_recently_used.is_none());
    }
}
