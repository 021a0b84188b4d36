//! Downstream TLS (rustls): PEM certificate and key, ALPN `h2`/`http/1.1`, TLS 1.2 and 1.3,
//! optional client certificates (mTLS). The server config sits behind an `ArcSwap`, so a
//! rotated certificate is used by the next handshake while existing connections keep theirs.
//!
//! Rotation: [`watch`] re-reads the files every `tls.poll_interval` (through the one file
//! watcher, `file_watch`) and compares a hash of their content (not mtimes: Kubernetes
//! swaps a mounted Secret through a `..data` symlink). The files are read once per check,
//! and the config is built from exactly the bytes that were hashed. A pair that does not load (say, a new certificate beside the old key while
//! a rotation is half-written) is refused and the current certificate stays in use; the
//! next change is tried again, and so is a certificate already expired or not yet valid.
//!
//! Expiry: the served (leaf) certificate's `notAfter` is exported as
//! `keyward_tls_cert_expiry_timestamp_seconds`, so a rotation that silently stopped is seen
//! before clients see it; `keyward check` refuses a certificate outside its validity, and
//! `run` warns about one at start (it still serves: refusing to start helps nobody).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;

use crate::config::TlsConfig;

/// The `ClientCertVerifier` methods a wrapper around `self.inner` passes on as they are:
/// keyward's client verifiers add checks to `verify_client_cert` alone.
macro_rules! pass_on_the_rest {
    () => {
        fn offer_client_auth(&self) -> bool {
            self.inner.offer_client_auth()
        }

        fn client_auth_mandatory(&self) -> bool {
            self.inner.client_auth_mandatory()
        }

        fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
            self.inner.root_hint_subjects()
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }

        fn requires_raw_public_keys(&self) -> bool {
            self.inner.requires_raw_public_keys()
        }
    };
}

mod chain;
mod revoked;
use crate::file_watch::{Taken, Watch, Watched};
pub use chain::{DEFAULT_VERIFY_DEPTH, VERIFY_DEPTH_RANGE};

/// Handshake deadline used by [`TlsAcceptor::new`] when none is given.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{field}: {path}: {reason}")]
    File {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("tls: {0}")]
    Config(String),
    /// With `client_crl`, a `client_ca` certificate (not self-issued) whose issuer has no
    /// list there: as an anchor, its revocation would never be checked (see
    /// [`every_issuer_listed`]).
    #[error("tls.client_crl: {path}: client_ca certificate {subject} is issued by {issuer}, which has no list in tls.client_crl: its revocation cannot be checked")]
    IssuerUnlisted {
        path: String,
        subject: String,
        issuer: String,
    },
}

/// When the served certificate is valid: read from its DER with `x509-cert` for the
/// expiry gauge and the checks at load; rustls decides everything else about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// The leaf's validity, or `None` when `x509-cert` cannot read a certificate rustls
    /// took (no gauge then; nothing is refused for it).
    fn of(leaf: &CertificateDer<'_>) -> Option<Self> {
        use x509_cert::der::Decode as _;
        let cert = x509_cert::Certificate::from_der(leaf.as_ref()).ok()?;
        let v = cert.tbs_certificate().validity();
        let at = |t: x509_cert::time::Time| SystemTime::UNIX_EPOCH + t.to_unix_duration();
        Some(Self {
            not_before: at(v.not_before),
            not_after: at(v.not_after),
        })
    }

    /// Why clients would refuse the certificate at `now`, if they would.
    pub fn problem(&self, now: SystemTime) -> Option<String> {
        let rfc3339 = |t| humantime::format_rfc3339_seconds(t);
        if now >= self.not_after {
            Some(format!("expired at {}", rfc3339(self.not_after)))
        } else if now < self.not_before {
            Some(format!("not valid before {}", rfc3339(self.not_before)))
        } else {
            None
        }
    }

    /// `notAfter` as Unix seconds, for the gauge.
    fn expiry_seconds(&self) -> f64 {
        self.not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// The validity could not be read (a time before 1970, a serial past 20 bytes: rustls may
/// still take the certificate): said at `warn`, and the gauge reads 0, which the expiry
/// alert fires on, so the certificate is not silently unwatched.
fn unreadable_validity(cert: &Path) {
    tracing::warn!(cert = %cert.display(), "TLS certificate validity could not be read: keyward_tls_cert_expiry_timestamp_seconds is 0 and expiry is not checked");
}

/// A server config, its certificate's validity and its revocation lists' `nextUpdate`.
struct Built {
    config: ServerConfig,
    validity: Option<Validity>,
    crl: CrlDue,
    /// Older lists of an issuer that were not applied.
    set_aside: SetAside,
    /// Every certificate of `client_ca` is revoked: every client is refused.
    none_trusted: bool,
}

/// When the lists of `tls.client_crl` are due to be replaced: the earliest `nextUpdate`
/// among them. A list past it is still applied (the last word its issuer gave), but its
/// issuer has since published another, which may revoke more: said at `warn`, exported as
/// `keyward_tls_crl_next_update_timestamp_seconds`, and refused by `keyward check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrlDue {
    /// No `tls.client_crl`.
    NoLists,
    At(SystemTime),
    /// A list `x509-cert` cannot read though rustls took it (rustls refuses one without a
    /// `nextUpdate` before this is asked).
    Unknown,
}

impl CrlDue {
    fn of(crls: &[rustls::pki_types::CertificateRevocationListDer<'_>]) -> Self {
        use x509_cert::der::Decode as _;
        let due = crls.iter().map(|crl| {
            let list: x509_cert::crl::CertificateList =
                x509_cert::crl::CertificateList::from_der(crl.as_ref()).ok()?;
            let next = list.tbs_cert_list.next_update?;
            Some(SystemTime::UNIX_EPOCH + next.to_unix_duration())
        });
        match due
            .collect::<Option<Vec<_>>>()
            .and_then(|d| d.into_iter().min())
        {
            Some(at) => CrlDue::At(at),
            None => CrlDue::Unknown,
        }
    }

    /// Why the lists are not current at `now`, if they are not.
    fn problem(&self, now: SystemTime) -> Option<String> {
        match *self {
            CrlDue::NoLists => None,
            CrlDue::At(at) if now < at => None,
            CrlDue::At(at) => Some(format!(
                "past its nextUpdate ({}): its issuer has published a newer list",
                humantime::format_rfc3339_seconds(at)
            )),
            CrlDue::Unknown => Some("a list without a readable nextUpdate".to_string()),
        }
    }

    /// For the gauge: `nextUpdate` as Unix seconds, 0 when unknown.
    fn seconds(&self) -> f64 {
        match *self {
            CrlDue::At(at) => at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            CrlDue::NoLists | CrlDue::Unknown => 0.0,
        }
    }

    /// Say a problem at `warn`: the lists are applied all the same.
    fn warn(&self, tls: &TlsConfig) {
        if let (Some(problem), Some(path)) = (self.problem(SystemTime::now()), &tls.client_crl) {
            tracing::warn!(crl = %path.display(), "TLS client_crl {problem}: still applied; publish the current list");
        }
    }
}

fn file_err(field: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        field,
        path: crate::config::redact::shown_path(path),
        reason: reason.to_string(),
    }
}

/// What is wrong with a PEM file, in words. Never the error's own text: rustls-pki-types
/// quotes the offending line as bytes, and in a key file whose line breaks were lost (a
/// key passed through an environment variable or a template) that line is the key.
fn pem_problem(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a PEM section has no END line (were its line breaks lost?)",
        E::IllegalSectionStart { .. } => "a malformed PEM BEGIN line (were its line breaks lost?)",
        E::Base64Decode(_) => "a PEM section is not valid base64",
        E::NoItemsFound => "no PEM section of the expected kind",
        E::SectionTooLarge => "a PEM section is too large",
        E::Io(_) => "the file could not be read",
        _ => "not readable as PEM",
    }
}

/// The trust anchors of `client_ca`, and whether any of its certificates may still be one.
struct Anchors {
    roots: RootCertStore,
    /// Every certificate of `client_ca` is revoked by an applied list: every client is
    /// refused ([`revoked::EveryList`]), the roots kept only so that a verifier can be
    /// built. Refusing the file instead kept the verifier in force on a reload, and with
    /// it everything the new lists revoke (review 43).
    none_trusted: bool,
}

/// The certificates of `client_ca` as trust anchors, less those an applied list revokes.
/// rustls-webpki never checks an anchor's revocation, and prefers an anchor to an
/// intermediate the client sends: with an issuing CA in `client_ca` beside its root, a
/// client that left that CA out of its chain was judged by the CA as an anchor, and its
/// root's revocation of the CA never looked at (review 41). A revoked CA is no anchor:
/// its clients are then judged through their root, which revokes it. With lists, a
/// certificate whose issuer and serial `x509-cert` cannot read (not RFC 5280: valid from
/// before 1970) is no anchor either: nothing here can say its issuer did not revoke it, and
/// kept as one, a revoked such CA let its clients in (review 45). Said at `warn`.
fn trust_anchors(
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
    revoked: Option<&revoked::RevokedSerials>,
) -> Result<Anchors, TlsError> {
    let listed: Vec<Option<bool>> = certs
        .iter()
        .map(|c| revoked.map_or(Some(false), |r| r.listed(c)))
        .collect();
    let unread = listed.iter().filter(|l| l.is_none()).count();
    if unread > 0 {
        tracing::warn!(client_ca = %path.display(), certificates = unread, "TLS client_ca holds certificates whose revocation cannot be read (not RFC 5280, e.g. valid from before 1970): with tls.client_crl they are not trusted as anchors");
    }
    let left_out = listed.iter().filter(|l| **l != Some(false)).count();
    let none_trusted = left_out == certs.len();
    if none_trusted {
        tracing::warn!(client_ca = %path.display(), "TLS client_ca: every certificate it holds is revoked by tls.client_crl or cannot be read for it: every client certificate is refused");
    } else if left_out > unread {
        tracing::warn!(client_ca = %path.display(), revoked = left_out - unread, "TLS client_ca holds certificates tls.client_crl revokes: not trusted as anchors");
    }
    let mut roots = RootCertStore::empty();
    for (cert, listed) in certs.into_iter().zip(listed) {
        if listed != Some(false) && !none_trusted {
            continue;
        }
        roots
            .add(cert)
            .map_err(|e| file_err("client_ca", path, e))?;
    }
    Ok(Anchors {
        roots,
        none_trusted,
    })
}

/// The certificates of a `tls.client_ca` file: at least one, each well-formed PEM.
fn client_ca_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err("client_ca", path, pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(file_err("client_ca", path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// With lists, every `client_ca` certificate that is not self-issued (an issuing CA) needs
/// a list of its issuer in `client_crl`. It is an anchor, whose revocation rustls never
/// checks: only a list of its issuer here can take it out (see [`trust_anchors`]). Without
/// one, a restart whose file had lost the root's list trusted the CA the root revoked,
/// where a reload kept the list in force. Refused at start and by `keyward check`. A
/// reload keeps an issuer's list in force when its file lost it (see [`TlsWatch::changed`]);
/// one bringing a certificate whose issuer has a list neither in the file nor in force is
/// refused like a `client_ca` that does not load: the verifier in force stays (new lists
/// still go in with the `client_ca` in force, see [`TlsWatch::verifier_alone`]).
/// Self-signed roots need none.
fn every_issuer_listed(
    crl_path: &Path,
    certs: &[CertificateDer<'_>],
    revoked: &revoked::RevokedSerials,
) -> Result<(), TlsError> {
    match certs.iter().find_map(|c| revoked.unlisted_issuer(c)) {
        Some((subject, issuer)) => Err(TlsError::IssuerUnlisted {
            path: crate::config::redact::shown_path(crl_path),
            subject,
            issuer,
        }),
        None => Ok(()),
    }
}

/// The CRLs of a `tls.client_crl` file: at least one, each well-formed, the newest of each
/// issuer only (see [`newest_of_each_issuer`]).
fn revocation_lists(
    path: &Path,
    pem: &[u8],
) -> Result<
    (
        Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
        SetAside,
    ),
    TlsError,
> {
    let crls: Vec<_> = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err("client_crl", path, pem_problem(&e)))?;
    if crls.is_empty() {
        return Err(file_err("client_crl", path, "no PEM revocation list found"));
    }
    // Which list is newest, and whether a reload goes back in time, is read from each
    // list's issuer, scope, number and dates: a list that cannot be read so (`x509-cert`
    // refuses what RFC 5280 does, a revoked serial past 20 bytes among them) escaped both,
    // while rustls, more lenient, applied it (review 39). Refused, as `keyward check` did.
    if crls.iter().any(|crl| CrlStanding::of(crl).is_none()) {
        return Err(file_err(
            "client_crl",
            path,
            "holds a revocation list whose issuer, number or dates cannot be read (RFC 5280; a revoked serial longer than 20 bytes?)",
        ));
    }
    Ok(newest_of_each_issuer(crls))
}

/// What tells two lists of one issuer apart: which certificates they speak for (issuer and
/// issuing distribution point, as rustls-webpki matches them) and which is newer.
struct CrlStanding {
    issuer: x509_cert::name::Name,
    /// The issuing distribution point extension, as encoded: lists of one issuer with
    /// different scopes (a partitioned CRL) are not older and newer versions of each other.
    scope: Option<Vec<u8>>,
    /// The CRL Number, big-endian without leading zeros.
    number: Option<Vec<u8>>,
    this_update: SystemTime,
}

impl CrlStanding {
    fn of(crl: &rustls::pki_types::CertificateRevocationListDer<'_>) -> Option<Self> {
        use x509_cert::der::oid::ObjectIdentifier;
        use x509_cert::der::Decode as _;
        use x509_cert::ext::pkix::CrlNumber;
        // RFC 5280 5.2.3 and 5.2.5. Not `AssociatedOid`: x509-cert 0.3.0 gives
        // `IssuingDistributionPoint` the OID of Subject Information Access.
        const CRL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.20");
        const ISSUING_DISTRIBUTION_POINT: ObjectIdentifier =
            ObjectIdentifier::new_unwrap("2.5.29.28");
        let list: x509_cert::crl::CertificateList =
            x509_cert::crl::CertificateList::from_der(crl.as_ref()).ok()?;
        let tbs = list.tbs_cert_list;
        let ext = |oid| {
            tbs.crl_extensions
                .iter()
                .flatten()
                .find(|e| e.extn_id == oid)
                .map(|e| e.extn_value.as_bytes().to_vec())
        };
        let number = match ext(CRL_NUMBER) {
            Some(der) => Some(CrlNumber::from_der(&der).ok()?.0.as_bytes().to_vec()),
            None => None,
        };
        Some(Self {
            scope: ext(ISSUING_DISTRIBUTION_POINT),
            number,
            this_update: SystemTime::UNIX_EPOCH + tbs.this_update.to_unix_duration(),
            issuer: tbs.issuer,
        })
    }

    fn same_lists_as(&self, other: &Self) -> bool {
        self.issuer == other.issuer && self.scope == other.scope
    }

    /// Newer than `other`: the higher CRL Number when both have one (RFC 5280 5.2.3: it
    /// only grows), the later `thisUpdate` otherwise (and between equal numbers).
    fn newer_than(&self, other: &Self) -> bool {
        match (&self.number, &other.number) {
            (Some(a), Some(b)) if a != b => (a.len(), a) > (b.len(), b),
            _ => self.this_update > other.this_update,
        }
    }
}

/// The issuers (RFC 4514) whose list in `new` is older than the one of the same issuer (and
/// scope) in force, or missing from it, each file read as applied (the newest list of each issuer): a list
/// going back in time lifts revocations without a word (a GitOps revert, a stale copy of a
/// Secret, a sync job gone backwards). A newer list that lifts one is an issuer's decision;
/// an older one is not.
fn older_than_in_force(new: &[u8], in_force: &[u8]) -> Vec<String> {
    let applied = |pem: &[u8]| -> Vec<CrlStanding> {
        let crls: Vec<_> = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem)
            .filter_map(Result::ok)
            .collect();
        newest_of_each_issuer(crls)
            .0
            .iter()
            .filter_map(CrlStanding::of)
            .collect()
    };
    let in_force = applied(in_force);
    let new = applied(new);
    let older = new.iter().filter(|this| {
        // Any list of the issuer, whatever its scope: an older scoped list may speak for
        // the certificates a newer full one revoked.
        in_force
            .iter()
            .any(|old| old.issuer == this.issuer && old.newer_than(this))
    });
    // A list in force that the file no longer has lifts its revocations as surely: a CA
    // of `client_ca` its issuer's list revoked was an anchor again (review 45), and a
    // write cut between two lists, or a bundle job that lost a file, reads as such a file.
    let gone = in_force
        .iter()
        .filter(|old| !new.iter().any(|this| this.same_lists_as(old)));
    let mut issuers: Vec<String> = Vec::new();
    for issuer in older.chain(gone).map(|this| this.issuer.to_string()) {
        if !issuers.contains(&issuer) {
            issuers.push(issuer);
        }
    }
    issuers
}

/// What applies when a reload holds a list older than one in force: each issuer's newest
/// list of the two files (the older ones stay out, every other issuer's new list goes in;
/// the newest of each only, so refusals in a row do not pile lists up). `None` when that is
/// just what the file applies: an unchanged scoped list beside a newer full one is older
/// than the full one in force, and the reload was said refused though nothing was kept
/// out (review 41).
fn kept_in_force(new: &[u8], in_force: &[u8]) -> Option<Vec<u8>> {
    let merged = newest_lists_of(&[new, in_force]);
    (merged != newest_lists_of(&[new])).then_some(merged)
}

/// The newest list of each issuer (and scope) of these PEM files, as one PEM file.
fn newest_lists_of(files: &[&[u8]]) -> Vec<u8> {
    use base64::Engine as _;
    let crls: Vec<_> = files
        .iter()
        .flat_map(|pem| rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem))
        .filter_map(Result::ok)
        .collect();
    let mut out = Vec::new();
    for crl in newest_of_each_issuer(crls).0 {
        let b64 = base64::engine::general_purpose::STANDARD.encode(crl.as_ref());
        out.extend_from_slice(b"-----BEGIN X509 CRL-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END X509 CRL-----\n");
    }
    out
}

/// Lists of `tls.client_crl` set aside beside a newer one of the same issuer: the issuer of
/// each (RFC 4514).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SetAside(Vec<String>);

impl SetAside {
    /// What to say about them, if any were set aside.
    fn problem(&self) -> Option<String> {
        let mut issuers = self.0.clone();
        issuers.sort();
        issuers.dedup();
        match self.0.len() {
            0 => None,
            n => Some(format!(
                "holds {n} older list{} beside a newer one of the same issuer ({}): set aside, the newest of each issuer is applied",
                if n == 1 { "" } else { "s" },
                issuers.join("; ")
            )),
        }
    }

    /// Say it at `warn` (at each load: a bundle that keeps old lists is worth fixing).
    fn warn(&self, tls: &TlsConfig) {
        if let (Some(problem), Some(path)) = (self.problem(), &tls.client_crl) {
            tracing::warn!(crl = %path.display(), "TLS client_crl {problem}");
        }
    }
}

/// The newest list of each issuer (and issuing distribution point), in the order of the
/// file. rustls-webpki consults the first list it finds for a certificate's issuer: an older
/// list ahead of a newer one in the file (`cat old.crl new.crl`) would hide every
/// certificate revoked since. (A list `x509-cert` cannot read is kept as it is here; the
/// file is refused at load, see [`revocation_lists`].)
fn newest_of_each_issuer(
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
) -> (
    Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    SetAside,
) {
    let standing: Vec<Option<CrlStanding>> = crls.iter().map(CrlStanding::of).collect();
    // The newest of each issuer so far, in file order: one is kept of each however the
    // lists compare (one of equals: the first).
    let mut newest: Vec<(usize, &CrlStanding)> = Vec::new();
    for (i, this) in standing.iter().enumerate() {
        let Some(this) = this else { continue };
        match newest.iter_mut().find(|(_, n)| n.same_lists_as(this)) {
            Some(n) if this.newer_than(n.1) => *n = (i, this),
            Some(_) => {}
            None => newest.push((i, this)),
        }
    }
    let mut set_aside = SetAside::default();
    let mut kept = Vec::with_capacity(newest.len());
    for (i, crl) in crls.into_iter().enumerate() {
        match &standing[i] {
            Some(this) if !newest.iter().any(|(n, _)| *n == i) => {
                set_aside.0.push(this.issuer.to_string());
            }
            _ => kept.push((i, crl)),
        }
    }
    // rustls-webpki consults the first list it finds authoritative for a certificate, and
    // lists of one issuer in different scopes overlap (a scoped list speaks for every
    // certificate without a distribution point, a full one for all): each issuer's lists go
    // newest first, in the places its lists held, so the one consulted is the newest that
    // speaks for it (an older scoped list ahead of a newer full one hid a revocation).
    let mut issuers: Vec<(&x509_cert::name::Name, Vec<usize>)> = Vec::new();
    for (place, (i, _)) in kept.iter().enumerate() {
        let Some(this) = &standing[*i] else { continue };
        match issuers
            .iter_mut()
            .find(|(issuer, _)| **issuer == this.issuer)
        {
            Some((_, places)) => places.push(place),
            None => issuers.push((&this.issuer, vec![place])),
        }
    }
    let mut slots: Vec<Option<rustls::pki_types::CertificateRevocationListDer<'static>>> =
        Vec::with_capacity(kept.len());
    let mut order: Vec<usize> = Vec::with_capacity(kept.len());
    for (i, crl) in kept {
        order.push(i);
        slots.push(Some(crl));
    }
    let mut arranged: Vec<usize> = (0..slots.len()).collect();
    for (_, places) in &issuers {
        let mut newest_first = places.clone();
        newest_first.sort_by_key(|place| {
            let this = standing[order[*place]].as_ref();
            std::cmp::Reverse(this.map(|t| {
                (
                    t.number.as_ref().map(|n| (n.len(), n.clone())),
                    t.this_update,
                )
            }))
        });
        for (slot, from) in places.iter().zip(newest_first) {
            arranged[*slot] = from;
        }
    }
    let kept = arranged
        .into_iter()
        .filter_map(|from| slots[from].take())
        .collect();
    (kept, set_aside)
}

/// Largest certificate, key or CA bundle file read (a full public CA bundle is about 250 KB).
const TLS_FILE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// The raw content of the files a TLS config is built from, read once.
#[derive(Clone)]
struct TlsFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    client_crl: Option<Vec<u8>>,
}

fn read_tls_file(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::regular_file::read(path, TLS_FILE_MAX_BYTES).map_err(|e| file_err(field, path, e))
}

/// `tls.client_ca` and `tls.client_crl`, as read.
type Lists = (Option<Vec<u8>>, Option<Vec<u8>>);

impl TlsFiles {
    fn read(tls: &TlsConfig) -> Result<Self, TlsError> {
        let cert = read_tls_file("cert", &tls.cert)?;
        let key = read_tls_file("key", &tls.key)?;
        let (client_ca, client_crl) = Self::read_lists(tls)?;
        Ok(Self {
            cert,
            key,
            client_ca,
            client_crl,
        })
    }

    fn read_lists(tls: &TlsConfig) -> Result<Lists, TlsError> {
        let client_ca = match &tls.client_ca {
            Some(ca) => Some(read_tls_file("client_ca", ca)?),
            None => None,
        };
        let client_crl = match &tls.client_crl {
            Some(crl) => Some(read_tls_file("client_crl", crl)?),
            None => None,
        };
        Ok((client_ca, client_crl))
    }

    /// SHA-256 over all files, length-prefixed so that content moving between files counts
    /// as a change.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let parts = [
            Some(&self.cert),
            Some(&self.key),
            self.client_ca.as_ref(),
            self.client_crl.as_ref(),
        ];
        for part in parts {
            match part {
                Some(bytes) => {
                    h.update((bytes.len() as u64 + 1).to_be_bytes());
                    h.update(bytes);
                }
                None => h.update(0u64.to_be_bytes()),
            }
        }
        h.finalize().into()
    }

    fn build(&self, tls: &TlsConfig) -> Result<Built, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| file_err("cert", &tls.cert, pem_problem(&e)))?;
        if certs.is_empty() {
            return Err(file_err("cert", &tls.cert, "no PEM certificate found"));
        }
        let validity = Validity::of(&certs[0]);
        let mut crl = CrlDue::NoLists;
        let mut set_aside = SetAside::default();
        let mut none_trusted = false;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            file_err(
                "key",
                &tls.key,
                format!("no usable PEM private key: {}", pem_problem(&e)),
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match (&tls.client_ca, &self.client_ca) {
            (Some(path), Some(pem)) => {
                let certs = client_ca_certs(path, pem)?;
                let lists = match (&tls.client_crl, &self.client_crl) {
                    (Some(crl_path), Some(crl_pem)) => {
                        let (crls, older) = revocation_lists(crl_path, crl_pem)?;
                        let serials = revoked::RevokedSerials::of(&crls)
                            .map_err(|e| file_err("client_crl", crl_path, e))?;
                        every_issuer_listed(crl_path, &certs, &serials)?;
                        Some((crls, older, serials))
                    }
                    _ => None,
                };
                let anchors = trust_anchors(path, certs, lists.as_ref().map(|l| &l.2))?;
                none_trusted = anchors.none_trusted;
                let roots = anchors.roots;
                // Client certificates are mandatory: `build()` without
                // `allow_unauthenticated()` refuses a client that presents none.
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let mut revoked_serials = None;
                if let Some((crls, older, serials)) = lists {
                    crl = CrlDue::of(&crls);
                    set_aside = older;
                    // Every certificate of the chain is checked, intermediates the client
                    // sends included: an issuing CA its root revoked mints no more clients.
                    revoked_serials = Some(serials);
                    verifier = verifier.with_crls(crls);
                }
                // The lists are parsed here: a broken one is named at load.
                let verifier = verifier.build().map_err(|e| match (e, &tls.client_crl) {
                    (e @ rustls::server::VerifierBuilderError::InvalidCrl(_), Some(crl)) => {
                        file_err("client_crl", crl, e)
                    }
                    (e, _) => file_err("client_ca", path, e),
                })?;
                let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
                    match revoked_serials {
                        // And in every list of the issuer, not only the one rustls consults.
                        Some(revoked) => Arc::new(revoked::EveryList {
                            inner: verifier,
                            revoked,
                            refuse_all: none_trusted,
                        }),
                        None => verifier,
                    };
                // A chain whose shape would make path building costly is refused first.
                builder.with_client_cert_verifier(Arc::new(chain::Bounded {
                    inner: verifier,
                    depth: usize::from(tls.client_verify_depth),
                }))
            }
            _ => builder.with_no_client_auth(),
        };
        // Fails when the key cannot be used or does not belong to the certificate.
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            file_err(
                "key",
                &tls.key,
                format!("does not go with tls.cert {}: {e}", tls.cert.display()),
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if tls.client_ca.is_some() {
            // A resumed session (TLS 1.2 session id, TLS 1.3 ticket) skips client certificate
            // verification: it let a client in on a certificate past its `notAfter`. With
            // client certificates, every handshake is a full one.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(Built {
            config,
            validity,
            crl,
            set_aside,
            none_trusted,
        })
    }
}

/// Build a rustls server config from the files named in `tls`. Errors name the field
/// (`tls.cert`, `tls.key`, `tls.client_ca`, ...) and the file.
pub fn load_server_config(tls: &TlsConfig) -> Result<ServerConfig, TlsError> {
    Ok(TlsFiles::read(tls)?.build(tls)?.config)
}

/// What `keyward check` found about files that load: the served certificate's validity, and
/// what is worth saying though it fails nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub validity: Option<Validity>,
    pub warnings: Vec<String>,
}

/// `keyward check`: the files load, the certificate is valid now, and the revocation lists
/// are current.
pub fn check(tls: &TlsConfig) -> Result<Checked, TlsError> {
    let built = TlsFiles::read(tls)?.build(tls)?;
    let now = SystemTime::now();
    if let Some(problem) = built.validity.and_then(|v| v.problem(now)) {
        return Err(file_err("cert", &tls.cert, problem));
    }
    if let (Some(problem), Some(path)) = (built.crl.problem(now), &tls.client_crl) {
        return Err(file_err("client_crl", path, problem));
    }
    if let (true, Some(path)) = (built.none_trusted, &tls.client_ca) {
        return Err(file_err(
            "client_ca",
            path,
            "every certificate it holds is revoked by tls.client_crl, or cannot be read for its revocation (not RFC 5280): every client would be refused",
        ));
    }
    let warnings = match (built.set_aside.problem(), &tls.client_crl) {
        (Some(problem), Some(path)) => vec![file_err("client_crl", path, problem).to_string()],
        _ => Vec::new(),
    };
    Ok(Checked {
        validity: built.validity,
        warnings,
    })
}

/// Accepts TLS connections with the current server config.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ArcSwap<ServerConfig>>,
    /// Fingerprint of the files the first config was built from, so [`watch`] also sees a
    /// rotation that happened between start-up and its first poll.
    loaded: Option<[u8; 32]>,
    handshake_timeout: Duration,
    /// `keyward_tls_cert_expiry_timestamp_seconds`: the served certificate's `notAfter`.
    /// Owned here, registered by whoever exports metrics ([`Self::expiry_gauge`]).
    expiry: prometheus::Gauge,
    /// `keyward_tls_crl_next_update_timestamp_seconds`, with `tls.client_crl` only.
    crl_due: Option<prometheus::Gauge>,
    /// The files the config in force was built from (the certificate and key may be older
    /// than the client CA and lists: see [`TlsWatch::changed`]).
    in_force: Arc<std::sync::Mutex<Option<Arc<TlsFiles>>>>,
}

impl TlsAcceptor {
    /// An acceptor for a ready server config, with [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config: Arc::new(ArcSwap::from_pointee(config)),
            loaded: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            expiry: prometheus::Gauge::new(
                "keyward_tls_cert_expiry_timestamp_seconds",
                "Unix time at which the served TLS certificate expires (its notAfter).",
            )
            .expect("a valid metric name"),
            crl_due: None,
            in_force: Arc::default(),
        }
    }

    /// The expiry gauge, to register with the metrics registry.
    pub fn expiry_gauge(&self) -> prometheus::Gauge {
        self.expiry.clone()
    }

    /// The gauge of the revocation lists' `nextUpdate`, with `tls.client_crl`: to register.
    pub fn crl_gauge(&self) -> Option<prometheus::Gauge> {
        self.crl_due.clone()
    }

    fn served(&self, validity: Option<Validity>, crl: CrlDue) {
        self.expiry
            .set(validity.as_ref().map_or(0.0, Validity::expiry_seconds));
        if let Some(g) = &self.crl_due {
            g.set(crl.seconds());
        }
    }

    /// Load the files named in `tls`. The TLS handshake must complete within
    /// `handshake_timeout`, or the connection is closed (a client that connects and sends
    /// nothing does not hold a connection slot).
    pub fn load(tls: &TlsConfig, handshake_timeout: Duration) -> Result<Self, TlsError> {
        let files = TlsFiles::read(tls)?;
        let built = files.build(tls)?;
        match built.validity {
            Some(v) => {
                if let Some(problem) = v.problem(SystemTime::now()) {
                    tracing::warn!(cert = %tls.cert.display(), "TLS certificate {problem}: clients will refuse it");
                }
            }
            None => unreadable_validity(&tls.cert),
        }
        built.crl.warn(tls);
        built.set_aside.warn(tls);
        let crl_due = tls.client_crl.as_ref().map(|_| {
            prometheus::Gauge::new(
                "keyward_tls_crl_next_update_timestamp_seconds",
                "Unix time of the earliest nextUpdate of the tls.client_crl lists (0: unreadable).",
            )
            .expect("a valid metric name")
        });
        let acceptor = Self {
            handshake_timeout,
            loaded: Some(files.fingerprint()),
            crl_due,
            ..Self::new(built.config)
        };
        acceptor.served(built.validity, built.crl);
        acceptor.set_in_force(files);
        Ok(acceptor)
    }

    /// Replace the server config; later handshakes use it.
    pub fn replace(&self, config: ServerConfig) {
        self.config.store(Arc::new(config));
    }

    fn in_force(&self) -> Option<Arc<TlsFiles>> {
        self.in_force
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_in_force(&self, files: TlsFiles) {
        *self.in_force.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(files));
    }

    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let handshake = tokio_rustls::TlsAcceptor::from(self.config.load_full()).accept(stream);
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

/// Poll the certificate files; when their content changes and the new set loads, the next
/// handshake uses it. A set that does not load keeps the current certificate, and is
/// reported once (not on every poll) until the files change again.
pub async fn watch(acceptor: TlsAcceptor, tls: TlsConfig) {
    let last = acceptor.loaded;
    let interval = tls.poll_interval;
    let paths = [
        Some(&tls.cert),
        Some(&tls.key),
        tls.client_ca.as_ref(),
        tls.client_crl.as_ref(),
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    Watch::new(
        TlsWatch {
            acceptor,
            tls,
            paths,
            waiting: std::sync::Mutex::new(None),
            said: std::sync::Mutex::new(None),
            said_older: std::sync::Mutex::new(None),
        },
        interval,
        last,
    )
    .run()
    .await
}

/// The TLS files, as the watcher sees them: read whole on every poll, and the config built
/// from exactly the bytes that were hashed.
struct TlsWatch {
    acceptor: TlsAcceptor,
    tls: TlsConfig,
    paths: Vec<PathBuf>,
    /// The `notBefore` of a rotated certificate not valid yet, once said: it is taken at
    /// the first poll from then on (an issuer's clock a little ahead is routine).
    waiting: std::sync::Mutex<Option<SystemTime>>,
    /// The set last handed on with the certificate and key in force while those could not
    /// be read, once said (every poll reads it again).
    said: std::sync::Mutex<Option<[u8; 32]>>,
    /// The lists last refused as older than the ones in force, once said (a certificate
    /// waiting for its `notBefore` has the set looked at on every poll).
    said_older: std::sync::Mutex<Option<[u8; 32]>>,
}

impl TlsWatch {
    /// Run `say` unless it was run last for this digest (of what it is said about).
    fn say_once(
        &self,
        said: &std::sync::Mutex<Option<[u8; 32]>>,
        digest: [u8; 32],
        say: impl FnOnce(),
    ) {
        let mut said = said.lock().unwrap_or_else(|e| e.into_inner());
        if *said != Some(digest) {
            say();
            *said = Some(digest);
        }
    }

    /// Install the whole new set. `None`: its certificate is not valid yet (said once),
    /// to be taken at a later poll.
    fn whole(&self, files: &TlsFiles) -> Option<Result<(), TlsError>> {
        let now = SystemTime::now();
        let built = files.build(&self.tls);
        if let Ok(Built {
            validity: Some(v), ..
        }) = &built
        {
            if now < v.not_before && now < v.not_after {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if *waiting != Some(v.not_before) {
                    let at = humantime::format_rfc3339_seconds(v.not_before);
                    tracing::warn!(cert = %self.tls.cert.display(), "TLS certificate not valid before {at}: keeping the current one until then");
                    *waiting = Some(v.not_before);
                }
                return None;
            }
        }
        let built = built.and_then(|b| {
            // A rotation to a certificate clients would refuse is a broken rotation.
            match b.validity.and_then(|v| v.problem(now)) {
                Some(problem) => Err(file_err("cert", &self.tls.cert, problem)),
                None => Ok(b),
            }
        });
        Some(built.map(|b| {
            let validity = b.validity;
            self.install(b, files.clone());
            if validity.is_none() {
                unreadable_validity(&self.tls.cert);
            }
            let not_after = validity
                .map(|v| humantime::format_rfc3339_seconds(v.not_after).to_string())
                .unwrap_or_default();
            tracing::info!(cert = %self.tls.cert.display(), not_after, "TLS certificate reloaded");
        }))
    }

    /// Install the new client CA and revocation lists with the certificate and key in force.
    /// `false`: they do not load (said), and the ones in force stay.
    fn verifier_alone(&self, in_force: &TlsFiles, files: &TlsFiles) -> bool {
        let mixed = TlsFiles {
            cert: in_force.cert.clone(),
            key: in_force.key.clone(),
            client_ca: files.client_ca.clone(),
            client_crl: files.client_crl.clone(),
        };
        let e = match mixed.build(&self.tls) {
            Ok(built) => {
                self.install(built, mixed);
                tracing::info!(
                    "TLS client CA and revocation lists reloaded, with the certificate in force"
                );
                return true;
            }
            Err(e) => e,
        };
        tracing::warn!(error = %e, "TLS client CA or revocation lists refused; keeping the current ones");
        // A client CA half written does not hold back new lists: they go in with the CA in
        // force.
        if files.client_ca != in_force.client_ca && files.client_crl != in_force.client_crl {
            let lists = TlsFiles {
                client_ca: in_force.client_ca.clone(),
                ..mixed
            };
            if let Ok(built) = lists.build(&self.tls) {
                self.install(built, lists);
                tracing::info!(
                    "TLS revocation lists reloaded, with the certificate and client CA in force"
                );
            }
        }
        false
    }

    fn install(&self, built: Built, files: TlsFiles) {
        let Built {
            config,
            validity,
            crl,
            set_aside,
            ..
        } = built;
        self.acceptor.replace(config);
        self.acceptor.served(validity, crl);
        self.acceptor.set_in_force(files);
        crl.warn(&self.tls);
        set_aside.warn(&self.tls);
    }
}

impl Watched for TlsWatch {
    type Digest = [u8; 32];
    type Content = TlsFiles;
    type Error = TlsError;

    fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// A certificate or key that cannot be read (gone mid-rotation, a directory in its
    /// place) does not hold back new client CA and lists either: when those read and differ
    /// from the ones in force, they are handed on with the certificate and key in force.
    fn read(&self) -> Result<([u8; 32], TlsFiles), TlsError> {
        let error = match TlsFiles::read(&self.tls) {
            Ok(files) => return Ok((files.fingerprint(), files)),
            Err(e) => e,
        };
        let (Some(in_force), Ok((client_ca, client_crl))) =
            (self.acceptor.in_force(), TlsFiles::read_lists(&self.tls))
        else {
            return Err(error);
        };
        if client_ca == in_force.client_ca && client_crl == in_force.client_crl {
            return Err(error);
        }
        let files = TlsFiles {
            cert: in_force.cert.clone(),
            key: in_force.key.clone(),
            client_ca,
            client_crl,
        };
        let digest = files.fingerprint();
        self.say_once(&self.said, digest, || {
            tracing::warn!(error = %error, "TLS certificate or key not readable; keeping the current one, and taking the new client CA and revocation lists with it");
        });
        Ok((digest, files))
    }

    /// The certificate and key, and the client CA and revocation lists, are taken apart
    /// when the whole set is refused: a refused certificate (broken, expired, not valid
    /// yet, a key that does not go with it) keeps the one in force but never holds back a
    /// new list or CA, which apply at once with it (a revoked client was let in for as long
    /// as a rotation stayed half done, or a certificate was staged ahead of its
    /// `notBefore`); and refused lists keep the ones in force but never hold back a new
    /// certificate.
    fn changed(&self, files: TlsFiles) -> Taken<[u8; 32]> {
        let Some(in_force) = self.acceptor.in_force() else {
            return match self.whole(&files) {
                Some(Ok(())) => Taken::AsRead,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "TLS reload refused; keeping the current certificate");
                    Taken::AsRead
                }
                None => Taken::Later,
            };
        };
        let mut files = files;
        if let (Some(new), Some(old)) = (&files.client_crl, &in_force.client_crl) {
            let older = older_than_in_force(new, old);
            // A file that does not parse whole is refused whole, as before.
            let parses = self
                .tls
                .client_crl
                .as_deref()
                .is_some_and(|path| revocation_lists(path, new).is_ok());
            if let Some(merged) = (!older.is_empty() && parses)
                .then(|| kept_in_force(new, old))
                .flatten()
            {
                self.say_once(&self.said_older, Sha256::digest(&merged).into(), || {
                    let path = self.tls.client_crl.as_deref().unwrap_or(Path::new(""));
                    let e = file_err("client_crl", path, format!("the list of {} is older than the one in force (a lower CRL Number, or an earlier thisUpdate), or missing from the file: the one in force stays for that issuer, the file's lists of any other are applied (a restart takes whatever the file holds, and refuses a file without the list of a client_ca certificate's issuer)", older.join("; ")));
                    tracing::warn!(error = %e, "TLS revocation lists going back in time refused");
                });
                files.client_crl = Some(merged);
            }
        }
        let pair_changed = in_force.cert != files.cert || in_force.key != files.key;
        let lists_changed =
            in_force.client_ca != files.client_ca || in_force.client_crl != files.client_crl;
        let mut later = false;
        if pair_changed {
            match self.whole(&files) {
                Some(Ok(())) => return Taken::AsRead,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "TLS reload refused; keeping the current certificate")
                }
                None => later = true,
            }
        }
        if lists_changed && !self.verifier_alone(&in_force, &files) && pair_changed && !later {
            // The new lists were what was refused: the new pair, with the lists in force.
            let pair = TlsFiles {
                cert: files.cert.clone(),
                key: files.key.clone(),
                client_ca: in_force.client_ca.clone(),
                client_crl: in_force.client_crl.clone(),
            };
            if let Some(Ok(())) = self.whole(&pair) {
                tracing::info!("the new TLS certificate is served with the client CA and revocation lists in force");
            }
        }
        if later {
            Taken::Later
        } else {
            Taken::AsRead
        }
    }

    /// A file missing for a moment (mid-rotation): look again on the next poll. Said at
    /// `warn` once per failure after a good read (a rotation that left the files broken
    /// must be seen before the served certificate expires), at `debug` on later polls.
    fn unreadable(&self, error: TlsError, report: bool) {
        if report {
            tracing::warn!(error = %error, "TLS files not readable; keeping the current certificate");
        } else {
            tracing::debug!(error = %error, "TLS files not readable; keeping the current certificate");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A self-signed pair valid from `from` to `until` (years, January 1st).
    fn pair_valid(from: i32, until: i32) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn check_reads_the_validity_and_refuses_a_certificate_clients_would_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), false);
        let write = |(cert, key): (String, String)| {
            std::fs::write(&c.cert, cert).unwrap();
            std::fs::write(&c.key, key).unwrap();
        };
        write(pair_valid(2020, 2098));
        let v = check(&c).unwrap().validity.expect("validity read");
        assert_eq!(
            v.not_after,
            humantime::parse_rfc3339("2098-01-01T00:00:00Z").unwrap()
        );
        assert_eq!(v.expiry_seconds(), 4_039_372_800.0);

        write(pair_valid(2020, 2021));
        let e = check(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.cert: ") && e.contains("expired at 2021-01-01T00:00:00Z"),
            "{e}"
        );
        assert!(
            load_server_config(&c).is_ok(),
            "still loadable: `run` serves it and warns"
        );

        write(pair_valid(2097, 2098));
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("not valid before 2097-01-01T00:00:00Z"), "{e}");

        // A validity `x509-cert` cannot read (before 1970): the certificate loads, its
        // expiry is unknown, and the gauge reads 0 (the alert fires on it).
        write(pair_valid(1950, 2021));
        assert_eq!(check(&c).unwrap().validity, None);
        let acceptor = TlsAcceptor::load(&c, DEFAULT_HANDSHAKE_TIMEOUT).unwrap();
        assert_eq!(acceptor.expiry_gauge().get(), 0.0);
    }

    fn config(dir: &Path, client_ca: bool) -> TlsConfig {
        TlsConfig {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: client_ca.then(|| dir.join("ca.crt")),
            client_crl: None,
            client_verify_depth: DEFAULT_VERIFY_DEPTH,
            poll_interval: Duration::from_millis(50),
        }
    }

    /// A key whose line breaks were lost (passed through an environment variable or a
    /// template) is refused without a byte of it in the error: the PEM parser's own error
    /// quotes the offending line, which is then the whole key.
    #[test]
    fn a_broken_key_file_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("localhost");
        std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let one_line = key.replace('\n', "");
        let begin_joined = key.replacen("-----\n", "-----", 1);
        for broken in [one_line, begin_joined] {
            std::fs::write(dir.path().join("tls.key"), broken + "\n").unwrap();
            let Err(err) = load_server_config(&config(dir.path(), false)) else {
                panic!("a broken key was taken");
            };
            let err = err.to_string();
            assert!(err.starts_with("tls.key: "), "{err}");
            assert!(err.contains("line breaks"), "{err}");
            assert!(!err.contains(&body[..16]), "{err}");
            // Nor as the bytes pki-types prints: `[77, 73, 71, ...]`.
            let bytes = format!("{:?}", &body.as_bytes()[..8]);
            assert!(!err.contains(&bytes[1..bytes.len() - 1]), "{err}");
        }
    }

    #[test]
    fn loads_a_pair_with_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("localhost");
        std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        let c = load_server_config(&config(dir.path(), false)).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(c.session_storage.can_cache() && c.send_tls13_tickets > 0);
        std::fs::write(dir.path().join("ca.crt"), &cert).unwrap();
        let mtls = load_server_config(&config(dir.path(), true)).unwrap();
        // With client certificates, no session is resumed.
        assert!(!mtls.session_storage.can_cache());
        assert_eq!(mtls.send_tls13_tickets, 0);
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let err = |c: &TlsConfig| load_server_config(c).unwrap_err().to_string();
        let c = config(dir.path(), false);
        assert!(err(&c).starts_with("tls.cert: "), "{}", err(&c));

        let (cert, key) = pair("localhost");
        std::fs::write(&c.cert, &cert).unwrap();
        assert!(err(&c).starts_with("tls.key: "), "{}", err(&c));
        std::fs::write(&c.key, "not a key").unwrap();
        assert!(err(&c).starts_with("tls.key: "), "{}", err(&c));

        // A key that belongs to another certificate.
        let (_, other_key) = pair("localhost");
        std::fs::write(&c.key, other_key).unwrap();
        assert!(err(&c).contains("does not go with tls.cert"), "{}", err(&c));
        std::fs::write(&c.key, key).unwrap();

        std::fs::write(&c.cert, "garbage").unwrap();
        assert!(err(&c).starts_with("tls.cert: "), "{}", err(&c));
        std::fs::write(&c.cert, &cert).unwrap();

        let with_ca = config(dir.path(), true);
        assert!(err(&with_ca).starts_with("tls.client_ca: "));
        std::fs::write(dir.path().join("ca.crt"), "").unwrap();
        assert!(err(&with_ca).starts_with("tls.client_ca: "));

        std::fs::write(dir.path().join("ca.crt"), &cert).unwrap();
        let crl = dir.path().join("ca.crl");
        let with_crl = TlsConfig {
            client_crl: Some(crl.clone()),
            ..with_ca
        };
        for content in [
            "",
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        ] {
            std::fs::write(&crl, content).unwrap();
            assert!(
                err(&with_crl).starts_with("tls.client_crl: "),
                "{}",
                err(&with_crl)
            );
        }
    }

    /// A list past its `nextUpdate` loads (run applies it and warns) but `check` refuses it;
    /// a current one passes both.
    #[test]
    fn check_refuses_a_revocation_list_past_its_next_update() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("localhost");
        std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        let crl = |year| {
            rcgen::CertificateRevocationListParams {
                this_update: rcgen::date_time_ymd(2024, 1, 1),
                next_update: rcgen::date_time_ymd(year, 1, 1),
                crl_number: rcgen::SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: Vec::new(),
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(&ca, &ca_key)
            .unwrap()
            .pem()
            .unwrap()
        };
        let path = dir.path().join("ca.crl");
        let c = TlsConfig {
            client_crl: Some(path.clone()),
            ..config(dir.path(), true)
        };
        std::fs::write(&path, crl(2090)).unwrap();
        check(&c).unwrap();
        std::fs::write(&path, crl(2025)).unwrap();
        load_server_config(&c).unwrap();
        let e = check(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("tls.client_crl: ") && e.contains("nextUpdate (2025-01-01T00:00:00Z)"),
            "{e}"
        );
    }

    /// A CA that signs revocation lists, named `name`.
    fn crl_issuer(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        (params.self_signed(&key).unwrap(), key)
    }

    /// A list of `issuer` numbered `number`, its `thisUpdate` in `year`, for the certificates
    /// of distribution point `scope` if given.
    fn crl_of(
        issuer: &(rcgen::Certificate, rcgen::KeyPair),
        number: u64,
        year: i32,
        scope: Option<&str>,
    ) -> rustls::pki_types::CertificateRevocationListDer<'static> {
        signed_crl(issuer, number, year, scope).der().clone()
    }

    fn signed_crl(
        (ca, key): &(rcgen::Certificate, rcgen::KeyPair),
        number: u64,
        year: i32,
        scope: Option<&str>,
    ) -> rcgen::CertificateRevocationList {
        rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(year, 1, 1),
            next_update: rcgen::date_time_ymd(2090, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: scope.map(|uri| rcgen::CrlIssuingDistributionPoint {
                distribution_point: rcgen::CrlDistributionPoint {
                    uris: vec![uri.to_string()],
                },
                scope: None,
            }),
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(ca, key)
        .unwrap()
    }

    /// A reload that goes back in time for one issuer: that issuer's list in force is named
    /// and kept, the other issuer's new one taken, and the file made of the newest of each
    /// is the same size however often it is made again (refusals in a row pile nothing up).
    #[test]
    fn lists_going_back_are_named_and_merged_per_issuer() {
        let a = crl_issuer("ca a");
        let b = crl_issuer("ca b");
        let pem = |crls: &[&rcgen::CertificateRevocationList]| -> Vec<u8> {
            crls.iter()
                .flat_map(|c| c.pem().unwrap().into_bytes())
                .collect()
        };
        let (a1, a2) = (signed_crl(&a, 1, 2025, None), signed_crl(&a, 2, 2025, None));
        let (b1, b2) = (signed_crl(&b, 1, 2025, None), signed_crl(&b, 2, 2025, None));
        let in_force = pem(&[&a2, &b1]);
        let reload = pem(&[&a1, &b2]);
        assert_eq!(
            older_than_in_force(&reload, &in_force),
            vec!["CN=ca a".to_string()]
        );
        // A bundle that keeps the old list beside the newer one goes back for no one.
        assert!(older_than_in_force(&pem(&[&a1, &a2, &b2]), &in_force).is_empty());
        let merged = newest_lists_of(&[&reload, &in_force]);
        let mut applied: Vec<Vec<u8>> =
            rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&merged)
                .map(|c| c.unwrap().to_vec())
                .collect();
        applied.sort();
        let mut expected = vec![a2.der().to_vec(), b2.der().to_vec()];
        expected.sort();
        assert_eq!(applied, expected);
        let again = newest_lists_of(&[&reload, &merged]);
        assert_eq!(again.len(), merged.len());
    }

    /// Review 41: a reload with a newer full list beside an unchanged scoped one keeps
    /// nothing in force (the scoped list is older than the full one in force, which is what
    /// `older_than_in_force` reports); one that goes back does.
    #[test]
    fn a_newer_full_list_beside_an_unchanged_scoped_one_keeps_nothing_in_force() {
        let a = crl_issuer("ca a");
        let pem = |crls: &[&rcgen::CertificateRevocationList]| -> Vec<u8> {
            crls.iter()
                .flat_map(|c| c.pem().unwrap().into_bytes())
                .collect()
        };
        let scoped = signed_crl(&a, 3, 2025, Some("http://crl.example/part1.crl"));
        let (full4, full6) = (signed_crl(&a, 4, 2025, None), signed_crl(&a, 6, 2025, None));
        let in_force = pem(&[&full4, &scoped]);
        let reload = pem(&[&full6, &scoped]);
        assert!(!older_than_in_force(&reload, &in_force).is_empty());
        assert_eq!(kept_in_force(&reload, &in_force), None);
        let back = pem(&[&signed_crl(&a, 2, 2025, None), &scoped]);
        let kept = kept_in_force(&back, &in_force).expect("the full list in force kept");
        assert_eq!(kept, newest_lists_of(&[&in_force]));
    }

    /// Lists of one issuer in different scopes are all kept, newest first (rustls-webpki
    /// consults the first that speaks for a certificate, and a scoped list speaks for every
    /// certificate without a distribution point): an older scoped list ahead of a newer
    /// full one hid the full one's revocations. And a file holding only the older scoped
    /// list goes back in time against the full one in force.
    #[test]
    fn an_older_scoped_list_never_comes_before_a_newer_full_one() {
        let a = crl_issuer("ca a");
        let b = crl_issuer("ca b");
        let scoped1 = crl_of(&a, 1, 2025, Some("http://crl.example/part1.crl"));
        let full2 = crl_of(&a, 2, 2025, None);
        let other = crl_of(&b, 7, 2025, None);
        let (kept, set_aside) =
            newest_of_each_issuer(vec![scoped1.clone(), other.clone(), full2.clone()]);
        assert_eq!(kept, vec![full2.clone(), other.clone(), scoped1.clone()]);
        assert!(set_aside.0.is_empty());
        let pem = |c: &rcgen::CertificateRevocationList| c.pem().unwrap().into_bytes();
        let in_force = pem(&signed_crl(&a, 2, 2025, None));
        let stale = pem(&signed_crl(
            &a,
            1,
            2025,
            Some("http://crl.example/part1.crl"),
        ));
        assert_eq!(
            older_than_in_force(&stale, &in_force),
            vec!["CN=ca a".to_string()]
        );
    }

    /// Of two lists of one issuer, only the newer is applied: the higher CRL Number (compared
    /// as a number), the later `thisUpdate` between equal numbers. Lists of other issuers,
    /// and of another distribution point of the same one, are kept.
    #[test]
    fn only_the_newest_list_of_each_issuer_is_applied() {
        let a = crl_issuer("ca a");
        let b = crl_issuer("ca b");
        let kept = |crls: &[&rustls::pki_types::CertificateRevocationListDer<'static>]| {
            let (kept, set_aside) =
                newest_of_each_issuer(crls.iter().map(|c| (*c).clone()).collect());
            (kept, set_aside.0.len())
        };
        let (a255, a256) = (crl_of(&a, 255, 2025, None), crl_of(&a, 256, 2024, None));
        assert_eq!(kept(&[&a255, &a256]), (vec![a256.clone()], 1));
        assert_eq!(kept(&[&a256, &a255]), (vec![a256.clone()], 1));
        let later = crl_of(&a, 256, 2026, None);
        assert_eq!(kept(&[&later, &a256]), (vec![later.clone()], 1));
        assert_eq!(kept(&[&a256, &later]), (vec![later.clone()], 1));
        assert_eq!(kept(&[&a256, &a256.clone()]), (vec![a256.clone()], 1));

        let b1 = crl_of(&b, 1, 2024, None);
        let part = crl_of(&a, 1, 2024, Some("http://crl.example/part1.crl"));
        // The other scope's list is kept, after the newer full one of its issuer.
        assert_eq!(
            kept(&[&a255, &b1, &part, &a256]),
            (vec![b1.clone(), a256.clone(), part.clone()], 1)
        );
        assert_eq!(
            SetAside(vec!["CN=ca a".into(), "CN=ca b".into(), "CN=ca a".into()])
                .problem()
                .unwrap(),
            "holds 3 older lists beside a newer one of the same issuer (CN=ca a; CN=ca b): set aside, the newest of each issuer is applied"
        );
    }

    /// `keyward check` says so when lists were set aside, and passes.
    #[test]
    fn check_reports_older_lists_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("localhost");
        std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), key).unwrap();
        let ca = crl_issuer("client ca");
        std::fs::write(dir.path().join("ca.crt"), ca.0.pem()).unwrap();
        let path = dir.path().join("ca.crl");
        let c = TlsConfig {
            client_crl: Some(path.clone()),
            ..config(dir.path(), true)
        };
        let pem = |number| signed_crl(&ca, number, 2024, None).pem().unwrap();
        std::fs::write(&path, pem(2)).unwrap();
        assert_eq!(check(&c).unwrap().warnings, Vec::<String>::new());
        let bundle = pem(1) + &pem(2);
        std::fs::write(&path, bundle).unwrap();
        let warnings = check(&c).unwrap().warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("tls.client_crl: ")
                && warnings[0].contains(
                    "holds 1 older list beside a newer one of the same issuer (CN=client ca)"
                ),
            "{warnings:?}"
        );
    }

    #[test]
    fn fingerprint_follows_content() {
        let a = TlsFiles {
            cert: b"ab".to_vec(),
            key: b"c".to_vec(),
            client_ca: None,
            client_crl: None,
        };
        let b = TlsFiles {
            cert: b"a".to_vec(),
            key: b"bc".to_vec(),
            client_ca: None,
            client_crl: None,
        };
        let c = TlsFiles {
            client_ca: Some(Vec::new()),
            ..TlsFiles {
                cert: b"ab".to_vec(),
                key: b"c".to_vec(),
                client_ca: None,
                client_crl: None,
            }
        };
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(
            a.fingerprint(),
            TlsFiles {
                cert: b"ab".to_vec(),
                key: b"c".to_vec(),
                client_ca: None,
                client_crl: None,
            }
            .fingerprint()
        );
    }
}
