//! `keyward keys generate` and `keyward keys hash`: the only places a raw key is printed,
//! once, to the operator who asked for it.

use base64::Engine as _;
use serde::Serialize;

use crate::keys::snapshot::KeyDoc;
use crate::keys::{digest, PrincipalType};

/// Bytes of OS randomness in a generated key (256 bits).
pub const KEY_BYTES: usize = 32;

/// A fresh random key: `prefix` + 43 URL-safe base64 characters.
pub fn generate_key(prefix: &str) -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Lowercase hex SHA-256 of a key, as stored in the snapshot.
pub fn hash_key(raw: &str) -> String {
    hex::encode(digest(raw.trim_end_matches(['\r', '\n']).as_bytes()))
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

#[derive(Serialize)]
struct Entry<'a> {
    keys: [&'a KeyDoc; 1],
}

/// The snapshot entry for a generated key, as YAML to paste under `keys:`.
pub fn entry_yaml(raw: &str, new: &NewKey) -> Result<String, String> {
    let digest_hex = hash_key(raw);
    let doc = KeyDoc {
        id: new
            .id
            .clone()
            .unwrap_or_else(|| format!("key_{}", &digest_hex[..12])),
        sha256: digest_hex,
        kind: new.principal_type.as_str().to_string(),
        subject_id: new.subject_id.clone(),
        account_id: new.account_id.clone(),
        scopes: new.scopes.clone(),
        environment: new.environment.clone(),
        status: Some("active".into()),
        expires_at: new.expires_at.clone(),
        ..KeyDoc::default()
    };
    // Validate exactly as a loaded snapshot would be.
    let names = crate::keys::IdentityNames::new("x-auth-", "check").map_err(|e| e.to_string())?;
    let snapshot = crate::keys::SnapshotDoc {
        version: None,
        keys: vec![doc.clone()],
    };
    crate::keys::Snapshot::from_doc(snapshot, &names, crate::keys::Source::File, String::new())
        .map_err(|e| e.to_string())?;
    serde_yaml::to_string(&Entry { keys: [&doc] }).map_err(|e| e.to_string())
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
            hash_key("test\n"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
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
        assert!(yaml.contains(&hash_key(&raw)));
        assert!(!yaml.contains(&raw));
        let bad = NewKey {
            expires_at: Some("soon".into()),
            ..new
        };
        assert!(entry_yaml(&raw, &bad).unwrap_err().contains("expires_at"));
    }
}
