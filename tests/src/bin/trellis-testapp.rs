//! A small app to run inside test pods: HTTP and TCP echo servers and clients.
//!
//! Servers print `listening on ADDR` once they accept connections.

use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(
    name = "trellis-testapp",
    about = "Test servers and clients for Trellis pods"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 server: 200 with body `<name> <method> <path>`.
    HttpEcho {
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: String,
        /// Name put in every answer (and the `x-served-by` header).
        #[arg(long, default_value = "http-echo")]
        name: String,
    },
    /// HTTP/1.1 (with upgrades) and HTTP/2 prior knowledge server that treats paths
    /// as nginx does (percent-decodes everything, `%2F` included, merges slashes,
    /// resolves dot segments; 400 above the root) and answers 200 with
    /// `path=<that path>`, `raw=<path as received>`, `query=<query>`, one
    /// `xfcc=<value>` line per x-forwarded-client-cert it received and
    /// `authority=<:authority or Host>`. `Upgrade: trellis-echo` gets 101 (the same facts in `x-seen-path` and
    /// `x-seen-xfcc` headers), then the stream is echoed.
    HttpInspect {
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: String,
    },
    /// TCP line echo: answers each line with the same line (`<name>: line` with --name).
    TcpEcho {
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// HTTP/1.1 requests (GET unless `--method`) over one connection, `--count` times;
    /// prints `HTTP <status>` then the body.
    HttpGet {
        /// `http://host[:port][/path]`; the host is resolved via /etc/hosts.
        url: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Seconds allowed for everything.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Request method.
        #[arg(long, default_value = "GET")]
        method: String,
    },
    /// One raw request, target and headers sent exactly as given (attacker forms
    /// included); prints `HTTP <status>`, the headers as `< name: value`, the body.
    RawHttp {
        /// `host:port`; the host is resolved via /etc/hosts.
        addr: String,
        /// The request target, as sent.
        target: String,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        host: Option<String>,
        /// `Name: value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Ask to upgrade to this protocol; after a 101 sends `ping` and prints the
        /// echoed line as `echo: <line>`.
        #[arg(long)]
        upgrade: Option<String>,
        /// HTTP/2 prior knowledge instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
        /// Stay silent this long after connecting (outlasting protocol detection).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Send an empty line before the request line (lenient servers skip it).
        #[arg(long)]
        leading_crlf: bool,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Slowloris: keeps `--connections` connections to ADDR sending an HTTP request's
    /// headers a line per second, reopening any the server closes (after 500 ms), for
    /// `--seconds`. Prints `slow-headers: N opened` once each has connected once.
    SlowHeaders {
        addr: String,
        #[arg(long, default_value_t = 100)]
        connections: u32,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Steady GETs, one connection each, every `--interval-ms`, until `--count`,
    /// `--seconds` or `--stop-file` exists; prints each failure and a summary.
    HttpLoad {
        /// `http://host[:port][/path]`; the host is resolved via /etc/hosts.
        url: String,
        #[arg(long, default_value_t = 1000)]
        count: u32,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Seconds one request may take.
        #[arg(long, default_value_t = 5)]
        request_timeout: u64,
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
    },
    /// Open-loop GETs at `--rate` over `--connections` kept-alive connections, and
    /// `--streams` long-lived TCP echo streams to `--tcp`; every outcome goes to
    /// `--out` (see chaos_load.rs). For the chaos suite.
    ChaosLoad {
        /// `http://host[:port][/path]`; the host is resolved via /etc/hosts.
        url: String,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10_000)]
        count: u32,
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Seconds one request may take.
        #[arg(long, default_value_t = 5)]
        request_timeout: u64,
        /// `host:port` of a line echo server.
        #[arg(long)]
        tcp: Option<String>,
        #[arg(long, default_value_t = 4)]
        streams: u32,
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
        #[arg(long)]
        out: std::path::PathBuf,
        /// Pause the schedule after every N requests (0: never).
        #[arg(long, default_value_t = 0)]
        pause_every: u32,
        #[arg(long, default_value_t = 1000)]
        pause_ms: u64,
        #[arg(long, default_value_t = 0)]
        pause_spread_ms: u64,
    },
    /// Sends one line to a TCP server and prints the line it answers.
    TcpSend {
        addr: String,
        line: String,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::HttpEcho { listen, name } => http_echo(&listen, name).await,
        Cmd::TcpEcho { listen, name } => tcp_echo(&listen, name).await,
        Cmd::HttpInspect { listen } => inspect::serve(&listen).await,
        Cmd::RawHttp {
            addr,
            target,
            method,
            host,
            headers,
            upgrade,
            h2,
            delay_ms,
            leading_crlf,
            timeout,
        } => {
            let request = inspect::RawRequest {
                host: host.unwrap_or_else(|| addr.clone()),
                addr,
                target,
                method,
                headers,
                upgrade,
                delay: Duration::from_millis(delay_ms),
                leading_crlf,
            };
            within(timeout, async move {
                if h2 {
                    inspect::send_h2(&request).await
                } else {
                    inspect::send_http1(&request).await
                }
            })
            .await
        }
        Cmd::HttpGet {
            url,
            count,
            timeout,
            method,
        } => within(timeout, http_get(&url, count, &method)).await,
        Cmd::TcpSend {
            addr,
            line,
            timeout,
        } => within(timeout, tcp_send(&addr, &line)).await,
        Cmd::HttpLoad {
            url,
            count,
            interval_ms,
            seconds,
            request_timeout,
            stop_file,
        } => {
            load::run(load::Load {
                url,
                count,
                interval: Duration::from_millis(interval_ms),
                seconds,
                request_timeout: Duration::from_secs(request_timeout),
                stop_file,
            })
            .await
        }
        Cmd::ChaosLoad {
            url,
            rate,
            count,
            seconds,
            connections,
            request_timeout,
            tcp,
            streams,
            stop_file,
            out,
            pause_every,
            pause_ms,
            pause_spread_ms,
        } => {
            chaos_load::run(chaos_load::ChaosLoad {
                pause_every,
                pause: Duration::from_millis(pause_ms),
                pause_spread: Duration::from_millis(pause_spread_ms),
                url,
                rate,
                count,
                seconds,
                connections,
                request_timeout: Duration::from_secs(request_timeout),
                tcp,
                streams,
                stop_file,
                out,
            })
            .await
        }
        Cmd::SlowHeaders {
            addr,
            connections,
            seconds,
        } => slow_headers(&addr, connections, seconds).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[path = "trellis-testapp/chaos_load.rs"]
mod chaos_load;
#[path = "trellis-testapp/inspect.rs"]
mod inspect;
#[path = "trellis-testapp/load.rs"]
mod load;

async fn within(secs: u64, fut: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .map_err(|_| anyhow!("timed out after {secs}s"))?
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    // An address literal, IPv6 ones (`[fd00::1]:80`) included, is used as given.
    if let Ok(literal) = addr.parse::<SocketAddr>() {
        return Ok(literal);
    }
    addr.to_socket_addrs()
        .with_context(|| format!("resolve {addr}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| anyhow!("{addr} has no IPv4 address"))
}

async fn bind(listen: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(resolve(listen)?)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    Ok(listener)
}

async fn http_echo(listen: &str, name: String) -> Result<()> {
    let listener = bind(listen).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let name = name.clone();
                async move {
                    let body = format!("{name} {} {}\n", req.method(), req.uri().path());
                    let resp = Response::builder()
                        .header("x-served-by", name.as_str())
                        .header("content-type", "text/plain")
                        .body(Full::new(Bytes::from(body)));
                    Ok::<_, Infallible>(resp.unwrap_or_else(|_| Response::new(Full::default())))
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

async fn tcp_echo(listen: &str, name: Option<String>) -> Result<()> {
    let listener = bind(listen).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match &name {
                    Some(n) => format!("{n}: {line}\n"),
                    None => format!("{line}\n"),
                };
                if wr.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
            let _ = peer;
        });
    }
}

/// Splits `http://host[:port][/path]` into (`host:port`, host header, path).
fn parse_url(url: &str) -> Result<(String, String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        bail!("no host in {url}");
    }
    let addr = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_string(), path.to_string()))
}

async fn http_get(url: &str, count: u32, method: &str) -> Result<()> {
    let (addr, host, path) = parse_url(url)?;
    let target = resolve(&addr)?;
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {addr} ({target})"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut failures = 0;
    for _ in 0..count {
        let req = Request::builder()
            .method(method)
            .uri(path.as_str())
            .header("host", host.as_str())
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        println!("HTTP {}", status.as_u16());
        let text = String::from_utf8_lossy(&body);
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
        if !status.is_success() {
            failures += 1;
        }
    }
    if failures > 0 {
        bail!("{failures} of {count} requests failed");
    }
    Ok(())
}

async fn tcp_send(addr: &str, line: &str) -> Result<()> {
    let target = resolve(addr)?;
    let mut stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {addr} ({target})"))?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = String::new();
    BufReader::new(&mut stream).read_line(&mut reply).await?;
    if reply.is_empty() {
        bail!("connection closed without an answer");
    }
    print!("{reply}");
    Ok(())
}

async fn slow_headers(addr: &str, connections: u32, seconds: u64) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let target = resolve(addr)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let opened = Arc::new(AtomicU32::new(0));
    let first = Arc::new(AtomicU32::new(0));
    for _ in 0..connections {
        tokio::spawn(slow_client(target, deadline, opened.clone(), first.clone()));
    }
    while first.load(Ordering::Relaxed) < connections {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {} of {connections} connected",
                first.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("slow-headers: {connections} opened");
    tokio::time::sleep_until(deadline).await;
    println!(
        "slow-headers: {} connections made in all",
        opened.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn slow_client(
    target: SocketAddr,
    deadline: tokio::time::Instant,
    opened: std::sync::Arc<std::sync::atomic::AtomicU32>,
    first: std::sync::Arc<std::sync::atomic::AtomicU32>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncReadExt;
    let mut counted = false;
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect(target).await {
            opened.fetch_add(1, Ordering::Relaxed);
            if !counted {
                counted = true;
                first.fetch_add(1, Ordering::Relaxed);
            }
            let mut sent = stream.write_all(b"GET /ready HTTP/1.1\r\n").await.is_ok();
            let mut buf = [0u8; 256];
            while sent && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        sent = stream.write_all(b"x-slow: 1\r\n").await.is_ok();
                    }
                    // Closed or answered (408): the server let go.
                    _ = stream.read(&mut buf) => break,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls() {
        let (a, h, p) = parse_url("http://web.default.svc.cluster.local/x/y").unwrap();
        assert_eq!(a, "web.default.svc.cluster.local:80");
        assert_eq!(h, "web.default.svc.cluster.local");
        assert_eq!(p, "/x/y");
        let (a, _, p) = parse_url("http://10.0.0.1:8080").unwrap();
        assert_eq!((a.as_str(), p.as_str()), ("10.0.0.1:8080", "/"));
        assert!(parse_url("https://x").is_err());
    }
}
