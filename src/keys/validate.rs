//! Every field of a document entry checked, and the entry built into its [`Key`]. A
//! refusal names the entry and the field and never echoes a value that may be secret.

use std::time::SystemTime;

use super::error::SnapshotError;
use super::key::{Delegation, Digest, Extra, Key, PrincipalType, Status};
use super::schema::{KeyDoc, Meta};
use super::scopes::ScopeCache;
use super::secret::{names_a_digest, WITHHELD};
use super::text::Text;

/// Validate and build entry `index` of the document.
pub(super) fn build_entry(
    index: usize,
    doc: KeyDoc,
    scopes: &mut ScopeCache,
) -> Result<Key, SnapshotError> {
    from_doc(doc, scopes)
        .map_err(|((field, reason), id)| SnapshotError::entry(index, &id, field, reason))
}

impl Meta {
    /// `generated_at` as written in the document, checked.
    pub fn new(version: Option<u64>, generated_at: Option<&str>) -> Result<Meta, SnapshotError> {
        let generated_at = parse_time("generated_at", generated_at)
            .map_err(|(field, reason)| SnapshotError::Parse(format!("{field}: {reason}")))?;
        Ok(Meta {
            version,
            generated_at,
        })
    }
}

type FieldError = (&'static str, String);

/// Checks every field by reference (so a refusal can name the entry without copying
/// its id up front), then builds the key by moving the document's strings.
fn from_doc(doc: KeyDoc, scopes: &mut ScopeCache) -> Result<Key, (FieldError, String)> {
    match Checked::of(&doc) {
        Ok(c) => Ok(build(doc, c, scopes)),
        // An id that is not one is not echoed: it may be anything, of any length.
        Err(e) if check_id("id", &doc.id).is_err() => Err((e, "(invalid)".into())),
        // Its own raw key or digest pasted into `id`: not shown (the other entries' are
        // looked for where the whole list is known).
        Err(e) if names_its_own_digest(&doc) => Err((e, WITHHELD.into())),
        Err(e) => Err((e, doc.id.into())),
    }
}

fn build(doc: KeyDoc, c: Checked, scopes: &mut ScopeCache) -> Key {
    let extra = Extra {
        subject_email: doc.subject_email.map(Text::new),
        account_short_id: doc.account_short_id.map(Text::new),
        enterprise_id: doc.enterprise_id.map(Text::new),
        org_id: doc.org_id.map(Text::new),
        environment: doc.environment,
        rate_limit: doc.rate_limit,
        delegation: c.delegation,
        delegate_accounts: doc.delegate_accounts,
    };
    Key {
        id: Text::new(doc.id),
        subject_id: Text::new(doc.subject_id),
        account_id: Text::new(doc.account_id),
        scopes: scopes.get(doc.scopes),
        not_before: c.not_before,
        expires_at: c.expires_at,
        digest: c.digest,
        extra: (!extra.is_empty()).then(|| Box::new(extra)),
        principal_type: c.principal_type,
        status: c.status,
    }
}

/// The fields of a key document that needed parsing, once every check has passed.
struct Checked {
    digest: Digest,
    principal_type: PrincipalType,
    status: Status,
    not_before: Option<SystemTime>,
    expires_at: Option<SystemTime>,
    delegation: Delegation,
}

impl Checked {
    fn of(doc: &KeyDoc) -> Result<Checked, FieldError> {
        check_id("id", &doc.id)?;
        let d = parse_digest(&doc.sha256)?;
        let principal_type = PrincipalType::parse(&doc.kind).ok_or_else(|| {
            (
                "type",
                "unknown type (service_account | enterprise_service_account | personal)".into(),
            )
        })?;
        let status = match doc.status.as_deref() {
            None | Some("active") => Status::Active,
            Some("disabled") => Status::Disabled,
            Some(_) => return Err(("status", "unknown status (active | disabled)".into())),
        };
        check_value("subject_id", &doc.subject_id, true)?;
        check_value("account_id", &doc.account_id, true)?;
        for (field, v) in [
            ("subject_email", &doc.subject_email),
            ("account_short_id", &doc.account_short_id),
            ("enterprise_id", &doc.enterprise_id),
            ("org_id", &doc.org_id),
            ("environment", &doc.environment),
        ] {
            if let Some(v) = v {
                check_value(field, v, true)?;
            }
        }
        for s in &doc.scopes {
            check_id("scopes", s)?;
        }
        let not_before = parse_time("not_before", doc.not_before.as_deref())?;
        let expires_at = parse_time("expires_at", doc.expires_at.as_deref())?;
        if let (Some(nb), Some(exp)) = (not_before, expires_at) {
            if exp <= nb {
                return Err(("expires_at", "must be later than not_before".into()));
            }
        }
        let delegation = parse_delegation(principal_type, doc.delegate_accounts.as_deref())?;
        if let Some(rl) = doc.rate_limit {
            if !(rl.per_second.is_finite() && rl.per_second > 0.0) || rl.burst == 0 {
                return Err(("rate_limit", "per_second and burst must be positive".into()));
            }
        }
        Ok(Checked {
            digest: d,
            principal_type,
            status,
            not_before,
            expires_at,
            delegation,
        })
    }
}

fn parse_digest(s: &str) -> Result<Digest, FieldError> {
    let mut d = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut d).is_err() {
        // The value itself is not echoed: it may be a pasted raw key.
        return Err(("sha256", "must be 64 hex characters".into()));
    }
    Ok(d)
}

/// Ids and scopes: short tokens that are safe in headers, logs and metric labels.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'))
}

/// Is the entry's id the raw key of its own `sha256`, or that digest written out?
fn names_its_own_digest(doc: &KeyDoc) -> bool {
    let mut own = super::Digest::default();
    hex::decode_to_slice(&*doc.sha256, &mut own).is_ok() && names_a_digest(&doc.id, |d| *d == own)
}

fn check_id(field: &'static str, s: &str) -> Result<(), FieldError> {
    if is_token(s) {
        Ok(())
    } else {
        // The value is not echoed: it may be anything, of any length (a pasted raw key).
        Err((field, "must be 1..128 of [A-Za-z0-9_.:/-]".into()))
    }
}

/// Values copied into identity headers: visible ASCII, so nothing can inject a header.
fn check_value(field: &'static str, s: &str, required: bool) -> Result<(), FieldError> {
    if s.is_empty() {
        return if required {
            Err((field, "is required".into()))
        } else {
            Ok(())
        };
    }
    if s.len() > 256 || !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err((field, "must be 1..256 visible ASCII characters".into()));
    }
    Ok(())
}

fn parse_time(field: &'static str, s: Option<&str>) -> Result<Option<SystemTime>, FieldError> {
    s.map(|s| {
        rfc3339(s.trim()).ok_or((
            field,
            "is not an RFC 3339 time like 2027-01-01T00:00:00Z or 2027-01-01T02:00:00+02:00".into(),
        ))
    })
    .transpose()
}

/// RFC 3339 in UTC (`Z`) or with a numeric offset (`+02:00`, as many generators write
/// local time); `humantime` reads the first only. The instant must lie in 1970..=9999 UTC,
/// as `Z` times do: every time read here is written back out (`to_doc`, `/auth`, the
/// admin API), and `humantime` cannot write others (an offset can move a time out).
fn rfc3339(s: &str) -> Option<SystemTime> {
    // 9999-12-31T23:59:59.999999999Z: "the end of time" as generators write it
    // (`...59.999Z`) must stay readable.
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::new(253_402_300_799, 999_999_999);
    rfc3339_any(s).filter(|t| *t >= SystemTime::UNIX_EPOCH && *t <= last)
}

/// The zone must be written: `humantime` reads a time without one as UTC, and an
/// operator east of it who wrote local time would get a key that outlives its expiry by
/// hours (one west, a `not_before` that opens early).
fn rfc3339_any(s: &str) -> Option<SystemTime> {
    // RFC 3339 5.6 allows `t` and `z` in lower case; `humantime` reads only `T` and `Z`.
    if s.contains(['t', 'z']) {
        return rfc3339_any(&s.replace('t', "T").replace('z', "Z"));
    }
    if s.ends_with('Z') {
        return humantime::parse_rfc3339_weak(s).ok();
    }
    let (local, offset) = s
        .len()
        .checked_sub(6)
        .and_then(|i| Some((s.get(..i)?, s.get(i..)?)))?;
    let o = offset.as_bytes();
    let digits = |a: u8, b: u8| {
        (a.is_ascii_digit() && b.is_ascii_digit())
            .then(|| u64::from(a - b'0') * 10 + u64::from(b - b'0'))
    };
    let parsed = match (o[0], digits(o[1], o[2]), o[3], digits(o[4], o[5])) {
        (sign @ (b'+' | b'-'), Some(h), b':', Some(m))
            if h < 24 && m < 60 && local.contains(['T', 't', ' ']) =>
        {
            Some((sign, std::time::Duration::from_secs(h * 3600 + m * 60)))
        }
        _ => None,
    };
    match parsed {
        // Local time at `+hh:mm` is that much ahead of UTC.
        Some((sign, by)) => {
            let at = humantime::parse_rfc3339_weak(&format!("{local}Z")).ok()?;
            if sign == b'+' {
                at.checked_sub(by)
            } else {
                at.checked_add(by)
            }
        }
        None => None,
    }
}

fn parse_delegation(
    principal_type: PrincipalType,
    accounts: Option<&[String]>,
) -> Result<Delegation, FieldError> {
    let Some(accounts) = accounts else {
        return Ok(Delegation::None);
    };
    if principal_type != PrincipalType::EnterpriseServiceAccount {
        return Err((
            "delegate_accounts",
            "only enterprise_service_account keys may delegate".into(),
        ));
    }
    if accounts.iter().any(|a| a == "*") {
        return Ok(Delegation::Any);
    }
    for a in accounts {
        check_id("delegate_accounts", a)?;
    }
    Ok(Delegation::Only(accounts.iter().cloned().collect()))
}

#[cfg(test)]
mod tests {
    use crate::keys::fixtures::{entry, refuse, SHA};
    use crate::keys::{Delegation, Snapshot, Source};

    #[test]
    fn times_read_utc_and_numeric_offsets() {
        let rfc3339 = super::rfc3339;
        let utc = rfc3339("2026-12-05T21:00:00Z").unwrap();
        assert_eq!(rfc3339("2026-12-05T23:00:00+02:00"), Some(utc));
        assert_eq!(rfc3339("2026-12-05T16:30:00-04:30"), Some(utc));
        assert_eq!(rfc3339("2026-12-05T21:00:00+00:00"), Some(utc));
        assert_eq!(rfc3339("2026-12-05T21:00:00.000Z"), Some(utc));
        assert_eq!(rfc3339("2026-12-05t21:00:00z"), Some(utc));
        assert!(
            rfc3339("9999-12-31T23:59:59.999Z").is_some(),
            "the end of time"
        );
        assert!(rfc3339("9999-12-31T23:59:59.999999999Z").is_some());
        for bad in [
            "2026-12-05T21:00:00+25:00",
            "2026-12-05T21:00:00+2:000",
            "2026-12-05",
            "2026-12-05T21:00:00+aa:00",
            "nonsense",
            // Out of the range a time can be written back in.
            "9999-12-31T23:00:00-02:00",
            "1970-01-01T00:30:00+01:00",
            // No zone: not taken as UTC (lower-case `t` and `z` are RFC 3339's own).
            "2026-12-05T21:00:00",
            "2026-12-05 21:00:00",
            "2026-12-05T21:00:00.000",
            "2026-12-05T21:00:00+0200",
            "2026-12-05T21:00:00+02",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
        // Refused whole, naming the entry and the field, and never loaded to be printed.
        let e = refuse(&entry("    expires_at: 9999-12-31T23:00:00-02:00\n"));
        assert!(e.starts_with("keys[0] id=key_a: expires_at"), "{e}");
        let e = refuse(&entry("    not_before: 1970-01-01T00:30:00+01:00\n"));
        assert!(e.starts_with("keys[0] id=key_a: not_before"), "{e}");
        let e = refuse(&format!(
            "generated_at: 1970-01-01T00:00:00+01:00\n{}",
            entry("")
        ));
        assert!(e.contains("generated_at"), "{e}");
    }

    #[test]
    fn bad_fields_name_entry_and_field() {
        let bad_digest = entry("").replace(SHA, "abc");
        assert!(refuse(&bad_digest).starts_with("keys[0] id=key_a: sha256"));
        let bad_type = entry("").replace("service_account", "robot");
        assert!(refuse(&bad_type).starts_with("keys[0] id=key_a: type"));
        assert!(refuse(&entry("    status: paused\n")).starts_with("keys[0] id=key_a: status"));
        assert!(refuse(&entry("    expires_at: tomorrow\n")).contains("expires_at"));
        let e = refuse(&entry(
            "    not_before: 2027-01-01T00:00:00Z\n    expires_at: 2026-01-01T00:00:00Z\n",
        ));
        assert!(e.starts_with("keys[0] id=key_a: expires_at"), "{e}");
        let e = refuse(&entry("    delegate_accounts: [\"*\"]\n"));
        assert!(e.starts_with("keys[0] id=key_a: delegate_accounts"), "{e}");
        assert!(refuse(&entry("    subject_email: \"a\\nb\"\n")).contains("subject_email"));
        assert!(
            refuse(&entry("    rate_limit: { per_second: 0, burst: 1 }\n")).contains("rate_limit")
        );
        assert!(refuse(&entry("    colour: red\n")).contains("colour"));
        let no_subject = entry("").replace("    subject_id: s1\n", "");
        assert!(refuse(&no_subject).contains("subject_id"));
    }

    /// YAML's null is no value, as JSON's `null` is: serde_yaml read `subject_id: null`
    /// (or `~`, `Null`, `NULL`) as the text, a subject named `null` forwarded to the app.
    /// A required field or a list item written so is refused, naming the entry and the
    /// field; an optional field so written is absent; a quoted `"null"` is a string.
    #[test]
    fn null_spellings_of_required_values_are_refused_as_in_json() {
        let enterprise = |extra: &str| {
            entry(extra).replace("type: service_account", "type: enterprise_service_account")
        };
        for null in ["null", "~", "Null", "NULL", ""] {
            let sha = format!("sha256: {SHA}");
            for (written, field, id) in [
                ("subject_id: s1", "subject_id", "key_a"),
                ("account_id: a1", "account_id", "key_a"),
                ("- id: key_a", "id", "(invalid)"),
                (sha.as_str(), "sha256", "key_a"),
                ("type: service_account", "type", "key_a"),
                ("scopes: [read]", "scopes", "key_a"),
            ] {
                let null_written = match field {
                    "id" => format!("- id: {null}"),
                    // `[read, ]` is `[read]`: an empty item is written `[read, '']`.
                    "scopes" if null.is_empty() => "scopes: [read, '']".into(),
                    "scopes" => format!("scopes: [read, {null}]"),
                    _ => format!("{field}: {null}"),
                };
                let text = entry("").replace(written, &null_written);
                assert_ne!(text, entry(""), "{written}");
                let e = refuse(&text);
                let want = format!("keys[0] id={id}: {field}: ");
                assert!(e.starts_with(&want), "{field}: {null:?}: {e}");
            }
            let item = if null.is_empty() { "''" } else { null };
            let e = refuse(&enterprise(&format!(
                "    delegate_accounts: [c1, {item}]\n"
            )));
            assert!(
                e.starts_with("keys[0] id=key_a: delegate_accounts: "),
                "{null:?}: {e}"
            );
        }
        // The same document as JSON: the same refusal.
        let json = format!(
            r#"{{"keys": [{{"id": "key_a", "sha256": "{SHA}", "type": "service_account", "subject_id": null, "account_id": "a1"}}]}}"#
        );
        assert!(refuse(&json).starts_with("keys[0] id=key_a: subject_id: is required"));
        // Optional fields written as null are absent.
        let s = Snapshot::parse(
            &entry("    subject_email: null\n    org_id: ~\n    delegate_accounts: NULL\n"),
            Source::File,
        )
        .unwrap();
        let k = s.by_id("key_a").unwrap();
        assert!(k.subject_email().is_none());
        assert!(k.org_id().is_none());
        assert_eq!(*k.delegation(), Delegation::None);
        // A quoted `null` is a string.
        let quoted = entry("").replace("subject_id: s1", "subject_id: \"null\"");
        let s = Snapshot::parse(&quoted, Source::File).unwrap();
        assert_eq!(s.by_id("key_a").unwrap().subject_id.as_str(), "null");
    }

    #[test]
    fn digest_errors_do_not_echo_the_value() {
        let raw = "sta_this_is_a_pasted_raw_key_not_a_digest";
        let e = refuse(&entry("").replace(SHA, raw));
        assert!(!e.contains(raw), "{e}");
    }

    #[test]
    fn delegation_forms() {
        let ent = |d: &str| {
            entry(&format!("    delegate_accounts: {d}\n"))
                .replace("type: service_account", "type: enterprise_service_account")
        };
        let s = Snapshot::parse(&ent("[\"*\"]"), Source::File).unwrap();
        assert_eq!(*s.by_id("key_a").unwrap().delegation(), Delegation::Any);
        let s = Snapshot::parse(&ent("[c1, c2]"), Source::File).unwrap();
        assert!(
            matches!(s.by_id("key_a").unwrap().delegation(), Delegation::Only(set) if set.len() == 2)
        );
    }
}
