//! A key's scopes, built once per distinct list while a run of keys is built.

use std::hash::BuildHasher;
use std::sync::Arc;

use http::HeaderValue;

/// A key's scopes and their `x-auth-scopes` value, shared by the keys of one build run (a
/// few thousand keys, built on one thread) that list the same scopes.
#[derive(Debug, PartialEq)]
pub(super) struct Scopes {
    pub(super) list: Vec<String>,
    pub(super) value: HeaderValue,
}

impl Scopes {
    fn new(list: Vec<String>) -> Scopes {
        let value =
            HeaderValue::from_str(&list.join(" ")).unwrap_or_else(|_| HeaderValue::from_static(""));
        Scopes { list, value }
    }
}

/// While one run of keys is built: each distinct scope list, built once and held once.
#[derive(Default)]
pub(super) struct ScopeCache {
    built: hashbrown::HashTable<Arc<Scopes>>,
    hasher: foldhash::fast::RandomState,
}

impl ScopeCache {
    pub(super) fn get(&mut self, list: Vec<String>) -> Arc<Scopes> {
        let h = &self.hasher;
        self.built
            .entry(
                h.hash_one(&list),
                |s| s.list == list,
                |s| h.hash_one(&s.list),
            )
            .or_insert_with(|| Arc::new(Scopes::new(list)))
            .get()
            .clone()
    }
}
