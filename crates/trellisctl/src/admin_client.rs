//! Plain HTTP/1 GETs to the loopback debug and admin ports (control plane 15016,
//! proxy admin 15000), bounded in time so a hung port fails the command.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

/// Each request, from connect to the last byte of the body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Debug pages are small; a larger body means something else answers.
const MAX_BODY: usize = 16 << 20;

/// `GET http://{addr}{path}`; an error unless the answer is 200.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<Bytes> {
    tokio::time::timeout(REQUEST_TIMEOUT, exchange(addr, path))
        .await
        .with_context(|| format!("no answer from {addr} within {REQUEST_TIMEOUT:?}"))?
}

/// [`get`], parsed as JSON.
pub async fn get_json<T: DeserializeOwned>(addr: &str, path: &str) -> anyhow::Result<T> {
    let body = get(addr, path).await?;
    serde_json::from_slice(&body)
        .with_context(|| format!("http://{addr}{path} did not answer the expected JSON"))
}

async fn exchange(addr: &str, path: &str) -> anyhow::Result<Bytes> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    let connection = tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let status = response.status();
    let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
    let body = limited
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading http://{addr}{path}: {e}"))?
        .to_bytes();
    connection.abort();
    if !status.is_success() {
        bail!(
            "GET http://{addr}{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}
