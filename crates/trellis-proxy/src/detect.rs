//! Protocol detection: read the first bytes a client sends and decide whether the
//! connection is HTTP (which the proxy handles per request) or opaque TCP. The bytes
//! read are handed back in front of the stream, so nothing is lost.
//!
//! A client of a server-first protocol (MySQL, SMTP) sends nothing until the server
//! speaks; detection gives up after a short time and the connection is carried as TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest request head (line and headers) waited for before the stream is carried as
/// bytes: 32 KiB, nginx's default four 8 KiB header buffers. A longer head on an
/// undeclared port loses the outbound side's L7 features (routes, retries) but still
/// meets the server sidecar's HTTP handling; `HeadTooLong` lets it be counted.
const MAX_PEEK: usize = 32 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// An HTTP/1 request that turns the connection into something else (WebSocket,
    /// CONNECT): carried as a byte stream after it.
    Upgrade,
    /// Anything else, including TLS from the app, and silence until the timeout.
    Opaque,
    /// An HTTP/1 request head longer than the detection limit: carried like `Opaque`.
    HeadTooLong,
}

/// Reads until the protocol is known or `timeout` passes.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(&buf) {
            return Ok((protocol, buf.freeze()));
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        match read {
            // Timed out, or the client closed: whatever we have is opaque.
            Err(_) | Ok(Ok(0)) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// `None` while more bytes are needed.
fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let prefix = buf.len().min(H2_PREFACE.len());
    if buf[..prefix] == H2_PREFACE[..prefix] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // HTTP/1: "METHOD SP target SP HTTP/1.x CRLF", then headers. An upgrade
    // (WebSocket, h2c) is carried as an opaque stream, so wait for the header block.
    let method_end = buf.iter().position(|b| *b == b' ');
    let token_ok = |end: usize| end > 0 && buf[..end].iter().all(|b| b.is_ascii_uppercase());
    match method_end {
        Some(end) if !token_ok(end) => return Some(Protocol::Opaque),
        None if buf.len() > 16 || !buf.iter().all(|b| b.is_ascii_uppercase()) => {
            return Some(Protocol::Opaque);
        }
        None => return None,
        Some(_) => {}
    }
    let Some(line_end) = find(buf, b"\r\n") else {
        return (buf.len() >= MAX_PEEK).then_some(Protocol::HeadTooLong);
    };
    if !buf[..line_end].ends_with(b" HTTP/1.1") && !buf[..line_end].ends_with(b" HTTP/1.0") {
        return Some(Protocol::Opaque);
    }
    if buf[..line_end].starts_with(b"CONNECT ") {
        return Some(Protocol::Upgrade);
    }
    let Some(headers_end) = find(buf, b"\r\n\r\n") else {
        return (buf.len() >= MAX_PEEK).then_some(Protocol::HeadTooLong);
    };
    let headers = &buf[line_end..headers_end];
    let upgrade = headers
        .split(|b| *b == b'\n')
        .any(|line| line.len() >= 8 && line[..8].eq_ignore_ascii_case(b"upgrade:"));
    Some(if upgrade {
        Protocol::Upgrade
    } else {
        Protocol::Http1
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A stream with bytes already read put back in front of it.
pub struct PrefixedIo<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> PrefixedIo<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        PrefixedIo { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Every byte stream a sidecar serves (the inbound side's mTLS or plaintext callers,
/// the outbound side's app connections) as one type: the HTTP servers, protocol
/// sniffing and byte copying are then compiled once rather than once per stream type
/// (each HTTP/2 server copy is ~30 KB of code, resident in every sidecar). The branch
/// per read or write costs nothing next to the syscall behind it.
pub enum DownstreamIo {
    Tls(Box<tokio_rustls::server::TlsStream<PrefixedIo<tokio::net::TcpStream>>>),
    Plain(PrefixedIo<tokio::net::TcpStream>),
}

impl AsyncRead for DownstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DownstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
            DownstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DownstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DownstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
            DownstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DownstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
            DownstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            DownstreamIo::Tls(io) => io.is_write_vectored(),
            DownstreamIo::Plain(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DownstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
            DownstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DownstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
            DownstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            Some(Protocol::Upgrade)
        );
        assert_eq!(
            classify(b"CONNECT a:443 HTTP/1.1\r\n\r\n"),
            Some(Protocol::Upgrade)
        );
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET /x HTTP/3\r\n"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn long_request_heads_are_still_http_up_to_the_limit() {
        use tokio::io::AsyncWriteExt;
        // A 20 KiB cookie (4 KiB used to end detection), sent in small pieces.
        let head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nCookie: {}\r\n\r\n",
            "c".repeat(20 * 1024)
        );
        let (mut client, mut server) = tokio::io::duplex(512);
        let writer = tokio::spawn(async move {
            client.write_all(head.as_bytes()).await.unwrap();
            client
        });
        let (protocol, bytes) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert!(bytes.len() > 20 * 1024);
        drop(writer.await.unwrap());

        let endless = format!("GET / HTTP/1.1\r\nCookie: {}", "c".repeat(MAX_PEEK));
        assert_eq!(classify(endless.as_bytes()), Some(Protocol::HeadTooLong));
        let line = format!("GET /{} HTTP/1.1", "a".repeat(MAX_PEEK));
        assert_eq!(classify(line.as_bytes()), Some(Protocol::HeadTooLong));
    }

    #[tokio::test]
    async fn server_first_protocols_fall_back_to_opaque() {
        let (mut client, _server) = tokio::io::duplex(64);
        let (protocol, bytes) = detect(&mut client, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(bytes.is_empty());
    }

    #[tokio::test]
    async fn detected_bytes_are_replayed() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\nrest")
            .await
            .unwrap();
        drop(client);
        let (protocol, bytes) = detect(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        let mut all = Vec::new();
        PrefixedIo::new(bytes, server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\nrest");
    }
}
