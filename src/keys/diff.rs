//! What a new snapshot changes against the one in force: one pure function over two
//! snapshots. The blast-radius guard (`guard`), the dry run of `PUT /v1/snapshot`
//! and `keyward diff` all call [`diff`]; none of them ever shows a digest or a raw key (a
//! changed `sha256` is reported by its field name only).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::schema::KeyDoc;
use super::{Key, Snapshot, Source, Status};
use crate::config::{Config, RouteRule, ScopeRule};

/// One key present in both snapshots whose entry differs, and the names of its fields that
/// differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Changed {
    pub id: String,
    pub fields: Vec<&'static str>,
}

/// The difference between the snapshot in force (`old`) and a new one. Lists are ordered by
/// key id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotDiff {
    #[serde(flatten)]
    pub sides: Sides,
    /// The new snapshot was pushed (control source): a push whose `version` is below the one
    /// in force is a stale writer. A file is the operator's own, and a disable through the
    /// API (which a rollback would undo) exists only for pushes.
    #[serde(skip)]
    pub pushed: bool,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Of `removed`, the keys usable in force.
    #[serde(skip)]
    pub removed_usable: usize,
    pub changed: Vec<Changed>,
    /// Keys usable in force and disabled in the new snapshot (also listed in `changed`).
    pub disabled: Vec<String>,
    /// Keys disabled in force and active in the new snapshot (also listed in `changed`), and
    /// keys of the new snapshot that let in a secret refused in force under whichever id
    /// (by its digest: moved, swapped or renamed): without `cluster`, a disable through the
    /// API lives in the snapshot, and a push that was not made from it lifts the revoke. A push of the version in force that enables
    /// one is refused as a rollback (the revoke kept that version); a newer one may: it may
    /// be the intent.
    pub enabled: Vec<String>,
    /// Keys usable in force that stay active but stop accepting the secret their clients
    /// hold, or anything they ask (also listed in `changed`): a new digest, an expiry
    /// already past, a `not_before` still ahead, a new type, a binding to another
    /// environment than this one, or scopes that pass no `scopes` rule any more. A snapshot can lock everyone
    /// out this way as surely as by removing every key, so the guard counts these too.
    pub locked_out: Vec<String>,
    /// Keys active in the new snapshot under a digest their id did not carry in force (also
    /// listed in `changed`, field `sha256`): a new secret let in under an old id, a revoked
    /// one moved into another id among them.
    #[serde(skip)]
    pub rekeyed: usize,
    pub unchanged: usize,
}

impl SnapshotDiff {
    /// The new snapshot adds a key, enables one disabled in force, or gives an id a secret
    /// it did not carry: it lets in a secret the one in force does not (a revoked one,
    /// renamed, restored or moved into another id, among them).
    pub fn grants(&self) -> bool {
        !self.added.is_empty() || !self.enabled.is_empty() || self.rekeyed > 0
    }
}

/// Revocations kept outside the snapshot (the fleet's, SPEC 14): a key revoked there lets
/// no client in, whatever the snapshot says, so the guard does not count it as usable.
pub trait Revoked: Sync {
    fn is_revoked(&self, key: &Key) -> bool;
}

/// Where and when keys are judged usable: the sidecar's `environment` and `scopes` rules
/// (unknown, as for `keyward diff` without a config: `None` and none) at `now`, and the
/// revocations held outside the snapshot, if any.
#[derive(Clone, Copy)]
pub struct Here<'a> {
    pub environment: Option<&'a str>,
    /// `prefixes` binds key prefixes to types (or the config is unknown): a new type may
    /// no longer fit its key's prefix. Without `prefixes`, any type is taken.
    pub typed_prefixes: bool,
    pub scope_rules: &'a [ScopeRule],
    pub route_rules: &'a [RouteRule],
    pub now: SystemTime,
    pub revoked: Option<&'a dyn Revoked>,
}

impl std::fmt::Debug for Here<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Here")
            .field("environment", &self.environment)
            .field("typed_prefixes", &self.typed_prefixes)
            .field("scope_rules", &self.scope_rules)
            .field("route_rules", &self.route_rules)
            .field("now", &self.now)
            .field("revoked", &self.revoked.is_some())
            .finish()
    }
}

/// An expiry a new snapshot brings within this of now locks the key's clients out as
/// surely as removing it, only a little later (`expires_at: now + 8s` on every key).
pub const EXPIRY_HORIZON: Duration = Duration::from_secs(3600);

/// A rate limit below this many requests per second (one a minute) locks the key's
/// clients out as surely as disabling it (`per_second: 0.0001` answers 429 for hours).
pub const MIN_USABLE_RATE: f64 = 1.0 / 60.0;

impl<'a> Here<'a> {
    /// A sidecar running `config`, now.
    pub fn of(config: &'a Config) -> Self {
        Self {
            environment: Some(&config.environment),
            typed_prefixes: !config.prefixes.is_empty(),
            scope_rules: &config.scopes,
            route_rules: &config.routes,
            now: SystemTime::now(),
            revoked: None,
        }
    }

    /// No config known (`keyward diff` without `--config`), now.
    pub fn unknown() -> Self {
        Self {
            environment: None,
            typed_prefixes: true,
            scope_rules: &[],
            route_rules: &[],
            now: SystemTime::now(),
            revoked: None,
        }
    }

    /// Can `key` use any method on any protected route? With no rules known: has it any
    /// scope at all. A method is judged by the one `scopes` rule naming it (the config
    /// refuses a method in two); a route by its `any_of`, and a protected `prefix: /` rule
    /// takes every path no rule before it took.
    fn can_use_a_method(&self, key: &Key) -> bool {
        if self.scope_rules.is_empty() {
            return !key.scopes().is_empty();
        }
        let method = self
            .scope_rules
            .iter()
            .any(|r| key.has_any_scope(&r.any_of));
        method && self.can_reach_a_route(key)
    }

    /// Is some protected path's route requirement met by `key`'s scopes?
    fn can_reach_a_route(&self, key: &Key) -> bool {
        for r in self.route_rules.iter().filter(|r| !r.public) {
            if r.any_of.is_empty() || key.has_any_scope(&r.any_of) {
                return true;
            }
            if r.prefix.as_deref() == Some("/") {
                return false;
            }
        }
        true
    }
}

/// Would a client holding `key`'s secret be let in here now (before routes and scopes)?
/// The same checks, in the same terms, as the decision's key state.
pub fn usable(key: &Key, here: Here<'_>) -> bool {
    key.status == Status::Active
        && key.expires_at.is_none_or(|t| t > here.now)
        && key.not_before.is_none_or(|t| t <= here.now)
        && match (key.environment(), here.environment) {
            (Some(bound), Some(env)) => bound == env,
            _ => true,
        }
        && !here.revoked.is_some_and(|r| r.is_revoked(key))
}

/// Does `key` let its secret in here, now or once its time window opens?
fn lets_in_some_time(key: &Key, here: Here<'_>) -> bool {
    let later = Here {
        now: key.not_before.map_or(here.now, |t| t.max(here.now)),
        ..here
    };
    usable(key, later)
}

/// Was `key` refused in force for what it is, not where or when: disabled in the snapshot,
/// or revoked by the fleet.
fn refused_in_force(key: &Key, here: Here<'_>) -> bool {
    key.status == Status::Disabled || here.revoked.is_some_and(|r| r.is_revoked(key))
}

/// The two snapshots' sizes and versions: measured by the diff, repeated by the guard's
/// verdict (both serialize them flat, under these names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sides {
    /// Keys in the snapshot in force.
    pub in_force: usize,
    /// Keys in the new snapshot.
    pub keys: usize,
    /// Keys in force that a client can use here now ([`usable`]), and in the new snapshot.
    /// The guard judges by these: a key already disabled, expired or bound to another
    /// environment denies no one when it goes, and must not dilute the keys that do.
    pub usable_in_force: usize,
    pub usable: usize,
    /// The `version` of the snapshot in force, and of the new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_in_force: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// Compare two snapshots key by key (by id), field by field.
pub fn diff(old: &Snapshot, new: &Snapshot, here: Here<'_>) -> SnapshotDiff {
    let mut d = SnapshotDiff {
        sides: Sides {
            in_force: old.len(),
            keys: new.len(),
            usable_in_force: old.keys().filter(|k| usable(k, here)).count(),
            usable: 0,
            version_in_force: old.version,
            version: new.version,
        },
        pushed: new.source == Source::Control,
        ..SnapshotDiff::default()
    };
    // With `keys.max_age`: a snapshot that goes stale within the hour (stamped long ago)
    // fails every request closed, so each usable key it keeps is locked out.
    let ages_out = ages_out(old, new, here.now);
    for key in new.keys() {
        // Usable: it lets its secret in now, for some method, from a snapshot not already
        // past `keys.max_age`. A snapshot of keys none of which is (every key given a scope
        // no rule asks for) lets nobody in, as an empty one: the guard refuses it so.
        // Scopes are judged only where the rules are known (not by `keyward diff` alone).
        let scoped = here.scope_rules.is_empty() || here.can_use_a_method(key);
        d.sides.usable += usize::from(usable(key, here) && !ages_out && scoped);
        // A secret refused in force (disabled, or revoked by the fleet) that this entry lets
        // in again, whichever id it had: traced by its digest, not its id (moved into an id
        // that stays, swapped with another key's, or into a new id).
        // Active here at any time, not only now: a `not_before` a little ahead lets it in
        // seconds later all the same.
        let secret_back = lets_in_some_time(key, here)
            && old
                .lookup(key.digest())
                .is_some_and(|was| refused_in_force(was, here));
        if secret_back {
            d.enabled.push(key.id.to_string());
        }
        let Some(before) = old.by_id(&key.id) else {
            d.added.push(key.id.to_string());
            continue;
        };
        // Unchanged keys are usually shared with the snapshot in force (`Snapshot::reuse`):
        // the pointer test, then equality, before any field is compared.
        if std::sync::Arc::ptr_eq(before, key) || **before == **key {
            d.unchanged += 1;
            if ages_out && usable(before, here) {
                d.locked_out.push(key.id.to_string());
            }
            continue;
        }
        if before.status == Status::Disabled && key.status == Status::Active && !secret_back {
            d.enabled.push(key.id.to_string());
        }
        if key.status == Status::Active && before.digest() != key.digest() {
            d.rekeyed += 1;
        }
        if usable(before, here) {
            if key.status == Status::Disabled {
                d.disabled.push(key.id.to_string());
            } else if ages_out || locks_out(before, key, here) {
                d.locked_out.push(key.id.to_string());
            }
        }
        d.changed.push(Changed {
            id: key.id.to_string(),
            fields: changed_fields(&before.to_doc(), &key.to_doc()),
        });
    }
    // Ids are unique, so every key in force was found unless some were removed: the
    // second pass over the keys in force is needed only then.
    if new.len() - d.added.len() < old.len() {
        for k in old.keys().filter(|k| new.by_id(&k.id).is_none()) {
            let moved_to = new.lookup(k.digest());
            // The same secret under a new id lets its clients in still (a rename), unless
            // the entry it moved into locks them out as that change under the old id would
            // (no scope, a new type, an expiry in seconds, a starving limit, a stale stamp):
            // a rename must not be the way around the guard.
            let renamed = moved_to.is_some_and(|n| !ages_out && !locks_out(k, n, here));
            d.removed_usable += usize::from(usable(k, here) && !renamed);
            d.removed.push(k.id.to_string());
        }
    }
    d.added.sort_unstable();
    d.removed.sort_unstable();
    d.disabled.sort_unstable();
    d.enabled.sort_unstable();
    d.locked_out.sort_unstable();
    d.changed.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    d
}

/// Does `after` (active) refuse the client `before` (usable here) let in? Not usable here
/// any more (an expiry past, a `not_before` ahead, another environment), an expiry brought
/// within [`EXPIRY_HORIZON`], a rate limit cut below [`MIN_USABLE_RATE`], a new digest, a
/// new type (it must fit the key's prefix), scopes that no longer pass any `scopes`
/// rule (`[]`, or `[bogus]`: every method refused), or none of the accounts it acted for. Where the
/// environment is not known, any new binding counts (it may be to another environment).
fn locks_out(before: &Key, after: &Key, here: Here<'_>) -> bool {
    // Where the environment is not known (`keyward diff` without `--config`), any new
    // binding may be to another one: a first binding counts too (every key bound to
    // `staging` passed a check meant for production).
    let rebound = here.environment.is_none()
        && after.environment().is_some()
        && after.environment() != before.environment();
    !usable(after, here)
        || rebound
        || before.digest() != after.digest()
        || (here.typed_prefixes && before.principal_type != after.principal_type)
        || (here.can_use_a_method(before) && !here.can_use_a_method(after))
        || expires_soon(before, after, here.now)
        || throttled(before, after)
        || delegation_cut(before, after)
}

/// `before` could act for other accounts and `after` can act for none of those: a key used
/// only on behalf of child accounts is locked out as surely as by losing every scope
/// (review: every key's `delegate_accounts` replaced passed the guard, and every delegated
/// request was refused). Narrowing a list, like narrowing scopes, is a change like any.
fn delegation_cut(before: &Key, after: &Key) -> bool {
    use super::Delegation;
    match (before.delegation(), after.delegation()) {
        (Delegation::None, _) => false,
        (_, Delegation::None) => true,
        (Delegation::Only(was), Delegation::Only(now)) => was.is_disjoint(now),
        // Any account to a list: which ones were acted for is not known here, and `["*"]`
        // to `["nobody"]` refused every delegated request. Counted; force takes it.
        (Delegation::Any, Delegation::Only(_)) => true,
        (_, Delegation::Any) => false,
    }
}

/// With `keys.max_age`: does `new` fail closed (go stale) at once, or soon, because it was
/// stamped long ago? Soon: with less than half its `max_age` left, and within
/// [`EXPIRY_HORIZON`]. A freshly stamped snapshot never is, however short `max_age`, and
/// one that goes stale no sooner than the one in force locks out no one more.
fn ages_out(old: &Snapshot, new: &Snapshot, now: SystemTime) -> bool {
    let (Some(deadline), Some(stamped)) = (new.stale_at(), new.generated_at) else {
        return false;
    };
    if old.stale_at().is_some_and(|o| deadline >= o) {
        return false;
    }
    let max_age = deadline
        .duration_since(stamped.min(now))
        .unwrap_or_default();
    let left = deadline.duration_since(now).unwrap_or_default();
    left < EXPIRY_HORIZON.min(max_age / 2)
}

/// `after` expires within [`EXPIRY_HORIZON`] of `now`, sooner than `before` did.
fn expires_soon(before: &Key, after: &Key, now: SystemTime) -> bool {
    after
        .expires_at
        .is_some_and(|t| t <= now + EXPIRY_HORIZON && before.expires_at.is_none_or(|was| t < was))
}

/// `after`'s rate limit lets fewer than [`MIN_USABLE_RATE`] through, and `before`'s did not.
fn throttled(before: &Key, after: &Key) -> bool {
    let starved = |k: &Key| {
        k.rate_limit()
            .is_some_and(|r| r.per_second < MIN_USABLE_RATE)
    };
    starved(after) && !starved(before)
}

/// The names of the entry fields that differ. Values are compared, never returned.
fn changed_fields(a: &KeyDoc, b: &KeyDoc) -> Vec<&'static str> {
    // No `..`: a field added to `KeyDoc` must be listed here.
    let KeyDoc {
        id: _,
        sha256,
        kind,
        subject_id,
        subject_email,
        account_id,
        account_short_id,
        enterprise_id,
        org_id,
        scopes,
        environment,
        status,
        not_before,
        expires_at,
        delegate_accounts,
        rate_limit,
    } = a;
    [
        ("sha256", *sha256 != b.sha256),
        ("type", *kind != b.kind),
        ("subject_id", *subject_id != b.subject_id),
        ("subject_email", *subject_email != b.subject_email),
        ("account_id", *account_id != b.account_id),
        ("account_short_id", *account_short_id != b.account_short_id),
        ("enterprise_id", *enterprise_id != b.enterprise_id),
        ("org_id", *org_id != b.org_id),
        ("scopes", *scopes != b.scopes),
        ("environment", *environment != b.environment),
        ("status", *status != b.status),
        ("not_before", *not_before != b.not_before),
        ("expires_at", *expires_at != b.expires_at),
        (
            "delegate_accounts",
            *delegate_accounts != b.delegate_accounts,
        ),
        ("rate_limit", *rate_limit != b.rate_limit),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect()
}

impl SnapshotDiff {
    /// The diff for people: counts, then one line per key (`+` added, `-` removed, `~`
    /// changed with its field names).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let s = &self.sides;
        if let (Some(old), Some(new)) = (s.version_in_force, s.version) {
            let _ = writeln!(out, "version: {old} in force, {new} new");
        }
        let _ = writeln!(
            out,
            "keys: {} in force ({} usable), {} new ({} usable); added {}, removed {}, changed {} (disabled {}, enabled {}, locked out {}), unchanged {}",
            s.in_force,
            s.usable_in_force,
            s.keys,
            s.usable,
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            self.disabled.len(),
            self.enabled.len(),
            self.locked_out.len(),
            self.unchanged
        );
        for id in &self.added {
            let _ = writeln!(out, "+ {id}");
        }
        for id in &self.removed {
            let _ = writeln!(out, "- {id}");
        }
        for c in &self.changed {
            let _ = writeln!(out, "~ {}: {}", c.id, c.fields.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{digest, Source};

    fn entry(id: &str, secret: &str, extra: &str) -> String {
        format!(
            "  - id: {id}\n    sha256: {}\n    type: service_account\n    subject_id: s\n    account_id: a\n    scopes: [read]\n{extra}",
            hex::encode(digest(secret.as_bytes()))
        )
    }

    /// A production sidecar, now.
    fn here() -> Here<'static> {
        Here {
            environment: Some("production"),
            ..Here::unknown()
        }
    }

    fn snap(entries: &[String]) -> Snapshot {
        Snapshot::parse(&format!("keys:\n{}", entries.concat()), Source::File).unwrap()
    }

    #[test]
    fn added_removed_changed_and_disabled_by_id_with_field_names() {
        let old = snap(&[
            entry("k1", "a", ""),
            entry("k2", "b", ""),
            entry("k3", "c", ""),
            entry("k4", "d", ""),
        ]);
        let new = snap(&[
            entry("k1", "a", ""),
            entry("k2", "rotated", "    scopes: [read, write]\n")
                .replace("    scopes: [read]\n", ""),
            entry("k3", "c", "    status: disabled\n"),
            entry("k5", "e", ""),
        ]);
        let d = diff(&old, &new, here());
        assert_eq!((d.sides.in_force, d.sides.keys, d.unchanged), (4, 4, 1));
        assert_eq!(d.added, ["k5"]);
        assert_eq!(d.removed, ["k4"]);
        assert_eq!(d.disabled, ["k3"]);
        assert_eq!(
            d.changed,
            [
                Changed {
                    id: "k2".into(),
                    fields: vec!["sha256", "scopes"]
                },
                Changed {
                    id: "k3".into(),
                    fields: vec!["status"]
                },
            ]
        );
    }

    /// An expiry brought within the hour, or a rate limit cut to less than one request a
    /// minute, locks the key's clients out too, only later; an expiry that stays where it
    /// was, or moves later, does not, nor does a limit that was already that low.
    #[test]
    fn an_expiry_brought_near_or_a_starved_rate_limit_locks_out() {
        let now = SystemTime::now();
        let at = |d: Duration| {
            let t = humantime::format_rfc3339_seconds(now + d).to_string();
            format!("    expires_at: {t}\n")
        };
        let soon = at(Duration::from_secs(8));
        let later = at(EXPIRY_HORIZON + Duration::from_secs(600));
        let starved = "    rate_limit: { per_second: 0.0001, burst: 1 }\n";
        let slow = "    rate_limit: { per_second: 0.5, burst: 1 }\n";
        let old = snap(&[
            entry("k1", "a", ""),
            entry("k2", "b", &soon),
            entry("k3", "c", ""),
            entry("k4", "d", ""),
            entry("k5", "e", starved),
            entry("k6", "f", ""),
        ]);
        let new = snap(&[
            entry("k1", "a", &soon),
            entry("k2", "b", &format!("{soon}    org_id: o\n")),
            entry("k3", "c", &later),
            entry("k4", "d", starved),
            entry("k5", "e", &format!("{starved}    org_id: o\n")),
            entry("k6", "f", slow),
        ]);
        let d = diff(&old, &new, here());
        assert_eq!(d.locked_out, ["k1", "k4"]);
    }

    /// A key that acted for some accounts and now acts for none of them locks out the
    /// clients acting for them, and so does one that acted for any account and now has a
    /// list; a narrower or wider list does not.
    #[test]
    fn delegation_cut_off_from_every_account_it_had_locks_out() {
        let ent = |id: &str, secret: &str, accounts: &str| {
            entry(
                id,
                secret,
                &format!("    delegate_accounts: [{accounts}]\n"),
            )
            .replace("service_account", "enterprise_service_account")
        };
        let old = snap(&[
            ent("k1", "a", "c1, c2"),
            ent("k2", "b", "c1, c2"),
            ent("k3", "c", "c1"),
        ]);
        let new = snap(&[
            ent("k1", "a", "nobody"),
            ent("k2", "b", "c2"),
            ent("k3", "c", "c1, c9"),
        ]);
        assert_eq!(diff(&old, &new, here()).locked_out, ["k1"]);
        // Any account (`["*"]`) to a list: which were acted for is not known, so counted.
        let any = snap(&[ent("k1", "a", "\"*\"")]);
        let listed = snap(&[ent("k1", "a", "nobody")]);
        assert_eq!(diff(&any, &listed, here()).locked_out, ["k1"]);
        assert!(diff(&listed, &any, here()).locked_out.is_empty());
    }

    /// Without a config (`keyward diff` alone) the environment in force is not known: a
    /// first binding counts as one that may be to another environment (every key bound
    /// to `staging` passed).
    #[test]
    fn a_first_binding_counts_where_the_environment_is_unknown() {
        let old = snap(&[entry("k1", "a", ""), entry("k2", "b", "")]);
        let bound = snap(&[
            entry("k1", "a", "    environment: staging\n"),
            entry("k2", "b", ""),
        ]);
        assert_eq!(diff(&old, &bound, Here::unknown()).locked_out, ["k1"]);
        assert!(diff(&bound, &bound, Here::unknown()).locked_out.is_empty());
    }

    /// A disabled secret let in again a little later (`not_before` just ahead) is named as
    /// enabled too: it answered 200 seconds after a dry run that listed nothing.
    #[test]
    fn a_secret_let_in_again_later_is_named_enabled() {
        let old = snap(&[
            entry("k1", "a", ""),
            entry("k2", "b", "    status: disabled\n"),
        ]);
        let soon = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(20));
        let back = snap(&[
            entry("k1", "a", ""),
            entry("n2", "b", &format!("    not_before: {soon}\n")),
        ]);
        assert_eq!(diff(&old, &back, here()).enabled, ["n2"]);
    }

    /// A key's scopes are judged as requests judge them: by the `scopes` rule naming each
    /// method, and by the `any_of` of the protected routes (a `prefix: /` rule takes every
    /// path left).
    #[test]
    fn scopes_are_judged_by_the_rules_and_the_routes() {
        let yaml = |extra: &str| {
            format!("listen: 127.0.0.1:1\nupstream: http://a:1\nenvironment: production\nkeys: {{ file: k }}\n{extra}")
        };
        let rules = Config::from_yaml(&yaml(
            "scopes: [{ methods: [GET, POST], any_of: [read] }, { methods: [DELETE], any_of: [admin] }]\n",
        ))
        .unwrap();
        let routed = Config::from_yaml(&yaml(
            "routes: [{ path: /healthz, public: true }, { prefix: /, any_of: [api] }]\n",
        ))
        .unwrap();
        let old = snap(&[entry("k1", "a", "")]);
        let legacy = snap(&[entry("k1", "a", "").replace("scopes: [read]", "scopes: [legacy]")]);
        let d = diff(&old, &legacy, Here::of(&rules));
        assert_eq!(d.locked_out, ["k1"], "no rule asks for legacy");
        let admin = snap(&[entry("k1", "a", "").replace("scopes: [read]", "scopes: [admin]")]);
        let d = diff(&old, &admin, Here::of(&rules));
        assert!(d.locked_out.is_empty(), "admin may DELETE");
        let with_api =
            snap(&[entry("k1", "a", "").replace("scopes: [read]", "scopes: [read, api]")]);
        let d = diff(&with_api, &old, Here::of(&routed));
        assert_eq!(d.locked_out, ["k1"], "every protected path wants api");
        let d = diff(&old, &with_api, Here::of(&routed));
        assert!(d.locked_out.is_empty());
    }

    /// Renaming ids under the same secrets locks no one out; nor does a new type where no
    /// `prefixes` bind types (any type is taken).
    #[test]
    fn a_rename_or_an_unbound_type_change_is_not_a_removal() {
        let old = snap(&[entry("k1", "a", ""), entry("k2", "b", "")]);
        let renamed = snap(&[entry("n1", "a", ""), entry("n2", "b", "")]);
        let d = diff(&old, &renamed, here());
        assert_eq!((d.removed.len(), d.removed_usable), (2, 0));
        let retyped = snap(&[entry("k1", "a", "").replace("service_account", "personal")]);
        let untyped = Config::from_yaml(
            "listen: 127.0.0.1:1\nupstream: http://a:1\nenvironment: production\nkeys: { file: k }\n",
        )
        .unwrap();
        assert!(diff(&old, &retyped, Here::of(&untyped))
            .locked_out
            .is_empty());
        assert_eq!(diff(&old, &retyped, here()).locked_out, ["k1"]);
    }

    /// A secret moved into a new id is judged as the change would be under its old id: an
    /// entry that locks its clients out (no scope, a bound type, an expiry in seconds, a
    /// starving limit) makes the rename a removal (review: every key renamed with
    /// `scopes: []` passed the guard with nothing counted). A refused secret let in again
    /// under a new id is named as enabled.
    #[test]
    fn a_rename_into_an_entry_that_locks_out_is_a_removal() {
        let old = snap(&[
            entry("k1", "a", ""),
            entry("k2", "b", "    status: disabled\n"),
        ]);
        let soon = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(8));
        for (what, moved) in [
            ("no scope", entry("n1", "a", "").replace("[read]", "[]")),
            (
                "bound type",
                entry("n1", "a", "").replace("service_account", "personal"),
            ),
            (
                "expiring",
                entry("n1", "a", &format!("    expires_at: {soon}\n")),
            ),
            (
                "starved",
                entry(
                    "n1",
                    "a",
                    "    rate_limit: { per_second: 0.0001, burst: 1 }\n",
                ),
            ),
            ("disabled", entry("n1", "a", "    status: disabled\n")),
        ] {
            let d = diff(&old, &snap(&[moved]), here());
            assert_eq!((d.removed.len(), d.removed_usable), (2, 1), "{what}");
        }
        let d = diff(
            &old,
            &snap(&[entry("n1", "a", ""), entry("n2", "b", "")]),
            here(),
        );
        assert_eq!(
            (d.removed_usable, d.enabled.clone()),
            (0, vec!["n2".to_string()])
        );
        // Swapped into an id that stays (review: `enabled` was empty and the revoked secret
        // answered 200 under the other id).
        let swapped = snap(&[
            entry("k1", "b", ""),
            entry("k2", "a", "    status: disabled\n"),
        ]);
        assert_eq!(diff(&old, &swapped, here()).enabled, ["k1"]);
    }

    /// Keys the fleet has revoked let no client in: they are not usable in force, so a
    /// snapshot keeping only them is judged against the keys that are.
    #[test]
    fn keys_revoked_outside_the_snapshot_are_not_usable() {
        struct Ids(&'static [&'static str]);
        impl Revoked for Ids {
            fn is_revoked(&self, key: &Key) -> bool {
                self.0.contains(&&*key.id)
            }
        }
        let all: Vec<_> = (0..4)
            .map(|i| entry(&format!("k{i}"), &format!("s{i}"), ""))
            .collect();
        let old = snap(&all);
        let new = snap(&all[..2]);
        let revoked = Ids(&["k0", "k1"]);
        let d = diff(
            &old,
            &new,
            Here {
                revoked: Some(&revoked),
                ..here()
            },
        );
        assert_eq!(
            (d.sides.usable_in_force, d.sides.usable, d.removed_usable),
            (2, 0, 2)
        );
        let d = diff(&old, &new, here());
        assert_eq!((d.sides.usable_in_force, d.removed_usable), (4, 2));
    }

    /// A snapshot can lock every client out without removing or disabling a key: a new
    /// digest, an expiry already past, a binding to another environment.
    #[test]
    fn keys_that_stop_accepting_their_secret_are_locked_out() {
        let old = snap(&[
            entry("k1", "a", ""),
            entry("k2", "b", ""),
            entry("k3", "c", "    environment: production\n"),
            entry("k4", "d", ""),
            entry("k5", "e", ""),
            entry("k6", "f", ""),
            entry("k7", "g", ""),
        ]);
        let new = snap(&[
            entry("k1", "rotated", ""),
            entry("k2", "b", "    expires_at: 2001-01-01T00:00:00Z\n"),
            entry("k3", "c", "    environment: staging\n"),
            entry(
                "k4",
                "d",
                "    expires_at: 2999-01-01T00:00:00Z\n    environment: production\n",
            ),
            entry("k5", "e", "    scopes: [read, write]\n").replace("    scopes: [read]\n", ""),
            entry("k6", "f", "    not_before: 2999-01-01T00:00:00Z\n"),
            entry("k7", "g", "").replace("service_account", "personal"),
        ]);
        let d = diff(&old, &new, here());
        // k4 gains a first binding and a far expiry, k5 a scope: both still accept theirs.
        assert_eq!(d.locked_out, ["k1", "k2", "k3", "k6", "k7"]);
        assert!(d.disabled.is_empty() && d.removed.is_empty());
        let guard = crate::config::GuardConfig {
            max_removed_fraction: 0.5,
            min_keys: 1,
        };
        let v = super::super::guard::judge(&d, &guard);
        assert!(v.would_refuse, "{v}");
        assert_eq!(v.locked_out, 5);
    }

    #[test]
    fn identical_snapshots_differ_in_nothing() {
        let a = snap(&[entry("k1", "a", ""), entry("k2", "b", "")]);
        let b = snap(&[entry("k2", "b", ""), entry("k1", "a", "")]);
        let d = diff(&a, &b, here());
        assert!(d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty());
        assert_eq!(d.unchanged, 2);
    }

    #[test]
    fn every_optional_field_is_named_when_it_changes() {
        let old = snap(&[entry("k", "a", "")]);
        let new = snap(&[entry(
            "k",
            "a",
            "    subject_email: x@y\n    org_id: o\n    environment: staging\n    expires_at: 2030-01-01T00:00:00Z\n    rate_limit: { per_second: 1, burst: 1 }\n",
        )]);
        let d = diff(&old, &new, here());
        assert_eq!(
            d.changed[0].fields,
            [
                "subject_email",
                "org_id",
                "environment",
                "expires_at",
                "rate_limit"
            ]
        );
        assert!(d.disabled.is_empty());
    }

    #[test]
    fn text_and_json_never_show_a_digest() {
        let old = snap(&[entry("k1", "a", ""), entry("k2", "b", "")]);
        let new = snap(&[entry("k1", "rotated", ""), entry("k3", "c", "")]);
        let d = diff(&old, &new, here());
        let text = d.to_text();
        let json = serde_json::to_string(&d).unwrap();
        for secret in ["a", "b", "rotated", "c"] {
            let hex = hex::encode(digest(secret.as_bytes()));
            assert!(!text.contains(&hex) && !json.contains(&hex));
        }
        assert!(text.contains("+ k3\n") && text.contains("- k2\n"), "{text}");
        assert!(text.contains("~ k1: sha256\n"), "{text}");
    }
}
