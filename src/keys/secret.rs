//! What a secret looks like in snapshot text: a raw key or its digest written out, or an
//! id shaped like one. Snapshot errors and the screen of logged and forwarded values ask
//! here, so that no error shows what the screen would refuse.

use super::key::{digest, Digest, MAX_KEY_LEN, MIN_KEY_LEN};

/// What an error shows in place of an id that is, or may be, a secret.
pub const WITHHELD: &str = "(withheld)";

/// Is `text` the raw key of a digest `known` knows, or such a digest in hex or base64
/// (either alphabet, padded or not)?
pub fn names_a_digest(text: &str, known: impl Fn(&Digest) -> bool) -> bool {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    // Shorter or longer is no credential a client can present.
    let key_sized = (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&text.len());
    if key_sized && known(&digest(text.as_bytes())) {
        return true;
    }
    let mut d = Digest::default();
    if text.len() == 64 && hex::decode_to_slice(text, &mut d).is_ok() {
        return known(&d);
    }
    (43..=44).contains(&text.len())
        && [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .filter_map(|engine| engine.decode(text).ok())
            .filter_map(|bytes| Digest::try_from(bytes.as_slice()).ok())
            .any(|d| known(&d))
}

/// Could this id be a raw key or a digest? Then no error shows it: in an entry that is
/// refused, `id` and `sha256` swapped or a new key pasted into `id` are likelier than an id
/// of that shape. 40 characters or more (a generated key is its
/// prefix and 43 more, a digest 64 in hex or 43 in base64), or a run of 20 letters and
/// digits (a random part). Ids people write (`key_billing_prod`, a UUID) are neither.
pub fn may_be_a_secret(id: &str) -> bool {
    id.len() >= 40
        || id
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|run| run.len() >= 20)
}

#[cfg(test)]
#[test]
fn ids_shaped_like_secrets() {
    for id in [
        "key_billing_prod",
        "3f2b8c1e-9a4d-4f6e-8b7a-1c2d3e4f5a6b",
        "acme:prod/key-7",
    ] {
        assert!(!may_be_a_secret(id), "{id}");
    }
    let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    for id in [
        hex,
        "sta_Zq3xV9kPp2Lr8TnW4yBc6HdFj1MsQe7Ua5Gi0Ko-_Xw",
        "k_abcdefghij0123456789",
    ] {
        assert!(may_be_a_secret(id), "{id}");
    }
}
