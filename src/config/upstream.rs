//! `upstream`: the app behind keyward, an `http://host:port` URL or `unix:/abs/path.sock`.
//!
//! A Unix socket upstream lets the app listen on a socket file that only keyward (and the
//! app) can open, so nothing in the pod can reach the app around keyward, and it saves the
//! TCP loopback work. The socket need not exist at start: the app may come up later.

use std::fmt;
use std::path::{Path, PathBuf};

use http::uri::Authority;
use http::Uri;
use serde::Deserialize;

use super::error::{invalid, ConfigError};

/// Longest socket path `connect(2)` takes: `sun_path` is 108 bytes on Linux with the NUL.
pub const MAX_UNIX_PATH: usize = 107;

/// `upstream_client`: the HTTP/1.1 client for requests without a body (requests with one,
/// and upgrades, always go through hyper's). `fast`, the default, is keyward's own client
/// (`proxy::h1`): same framing rules as hyper's, less work per request. `hyper` is there to
/// compare against and to fall back to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamClient {
    #[default]
    Fast,
    Hyper,
}

/// `http1_server`: what reads HTTP/1.1 requests on the listeners. `fast`, the default, is
/// keyward's own server (`proxy::h1::server`) for requests without a body and without a
/// header hyper's server interprets, handing the connection to hyper's at the first other
/// request; `hyper` is hyper's server throughout, to compare against and to fall back to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http1Server {
    #[default]
    Fast,
    Hyper,
}

/// Where the upstream listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    /// `http://host:port`, checked by `Config::validate`.
    Http(Uri),
    /// `unix:/abs/path/app.sock`.
    Unix(PathBuf),
}

impl UpstreamAddr {
    /// The `host:port` of an `http://` upstream; `None` for a Unix socket.
    pub fn authority(&self) -> Option<&Authority> {
        match self {
            UpstreamAddr::Http(u) => u.authority(),
            UpstreamAddr::Unix(_) => None,
        }
    }

    /// The socket file of a `unix:` upstream.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            UpstreamAddr::Http(_) => None,
            UpstreamAddr::Unix(p) => Some(p),
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(path) => Ok(UpstreamAddr::Unix(PathBuf::from(path))),
            None => s
                .parse::<Uri>()
                .map(UpstreamAddr::Http)
                .map_err(|e| format!("{s:?} is not a URL ({e})")),
        }
    }
}

/// Scheme, host and port, or `unix:` and the path: never userinfo (validation refuses it,
/// and this is what logs show).
impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddr::Http(u) => match u.authority() {
                Some(a) => match a.port_u16() {
                    Some(port) => write!(f, "http://{}:{port}", a.host()),
                    None => write!(f, "http://{}", a.host()),
                },
                None => f.write_str("http://"),
            },
            UpstreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A `unix:` upstream names an absolute socket path `connect(2)` can take.
pub(super) fn validate_unix_path(path: &Path) -> Result<(), ConfigError> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if !path.is_absolute() {
        return Err(invalid(
            "upstream",
            "a unix: upstream needs an absolute socket path, like unix:/run/app/app.sock",
        ));
    }
    if bytes.contains(&0) {
        return Err(invalid("upstream", "the socket path must not contain NUL"));
    }
    if bytes.len() > MAX_UNIX_PATH {
        return Err(invalid(
            "upstream",
            format!(
                "the socket path is {} bytes; a Unix socket path holds at most {MAX_UNIX_PATH}",
                bytes.len()
            ),
        ));
    }
    if bytes.ends_with(b"/") {
        return Err(invalid(
            "upstream",
            "the socket path names a directory, not a socket file",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_displays_without_userinfo() {
        let u = UpstreamAddr::parse("unix:/run/app/app.sock").unwrap();
        assert_eq!(u.unix_path(), Some(Path::new("/run/app/app.sock")));
        assert!(u.authority().is_none());
        assert_eq!(u.to_string(), "unix:/run/app/app.sock");
        let u = UpstreamAddr::parse("http://127.0.0.1:3000").unwrap();
        assert_eq!(u.authority().unwrap().as_str(), "127.0.0.1:3000");
        assert_eq!(u.to_string(), "http://127.0.0.1:3000");
        let u = UpstreamAddr::parse("http://user:pw@app").unwrap();
        assert_eq!(u.to_string(), "http://app");
        assert!(UpstreamAddr::parse("http://a b").is_err());
    }

    #[test]
    fn unix_paths_must_be_absolute_socket_files_that_fit() {
        assert!(validate_unix_path(Path::new("/run/app.sock")).is_ok());
        let long = format!("/{}", "a".repeat(MAX_UNIX_PATH));
        for bad in [
            "",
            "app.sock",
            "./app.sock",
            "/run/app/",
            "/run/a\0b",
            &long,
        ] {
            let e = validate_unix_path(Path::new(bad)).unwrap_err().to_string();
            assert!(e.starts_with("upstream: "), "{bad:?}: {e}");
        }
        let fits = format!("/{}", "a".repeat(MAX_UNIX_PATH - 1));
        assert!(validate_unix_path(Path::new(&fits)).is_ok());
    }
}
