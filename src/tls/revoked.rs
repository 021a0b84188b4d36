//! Every revocation the applied client CRLs hold, checked after rustls's own check.
//!
//! rustls-webpki consults one list per certificate: the first it finds authoritative for
//! it. Lists of one issuer in different scopes overlap (a scoped list, one with an issuing
//! distribution point, is authoritative for every certificate without a distribution
//! point; a full list for all), so whichever of two overlapping lists comes first hides the
//! other's revocations: a newer scoped list ahead of an older full one let a certificate
//! the full list revokes in (review 39), and the reverse order did the same the other way.
//! No order is right for both; so after rustls accepts a client, its certificate and the
//! intermediates it sent are looked up in every applied list of their issuer. A serial is
//! unique per issuer, so a revocation in any of them is that certificate's, whatever the
//! list's scope. (A revocation lifted by the newest list of one scope but still listed in
//! another list of the issuer keeps the certificate out: fail closed.)

use std::collections::HashSet;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::CertificateError;
use x509_cert::der::Decode as _;

/// Revoked serials by issuer, from the lists applied.
#[derive(Debug, Default)]
pub(super) struct RevokedSerials(Vec<(x509_cert::name::Name, HashSet<Vec<u8>>)>);

impl RevokedSerials {
    /// The serials `crls` revoke. A list that cannot be read is an error (it is refused at
    /// load before this, see `revocation_lists`).
    pub(super) fn of(crls: &[CertificateRevocationListDer<'_>]) -> Result<Self, String> {
        let mut by_issuer = Self::default();
        for crl in crls {
            let list: x509_cert::crl::CertificateList =
                x509_cert::crl::CertificateList::from_der(crl.as_ref())
                    .map_err(|e| format!("a revocation list that cannot be read: {e}"))?;
            let tbs = list.tbs_cert_list;
            let serials = tbs
                .revoked_certificates
                .iter()
                .flatten()
                .map(|r| r.serial_number.as_bytes().to_vec());
            match by_issuer.0.iter_mut().find(|(i, _)| *i == tbs.issuer) {
                Some((_, set)) => set.extend(serials),
                None => by_issuer.0.push((tbs.issuer, serials.collect())),
            }
        }
        Ok(by_issuer)
    }

    /// Is `cert` revoked by any list of its issuer? One that cannot be read is taken as
    /// revoked: rustls accepted it, but nothing here can say it is not listed.
    fn revokes(&self, cert: &CertificateDer<'_>) -> bool {
        self.listed(cert).unwrap_or(true)
    }

    /// The subject and issuer (RFC 4514) of `cert` when it is not self-issued and no list
    /// here is its issuer's: as an anchor, nothing would check its revocation (see
    /// `every_issuer_listed`). `None` too for one that cannot be read (with lists, no
    /// anchor: see `trust_anchors`).
    pub(super) fn unlisted_issuer(&self, cert: &CertificateDer<'_>) -> Option<(String, String)> {
        let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
        let tbs = cert.tbs_certificate();
        let (subject, issuer) = (tbs.subject(), tbs.issuer());
        let listed = self.0.iter().any(|(i, _)| i == issuer);
        (subject != issuer && !listed).then(|| (subject.to_string(), issuer.to_string()))
    }

    /// Is `cert` listed by a list of its issuer (`None`: it cannot be read)?
    pub(super) fn listed(&self, cert: &CertificateDer<'_>) -> Option<bool> {
        let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
        let tbs = cert.tbs_certificate();
        Some(
            self.0
                .iter()
                .filter(|(issuer, _)| issuer == tbs.issuer())
                .any(|(_, serials)| serials.contains(tbs.serial_number().as_bytes())),
        )
    }
}

/// rustls's client verifier, then every applied list (see the module doc).
#[derive(Debug)]
pub(super) struct EveryList {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) revoked: RevokedSerials,
    /// Every certificate of `client_ca` is revoked: no client is let in.
    pub(super) refuse_all: bool,
}

impl ClientCertVerifier for EveryList {
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.refuse_all {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if std::iter::once(end_entity)
            .chain(intermediates)
            .any(|c| self.revoked.revokes(c))
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    pass_on_the_rest!();
}
