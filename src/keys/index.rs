//! A snapshot's two lookups, by digest (every request) and by id (control API, per-key
//! state), over one set of keys.
//!
//! Each table holds only the `Arc<Key>`: a key carries its own digest and id, so neither is
//! stored a second time as a map key. At a million keys that is about 100 MB less than two
//! `HashMap`s keyed by digest and by id.

use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::fast::RandomState;
use hashbrown::hash_table::{Entry, HashTable};

use super::key::{Digest, Key};

/// Which of a key's two unique names another key already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    Id,
    Digest,
}

#[derive(Default)]
pub struct KeyIndex {
    by_digest: HashTable<Arc<Key>>,
    by_id: HashTable<Arc<Key>>,
    /// A seeded hash of every byte, for digests as for ids. A stored digest is whatever the
    /// snapshot's writer put there (fixtures like `00…01`, `00…02` included), so no part of
    /// it can be trusted to be uniform: hashing only a prefix made such a load quadratic.
    hasher: RandomState,
}

impl KeyIndex {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            by_digest: HashTable::with_capacity(n),
            by_id: HashTable::with_capacity(n),
            hasher: RandomState::default(),
        }
    }

    /// Add a key, unless another one has its id or its digest: then nothing changes and
    /// the key comes back, for the refusal to name it.
    pub fn insert(&mut self, key: Arc<Key>) -> Result<(), (Duplicate, Arc<Key>)> {
        let h = &self.hasher;
        let id_slot = match self.by_id.entry(
            h.hash_one(&*key.id),
            |k| k.id == key.id,
            |k| h.hash_one(&*k.id),
        ) {
            Entry::Occupied(_) => return Err((Duplicate::Id, key)),
            Entry::Vacant(slot) => slot,
        };
        let d = key.digest();
        match self.by_digest.entry(
            h.hash_one(d),
            |k| k.digest() == d,
            |k| h.hash_one(k.digest()),
        ) {
            Entry::Occupied(_) => return Err((Duplicate::Digest, key)),
            Entry::Vacant(slot) => {
                slot.insert(key.clone());
            }
        }
        id_slot.insert(key);
        Ok(())
    }

    pub fn by_digest(&self, d: &Digest) -> Option<&Arc<Key>> {
        self.by_digest
            .find(self.hasher.hash_one(d), |k| k.digest() == d)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Key>> {
        self.by_id.find(self.hasher.hash_one(id), |k| &*k.id == id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.by_id.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{digest, Snapshot, Source, Text};

    /// Keys `a`, `b` and `c` (raw keys "raw-a", "raw-b", "raw-c"), and a second `a` with the
    /// digest of "raw-x" (an id is never its own raw key: such a snapshot is refused).
    fn keys() -> Vec<Arc<Key>> {
        let entry = |id: &str, raw: &str| {
            format!(
                "  - {{id: {id}, sha256: {}, type: service_account, subject_id: s, account_id: a, scopes: [read]}}\n",
                hex::encode(digest(format!("raw-{raw}").as_bytes()))
            )
        };
        let text = format!(
            "keys:\n{}{}{}",
            entry("a", "a"),
            entry("b", "b"),
            entry("c", "c")
        );
        let s = Snapshot::parse(&text, Source::File).unwrap();
        let other = Snapshot::parse(&format!("keys:\n{}", entry("a", "x")), Source::File).unwrap();
        let mut keys: Vec<_> = ["a", "b", "c"]
            .map(|id| s.by_id(id).unwrap().clone())
            .into();
        keys.push(other.by_id("a").unwrap().clone());
        keys
    }

    #[test]
    fn finds_every_key_both_ways() {
        let mut index = KeyIndex::with_capacity(3);
        for k in &keys()[..3] {
            index.insert(k.clone()).unwrap();
        }
        assert_eq!(index.len(), 3);
        for raw in ["a", "b", "c"] {
            let k = index
                .by_digest(&digest(format!("raw-{raw}").as_bytes()))
                .expect("by digest");
            assert_eq!(&*k.id, raw);
            assert!(Arc::ptr_eq(k, index.by_id(raw).expect("by id")));
        }
        assert!(index.by_digest(&digest(b"raw-x")).is_none());
        assert!(index.by_id("x").is_none());
    }

    /// Digests that differ only in their last bytes, as a fixture's `{i:064x}` do, must not
    /// share buckets: the load would turn quadratic.
    #[test]
    fn structured_digests_spread_across_buckets() {
        let index = KeyIndex::default();
        let mut buckets = std::collections::HashSet::new();
        for i in 0..4096u64 {
            let mut d = [0u8; 32];
            d[24..].copy_from_slice(&i.to_be_bytes());
            buckets.insert(index.hasher.hash_one(d) & 0xffff);
        }
        // 4096 uniform draws from 65536 buckets give about 3970 distinct ones.
        assert!(buckets.len() > 3500, "{} buckets", buckets.len());
    }

    #[test]
    fn a_refused_key_changes_nothing() {
        let keys = keys();
        let mut index = KeyIndex::default();
        index.insert(keys[0].clone()).unwrap();
        index.insert(keys[1].clone()).unwrap();
        // Same id as `a`, another digest: refused, and its digest is not indexed either.
        assert_eq!(index.insert(keys[3].clone()).unwrap_err().0, Duplicate::Id);
        assert!(index.by_digest(&digest(b"raw-x")).is_none());
        // Another id, `b`'s digest: refused, and the id is not indexed either.
        let mut renamed = Key::clone(&keys[1]);
        renamed.id = Text::for_test("d");
        let (dup, refused) = index.insert(Arc::new(renamed)).unwrap_err();
        assert_eq!((dup, &*refused.id), (Duplicate::Digest, "d"));
        assert!(index.by_id("d").is_none());
        assert_eq!(index.len(), 2);
        assert_eq!(index.iter().count(), 2);
    }
}
