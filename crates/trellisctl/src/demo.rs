//! `trellisctl demo`: the quick start. Everything real — CA, certificates, discovery,
//! mTLS — on loopback, in one process, with the registry folder from `examples/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use trellis_control::ControlConfig;
use trellis_identity::SpiffeId;
use trellis_proxy::{ProxyConfig, RunningProxy, Upstream};

/// Where the example's pieces listen (they match examples/mesh/*.yaml).
const ECHO_APP: u16 = 18080;
const ECHO_SIDECAR_INBOUND: u16 = 15106;
const ECHO_SIDECAR_ADMIN: u16 = 15100;
const CLIENT_SIDECAR_ADMIN: u16 = 15200;
const CLIENT_UPSTREAM: u16 = 18081;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seconds of traffic; without it, runs until Ctrl-C.
    #[arg(long)]
    duration: Option<u64>,
    /// Requests per second from the client.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// The registry folder.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/mesh"))]
    registry: PathBuf,
    /// Control plane gRPC (discovery + CA).
    #[arg(long, default_value = "127.0.0.1:15010")]
    control_addr: SocketAddr,
    /// Control plane admin.
    #[arg(long, default_value = "127.0.0.1:15014")]
    control_admin_addr: SocketAddr,
    /// Control plane debug views (what `trellisctl check --control-addr` and
    /// `proxy-status` read).
    #[arg(long, default_value = "127.0.0.1:15016")]
    control_debug_addr: SocketAddr,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let state = tempfile_dir()?;
    println!("Trellis demo: a local mesh on loopback\n");
    let options = trellis_control::server::ServeOptions {
        debug_addr: args.control_debug_addr,
        ..Default::default()
    };
    let control = trellis_control::server::start_with(
        ControlConfig {
            registry_dir: args.registry.clone(),
            state_dir: state.clone(),
            trust_domain: "cluster.local".into(),
            grpc_addr: args.control_addr,
            admin_addr: args.control_admin_addr,
            cert_ttl: Duration::from_secs(24 * 3600),
            server_names: vec!["trellis-control".into()],
        },
        options,
    )
    .await
    .context("starting the control plane")?;
    println!(
        "  control plane   discovery+CA {}  debug http://{}/proxies   registry {}",
        control.grpc_addr,
        control.debug_addr,
        args.registry.display()
    );

    tokio::spawn(echo_app(
        TcpListener::bind(("127.0.0.1", ECHO_APP))
            .await
            .with_context(|| format!("binding the echo app on 127.0.0.1:{ECHO_APP}"))?,
    ));
    let echo = sidecar(
        &control.root_pem,
        control.grpc_addr,
        "echo",
        "demo-echo-token",
        |c| {
            c.inbound_addr = SocketAddr::from(([127, 0, 0, 1], ECHO_SIDECAR_INBOUND));
            c.app_port = Some(ECHO_APP);
            c.admin_addr = SocketAddr::from(([127, 0, 0, 1], ECHO_SIDECAR_ADMIN));
        },
    )
    .await?;
    let client = sidecar(
        &control.root_pem,
        control.grpc_addr,
        "client",
        "demo-client-token",
        |c| {
            // The client's sidecar takes no inbound traffic here; any free port will do.
            c.inbound_addr = SocketAddr::from(([127, 0, 0, 1], 0));
            c.admin_addr = SocketAddr::from(([127, 0, 0, 1], CLIENT_SIDECAR_ADMIN));
            c.upstreams = vec![Upstream {
                service: "echo.demo".into(),
                port: 8080,
                listen: SocketAddr::from(([127, 0, 0, 1], CLIENT_UPSTREAM)),
            }];
        },
    )
    .await?;
    for (name, proxy) in [("echo", &echo), ("client", &client)] {
        tokio::time::timeout(Duration::from_secs(10), proxy.ready())
            .await
            .with_context(|| format!("the {name} sidecar did not become ready"))?;
    }
    for (name, proxy) in [("echo", &echo), ("client", &client)] {
        let tls = proxy.admin.tls.borrow().clone();
        if let Some(tls) = tls {
            let cert = tls.certificate();
            let hours = cert
                .not_after
                .duration_since(std::time::SystemTime::now())
                .map(|d| d.as_secs() / 3600)
                .unwrap_or_default();
            println!(
                "  {name:<7} sidecar  identity {}  (serial {}, expires in {hours} h)  admin http://{}/config_dump",
                cert.id,
                &cert.serial[..cert.serial.len().min(11)],
                proxy.admin_addr
            );
        }
    }
    println!(
        "\n  client app -> 127.0.0.1:{CLIENT_UPSTREAM} (client sidecar) =mTLS=> 127.0.0.1:{ECHO_SIDECAR_INBOUND} (echo sidecar) -> echo app 127.0.0.1:{ECHO_APP}\n"
    );

    let stats = drive_traffic(&args, &echo).await?;
    print_summary(&stats, &echo, &client);
    control.stop().await;
    let _ = std::fs::remove_dir_all(&state);
    if stats.ok == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

async fn sidecar(
    root_pem: &str,
    control: SocketAddr,
    sa: &str,
    token: &str,
    tune: impl FnOnce(&mut ProxyConfig),
) -> anyhow::Result<RunningProxy> {
    let id = SpiffeId::new("cluster.local", "demo", sa)?;
    let mut config = ProxyConfig::new(id, control.to_string(), root_pem.to_owned());
    config.bootstrap_token = Some(token.to_owned());
    tune(&mut config);
    trellis_proxy::start(config)
        .await
        .with_context(|| format!("starting the {sa} sidecar"))
}

/// The echo app: answers every request with who it is and what was asked.
async fn echo_app(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let body = format!("echo-1 answered {} {}\n", req.method(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Stats {
    ok: u64,
    failed: u64,
    latency: hdrhistogram::Histogram<u64>,
    elapsed: Duration,
}

async fn drive_traffic(args: &DemoArgs, echo: &RunningProxy) -> anyhow::Result<Stats> {
    let target = SocketAddr::from(([127, 0, 0, 1], CLIENT_UPSTREAM));
    let mut stats = Stats {
        ok: 0,
        failed: 0,
        latency: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)?,
        elapsed: Duration::ZERO,
    };
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = args
        .duration
        .map(|d| Instant::now() + Duration::from_secs(d));
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut sender = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    match deadline {
        Some(_) => println!(
            "  sending {} req/s for {} s ...",
            args.rate,
            args.duration.unwrap_or(0)
        ),
        None => println!("  sending {} req/s until Ctrl-C ...", args.rate),
    }
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => break,
        }
        let begun = Instant::now();
        match request(&mut sender, target).await {
            Ok(_) => {
                stats.ok += 1;
                let _ = stats.latency.record(begun.elapsed().as_micros() as u64);
            }
            Err(e) => {
                stats.failed += 1;
                sender = None;
                tracing::warn!(error = %e, "request failed");
            }
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            let callers = inbound_callers(echo);
            println!(
                "  [{:>4.0} s] {} ok, {} failed, p50 {:.2} ms, p99 {:.2} ms; echo sidecar saw {}",
                start.elapsed().as_secs_f64(),
                stats.ok,
                stats.failed,
                stats.latency.value_at_quantile(0.5) as f64 / 1000.0,
                stats.latency.value_at_quantile(0.99) as f64 / 1000.0,
                callers.join(", ")
            );
        }
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn request(sender: &mut Option<Sender>, target: SocketAddr) -> anyhow::Result<String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let Some(s) = sender.as_mut() else {
        bail!("no connection");
    };
    s.ready().await?;
    let req = Request::get("/hello")
        .header(hyper::header::HOST, "echo.demo.svc.cluster.local")
        .body(Empty::new())?;
    let response = tokio::time::timeout(Duration::from_secs(2), s.send_request(req)).await??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("status {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// "client-identity xN" from the echo sidecar's inbound metric.
fn inbound_callers(echo: &RunningProxy) -> Vec<String> {
    let metrics = echo.admin.metrics.encode();
    let callers: Vec<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("trellis_inbound_connections_total{peer_identity=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(id, n)| format!("{id} ({n} conn)"))
        .collect();
    if callers.is_empty() {
        vec!["no callers yet".into()]
    } else {
        callers
    }
}

fn print_summary(stats: &Stats, echo: &RunningProxy, client: &RunningProxy) {
    let id = |p: &RunningProxy| p.admin.config.identity.to_string();
    let ms = |q: f64| stats.latency.value_at_quantile(q) as f64 / 1000.0;
    println!("\nSummary");
    println!(
        "  who called whom   {} -> {} (service echo.demo:8080)",
        id(client),
        id(echo)
    );
    println!(
        "  verified by       the echo sidecar: caller {}",
        inbound_callers(echo).join(", ")
    );
    println!(
        "  requests          {} ok, {} failed in {:.1} s ({:.0} req/s)",
        stats.ok,
        stats.failed,
        stats.elapsed.as_secs_f64(),
        stats.ok as f64 / stats.elapsed.as_secs_f64().max(0.001)
    );
    if stats.ok > 0 {
        println!(
            "  latency           p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms  (client app, through both sidecars)",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            stats.latency.max() as f64 / 1000.0
        );
    }
    println!("  transport         TLS 1.3, mutual, ECDSA P-256 certificates from the Trellis CA");
}
