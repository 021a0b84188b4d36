//! Where the upstream listens (a TCP `host:port` or a Unix socket file) and how a new
//! connection to it is opened. The pool drives either stream with the same HTTP/1.1 client.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use tokio::net::TcpStream;

use crate::config::UpstreamAddr;

/// The upstream's address, as a connection is opened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    /// `host:port`, resolved on every new connection (a DNS change is picked up).
    Tcp(String),
    /// A socket file; it may appear after start (the app may start later).
    Unix(PathBuf),
}

/// A newly opened connection to the upstream.
pub enum UpstreamStream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

/// One stream type for the fast path's connection, whichever kind it is.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            UpstreamStream::Tcp($s) => $e,
            #[cfg(unix)]
            UpstreamStream::Unix($s) => $e,
        }
    };
}

impl UpstreamStream {
    /// Acknowledge at once what was read (`TCP_QUICKACK`), as a connection goes back to the
    /// pool. An app that writes a second answer to one request (an error page after a
    /// response already sent) with Nagle on its socket (the default) has it held until its
    /// first answer is acknowledged, and a delayed acknowledgement rode on keyward's next
    /// request: the held answer then arrived as that request's, another client's, in two
    /// exchanges of three. Acknowledged now, it arrives within a round trip, while the
    /// connection is idle, where [`Self::idle_and_open`] finds it.
    pub fn acknowledge(&self) {
        #[cfg(target_os = "linux")]
        if let Self::Tcp(s) = self {
            let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
        }
    }

    /// Shut the connection down from outside the task that drives it: its reads end and
    /// its writes fail, so hyper gives the connection up, and with it the request body it
    /// held (an upload the app stopped reading; see [`super::upload::watch_stall`]).
    pub fn abort(&self) {
        let _ = each!(self, s => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Both));
    }

    /// [`Self::abort`] the stream `weak` watches, if it is still open.
    pub fn abort_watched(weak: &std::sync::Weak<Self>) {
        if let Some(stream) = weak.upgrade() {
            stream.abort();
        }
    }

    /// Is the idle connection still open, with nothing unasked-for to read? The kernel is
    /// asked (a non-blocking `MSG_PEEK` of one byte), not the reactor's cached readiness:
    /// on a busy worker the reactor may not have seen, for milliseconds, bytes already in
    /// the socket, and a connection reused with them answers the next request with them.
    /// One system call per reuse is the price (review: 227 of 4,000 responses crossed
    /// between clients at 50 concurrent clients when the cache was trusted).
    pub fn idle_and_open(&self) -> bool {
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let peeked = each!(self, s => socket2::SockRef::from(s).peek(&mut probe));
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl tokio::io::AsyncRead for UpstreamStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for UpstreamStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

/// The stream hyper's client drives, shared with the pool: the pool keeps a [`Weak`] to it,
/// so that it can probe a connection hyper owns before reusing it, as it does the fast
/// path's, and the connection still closes as soon as hyper lets it go. Reads and writes
/// go through the reactor's readiness as tokio's own stream's do.
pub struct SharedStream {
    stream: Arc<UpstreamStream>,
    /// `upstream_ack_at_once`: what is read is acknowledged at once
    /// ([`UpstreamStream::acknowledge`]). The fast path acknowledges as a connection goes
    /// back to the pool; hyper's connection is ready for the next request as soon as its
    /// task has read the answer's end, before anything of keyward's runs, so it is done
    /// after every read that brought bytes.
    ack_at_once: bool,
    /// The buffer each read goes through (emptied before the read returns).
    read: bytes::BytesMut,
}

impl SharedStream {
    pub fn new(stream: UpstreamStream, ack_at_once: bool) -> Self {
        Self {
            stream: Arc::new(stream),
            ack_at_once,
            read: bytes::BytesMut::new(),
        }
    }

    /// What the pool keeps: it does not hold the connection open.
    pub fn watch(&self) -> Weak<UpstreamStream> {
        Arc::downgrade(&self.stream)
    }
}

/// One readiness-then-try loop: `ready` waits for the reactor, `attempt` tries the system
/// call, and a `WouldBlock` (the readiness was stale; the attempt cleared it) waits again.
fn until_done<T>(
    cx: &mut Context<'_>,
    ready: impl Fn(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut attempt: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        std::task::ready!(ready(cx))?;
        match attempt() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

/// Most a read takes from the socket (hyper's own first read size).
const READ_AT_MOST: usize = 8 * 1024;

impl tokio::io::AsyncRead for SharedStream {
    /// Read into the stream's own buffer, whose room needs no zeroing (the caller's would,
    /// to be read into through a shared reference: that doubled the instructions of a
    /// request on this client), then hand over what was read: all of it, never more than
    /// the caller has room for, so nothing read waits here unseen by the pool's probe.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let SharedStream {
            stream,
            ack_at_once,
            read,
        } = self.get_mut();
        let stream = &**stream;
        let room = buf.remaining().min(READ_AT_MOST);
        read.clear();
        read.reserve(room);
        let got = until_done(
            cx,
            |cx| each!(stream, s => s.poll_read_ready(cx)),
            || each!(stream, s => s.try_read_buf(&mut bytes::BufMut::limit(&mut *read, room))),
        );
        let n = std::task::ready!(got)?;
        if n > 0 && *ack_at_once {
            stream.acknowledge();
        }
        buf.put_slice(&read[..n]);
        read.clear();
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = &*self.stream;
        until_done(
            cx,
            |cx| each!(stream, s => s.poll_write_ready(cx)),
            || each!(stream, s => s.try_write(buf)),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stream = &*self.stream;
        until_done(
            cx,
            |cx| each!(stream, s => s.poll_write_ready(cx)),
            || each!(stream, s => s.try_write_vectored(bufs)),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// As tokio's streams do: the write side is shut at once.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let how = std::net::Shutdown::Write;
        Poll::Ready(each!(&*self.stream, s => socket2::SockRef::from(s).shutdown(how)))
    }
}

impl UpstreamTarget {
    /// From the validated `upstream`. Decision mode without a proxy listener has none: the
    /// target is then never connected to.
    pub fn from_config(addr: Option<&UpstreamAddr>) -> Self {
        match addr {
            Some(UpstreamAddr::Unix(path)) => UpstreamTarget::Unix(path.clone()),
            // `Config::validate` ensures an authority without userinfo; `host()` keeps the
            // brackets of an IPv6 literal, so this is always a `host:port` to resolve.
            Some(UpstreamAddr::Http(uri)) => UpstreamTarget::Tcp(format!(
                "{}:{}",
                uri.host().unwrap_or("127.0.0.1"),
                uri.port_u16().unwrap_or(80)
            )),
            None => UpstreamTarget::Tcp("127.0.0.1:80".into()),
        }
    }

    /// The `Host` sent when the client's request named none: the URL's authority, or
    /// `localhost` for a socket (it has no host name of its own).
    pub fn default_host(addr: Option<&UpstreamAddr>) -> HeaderValue {
        match addr {
            Some(UpstreamAddr::Unix(_)) => HeaderValue::from_static("localhost"),
            _ => addr
                .and_then(UpstreamAddr::authority)
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| HeaderValue::from_static("127.0.0.1")),
        }
    }

    /// Open a new connection: TCP with `TCP_NODELAY` and TCP keepalive, or the socket file.
    /// A TCP connection that reached one of `own` (keyward's bound listeners) is refused:
    /// a name or a numeric form validation cannot see through (`127.1`, a DNS name, the
    /// pod's own IP) would send every request back in, thousands of times over.
    pub async fn connect(&self, own: &[SocketAddr]) -> Result<UpstreamStream, ConnectError> {
        match self {
            UpstreamTarget::Tcp(authority) => {
                let stream = tcp_connect(authority).await?;
                refuse_own_listener(&stream, own)?;
                let _ = stream.set_nodelay(true);
                let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                Ok(UpstreamStream::Tcp(stream))
            }
            UpstreamTarget::Unix(path) => unix_connect(path).await,
        }
    }
}

#[cfg(unix)]
async fn unix_connect(path: &std::path::Path) -> Result<UpstreamStream, ConnectError> {
    tokio::net::UnixStream::connect(path)
        .await
        .map(UpstreamStream::Unix)
        .map_err(|source| ConnectError::ConnectUnix {
            path: path.to_owned(),
            source,
        })
}

#[cfg(not(unix))]
async fn unix_connect(path: &std::path::Path) -> Result<UpstreamStream, ConnectError> {
    Err(ConnectError::ConnectUnix {
        path: path.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::Unsupported),
    })
}

/// Is the connection's far end one of keyward's own listeners? A listener on a wildcard
/// address is reached through loopback or through any address of this host; a connection
/// to this host has its own address as both ends.
fn refuse_own_listener(stream: &TcpStream, own: &[SocketAddr]) -> Result<(), ConnectError> {
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return Ok(());
    };
    let (peer_ip, local_ip) = (peer.ip().to_canonical(), local.ip().to_canonical());
    let reached = |o: &SocketAddr| {
        let ip = o.ip().to_canonical();
        o.port() == peer.port()
            && (ip == peer_ip
                || ip.is_unspecified() && (peer_ip.is_loopback() || peer_ip == local_ip))
    };
    match own.iter().any(reached) {
        true => Err(ConnectError::OwnListener { addr: peer }),
        false => Ok(()),
    }
}

/// Try each resolved address in turn; the last failure is the one reported.
async fn tcp_connect(authority: &str) -> Result<TcpStream, ConnectError> {
    let addrs =
        tokio::net::lookup_host(authority)
            .await
            .map_err(|source| ConnectError::Resolve {
                authority: authority.to_owned(),
                source,
            })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(source) => last = Some(ConnectError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::NoAddress {
        authority: authority.to_owned(),
    }))
}

/// Why a new connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("resolving {authority}: {source}")]
    Resolve {
        authority: String,
        source: io::Error,
    },
    #[error("{authority} resolves to no address")]
    NoAddress { authority: String },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("{addr} is keyward's own listener: every request would loop back in")]
    OwnListener { addr: SocketAddr },
    #[error("connecting to unix:{}: {source}", path.display())]
    ConnectUnix { path: PathBuf, source: io::Error },
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("HTTP/1.1 handshake: {0}")]
    Handshake(hyper::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> UpstreamAddr {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn targets_and_default_hosts() {
        let at = |u: &str| UpstreamTarget::from_config(Some(&addr(u)));
        assert_eq!(
            at("http://127.0.0.1:3000"),
            UpstreamTarget::Tcp("127.0.0.1:3000".into())
        );
        assert_eq!(at("http://app"), UpstreamTarget::Tcp("app:80".into()));
        assert_eq!(
            at("http://[::1]:3000"),
            UpstreamTarget::Tcp("[::1]:3000".into())
        );
        assert_eq!(
            at("unix:/run/app.sock"),
            UpstreamTarget::Unix("/run/app.sock".into())
        );
        let host = |u: &str| UpstreamTarget::default_host(Some(&addr(u)));
        assert_eq!(host("http://app:3000"), "app:3000");
        assert_eq!(host("unix:/run/app.sock"), "localhost");
        assert_eq!(UpstreamTarget::default_host(None), "127.0.0.1");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let target = UpstreamTarget::Unix(path.clone());
        match target.connect(&[]).await {
            Err(ConnectError::ConnectUnix { path: p, .. }) => assert_eq!(p, path),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("connected to a missing socket"),
        }
    }
}
