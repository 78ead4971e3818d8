//! `chaos-load`: open-loop HTTP/1.1 load plus long-lived TCP streams, for the chaos
//! suite (tests/tests/chaos.rs). Requests are scheduled at a fixed rate whatever the
//! answers do, and each one's latency counts from its scheduled time, so a stall
//! shows as latency rather than as fewer requests (no coordinated omission).
//! `--connections` workers each keep one kept-alive connection, so concurrency is
//! bounded; a worker that sees an error drops its connection and dials again.
//!
//! Every request and every broken stream is written to `--out`, one per line:
//! `req <scheduled unix µs> <latency µs> <outcome>` (outcome `200`, another status
//! with the proxy's `trellis-error` reason, or an error without spaces) and
//! `brk <unix µs> <reason>`. The caller cuts the record into windows around its
//! events. A summary line `chaos-load: sent=N ok=N failed=N broken=N pings=N` ends
//! the run; the exit status is 0 whatever failed (judging is the caller's job).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

pub struct ChaosLoad {
    pub url: String,
    pub rate: u32,
    pub count: u32,
    pub seconds: u64,
    pub connections: u32,
    pub request_timeout: Duration,
    pub tcp: Option<String>,
    pub streams: u32,
    pub stop_file: Option<PathBuf>,
    pub out: PathBuf,
    /// After every this many requests the schedule pauses (0: never), so pooled
    /// connections behind the sidecar sit idle; the app's own connections are
    /// dialed again after each pause, so only the mesh hop's idle handling is tested.
    pub pause_every: u32,
    /// The pauses sweep from `pause - spread` to `pause + spread`.
    pub pause: Duration,
    pub pause_spread: Duration,
}

/// Wall-clock microseconds of an `Instant`, from one pairing taken at start.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    start_unix_us: u64,
}

impl Clock {
    fn new() -> Self {
        let start_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default();
        Self {
            start: Instant::now(),
            start_unix_us,
        }
    }

    fn unix_us(&self, at: Instant) -> u64 {
        self.start_unix_us + at.saturating_duration_since(self.start).as_micros() as u64
    }
}

type Records = Arc<std::sync::Mutex<Vec<String>>>;

fn record(records: &Records, line: String) {
    if let Ok(mut r) = records.lock() {
        r.push(line);
    }
}

/// An error as one token: the record is space-separated.
fn token(text: &str) -> String {
    let t: String = text
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .take(120)
        .collect();
    if t.is_empty() { "-".into() } else { t }
}

pub async fn run(load: ChaosLoad) -> Result<()> {
    let (addr, host, path) = super::parse_url(&load.url)?;
    let target = super::resolve(&addr)?;
    let clock = Clock::new();
    let records: Records = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let pings = Arc::new(AtomicU64::new(0));

    let mut streams = Vec::new();
    if let Some(tcp) = &load.tcp {
        let tcp_target = super::resolve(tcp)?;
        for id in 0..load.streams {
            streams.push(tokio::spawn(stream_loop(
                id,
                tcp_target,
                clock,
                records.clone(),
                done.clone(),
                pings.clone(),
            )));
        }
    }

    let epoch = Arc::new(AtomicU64::new(0));
    let (slots, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..load.connections.max(1) {
        let worker = Worker {
            target,
            host: host.clone(),
            path: path.clone(),
            timeout: load.request_timeout,
            clock,
            records: records.clone(),
            epoch: epoch.clone(),
        };
        workers.push(tokio::spawn(worker.run(rx.clone())));
    }
    println!("chaos-load: started");

    let interval = Duration::from_secs_f64(1.0 / f64::from(load.rate.max(1)));
    let deadline = clock.start + Duration::from_secs(load.seconds);
    let pauses = load.count.checked_div(load.pause_every).unwrap_or(0);
    let mut paused = Duration::ZERO;
    let mut sent = 0u32;
    while sent < load.count {
        let after_pause = load.pause_every > 0 && sent > 0 && sent.is_multiple_of(load.pause_every);
        if after_pause {
            let k = sent / load.pause_every - 1;
            paused += sweep(load.pause, load.pause_spread, k, pauses);
        }
        let at = clock.start + interval * sent + paused;
        if at >= deadline || load.stop_file.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        if after_pause {
            // Only now: a worker still finishing the last burst's backlog during the
            // pause must not take the new epoch early and then sit idle on it.
            epoch.fetch_add(1, Ordering::Relaxed);
        }
        if slots.send(at).is_err() {
            break;
        }
        sent += 1;
    }
    drop(slots);
    for w in workers {
        let _ = w.await;
    }
    done.store(true, Ordering::Relaxed);
    for s in streams {
        let _ = s.await;
    }

    let lines = records.lock().map(|r| r.clone()).unwrap_or_default();
    let ok = lines.iter().filter(|l| l.ends_with(" 200")).count();
    let requests = lines.iter().filter(|l| l.starts_with("req ")).count();
    let broken = lines.iter().filter(|l| l.starts_with("brk ")).count();
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&load.out, text).with_context(|| format!("write {}", load.out.display()))?;
    println!(
        "chaos-load: sent={requests} ok={ok} failed={} broken={broken} pings={}",
        requests - ok,
        pings.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Pause number `k` of `n`: evenly from `pause - spread` to `pause + spread`.
fn sweep(pause: Duration, spread: Duration, k: u32, n: u32) -> Duration {
    if n <= 1 {
        return pause;
    }
    let low = pause.saturating_sub(spread);
    low + (spread * 2) * k / (n - 1)
}

struct Worker {
    epoch: Arc<AtomicU64>,
    target: std::net::SocketAddr,
    host: String,
    path: String,
    timeout: Duration,
    clock: Clock,
    records: Records,
}

impl Worker {
    async fn run(self, slots: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>) {
        let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
        let mut conn_epoch = 0;
        loop {
            let Some(scheduled) = slots.lock().await.recv().await else {
                return;
            };
            let epoch = self.epoch.load(Ordering::Relaxed);
            if epoch != conn_epoch {
                conn = None;
                conn_epoch = epoch;
            }
            let outcome = match tokio::time::timeout(self.timeout, self.send(&mut conn)).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => {
                    conn = None;
                    token(&format!("{e:#}"))
                }
                Err(_) => {
                    conn = None;
                    "timeout".into()
                }
            };
            let latency = scheduled.elapsed().as_micros();
            record(
                &self.records,
                format!("req {} {latency} {outcome}", self.clock.unix_us(scheduled)),
            );
        }
    }

    async fn send(&self, conn: &mut Option<SendRequest<Empty<Bytes>>>) -> Result<String> {
        let sender = match conn {
            Some(s) if !s.is_closed() => s,
            _ => {
                let stream = TcpStream::connect(self.target)
                    .await
                    .with_context(|| format!("connect {}", self.target))?;
                let _ = stream.set_nodelay(true);
                let (sender, driver) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(async move {
                    let _ = driver.await;
                });
                conn.insert(sender)
            }
        };
        sender.ready().await.context("connection")?;
        let req = Request::builder()
            .uri(self.path.as_str())
            .header("host", self.host.as_str())
            .body(Empty::new())?;
        let resp = sender.send_request(req).await.context("request")?;
        let status = resp.status().as_u16();
        let reason = resp
            .headers()
            .get("trellis-error")
            .and_then(|v| v.to_str().ok())
            .map(token);
        resp.into_body().collect().await.context("body")?;
        Ok(match reason {
            Some(reason) if status != 200 => format!("{status}:{reason}"),
            _ => status.to_string(),
        })
    }
}

/// One long-lived TCP stream: a line every 100 ms, each echoed within 5 s. A stream
/// that breaks is recorded once and dialed again.
async fn stream_loop(
    id: u32,
    target: std::net::SocketAddr,
    clock: Clock,
    records: Records,
    done: Arc<AtomicBool>,
    pings: Arc<AtomicU64>,
) {
    let mut seq = 0u64;
    while !done.load(Ordering::Relaxed) {
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await
        else {
            record(
                &records,
                format!("brk {} connect", clock.unix_us(Instant::now())),
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let broken = loop {
            if done.load(Ordering::Relaxed) {
                break None;
            }
            seq += 1;
            let line = format!("stream {id} ping {seq}");
            let exchange = async {
                write.write_all(format!("{line}\n").as_bytes()).await?;
                lines.next_line().await
            };
            match tokio::time::timeout(Duration::from_secs(5), exchange).await {
                Ok(Ok(Some(echo))) if echo == line => {
                    pings.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Some(other))) => break Some(token(&format!("wrong-echo:{other}"))),
                Ok(Ok(None)) => break Some("closed".into()),
                Ok(Err(e)) => break Some(token(&e.to_string())),
                Err(_) => break Some("timeout".into()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if let Some(reason) = broken {
            record(
                &records,
                format!("brk {} {reason}", clock.unix_us(Instant::now())),
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
