//! The servers the benchmark measures against: an HTTP server (HTTP/1.1 and HTTP/2 on
//! the same port) answering 200 with a body of the asked size and gRPC echo calls
//! ([`crate::grpc`]), and a TCP echo server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt, Either, Full, Limited};
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

/// A gRPC reply: the message followed by trailers.
type GrpcBody =
    WithTrailers<Full<Bytes>, std::future::Ready<Option<Result<HeaderMap, Infallible>>>>;
/// Plain HTTP answers (and trailers-only gRPC errors) stay a bare [`Full`].
type ServerBody = Either<Full<Bytes>, GrpcBody>;

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until the task is dropped:
/// every request gets 200 and a body of `default_size` bytes, or `?size=N`; a gRPC
/// request (`content-type: application/grpc`) to the echo method gets its message back.
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
                // Plain HTTP is answered right here, from a slice of the shared buffer;
                // only gRPC needs to read the request body first.
                let plain = (!crate::grpc::is_grpc(req.headers())).then(|| {
                    let size = query_size(req.uri().query())
                        .unwrap_or(default_size)
                        .min(MAX_BODY);
                    let bytes = if size <= body.len() {
                        body.slice(..size)
                    } else {
                        Bytes::from(vec![b'a'; size])
                    };
                    Response::new(Either::Left(Full::new(bytes)))
                });
                async move {
                    Ok::<_, Infallible>(match plain {
                        Some(resp) => resp,
                        None => grpc_echo(req).await,
                    })
                }
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

/// Answers a gRPC call: the echo method returns the request's message; anything else,
/// or a request that is not one uncompressed frame, gets a trailers-only error.
async fn grpc_echo(req: Request<Incoming>) -> Response<ServerBody> {
    use crate::grpc::{STATUS_INVALID_ARGUMENT, STATUS_OK, STATUS_UNIMPLEMENTED};
    if req.uri().path() != crate::grpc::ECHO_PATH {
        return grpc_error(STATUS_UNIMPLEMENTED, "unknown method");
    }
    let request = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            tracing::debug!(error = %e, "reading gRPC request");
            return grpc_error(STATUS_INVALID_ARGUMENT, "unreadable request body");
        }
    };
    if let Err(e) = crate::grpc::parse_frame(&request) {
        tracing::debug!(error = %e, "bad gRPC frame");
        return grpc_error(
            STATUS_INVALID_ARGUMENT,
            "request is not one uncompressed frame",
        );
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(STATUS_OK));
    // The frame is echoed as received: same prefix, same message.
    let body = Full::new(request).with_trailers(std::future::ready(Some(Ok(trailers))));
    let mut resp = Response::new(Either::Right(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(crate::grpc::CONTENT_TYPE),
    );
    resp
}

/// A trailers-only gRPC error: HTTP 200 with the status in the headers.
fn grpc_error(code: u32, message: &'static str) -> Response<ServerBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(crate::grpc::CONTENT_TYPE),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    resp
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
