//! `http-load`: steady HTTP/1.1 traffic for rollout and failover tests. One new
//! connection per request (so every failure is the mesh's or the server's, never a
//! stale keep-alive), paced by `interval`, bounded by `count` and `seconds`, stopped
//! early when `stop_file` appears. Prints one `FAIL <n>: <why>` line per failed
//! request and a summary `load: sent=N ok=N failed=N`; exits non-zero on any failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub struct Load {
    pub url: String,
    pub count: u32,
    pub interval: Duration,
    pub seconds: u64,
    pub request_timeout: Duration,
    pub stop_file: Option<PathBuf>,
}

pub async fn run(load: Load) -> Result<()> {
    let (addr, host, path) = super::parse_url(&load.url)?;
    let deadline = Instant::now() + Duration::from_secs(load.seconds);
    let (mut sent, mut failed) = (0u32, 0u32);
    println!("load: started");
    while sent < load.count && Instant::now() < deadline {
        if load.stop_file.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        sent += 1;
        let started = Instant::now();
        let outcome = tokio::time::timeout(load.request_timeout, one(&addr, &host, &path)).await;
        match outcome {
            Ok(Ok((200, _))) => {}
            Ok(Ok((status, reason))) => {
                failed += 1;
                println!("FAIL {sent}: HTTP {status} (trellis-error: {reason})");
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("FAIL {sent}: {e:#}");
            }
            Err(_) => {
                failed += 1;
                println!("FAIL {sent}: no answer within {:?}", load.request_timeout);
            }
        }
        tokio::time::sleep(load.interval.saturating_sub(started.elapsed())).await;
    }
    println!("load: sent={sent} ok={} failed={failed}", sent - failed);
    if failed > 0 {
        bail!("{failed} of {sent} requests failed");
    }
    Ok(())
}

/// One GET on a new connection; the status code and the proxy's `trellis-error`
/// reason ("-" when none).
async fn one(addr: &str, host: &str, path: &str) -> Result<(u16, String)> {
    let target = super::resolve(addr)?;
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {addr} ({target})"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await.context("request")?;
    let status = resp.status().as_u16();
    let reason = resp
        .headers()
        .get("trellis-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    resp.into_body().collect().await.context("body")?;
    Ok((status, reason))
}
