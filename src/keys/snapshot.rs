//! The key snapshot: an immutable set of validated keys indexed by SHA-256 digest and by
//! id, with the document's metadata, published whole through the
//! [`KeyStore`](super::KeyStore). Built by the loader (`load`).

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use super::error::SnapshotError;
use super::index::{Duplicate, KeyIndex};
use super::key::{digest, Digest, Key};
pub use super::schema::{KeyDoc, Meta, SnapshotDoc};
use super::secret::{names_a_digest, WITHHELD};

/// Where a snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Control,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Control => "control",
        }
    }
}

/// An immutable, validated set of keys.
pub struct Snapshot {
    index: KeyIndex,
    pub version: Option<u64>,
    /// SHA-256 of the content it was parsed from (hex), to tell snapshots apart.
    pub content_digest: String,
    pub source: Source,
    pub loaded_at: SystemTime,
    /// The document's `generated_at`.
    pub generated_at: Option<SystemTime>,
    /// From this time on the snapshot is too old to authenticate with (`keys.max_age`).
    stale_at: Option<SystemTime>,
}

/// Digests never print: `Debug` shows the metadata only.
impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("keys", &self.len())
            .field("version", &self.version)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The first of `key`'s values that are logged or sent upstream (its id, subject, account,
/// the optional identity values, its scopes, the accounts it may act for) that is one of the
/// snapshot's secrets: `id` and `sha256` swapped, or a new key pasted into a field.
fn secret_field(key: &Key, known: &Known<'_>) -> Option<&'static str> {
    let texts = [
        ("id", Some(&key.id)),
        ("subject_id", Some(&key.subject_id)),
        ("account_id", Some(&key.account_id)),
        ("subject_email", key.subject_email()),
        ("account_short_id", key.account_short_id()),
        ("enterprise_id", key.enterprise_id()),
        ("org_id", key.org_id()),
    ];
    let field = texts
        .into_iter()
        .find(|(_, t)| t.is_some_and(|t| known.secret(t.as_str())))
        .map(|(field, _)| field);
    let delegates = key.extra().and_then(|e| e.delegate_accounts.as_deref());
    let lists = [
        ("scopes", key.scopes()),
        ("delegate_accounts", delegates.unwrap_or(&[])),
    ];
    field.or_else(|| {
        lists
            .into_iter()
            .find(|(_, items)| items.iter().any(|a| known.secret(a)))
            .map(|(field, _)| field)
    })
}

/// The secrets a new snapshot must not show: its own keys', and those of the snapshot in
/// force it is to replace (a key being rotated out is still let in until it is).
struct Known<'a> {
    index: &'a KeyIndex,
    prior: Option<&'a Snapshot>,
}

impl Known<'_> {
    /// Is `text` one of their raw keys, or a digest of one in hex or base64 (either
    /// alphabet, padded or not)?
    fn secret(&self, text: &str) -> bool {
        names_a_digest(text, |d| {
            self.index.by_digest(d).is_some() || self.prior.is_some_and(|p| p.lookup(d).is_some())
        })
    }
}

impl Snapshot {
    /// Index built keys by digest and by id; a duplicate of either refuses the snapshot.
    pub(super) fn assemble(
        meta: Meta,
        keys: Vec<Arc<Key>>,
        source: Source,
        content_digest: String,
        prior: Option<&Snapshot>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut index = KeyIndex::with_capacity(keys.len());
        // The first duplicate is reported once every other key is indexed: its id is shown
        // only if it is none of their secrets.
        let mut duplicate = None;
        for (i, key) in keys.iter().enumerate() {
            if let Err((dup, key)) = index.insert(key.clone()) {
                duplicate = duplicate.or(Some((i, dup, key)));
            }
        }
        if let Some((i, dup, key)) = duplicate {
            let (field, reason) = match dup {
                Duplicate::Id => ("id", "duplicate id"),
                Duplicate::Digest => ("sha256", "duplicate sha256"),
            };
            // Its own digest too: it was never indexed.
            let known = Known {
                index: &index,
                prior,
            };
            let secret = known.secret(&key.id) || names_a_digest(&key.id, |d| d == key.digest());
            let id = if secret { WITHHELD } else { key.id.as_str() };
            return Err(SnapshotError::entry(i, id, field, reason.into()));
        }
        let known = Known {
            index: &index,
            prior,
        };
        for (i, key) in keys.iter().enumerate() {
            if let Some(field) = secret_field(key, &known) {
                let id = if field == "id" {
                    WITHHELD
                } else {
                    key.id.as_str()
                };
                let reason = "holds the raw key or the sha256 of a key in this snapshot or in the one in force (ids and identity values are logged, labelled and sent to the app)";
                return Err(SnapshotError::entry(i, id, field, reason.into()));
            }
        }
        Ok(Snapshot {
            index,
            version: meta.version,
            content_digest,
            source,
            loaded_at: SystemTime::now(),
            generated_at: meta.generated_at,
            stale_at: None,
        })
    }

    /// An empty snapshot (for tests and benchmarks).
    pub fn empty(source: Source) -> Snapshot {
        Snapshot {
            index: KeyIndex::default(),
            version: None,
            content_digest: hex::encode(digest(b"")),
            source,
            loaded_at: SystemTime::now(),
            generated_at: None,
            stale_at: None,
        }
    }

    /// With `keys.max_age`: the snapshot fails closed once its `generated_at` is older than
    /// that. One without `generated_at` never ages (its age is unknown). A `generated_at`
    /// in the future (a generator's clock ahead, or a date typed wrong) counts from when it
    /// is first seen: the same `generated_at` as the snapshot in force (`prior`: a reload, a
    /// revoke) keeps its deadline, so reloading cannot put off failing closed.
    pub fn set_max_age(&mut self, max_age: Option<std::time::Duration>, prior: Option<&Snapshot>) {
        if let Some(prior) = prior.filter(|p| p.generated_at == self.generated_at) {
            if prior.stale_at.is_some() || max_age.is_none() {
                self.stale_at = prior.stale_at;
                return;
            }
        }
        let born = self.generated_at.map(|at| at.min(SystemTime::now()));
        self.stale_at = max_age.and_then(|age| born?.checked_add(age));
    }

    /// When this snapshot becomes too old to authenticate with, if ever.
    pub fn stale_at(&self) -> Option<SystemTime> {
        self.stale_at
    }

    /// Too old at `now` (see [`set_max_age`](Self::set_max_age)): one comparison.
    pub fn is_stale(&self, now: SystemTime) -> bool {
        self.stale_at.is_some_and(|at| now >= at)
    }

    pub fn lookup(&self, d: &Digest) -> Option<&Arc<Key>> {
        self.index.by_digest(d)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Key>> {
        self.index.by_id(id)
    }

    /// `key`, or `prior`'s key of the same id where the two are equal in every field: a
    /// reload built against the snapshot in force holds one copy of each unchanged key, not
    /// two, and the new copy is freed as soon as it is built.
    pub(super) fn reuse(prior: Option<&Snapshot>, key: Key) -> Arc<Key> {
        match prior.and_then(|p| p.by_id(&key.id)) {
            Some(old) if **old == key => old.clone(),
            _ => Arc::new(key),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.index.iter()
    }

    /// The document form, entries ordered by id, for persisting an edited snapshot.
    pub fn to_doc(&self) -> SnapshotDoc {
        let mut keys: Vec<KeyDoc> = self.index.iter().map(|k| k.to_doc()).collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        SnapshotDoc {
            version: self.version,
            generated_at: self
                .generated_at
                .map(|t| humantime::format_rfc3339(t).to_string().into()),
            keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::fixtures::{entry, refuse, SHA};

    #[test]
    fn shipped_demo_keys_parse() {
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s.version, Some(1));
        let k = s
            .lookup(&digest(b"sta_demo_service_key_0123456789abcdef"))
            .unwrap();
        assert_eq!(&*k.id, "key_demo_service");
    }

    #[test]
    fn json_is_accepted() {
        let json = format!(
            r#"{{"version": 3, "keys": [{{"id": "k", "sha256": "{SHA}", "type": "personal", "subject_id": "s", "account_id": "a", "scopes": ["read"]}}]}}"#
        );
        let s = Snapshot::parse(&json, Source::Control).unwrap();
        assert_eq!(s.version, Some(3));
        assert!(s.lookup(&digest(b"test")).is_some());
    }

    #[test]
    fn duplicate_id_and_digest_are_refused() {
        let two = format!(
            "{}  - id: key_a\n    sha256: {}\n    type: personal\n    subject_id: s\n    account_id: a\n",
            entry(""),
            "0".repeat(64)
        );
        assert_eq!(refuse(&two), "keys[1] id=key_a: id: duplicate id");
        let two = format!(
            "{}  - id: key_b\n    sha256: {SHA}\n    type: personal\n    subject_id: s\n    account_id: a\n",
            entry("")
        );
        assert_eq!(refuse(&two), "keys[1] id=key_b: sha256: duplicate sha256");
        // The same entry twice: its id is what is reported.
        let two = entry("") + &entry("").replacen("keys:\n", "", 1);
        assert_eq!(refuse(&two), "keys[1] id=key_a: id: duplicate id");
    }

    /// A value that is logged or sent upstream and is one of the snapshot's secrets (a
    /// key's raw key, or its digest in hex, either case, or base64) is refused, and an id
    /// shaped like a secret is never echoed (review: `id` and `sha256` swapped put a digest
    /// in the log, a duplicate id echoed a raw key).
    #[test]
    fn a_value_that_is_a_secret_is_refused_unechoed() {
        use base64::Engine as _;
        let raw = "sta_raw_key_of_the_second";
        let second = |id: &str, extra: &str| {
            format!(
                "  - id: {id}\n    sha256: {}\n    type: personal\n    subject_id: s\n    account_id: a\n{extra}",
                hex::encode(digest(raw.as_bytes()))
            )
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest(b"test"));
        let upper = SHA.to_uppercase();
        for id in [raw, SHA, upper.as_str(), b64.as_str()] {
            let e = refuse(&(entry("") + &second(&format!("\"{id}\""), "")));
            assert!(
                e.starts_with("keys[1] id=(withheld): id: holds the raw key"),
                "{e}"
            );
            assert!(!e.contains(id), "{e}");
        }
        for (field, extra) in [
            ("subject_id", format!("    subject_id: {raw}\n")),
            ("org_id", format!("    org_id: {raw}\n")),
        ] {
            let text = entry(&extra).replace(
                "    subject_id: s1\n",
                if field == "subject_id" {
                    ""
                } else {
                    "    subject_id: s1\n"
                },
            );
            let e = refuse(&(text + &second("key_b", "")));
            assert!(
                e.starts_with(&format!("keys[0] id=key_a: {field}: holds")),
                "{e}"
            );
        }
        // Scopes are sent to the app and answered by introspection too.
        let e = refuse(
            &(entry("").replace("[read]", &format!("[read, {raw}]")) + &second("key_b", "")),
        );
        assert!(e.starts_with("keys[0] id=key_a: scopes: holds"), "{e}");
        // An entry refused for anything else whose id is another key's raw key, before or
        // after it, however short: withheld (it was shown).
        let bad = |id: &str| {
            format!("  - id: {id}\n    sha256: {}\n    type: personal\n    subject_id: s\n    account_id: a\n    status: paused\n", "3".repeat(64))
        };
        let after = bad(raw) + &second("key_b", "");
        let e = refuse(&format!("keys:\n{after}"));
        assert!(e.starts_with("keys[0] id=(withheld): status"), "{e}");
        let before = entry("") + &second("key_b", "") + &bad(raw);
        let e = refuse(&before);
        assert!(e.starts_with("keys[2] id=(withheld): status"), "{e}");
        let e = refuse(&(entry("") + &bad("key_c")));
        assert!(e.starts_with("keys[1] id=key_c: status"), "{e}");
        // Its own raw key, alone, or as a duplicate's: never indexed, still withheld.
        let own = bad(raw).replace(&"3".repeat(64), &hex::encode(digest(raw.as_bytes())));
        let e = refuse(&format!("keys:\n{own}"));
        assert!(e.starts_with("keys[0] id=(withheld): status"), "{e}");
        let dup = second(raw, "").replace(&hex::encode(digest(raw.as_bytes())), &"4".repeat(64))
            + &second(raw, "");
        assert_eq!(
            refuse(&format!("keys:\n{dup}")),
            "keys[1] id=(withheld): id: duplicate id"
        );
        // Whatever follows the refused entry, of any shape, it is still the one named.
        let json = format!(
            r#"{{"keys": [{{"id": "{raw}", "sha256": "{}", "type": "personal", "subject_id": "s", "account_id": "a", "status": "paused"}}, "text", [1, 2], 7, null, {{"sha256": [1], "x": {{"y": [true]}}}}, {{"sha256": "{}"}}]}}"#,
            "3".repeat(64),
            hex::encode(digest(raw.as_bytes()))
        );
        let e = Snapshot::parse(&json, Source::Control)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("keys[0] id=(withheld): status"), "{e}");
        // A duplicate whose id is another key's raw key, however short: withheld.
        let short = "pat_short-key-2024";
        let text = entry("")
            + &second("key_b", "").replace(
                &hex::encode(digest(raw.as_bytes())),
                &hex::encode(digest(short.as_bytes())),
            )
            + &second(short, "").replace(&hex::encode(digest(raw.as_bytes())), &"1".repeat(64))
            + &second(short, "").replace(&hex::encode(digest(raw.as_bytes())), &"2".repeat(64));
        assert_eq!(refuse(&text), "keys[3] id=(withheld): id: duplicate id");
        // Short values are no raw key (a credential has 8 characters at least).
        assert!(Snapshot::parse(
            &(entry("") + &second("key_b", "").replace("subject_id: s", "subject_id: test")),
            Source::File
        )
        .is_ok());
        // An id shaped like a secret in an entry refused for anything else is withheld.
        let long = "sta_Zq3xV9kPp2Lr8TnW4yBc6HdFj1MsQe7Ua5Gi0Ko-_Xw";
        let e = refuse(
            &entry("")
                .replace("id: key_a", &format!("id: {long}"))
                .replace(SHA, "0f00"),
        );
        assert_eq!(
            e,
            "keys[0] id=(withheld): sha256: must be 64 hex characters"
        );
        let twice = entry("").replace("key_a", long)
            + &entry("").replace("key_a", long).replacen("keys:\n", "", 1);
        assert_eq!(refuse(&twice), "keys[1] id=(withheld): id: duplicate id");
    }

    /// Stored digests are whatever the writer put there: ones that differ only in their
    /// last bytes are all distinct keys, each found by its own digest.
    #[test]
    fn digests_alike_but_for_their_last_bytes_are_distinct_keys() {
        let n = 3000;
        let text: String = (0..n)
            .map(|i| {
                format!("  - {{id: k{i}, sha256: {i:064x}, type: personal, subject_id: s, account_id: a}}\n")
            })
            .collect();
        let s = Snapshot::parse(&format!("keys:\n{text}"), Source::File).unwrap();
        assert_eq!(s.len(), n);
        for i in [0, 1, 255, 256, n - 1] {
            let mut d = [0u8; 32];
            d[24..].copy_from_slice(&(i as u64).to_be_bytes());
            assert_eq!(&*s.lookup(&d).unwrap().id, format!("k{i}"));
        }
    }

    #[test]
    fn to_doc_round_trips() {
        let s = Snapshot::parse(include_str!("../../config/keys.yaml"), Source::File).unwrap();
        let text = serde_yaml::to_string(&s.to_doc()).unwrap();
        let again = Snapshot::parse(&text, Source::Control).unwrap();
        assert_eq!(again.len(), s.len());
        assert_eq!(again.version, s.version);
    }

    /// A large YAML snapshot loads, and an error names the bad entry.
    #[test]
    fn large_yaml_snapshot_loads_and_names_a_bad_entry() {
        let n = 3_005;
        let item = |i: usize, scopes: &str| {
            format!(
                "  - id: k{i}\n    sha256: {}\n    type: personal\n    subject_id: s{i}\n    account_id: a\n    scopes: {scopes}\n",
                hex::encode(digest(format!("key-{i}").as_bytes()))
            )
        };
        let good: String = (0..n).map(|i| item(i, "[read]")).collect();
        let s = Snapshot::parse(&format!("version: 4\nkeys:\n{good}"), Source::File).unwrap();
        assert_eq!((s.len(), s.version), (n, Some(4)));
        let k = s
            .lookup(&digest(format!("key-{}", n - 1).as_bytes()))
            .unwrap();
        assert_eq!(k.subject_id.as_str(), format!("s{}", n - 1));

        // Entries past the first parse job, in different jobs.
        let (wrong_type, wrong_field) = (n * 3 / 5, n - 3);
        let bad: String = (0..n)
            .map(|i| item(i, if i == wrong_type { "5" } else { "[read]" }))
            .collect();
        let e = refuse(&format!("keys:\n{bad}"));
        assert!(
            e.contains(&format!("keys[{wrong_type}].scopes")),
            "a YAML error: {e}"
        );
        let raw = format!("key-{wrong_field}");
        let bad = good.replace(&hex::encode(digest(raw.as_bytes())), "nope");
        let e = refuse(&format!("keys:\n{bad}"));
        assert!(
            e.starts_with(&format!("keys[{wrong_field}] id=k{wrong_field}: sha256")),
            "a bad field: {e}"
        );
    }
}
