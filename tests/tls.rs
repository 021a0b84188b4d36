//! Downstream TLS through the front door: certificates made here with rcgen, keyward on
//! `127.0.0.1:0` with `tls:` set, real rustls clients (HTTP/1.1 and h2 by ALPN), rotation of
//! the certificate files the way the kubelet updates a mounted Secret, and mTLS.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

// ---------------------------------------------------------------------------------------
// Certificates

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate issued by a [`Ca`], as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

/// What every test CA's certificate says: its name, a CA with no bound on the path under it,
/// for signing certificates and revocation lists.
fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = ca_params(name).self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// An issuing CA under this one, its certificate numbered `serial`.
    fn intermediate(&self, name: &str, serial: u64) -> Ca {
        self.intermediate_from(name, serial, None)
    }

    /// The same, valid from January 1st of `from` if given.
    fn intermediate_from(&self, name: &str, serial: u64, from: Option<i32>) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params(name);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        if let Some(year) = from {
            params.not_before = rcgen::date_time_ymd(year, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Ca { cert, key }
    }

    fn issue(&self, cn: &str, purpose: ExtendedKeyUsagePurpose) -> Leaf {
        self.issue_serial(cn, purpose, None)
    }

    fn issue_serial(
        &self,
        cn: &str,
        purpose: ExtendedKeyUsagePurpose,
        serial: Option<u64>,
    ) -> Leaf {
        self.issue_with(cn, purpose, |params| {
            params.serial_number = serial.map(rcgen::SerialNumber::from);
        })
    }

    /// A certificate for `localhost` and `127.0.0.1` named `cn`, for `purpose`, signed once
    /// `adjust` has set what else it needs (serial, validity): one way to make every leaf.
    fn issue_with(
        &self,
        cn: &str,
        purpose: ExtendedKeyUsagePurpose,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![purpose];
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn server(&self, cn: &str) -> Leaf {
        self.issue(cn, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A server certificate valid from `from` (since the Unix epoch) for a year.
    fn server_from(&self, cn: &str, from: Duration) -> Leaf {
        self.issue_with(cn, ExtendedKeyUsagePurpose::ServerAuth, |params| {
            params.not_before = rcgen::date_time_ymd(1970, 1, 1) + from;
            params.not_after = params.not_before + Duration::from_secs(365 * 86400);
        })
    }

    /// A server certificate valid from `from` to `until` (years, January 1st).
    fn server_valid(&self, cn: &str, from: i32, until: i32) -> Leaf {
        self.issue_with(cn, ExtendedKeyUsagePurpose::ServerAuth, |params| {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(until, 1, 1);
        })
    }

    fn client(&self, cn: &str) -> Leaf {
        self.issue(cn, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate that expires `for_` from now.
    fn client_valid_for(&self, cn: &str, for_: Duration) -> Leaf {
        self.issue_with(cn, ExtendedKeyUsagePurpose::ClientAuth, |params| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            params.not_before = rcgen::date_time_ymd(1970, 1, 1) + now - Duration::from_secs(3600);
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + now + for_;
        })
    }

    /// A PEM revocation list of this CA listing `serials`, current until 2035.
    fn crl(&self, number: u64, serials: &[u64]) -> String {
        self.crl_until(number, serials, 2035)
    }

    /// A PEM revocation list of this CA listing `serials`, its `nextUpdate` in `year`.
    fn crl_until(&self, number: u64, serials: &[u64], year: i32) -> String {
        let serials: Vec<_> = serials
            .iter()
            .map(|s| rcgen::SerialNumber::from(*s))
            .collect();
        self.crl_with(number, serials, year, None)
    }

    /// A PEM revocation list of this CA listing `serials`, scoped to the distribution point
    /// `uri` (a partition of the CA's revocations).
    fn crl_in_scope(&self, number: u64, serials: &[u64], uri: &str) -> String {
        let serials = serials.iter().map(|s| rcgen::SerialNumber::from(*s));
        self.crl_with(number, serials.collect(), 2035, Some(uri))
    }

    fn crl_with(
        &self,
        number: u64,
        serials: Vec<rcgen::SerialNumber>,
        year: i32,
        scope: Option<&str>,
    ) -> String {
        let revoked_certs = serials
            .into_iter()
            .map(|serial_number| rcgen::RevokedCertParams {
                serial_number,
                revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(year, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: scope.map(|uri| rcgen::CrlIssuingDistributionPoint {
                distribution_point: rcgen::CrlDistributionPoint {
                    uris: vec![uri.to_string()],
                },
                scope: None,
            }),
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// Certificate files laid out like a Kubernetes Secret volume: `tls.crt` and `tls.key`
/// are symlinks into `..data`, itself a symlink to a versioned directory that is replaced
/// atomically on update.
struct CertDir {
    dir: tempfile::TempDir,
    version: u32,
}

impl CertDir {
    fn new(leaf: &Leaf) -> CertDir {
        let mut d = CertDir {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        d.publish(&leaf.cert_pem, &leaf.key_pem);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), d.path(name)).unwrap();
        }
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write a new version and swap `..data` to it in one rename.
    fn publish(&mut self, cert_pem: &str, key_pem: &str) {
        self.version += 1;
        let v = format!("..v{}", self.version);
        std::fs::create_dir(self.path(&v)).unwrap();
        std::fs::write(self.path(&v).join("tls.crt"), cert_pem).unwrap();
        std::fs::write(self.path(&v).join("tls.key"), key_pem).unwrap();
        let tmp = self.path("..data_tmp");
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, self.path("..data")).unwrap();
    }

    fn write_ca(&self, pem: &str) -> PathBuf {
        let p = self.path("ca.crt");
        std::fs::write(&p, pem).unwrap();
        p
    }

    /// The `tls:` config block.
    fn yaml(&self, client_ca: Option<&Path>) -> String {
        let ca = client_ca.map_or("null".to_string(), |p| p.display().to_string());
        format!(
            "tls: {{ cert: {}, key: {}, client_ca: {ca}, poll_interval: 50ms }}\n",
            self.path("tls.crt").display(),
            self.path("tls.key").display()
        )
    }
}

// ---------------------------------------------------------------------------------------
// Clients

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Ca) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    roots
}

/// A client config trusting `ca` over `versions`, presenting `cert` with `chain` after it
/// if given: what every client of these tests is built from.
fn client_config(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
    cert: Option<&Leaf>,
    chain: &[&Ca],
) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca));
    match cert {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                std::iter::once(leaf.der.clone())
                    .chain(chain.iter().map(|c| c.cert.der().clone()))
                    .collect(),
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    }
}

/// A client trusting `ca`, offering `alpn`, optionally with a client certificate.
fn connector(ca: &Ca, alpn: &[&[u8]], client_cert: Option<&Leaf>) -> TlsConnector {
    let mut config = client_config(ca, rustls::DEFAULT_VERSIONS, client_cert, &[]);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn handshake(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

fn peer_cert(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .clone()
}

/// An HTTP/1.1 connection over an established TLS stream.
async fn http1(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn authed_get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {SERVICE_KEY}"))
        .body(Empty::new())
        .unwrap()
}

/// One authenticated GET on a new TLS connection; any TLS or HTTP failure is an `Err`.
async fn try_get(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<Got, String> {
    try_send(connector, addr, authed_get(path)).await
}

/// [`try_get`] of `path` with `leaf` as the client certificate; the future owns its client,
/// so a closure over it can be called with a borrowed leaf.
fn get_as(
    ca: &Ca,
    leaf: &Leaf,
    addr: std::net::SocketAddr,
    path: &'static str,
) -> impl std::future::Future<Output = Result<Got, String>> {
    let c = connector(ca, &[], Some(leaf));
    async move { try_get(&c, addr, path).await }
}

/// `req` on a new TLS connection; any TLS or HTTP failure is an `Err`.
async fn try_send(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
    req: Request<Empty<Bytes>>,
) -> Result<Got, String> {
    let tls = handshake(connector, addr)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(read(resp).await)
}

/// keyward over TLS serving `served` (no client certificates asked), `extra` added to its
/// config, in front of a new upstream: where most tests start.
async fn tls_proxy(served: &Leaf, extra: &str) -> (Upstream, CertDir, Proxy) {
    let upstream = spawn_upstream().await;
    let certs = CertDir::new(served);
    let proxy = spawn_proxy(upstream.addr, &format!("{}{extra}", certs.yaml(None))).await;
    (upstream, certs, proxy)
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn http1_over_tls_forwards_with_https_proto() {
    let ca = Ca::new("test ca");
    let (upstream, _certs, proxy) = tls_proxy(&ca.server("keyward-a"), "").await;

    let tls = handshake(&connector(&ca, &[b"http/1.1"], None), proxy.addr)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = http1(tls).await;
    let got = read(h1.send_request(authed_get("/tls/one")).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let seen = upstream.last();
    assert_eq!(seen.target, "/tls/one");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-auth-key-id"], "key_demo_service");
    assert!(!seen.headers.contains_key("authorization"));

    // Still authenticated like plain HTTP: no key, no forwarding.
    let no_key = Request::get("/tls/two")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let got = read(h1.send_request(no_key).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert_eq!(got.code(), "invalid_auth_header");
    assert_eq!(upstream.count(), 1);

    // The plain-text port is TLS only: an HTTP/1.1 request in clear text gets no answer.
    let reply = raw(
        proxy.addr,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(!reply.starts_with("HTTP/"), "{reply:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2_is_negotiated_by_alpn() {
    let ca = Ca::new("test ca");
    let (upstream, _certs, proxy) = tls_proxy(&ca.server("keyward-a"), "").await;

    let tls = handshake(&connector(&ca, &[b"h2", b"http/1.1"], None), proxy.addr)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Two streams on the one connection.
    for path in ["/h2/a", "/h2/b"] {
        let req = Request::get(format!("https://localhost{path}"))
            .header("x-api-key", SERVICE_KEY)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        let got = read(resp).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text());
        let seen = upstream.last();
        assert_eq!(seen.target, path);
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        assert_eq!(
            seen.headers["x-auth-subject-id"],
            "507f1f77bcf86cd799439015"
        );
    }
    proxy.shutdown().await;
}

/// What the client sent, read until keyward closes the connection (or 5 s pass).
async fn sent_and_answered(tls: &mut TlsStream<TcpStream>, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    tls.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection stayed open: {got:?}");
    got
}

/// Once the handshake agreed on a protocol (ALPN), the connection speaks that one alone
/// (RFC 7301 §3.2): HTTP/1.1 on an `h2` connection is an HTTP/2 protocol error, and an
/// HTTP/2 preface on an `http/1.1` connection a malformed HTTP/1 request. Neither is served,
/// and nothing reaches the app.
#[tokio::test]
async fn only_the_protocol_agreed_by_alpn_is_served() {
    let ca = Ca::new("test ca");
    let (upstream, _certs, proxy) = tls_proxy(&ca.server("keyward-a"), "").await;
    let http1_request =
        format!("GET /alpn/h1 HTTP/1.1\r\nhost: localhost\r\nx-api-key: {SERVICE_KEY}\r\n\r\n");

    let mut tls = handshake(&connector(&ca, &[b"h2"], None), proxy.addr)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let got = sent_and_answered(&mut tls, http1_request.as_bytes()).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    let mut tls = handshake(&connector(&ca, &[b"http/1.1"], None), proxy.addr)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // The preface and an empty SETTINGS frame: an HTTP/2 server answers with its own
    // SETTINGS frame (type 4); an HTTP/1.1 one refuses the request line, or closes.
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let got = sent_and_answered(&mut tls, &preface).await;
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 4") || got.starts_with(b"HTTP/1.1 5"),
        "{got:?}"
    );
    assert_eq!(upstream.count(), 0);

    // Each protocol is still served where it was agreed.
    let mut tls = handshake(&connector(&ca, &[b"http/1.1"], None), proxy.addr)
        .await
        .expect("TLS handshake");
    let answer = one_request(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_accepted() {
    let ca = Ca::new("test ca");
    let (_upstream, _certs, proxy) = tls_proxy(&ca.server("keyward-a"), "").await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = client_config(&ca, &[version], None, &[]);
        let tls = handshake(&TlsConnector::from(Arc::new(config)), proxy.addr)
            .await
            .expect("TLS handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
        let got = read(
            http1(tls)
                .await
                .send_request(authed_get("/v"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn rotated_certificate_is_used_by_new_handshakes() {
    let ca = Ca::new("test ca");
    let first = ca.server("keyward-a");
    let second = ca.server("keyward-b");
    let (upstream, mut certs, proxy) = tls_proxy(&first, "").await;
    let client = connector(&ca, &[b"http/1.1"], None);

    // A connection opened before the rotation.
    let tls = handshake(&client, proxy.addr).await.unwrap();
    assert_eq!(peer_cert(&tls), first.der);
    let mut old = http1(tls).await;
    let got = read(old.send_request(authed_get("/before")).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);

    // Half a rotation: the new certificate beside the old key. It is refused, and
    // handshakes keep getting the first certificate for several poll intervals.
    certs.publish(&second.cert_pem, &first.key_pem);
    for _ in 0..8 {
        let tls = handshake(&client, proxy.addr).await.expect("still served");
        assert_eq!(peer_cert(&tls), first.der);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    // The complete pair: new handshakes see it once the watcher has polled.
    certs.publish(&second.cert_pem, &second.key_pem);
    let what = "new handshakes present the rotated certificate";
    eventually_served(what, &client, proxy.addr, &second.der).await;

    // The connection opened before the rotation still works.
    let got = read(old.send_request(authed_get("/after")).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(upstream.last().target, "/after");
    proxy.shutdown().await;
}

/// A FIFO or a device swapped in for a certificate file would block the watcher's read
/// for good (and with it every later rotation, and shutdown): it is refused like a file
/// that does not load, and the next good pair is taken.
#[tokio::test]
async fn a_fifo_or_a_device_at_a_certificate_path_is_refused_and_rotation_goes_on() {
    let ca = Ca::new("test ca");
    let first = ca.server("keyward-a");
    let second = ca.server("keyward-b");
    let (_upstream, mut certs, proxy) = tls_proxy(&first, "").await;
    let client = connector(&ca, &[b"http/1.1"], None);

    certs.publish(&first.cert_pem, &first.key_pem);
    let fifo = certs.path(&format!("..v{}", certs.version)).join("tls.crt");
    std::fs::remove_file(&fifo).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for _ in 0..4 {
        let tls = handshake(&client, proxy.addr).await.expect("still served");
        assert_eq!(peer_cert(&tls), first.der);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let dev = certs.path(&format!("..v{}", certs.version)).join("tls.key");
    std::fs::remove_file(&dev).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &dev).unwrap();
    std::fs::remove_file(&fifo).unwrap();
    std::fs::write(&fifo, &second.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let tls = handshake(&client, proxy.addr).await.expect("still served");
    assert_eq!(peer_cert(&tls), first.der);

    certs.publish(&second.cert_pem, &second.key_pem);
    let what = "the next good pair is served";
    eventually_served(what, &client, proxy.addr, &second.der).await;
    proxy.shutdown().await;
}

/// The served certificate's `notAfter` is exported, so a rotation that stopped is seen
/// before clients see it; a rotation to an expired certificate is refused like half a
/// rotation, and the gauge follows the certificate actually served.
#[tokio::test]
async fn the_served_certificates_expiry_is_exported_and_an_expired_one_is_not_rotated_in() {
    let ca = Ca::new("test ca");
    let first = ca.server_valid("keyward-a", 2020, 2098);
    let expired = ca.server_valid("keyward-old", 2020, 2021);
    let second = ca.server_valid("keyward-b", 2020, 2099);
    let (_upstream, mut certs, proxy) = tls_proxy(&first, "").await;
    let client = connector(&ca, &[b"http/1.1"], None);
    let expiry = "keyward_tls_cert_expiry_timestamp_seconds ";
    assert_eq!(metric_value(&proxy, expiry).await, jan_1("2098"));

    certs.publish(&expired.cert_pem, &expired.key_pem);
    for _ in 0..8 {
        let tls = handshake(&client, proxy.addr).await.expect("still served");
        assert_eq!(
            peer_cert(&tls),
            first.der,
            "the expired certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(metric_value(&proxy, expiry).await, jan_1("2098"));

    certs.publish(&second.cert_pem, &second.key_pem);
    let want = jan_1("2099");
    eventually("the gauge follows the rotation", || async {
        metric_value(&proxy, expiry).await == want
    })
    .await;
    let tls = handshake(&client, proxy.addr).await.unwrap();
    assert_eq!(peer_cert(&tls), second.der);

    // Rotated to a certificate valid two seconds from now (an issuer's clock a little
    // ahead): kept back until then, then taken without another change to the files.
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let soon = ca.server_from("keyward-c", unix + Duration::from_secs(2));
    certs.publish(&soon.cert_pem, &soon.key_pem);
    let tls = handshake(&client, proxy.addr).await.unwrap();
    assert_eq!(peer_cert(&tls), second.der, "not valid yet");
    eventually_served("taken once valid", &client, proxy.addr, &soon.der).await;
    proxy.shutdown().await;
}

/// January 1st of `year` in seconds since the Unix epoch, as the expiry gauges say a date.
fn jan_1(year: &str) -> f64 {
    let t = humantime::parse_rfc3339(&format!("{year}-01-01T00:00:00Z")).unwrap();
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Wait until new handshakes with `addr` present `want`.
async fn eventually_served(
    what: &str,
    client: &TlsConnector,
    addr: std::net::SocketAddr,
    want: &CertificateDer<'static>,
) {
    eventually(what, || async {
        match handshake(client, addr).await {
            Ok(tls) => peer_cert(&tls) == *want,
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let client_ca = Ca::new("client ca");
    let certs = CertDir::new(&ca.server("keyward-a"));
    let ca_file = certs.write_ca(&client_ca.pem());
    let proxy = spawn_proxy(upstream.addr, &certs.yaml(Some(&ca_file))).await;

    let no_cert = try_get(&connector(&ca, &[], None), proxy.addr, "/m/none").await;
    assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");

    let stranger = Ca::new("other ca").client("intruder");
    let wrong = get_as(&ca, &stranger, proxy.addr, "/m/wrong").await;
    assert!(wrong.is_err(), "certificate from another CA: {wrong:?}");
    assert_eq!(upstream.count(), 0, "nothing reached the upstream");

    let good = client_ca.client("ci-bot");
    let got = get_as(&ca, &good, proxy.addr, "/m/ok")
        .await
        .expect("CA-signed client certificate accepted");
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(upstream.last().target, "/m/ok");
    // A client certificate does not replace the API key.
    let tls = handshake(&connector(&ca, &[], Some(&good)), proxy.addr)
        .await
        .unwrap();
    let no_key = Request::get("/m/nokey")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let got = read(http1(tls).await.send_request(no_key).await.unwrap()).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    proxy.shutdown().await;
}

/// A proxy over TLS (its certificate from `ca`) whose clients need a certificate from
/// `client_ca` (PEM), with `lists` as `tls.client_crl`, both re-read every 50 ms. Returns
/// its certificate files, the list file and the proxy.
async fn mtls_proxy(
    upstream: std::net::SocketAddr,
    ca: &Ca,
    client_ca: &str,
    lists: &str,
) -> (CertDir, PathBuf, Proxy) {
    let (certs, crl_file, yaml) = mtls_files(ca, client_ca, lists);
    let proxy = spawn_proxy(upstream, &yaml).await;
    (certs, crl_file, proxy)
}

/// The files of [`mtls_proxy`], and its `tls:` block.
fn mtls_files(ca: &Ca, client_ca: &str, lists: &str) -> (CertDir, PathBuf, String) {
    mtls_files_serving(&ca.server("keyward-a"), client_ca, lists)
}

/// The same, serving `served`: for a test that rotates away from it.
fn mtls_files_serving(served: &Leaf, client_ca: &str, lists: &str) -> (CertDir, PathBuf, String) {
    let certs = CertDir::new(served);
    let ca_file = certs.write_ca(client_ca);
    let crl_file = certs.path("ca.crl");
    std::fs::write(&crl_file, lists).unwrap();
    let yaml = certs.yaml(Some(&ca_file)).replace(
        "poll_interval: 50ms",
        &format!("client_crl: {}, poll_interval: 50ms", crl_file.display()),
    );
    (certs, crl_file, yaml)
}

/// A directory with the demo keys as `keys.yaml`, and that file's path: what a config needs.
fn demo_keys_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.yaml");
    std::fs::write(&keys_file, DEMO_KEYS).unwrap();
    (dir, keys_file)
}

/// Start keyward as [`spawn_proxy`] does, or say why it refused to start.
async fn try_spawn_proxy(upstream: std::net::SocketAddr, extra: &str) -> Result<Proxy, String> {
    let (dir, keys_file) = demo_keys_dir();
    let config = support::config::ConfigBuilder::new(upstream, &keys_file)
        .extra(extra)
        .config();
    let server = keyward::Keyward::bind(config)
        .await
        .map_err(|e| e.to_string())?;
    Ok(support::run_bound(server, dir))
}

/// `keyward check` (the binary) on the config [`spawn_proxy`] would start: its stderr when
/// it refuses.
fn keyward_check(upstream: std::net::SocketAddr, extra: &str) -> Result<(), String> {
    let (dir, keys_file) = demo_keys_dir();
    let config = dir.path().join("keyward.yaml");
    std::fs::write(&config, config_yaml(upstream, &keys_file, extra)).unwrap();
    let out = support::child::run(&["check", "--config", config.to_str().unwrap()]);
    match out.status.code() {
        Some(0) => Ok(()),
        _ => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// A proxy over TLS whose clients need a certificate from `client_ca`, with
/// `tls.client_crl` at `crl_file` holding `first_list`; and two client certificates of
/// that CA: `leaked` (serial 7) and `other` (serial 8).
struct Revocable {
    _upstream: Upstream,
    ca: Ca,
    client_ca: Ca,
    served: Leaf,
    certs: CertDir,
    crl_file: PathBuf,
    proxy: Proxy,
    leaked: Leaf,
    other: Leaf,
}

impl Revocable {
    async fn start(first_list: impl Fn(&Ca) -> String) -> Revocable {
        let upstream = spawn_upstream().await;
        let ca = Ca::new("test ca");
        let client_ca = Ca::new("client ca");
        let served = ca.server("keyward-a");
        let (certs, crl_file, yaml) =
            mtls_files_serving(&served, &client_ca.pem(), &first_list(&client_ca));
        let proxy = spawn_proxy(upstream.addr, &yaml).await;
        let leaked = client_ca.issue_serial("leaked", ExtendedKeyUsagePurpose::ClientAuth, Some(7));
        let other = client_ca.issue_serial("ci-bot", ExtendedKeyUsagePurpose::ClientAuth, Some(8));
        Revocable {
            _upstream: upstream,
            ca,
            client_ca,
            served,
            certs,
            crl_file,
            proxy,
            leaked,
            other,
        }
    }

    /// One authenticated GET with `leaf` as the client certificate.
    async fn get_with(&self, leaf: &Leaf) -> Result<Got, String> {
        get_as(&self.ca, leaf, self.proxy.addr, "/m/crl").await
    }

    fn write_list(&self, pem: String) {
        std::fs::write(&self.crl_file, pem).unwrap();
    }

    /// `pem` as the lists, with a new certificate in the same step, seen served: so the step
    /// was taken (a test of what the lists did then cannot pass on a step not yet polled).
    async fn write_list_and_rotate(&mut self, pem: String) {
        let next = self.ca.server("keyward-b");
        self.write_list(pem);
        self.certs.publish(&next.cert_pem, &next.key_pem);
        eventually("the new certificate served", || async {
            self.served_now().await == Some(next.der.clone())
        })
        .await;
    }

    /// The certificate the proxy serves now to a client it lets in.
    async fn served_now(&self) -> Option<CertificateDer<'static>> {
        let c = connector(&self.ca, &[], Some(&self.other));
        handshake(&c, self.proxy.addr)
            .await
            .ok()
            .map(|tls| peer_cert(&tls))
    }
}

/// `tls.client_crl`: a client certificate its CA revoked is refused, at start and after
/// the list is rotated (one leaked certificate is shut out without replacing the CA);
/// one not listed is accepted.
#[tokio::test]
async fn mtls_refuses_a_client_certificate_its_ca_revoked() {
    let r = Revocable::start(|ca| ca.crl(1, &[7])).await;
    let got = r.get_with(&r.leaked).await;
    assert!(got.is_err(), "revoked certificate: {got:?}");
    let got = r
        .get_with(&r.other)
        .await
        .expect("unlisted certificate accepted");
    assert_eq!(got.status, StatusCode::OK);
    let next_update = "keyward_tls_crl_next_update_timestamp_seconds ";
    assert_eq!(metric_value(&r.proxy, next_update).await, jan_1("2035"));
    // The list is rotated: the other one is revoked too. It is past its `nextUpdate`: still
    // applied (the last word of its issuer), and the gauge says so.
    r.write_list(r.client_ca.crl_until(2, &[7, 8], 2025));
    eventually("the new list refuses the other certificate", || async {
        r.get_with(&r.other).await.is_err()
    })
    .await;
    assert_eq!(metric_value(&r.proxy, next_update).await, jan_1("2025"));
    r.proxy.shutdown().await;
}

/// A certificate rotation that is refused (a key that does not go with it, a certificate
/// not valid yet) keeps the certificate in force, but never holds back the revocation lists
/// or the client CA: a list written meanwhile applies at once, with the certificate in
/// force. Before, the whole set was refused, and a revoked client was let in for as long as
/// the rotation stayed half done (or a certificate was staged ahead of its `notBefore`).
#[tokio::test]
async fn a_refused_certificate_rotation_does_not_hold_back_a_revocation() {
    let mut r = Revocable::start(|ca| ca.crl(1, &[])).await;
    assert_eq!(
        r.get_with(&r.leaked).await.expect("not revoked yet").status,
        StatusCode::OK
    );

    // Half done: a new certificate beside the old key. Then the leaked one is revoked.
    let next = r.ca.server("keyward-b");
    r.certs.publish(&next.cert_pem, &r.served.key_pem);
    r.write_list(r.client_ca.crl(2, &[7]));
    eventually(
        "the list applies though the rotation is refused",
        || async { r.get_with(&r.leaked).await.is_err() },
    )
    .await;
    let served = r
        .served_now()
        .await
        .expect("an unlisted client still gets in");
    assert_eq!(served, r.served.der, "the certificate in force is kept");

    // Staged ahead of its `notBefore`: kept back, and again the lists are not.
    let staged = r.ca.server_valid("keyward-c", 2100, 2101);
    r.certs.publish(&staged.cert_pem, &staged.key_pem);
    r.write_list(r.client_ca.crl(3, &[7, 8]));
    eventually("the list applies though the certificate waits", || async {
        r.get_with(&r.other).await.is_err()
    })
    .await;
    r.proxy.shutdown().await;
}

/// And the other way round: revocation lists that do not load keep the ones in force, but
/// never hold back a good certificate rotation.
#[tokio::test]
async fn refused_lists_do_not_hold_back_a_certificate_rotation() {
    let mut r = Revocable::start(|ca| ca.crl(1, &[7])).await;
    let broken = "-----BEGIN X509 CRL-----\nbroken\n-----END X509 CRL-----\n";
    r.write_list_and_rotate(broken.into()).await;
    // The list in force still stands.
    assert!(r.get_with(&r.leaked).await.is_err());
    r.proxy.shutdown().await;
}

/// A revocation list older than the one in force (a lower CRL Number: a revert, a stale
/// copy) is not applied: it would let a revoked client in again without a word. A newer
/// list that lifts the revocation is. And a certificate or key that cannot be read (gone
/// mid-rotation) does not hold back a new list either.
#[tokio::test]
async fn an_older_revocation_list_is_not_applied_and_an_unreadable_pair_holds_back_none() {
    let mut r = Revocable::start(|ca| ca.crl(2, &[7])).await;
    assert!(r.get_with(&r.leaked).await.is_err());

    // The older list, with a new certificate in the same step (seen served: the step was
    // taken), and the leaked client is still out.
    r.write_list_and_rotate(r.client_ca.crl(1, &[])).await;
    assert!(
        r.get_with(&r.leaked).await.is_err(),
        "an older list let the leaked client in"
    );

    // A bundle that keeps the old list beside a newer one: the newer one is what it
    // applies, and what is compared with the one in force.
    r.write_list(r.client_ca.crl(1, &[]) + &r.client_ca.crl(3, &[7, 8]));
    eventually("the bundle's newest list applies", || async {
        r.get_with(&r.other).await.is_err()
    })
    .await;

    // A newer list that lifts it is the issuer's word.
    r.write_list(r.client_ca.crl(4, &[]));
    eventually("the newer list lifts the revocation", || async {
        r.get_with(&r.leaked).await.is_ok()
    })
    .await;

    // The certificate gone mid-rotation, and the leaked one revoked again meanwhile.
    std::fs::remove_file(r.certs.path("tls.crt")).unwrap();
    r.write_list(r.client_ca.crl(5, &[7]));
    eventually(
        "the list applies though the certificate cannot be read",
        || async { r.get_with(&r.leaked).await.is_err() },
    )
    .await;
    assert!(r.get_with(&r.other).await.is_ok());
    r.proxy.shutdown().await;
}

/// The check against lists going back in time is per issuer: a stale list of one CA keeps
/// that CA's list in force, and never holds back another CA's new revocations in the same
/// file.
#[tokio::test]
async fn a_stale_list_of_one_issuer_does_not_hold_back_another_issuers() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let first = Ca::new("client ca");
    let second = Ca::new("second client ca");
    let (_certs, crl_file, proxy) = mtls_proxy(
        upstream.addr,
        &ca,
        &(first.pem() + &second.pem()),
        &(first.crl(2, &[7]) + &second.crl(1, &[])),
    )
    .await;
    let leaked = first.issue_serial("leaked", ExtendedKeyUsagePurpose::ClientAuth, Some(7));
    let carol = second.issue_serial("carol", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let get_with = |leaf: &Leaf| get_as(&ca, leaf, proxy.addr, "/m/issuers");
    assert!(get_with(&leaked).await.is_err());
    assert!(get_with(&carol).await.is_ok());
    // The first CA's list goes back; the second's revokes carol.
    std::fs::write(&crl_file, first.crl(1, &[]) + &second.crl(2, &[9])).unwrap();
    eventually("the second issuer's new list applies", || async {
        get_with(&carol).await.is_err()
    })
    .await;
    assert!(
        get_with(&leaked).await.is_err(),
        "the stale list was applied"
    );
    proxy.shutdown().await;
}

/// A proxy over TLS with `client_ca`'s certificate as `tls.client_ca` and the two `lists`
/// bundled as `tls.client_crl` in either order (a fresh proxy each): `client_ca`'s client
/// certificate numbered `revoked` is refused, one numbered 9 let in, whichever list comes
/// first. Returns how many requests reached the app.
async fn either_order_refuses(client_ca: &Ca, lists: [(&str, String); 2], revoked: u64) -> usize {
    let refused =
        client_ca.issue_serial("leaked", ExtendedKeyUsagePurpose::ClientAuth, Some(revoked));
    let admitted = client_ca.issue_serial("ci-bot", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let [(a, first), (b, second)] = lists;
    let bundles = [
        (format!("{a} first"), format!("{first}{second}")),
        (format!("{b} first"), format!("{second}{first}")),
    ];
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    for (what, bundle) in bundles {
        let (_certs, _crl_file, proxy) =
            mtls_proxy(upstream.addr, &ca, &client_ca.pem(), &bundle).await;
        let get_with = |leaf: &Leaf| get_as(&ca, leaf, proxy.addr, "/m/crl2");
        let got = get_with(&refused).await;
        assert!(got.is_err(), "{what}: revoked certificate let in: {got:?}");
        let got = get_with(&admitted)
            .await
            .unwrap_or_else(|e| panic!("{what}: unlisted certificate refused: {e}"));
        assert_eq!(got.status, StatusCode::OK, "{what}");
        proxy.shutdown().await;
    }
    upstream.count()
}

/// A `tls.client_crl` bundle holding an older and a newer list of one CA (`cat old new`,
/// or the other way round): the newer one is applied, so a certificate revoked since the
/// older one is refused whichever comes first in the file (rustls-webpki consults the first
/// list it finds for an issuer).
#[tokio::test]
async fn mtls_applies_the_newest_of_two_lists_of_one_ca_in_either_order() {
    let client_ca = Ca::new("client ca");
    let older = client_ca.crl(1, &[7]);
    let newer = client_ca.crl(2, &[7, 8]);
    let lists = [("older", older), ("newer", newer)];
    let reached = either_order_refuses(&client_ca, lists, 8).await;
    assert_eq!(reached, 2, "only the unlisted certificate got through");
}

/// Review 39: a newer list scoped to a distribution point (a partition, here with nothing
/// revoked) beside an older full list of the same CA hid the full list's revocations from a
/// certificate without a distribution point: rustls-webpki consults the first list
/// authoritative for a certificate, and takes a scoped one for any certificate without a
/// distribution point. Every applied list of the issuer is looked in now, in either order.
#[tokio::test]
async fn a_scoped_list_does_not_hide_a_full_lists_revocation_in_either_order() {
    let client_ca = Ca::new("client ca");
    let full = client_ca.crl(2, &[7]);
    let scoped = client_ca.crl_in_scope(3, &[], "http://crl.example/part1.crl");
    let lists = [("full", full), ("scoped", scoped)];
    let reached = either_order_refuses(&client_ca, lists, 7).await;
    assert_eq!(reached, 2, "only the unlisted certificate got through");
}

/// Review 39: a list that `x509-cert` cannot read (a revoked serial past RFC 5280's 20
/// bytes) but rustls applies escaped the check against lists going back in time: an older
/// list replacing the one in force let its revoked client in again without a word. Such a
/// file is refused now, as `keyward check` refused it, and the lists in force stay.
#[tokio::test]
async fn a_list_that_cannot_be_read_for_its_number_is_refused_not_applied() {
    let mut r = Revocable::start(|ca| ca.crl(5, &[7])).await;
    assert!(r.get_with(&r.leaked).await.is_err());
    let long = rcgen::SerialNumber::from_slice(&[0x51; 24]);
    let older = r.client_ca.crl_with(4, vec![long], 2035, None);
    // The list with a new certificate in the same step (seen served: the step was taken).
    r.write_list_and_rotate(older).await;
    assert!(
        r.get_with(&r.leaked).await.is_err(),
        "an older list no one could date let the leaked client in"
    );
    assert!(r.get_with(&r.other).await.is_ok());
    r.proxy.shutdown().await;
}

/// Review 41: with an issuing CA in `client_ca` beside its root, the root's revocation of
/// that CA was never looked at for a client that left the CA out of its chain: rustls-webpki
/// took the CA as a trust anchor (it prefers one to an intermediate sent, and never checks
/// an anchor's revocation). A revoked CA is no anchor now; a client it issued is refused
/// whether it sends the CA or not, and one of a CA not revoked still gets in.
#[tokio::test]
async fn a_revoked_issuing_ca_in_client_ca_lets_none_of_its_clients_in() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let leaked_ca = root.intermediate("leaked issuing ca", 40);
    let kept_ca = root.intermediate("kept issuing ca", 41);
    let client_ca = root.pem() + &leaked_ca.pem() + &kept_ca.pem();
    let lists = root.crl(1, &[40]) + &leaked_ca.crl(1, &[]) + &kept_ca.crl(1, &[]);
    let (_certs, _crl_file, proxy) = mtls_proxy(upstream.addr, &ca, &client_ca, &lists).await;
    let minted = leaked_ca.issue_serial("minted", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let honest = kept_ca.issue_serial("honest", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let get_with = |leaf: &Leaf, chain: Option<&Ca>| {
        let c = chain_connector(&ca, leaf, chain.as_slice());
        async move { try_get(&c, proxy.addr, "/m/anchor").await }
    };
    let got = get_with(&minted, None).await;
    assert!(got.is_err(), "revoked CA left out of the chain: {got:?}");
    let got = get_with(&minted, Some(&leaked_ca)).await;
    assert!(got.is_err(), "revoked CA sent: {got:?}");
    let got = get_with(&honest, None).await.expect("a CA not revoked");
    assert_eq!(got.status, StatusCode::OK);
    proxy.shutdown().await;
    assert_eq!(upstream.count(), 1, "only the honest client got through");
}

/// Review 43: a reload whose lists revoke every certificate of `client_ca` (here its only
/// one, an issuing CA its root revokes) was refused whole, so the verifier in force stayed,
/// and with it every client the new lists revoke. Now no client is let in, on the proxy
/// listener as on any; and `keyward check` says why.
#[tokio::test]
async fn a_reload_that_revokes_every_client_ca_refuses_every_client() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let issuing = root.intermediate("issuing ca", 40);
    let (_certs, crl_file, proxy) = mtls_proxy(
        upstream.addr,
        &ca,
        &issuing.pem(),
        &(issuing.crl(1, &[]) + &root.crl(1, &[])),
    )
    .await;
    let client = issuing.issue_serial("client", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let get = || get_as(&ca, &client, proxy.addr, "/m/all-revoked");
    assert_eq!(get().await.expect("not revoked yet").status, StatusCode::OK);
    std::fs::write(&crl_file, issuing.crl(2, &[]) + &root.crl(2, &[40])).unwrap();
    eventually("no client let in once its only CA is revoked", || async {
        get().await.is_err()
    })
    .await;
    proxy.shutdown().await;
}

/// Review 45: a `client_ca` certificate whose revocation cannot be read (valid from 1960,
/// before x509-cert's epoch) was kept as an anchor, so when its root revoked it, a client it
/// issued that left it out of its chain got in. With lists, such a certificate is no anchor
/// (review 43 had it taken for revoked by mistake, and refused a file holding only it: now
/// said for what it is); a readable CA beside it is unaffected.
#[tokio::test]
async fn a_client_ca_certificate_whose_revocation_cannot_be_read_is_no_anchor() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let old = root.intermediate_from("old issuing ca", 41, Some(1960));
    let kept = root.intermediate("kept issuing ca", 42);
    let client_ca = root.pem() + &old.pem() + &kept.pem();
    let lists = root.crl(1, &[41]) + &old.crl(1, &[]) + &kept.crl(1, &[]);
    let (_certs, _crl_file, proxy) = mtls_proxy(upstream.addr, &ca, &client_ca, &lists).await;
    let minted = old.issue_serial("minted", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let honest = kept.issue_serial("honest", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let got = get_as(&ca, &minted, proxy.addr, "/m/old").await;
    assert!(got.is_err(), "a client of the revoked old CA: {got:?}");
    let got = get_as(&ca, &honest, proxy.addr, "/m/old")
        .await
        .expect("a client of a CA not revoked");
    assert_eq!(got.status, StatusCode::OK);
    proxy.shutdown().await;
}

/// Review 45: a reload whose file no longer has an issuer's list (a write cut between two
/// lists, a bundle job that lost a file) lifted that list's revocations: a CA of
/// `client_ca` its root revoked was an anchor again, and its clients got in. The list in
/// force stays for an issuer the file lost, as for one whose list goes back in time.
#[tokio::test]
async fn a_reload_that_loses_an_issuers_list_keeps_the_one_in_force() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let issuing = root.intermediate("issuing ca", 40);
    let (mut certs, crl_file, proxy) = mtls_proxy(
        upstream.addr,
        &ca,
        &(root.pem() + &issuing.pem()),
        &(root.crl(1, &[40]) + &issuing.crl(1, &[])),
    )
    .await;
    let client = issuing.issue_serial("client", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let get = || get_as(&ca, &client, proxy.addr, "/m/lost");
    assert!(get().await.is_err());
    // The root's list lost, with a new certificate in the same step (seen served: the
    // step was taken).
    let next = ca.server("keyward-b");
    std::fs::write(&crl_file, issuing.crl(2, &[])).unwrap();
    certs.publish(&next.cert_pem, &next.key_pem);
    // A TLS 1.3 client has the server's certificate before its own is judged.
    eventually("the new certificate served", || async {
        let c = connector(&ca, &[], Some(&client));
        let tls = handshake(&c, proxy.addr).await.ok();
        tls.map(|tls| peer_cert(&tls)) == Some(next.der.clone())
    })
    .await;
    let got = get().await;
    assert!(got.is_err(), "the revoked CA's client let in: {got:?}");
    proxy.shutdown().await;
}

/// With lists, an issuing CA of `client_ca` is an anchor, whose revocation rustls never
/// checks: only its root's list can take it out. Without that list, start and `keyward
/// check` refuse the files, naming the field and the certificate; with it, both pass.
#[tokio::test]
async fn start_and_check_refuse_an_issuing_ca_without_a_list_of_its_root() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let issuing = root.intermediate("issuing ca", 40);
    let (_certs, crl_file, yaml) =
        mtls_files(&ca, &(root.pem() + &issuing.pem()), &issuing.crl(1, &[]));
    let said = "client_ca certificate CN=issuing ca is issued by CN=client root, which has no list in tls.client_crl: its revocation cannot be checked";
    let e = match try_spawn_proxy(upstream.addr, &yaml).await {
        Ok(proxy) => {
            proxy.shutdown().await;
            panic!("started without the root's list");
        }
        Err(e) => e,
    };
    assert!(e.starts_with("tls.client_crl: ") && e.contains(said), "{e}");
    let e = keyward_check(upstream.addr, &yaml).expect_err("keyward check refuses");
    assert!(e.contains("tls.client_crl: ") && e.contains(said), "{e}");

    std::fs::write(&crl_file, root.crl(1, &[]) + &issuing.crl(1, &[])).unwrap();
    keyward_check(upstream.addr, &yaml).expect("with the root's list");
    let proxy = try_spawn_proxy(upstream.addr, &yaml)
        .await
        .expect("with the root's list");
    proxy.shutdown().await;
}

/// A restart with the same files as a reload that lost the root's list (see
/// `a_reload_that_loses_an_issuers_list_keeps_the_one_in_force`) had no list in force: the
/// issuing CA the root revoked was an anchor again, and its clients got in. Start is
/// refused now.
#[tokio::test]
async fn a_restart_that_lost_the_roots_list_lets_no_client_of_the_ca_it_revoked_in() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let issuing = root.intermediate("issuing ca", 40);
    let (_certs, crl_file, yaml) = mtls_files(
        &ca,
        &(root.pem() + &issuing.pem()),
        &(root.crl(1, &[40]) + &issuing.crl(1, &[])),
    );
    let client = issuing.issue_serial("client", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let get = |addr| get_as(&ca, &client, addr, "/m/restart");
    let proxy = try_spawn_proxy(upstream.addr, &yaml)
        .await
        .expect("first start");
    assert!(get(proxy.addr).await.is_err());
    proxy.shutdown().await;

    std::fs::write(&crl_file, issuing.crl(2, &[])).unwrap();
    match try_spawn_proxy(upstream.addr, &yaml).await {
        Ok(proxy) => {
            let got = get(proxy.addr).await;
            proxy.shutdown().await;
            panic!("restarted without the root's list; the revoked CA's client: {got:?}");
        }
        Err(e) => assert!(
            e.starts_with("tls.client_crl: ") && e.contains("CN=issuing ca"),
            "{e}"
        ),
    }
    assert_eq!(
        upstream.count(),
        0,
        "no client of the revoked CA got through"
    );
}

/// A reload that brings an issuing CA whose issuer has no list, in the file or in force, is
/// refused whole: the verifier in force stays (its clients get in, the new CA's do not).
/// Before, the CA was taken as an anchor, and its clients got in whatever its root said.
#[tokio::test]
async fn a_reload_bringing_an_issuing_ca_without_a_list_of_its_issuer_is_refused() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let other_root = Ca::new("other root");
    let issuing = other_root.intermediate("unlisted issuing ca", 50);
    let (mut certs, _crl_file, proxy) = mtls_proxy(
        upstream.addr,
        &ca,
        &root.pem(),
        &(root.crl(1, &[]) + &issuing.crl(1, &[])),
    )
    .await;
    let known = root.issue_serial("known", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let newcomer = issuing.issue_serial("newcomer", ExtendedKeyUsagePurpose::ClientAuth, Some(9));
    let get_with = |leaf: &Leaf| get_as(&ca, leaf, proxy.addr, "/m/unlisted");
    assert!(get_with(&known).await.is_ok());
    assert!(get_with(&newcomer).await.is_err());
    // The CA goes into client_ca without its root's list, with a new certificate in the
    // same step (seen served: the step was taken).
    certs.write_ca(&(root.pem() + &issuing.pem()));
    let next = ca.server("keyward-b");
    certs.publish(&next.cert_pem, &next.key_pem);
    let c = connector(&ca, &[], Some(&known));
    eventually_served("the new certificate served", &c, proxy.addr, &next.der).await;
    let got = get_with(&newcomer).await;
    assert!(got.is_err(), "the unlistable CA's client let in: {got:?}");
    assert!(get_with(&known).await.is_ok(), "the verifier in force kept");
    proxy.shutdown().await;
}

/// With `client_ca`, no session is resumed (TLS 1.2 session ids, TLS 1.3 tickets): a resumed
/// session is not verified again, and let a client certificate in after its `notAfter`.
/// Without client certificates, sessions are resumed as before.
#[tokio::test]
async fn with_client_certificates_no_session_is_resumed() {
    use rustls::HandshakeKind;
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let client_ca = Ca::new("client ca");
    let certs = CertDir::new(&ca.server("keyward-a"));
    let ca_file = certs.write_ca(&client_ca.pem());
    let plain = spawn_proxy(upstream.addr, &certs.yaml(None)).await;
    let mtls = spawn_proxy(upstream.addr, &certs.yaml(Some(&ca_file))).await;
    let good = client_ca.client("ci-bot");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        // One client config per listener: it keeps the sessions it is given, as clients do.
        let client = |cert: Option<&Leaf>| {
            TlsConnector::from(Arc::new(client_config(&ca, &[version], cert, &[])))
        };
        // Two connections; the kind of the second handshake. The first answer is read whole,
        // so a TLS 1.3 ticket sent before it has been taken.
        let twice = |connector: TlsConnector, addr| async move {
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let mut tls = handshake(&connector, addr).await.expect("TLS handshake");
                assert!(one_request(&mut tls).await.starts_with("HTTP/1.1 200"));
                kinds.push(tls.get_ref().1.handshake_kind());
            }
            kinds
        };
        let kinds = twice(client(None), plain.addr).await;
        assert_eq!(
            kinds,
            [Some(HandshakeKind::Full), Some(HandshakeKind::Resumed)],
            "{version:?} without client certificates: resumed"
        );
        let kinds = twice(client(Some(&good)), mtls.addr).await;
        assert_eq!(
            kinds,
            [Some(HandshakeKind::Full), Some(HandshakeKind::Full)],
            "{version:?} with client certificates: full every time"
        );
    }

    // Past its `notAfter`, a certificate is refused though its client holds sessions.
    let expiring = client_ca.client_valid_for("ci-bot", Duration::from_secs(4));
    let expires = std::time::Instant::now() + Duration::from_secs(4);
    let connector = connector(&ca, &[], Some(&expiring));
    let mut tls = handshake(&connector, mtls.addr).await.expect("still valid");
    assert!(one_request(&mut tls).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep_until((expires + Duration::from_millis(1500)).into()).await;
    let got = try_get(&connector, mtls.addr, "/m/expired").await;
    assert!(got.is_err(), "expired client certificate: {got:?}");
    plain.shutdown().await;
    mtls.shutdown().await;
}

/// `tls` (and `client_ca`) hold on the decision listener too: only a front proxy with a
/// client certificate can ask, and a decision never crosses the network in the clear.
#[tokio::test]
async fn the_decision_listener_is_served_over_tls_with_client_certificates() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let client_ca = Ca::new("client ca");
    let certs = CertDir::new(&ca.server("keyward-a"));
    let ca_file = certs.write_ca(&client_ca.pem());
    let (_dir, keys_file) = demo_keys_dir();
    let config = support::config::ConfigBuilder::new(upstream.addr, &keys_file)
        .extra(&certs.yaml(Some(&ca_file)))
        .set("decision", "{ listen: 127.0.0.1:0 }")
        .config();
    let server = keyward::Keyward::bind(config).await.expect("keyward binds");
    let addr = server.decision_addr().expect("a decision listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let ask = || {
        Request::get("/v1/decide/auth-request")
            .header("host", "localhost")
            .header("authorization", format!("Bearer {SERVICE_KEY}"))
            .header("x-original-method", "GET")
            .header("x-original-uri", "/v1/x")
            .body(Empty::new())
            .unwrap()
    };
    let plain = raw(
        addr,
        b"GET /v1/decide/auth-request HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(
        !plain.starts_with("HTTP/1.1"),
        "answered in the clear: {plain}"
    );
    let no_cert = try_send(&connector(&ca, &[], None), addr, ask()).await;
    assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");
    let good = client_ca.client("front-proxy");
    let got = try_send(&connector(&ca, &[], Some(&good)), addr, ask())
        .await
        .expect("the front proxy's certificate is accepted");
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert!(got.headers.contains_key("x-auth-subject-id"));
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let ca = Ca::new("test ca");
    let extra = "limits: { header_read_timeout: 200ms }\n";
    let (_upstream, _certs, proxy) = tls_proxy(&ca.server("keyward-a"), extra).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "connection still open: {closed:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_certificate_path_fails_bind_naming_the_field() {
    let (dir, keys) = demo_keys_dir();
    let missing = dir.path().join("missing.crt");
    let extra = format!(
        "tls: {{ cert: {}, key: {} }}\n",
        missing.display(),
        dir.path().join("missing.key").display()
    );
    let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let config = keyward::config::Config::from_yaml(&config_yaml(upstream, &keys, &extra))
        .expect("the config itself is valid");
    let err = match keyward::Keyward::bind(config).await {
        Ok(_) => panic!("bind succeeded without a certificate"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("tls.cert: "), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");

    // A key that does not belong to the certificate names tls.key.
    let ca = Ca::new("test ca");
    let (a, b) = (ca.server("a"), ca.server("b"));
    std::fs::write(dir.path().join("a.crt"), &a.cert_pem).unwrap();
    std::fs::write(dir.path().join("b.key"), &b.key_pem).unwrap();
    let extra = format!(
        "tls: {{ cert: {}, key: {} }}\n",
        dir.path().join("a.crt").display(),
        dir.path().join("b.key").display()
    );
    let config = keyward::config::Config::from_yaml(&config_yaml(upstream, &keys, &extra)).unwrap();
    let err = match keyward::Keyward::bind(config).await {
        Ok(_) => panic!("bind succeeded with a mismatched key"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("tls.key: "), "{err}");
}

/// Send one authenticated GET on `tls` and read its whole answer.
async fn one_request(tls: &mut TlsStream<TcpStream>) -> String {
    use tokio::io::AsyncWriteExt;
    let req = format!(
        "GET /tls/idle HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {SERVICE_KEY}\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    read_response(tls).await
}

/// A keep-alive connection keyward closes between requests, at its idle timeout or when it
/// drains, ends with a TLS `close_notify`, as hyper's server ends it: a client reading it
/// sees a clean end of stream, not a truncation (rustls: `UnexpectedEof`).
#[tokio::test]
async fn an_idle_tls_connection_is_closed_with_close_notify() {
    let ca = Ca::new("test ca");
    let connector = connector(&ca, &[b"http/1.1"], None);
    let extra = "limits: { idle_timeout: 300ms }\nshutdown: { drain_delay: 0s, grace: 2s }\n";
    let (_upstream, _certs, proxy) = tls_proxy(&ca.server("keyward-a"), extra).await;

    // Idle timeout.
    let mut tls = handshake(&connector, proxy.addr).await.unwrap();
    assert!(one_request(&mut tls).await.starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0))),
        "idle close: {end:?} after {rest:?}"
    );

    // Drain.
    let mut tls = handshake(&connector, proxy.addr).await.unwrap();
    assert!(one_request(&mut tls).await.starts_with("HTTP/1.1 200"));
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest))
            .await
            .map(|r| r.map_err(|e| e.kind()))
    });
    proxy.shutdown().await;
    let end = reader.await.unwrap();
    assert!(matches!(end, Ok(Ok(0))), "drain close: {end:?}");
}

/// A client presenting `leaf` with `chain` after it, trusting `ca` for the server.
fn chain_connector(ca: &Ca, leaf: &Leaf, chain: &[&Ca]) -> TlsConnector {
    let config = client_config(ca, rustls::DEFAULT_VERSIONS, Some(leaf), chain);
    TlsConnector::from(Arc::new(config))
}

/// Review 51: keyward set no bound of its own on the chain a client sends, and webpki
/// spent ~150 ms of CPU on a crafted one before giving up. A client sending more
/// intermediates than `tls.client_verify_depth` (default 4) is refused, even when its
/// path is short; a real 4-level hierarchy (leaf, 4 issuing CAs, the root in `client_ca`)
/// is let in at the default, and one of 2 intermediates at `client_verify_depth: 2` (not
/// one of 3). Before, webpki alone bounded the path (6 intermediates), never what was sent.
#[tokio::test]
async fn a_client_chain_past_client_verify_depth_is_refused_and_one_at_it_is_let_in() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let i1 = root.intermediate("issuing 1", 11);
    let i2 = i1.intermediate("issuing 2", 12);
    let i3 = i2.intermediate("issuing 3", 13);
    let i4 = i3.intermediate("issuing 4", 14);
    let i5 = i4.intermediate("issuing 5", 15);
    let certs = CertDir::new(&ca.server("keyward-a"));
    let ca_file = certs.write_ca(&root.pem());
    let proxy = spawn_proxy(upstream.addr, &certs.yaml(Some(&ca_file))).await;
    let get = |leaf: &Leaf, chain: &[&Ca], addr| {
        let c = chain_connector(&ca, leaf, chain);
        async move { try_get(&c, addr, "/m/depth").await }
    };
    let at = i4.client("at the bound");
    let got = get(&at, &[&i4, &i3, &i2, &i1], proxy.addr)
        .await
        .expect("4 intermediates at the default bound");
    assert_eq!(got.status, StatusCode::OK);
    let past = i5.client("past the bound");
    let got = get(&past, &[&i5, &i4, &i3, &i2, &i1], proxy.addr).await;
    assert!(got.is_err(), "5 intermediates: {got:?}");
    // The intermediates sent count, not the length of the path built from them.
    let short = i2.client("short path");
    let ok = get(&short, &[&i2, &i1], proxy.addr).await.expect("2 sent");
    assert_eq!(ok.status, StatusCode::OK);
    let got = get(&short, &[&i2, &i1, &i3, &i4, &i5], proxy.addr).await;
    assert!(got.is_err(), "5 sent for a path of 2: {got:?}");
    proxy.shutdown().await;

    let yaml = certs
        .yaml(Some(&ca_file))
        .replace("poll_interval", "client_verify_depth: 2, poll_interval");
    let two = spawn_proxy(upstream.addr, &yaml).await;
    let got = get(&short, &[&i2, &i1], two.addr).await.expect("2 of 2");
    assert_eq!(got.status, StatusCode::OK);
    let three = i3.client("three");
    let got = get(&three, &[&i3, &i2, &i1], two.addr).await;
    assert!(
        got.is_err(),
        "3 intermediates at client_verify_depth 2: {got:?}"
    );
    two.shutdown().await;
    assert_eq!(
        upstream.count(),
        3,
        "only the chains within the bound got through"
    );
}

/// Review 51: two certificates of a client's chain with one subject let webpki try every
/// ordering of them (64 CA certificates named `CN=X` cost ~150 ms a handshake, with no
/// valid certificate). Refused, with `client_crl` as without: with unique subjects each
/// issuer name picks at most one certificate, and path building is linear. The same chain
/// without the twin is let in.
#[tokio::test]
async fn a_client_chain_with_two_certificates_of_one_subject_is_refused() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let root = Ca::new("client root");
    let issuing = root.intermediate("issuing ca", 21);
    let twin = root.intermediate("issuing ca", 22);
    let lists = root.crl(1, &[]) + &issuing.crl(1, &[]);
    let (_certs, _crl, proxy) = mtls_proxy(upstream.addr, &ca, &root.pem(), &lists).await;
    let leaf = issuing.client("ci-bot");
    let get = |chain: &[&Ca]| {
        let c = chain_connector(&ca, &leaf, chain);
        async move { try_get(&c, proxy.addr, "/m/twin").await }
    };
    let got = get(&[&issuing]).await.expect("a chain of unique subjects");
    assert_eq!(got.status, StatusCode::OK);
    for chain in [[&issuing, &twin], [&twin, &issuing]] {
        let got = get(&chain).await;
        assert!(got.is_err(), "two intermediates named alike: {got:?}");
    }
    // An intermediate named as the client's own certificate.
    let named_as_leaf = root.intermediate("ci-bot", 23);
    let got = get(&[&issuing, &named_as_leaf]).await;
    assert!(got.is_err(), "an intermediate named as the leaf: {got:?}");
    proxy.shutdown().await;
    assert_eq!(upstream.count(), 1);
}

/// `tls.client_verify_depth` outside 1..=8 stops `keyward run` and `keyward check`, naming
/// it.
#[tokio::test]
async fn start_and_check_refuse_a_client_verify_depth_out_of_range() {
    let upstream = spawn_upstream().await;
    let ca = Ca::new("test ca");
    let certs = CertDir::new(&ca.server("keyward-a"));
    let ca_file = certs.write_ca(&Ca::new("client ca").pem());
    let (dir, keys_file) = demo_keys_dir();
    for depth in ["0", "9"] {
        let yaml = certs.yaml(Some(&ca_file)).replace(
            "poll_interval",
            &format!("client_verify_depth: {depth}, poll_interval"),
        );
        let e = keyward_check(upstream.addr, &yaml).unwrap_err();
        assert!(e.contains("tls.client_verify_depth: must be 1 to 8"), "{e}");
        let config = dir.path().join("keyward.yaml");
        std::fs::write(&config, config_yaml(upstream.addr, &keys_file, &yaml)).unwrap();
        let mut run = support::child::command(&["run", "--config", config.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while run.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                run.kill().unwrap();
                panic!("keyward run started with client_verify_depth {depth}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut e = String::new();
        std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut e).unwrap();
        assert!(!run.wait().unwrap().success());
        assert!(e.contains("tls.client_verify_depth: must be 1 to 8"), "{e}");
    }
}
