//! `trellis-bench`: load generator and benchmark servers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use trellis_bench::probe::{Probe, wait_until};
use trellis_bench::saturation::{SaturationConfig, find_saturation};
use trellis_bench::{
    Binaries, Mode, RunResult, SaturationOptions, Scenario, SuiteOptions, SuiteSettings,
    TopologyChoice, resolve_target, run_bench_suite, run_suite, server,
};

#[derive(Parser)]
#[command(name = "trellis-bench", version, about = "Trellis latency benchmark")]
struct Cli {
    /// Tokio worker threads (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one open-loop scenario against a target.
    Load(LoadArgs),
    /// Find the highest rate with p99 under a limit and no errors.
    Saturate(SaturateArgs),
    /// Every scenario in one run (baseline, trellis-http1/http2, haproxy-mtls,
    /// baseline-grpc, trellis-grpc, baseline-tcp, trellis-tcp), in network namespaces
    /// when root, written to --out.
    Suite(SuiteArgs),
    /// Instructions per request of each sidecar: one scenario at a low rate with the
    /// sidecars under callgrind (needs valgrind), written to --out.
    Callgrind(CallgrindArgs),
    /// Run a benchmark server until interrupted.
    #[command(subcommand)]
    Serve(ServeCommand),
    /// Wait until a listener is ready (used inside pods).
    Wait(WaitArgs),
    /// The control plane at scale: a simulated registry of N services served over
    /// real mTLS discovery to M clients, with churn; prints a markdown table.
    Scale(ScaleArgs),
    /// The control-plane process of `scale` (started by it).
    #[command(hide = true)]
    ScaleControl(ScaleControlArgs),
    /// How long a sidecar takes to apply discovery responses by mesh size (whole
    /// mesh, then single-endpoint changes); prints a markdown table.
    Apply(ApplyArgs),
}

#[derive(Args)]
struct ApplyArgs {
    /// Mesh sizes, in services (5 endpoints each).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    services: Vec<usize>,
    /// Single-endpoint changes applied after the whole mesh, per size.
    #[arg(long, default_value_t = 200)]
    changes: usize,
}

#[derive(Args)]
struct ScaleArgs {
    /// Mesh sizes to run, in services (5 endpoints each, 50 namespaces).
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    services: Vec<usize>,
    /// Discovery clients (one TLS connection and stream each, own certificate).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    flaps: usize,
    /// Services rolled pod by pod (five changes each).
    #[arg(long, default_value_t = 2)]
    rollouts: usize,
    #[arg(long, default_value_t = 10)]
    policy_edits: usize,
    #[arg(long, default_value_t = 5)]
    late_joiners: usize,
    /// Bound on the initial sync and on each change, seconds.
    #[arg(long, default_value = "120", value_parser = secs)]
    timeout: Duration,
    /// Also write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ScaleControlArgs {
    #[arg(long)]
    services: usize,
    #[arg(long)]
    state_dir: PathBuf,
}

#[derive(Args)]
struct WaitArgs {
    /// HTTP GET to `IP:PORT` must answer 200.
    #[arg(long, conflicts_with_all = ["tcp", "tcp_echo", "grpc"])]
    http: Option<SocketAddr>,
    /// A gRPC echo call to `IP:PORT` must answer `grpc-status: 0`.
    #[arg(long, conflicts_with_all = ["tcp", "tcp_echo"])]
    grpc: Option<SocketAddr>,
    /// Path for --http.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header (--http) or :authority (--grpc).
    #[arg(long, default_value = "bench")]
    host: String,
    /// A TCP connection to `IP:PORT` must be accepted.
    #[arg(long, conflicts_with = "tcp_echo")]
    tcp: Option<SocketAddr>,
    /// Four bytes sent to `IP:PORT` must come back.
    #[arg(long)]
    tcp_echo: Option<SocketAddr>,
    /// Give up after this many seconds.
    #[arg(long, default_value = "20", value_parser = secs)]
    timeout: Duration,
}

#[derive(Args)]
struct TargetArgs {
    /// Target, `IP:PORT` or `HOST:PORT` (resolved once).
    #[arg(long)]
    target: String,
    /// http1, http2, grpc (unary echo over HTTP/2), tcp.
    #[arg(long, default_value = "http1")]
    mode: Mode,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// TCP: message size; HTTP: response size asked for with `?size=`; gRPC: payload
    /// of the echoed message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Request path (HTTP; gRPC calls /trellis.bench.v1.Echo/Echo).
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header / :authority (default: the target address).
    #[arg(long)]
    host: Option<String>,
    /// Per-request timeout, seconds.
    #[arg(long, default_value = "1", value_parser = secs)]
    timeout: Duration,
    /// Hard cap on requests per run, warm-up included.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// Pacer busy-wait window before each due request, µs (0: sleep only; cheaper on
    /// CPU, requests released ~50–100 µs late).
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Offered rate, requests per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds.
    #[arg(long, default_value = "30", value_parser = secs)]
    duration: Duration,
    /// Warm-up seconds (discarded).
    #[arg(long, default_value = "5", value_parser = secs)]
    warmup: Duration,
    /// Scenario name in the reports.
    #[arg(long, default_value = "direct")]
    name: String,
    /// PIDs of proxies on the path, sampled from /proc (repeatable).
    #[arg(long = "proxy-pid")]
    proxy_pids: Vec<u32>,
    /// Folder for results.json, results.md and latency.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write this scenario's full report (JSON, with the percentile curve) here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
struct SaturateArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 1000.0)]
    start_rate: f64,
    #[arg(long, default_value_t = 256_000.0)]
    max_rate: f64,
    /// p99 limit, milliseconds.
    #[arg(long, default_value_t = 10.0)]
    p99_ms: f64,
    /// Measured seconds per step.
    #[arg(long, default_value = "3", value_parser = secs)]
    step: Duration,
    /// Warm-up seconds per step.
    #[arg(long, default_value = "1", value_parser = secs)]
    warmup: Duration,
    /// Total time budget, seconds.
    #[arg(long, default_value = "180", value_parser = secs)]
    budget: Duration,
}

#[derive(Subcommand)]
enum ServeCommand {
    /// HTTP/1.1 + HTTP/2 server answering 200 with `size` bytes (`?size=N` overrides),
    /// and gRPC echo calls.
    Http {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// TCP echo server.
    Tcp {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
    },
}

#[derive(Args)]
struct CallgrindArgs {
    #[arg(long, default_value = "trellis-http1")]
    scenario: String,
    /// A sidecar under callgrind serves a few hundred requests per second at most;
    /// saturating it would change the profile by batching.
    #[arg(long, default_value_t = 150.0)]
    rate: f64,
    #[arg(long, default_value = "20", value_parser = secs)]
    duration: Duration,
    #[arg(long, default_value = "3", value_parser = secs)]
    warmup: Duration,
    #[arg(long, default_value = "results-callgrind")]
    out: PathBuf,
}

#[derive(Args)]
struct SuiteArgs {
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Response (HTTP) or message (TCP) size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Measured seconds per scenario.
    #[arg(long, default_value = "30", value_parser = secs)]
    duration: Duration,
    #[arg(long, default_value = "5", value_parser = secs)]
    warmup: Duration,
    /// Per-request timeout, seconds.
    #[arg(long, default_value = "1", value_parser = secs)]
    timeout: Duration,
    /// Run every scenario this many times, round-robin, and report medians (3 is a
    /// good choice for published figures).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// Where results.json, results.md and latency.svg go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// auto (network namespaces when root, else loopback), netns, loopback.
    #[arg(long, default_value = "auto")]
    topology: TopologyChoice,
    /// Leave out the haproxy-mtls peer scenario.
    #[arg(long)]
    no_haproxy: bool,
    /// Run only these scenarios (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// After the fixed-rate runs, find each scenario's highest rate with p99 under
    /// --p99-ms and no errors.
    #[arg(long)]
    saturation: bool,
    /// Time budget of the whole saturation search, seconds (split between scenarios).
    #[arg(long, default_value = "480", value_parser = secs)]
    saturation_budget: Duration,
    /// Measured seconds per saturation step.
    #[arg(long, default_value = "3", value_parser = secs)]
    saturation_step: Duration,
    /// p99 limit of the saturation search, milliseconds.
    #[arg(long, default_value_t = 10.0)]
    p99_ms: f64,
    /// Start each Trellis sidecar under this command, e.g.
    /// "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p" (split on spaces).
    #[arg(long)]
    proxy_wrapper: Option<String>,
    /// Seconds each part of the mesh may take to come up.
    #[arg(long, default_value = "20", value_parser = secs)]
    ready_timeout: Duration,
}

/// Runs every scenario against a mesh started here.
async fn suite(args: SuiteArgs, threads: usize) -> anyhow::Result<()> {
    let settings = SuiteSettings {
        rate: args.rate,
        connections: args.connections,
        size: args.size,
        duration: args.duration,
        warmup: args.warmup,
        timeout: args.timeout,
        out_dir: Some(args.out.clone()),
        rounds: usize::try_from(args.rounds)?,
        ..SuiteSettings::default()
    };
    let mut opts = SuiteOptions::new(Binaries::beside_current_exe()?, settings);
    opts.topology = args.topology;
    opts.haproxy = !args.no_haproxy;
    opts.only = args.only;
    opts.loadgen_threads = threads;
    opts.ready_timeout = args.ready_timeout;
    opts.proxy_wrapper = args
        .proxy_wrapper
        .as_deref()
        .map(|w| w.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if args.saturation {
        opts.saturation = Some(SaturationOptions {
            total_budget: args.saturation_budget,
            step: args.saturation_step,
            p99_limit: Duration::from_secs_f64(args.p99_ms / 1000.0),
            ..SaturationOptions::default()
        });
    }
    // Ctrl-C drops the run, which stops every process and removes the namespaces.
    let report = tokio::select! {
        r = run_bench_suite(&opts) => r?,
        r = tokio::signal::ctrl_c() => {
            r?;
            bail!("interrupted; processes stopped and namespaces removed");
        }
    };
    for s in &report.scenarios {
        if let Some(why) = &s.failure {
            println!("{}: FAILED: {why}", s.result.scenario);
        }
        for p in &s.proxies {
            println!(
                "    {} proxy pid {}: {:.4} CPU s/1k req, {:.3} vCPU, peak RSS {} kB",
                s.result.scenario, p.pid, p.cpu_s_per_1k_req, p.vcpu, p.peak_rss_kb
            );
        }
    }
    println!("topology: {}", report.topology);
    println!("reports written to {}", args.out.display());
    Ok(())
}

async fn callgrind(args: CallgrindArgs, threads: usize) -> anyhow::Result<()> {
    use trellis_bench::callgrind;
    let dir = callgrind::profile_dir(&args.out)?;
    for stale in std::fs::read_dir(&dir)? {
        std::fs::remove_file(stale?.path())?;
    }
    let settings = SuiteSettings {
        rate: args.rate,
        duration: args.duration,
        warmup: args.warmup,
        // Requests are slow under callgrind, but they must not fail.
        timeout: Duration::from_secs(5),
        out_dir: Some(args.out.clone()),
        ..SuiteSettings::default()
    };
    let mut opts = SuiteOptions::new(Binaries::beside_current_exe()?, settings);
    opts.haproxy = false;
    opts.only = vec![args.scenario.clone()];
    opts.loadgen_threads = threads;
    opts.ready_timeout = Duration::from_secs(120);
    opts.proxy_wrapper = callgrind::wrapper(&dir);
    let report = run_bench_suite(&opts).await?;
    let Some(scenario) = report.scenarios.first() else {
        bail!("scenario {} did not run", args.scenario);
    };
    if let Some(why) = &scenario.failure {
        bail!("{}: {why}", args.scenario);
    }
    let r = &scenario.result;
    let requests = r.requests + r.errors + (args.rate * args.warmup.as_secs_f64()).round() as u64;
    let mut lines = vec![format!(
        "# Instructions per request ({}, {} rps, {} requests with warm-up, {} errors)\n\n| sidecar | pid | instructions | per request |\n|---|---|---|---|",
        args.scenario, args.rate, requests, r.errors
    )];
    for sidecar in callgrind::read_totals(&dir)? {
        lines.push(format!(
            "| {} | {} | {} | {:.1} k |",
            sidecar.service_account,
            sidecar.pid,
            sidecar.total,
            sidecar.total as f64 / requests.max(1) as f64 / 1000.0
        ));
    }
    let text = lines.join("\n") + "\n";
    print!("{text}");
    std::fs::write(args.out.join("callgrind.md"), text)?;
    Ok(())
}

async fn wait(args: WaitArgs) -> anyhow::Result<()> {
    let probe = match (args.http, args.grpc, args.tcp, args.tcp_echo) {
        (Some(addr), ..) => Probe::Http {
            addr,
            host: args.host,
            path: args.path,
        },
        (_, Some(addr), ..) => Probe::Grpc {
            addr,
            host: args.host,
        },
        (.., Some(addr), _) => Probe::Tcp(addr),
        (.., Some(addr)) => Probe::TcpEcho(addr),
        _ => bail!("one of --http, --grpc, --tcp, --tcp-echo"),
    };
    wait_until(&probe, args.timeout).await?;
    println!("ready: {probe}");
    Ok(())
}

fn secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .finish()
        .with(trellis_identity::log_filter(
            tracing::level_filters::LevelFilter::INFO,
        ))
        .init();
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cli.threads > 0 {
        rt.worker_threads(cli.threads);
    }
    rt.build()?.block_on(async move {
        match cli.command {
            Command::Load(args) => load(args).await,
            Command::Suite(args) => suite(args, cli.threads).await,
            Command::Callgrind(args) => callgrind(args, cli.threads).await,
            Command::Wait(args) => wait(args).await,
            Command::Saturate(args) => saturate(args).await,
            Command::Serve(cmd) => serve(cmd).await,
            Command::Scale(args) => scale(args).await,
            Command::Apply(args) => {
                let mut rows = Vec::new();
                for services in args.services {
                    rows.push(trellis_bench::apply::measure(services, args.changes)?);
                }
                println!("{}", trellis_bench::apply::markdown(&rows));
                Ok(())
            }
            Command::ScaleControl(args) => {
                Ok(trellis_bench::scale::serve_control(args.services, args.state_dir).await?)
            }
        }
    })
}

async fn scale(args: ScaleArgs) -> anyhow::Result<()> {
    let work_dir = std::env::temp_dir().join(format!("trellis-scale-{}", std::process::id()));
    let mut rows = Vec::new();
    for services in &args.services {
        let options = trellis_bench::scale::ScaleOptions {
            services: *services,
            clients: args.clients,
            flaps: args.flaps,
            rollouts: args.rollouts,
            policy_edits: args.policy_edits,
            late_joiners: args.late_joiners,
            timeout: args.timeout,
            work_dir: work_dir.clone(),
        };
        let row = trellis_bench::scale::run_scale(&options)
            .await
            .with_context(|| format!("{services} services"))?;
        eprintln!(
            "{}",
            trellis_bench::scale::markdown(std::slice::from_ref(&row))
        );
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&work_dir);
    println!("{}", trellis_bench::scale::markdown(&rows));
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn settings(t: &TargetArgs) -> anyhow::Result<(SocketAddr, SuiteSettings)> {
    let addr = resolve_target(&t.target).await?;
    let s = SuiteSettings {
        connections: t.connections,
        size: t.size,
        timeout: t.timeout,
        max_requests: t.max_requests,
        pacer_spin: Duration::from_micros(t.spin_us),
        path: t.path.clone(),
        host: t.host.clone(),
        baseline: None,
        ..SuiteSettings::default()
    };
    Ok((addr, s))
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let (addr, base) = settings(&args.target).await?;
    let settings = SuiteSettings {
        rate: args.rate,
        duration: args.duration,
        warmup: args.warmup,
        out_dir: args.out.clone(),
        ..base
    };
    let scenario = Scenario::new(args.name, addr, args.target.mode).with_proxies(args.proxy_pids);
    let report = run_suite(std::slice::from_ref(&scenario), &settings).await?;
    let Some(s) = report.scenarios.first() else {
        bail!("no result");
    };
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(s)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", s.result.table_line());
    println!("{}", serde_json::to_string_pretty(&s.result)?);
    for p in &s.proxies {
        println!(
            "proxy pid {}: {:.4} CPU s/1k req, {:.3} vCPU, rss {} kB, peak {} kB",
            p.pid, p.cpu_s_per_1k_req, p.vcpu, p.rss_kb, p.peak_rss_kb
        );
    }
    if let Some(dir) = &args.out {
        println!("reports written to {}", dir.display());
    }
    if let Some(why) = &s.failure {
        bail!("{why}");
    }
    Ok(())
}

async fn saturate(args: SaturateArgs) -> anyhow::Result<()> {
    let (addr, base) = settings(&args.target).await?;
    let scenario = Scenario::new("saturation", addr, args.target.mode);
    let cfg = SaturationConfig {
        start_rate: args.start_rate,
        max_rate: args.max_rate,
        p99_limit_us: (args.p99_ms * 1000.0).round() as u64,
        budget: args.budget,
        step_estimate: args.step + args.warmup + base.pause,
        ..SaturationConfig::default()
    };
    let result = find_saturation(&cfg, |rate| {
        let settings = SuiteSettings {
            rate,
            duration: args.step,
            warmup: args.warmup,
            ..base.clone()
        };
        let scenario = scenario.clone();
        async move {
            let r = trellis_bench::suite::run_scenario(&scenario, &settings).await?;
            tokio::time::sleep(settings.pause).await;
            Ok::<RunResult, trellis_bench::BenchError>(r.result)
        }
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    match result.best_rate {
        Some(rate) => println!("saturation: {rate} rps"),
        None => println!("saturation: no rate passed"),
    }
    Ok(())
}

async fn serve(cmd: ServeCommand) -> anyhow::Result<()> {
    let (addr, task) = match cmd {
        ServeCommand::Http { listen, size } => server::spawn_http_server(listen, size).await,
        ServeCommand::Tcp { listen } => server::spawn_tcp_echo(listen).await,
    }
    .context("bind")?;
    println!("listening on {addr}");
    tokio::select! {
        r = task => { r.context("server task")??; }
        r = tokio::signal::ctrl_c() => { r?; }
    }
    Ok(())
}
