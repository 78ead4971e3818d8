//! Helpers for the in-process loopback tests (`loopback.rs`, `policy.rs`, `l7.rs`):
//! they panic on failure, as a test should.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Ports handed out by [`free_port`]: below Linux's ephemeral range (32768-60999 by
/// default), so no test's outgoing connection can take one between the moment it is
/// handed out and the moment a listener binds it.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port free on 127.0.0.1 right now, never handed out twice in one process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    // Test binaries run one after another; starting from the pid spreads them anyway.
    let offset = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = TEST_PORTS.start + (offset + n) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?}")
}

/// A plain HTTP/1.0 GET (enough for admin endpoints): status and body. Bounded by
/// 5 s, so a hung server fails the test instead of stalling it.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
            .await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => panic!("GET {path} from {addr}: {e}"),
        Err(_) => panic!("GET {path} from {addr}: no answer within 5s"),
    };
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` every 20 ms until it holds, and says how long that took; panics
/// naming `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{what}: not true within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
