//! One connection of the load generator: protocol clients and the per-connection loop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::pacer::Gate;
use super::{LoadConfig, Mode, Schedule, latency_us, new_histogram};
use crate::{BenchError, Result};

/// Most requests in flight on one HTTP/2 connection (below the usual 100 stream limit of
/// servers; when reached, further requests wait, and the wait counts in their latency).
const H2_MAX_IN_FLIGHT: usize = 100;

/// What every connection needs to know about the target, shared.
#[derive(Debug)]
pub(crate) struct Target {
    addr: std::net::SocketAddr,
    mode: Mode,
    host: http::HeaderValue,
    /// Origin-form URI for HTTP/1.1.
    h1_uri: http::Uri,
    /// Absolute URI for HTTP/2 (`:scheme` and `:authority` come from it).
    h2_uri: http::Uri,
    payload: Bytes,
    /// gRPC: `http://{host}/trellis.bench.v1.Echo/Echo` and the framed request message,
    /// built once and shared by every call.
    grpc_uri: http::Uri,
    grpc_frame: Bytes,
    timeout: Duration,
}

impl Target {
    pub fn new(cfg: &LoadConfig) -> Result<Arc<Self>> {
        let host = cfg.host.clone().unwrap_or_else(|| cfg.target.to_string());
        let path = if cfg.path.starts_with('/') {
            cfg.path.clone()
        } else {
            format!("/{}", cfg.path)
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{sep}size={}", cfg.size);
        let bad = |e: http::uri::InvalidUri| BenchError::Config(format!("request URI: {e}"));
        Ok(Arc::new(Self {
            addr: cfg.target,
            mode: cfg.mode,
            host: http::HeaderValue::from_str(&host)
                .map_err(|e| BenchError::Config(format!("host {host:?}: {e}")))?,
            h1_uri: path.parse().map_err(bad)?,
            h2_uri: format!("http://{host}{path}").parse().map_err(bad)?,
            payload: Bytes::from(vec![b'x'; cfg.size]),
            grpc_uri: format!("http://{host}{}", crate::grpc::ECHO_PATH)
                .parse()
                .map_err(bad)?,
            grpc_frame: crate::grpc::echo_frame(cfg.size)?,
            timeout: cfg.timeout,
        }))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Aborts the connection driver task when the client is dropped.
pub(crate) struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An open connection. Request bodies are [`Full`]: empty for GET (which ends the
/// stream with the headers), the pre-built frame for gRPC.
pub(crate) enum Client {
    /// The driver is held only so that dropping the client stops the connection task.
    H1(http1::SendRequest<Full<Bytes>>, #[allow(dead_code)] Driver),
    /// HTTP/2 and gRPC.
    H2(http2::SendRequest<Full<Bytes>>, Driver),
    Tcp(TcpStream, Vec<u8>),
}

impl Client {
    pub async fn connect(target: &Target) -> Result<Self> {
        let stream = TcpStream::connect(target.addr).await?;
        stream.set_nodelay(true)?;
        match target.mode {
            Mode::Http1 => {
                let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
                let driver = Driver(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                Ok(Client::H1(sender, driver))
            }
            Mode::Http2 | Mode::Grpc => {
                let (sender, conn) =
                    http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
                let driver = Driver(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                Ok(Client::H2(sender, driver))
            }
            Mode::Tcp => Ok(Client::Tcp(stream, vec![0; target.payload.len()])),
        }
    }

    /// One sequential request; gives the client back when it can be reused.
    async fn request(mut self, target: &Target) -> Result<Self> {
        match &mut self {
            Client::H1(sender, _) => {
                sender.ready().await?;
                let req = Request::get(target.h1_uri.clone())
                    .header(header::HOST, target.host.clone())
                    .body(Full::new(Bytes::new()))?;
                read_response(sender.send_request(req).await?).await?;
            }
            Client::H2(sender, _) => h2_request(sender.clone(), target).await?,
            Client::Tcp(stream, buf) => {
                stream.write_all(&target.payload).await?;
                let mut got = 0;
                while got < buf.len() {
                    let n = stream.read(&mut buf[got..]).await?;
                    if n == 0 {
                        return Err(BenchError::ShortResponse {
                            expected: buf.len(),
                            got,
                        });
                    }
                    got += n;
                }
            }
        }
        Ok(self)
    }
}

async fn h2_request(mut sender: http2::SendRequest<Full<Bytes>>, target: &Target) -> Result<()> {
    sender.ready().await?;
    if target.mode == Mode::Grpc {
        let req = crate::grpc::echo_request(&target.grpc_uri, target.grpc_frame.clone())?;
        let resp = sender.send_request(req).await?;
        // The server echoes the message: the same frame comes back.
        return crate::grpc::read_echo_response(resp, target.grpc_frame.len()).await;
    }
    let req = Request::get(target.h2_uri.clone()).body(Full::new(Bytes::new()))?;
    read_response(sender.send_request(req).await?).await
}

/// Checks for 200 and reads the whole body.
async fn read_response(resp: http::Response<Incoming>) -> Result<()> {
    if resp.status() != StatusCode::OK {
        return Err(BenchError::Status(resp.status().as_u16()));
    }
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

/// What one connection measured.
pub(crate) struct ConnStats {
    pub histogram: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub sent: u64,
    pub last_done: Option<Instant>,
}

impl ConnStats {
    fn account(&mut self, intended: Instant, measured: bool, ok: bool, done: Instant) {
        if !measured {
            return;
        }
        self.last_done = Some(self.last_done.map_or(done, |t| t.max(done)));
        if ok {
            self.histogram.saturating_record(latency_us(intended, done));
            self.ok += 1;
        } else {
            self.errors += 1;
        }
    }
}

/// Runs one connection's share of the schedule.
pub(crate) async fn run_connection(
    client: Client,
    target: Arc<Target>,
    schedule: Schedule,
    gate: Gate,
) -> Result<ConnStats> {
    let stats = ConnStats {
        histogram: new_histogram()?,
        ok: 0,
        errors: 0,
        sent: 0,
        last_done: None,
    };
    match client {
        Client::H2(sender, driver) => {
            run_multiplexed(sender, driver, target, schedule, gate, stats).await
        }
        other => Ok(run_sequential(other, &target, schedule, gate, stats).await),
    }
}

/// HTTP/1.1 and TCP: one request at a time; a late response delays the next request.
async fn run_sequential(
    client: Client,
    target: &Target,
    schedule: Schedule,
    gate: Gate,
    mut stats: ConnStats,
) -> ConnStats {
    let mut client = Some(client);
    let mut k = 0;
    while let Some((intended, measured)) = schedule.slot(k) {
        if Instant::now() >= schedule.hard_deadline {
            stats.errors += schedule.measured_from(k);
            break;
        }
        gate.wait(k).await;
        stats.sent += 1;
        let current = client.take();
        let attempt = async {
            let c = match current {
                Some(c) => c,
                // The previous request failed: reconnect, and the time counts.
                None => Client::connect(target).await?,
            };
            c.request(target).await
        };
        let ok = match tokio::time::timeout(target.timeout(), attempt).await {
            Ok(Ok(c)) => {
                client = Some(c);
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "request failed");
                false
            }
            Err(_) => false,
        };
        stats.account(intended, measured, ok, Instant::now());
        k += 1;
    }
    stats
}

/// HTTP/2 and gRPC: each request is sent at its time without waiting for earlier ones.
async fn run_multiplexed(
    sender: http2::SendRequest<Full<Bytes>>,
    driver: Driver,
    target: Arc<Target>,
    schedule: Schedule,
    gate: Gate,
    mut stats: ConnStats,
) -> Result<ConnStats> {
    type Done = (Instant, bool, bool, Instant);
    let mut conn = Some((sender, driver));
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    let mut k = 0;
    let join_err = |e: tokio::task::JoinError| BenchError::Config(format!("request task: {e}"));
    while let Some((intended, measured)) = schedule.slot(k) {
        k += 1;
        if Instant::now() >= schedule.hard_deadline {
            stats.errors += schedule.measured_from(k - 1);
            break;
        }
        gate.wait(k - 1).await;
        while let Some(done) = in_flight.try_join_next() {
            let (i, m, ok, t) = done.map_err(join_err)?;
            stats.account(i, m, ok, t);
        }
        while in_flight.len() >= H2_MAX_IN_FLIGHT {
            if let Some(done) = in_flight.join_next().await {
                let (i, m, ok, t) = done.map_err(join_err)?;
                stats.account(i, m, ok, t);
            }
        }
        stats.sent += 1;
        if conn.as_ref().is_none_or(|(s, _)| s.is_closed()) {
            conn = None;
            match tokio::time::timeout(target.timeout(), Client::connect(&target)).await {
                Ok(Ok(Client::H2(s, d))) => conn = Some((s, d)),
                Ok(Ok(_)) => return Err(BenchError::Config("expected an HTTP/2 client".into())),
                Ok(Err(_)) | Err(_) => {
                    stats.account(intended, measured, false, Instant::now());
                    continue;
                }
            }
        }
        let Some((sender, _)) = conn.as_ref() else {
            continue;
        };
        let sender = sender.clone();
        let target = Arc::clone(&target);
        in_flight.spawn(async move {
            let r = tokio::time::timeout(target.timeout(), h2_request(sender, &target)).await;
            let ok = matches!(r, Ok(Ok(())));
            (intended, measured, ok, Instant::now())
        });
    }
    while let Some(done) = in_flight.join_next().await {
        let (i, m, ok, t) = done.map_err(join_err)?;
        stats.account(i, m, ok, t);
    }
    Ok(stats)
}
