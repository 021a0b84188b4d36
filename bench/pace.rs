//! An open-loop HTTP/1.1 load generator that fits on one core at the decision rate.
//!
//! Why not oha or wrk: oha needs about a core at 50k req/s and counts its own queueing as
//! latency; wrk has no open-loop mode (wrk2 is not packaged). `pace` sends request `n` at
//! exactly `start + n / rate`, spread round-robin over keep-alive connections, and measures
//! each latency from that scheduled instant (so a slow answer that delays the next send is
//! counted against the server, as wrk2 and oha's latency correction do).
//!
//! Pacing spins on the clock (`yield_now` between checks) rather than sleeping on tokio's
//! 1 ms timer wheel, which would send in bursts: run it on a core of its own (`taskset`).
//!
//! Usage: `pace ADDR PATH RATE SECONDS CONNECTIONS [HEADER: VALUE]...`
//! Prints one line: `achieved_rps p50_ms p99_ms p999_ms max_ms non2xx requests errors p99_send_lag_ms`
//! (the last says how late the generator itself sent: if it is near p99, the generator is
//! the bottleneck, not the server).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Plan {
    addr: SocketAddr,
    request: Vec<u8>,
    /// Seconds between two requests, all connections together.
    interval: f64,
    duration: Duration,
    connections: usize,
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    /// Microseconds from each request's scheduled instant to its whole answer.
    latencies: Vec<u32>,
    /// Microseconds each request left after its scheduled instant (the generator's own lag).
    lags: Vec<u32>,
    /// Scheduled instants (ms from the start) of the answers slower than 1 ms, for
    /// `PACE_SLOW=1`: when a server's slow answers cluster, something paused it.
    slow: Vec<u32>,
    non2xx: u64,
    errors: u64,
}

fn parse_args() -> Result<Plan, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, path, rate, secs, conns, headers @ ..] = args.as_slice() else {
        return Err("usage: pace ADDR PATH RATE SECONDS CONNECTIONS [HEADER: VALUE]...".into());
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("ADDR {addr}: {e}"))?;
    let rate: f64 = rate.parse().map_err(|e| format!("RATE {rate}: {e}"))?;
    let secs: f64 = secs.parse().map_err(|e| format!("SECONDS {secs}: {e}"))?;
    let connections: usize = conns
        .parse()
        .map_err(|e| format!("CONNECTIONS {conns}: {e}"))?;
    if rate <= 0.0 || secs <= 0.0 || connections == 0 {
        return Err("RATE, SECONDS and CONNECTIONS must be positive".into());
    }
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    Ok(Plan {
        addr,
        request: request.into_bytes(),
        interval: 1.0 / rate,
        duration: Duration::from_secs_f64(secs),
        connections,
    })
}

/// Reads one response with a `content-length` body; returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(buf) {
            let status = resp.code.unwrap_or(0);
            let length = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            if buf.len() >= head + length {
                buf.drain(..head + length);
                return Ok(status);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connection `index` sends requests `index`, `index + connections`, … on schedule.
async fn drive(plan: Rc<Plan>, index: usize, start: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut stream = match TcpStream::connect(plan.addr).await {
        Ok(s) => s,
        Err(_) => {
            tally.errors += 1;
            return tally;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut n = index;
    loop {
        let due = start + Duration::from_secs_f64(n as f64 * plan.interval);
        if due >= start + plan.duration {
            return tally;
        }
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
        tally.lags.push(micros(due.elapsed()));
        let answered = async {
            stream.write_all(&plan.request).await?;
            read_response(&mut stream, &mut buf).await
        };
        match answered.await {
            Ok(status) => {
                let latency = micros(due.elapsed());
                tally.latencies.push(latency);
                if latency > 1000 {
                    tally
                        .slow
                        .push(u32::try_from((due - start).as_millis()).unwrap_or(u32::MAX));
                }
                if !(200..300).contains(&status) {
                    tally.non2xx += 1;
                }
            }
            Err(_) => {
                tally.errors += 1;
                return tally;
            }
        }
        n += plan.connections;
    }
}

/// On stderr: how many answers slower than 1 ms were scheduled in each 100 ms window.
fn report_slow(tallies: &[Tally]) {
    let mut windows = std::collections::BTreeMap::<u32, u32>::new();
    for ms in tallies.iter().flat_map(|t| &t.slow) {
        *windows.entry(ms / 100).or_default() += 1;
    }
    for (w, n) in windows {
        eprintln!("{:>6} ms: {n} answers over 1 ms", w * 100);
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

fn main() -> Result<(), String> {
    let plan = Rc::new(parse_args()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let tallies = local.block_on(&rt, async {
        // Connections open before the clock starts, so connecting is not counted.
        let start = Instant::now() + Duration::from_millis(200);
        let tasks: Vec<_> = (0..plan.connections)
            .map(|i| tokio::task::spawn_local(drive(plan.clone(), i, start)))
            .collect();
        let mut tallies = Vec::new();
        for t in tasks {
            tallies.push(t.await.unwrap_or_default());
        }
        (tallies, start.elapsed())
    });
    let (tallies, elapsed) = tallies;
    let mut all: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latencies.iter().copied())
        .collect();
    all.sort_unstable();
    let mut lags: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.lags.iter().copied())
        .collect();
    lags.sort_unstable();
    if std::env::var_os("PACE_SLOW").is_some() {
        report_slow(&tallies);
    }
    let non2xx: u64 = tallies.iter().map(|t| t.non2xx).sum();
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    let secs = elapsed
        .as_secs_f64()
        .min(plan.duration.as_secs_f64())
        .max(1e-9);
    println!(
        "{:.0} {:.3} {:.3} {:.3} {:.3} {} {} {} {:.3}",
        all.len() as f64 / secs,
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        percentile(&all, 1.0),
        non2xx,
        all.len(),
        errors,
        percentile(&lags, 0.99),
    );
    Ok(())
}
