//! What the config says about requests: routes, method scopes, key prefixes. Built once
//! from the [`Config`] so the hot path does no parsing.

use std::borrow::Cow;

use http::Method;

use crate::config::{Config, CredentialSource, RouteRule, ScopeRule};
use crate::keys::PrincipalType;
use crate::path::fold_lookalikes;

/// Where a normalized path goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// Forwarded without a key (identity headers still stripped).
    Public,
    /// Answered by keyward itself (SPEC 9).
    Introspection,
    /// Needs a key; `extra` is a route rule's `any_of`, required on top of method scopes.
    Protected { extra: Option<&'a [String]> },
}

const MIN_KEY_LEN: usize = crate::auth::credential::MIN_KEY_LEN;
/// Searches of a path's segments the path screen makes for runs its filter let through but
/// no segment holds, before it screens every long segment instead.
const MAX_FRUITLESS: usize = 64;
/// The runs of [`MIN_KEY_LEN`] bytes a correlation id of at most 128 bytes holds.
const ID_RUNS: usize = 128 - MIN_KEY_LEN + 1;
const _: () = assert!(MIN_KEY_LEN == 8, "runs are u64s");

/// A run of [`MIN_KEY_LEN`] bytes, as one number.
fn run(w: &[u8]) -> u64 {
    u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))
}

/// A 4096-bit filter of runs: a run never inserted almost always misses it, so a search
/// for it runs only on a hit.
struct RunFilter([u64; 64]);

impl Default for RunFilter {
    fn default() -> Self {
        RunFilter([0; 64])
    }
}

impl RunFilter {
    fn slot(r: u64) -> (usize, u64) {
        let h = (r.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize;
        (h >> 6, 1u64 << (h & 63))
    }

    fn insert(&mut self, r: u64) {
        let (word, mask) = Self::slot(r);
        self.0[word] |= mask;
    }

    fn may_hold(&self, r: u64) -> bool {
        let (word, mask) = Self::slot(r);
        self.0[word] & mask != 0
    }
}

/// Segment `i`'s bit in a mask of a path's segments (the 64th and later share the last).
fn bit(i: usize) -> u64 {
    1 << i.min(63)
}

/// The segments of `path` that hold a digest or a generated key, as an app reads them
/// (escapes decoded): with or without `prefixes`, in the snapshot or not.
fn digest_segments(path: &str) -> u64 {
    if path.len() < BASE64_RUN {
        return 0;
    }
    segment_bits(path, |s| {
        s.len() >= BASE64_RUN && digest_shaped(crate::path::as_decoded(s).as_bytes())
    })
}

/// The segments of `path` that key material split over several segments runs across
/// (`/` is a symbol of standard base64, and a client may split what it pastes): a run of
/// whole segments whose joined text holds a digest or a generated key ([`digest_shaped`],
/// `/` kept), each of its segments long enough to hold a real part of it
/// ([`SPLIT_PIECE`]). Shorter ones stay: `/v1` beside a digest is no part of it.
fn spanning_digest_segments(path: &str) -> u64 {
    if path.len() < BASE64_RUN {
        return 0;
    }
    let material = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'_' | b'-' | b'+' | b'=' | b'%' | b':' | b'.')
            })
    };
    // Each run of whole segments is a slice of the path itself: nothing is built for it.
    let mut doomed = 0;
    let mut run: Option<(usize, usize)> = None; // (first segment, its byte offset)
    let mut offset = 0;
    let segments = path.split('/').chain(std::iter::once("/"));
    for (i, segment) in segments.enumerate() {
        match (material(segment), run) {
            (true, None) => run = Some((i, offset)),
            (false, Some((first, from))) => {
                run = None;
                let joined = &path[from..offset.saturating_sub(1).max(from)];
                if i - first >= 2
                    && joined.len() >= BASE64_RUN
                    && digest_shaped(crate::path::as_decoded(joined).as_bytes())
                {
                    let pieces = joined.split('/').enumerate();
                    for (j, _) in pieces.filter(|(_, p)| p.len() >= SPLIT_PIECE) {
                        doomed |= bit(first + j);
                    }
                }
            }
            _ => {}
        }
        offset += segment.len() + 1;
    }
    doomed
}

/// The shortest segment [`spanning_digest_segments`] redacts.
const SPLIT_PIECE: usize = 8;

/// The bits of the segments of `path` that `doomed` picks.
fn segment_bits(path: &str, doomed: impl Fn(&str) -> bool) -> u64 {
    path.split('/')
        .enumerate()
        .filter(|(_, s)| doomed(s))
        .fold(0, |acc, (i, _)| acc | bit(i))
}

/// The shortest run that could be a SHA-256 digest in unpadded base64, or a key
/// `keyward keys generate` made (32 random bytes, URL-safe): 43 characters.
const BASE64_RUN: usize = 43;
/// A SHA-256 digest in hex.
const HEX_RUN: usize = 64;

/// Does `v` hold a digest (64 hex digits, alone or in groups joined by `:`, `.` or `-` as
/// fingerprints are written, or a run of 43 base64 or base64url characters) or a
/// generated key? Such a run is key material whether or not its key is in the snapshot or
/// the request: it is never logged or echoed (a correlation id, a path segment). A base64
/// run must look random ([`random_looking`]): a long slug (`How-To-Upgrade-To-Version2-In-10-Minutes`)
/// or a W3C `traceparent` is none; UUIDs and ULIDs are shorter. A standard base64 digest
/// may hold `/`; base32 (52 symbols of one case) is caught too.
pub fn digest_shaped(v: &[u8]) -> bool {
    let hex_group = |b: &u8| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'-' | b'/');
    let base64 =
        |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'=' | b'/');
    v.split(|b| !hex_group(b))
        .any(|run| run.iter().filter(|b| b.is_ascii_hexdigit()).count() >= HEX_RUN)
        || v.split(|b| !base64(b))
            .any(|run| run.len() >= BASE64_RUN && random_looking(run))
        || v.split(|b| !b.is_ascii_alphanumeric()).any(base32_digest)
}

/// A SHA-256 digest in base32 (RFC 4648): 52 symbols or more of one case, letters and the
/// digits 2 to 7, several of each (no word is written so).
fn base32_digest(run: &[u8]) -> bool {
    let symbol = |b: &u8, letter: fn(&u8) -> bool| letter(b) || (b'2'..=b'7').contains(b);
    let upper = run.iter().all(|b| symbol(b, u8::is_ascii_uppercase));
    let lower = run.iter().all(|b| symbol(b, u8::is_ascii_lowercase));
    let digits = run.iter().filter(|b| b.is_ascii_digit()).count();
    run.len() >= BASE32_RUN && (upper || lower) && digits >= 4 && run.len() - digits >= 26
}

/// A SHA-256 digest in unpadded base32.
const BASE32_RUN: usize = 52;

/// Does `run` look like random base64: upper case, lower case and digits (43 random
/// characters all but surely hold each: one in a thousand has no digit), and either a
/// stretch of 16 without a word separator (`-`, `_`: about one in 32 random characters)
/// or 6 places where a letter and a digit meet? A title-case slug has all three kinds, but
/// short words between its separators, and digits mostly apart from letters.
fn random_looking(run: &[u8]) -> bool {
    let mixed = run.iter().any(u8::is_ascii_uppercase)
        && run.iter().any(u8::is_ascii_lowercase)
        && run.iter().any(u8::is_ascii_digit);
    let longest_word = run
        .split(|b| matches!(b, b'-' | b'_' | b'/'))
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    let meetings = run
        .windows(2)
        .filter(|w| w[0].is_ascii_alphabetic() != w[1].is_ascii_alphabetic())
        .filter(|w| w.iter().all(u8::is_ascii_alphanumeric))
        .count();
    mixed && (longest_word >= 16 || meetings >= 6)
}

/// What a logged path shows in place of a segment that could hold a key.
pub const REDACTED: &str = "[redacted]";

/// How a key's prefix relates to the `prefixes` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixRule<'a> {
    /// No `prefixes` configured: any key, any type.
    Unrestricted,
    /// The prefix is unknown: the key is refused before lookup.
    Unknown,
    /// The key's type must be one of these.
    Types(&'a [PrincipalType]),
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub environment: String,
    pub credentials: Vec<CredentialSource>,
    /// Longest prefix first, so `sta_x_` wins over `sta_`.
    prefixes: Vec<(String, Vec<PrincipalType>)>,
    scopes: Vec<ScopeRule>,
    routes: Vec<RouteRule>,
    /// `routes_case_insensitive`: rules compare ignoring ASCII case, protected ones on the
    /// path's Unicode case folding too ([`fold_lookalikes`]).
    fold_case: bool,
    /// With `fold_case`, each rule folded as paths are (same order as `routes`).
    folded_routes: Vec<RouteRule>,
    introspection_path: Option<String>,
    credential_headers: Vec<http::HeaderName>,
    /// `forward_credential`: the credential headers reach the app as sent.
    pub forward_credential: bool,
}

impl Policy {
    pub fn new(config: &Config) -> Self {
        let mut prefixes: Vec<_> = config
            .prefixes
            .iter()
            .map(|(p, t)| (p.clone(), t.clone()))
            .collect();
        prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let mut credential_headers: Vec<http::HeaderName> = Vec::new();
        for c in &config.credentials {
            if let CredentialSource::Scheme { header, .. } | CredentialSource::Header { header } = c
            {
                if !credential_headers.contains(header) {
                    credential_headers.push(header.clone());
                }
            }
        }
        // In the form paths are compared in: NFKC (a rule written `/caf%C3%A9/` meets the
        // reading of `/cafe%CC%81/`, which an app that normalizes serves there), with every
        // escape of a character that stands as itself decoded (`/v1/items%3Apurge` and
        // `/v1/items:purge` are one path to the app, and to every rule).
        let routes: Vec<RouteRule> = config.routes.iter().map(RouteRule::compared).collect();
        Self {
            credential_headers,
            environment: config.environment.clone(),
            credentials: config.credentials.clone(),
            prefixes,
            scopes: config.scopes.clone(),
            routes: routes.clone(),
            folded_routes: match config.routes_case_insensitive {
                true => routes.iter().map(folded_rule).collect(),
                false => Vec::new(),
            },
            fold_case: config.routes_case_insensitive,
            introspection_path: config.introspection_path.clone(),
            forward_credential: config.forward_credential,
        }
    }

    /// First matching route rule wins; the introspection path (`GET` and `HEAD`, SPEC 9)
    /// comes before all rules. Another method on that path is the app's, routed by the
    /// rules: an app's own `POST /auth` is not answered by keyward.
    pub fn route(&self, method: &http::Method, path: &str) -> Route<'_> {
        let reads = *method == http::Method::GET || *method == http::Method::HEAD;
        if reads && self.introspection_path.as_deref() == Some(path) {
            return Route::Introspection;
        }
        self.app_route(path)
    }

    /// What the app's own readings of `path` ask beyond the path's own route: `Some` when a
    /// reading that differs from `path` meets a protected route, with the `any_of` of each
    /// rule they meet (none: a key alone, by the default rule). Frameworks read more into a
    /// path than its bytes: Rails, Symfony and Spring's suffix matching route `/admin.json`
    /// (and `/admin.json/`) to the `/admin` handler, IIS drops dots and spaces at the end of
    /// a segment (`/admin./users`, `/admin%20`), and `others` are those of
    /// [`crate::path::readings`] (the path cut at an encoded `?`, its NFKC form). Required on
    /// top of the path's own route: more is asked, never less (a rule matched by a reading
    /// alone never replaces the one the path itself meets).
    pub fn reading_route(&self, path: &str, others: &[String]) -> Option<Vec<&[String]>> {
        let own = app_reading(path);
        if own.is_none() && others.is_empty() {
            return None;
        }
        // A path a `path` rule names exactly is the operator's own word on it (a public
        // `/favicon.ico` before a protected catch-all): no reading overrides it.
        let rule = self.first_rule(path);
        if rule.is_some_and(|rule| rule.path.is_some()) {
            return None;
        }
        // A key alone is more only where the path's own route asks none.
        let own_public = rule.is_some_and(|rule| rule.public);
        let mut asks: Option<Vec<&[String]>> = None;
        let readings = own.into_iter().chain(
            others
                .iter()
                .flat_map(|r| std::iter::once(r.clone()).chain(app_reading(r))),
        );
        for reading in readings.filter(|r| r != path) {
            match self.app_route(&reading) {
                Route::Protected {
                    extra: Some(any_of),
                } => {
                    let list = asks.get_or_insert_with(Vec::new);
                    if !list.contains(&any_of) {
                        list.push(any_of);
                    }
                }
                Route::Protected { extra: None } if own_public => {
                    asks.get_or_insert_with(Vec::new);
                }
                _ => {}
            }
        }
        asks
    }

    /// The route of a request that goes on to the app, whatever its path: by the route
    /// rules alone. Behind a decision (SPEC 15) the introspection path is the app's too, so
    /// it is routed, and its scopes checked, as any other.
    pub fn app_route(&self, path: &str) -> Route<'_> {
        match self.first_rule(path) {
            Some(rule) if rule.public => Route::Public,
            Some(rule) => Route::Protected {
                extra: Some(&rule.any_of),
            },
            None => Route::Protected { extra: None },
        }
    }

    /// The first route rule `path` meets (as `routes_case_insensitive` reads it: a public
    /// rule only by ASCII case, never by a folding, which opens less, not more).
    fn first_rule(&self, path: &str) -> Option<&RouteRule> {
        let path = &*crate::path::delimiters_decoded(path);
        if !self.fold_case {
            return self.routes.iter().find(|rule| rule.matches(path, false));
        }
        let folded = fold_lookalikes(path);
        self.routes
            .iter()
            .zip(&self.folded_routes)
            .find(|(rule, folded_rule)| match rule.public {
                true => rule.matches(path, true),
                false => folded_rule.matches(&folded, true),
            })
            .map(|(rule, _)| rule)
    }

    /// The scopes (any of) that allow `method`; `None`: no rule names the method, so no key
    /// may use it (fail closed). At most one rule names it: the config refuses a method
    /// listed in two.
    pub fn method_scopes(&self, method: &Method) -> Option<&[String]> {
        self.scopes
            .iter()
            .find(|r| r.methods.contains(method))
            .map(|r| r.any_of.as_slice())
    }

    /// The method as a log line carries it: one of HTTP's own, or one a scope rule names,
    /// as it is; any other as `OTHER`. A method is the client's to choose, and one that is
    /// a key (sent so by mistake, or to plant it) was logged.
    pub fn logged_method<'m>(&self, method: &'m Method) -> &'m str {
        let known = matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::POST
                | Method::PUT
                | Method::DELETE
                | Method::OPTIONS
                | Method::PATCH
                | Method::TRACE
                | Method::CONNECT
        ) || self.method_scopes(method).is_some();
        if known {
            method.as_str()
        } else {
            "OTHER"
        }
    }

    pub fn prefix_rule(&self, key: &[u8]) -> PrefixRule<'_> {
        if self.prefixes.is_empty() {
            return PrefixRule::Unrestricted;
        }
        self.prefixes
            .iter()
            .find(|(p, _)| key.starts_with(p.as_bytes()))
            .map_or(PrefixRule::Unknown, |(_, t)| PrefixRule::Types(t))
    }

    /// Names of every header a credential may arrive in, each once (stripped before
    /// forwarding).
    pub fn credential_headers(&self) -> &[http::HeaderName] {
        &self.credential_headers
    }

    /// Could a correlation id a client sent be a key? One that holds a configured key
    /// prefix, or overlaps a credential this request carries, holding it or being part of
    /// it (`x-request-id: req-<the key>` beside `Authorization: Bearer <the key>`, or beside
    /// `?api_key=<the key>` in one of `queries`): logged, echoed and forwarded, it would put
    /// a raw key where none may be. (Overlaps as long as the shortest key: a short id is no
    /// key.)
    pub fn could_be_a_key(
        &self,
        value: &[u8],
        headers: &http::HeaderMap,
        queries: &[&str],
    ) -> bool {
        self.holds_prefix(value) || self.shares_a_run_with_a_credential(value, headers, queries)
    }

    /// Does `value` share a run of [`MIN_KEY_LEN`] bytes with a credential the request
    /// carries (in `headers`, or in one of `queries`)? See [`Self::could_be_a_key`].
    pub fn shares_a_run_with_a_credential(
        &self,
        value: &[u8],
        headers: &http::HeaderMap,
        queries: &[&str],
    ) -> bool {
        // Any run of 8 bytes (the shortest key) in common: `req-<key>` holds the key, a part
        // of the key is key material, and so is `abc<most of the key>`. The id's runs (at
        // most 121: ids are at most 128 bytes) are sorted once, on the stack, and searched
        // for each of the credentials' runs: each credential is then one pass, however long
        // a client makes it (sorting a 15 KB header's runs cost 5 times a request), and
        // each run a binary search (a filter let a crafted credential hit on every run).
        let mut runs = [0u64; ID_RUNS];
        let count = value.len().saturating_sub(MIN_KEY_LEN - 1);
        if count > ID_RUNS {
            // Longer than any id keyward echoes: as good as a key.
            return true;
        }
        for (slot, w) in runs.iter_mut().zip(value.windows(MIN_KEY_LEN)) {
            *slot = run(w);
        }
        let runs = &mut runs[..count];
        runs.sort_unstable();
        let mut found = false;
        self.each_credential(headers, queries, &mut |c| {
            found = found
                || c.windows(MIN_KEY_LEN)
                    .any(|w| runs.binary_search(&run(w)).is_ok());
        });
        found
    }

    /// The path as it may be logged (SPEC 11: no raw key in any log line): a segment that
    /// could hold a key is replaced by [`REDACTED`]. With `prefixes` configured every valid
    /// key starts with one, so a segment holding one (escaped or not) is screened whether
    /// or not the request carried a credential (`/bot<key>/getMe`, `/verify/<key>`). With
    /// or without them, a segment is screened when it shares a run of [`MIN_KEY_LEN`]
    /// bytes with a credential the request carries: the key without its prefix, which is
    /// public, is the whole secret (`headers` is `None` where they are gone: then, without
    /// prefixes to tell a key by, every segment that long is). `path` is what will be
    /// logged, already cut to its logged length: the cost of screening it is bounded by it.
    pub fn loggable_path<'a>(
        &self,
        path: Cow<'a, str>,
        headers: Option<&http::HeaderMap>,
        queries: &[&str],
    ) -> Cow<'a, str> {
        let long = |s: &str| s.len() >= MIN_KEY_LEN;
        let prefixed = !self.prefixes.is_empty();
        // Most paths have nothing to screen: one pass, nothing built.
        let by_prefix = if prefixed {
            // As an app reads it: escapes decoded, fullwidth `ｓｔａ＿` as `sta_`.
            segment_bits(&path, |s| {
                long(s) && self.holds_prefix(crate::path::as_decoded(s).as_bytes())
            })
        } else {
            0
        };
        let by_credential = match headers {
            _ if !path.split('/').any(long) => 0,
            Some(headers) => self.overlapping_segments(&path, headers, queries),
            // Nothing to tell a key by (a request its client abandoned, logged once its
            // headers are gone): every segment long enough to be one.
            None if !prefixed => segment_bits(&path, long),
            None => 0,
        };
        let doomed: u64 = by_prefix
            | by_credential
            | self.assigning_segments(&path)
            | digest_segments(&path)
            | spanning_digest_segments(&path);
        if doomed == 0 {
            return path;
        }
        let screened: Vec<&str> = path
            .split('/')
            .enumerate()
            .map(|(i, s)| if doomed & bit(i) != 0 { REDACTED } else { s })
            .collect();
        Cow::Owned(screened.join("/"))
    }

    /// The segments of `path` that give the query credential's parameter a value, as a
    /// parser that searches the whole URL for `&name=` reads them (`/x&api_key=K`, which
    /// is refused: its line is still logged).
    fn assigning_segments(&self, path: &str) -> u64 {
        let Some(name) = self.credential_query() else {
            return 0;
        };
        segment_bits(path, |s| {
            s.contains(['=', '%', '\u{ff1d}']) && {
                let decoded = crate::path::as_decoded(s).replace(['?', ';'], "&");
                crate::auth::credential::assigns_param(&decoded, name) > 0
            }
        })
    }

    /// The configured key prefixes.
    pub fn prefixes(&self) -> impl Iterator<Item = &str> + '_ {
        self.prefixes
            .iter()
            .map(|(p, _)| p.as_str())
            .filter(|p| !p.is_empty())
    }

    /// Does `value` hold a configured prefix, at its start or after a character no word
    /// goes on with, followed by 16 characters of what a key's random part is made of
    /// (`[A-Za-z0-9_-]`)? Looser than [`Self::holds_prefix`], for a value that is some name
    /// of the client's choosing (`costa_rica_operations_team` holds `sta_` and
    /// `compat_layer_team_production` holds `pat_`, inside words: no keys); a key of the
    /// snapshot, or the request's own, is caught whatever its length by the checks beside
    /// this one.
    pub fn holds_a_prefixed_run(&self, value: &str) -> bool {
        let keyish = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-');
        let bytes = value.as_bytes();
        self.prefixes().any(|p| {
            value.match_indices(p).any(|(at, _)| {
                let starts = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
                let rest = &bytes[at + p.len()..];
                starts && rest.iter().take_while(|b| keyish(b)).count() >= 16
            })
        })
    }

    /// Does `value` hold one of the configured key prefixes anywhere?
    fn holds_prefix(&self, value: &[u8]) -> bool {
        self.prefixes.iter().any(|(p, _)| {
            let p = p.as_bytes();
            !p.is_empty() && value.windows(p.len()).any(|w| w == p)
        })
    }

    /// The segments of `path` (bits as [`segment_bits`] numbers them) that share a run of
    /// [`MIN_KEY_LEN`] bytes with a credential the request carries. Each credential is one
    /// pass over its runs, each tried against a 4096-bit filter of the path's (a logged
    /// path is at most 1 KiB: at most 1017 runs); only one that passes has the path's
    /// segments searched for it, those not found yet, and the search stops once every
    /// segment long enough is found.
    fn overlapping_segments(&self, path: &str, headers: &http::HeaderMap, queries: &[&str]) -> u64 {
        let holds = |s: &str, r: u64| {
            crate::path::as_decoded(s)
                .as_bytes()
                .windows(MIN_KEY_LEN)
                .any(|w| run(w) == r)
        };
        let mut filter = RunFilter::default();
        let mut long = 0u64;
        for (i, s) in path.split('/').enumerate() {
            for w in crate::path::as_decoded(s).as_bytes().windows(MIN_KEY_LEN) {
                filter.insert(run(w));
                long |= bit(i);
            }
        }
        let mut doomed = 0u64;
        // A search that finds nothing is the filter's false positive; a credential crafted
        // to hit the filter on every run made one per run (2 ms a request). Past
        // `MAX_FRUITLESS` of them, every segment long enough is screened: over-redaction,
        // in the log line only.
        let mut fruitless = 0;
        let mut scan = |credential: &[u8]| {
            for w in credential.windows(MIN_KEY_LEN) {
                let r = run(w);
                if !filter.may_hold(r) || doomed == long {
                    continue;
                }
                let before = doomed;
                for (i, s) in path.split('/').enumerate() {
                    if doomed & bit(i) == 0 && holds(s, r) {
                        doomed |= bit(i);
                    }
                }
                fruitless += usize::from(doomed == before);
                if fruitless > MAX_FRUITLESS {
                    doomed = long;
                }
            }
        };
        if long != 0 {
            self.each_credential(headers, queries, &mut scan);
        }
        doomed
    }

    /// Every credential a request carries, as a client or an app would read it: each token
    /// of a credential header in any spelling (`X_API_Key` is the key to a CGI app, and to
    /// a client that sent it; `Bearer <key> extra`), and each value of the query credential.
    fn each_credential(
        &self,
        headers: &http::HeaderMap,
        queries: &[&str],
        f: &mut dyn FnMut(&[u8]),
    ) {
        let credential = |name: &http::HeaderName| {
            self.credential_headers
                .iter()
                .any(|c| crate::header_names::same_name(name.as_str(), c.as_str()))
        };
        for (_, v) in headers.iter().filter(|(name, _)| credential(name)) {
            v.as_bytes()
                .split(|b| b.is_ascii_whitespace() || *b == b',')
                .for_each(&mut *f);
        }
        if let Some(name) = self.credential_query() {
            for q in queries {
                for v in crate::auth::credential::query_param_values(q, name).flatten() {
                    f(&v);
                }
            }
        }
    }

    /// The query parameter a credential may arrive in, if configured.
    pub fn credential_query(&self) -> Option<&str> {
        self.credentials.iter().find_map(|c| match c {
            CredentialSource::Query { name } => Some(name.as_str()),
            _ => None,
        })
    }
}

/// `rule` with its path or prefix folded as [`fold_lookalikes`] folds paths.
fn folded_rule(rule: &RouteRule) -> RouteRule {
    let fold = |p: &Option<String>| p.as_deref().map(|p| fold_lookalikes(p).into_owned());
    RouteRule {
        path: fold(&rule.path),
        prefix: fold(&rule.prefix),
        ..rule.clone()
    }
}

/// `path` as a framework may read it (see [`Policy::reading_route`]): every segment without
/// the dots and (encoded) spaces it ends with, and the last one also without a format
/// suffix (from its first dot, when something comes before it) or one trailing slash.
/// `None` when that is `path` itself.
fn app_reading(path: &str) -> Option<String> {
    // Most paths are read as they are: one pass over the bytes decides it, nothing is built.
    if !path.bytes().any(|c| matches!(c, b'.' | b' ' | b'%')) {
        return None;
    }
    let trimmed = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let segments: Vec<&str> = trimmed.split('/').collect();
    let last = segments.len() - 1;
    let mut out = String::with_capacity(path.len());
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        let mut s = *segment;
        loop {
            let before = s.len();
            s = s.trim_end_matches(['.', ' ']);
            for space in ["%20", "%2e", "%2E"] {
                if let Some(rest) = s.strip_suffix(space) {
                    s = rest;
                }
            }
            if s.len() == before {
                break;
            }
        }
        if i == last {
            if let Some((name, _format)) = s.split_once('.') {
                if !name.is_empty() {
                    s = name;
                }
            }
        }
        out.push_str(s);
    }
    (out != path).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&Config::from_yaml(include_str!("../../config/keyward.yaml")).unwrap())
    }

    const HEX: &str = "c6ffcb30297a172f564779bcdcf7d47394ea14a71fcc078d857361dc65a8bf7e";

    /// `hex` as a fingerprint: upper-case pairs joined by `:`.
    fn colons(hex: &str) -> String {
        let pairs: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).to_uppercase())
            .collect();
        pairs.join(":")
    }

    /// A segment that could hold a key is logged as `[redacted]`: by a configured prefix
    /// (escaped too) with or without headers; without prefixes, by overlap with a credential
    /// the request carries.
    #[test]
    fn a_logged_path_never_holds_a_key() {
        let p = policy();
        let key = "sta_9f8e7d6c5b4a39281706f5e4d3c2b1a0";
        let screened = |path: &str| p.loggable_path(Cow::Borrowed(path), None, &[]).into_owned();
        for (path, logged) in [
            ("/v1/items/12345", "/v1/items/12345"),
            (&*format!("/v1/verify/{key}"), "/v1/verify/[redacted]"),
            (&*format!("/bot{key}/getMe"), "/[redacted]/getMe"),
            (
                &*format!("/x/{}", key.replacen('_', "%5F", 1)),
                "/x/[redacted]",
            ),
            (&*format!("/{key}/{key}/"), "/[redacted]/[redacted]/"),
            // Fullwidth `ｓｔａ＿`, escaped, as an app that normalizes reads it.
            (
                &*format!("/x/%EF%BD%93%EF%BD%94%EF%BD%81%EF%BC%BF{}", &key[4..]),
                "/x/[redacted]",
            ),
            // Too short to hold a key.
            ("/sta_x/", "/sta_x/"),
            // A digest, in hex (either case, escaped or not) or in base64 / base64url, or
            // an unprefixed generated key: key material whatever the snapshot holds.
            (&*format!("/x/{HEX}"), "/x/[redacted]"),
            (&*format!("/x/{}/y", HEX.to_uppercase()), "/x/[redacted]/y"),
            (&*format!("/x/%63{}", &HEX[1..]), "/x/[redacted]"),
            (&*format!("/x/{HEX}%00"), "/x/[redacted]"),
            (
                "/x/xv_LMCl6Fy9WR3m83PdHOU6hSnH8wHjYVzYdxlqL-_4",
                "/x/[redacted]",
            ),
            (
                "/x/xv+LMCl6Fy9WR3m83PdHOU6hSnH8wHjYVzYdxlqL+4Q=",
                "/x/[redacted]",
            ),
            // Long slugs are kept, title case and digits too.
            (
                "/blog/how-to-run-keyward-beside-every-app-in-a-cluster",
                "/blog/how-to-run-keyward-beside-every-app-in-a-cluster",
            ),
            (
                "/docs/How-To-Upgrade-From-Version1-To-Version2-In-10-Minutes",
                "/docs/How-To-Upgrade-From-Version1-To-Version2-In-10-Minutes",
            ),
            (
                "/f/Report_2024_Q3_Financial_Summary_Final_Version.pdf",
                "/f/Report_2024_Q3_Financial_Summary_Final_Version.pdf",
            ),
            (
                "/b/2024/10/Kubernetes-1-29-Release-Notes-And-Migration-Guide",
                "/b/2024/10/Kubernetes-1-29-Release-Notes-And-Migration-Guide",
            ),
            // A digest as a fingerprint (`C6:FF:…`) or in dashed groups.
            (&*format!("/x/{}", colons(HEX)), "/x/[redacted]"),
            (
                &*format!(
                    "/x/{}-{}-{}-{}",
                    &HEX[..16],
                    &HEX[16..32],
                    &HEX[32..48],
                    &HEX[48..]
                ),
                "/x/[redacted]",
            ),
            // A traceparent in a path is kept.
            (
                "/t/00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "/t/00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            // Split across segments (a client's, or standard base64's own `/`), or base32.
            (
                &*format!("/d/{}/{}", &HEX[..32], &HEX[32..]),
                "/d/[redacted]/[redacted]",
            ),
            (
                &*format!("/d/{}/{}/{}/x", &HEX[..20], &HEX[20..40], &HEX[40..]),
                "/d/[redacted]/[redacted]/[redacted]/x",
            ),
            (
                "/d/xv/LMCl6Fy9WR3m83PfUc5TqFKcfzAeNhXNh3GWov34=",
                "/d/xv/[redacted]",
            ),
            (
                "/d/xv%2FLMCl6Fy9WR3m83PfUc5TqFKcfzAeNhXNh3GWov34=",
                "/d/[redacted]",
            ),
            (
                "/d/Y374WMBJPILS6VSHPG6NZ56UOOKOUFFHD7GAPDMFONQ5YZNIX57A",
                "/d/[redacted]",
            ),
            (
                "/d/wyO241cBfvGm8IVnayeRy/NrZEbjxiPkceo0dYANV6G4",
                "/d/[redacted]/[redacted]",
            ),
            (
                "/d/sta_wyO241cB/fvGm8IVnayeRyNrZEbjxiPkceo0dYANV6G4",
                "/d/[redacted]/[redacted]",
            ),
            // Ordinary segments side by side are kept.
            (
                "/api/v1/organizations/Acme2024/projects/Proj9x/repositories/Repo42",
                "/api/v1/organizations/Acme2024/projects/Proj9x/repositories/Repo42",
            ),
            (
                "/objects/5f8d0a1b2c3d4e5f6a7b8c9d/children/5f8d0a1b2c3d4e5f6a7b8c9e",
                "/objects/5f8d0a1b2c3d4e5f6a7b8c9d/children/5f8d0a1b2c3d4e5f6a7b8c9e",
            ),
        ] {
            assert_eq!(screened(path), logged, "{path}");
        }
        assert!(matches!(
            p.loggable_path(Cow::Borrowed("/v1/items"), None, &[]),
            Cow::Borrowed(_)
        ));
        // With prefixes too, the request's own key without its prefix (which is public),
        // or a run of 8 of its bytes, is screened (review 70: logged as sent).
        let mut carried = http::HeaderMap::new();
        carried.insert("x-api-key", key.parse().unwrap());
        for (path, logged) in [
            (format!("/x/{}", &key[4..]), "/x/[redacted]"),
            (format!("/x/{}/y", &key[10..30]), "/x/[redacted]/y"),
            ("/v1/customers/orders".to_owned(), "/v1/customers/orders"),
        ] {
            assert_eq!(
                p.loggable_path(Cow::Borrowed(&path), Some(&carried), &[]),
                logged,
                "{path}"
            );
        }

        let yaml = include_str!("../../config/keyward.yaml");
        let yaml = yaml
            .replace(
                "prefixes:\n  sta_: [service_account]\n  ste_: [enterprise_service_account]\n  pat_: [personal]\n",
                "prefixes: {}\n",
            )
            .replace("# - { query: api_key }", "- { query: api_key }");
        let bare = Policy::new(&Config::from_yaml(&yaml).unwrap());
        assert!(
            bare.prefixes.is_empty(),
            "the shipped config's prefixes were not removed"
        );
        let secret = "zzz_0123456789abcdef";
        let mut headers = http::HeaderMap::new();
        // The query credential given a value in the path, as parsers that search the whole
        // URL for `&api_key=` read it: screened whatever the request carries.
        for (path, logged) in [
            (format!("/public/&api_key={secret}&"), "/public/[redacted]"),
            (format!("/x&a=1%26API_KEY%3D{secret}/y"), "/[redacted]/y"),
            ("/x&api_key=/y".to_owned(), "/[redacted]/y"),
        ] {
            assert_eq!(
                bare.loggable_path(Cow::Borrowed(&path), Some(&headers), &[]),
                logged,
                "{path}"
            );
        }
        headers.insert("x-api-key", secret.parse().unwrap());
        let bare_screened = |path: &str, h: Option<&http::HeaderMap>, q: &[&str]| {
            bare.loggable_path(Cow::Borrowed(path), h, q).into_owned()
        };
        assert_eq!(
            bare_screened(&format!("/v/{secret}"), Some(&headers), &[]),
            "/v/[redacted]"
        );
        assert_eq!(
            bare_screened("/v/0123456789ab", Some(&headers), &[]),
            "/v/[redacted]"
        );
        assert_eq!(
            bare_screened(&format!("/v/{secret}/x"), None, &[]),
            "/v/[redacted]/x"
        );
        let query = format!("api_key={secret}");
        assert_eq!(
            bare_screened(
                &format!("/v/{secret}"),
                Some(&http::HeaderMap::new()),
                &[&query]
            ),
            "/v/[redacted]"
        );
        assert_eq!(
            bare_screened("/v1/items/abcdefghij", Some(&headers), &[]),
            "/v1/items/abcdefghij"
        );
    }

    #[test]
    fn routes() {
        let p = policy();
        assert_eq!(p.route(&http::Method::GET, "/healthz"), Route::Public);
        assert_eq!(
            p.route(&http::Method::GET, "/healthz/x"),
            Route::Protected { extra: None }
        );
        assert_eq!(p.route(&http::Method::GET, "/auth"), Route::Introspection);
        assert_eq!(p.route(&http::Method::HEAD, "/auth"), Route::Introspection);
        assert_eq!(
            p.route(&http::Method::POST, "/auth"),
            Route::Protected { extra: None }
        );
        assert!(
            matches!(p.route(&http::Method::GET, "/admin/users"), Route::Protected { extra: Some(s) } if s == ["admin"])
        );
        assert!(matches!(
            p.route(&http::Method::GET, "/admin"),
            Route::Protected { extra: Some(_) }
        ));
        assert_eq!(
            p.route(&http::Method::GET, "/administrator"),
            Route::Protected { extra: None }
        );
        assert_eq!(
            p.route(&http::Method::GET, "/Admin/users"),
            Route::Protected { extra: None }
        );
    }

    fn with_routes(extra: &str) -> Policy {
        let yaml = format!(
            "listen: 127.0.0.1:1\nupstream: http://a:1\nenvironment: t\nkeys: {{ file: k }}\n{extra}"
        );
        Policy::new(&Config::from_yaml(&yaml).unwrap())
    }

    #[test]
    fn case_insensitive_routes_fold_the_lookalikes_an_app_folds() {
        let p = with_routes(
            "routes_case_insensitive: true\nroutes: [{ prefix: /admin/, any_of: [admin] }, { path: /secret, any_of: [admin] }, { prefix: /staff/, any_of: [admin] }, { prefix: /access/, any_of: [admin] }, { prefix: /stra%C3%9Fe/, any_of: [admin] }, { prefix: /caf%C3%A9/, any_of: [admin] }, { prefix: /%CF%83%CF%84/, any_of: [admin] }, { prefix: /public/, public: true }]\n",
        );
        for path in [
            "/adm%C4%B1n/x",
            "/ADM%C4%B0N/x",
            "/%C5%BFecret",
            "/admin/%E2%84%AAey",
            // Upper-cased to more letters than one: `ß` is `SS`, `ﬆ` is `ST`; `ẞ` through
            // its lower case; the mathematical `𝚤` through NFKC.
            "/%EF%AC%86aff/x",
            "/acce%C3%9F/x",
            "/acce%E1%BA%9E/x",
            "/adm%F0%9D%9A%A4n/x",
            // Rules with non-ASCII letters meet their own path, in any case.
            "/stra%C3%9Fe/x",
            "/STRASSE/x",
            "/CAF%C3%89/x",
            "/caf%C3%A9/x",
            // Final sigma folds as sigma does.
            "/%CF%82%CF%84/x",
            "/%CE%A3%CE%A4/x",
        ] {
            assert!(
                matches!(p.route(&http::Method::GET, path), Route::Protected { extra: Some(s) } if s == ["admin"]),
                "{path}"
            );
        }
        // A public rule opens what ASCII case opens, never what a folding makes of a path.
        assert_eq!(p.route(&http::Method::GET, "/PUBLIC/x"), Route::Public);
        assert_eq!(
            p.route(&http::Method::GET, "/publ%C4%B1c/x"),
            Route::Protected { extra: None }
        );
        let strict = with_routes("routes: [{ prefix: /admin/, any_of: [admin] }]\n");
        assert_eq!(
            strict.route(&http::Method::GET, "/adm%C4%B1n/x"),
            Route::Protected { extra: None },
            "case-sensitive routes: an app that matches exactly does not fold either"
        );
    }

    #[test]
    fn a_public_rule_opens_only_what_it_names() {
        let p = with_routes(
            "routes: [{ prefix: /files/, public: true }, { path: /healthz, public: true }, { path: /ping/, public: true }]\n",
        );
        for open in ["/files/a", "/files/a/", "/healthz", "/ping/"] {
            assert_eq!(p.route(&http::Method::POST, open), Route::Public, "{open}");
        }
        for closed in ["/files", "/files/", "/healthz/", "/ping", "/file"] {
            assert_eq!(
                p.route(&http::Method::POST, closed),
                Route::Protected { extra: None },
                "{closed}"
            );
        }
    }

    #[test]
    fn the_app_s_reading_of_a_path_adds_the_rule_it_meets() {
        let p = with_routes(
            "routes: [{ path: /billing/report, any_of: [billing] }, { prefix: /billing/, any_of: [admin] }, { path: /reports/export, any_of: [admin] }, { prefix: /admin/, any_of: [admin] }, { prefix: /files/, public: true }, { path: /openapi.json, public: true }]\n",
        );
        let admin = Some(&["admin".to_string()][..]);
        for read_as_admin in [
            "/admin.json",
            "/admin.",
            "/admin.json/",
            "/admin./users",
            "/admin%20",
            "/admin%20/users",
            "/reports/export.csv",
            "/reports/export.csv/",
            "/reports/export./",
        ] {
            assert_eq!(
                p.reading_route(read_as_admin, &[]),
                admin.map(|a| vec![a]),
                "{read_as_admin}"
            );
        }
        // The path's own rule still applies: /billing/report.pdf meets /billing/ (admin)
        // and its reading /billing/report (billing) is asked on top, never instead.
        assert_eq!(
            p.app_route("/billing/report.pdf"),
            Route::Protected { extra: admin }
        );
        assert_eq!(
            p.reading_route("/billing/report.pdf", &[]),
            Some(vec![&["billing".to_string()][..]])
        );
        // A reading that meets no rule, or a public one, adds nothing.
        for nothing in [
            "/openapi.json",
            "/files/a.json",
            "/v1/items",
            "/v1/items.json",
            "/.well-known/x",
        ] {
            assert_eq!(p.reading_route(nothing, &[]), None, "{nothing}");
        }
    }

    /// Rules are compared in NFKC form with the path's NFKC reading: a rule with `é` meets
    /// `e` and a combining acute, and one written with the Angstrom sign meets `Å`.
    #[test]
    fn readings_meet_rules_in_nfkc_form() {
        let p = with_routes(
            "routes: [{ prefix: /caf%C3%A9/, any_of: [admin] }, { prefix: /%E2%84%ABngstrom/, any_of: [admin] }]\n",
        );
        let any_of = ["admin".to_string()];
        let admin = Some(vec![&any_of[..]]);
        for path in ["/cafe%CC%81/x", "/%C3%85ngstrom/x", "/A%CC%8Angstrom/x"] {
            let readings = crate::path::readings(path).unwrap();
            let own = match p.app_route(path) {
                Route::Protected { extra: Some(e) } => Some(vec![e]),
                _ => None,
            };
            assert_eq!(
                own.or_else(|| p.reading_route(path, &readings)),
                admin,
                "{path}"
            );
        }
    }

    #[test]
    fn a_path_a_path_rule_names_is_read_as_named() {
        let p = with_routes(
            "routes: [{ path: /favicon.ico, public: true }, { path: /users.json, any_of: [read] }, { prefix: /, any_of: [admin] }]\n",
        );
        assert_eq!(p.reading_route("/favicon.ico", &[]), None);
        assert_eq!(p.reading_route("/users.json", &[]), None);
        assert_eq!(
            p.reading_route("/other.json", &[]),
            Some(vec![&["admin".to_string()][..]]),
            "a prefix rule's path is read"
        );
    }

    #[test]
    fn exact_rules_cover_one_trailing_slash() {
        let p = with_routes(
            "routes: [{ path: /reports/export, any_of: [admin] }, { path: /dir/, any_of: [x] }]\n",
        );
        for covered in ["/reports/export", "/reports/export/"] {
            assert!(
                matches!(p.route(&http::Method::GET, covered), Route::Protected { extra: Some(s) } if s == ["admin"]),
                "{covered}"
            );
        }
        for other in [
            "/reports/export//x",
            "/reports/exports",
            "/reports/export/x",
            "/reports",
        ] {
            assert_eq!(
                p.route(&http::Method::GET, other),
                Route::Protected { extra: None },
                "{other}"
            );
        }
        assert!(
            matches!(p.route(&http::Method::GET, "/dir"), Route::Protected { extra: Some(s) } if s == ["x"])
        );
        assert!(
            matches!(p.route(&http::Method::GET, "/dir/"), Route::Protected { extra: Some(s) } if s == ["x"])
        );
        let root = with_routes("routes: [{ path: /, public: true }]\n");
        assert_eq!(root.route(&http::Method::GET, "/"), Route::Public);
        assert_eq!(
            root.route(&http::Method::GET, "/x"),
            Route::Protected { extra: None }
        );
    }

    #[test]
    fn case_insensitive_matching_is_opt_in() {
        let rules = "routes: [{ prefix: /admin/, any_of: [admin] }, { path: /Reports/Export, any_of: [admin] }]\n";
        let exact = with_routes(rules);
        assert_eq!(
            exact.route(&http::Method::GET, "/ADMIN/users"),
            Route::Protected { extra: None }
        );
        let folded = with_routes(&format!("{rules}routes_case_insensitive: true\n"));
        for path in [
            "/ADMIN/users",
            "/Admin",
            "/admin/",
            "/reports/export",
            "/REPORTS/EXPORT/",
        ] {
            assert!(
                matches!(folded.route(&http::Method::GET, path), Route::Protected { extra: Some(s) } if s == ["admin"]),
                "{path}"
            );
        }
        assert_eq!(
            folded.route(&http::Method::GET, "/administrator"),
            Route::Protected { extra: None }
        );
    }

    #[test]
    fn method_scopes() {
        let p = policy();
        assert_eq!(p.method_scopes(&Method::GET).unwrap(), ["read", "write"]);
        assert_eq!(p.method_scopes(&Method::DELETE).unwrap(), ["write"]);
        assert!(p.method_scopes(&Method::TRACE).is_none());
    }

    #[test]
    fn prefixes() {
        let p = policy();
        assert_eq!(
            p.prefix_rule(b"sta_abc"),
            PrefixRule::Types(&[PrincipalType::ServiceAccount])
        );
        assert_eq!(p.prefix_rule(b"xyz_abc"), PrefixRule::Unknown);
        let open = Policy {
            prefixes: vec![],
            ..p
        };
        assert_eq!(open.prefix_rule(b"xyz"), PrefixRule::Unrestricted);
    }
}
