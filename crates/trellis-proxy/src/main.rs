use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trellis_identity::SpiffeId;
use trellis_proxy::config::PortSet;
use trellis_proxy::{OutboundPolicy, ProxyConfig, Upstream, ports};

/// The Trellis sidecar proxy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Write the Pod's traffic redirection rules, as the init container does.
    Init(trellis_init::InitArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[arg(long, env = "TRELLIS_NAMESPACE")]
    namespace: String,
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT")]
    service_account: String,
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// trellis-control's gRPC address (host:port).
    #[arg(long, env = "TRELLIS_CONTROL_ADDR", default_value = "127.0.0.1:15010")]
    control_addr: String,
    /// The name in the control plane's certificate.
    #[arg(long, env = "TRELLIS_CONTROL_NAME", default_value = "trellis-control")]
    control_server_name: String,
    /// PEM file with the root that signs the control plane's certificate.
    #[arg(long, env = "TRELLIS_CA_ROOT")]
    ca_root: PathBuf,
    /// File holding the bootstrap token (file registry).
    #[arg(long, env = "TRELLIS_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Projected service-account token (audience trellis-ca), the proof of identity
    /// on Kubernetes; used when no bootstrap token is given.
    #[arg(
        long,
        env = "TRELLIS_SERVICE_ACCOUNT_TOKEN_FILE",
        default_value = "/var/run/secrets/trellis/tokens/trellis-ca-token"
    )]
    service_account_token_file: PathBuf,
    /// Requested certificate lifetime (the CA may shorten it).
    #[arg(long, value_parser = humantime::parse_duration)]
    cert_ttl: Option<Duration>,
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::INBOUND)))]
    inbound_addr: SocketAddr,
    /// Transparent outbound listener (with `trellis-proxy init`). Off when only
    /// explicit upstreams are used.
    #[arg(long)]
    outbound_addr: Option<SocketAddr>,
    /// Explicit outbound listeners: NAME.NAMESPACE:PORT=LISTEN_ADDR (repeatable).
    #[arg(long = "upstream")]
    upstreams: Vec<Upstream>,
    #[arg(long, value_enum, default_value = "ALLOW_ANY")]
    outbound_policy: OutboundPolicy,
    /// Where inbound traffic is delivered.
    #[arg(long, default_value = "127.0.0.1")]
    app_host: IpAddr,
    /// App port for inbound connections that were not redirected (no iptables).
    #[arg(long)]
    app_port: Option<u16>,
    /// Health, metrics and app probes for the kubelet (e.g. 0.0.0.0:15020); off
    /// unless given.
    #[arg(long, env = "TRELLIS_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// App probes moved to the health port by the injector (JSON).
    #[arg(long, env = "TRELLIS_APP_PROBES")]
    app_probes: Option<String>,
    /// The Pod's own Prometheus annotations (JSON), saved by the injector: the app's
    /// metrics are scraped on localhost and served with the proxy's on the health
    /// port's /metrics.
    #[arg(long, env = "TRELLIS_APP_METRICS")]
    app_metrics: Option<String>,
    /// Admin listener; keep it on loopback.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)))]
    admin_addr: SocketAddr,
    /// How long to wait for a client's first bytes before carrying the connection as
    /// opaque TCP (server-first protocols such as MySQL send nothing first).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    detect_timeout: Duration,
    /// Outbound destination ports carried as opaque TCP with no protocol detection
    /// (server-first protocols), unless the Service port declares an appProtocol.
    /// Comma-separated ports and ranges; empty for none.
    #[arg(long, env = "TRELLIS_OPAQUE_PORTS", default_value_t = PortSet::default_opaque())]
    opaque_ports: PortSet,
    /// How inbound request paths are normalized before authorization (the app gets
    /// the normalized path): NONE, BASE (RFC 3986: decode unreserved characters,
    /// remove dot segments), MERGE_SLASHES (BASE and `//` to `/`), or
    /// DECODE_AND_MERGE_SLASHES (also `%2F`, `%5C` and `\` to `/`). Ambiguous paths
    /// get 400.
    #[arg(
        long,
        env = "TRELLIS_PATH_NORMALIZATION",
        value_enum,
        default_value = "MERGE_SLASHES"
    )]
    path_normalization: trellis_proxy::http::normalize::PathNormalization,
    /// How long open connections may take to finish after SIGTERM.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Deliver inbound traffic to the app on localhost instead of the pod address
    /// the caller dialed: for apps that listen only on 127.0.0.1 (the injector sets
    /// it from the annotation `trellis.io/inbound-to-localhost: "true"`).
    #[arg(
        long,
        env = "TRELLIS_INBOUND_TO_LOCALHOST",
        action = clap::ArgAction::SetTrue,
        value_parser = parse_opt_in
    )]
    inbound_to_localhost: bool,
    /// Access logs, one JSON line per request or TCP connection: `stdout`, a file
    /// path, or `off` (the injector sets it from `trellis.io/access-log`).
    #[arg(long, env = "TRELLIS_ACCESS_LOG", default_value = "off")]
    access_log: String,
    /// Export a CLIENT and a SERVER span per request to this OTLP/gRPC collector
    /// (`http://host:4317`); empty, the default: tracing off, headers untouched (the
    /// injector sets it from the control plane's `--otlp-endpoint`).
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT", default_value = "")]
    otlp_endpoint: String,
    /// Percent of new traces recorded (callers' sampling decisions are followed).
    #[arg(long, env = "TRELLIS_TRACE_SAMPLING", default_value_t = 1.0, value_parser = parse_percent)]
    trace_sampling: f64,
    /// Worker threads (0: one per core).
    #[arg(long, env = "TRELLIS_WORKERS", default_value_t = 1)]
    workers: usize,
}

/// A flag that may also come from an env var the injector fills from an annotation
/// (empty when the annotation is absent): empty means off, and a value that is not
/// clearly yes or no is refused rather than guessed.
fn parse_opt_in(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "false" | "no" | "off" | "0" => Ok(false),
        "true" | "yes" | "on" | "1" => Ok(true),
        other => Err(format!("{other:?} is neither true nor false")),
    }
}

/// A percentage, 0 to 100 (Istio's unit for trace sampling).
fn parse_percent(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{value:?} is not a percentage from 0 to 100")),
    }
}

fn main() -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    tracing_subscriber::fmt()
        // Colour only for a person at a terminal: container logs keep plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .finish()
        .with(trellis_identity::log_filter(
            tracing::level_filters::LevelFilter::INFO,
        ))
        .init();
    match Cli::parse().command {
        Command::Init(args) => {
            let text = args.execute().context("trellis-proxy init")?;
            print!("{text}");
            Ok(())
        }
        Command::Run(args) => {
            let mut runtime = if args.workers == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if args.workers > 1 {
                    b.worker_threads(args.workers);
                }
                b
            };
            runtime.enable_all().build()?.block_on(run(*args))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let args_drain = args.drain;
    let identity = SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
        .context("workload identity")?;
    let root = std::fs::read_to_string(&args.ca_root)
        .with_context(|| format!("reading --ca-root {}", args.ca_root.display()))?;
    let mut config = ProxyConfig::new(identity, args.control_addr, root);
    config.control_server_name = args.control_server_name;
    config.bootstrap_token = match &args.bootstrap_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --bootstrap-token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("TRELLIS_BOOTSTRAP_TOKEN").ok(),
    };
    config.service_account_token_file = Some(args.service_account_token_file);
    config.cert_ttl = args.cert_ttl;
    config.inbound_addr = args.inbound_addr;
    config.outbound_addr = args.outbound_addr;
    config.upstreams = args.upstreams;
    config.outbound_policy = args.outbound_policy;
    config.app_host = args.app_host;
    config.app_port = args.app_port;
    config.admin_addr = args.admin_addr;
    config.health_addr = args.health_addr;
    config.detect_timeout = args.detect_timeout;
    config.opaque_ports = args.opaque_ports;
    config.path_normalization = args.path_normalization;
    config.inbound_to_localhost = args.inbound_to_localhost;
    config.access_log = trellis_proxy::access_log::AccessLogTarget::parse_option(&args.access_log)
        .context("--access-log")?;
    if !args.otlp_endpoint.trim().is_empty() {
        let mut trace = trellis_proxy::trace::TraceConfig::new(args.otlp_endpoint.trim());
        trace.sampling_ratio = args.trace_sampling / 100.0;
        config.tracing = Some(trace);
    }
    if let Some(json) = &args.app_probes {
        config.app_probes =
            trellis_proxy::health::parse_app_probes(json).context("TRELLIS_APP_PROBES")?;
    }
    if let Some(json) = &args.app_metrics {
        config.app_metrics = Some(
            trellis_proxy::app_metrics::AppMetrics::from_annotations(json)
                .context("TRELLIS_APP_METRICS")?,
        );
    }
    if !config.admin_addr.ip().is_loopback() {
        tracing::warn!(admin = %config.admin_addr, "admin is not on loopback: it exposes config and metrics");
    }
    let proxy = trellis_proxy::start(config).await?;
    tracing::info!(admin = %proxy.admin_addr, inbound = %proxy.inbound_addr, "proxy started");
    shutdown_signal().await;
    tracing::info!(grace = ?args_drain, "draining");
    proxy.shutdown(args_drain).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let base = [
            "trellis-proxy",
            "run",
            "--namespace",
            "default",
            "--service-account",
            "web",
            "--ca-root",
            "/dev/null",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        match cli.command {
            Command::Run(args) => Ok(*args),
            Command::Init(_) => unreachable!("parsed run"),
        }
    }

    #[test]
    fn opaque_ports_default_to_linkerds_list_and_refuse_nonsense() {
        let args = run_args(&[]).unwrap();
        assert_eq!(args.opaque_ports, PortSet::default_opaque());
        let args = run_args(&["--opaque-ports", "3306,8000-8001"]).unwrap();
        assert_eq!(
            args.opaque_ports.iter().collect::<Vec<_>>(),
            [3306, 8000, 8001]
        );
        let args = run_args(&["--opaque-ports", ""]).unwrap();
        assert_eq!(args.opaque_ports, PortSet::default());
        let err = run_args(&["--opaque-ports", "25,smtp"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"smtp\" is not a port number"), "{err}");
    }

    #[test]
    fn path_normalization_defaults_to_merge_slashes_and_refuses_unknown_levels() {
        use trellis_proxy::http::normalize::PathNormalization;
        let args = run_args(&[]).unwrap();
        assert_eq!(args.path_normalization, PathNormalization::MergeSlashes);
        let args = run_args(&["--path-normalization", "DECODE_AND_MERGE_SLASHES"]).unwrap();
        assert_eq!(
            args.path_normalization,
            PathNormalization::DecodeAndMergeSlashes
        );
        let err = run_args(&["--path-normalization", "SOMETIMES"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MERGE_SLASHES"), "{err}");
    }

    #[test]
    fn inbound_to_localhost_is_off_unless_asked_for() {
        assert!(!run_args(&[]).unwrap().inbound_to_localhost);
        assert!(
            run_args(&["--inbound-to-localhost"])
                .unwrap()
                .inbound_to_localhost
        );
        assert_eq!(parse_opt_in(""), Ok(false));
        assert_eq!(parse_opt_in("True"), Ok(true));
        assert!(parse_opt_in("maybe").is_err());
    }

    #[test]
    fn the_access_log_is_off_unless_asked_for() {
        use trellis_proxy::access_log::AccessLogTarget;
        let off = run_args(&[]).unwrap().access_log;
        assert_eq!(AccessLogTarget::parse_option(&off), Ok(None));
        let on = run_args(&["--access-log", "stdout"]).unwrap().access_log;
        assert_eq!(
            AccessLogTarget::parse_option(&on),
            Ok(Some(AccessLogTarget::Stdout))
        );
    }

    #[test]
    fn tracing_is_off_unless_an_endpoint_is_given() {
        let args = run_args(&[]).unwrap();
        assert_eq!(args.otlp_endpoint, "");
        assert_eq!(args.trace_sampling, 1.0);
        let args = run_args(&[
            "--otlp-endpoint",
            "http://collector:4317",
            "--trace-sampling",
            "12.5",
        ])
        .unwrap();
        assert_eq!(args.otlp_endpoint, "http://collector:4317");
        assert_eq!(args.trace_sampling, 12.5);
        for bad in ["101", "-1", "lots"] {
            assert!(run_args(&["--trace-sampling", bad]).is_err(), "{bad}");
        }
    }
}
