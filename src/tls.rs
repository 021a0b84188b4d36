//! Downstream TLS (rustls): PEM certificate and key, ALPN `h2`/`http/1.1`, optional client
//! certificates. The server config sits behind an `ArcSwap` so a rotated certificate is
//! used by the next handshake while existing connections keep theirs.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::config::TlsConfig;

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
}

fn file_err(field: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        field,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Build a rustls server config from the files named in `tls`.
pub fn load_server_config(tls: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| file_err("cert", &tls.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err("cert", &tls.cert, e))?;
    if certs.is_empty() {
        return Err(file_err("cert", &tls.cert, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| file_err("key", &tls.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(ca).map_err(|e| file_err("client_ca", ca, e))?
            {
                let cert = cert.map_err(|e| file_err("client_ca", ca, e))?;
                roots.add(cert).map_err(|e| file_err("client_ca", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_err("client_ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts TLS connections with the current server config.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<ArcSwap<ServerConfig>>,
}

impl TlsAcceptor {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config: Arc::new(ArcSwap::from_pointee(config)),
        }
    }

    /// Replace the server config; later handshakes use it.
    pub fn replace(&self, config: ServerConfig) {
        self.config.store(Arc::new(config));
    }

    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
            .accept(stream)
            .await
    }
}

/// The content of the files a TLS config is built from, to notice rotation.
fn fingerprint(tls: &TlsConfig) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    for p in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
        .into_iter()
        .flatten()
    {
        all.extend_from_slice(&crate::keys::digest(&std::fs::read(p).ok()?));
    }
    Some(all)
}

/// Poll the certificate files; when their content changes and the new pair loads, the next
/// handshake uses it. A broken pair (say, a half-written rotation) keeps the old one.
pub async fn watch(acceptor: TlsAcceptor, tls: TlsConfig) {
    let mut last = fingerprint(&tls);
    let mut tick = tokio::time::interval(tls.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let tls2 = tls.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&tls2)).await else {
            continue;
        };
        if now.is_none() || now == last {
            continue;
        }
        match load_server_config(&tls) {
            Ok(config) => {
                acceptor.replace(config);
                last = now;
                tracing::info!(cert = %tls.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS reload refused; keeping the current certificate")
            }
        }
    }
}
