//! The zero-trust test pieces: a server that judges paths the way nginx does and
//! reports which identity headers reached it, and a raw client that sends request
//! targets and headers exactly as an attacker would.

use std::convert::Infallible;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const XFCC: &str = "x-forwarded-client-cert";
const ECHO_PROTOCOL: &str = "trellis-echo";

pub async fn serve(listen: &str) -> Result<()> {
    let listener = super::bind(listen).await?;
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(answer(req)) });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
}

fn answer(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(path) = nginx_path(req.uri().path()) else {
        return plain(StatusCode::BAD_REQUEST, "bad path\n".to_owned());
    };
    let xfcc: Vec<String> = req
        .headers()
        .get_all(XFCC)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(ECHO_PROTOCOL.as_bytes()));
    if upgrade {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let (read, mut write) = tokio::io::split(TokioIo::new(upgraded));
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, ECHO_PROTOCOL)
            .header("x-seen-path", path.as_str())
            .header("x-seen-xfcc", xfcc.join(" | "))
            .body(Full::default());
        return response
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, String::new()));
    }
    let mut body = format!(
        "path={path}\nraw={}\nquery={}\n",
        req.uri().path(),
        req.uri().query().unwrap_or_default()
    );
    for value in &xfcc {
        body.push_str(&format!("xfcc={value}\n"));
    }
    // What virtual hosts and gRPC servers route on: `:authority`, else `Host`.
    let authority = match req.uri().authority() {
        Some(authority) => authority.to_string(),
        None => req
            .headers()
            .get(hyper::header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    body.push_str(&format!("authority={authority}\n"));
    plain(StatusCode::OK, body)
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// nginx's view of a request path: every escape decoded (`%2F` becomes a separator),
/// runs of slashes merged, dot segments resolved; `None` (400) for a bad escape or
/// `..` above the root.
fn nginx_path(raw: &str) -> Option<String> {
    let raw = raw.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(raw[i]);
            i += 1;
        }
    }
    let text = String::from_utf8_lossy(&decoded).into_owned();
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = text.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." | "" => {}
            ".." => {
                kept.pop()?;
            }
            s => {
                kept.push(s);
                continue;
            }
        }
        if i == last {
            kept.push("");
        }
    }
    Some(format!("/{}", kept.join("/")))
}

pub struct RawRequest {
    pub addr: String,
    pub host: String,
    pub target: String,
    pub method: String,
    pub headers: Vec<String>,
    pub upgrade: Option<String>,
    pub delay: std::time::Duration,
    pub leading_crlf: bool,
}

pub async fn send_http1(request: &RawRequest) -> Result<()> {
    let target = super::resolve(&request.addr)?;
    let mut stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {} ({target})", request.addr))?;
    tokio::time::sleep(request.delay).await;
    let mut head = String::from(if request.leading_crlf { "\r\n" } else { "" });
    head += &format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        request.method, request.target, request.host
    );
    match &request.upgrade {
        Some(protocol) => head.push_str(&format!("Connection: Upgrade\r\nUpgrade: {protocol}\r\n")),
        None => head.push_str("Connection: close\r\n"),
    }
    for header in &request.headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("no status line: {status_line:?}"))?
        .to_owned();
    println!("HTTP {status}");
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        println!("< {}", line.trim_end());
    }
    if request.upgrade.is_some() && status == "101" {
        reader.get_mut().write_all(b"ping\n").await?;
        let mut echoed = String::new();
        reader.read_line(&mut echoed).await?;
        println!("echo: {}", echoed.trim_end());
        return Ok(());
    }
    let mut body = Vec::new();
    reader.read_to_end(&mut body).await?;
    print!("{}", String::from_utf8_lossy(&body));
    Ok(())
}

pub async fn send_h2(request: &RawRequest) -> Result<()> {
    let target = super::resolve(&request.addr)?;
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {} ({target})", request.addr))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = Request::builder()
        .method(request.method.as_str())
        .uri(format!("http://{}{}", request.host, request.target));
    for header in &request.headers {
        let Some((name, value)) = header.split_once(':') else {
            bail!("header {header:?} is not `Name: value`");
        };
        builder = builder.header(name.trim(), value.trim());
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::new()))?)
        .await?;
    println!("HTTP {}", response.status().as_u16());
    for (name, value) in response.headers() {
        println!("< {name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    let body = response.into_body().collect().await?.to_bytes();
    print!("{}", String::from_utf8_lossy(&body));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::nginx_path;

    #[test]
    fn paths_as_nginx_sees_them() {
        for (raw, want) in [
            ("/admin/x", Some("/admin/x")),
            ("//admin/x", Some("/admin/x")),
            ("/%61dmin/x", Some("/admin/x")),
            ("/./admin/x", Some("/admin/x")),
            ("/x/../admin/x", Some("/admin/x")),
            ("/admin%2Fx", Some("/admin/x")),
            ("/x/%2e%2e/admin", Some("/admin")),
            ("/public/", Some("/public/")),
            ("/..", None),
            ("/%zz", None),
        ] {
            assert_eq!(nginx_path(raw).as_deref(), want, "{raw}");
        }
    }
}
