//! `limits` and `shutdown`: timeouts, sizes and counts, and how a drain goes.

use std::time::Duration;

use serde::Deserialize;

use super::error::{invalid, ConfigError};
use super::yaml::{de_duration, de_opt_duration};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// How long a connection that has served a request may sit with none in flight.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub upstream_connect_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub upstream_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_connections: usize,
    /// Requests in flight at once, each HTTP/2 stream counted, over all connections: each
    /// one bound for the upstream holds an upstream connection (a file descriptor) until its
    /// response ends, and HTTP/2 multiplies them past `max_connections`. Past it, a request
    /// bound for the upstream is answered 502 at once (Envoy's circuit breaker).
    pub max_in_flight: usize,
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams the process may hold at once over all its connections, answered or
    /// not. Each connection is granted its share when it opens: `h2_max_concurrent_streams`
    /// while the budget has it, fewer (64, 16, 4, 1) as it runs low, and at least one. A
    /// stream costs memory until its answer is written, whoever answered it (about 12 KB a
    /// refused one, up to about 48 KB one in flight to a client that does not read), and
    /// `max_connections` times `h2_max_concurrent_streams` was 262,144 of them by default.
    pub h2_max_streams: usize,
    /// What an HTTP/2 client may send on a stream, and on a connection, ahead of keyward
    /// reading it (flow-control windows, bytes): buffered here, so the connection's is the
    /// memory a client can park on each connection; a stream's bounds an upload's rate to
    /// it per round trip (256 KiB over 20 ms is 12.8 MB/s). Envoy's
    /// `initial_stream_window_size` / `initial_connection_window_size`.
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    #[serde(deserialize_with = "de_duration")]
    pub upstream_idle_timeout: Duration,
    pub upstream_max_idle_per_host: usize,
    /// How long a response may wait for the client to take its next bytes (HTTP/2 flow
    /// control window, or an unread HTTP/1.1 socket) before it is cut off.
    #[serde(deserialize_with = "de_duration")]
    pub write_stall_timeout: Duration,
    /// How long a request body on its way upstream may go without a byte from the client
    /// before the exchange is cut off (nginx's `client_body_timeout`): a body that never
    /// comes would otherwise hold an upstream connection, and a `max_in_flight` slot, for as
    /// long as its client stays connected.
    #[serde(deserialize_with = "de_duration")]
    pub body_stall_timeout: Duration,
    /// The least average rate, in bytes per second, a request body on its way upstream must
    /// keep after its first `body_stall_timeout` (Apache's `mod_reqtimeout` `MinRate`): a
    /// byte now and then resets the stall bound, so without it a body trickled to a public
    /// route holds its upstream connection and `max_in_flight` slot for good. 0: no bound
    /// (long-lived streaming uploads, such as gRPC client streams that send little).
    pub body_min_rate: u64,
    /// How long an upgraded (WebSocket) tunnel may move no byte either way before it is
    /// closed.
    #[serde(deserialize_with = "de_duration")]
    pub tunnel_idle_timeout: Duration,
    /// How long a client connection may live before it is closed gracefully (HTTP/2
    /// GOAWAY; HTTP/1.1 after its response in flight): what changed since its handshake (a
    /// CA removed from `client_ca`, a rotated certificate) then reaches every client, and
    /// connections spread again over replicas that scaled out. None: no bound (Envoy's
    /// `max_connection_duration`).
    #[serde(deserialize_with = "de_opt_duration")]
    pub max_connection_age: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            // nginx's keepalive_timeout: longer than the 60 s idle timeout of common load
            // balancers, so the client side closes first.
            idle_timeout: Duration::from_secs(75),
            upstream_connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            max_in_flight: 4096,
            h2_max_concurrent_streams: 256,
            h2_max_streams: 4096,
            h2_stream_window: 256 * 1024,
            h2_connection_window: 1024 * 1024,
            upstream_idle_timeout: Duration::from_secs(60),
            upstream_max_idle_per_host: 1024,
            write_stall_timeout: Duration::from_secs(30),
            body_stall_timeout: Duration::from_secs(30),
            body_min_rate: 500,
            tunnel_idle_timeout: Duration::from_secs(3600),
            max_connection_age: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    #[serde(deserialize_with = "de_duration")]
    pub drain_delay: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub grace: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            grace: Duration::from_secs(30),
        }
    }
}

/// The most header fields `limits.max_headers` may allow (a head of `max_header_bytes`
/// holds fewer in practice).
const MAX_HEADERS: usize = 10_000;
/// The most bytes `limits.max_header_bytes` may allow (Envoy's ceiling).
const MAX_HEADER_BYTES: usize = 8 * 1024 * 1024;
/// The most `max_connections`, `max_in_flight` and the HTTP/2 stream counts may allow: a
/// million is past what one process serves; a count of `usize::MAX` is no limit at all
/// and sizes nothing well.
const MAX_COUNT: usize = 1_000_000;
/// The fewest: `Host`, a credential, and what clients send with them (`User-Agent`,
/// `Accept`, a content type, a correlation id).
const MIN_HEADERS: usize = 8;

impl Limits {
    /// Zero durations and counts, and a header budget too small for any request.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let l = self;
        let durations = [
            ("limits.header_read_timeout", l.header_read_timeout),
            ("limits.idle_timeout", l.idle_timeout),
            (
                "limits.upstream_connect_timeout",
                l.upstream_connect_timeout,
            ),
            ("limits.upstream_timeout", l.upstream_timeout),
            ("limits.write_stall_timeout", l.write_stall_timeout),
            ("limits.body_stall_timeout", l.body_stall_timeout),
            ("limits.tunnel_idle_timeout", l.tunnel_idle_timeout),
            (
                "limits.max_connection_age",
                l.max_connection_age.unwrap_or(Duration::MAX),
            ),
        ];
        for (field, d) in durations {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        // Envoy's ceiling for a request head is 8 MiB, nginx's buffers a few KiB: a head of
        // `usize::MAX` bytes was read whole (3 MB of one header answered 401, not 431).
        if !(1024..=MAX_HEADER_BYTES).contains(&l.max_header_bytes) {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be from 1024 to 8388608 (8 MiB)",
            ));
        }
        let counts = [
            ("limits.max_headers", l.max_headers, usize::MAX),
            ("limits.max_connections", l.max_connections, MAX_COUNT),
            ("limits.max_in_flight", l.max_in_flight, MAX_COUNT),
            ("limits.h2_max_streams", l.h2_max_streams, MAX_COUNT),
            (
                "limits.h2_max_concurrent_streams",
                l.h2_max_concurrent_streams as usize,
                MAX_COUNT,
            ),
        ];
        for (field, n, most) in counts {
            if n == 0 {
                return Err(invalid(field, "must be greater than zero"));
            }
            if n > most {
                return Err(invalid(field, "must be at most 1000000"));
            }
        }
        // hyper sizes its header list by it: `usize::MAX` overflowed on the first body. And
        // a keyed request has `Host` and its credential at least, a client's a few more: 1
        // answered 431 to every keyed request, from a config `check` called valid.
        if !(MIN_HEADERS..=MAX_HEADERS).contains(&l.max_headers) {
            return Err(invalid("limits.max_headers", "must be from 8 to 10000"));
        }
        // RFC 9113 6.9.2: from 65,535 (the protocol's initial window) to 2^31 - 1.
        let windows = [
            ("limits.h2_stream_window", l.h2_stream_window),
            ("limits.h2_connection_window", l.h2_connection_window),
        ];
        for (field, w) in windows {
            if !(65_535..=0x7fff_ffff).contains(&w) {
                return Err(invalid(field, "must be from 65535 to 2147483647"));
            }
        }
        if l.h2_connection_window < l.h2_stream_window {
            return Err(invalid(
                "limits.h2_connection_window",
                "must be at least limits.h2_stream_window",
            ));
        }
        Ok(())
    }
}
