//! Open-loop load generator with coordinated-omission correction.
//!
//! Request `i` (counted over the whole run, warm-up included) has the intended send
//! time `start + i / rate`. Requests are dealt round-robin to the connections: connection
//! `c` of `N` owns requests `c, c + N, c + 2N, ...`, so each connection has its own
//! schedule share. Latency is measured from the *intended* send time to the end of the
//! response, so a connection that is still busy when its next request is due makes that
//! request late, and the lateness is counted. Samples whose intended time falls in the
//! warm-up are discarded. Requests are released by a pacer thread (see `pacer`), not
//! by tokio timers, whose millisecond granularity would add up to 2 ms to every sample.
//!
//! The run is bounded twice: no request is scheduled at or after `start + warmup +
//! duration`, and at most `max_requests` are scheduled in total. A request that takes
//! longer than `timeout` is an error. A connection that falls so far behind that it is
//! still sending after the hard deadline (`end + timeout`) gives up, and each measured
//! request it never sent counts as an error.

mod conn;
mod pacer;

use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{BenchError, Result};

/// Highest latency the histogram tracks (60 s); larger values are clamped.
pub const HIST_MAX_US: u64 = 60_000_000;

/// Protocol spoken on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// HTTP/1.1 keep-alive GET, one request at a time per connection.
    Http1,
    /// HTTP/2 with prior knowledge; requests multiplexed on each connection.
    Http2,
    /// gRPC unary echo calls over HTTP/2 prior knowledge (see [`crate::grpc`]),
    /// multiplexed like [`Mode::Http2`]; a non-zero or missing `grpc-status` is an error.
    Grpc,
    /// TCP request/response: write `size` bytes, read `size` bytes back (echo).
    Tcp,
}

impl Mode {
    /// Lower-case name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http1 => "http1",
            Mode::Http2 => "http2",
            Mode::Grpc => "grpc",
            Mode::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "http1" => Ok(Mode::Http1),
            "http2" => Ok(Mode::Http2),
            "grpc" => Ok(Mode::Grpc),
            "tcp" => Ok(Mode::Tcp),
            other => Err(BenchError::Config(format!("unknown mode {other:?}"))),
        }
    }
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub mode: Mode,
    /// `Host` header (HTTP/1.1) or `:authority` (HTTP/2); defaults to the target address.
    pub host: Option<String>,
    /// Request path; `?size=N` (or `&size=N`) is appended for HTTP. gRPC always calls
    /// [`crate::grpc::ECHO_PATH`].
    pub path: String,
    /// Offered rate, requests per second, over all connections.
    pub rate: f64,
    pub connections: usize,
    /// TCP: message size. HTTP: response size asked of the echo server (`?size=`).
    /// gRPC: payload of the echoed message, each way.
    pub size: usize,
    /// Measured period, after the warm-up.
    pub duration: Duration,
    pub warmup: Duration,
    pub timeout: Duration,
    /// Hard cap on requests scheduled over the whole run, warm-up included.
    pub max_requests: u64,
    /// The pacer yields in a loop instead of sleeping when a request is due within this:
    /// zero costs no CPU but releases requests ~50–100 µs late (timer slack); 100–200 µs
    /// makes release nearly exact for that much CPU per request.
    pub pacer_spin: Duration,
}

impl LoadConfig {
    /// A config with the defaults used by the CLI (1,000 rps, 16 connections, 1 KiB,
    /// 30 s + 5 s warm-up, 1 s timeout, at most 10 million requests).
    pub fn new(target: SocketAddr, mode: Mode) -> Self {
        Self {
            target,
            mode,
            host: None,
            path: "/".into(),
            rate: 1000.0,
            connections: 16,
            size: 1024,
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            max_requests: 10_000_000,
            pacer_spin: Duration::ZERO,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(BenchError::Config(format!(
                "rate must be > 0, got {}",
                self.rate
            )));
        }
        if self.connections == 0 {
            return Err(BenchError::Config("connections must be > 0".into()));
        }
        if self.duration.is_zero() {
            return Err(BenchError::Config("duration must be > 0".into()));
        }
        if self.timeout.is_zero() {
            return Err(BenchError::Config("timeout must be > 0".into()));
        }
        if self.mode == Mode::Tcp && self.size == 0 {
            return Err(BenchError::Config("tcp mode needs size > 0".into()));
        }
        Ok(())
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    /// Corrected latency of successful measured requests, microseconds.
    pub histogram: Histogram<u64>,
    /// Successful measured requests (equals `histogram.len()`).
    pub requests: u64,
    /// Failed measured requests: bad status, I/O error, timeout, or never sent.
    pub errors: u64,
    /// Requests actually sent, warm-up included.
    pub sent_total: u64,
    /// Length of the measured window: the configured duration, or longer when the last
    /// measured response arrived after it ended.
    pub measured: Duration,
    /// How late the pacer released each request, warm-up included (µs). Large values
    /// mean the load generator itself was short of CPU.
    pub schedule_lag: Histogram<u64>,
}

/// Resolves `host:port` (or a literal socket address) once.
pub async fn resolve_target(target: &str) -> Result<SocketAddr> {
    if let Ok(addr) = target.parse::<SocketAddr>() {
        return Ok(addr);
    }
    tokio::net::lookup_host(target)
        .await
        .map_err(|e| BenchError::Resolve(format!("{target}: {e}")))?
        .next()
        .ok_or_else(|| BenchError::Resolve(target.to_string()))
}

/// A new, empty latency histogram (1 µs .. 60 s, 3 significant digits).
pub fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).map_err(|e| BenchError::Histogram(e.to_string()))
}

/// Runs the load described by `cfg`.
pub async fn run_load(cfg: &LoadConfig) -> Result<LoadOutcome> {
    run_load_with(cfg, || {}).await
}

/// Like [`run_load`], and calls `on_measure_start` once, when the warm-up ends (used to
/// take the "before" `/proc` samples of the proxies).
pub async fn run_load_with<F>(cfg: &LoadConfig, on_measure_start: F) -> Result<LoadOutcome>
where
    F: FnOnce() + Send + 'static,
{
    cfg.validate()?;
    let target = conn::Target::new(cfg)?;
    // Connect everything before the clock starts; a target that is down fails the run.
    let mut clients = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        let client = tokio::time::timeout(cfg.timeout, conn::Client::connect(&target))
            .await
            .map_err(|_| BenchError::Timeout)??;
        clients.push(client);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let total = scheduled_total(cfg.rate, cfg.warmup + cfg.duration, cfg.max_requests);
    let (pacer, gates) = pacer::Pacer::start(
        start.into_std(),
        cfg.rate,
        total,
        cfg.connections,
        cfg.pacer_spin,
    )?;
    let hook = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from).await;
        on_measure_start();
    });
    let mut tasks = tokio::task::JoinSet::new();
    let conns = cfg.connections as u64;
    for (c, (client, gate)) in clients.into_iter().zip(gates).enumerate() {
        let schedule = Schedule {
            start,
            rate: cfg.rate,
            first: c as u64,
            step: conns,
            total,
            measure_from,
            end,
            hard_deadline: end + cfg.timeout,
        };
        let target = std::sync::Arc::clone(&target);
        tasks.spawn(async move { conn::run_connection(client, target, schedule, gate).await });
    }
    let mut out = LoadOutcome {
        histogram: new_histogram()?,
        requests: 0,
        errors: 0,
        sent_total: 0,
        measured: cfg.duration,
        schedule_lag: new_histogram()?,
    };
    let mut last_done = end;
    while let Some(joined) = tasks.join_next().await {
        let stats = joined.map_err(|e| BenchError::Config(format!("connection task: {e}")))??;
        out.histogram
            .add(&stats.histogram)
            .map_err(|e| BenchError::Histogram(e.to_string()))?;
        out.requests += stats.ok;
        out.errors += stats.errors;
        out.sent_total += stats.sent;
        if let Some(t) = stats.last_done {
            last_done = last_done.max(t);
        }
    }
    // The hook has fired unless the run failed before the warm-up ended.
    hook.abort();
    if let Some(lag) = pacer.finish().await {
        out.schedule_lag = lag;
    }
    if !out.schedule_lag.is_empty() {
        let lag = &out.schedule_lag;
        tracing::debug!(
            p50_us = lag.value_at_quantile(0.5),
            p99_us = lag.value_at_quantile(0.99),
            max_us = lag.max(),
            "pacer lag"
        );
    }
    out.measured = last_done.saturating_duration_since(measure_from);
    Ok(out)
}

/// Number of requests scheduled over `span` at `rate`, capped at `max`.
pub fn scheduled_total(rate: f64, span: Duration, max: u64) -> u64 {
    let n = (rate * span.as_secs_f64()).ceil();
    if n >= max as f64 { max } else { n as u64 }
}

/// One connection's share of the schedule: requests `first, first + step, ...` below
/// `total`, request `i` intended at `start + i / rate`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    pub start: Instant,
    pub rate: f64,
    pub first: u64,
    pub step: u64,
    pub total: u64,
    pub measure_from: Instant,
    pub end: Instant,
    pub hard_deadline: Instant,
}

impl Schedule {
    /// Intended time of this connection's `k`-th request and whether it is measured, or
    /// `None` when the schedule is exhausted.
    pub fn slot(&self, k: u64) -> Option<(Instant, bool)> {
        let idx = self.first.checked_add(k.checked_mul(self.step)?)?;
        if idx >= self.total {
            return None;
        }
        let at = self.start + Duration::from_secs_f64(idx as f64 / self.rate);
        if at >= self.end {
            return None;
        }
        Some((at, at >= self.measure_from))
    }

    /// Measured requests from slot `k` on (those never sent when giving up).
    pub fn measured_from(&self, k: u64) -> u64 {
        let mut n = 0;
        let mut k = k;
        while let Some((_, measured)) = self.slot(k) {
            n += u64::from(measured);
            k += 1;
        }
        n
    }
}

/// Microseconds from `intended` to `done`, clamped to the histogram's range.
pub(crate) fn latency_us(intended: Instant, done: Instant) -> u64 {
    let us = done.saturating_duration_since(intended).as_micros();
    u64::try_from(us)
        .unwrap_or(HIST_MAX_US)
        .clamp(1, HIST_MAX_US)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(first: u64, step: u64, total: u64) -> Schedule {
        let start = Instant::now();
        Schedule {
            start,
            rate: 10.0,
            first,
            step,
            total,
            measure_from: start + Duration::from_secs(1),
            end: start + Duration::from_secs(3),
            hard_deadline: start + Duration::from_secs(4),
        }
    }

    #[test]
    fn totals_are_capped() {
        assert_eq!(
            scheduled_total(1000.0, Duration::from_secs(3), u64::MAX),
            3000
        );
        assert_eq!(scheduled_total(1000.0, Duration::from_secs(3), 500), 500);
        assert_eq!(scheduled_total(3.0, Duration::from_millis(500), 100), 2);
    }

    #[test]
    fn schedule_shares_and_warmup() {
        // 10 rps for 3 s = 30 requests, 4 connections; connection 1 owns 1, 5, 9, ...
        let s = schedule(1, 4, 30);
        let (t0, m0) = s.slot(0).unwrap();
        assert_eq!(t0, s.start + Duration::from_millis(100));
        assert!(!m0);
        let (t3, m3) = s.slot(3).unwrap(); // request 13 at 1.3 s
        assert_eq!(t3, s.start + Duration::from_millis(1300));
        assert!(m3);
        assert!(s.slot(7).is_some()); // request 29
        assert!(s.slot(8).is_none()); // request 33 >= total
        // Requests 13, 17, 21, 25, 29 are measured.
        assert_eq!(s.measured_from(0), 5);
        assert_eq!(s.measured_from(5), 3);
        // The hard cap ends the schedule early.
        assert_eq!(schedule(1, 4, 14).measured_from(0), 1);
    }

    #[test]
    fn latency_is_clamped() {
        let t = Instant::now();
        assert_eq!(latency_us(t, t), 1);
        assert_eq!(latency_us(t + Duration::from_secs(1), t), 1);
        assert_eq!(latency_us(t, t + Duration::from_millis(2)), 2000);
        assert_eq!(latency_us(t, t + Duration::from_secs(120)), HIST_MAX_US);
    }

    #[test]
    fn modes_parse() {
        for m in [Mode::Http1, Mode::Http2, Mode::Grpc, Mode::Tcp] {
            assert_eq!(m.as_str().parse::<Mode>().unwrap(), m);
        }
        assert!("h3".parse::<Mode>().is_err());
    }
}
