//! Inbound protocol sniffing for connections that did not arrive as the mesh's HTTP/2:
//! plaintext callers (PERMISSIVE, DISABLE) and mTLS streams (upgrades, opaque TCP).
//!
//! Anything an HTTP/1 server could take for a request goes through the proxy's HTTP
//! stack, so that identity headers are replaced and path policy applies; only what
//! cannot be HTTP is carried as bytes. A caller cannot skip that by waiting: the
//! stream is opaque only when the app speaks first (a server-first protocol) or the
//! caller never speaks.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// How long a caller may be silent before the app is connected to see whether it
/// speaks first. Clients of client-first protocols send at once, so HTTP rarely
/// costs an app connection; a server-first protocol waits this much longer.
const GRACE: Duration = Duration::from_millis(20);
/// The longest request line (and leading empty lines) waited for; nginx's default
/// limit is 8 KiB.
const MAX_REQUEST_LINE: usize = 64 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection turned out to be, with the bytes read to tell.
pub enum Sniffed {
    Http1(Bytes),
    Http2(Bytes),
    Opaque {
        prefix: Bytes,
        /// The app connection made to see whether it speaks first, if one was made.
        app: Option<TcpStream>,
    },
}

/// Reads until the caller's protocol is known: HTTP/1, HTTP/2 prior knowledge, or
/// opaque (not HTTP, the app spoke first, or `timeout` passed in silence).
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    app: SocketAddr,
    connect_timeout: Duration,
    timeout: Duration,
) -> io::Result<Sniffed> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let grace = tokio::time::Instant::now() + GRACE.min(timeout);
    let mut app_conn: Option<TcpStream> = None;
    let mut tried_app = false;
    loop {
        if let Some(kind) = classify(&buf) {
            let prefix = buf.freeze();
            return Ok(match kind {
                Kind::Http1 => Sniffed::Http1(prefix),
                Kind::Http2 => Sniffed::Http2(prefix),
                Kind::Opaque => Sniffed::Opaque {
                    prefix,
                    app: app_conn,
                },
            });
        }
        let silent = buf.is_empty();
        if silent && !tried_app && tokio::time::Instant::now() >= grace {
            tried_app = true;
            app_conn = tokio::time::timeout(connect_timeout, TcpStream::connect(app))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let app_spoke = async {
            match (&app_conn, silent) {
                (Some(app), true) => app.readable().await,
                _ => std::future::pending().await,
            }
        };
        let until = if tried_app || !silent {
            deadline
        } else {
            grace
        };
        tokio::select! {
            read = stream.read_buf(&mut buf) => {
                if read? == 0 {
                    // Closed by the caller: whatever came is not a request to serve.
                    return Ok(Sniffed::Opaque { prefix: buf.freeze(), app: app_conn });
                }
            }
            _ = app_spoke => {
                return Ok(Sniffed::Opaque { prefix: buf.freeze(), app: app_conn });
            }
            _ = tokio::time::sleep_until(until) => {
                if until == deadline {
                    return Ok(Sniffed::Opaque { prefix: buf.freeze(), app: app_conn });
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http1,
    Http2,
    Opaque,
}

/// `None` while more bytes are needed. Lenient on purpose: whatever a lenient
/// server (leading empty lines, bare LF, any method token, lowercase `http`) would
/// parse as an HTTP/1 request line is HTTP here too.
fn classify(buf: &[u8]) -> Option<Kind> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Kind::Http2);
    }
    let start = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buf.len());
    let line = &buf[start..];
    // method SP target SP version, each part checked as soon as it is there.
    let mut parts = 0;
    let mut part_start = 0;
    for (i, &b) in line.iter().enumerate() {
        match b {
            b'\n' => {
                let end = if i > 0 && line[i - 1] == b'\r' {
                    i - 1
                } else {
                    i
                };
                let ok = parts == 2 && is_version(&line[part_start..end]);
                return Some(if ok { Kind::Http1 } else { Kind::Opaque });
            }
            b' ' => {
                if i == part_start || parts == 2 {
                    return Some(Kind::Opaque);
                }
                parts += 1;
                part_start = i + 1;
            }
            b'\r' if line.get(i + 1).is_none_or(|next| *next == b'\n') => {}
            0..=0x1f | 0x7f => return Some(Kind::Opaque),
            _ if parts == 0 && !is_tchar(b) => return Some(Kind::Opaque),
            _ => {}
        }
    }
    (start + line.len() >= MAX_REQUEST_LINE).then_some(Kind::Opaque)
}

fn is_version(v: &[u8]) -> bool {
    v.len() >= 6
        && v[..5].eq_ignore_ascii_case(b"HTTP/")
        && v[5..].iter().all(|b| b.is_ascii_digit() || *b == b'.')
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_a_lenient_server_would_parse() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\r\n\r\nGET /admin HTTP/1.1\r\n",
            b"get /admin http/1.0\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"GET /a\\b%zz HTTP/1.1\r\n",
            b"GET http://x/admin HTTP/1.1\r\n",
        ] {
            assert_eq!(
                classify(http),
                Some(Kind::Http1),
                "{:?}",
                String::from_utf8_lossy(http)
            );
        }
        for opaque in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"\0\0\0\x08\x04\xd2\x16\x2f",
            b"PING\r\n",
            b"HELO mesh\r\n",
            b"a line of tcp\n",
            b"GET /x HTTP/1.1 extra\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\0\r\n",
        ] {
            assert_eq!(
                classify(opaque),
                Some(Kind::Opaque),
                "{:?}",
                String::from_utf8_lossy(opaque)
            );
        }
        for more in [
            &b"GET / HT"[..],
            b"\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"GET / HTTP/1.1\r",
        ] {
            assert_eq!(classify(more), None, "{:?}", String::from_utf8_lossy(more));
        }
        assert_eq!(classify(H2_PREFACE), Some(Kind::Http2));
        assert_eq!(classify(&[b'A'; MAX_REQUEST_LINE]), Some(Kind::Opaque));
    }

    #[tokio::test]
    async fn a_server_first_app_makes_the_stream_opaque_without_waiting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"220 ready\r\n")
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let (_client, mut server) = tokio::io::duplex(64);
        // An hour of detection timeout: only the app's greeting can end this.
        let sniffed = sniff(
            &mut server,
            app,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        let sniffed = tokio::time::timeout(Duration::from_secs(30), sniffed)
            .await
            .expect("waited for the caller although the app spoke first")
            .unwrap();
        assert!(matches!(sniffed, Sniffed::Opaque { app: Some(_), .. }));
    }

    #[tokio::test]
    async fn a_late_request_is_still_http() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let app = unused.local_addr().unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let sniffed = sniff(
            &mut server,
            app,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(matches!(sniffed, Sniffed::Http1(p) if p.starts_with(b"GET /")));
    }
}
