//! `keyward keys generate` and `keyward keys hash`: the only places a raw key is printed,
//! once, to the operator who asked for it.

use base64::Engine as _;

use crate::keys::snapshot::KeyDoc;
use crate::keys::{digest, PrincipalType};

/// Bytes of OS randomness in a generated key (256 bits).
pub const KEY_BYTES: usize = 32;

/// The longest key prefix: with the 43 random characters the key stays far inside the
/// 512 bytes a credential may have (SPEC 3).
pub const MAX_PREFIX: usize = 64;

/// Why a key could never authenticate: keys are 8..512 bytes of visible ASCII (SPEC 3).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnusableKey {
    #[error(
        "a key prefix is at most {MAX_PREFIX} of A-Z a-z 0-9 _ - . (the key would not be usable)"
    )]
    Prefix,
    #[error("a key is 8 to 512 bytes of visible ASCII, without spaces: this one could never authenticate")]
    Key,
}

/// `prefix` may start a key every credential source carries as it is.
pub fn check_prefix(prefix: &str) -> Result<(), UnusableKey> {
    let ok = prefix.len() <= MAX_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    ok.then_some(()).ok_or(UnusableKey::Prefix)
}

/// A fresh random key: `prefix` + 43 URL-safe base64 characters.
pub fn generate_key(prefix: &str) -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Lowercase hex SHA-256 of a key, as stored in the snapshot (a line end after it is not
/// part of it). A key that could never authenticate is refused rather than hashed: its
/// entry would silently match nothing.
pub fn hash_key(raw: &str) -> Result<String, UnusableKey> {
    let key = raw.trim_end_matches(['\r', '\n']);
    let usable = (8..=512).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    usable
        .then(|| hex::encode(digest(key.as_bytes())))
        .ok_or(UnusableKey::Key)
}

/// What `keys generate` needs besides the prefix.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: Option<String>,
    pub principal_type: PrincipalType,
    pub subject_id: String,
    pub account_id: String,
    pub scopes: Vec<String>,
    pub environment: Option<String>,
    pub expires_at: Option<String>,
}

/// A fresh public key id, `key_` + 12 hex characters of OS randomness. It is independent
/// of the key, so nothing about the key or its digest can be read from the id (which shows
/// up in logs, metrics and upstream headers).
pub fn generate_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 6];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!("key_{}", hex::encode(bytes)))
}

/// Why a snapshot entry could not be made for a generated key.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("randomness: {0}")]
    Randomness(getrandom::Error),
    #[error(transparent)]
    Yaml(serde_yaml::Error),
    /// The entry would be refused by a snapshot load (a bad `expires_at`, say).
    #[error(transparent)]
    Refused(crate::keys::SnapshotError),
    /// `expires_at` is past: the key would be refused (401 `expired_api_key`) from issue.
    #[error("expires_at: already past; the key would be expired from the start")]
    AlreadyExpired,
}

/// The snapshot entry for a generated key: a YAML list item, indented to go under the
/// `keys:` list of a snapshot file. The text is checked by parsing it exactly as a loaded
/// snapshot would be, so an entry that would be refused (a bad `expires_at`, say) is an
/// error here rather than at the next reload.
pub fn entry_yaml(raw: &str, new: &NewKey) -> Result<String, EntryError> {
    let id = match &new.id {
        Some(id) => id.clone(),
        None => generate_id().map_err(EntryError::Randomness)?,
    };
    let doc = KeyDoc {
        id: id.into(),
        sha256: hex::encode(digest(raw.as_bytes())).into(),
        kind: new.principal_type.as_str().into(),
        subject_id: new.subject_id.as_str().into(),
        account_id: new.account_id.as_str().into(),
        scopes: new.scopes.clone(),
        environment: new.environment.as_deref().map(Into::into),
        status: Some("active".into()),
        expires_at: new.expires_at.as_deref().map(Into::into),
        ..KeyDoc::default()
    };
    let list = serde_yaml::to_string(&[&doc]).map_err(EntryError::Yaml)?;
    let mut item = String::with_capacity(list.len() + 64);
    for line in list.lines() {
        item.push_str("  ");
        item.push_str(line);
        item.push('\n');
    }
    let parsed = crate::keys::Snapshot::parse(&format!("keys:\n{item}"), crate::keys::Source::File)
        .map_err(EntryError::Refused)?;
    let now = std::time::SystemTime::now();
    if parsed
        .keys()
        .any(|k| k.expires_at.is_some_and(|at| at <= now))
    {
        return Err(EntryError::AlreadyExpired);
    }
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_urlsafe() {
        let a = generate_key("sta_").unwrap();
        let b = generate_key("sta_").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("sta_"));
        assert_eq!(a.len(), 4 + 43);
        assert!(a[4..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn hash_matches_sha256_and_ignores_newline() {
        assert_eq!(
            hash_key("test-key\n").unwrap(),
            hex::encode(digest(b"test-key"))
        );
    }

    #[test]
    fn keys_and_prefixes_that_could_never_authenticate_are_refused() {
        for bad in [
            " key-with-space",
            "short",
            "tab\tkey-1234",
            "two\nlines-of-key",
            &"x".repeat(513),
        ] {
            assert_eq!(hash_key(bad), Err(UnusableKey::Key), "{bad:?}");
        }
        assert!(check_prefix("sk_live-1.").is_ok());
        for bad in ["a b", "key/", &"p".repeat(65), "ké_"] {
            assert_eq!(check_prefix(bad), Err(UnusableKey::Prefix), "{bad:?}");
        }
    }

    #[test]
    fn entry_is_a_valid_snapshot() {
        let raw = generate_key("sta_").unwrap();
        let new = NewKey {
            id: Some("key_ci".into()),
            principal_type: PrincipalType::ServiceAccount,
            subject_id: "s1".into(),
            account_id: "a1".into(),
            scopes: vec!["read".into()],
            environment: None,
            expires_at: Some("2030-01-01T00:00:00Z".into()),
        };
        let yaml = entry_yaml(&raw, &new).unwrap();
        assert!(yaml.starts_with("  - id: key_ci\n"), "{yaml}");
        assert!(yaml.contains(&format!("    sha256: {}\n", hash_key(&raw).unwrap())));
        assert!(!yaml.contains(&raw));
        let generated = entry_yaml(
            &raw,
            &NewKey {
                id: None,
                ..new.clone()
            },
        )
        .unwrap();
        let id = generated
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("  - id: ");
        assert!(id.starts_with("key_") && id.len() == 16, "{id}");
        assert!(
            !hash_key(&raw).unwrap().contains(&id[4..]),
            "the id says nothing about the key"
        );
        let bad = NewKey {
            expires_at: Some("soon".into()),
            ..new.clone()
        };
        assert!(entry_yaml(&raw, &bad)
            .unwrap_err()
            .to_string()
            .contains("expires_at"));
        let expired = NewKey {
            expires_at: Some("1970-01-01T00:00:00Z".into()),
            ..new
        };
        let e = entry_yaml(&raw, &expired).unwrap_err().to_string();
        assert!(e.contains("expires_at: already past"), "{e}");
    }
}
