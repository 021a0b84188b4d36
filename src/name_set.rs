//! A fixed list of header names (or name prefixes) matched as a CGI/WSGI or nginx backend
//! reads a name, every separator as `-`, in a few instructions whatever the list's length.
//!
//! The lists of names keyward strips grow with every gateway an app may have sat behind,
//! and every header of every request is asked against them: a linear scan cost ~800
//! instructions for a plain `x-api-key`. Each entry's first byte, third byte and length are
//! indexed as bit masks when the set is built (at compile time), so a lookup compares the
//! name with only the entries that agree on all three: none for most names, one for a hit.

use crate::header_names::{alias_starts_with, is_separator};

/// Longer names all fall in the last length slot; entries must be shorter.
const MAX_LEN: usize = 64;

/// Up to 128 entries, each lowercase letters, digits and `-` (as proxies spell names), at
/// least three bytes long and starting with a letter or digit: checked when built. An
/// entry's `-` matches any separator in a name; any other byte only itself.
pub struct NameSet<const N: usize> {
    entries: [&'static str; N],
    first: [u128; 256],
    third: [u128; 256],
    /// Bit i at slot `l`: an entry of length `l` (exact), or of length `l` or less (prefix).
    by_len: [u128; MAX_LEN + 1],
}

impl<const N: usize> NameSet<N> {
    /// The names in `entries`, matched whole (`prefix: false`) or as name prefixes.
    pub const fn new(entries: [&'static str; N], prefix: bool) -> Self {
        assert!(N <= 128, "a NameSet holds at most 128 entries");
        let mut set = NameSet {
            entries,
            first: [0; 256],
            third: [0; 256],
            by_len: [0; MAX_LEN + 1],
        };
        let mut i = 0;
        while i < N {
            let e = entries[i].as_bytes();
            assert!(
                e.len() >= 3 && e.len() < MAX_LEN,
                "entry length out of range"
            );
            assert!(
                !is_separator(e[0]),
                "an entry starts with a letter or digit"
            );
            let mut j = 0;
            while j < e.len() {
                let c = e[j];
                // `_` only as a name is really sent (`x-iisnode-auth_user`), matched as is.
                assert!(
                    c == b'-'
                        || (c == b'_' && j != 2)
                        || c.is_ascii_digit()
                        || c.is_ascii_lowercase(),
                    "an entry is spelled with lowercase letters, digits and `-`"
                );
                j += 1;
            }
            let bit = 1u128 << i;
            set.first[e[0] as usize] |= bit;
            set.third[e[2] as usize] |= bit;
            let mut len = e.len();
            loop {
                set.by_len[len] |= bit;
                len += 1;
                if !prefix || len > MAX_LEN {
                    break;
                }
            }
            i += 1;
        }
        set
    }

    /// The entry `name` is (or starts with, for a prefix set), reading each separator in
    /// `name` as `-`.
    pub fn find(&self, name: &str) -> Option<&'static str> {
        let b = name.as_bytes();
        if b.len() < 3 {
            return None;
        }
        // An entry's first byte is a letter or digit, matched exactly; its third may be `-`,
        // which any separator in the name reads as.
        let third = if is_separator(b[2]) { b'-' } else { b[2] };
        let mut candidates = self.first[usize::from(b[0])]
            & self.third[usize::from(third)]
            & self.by_len[b.len().min(MAX_LEN)];
        while candidates != 0 {
            let entry = self.entries[candidates.trailing_zeros() as usize];
            if alias_starts_with(name, entry) {
                return Some(entry);
            }
            candidates &= candidates - 1;
        }
        None
    }

    pub fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header_names::{alias_eq, ASSERTED, ASSERTED_PREFIXES, FORWARDING, OVERRIDES};

    /// Names around every entry: itself, respelled, cut short, lengthened, one byte off.
    fn near(entries: &[&str]) -> Vec<String> {
        let mut names = vec![
            String::new(),
            "x".into(),
            "x-".into(),
            "x-api-key".into(),
            "host".into(),
            "a".repeat(70),
        ];
        for e in entries {
            let long = format!("{e}{}", "z".repeat(70));
            names.extend([
                e.to_string(),
                e.replace('-', "_"),
                e.replace('-', "."),
                e.replace('-', "~"),
                format!("{e}z"),
                format!("{e}-z"),
                e[..e.len() - 1].to_string(),
                long,
            ]);
            for i in 0..e.len() {
                let mut b = e.as_bytes().to_vec();
                b[i] = if b[i] == b'q' { b'r' } else { b'q' };
                names.push(String::from_utf8(b).unwrap());
            }
        }
        names
    }

    fn same_as_a_scan<const N: usize>(entries: [&'static str; N], prefix: bool) {
        let set = NameSet::new(entries, prefix);
        for name in near(&entries) {
            let scan = entries.iter().copied().find(|e| {
                if prefix {
                    alias_starts_with(&name, e)
                } else {
                    alias_eq(&name, e)
                }
            });
            assert_eq!(set.find(&name).is_some(), scan.is_some(), "{name}");
        }
    }

    #[test]
    fn a_lookup_answers_as_a_scan_of_the_whole_list() {
        same_as_a_scan(FORWARDING, false);
        same_as_a_scan(ASSERTED, false);
        same_as_a_scan(OVERRIDES, false);
        same_as_a_scan(ASSERTED_PREFIXES, true);
    }

    #[test]
    fn a_respelled_name_is_found_as_its_entry() {
        let set = NameSet::new(["x-forwarded-", "cf-cert-"], true);
        assert_eq!(set.find("x_forwarded_host"), Some("x-forwarded-"));
        assert_eq!(set.find("cf.cert.x"), Some("cf-cert-"));
        assert_eq!(set.find("x-forwarded"), None);
        let set = NameSet::new(["x-real-ip"], false);
        assert_eq!(set.find("x+real+ip"), Some("x-real-ip"));
        assert_eq!(set.find("x-real-ipv6"), None);
    }
}
