//! A bound on the shape of the chain a client sends, checked before rustls-webpki builds a
//! path from it.
//!
//! rustls-webpki looks for a path from the client's certificate to a `client_ca` anchor
//! through the intermediates the client sent, trying every intermediate whose subject is
//! the issuer it needs, and only checks signatures once a path reaches an anchor. A client
//! needs no valid certificate, nor any key, to send 64 CA certificates all named `CN=X`
//! and a certificate issued by `CN=X`: every ordering of them is a candidate path, and
//! webpki explored them until its budget ran out (`MaximumPathBuildCallsExceeded`, 200,000
//! calls): about 150 ms of CPU per handshake, on the worker thread that every other
//! connection on it waits for (review 51). So, before webpki is asked:
//!
//! - at most `tls.client_verify_depth` intermediates (default 4, 1 to 8);
//! - no two certificates of the chain with the same subject (compared as encoded, as webpki
//!   compares a subject with an issuer): each issuer name then picks at most one sent
//!   certificate, so path building follows a single line, as long as the chain at most;
//! - at most [`CHAIN_MAX_DER_BYTES`] of certificates in all.
//!
//! A chain refused so fails the handshake like any certificate rustls refuses
//! (`certificate_unknown` alert), and keyward logs it at `debug` with the reason.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, OtherError};
use x509_cert::der::asn1::AnyRef;
use x509_cert::der::{Decode as _, Reader as _, SliceReader, Tagged as _};

/// The most bytes (DER, all certificates of the chain together) a client may send. rustls
/// already refuses a handshake message past 64 KiB, so the bound has to be below that to
/// bound anything; 32 KiB is 9 certificates (the leaf and 8 intermediates, the most
/// `tls.client_verify_depth` allows) of 3.6 KiB each, where an RSA-4096 CA certificate is
/// about 1.5 KiB and a client certificate 1 to 2 KiB: a 3 to 5 level private PKI sends
/// under 10 KiB.
pub(crate) const CHAIN_MAX_DER_BYTES: usize = 32 * 1024;

/// Default of `tls.client_verify_depth`: a leaf under two issuing CAs below the root, with
/// room for a cross-certificate.
pub const DEFAULT_VERIFY_DEPTH: u8 = 4;

/// The values `tls.client_verify_depth` may take.
pub const VERIFY_DEPTH_RANGE: std::ops::RangeInclusive<u8> = 1..=8;

/// Why a chain was refused before path building.
struct Refused(String);

impl std::fmt::Debug for Refused {
    // rustls shows `CertificateError::Other` with `{:?}`: the reason, as words.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// The subject of a certificate, as encoded (the Name's content octets); `None` when the
/// certificate is not DER a subject can be read from.
fn subject(cert: &[u8]) -> Option<&[u8]> {
    let cert = AnyRef::from_der(cert).ok()?;
    let mut outer = SliceReader::new(cert.value()).ok()?;
    let tbs: AnyRef<'_> = outer.decode().ok()?;
    let mut tbs = SliceReader::new(tbs.value()).ok()?;
    let mut field: AnyRef<'_> = tbs.decode().ok()?;
    if field.tag().is_context_specific() {
        // [0] version: the serial number follows.
        field = tbs.decode().ok()?;
    }
    let _serial = field;
    let _signature: AnyRef<'_> = tbs.decode().ok()?;
    let _issuer: AnyRef<'_> = tbs.decode().ok()?;
    let _validity: AnyRef<'_> = tbs.decode().ok()?;
    let subject: AnyRef<'_> = tbs.decode().ok()?;
    Some(subject.value())
}

/// Why this chain is refused before webpki sees it, if it is.
fn refusal(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    depth: usize,
) -> Option<String> {
    if intermediates.len() > depth {
        return Some(format!(
            "client certificate chain of {} intermediates, more than tls.client_verify_depth ({depth})",
            intermediates.len()
        ));
    }
    let bytes: usize = std::iter::once(end_entity)
        .chain(intermediates)
        .map(|c| c.as_ref().len())
        .sum();
    if bytes > CHAIN_MAX_DER_BYTES {
        return Some(format!(
            "client certificate chain of {bytes} bytes, more than {CHAIN_MAX_DER_BYTES}"
        ));
    }
    let mut subjects = Vec::with_capacity(intermediates.len() + 1);
    for (i, cert) in std::iter::once(end_entity).chain(intermediates).enumerate() {
        let Some(name) = subject(cert.as_ref()) else {
            return Some(format!(
                "client certificate chain: certificate {i} has no readable subject"
            ));
        };
        if let Some(j) = subjects.iter().position(|s| *s == name) {
            return Some(format!(
                "client certificate chain: certificates {j} and {i} have the same subject"
            ));
        }
        subjects.push(name);
    }
    None
}

/// The client verifier keyward installs (webpki's, or [`super::revoked::EveryList`] around
/// it), behind the bounds of the module doc.
#[derive(Debug)]
pub(super) struct Bounded {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    /// `tls.client_verify_depth`.
    pub(super) depth: usize,
}

impl ClientCertVerifier for Bounded {
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(why) = refusal(end_entity, intermediates, self.depth) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(Refused(why))),
            )));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    pass_on_the_rest!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap(), key)
    }

    /// The subject read here is the one rcgen wrote, with or without a version field.
    #[test]
    fn reads_the_subject_as_encoded() {
        let (a, _) = ca("a");
        let parsed = x509_cert::Certificate::from_der(a.der()).unwrap();
        use x509_cert::der::Encode as _;
        let name = parsed.tbs_certificate().subject().to_der().unwrap();
        // The Name's content octets: its encoding less the SEQUENCE header (short length).
        assert_eq!(subject(a.der()), Some(&name[2..]));
        assert_eq!(subject(b"\x30\x03\x02\x01\x01"), None);
        let mut trailing = a.der().to_vec();
        trailing.push(0);
        assert_eq!(subject(&trailing), None);
    }

    #[test]
    fn refuses_too_many_duplicate_subjects_and_too_many_bytes() {
        let (a, _) = ca("a");
        let (b, _) = ca("b");
        let (c, _) = ca("c");
        let leaf = ca("leaf").0.der().clone();
        let (a, b, c) = (a.der().clone(), b.der().clone(), c.der().clone());
        assert_eq!(refusal(&leaf, &[a.clone(), b.clone(), c.clone()], 3), None);
        let more = refusal(&leaf, &[a.clone(), b.clone(), c.clone()], 2).unwrap();
        assert!(more.contains("3 intermediates"), "{more}");
        let twice = refusal(&leaf, &[a.clone(), b.clone(), a.clone()], 4).unwrap();
        assert!(twice.contains("certificates 1 and 3"), "{twice}");
        // The leaf counts too.
        assert!(refusal(&a, &[b.clone(), a.clone()], 4).is_some());
        let big = CertificateDer::from(vec![0u8; CHAIN_MAX_DER_BYTES]);
        let bytes = refusal(&leaf, &[big], 4).unwrap();
        assert!(bytes.contains("bytes, more than 32768"), "{bytes}");
        let garbage = CertificateDer::from(vec![0x30, 0x00]);
        assert!(refusal(&leaf, &[garbage], 4).is_some());
    }
}
