//! Readiness probes (`trellis-bench wait`): poll until a listener answers, an HTTP GET
//! gets 200, a gRPC echo call gets `grpc-status: 0`, or a TCP echo comes back, within a time limit. Used inside pods, where the
//! suite cannot connect from its own namespace.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::{BenchError, Result};

/// What "ready" means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection is accepted.
    Tcp(SocketAddr),
    /// Four bytes sent come back.
    TcpEcho(SocketAddr),
    /// `GET path` answers `200`.
    Http {
        addr: SocketAddr,
        host: String,
        path: String,
    },
    /// A gRPC echo call over HTTP/2 succeeds.
    Grpc { addr: SocketAddr, host: String },
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Tcp(a) => write!(f, "tcp {a}"),
            Probe::TcpEcho(a) => write!(f, "tcp echo {a}"),
            Probe::Http { addr, path, .. } => write!(f, "http://{addr}{path}"),
            Probe::Grpc { addr, .. } => write!(f, "grpc {addr}"),
        }
    }
}

/// Time limit of one attempt.
const ATTEMPT: Duration = Duration::from_secs(1);
/// Pause between attempts.
const POLL: Duration = Duration::from_millis(50);

async fn attempt(probe: &Probe) -> Result<()> {
    match probe {
        Probe::Tcp(addr) => {
            TcpStream::connect(addr).await?;
            Ok(())
        }
        Probe::TcpEcho(addr) => {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            if &buf == b"ping" {
                Ok(())
            } else {
                Err(BenchError::Setup(format!("{probe}: echo returned {buf:?}")))
            }
        }
        Probe::Grpc { addr, host } => crate::grpc::echo_once(*addr, host, 16).await,
        Probe::Http { addr, host, path } => {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut head = Vec::with_capacity(64);
            let mut buf = [0u8; 512];
            while !head.contains(&b'\n') && head.len() < 4096 {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let line = String::from_utf8_lossy(&head);
            let status = line.split_whitespace().nth(1).unwrap_or_default();
            if status == "200" {
                Ok(())
            } else {
                Err(BenchError::Setup(format!(
                    "{probe}: answered {:?}",
                    line.lines().next().unwrap_or_default()
                )))
            }
        }
    }
}

/// Polls `probe` until it succeeds or `timeout` passes; the error carries the last
/// failure.
pub async fn wait_until(probe: &Probe, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let why = match tokio::time::timeout(ATTEMPT, attempt(probe)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "attempt timed out".to_string(),
        };
        if Instant::now() + POLL >= deadline {
            return Err(BenchError::Setup(format!(
                "{probe} not ready within {timeout:?}: {why}"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{spawn_http_server, spawn_tcp_echo};

    #[tokio::test]
    async fn probes() {
        let lo = "127.0.0.1:0".parse().unwrap();
        let (http, _h) = spawn_http_server(lo, 16).await.unwrap();
        let (tcp, _t) = spawn_tcp_echo(lo).await.unwrap();
        let t = Duration::from_secs(5);
        wait_until(&Probe::Tcp(http), t).await.unwrap();
        wait_until(&Probe::TcpEcho(tcp), t).await.unwrap();
        let get = Probe::Http {
            addr: http,
            host: "bench".into(),
            path: "/".into(),
        };
        wait_until(&get, t).await.unwrap();
        let grpc = Probe::Grpc {
            addr: http,
            host: "bench".into(),
        };
        wait_until(&grpc, t).await.unwrap();
        // The TCP echo server does not speak HTTP/2.
        let not_grpc = Probe::Grpc {
            addr: tcp,
            host: "bench".into(),
        };
        assert!(
            wait_until(&not_grpc, Duration::from_millis(300))
                .await
                .is_err()
        );
        // Nobody listens here: fails within the limit.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let start = std::time::Instant::now();
        let e = wait_until(&Probe::Tcp(free), Duration::from_millis(300)).await;
        assert!(e.is_err());
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
