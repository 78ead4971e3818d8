//! The servers the benchmark measures against: an HTTP server (HTTP/1.1 and HTTP/2 on
//! the same port) answering 200 with a body of the asked size, and a TCP echo server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::Result;

/// Largest body the HTTP server sends, whatever `?size=` asks (64 MiB).
pub const MAX_BODY: usize = 64 << 20;

/// Reads `size=N` from a query string.
pub fn query_size(query: Option<&str>) -> Option<usize> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "size")
        .and_then(|(_, v)| v.parse().ok())
}

/// Binds `addr` and serves HTTP from a background task; returns the bound address.
pub async fn spawn_http_server(
    addr: SocketAddr,
    default_size: usize,
) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, tokio::spawn(serve_http(listener, default_size))))
}

/// Binds `addr` and runs the TCP echo server from a background task.
pub async fn spawn_tcp_echo(addr: SocketAddr) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, tokio::spawn(serve_tcp_echo(listener))))
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until the task is dropped:
/// every request gets 200 and a body of `default_size` bytes, or `?size=N`.
pub async fn serve_http(listener: TcpListener, default_size: usize) -> Result<()> {
    let default_size = default_size.min(MAX_BODY);
    // One buffer, sliced per response, so most responses cost no allocation.
    let body = Bytes::from(vec![b'a'; default_size.max(64 * 1024)]);
    loop {
        let stream = match accept(&listener).await {
            Some(s) => s,
            None => continue,
        };
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let size = query_size(req.uri().query())
                    .unwrap_or(default_size)
                    .min(MAX_BODY);
                let bytes = if size <= body.len() {
                    body.slice(..size)
                } else {
                    Bytes::from(vec![b'a'; size])
                };
                let mut resp = Response::new(Full::new(bytes));
                *resp.status_mut() = StatusCode::OK;
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            builder.http2().timer(TokioTimer::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

/// Echoes every byte back on each connection accepted on `listener`, until dropped.
pub async fn serve_tcp_echo(listener: TcpListener) -> Result<()> {
    loop {
        let mut stream = match accept(&listener).await {
            Some(s) => s,
            None => continue,
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Accepts one connection with `TCP_NODELAY`; on error (say, out of file descriptors)
/// logs, pauses briefly and returns `None`.
async fn accept(listener: &TcpListener) -> Option<TcpStream> {
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Err(e) => {
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_from_query() {
        assert_eq!(query_size(Some("size=10")), Some(10));
        assert_eq!(query_size(Some("a=1&size=7&b")), Some(7));
        assert_eq!(query_size(Some("size=x")), None);
        assert_eq!(query_size(Some("sizes=3")), None);
        assert_eq!(query_size(None), None);
    }
}
