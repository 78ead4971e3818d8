//! `trellis-bench suite`: picks the topology (network namespaces when root, loopback
//! otherwise), runs every scenario with the same load settings — in rounds, each round
//! running every scenario once — optionally searches each one's saturation rate, and
//! writes one report of medians.
//!
//! In network namespaces the load generator runs inside the scenario's client pod:
//! `ip netns exec <pod> trellis-bench load ... --json-out FILE`, whose
//! [`ScenarioReport`] (histogram curve included) is read back and merged.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::mesh::{Binaries, LoopbackMesh, LoopbackOptions, start_loopback_mesh};
use crate::netns::{NetnsMesh, NetnsOptions};
use crate::report::{Report, ScenarioReport, combine_rounds, core_count, utc_now};
use crate::saturation::{SaturationConfig, SaturationResult, find_saturation};
use crate::suite::{Scenario, SuiteSettings, run_scenario};
use crate::{BenchError, Mode, Result};

/// Which topology to run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyChoice {
    /// Network namespaces when root with `ip netns`, else loopback.
    Auto,
    Netns,
    Loopback,
}

impl std::str::FromStr for TopologyChoice {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "netns" => Ok(Self::Netns),
            "loopback" => Ok(Self::Loopback),
            other => Err(BenchError::Config(format!(
                "unknown topology {other:?} (auto, netns, loopback)"
            ))),
        }
    }
}

/// The saturation search run after the fixed-rate scenarios.
#[derive(Debug, Clone, PartialEq)]
pub struct SaturationOptions {
    /// Wall-clock budget for all scenarios together, split evenly between them.
    pub total_budget: Duration,
    /// Measured time and warm-up of each step.
    pub step: Duration,
    pub warmup: Duration,
    pub p99_limit: Duration,
    pub max_rate: f64,
}

impl Default for SaturationOptions {
    /// 8 minutes in all, 3 s steps after 1 s warm-up, p99 < 10 ms, at most 256k rps.
    fn default() -> Self {
        Self {
            total_budget: Duration::from_secs(480),
            step: Duration::from_secs(3),
            warmup: Duration::from_secs(1),
            p99_limit: Duration::from_millis(10),
            max_rate: 256_000.0,
        }
    }
}

/// Everything a suite run needs.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Load settings; `out_dir` is where the reports go.
    pub settings: SuiteSettings,
    pub binaries: Binaries,
    pub topology: TopologyChoice,
    /// Include `haproxy-mtls` when haproxy is installed.
    pub haproxy: bool,
    pub saturation: Option<SaturationOptions>,
    /// Run only these scenarios (all when empty).
    pub only: Vec<String>,
    /// Runs each Trellis sidecar as `wrapper... trellis-proxy ...` (profilers).
    pub proxy_wrapper: Vec<String>,
    /// Load generator worker threads (0: one per core).
    pub loadgen_threads: usize,
    /// How long each part of the mesh may take to come up.
    pub ready_timeout: Duration,
}

impl SuiteOptions {
    /// Defaults for `binaries` and `settings`: auto topology, haproxy when installed,
    /// no saturation search.
    pub fn new(binaries: Binaries, settings: SuiteSettings) -> Self {
        Self {
            settings,
            binaries,
            topology: TopologyChoice::Auto,
            haproxy: true,
            saturation: None,
            only: Vec::new(),
            proxy_wrapper: Vec::new(),
            loadgen_threads: 0,
            ready_timeout: Duration::from_secs(20),
        }
    }
}

/// Where a scenario's load generator runs.
#[derive(Debug, Clone)]
enum Where {
    /// In this process (loopback).
    Here,
    /// `ip netns exec <netns> trellis-bench load ...`.
    Pod { netns: String },
}

/// The running system under test.
enum Topology {
    Loopback { _mesh: LoopbackMesh, work: PathBuf },
    Netns(NetnsMesh),
}

impl Topology {
    /// The Trellis sidecars' PIDs.
    fn proxy_pids(&self) -> Vec<u32> {
        match self {
            Topology::Loopback { _mesh: m, .. } => vec![
                m.client_proxy_pid,
                m.server_proxy_pid,
                m.server_tcp_proxy_pid,
            ],
            Topology::Netns(m) => m.mesh_proxies.to_vec(),
        }
    }
}

/// Whether `pid` has exited (gone, or a zombie waiting to be reaped).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rfind(')')
            .and_then(|i| stat.get(i + 1..))
            .and_then(|rest| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X")
    })
}

/// Asks each process to stop (SIGTERM) and waits up to `limit` for all of them, so a
/// profiler wrapping them writes its data; the caller still kills what is left.
async fn stop_gracefully(pids: &[u32], limit: Duration) {
    for pid in pids {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let deadline = tokio::time::Instant::now() + limit;
    while !pids.iter().all(|&p| exited(p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Topology::Loopback { work, .. } = self {
            let _ = std::fs::remove_dir_all(work);
        }
    }
}

/// The topology the options ask for, or why not.
fn choose(choice: TopologyChoice) -> Result<(bool, String)> {
    let skip = trellis_tests::root_skip_reason();
    match (choice, skip) {
        (TopologyChoice::Loopback, _) => Ok((false, "asked for with --topology loopback".into())),
        (TopologyChoice::Netns, Some(why)) => {
            Err(BenchError::Setup(format!("--topology netns: {why}")))
        }
        (_, None) => Ok((true, String::new())),
        (TopologyChoice::Auto, Some(why)) => Ok((false, why.to_string())),
    }
}

/// Describes the run for the report header and stdout.
fn describe(netns: bool, why_not: &str) -> String {
    if netns {
        "network namespaces: pods on a bridge, sidecars as UID 1337 behind the iptables \
         rules of `trellis-proxy init`, clients dial service VIPs (baseline via \
         kube-proxy-style DNAT), the load generator runs inside the client pod"
            .to_string()
    } else {
        format!(
            "loopback: no network namespaces ({why_not}); sidecars with explicit upstream \
             listeners, no iptables"
        )
    }
}

/// A started topology: what runs, where each scenario's load comes from, notes, and
/// the description for the report.
struct Started {
    topology: Topology,
    planned: Vec<(Scenario, Where)>,
    notes: Vec<String>,
    description: String,
}

async fn start(opts: &SuiteOptions) -> Result<Started> {
    let (netns, why_not) = choose(opts.topology)?;
    let description = describe(netns, &why_not);
    let size = opts.settings.size;
    if netns {
        let o = NetnsOptions {
            binaries: opts.binaries.clone(),
            response_size: size,
            haproxy: opts.haproxy,
            proxy_wrapper: opts.proxy_wrapper.clone(),
            ready_timeout: opts.ready_timeout,
        };
        let mesh = tokio::task::spawn_blocking(move || NetnsMesh::start(&o))
            .await
            .map_err(|e| BenchError::Setup(format!("setup thread: {e}")))??;
        let planned = mesh
            .scenarios
            .iter()
            .map(|p| {
                (
                    p.scenario.clone(),
                    Where::Pod {
                        netns: p.pod.netns.clone(),
                    },
                )
            })
            .collect();
        let notes = mesh.notes.clone();
        return Ok(Started {
            topology: Topology::Netns(mesh),
            planned,
            notes,
            description,
        });
    }
    let work = std::env::temp_dir().join(format!(
        "trellis-bench-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::SeqCst)
    ));
    let lo = LoopbackOptions {
        binaries: opts.binaries.clone(),
        response_size: size,
        haproxy: opts.haproxy,
        proxy_wrapper: opts.proxy_wrapper.clone(),
        ready_timeout: opts.ready_timeout,
    };
    let dir = work.clone();
    let mesh = match tokio::task::spawn_blocking(move || start_loopback_mesh(&dir, &lo)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(BenchError::Setup(format!("setup thread: {e}")));
        }
    };
    let mut notes = Vec::new();
    let proxies = [mesh.client_proxy_pid, mesh.server_proxy_pid];
    let mut planned = vec![
        Scenario::new("baseline", mesh.http_server, Mode::Http1),
        Scenario::new("trellis-http1", mesh.http_via_mesh, Mode::Http1).with_proxies(proxies),
        Scenario::new("trellis-http2", mesh.http_via_mesh, Mode::Http2).with_proxies(proxies),
    ];
    match mesh.haproxy {
        Some((addr, pids)) => {
            planned.push(Scenario::new("haproxy-mtls", addr, Mode::Http1).with_proxies(pids));
        }
        None if !opts.haproxy => notes.push("haproxy-mtls: skipped (--no-haproxy)".into()),
        None => notes.push(
            "haproxy-mtls: skipped, haproxy is not installed (apt-get install haproxy)".into(),
        ),
    }
    planned.push(
        Scenario::new("baseline-grpc", mesh.http_server, Mode::Grpc).with_baseline("baseline-grpc"),
    );
    planned.push(
        Scenario::new("trellis-grpc", mesh.grpc_via_mesh, Mode::Grpc)
            .with_proxies(proxies)
            .with_baseline("baseline-grpc"),
    );
    planned.push(
        Scenario::new("baseline-tcp", mesh.tcp_server, Mode::Tcp).with_baseline("baseline-tcp"),
    );
    planned.push(
        Scenario::new("trellis-tcp", mesh.tcp_via_mesh, Mode::Tcp)
            .with_proxies([mesh.client_proxy_pid, mesh.server_tcp_proxy_pid])
            .with_baseline("baseline-tcp"),
    );
    let planned = planned.into_iter().map(|s| (s, Where::Here)).collect();
    Ok(Started {
        topology: Topology::Loopback { _mesh: mesh, work },
        planned,
        notes,
        description,
    })
}

/// `/proc/loadavg`'s first three figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_string(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

static RUNS: AtomicU32 = AtomicU32::new(0);

fn secs(d: Duration) -> String {
    d.as_secs_f64().to_string()
}

/// Runs the load generator inside a pod and reads its report back.
async fn run_in_pod(
    opts: &SuiteOptions,
    dir: &Path,
    netns: &str,
    scenario: &Scenario,
    settings: &SuiteSettings,
) -> Result<ScenarioReport> {
    let n = RUNS.fetch_add(1, Ordering::SeqCst);
    let json = dir.join(format!("load-{n}-{}.json", scenario.name));
    let cfg = settings.load_config(scenario);
    let mut args: Vec<String> = vec![
        "--threads".into(),
        opts.loadgen_threads.to_string(),
        "load".into(),
        "--target".into(),
        scenario.target.to_string(),
        "--mode".into(),
        scenario.mode.to_string(),
        "--connections".into(),
        cfg.connections.to_string(),
        "--size".into(),
        cfg.size.to_string(),
        "--path".into(),
        cfg.path.clone(),
        "--timeout".into(),
        secs(cfg.timeout),
        "--max-requests".into(),
        cfg.max_requests.to_string(),
        "--spin-us".into(),
        cfg.pacer_spin.as_micros().to_string(),
        "--rate".into(),
        cfg.rate.to_string(),
        "--duration".into(),
        secs(cfg.duration),
        "--warmup".into(),
        secs(cfg.warmup),
        "--name".into(),
        scenario.name.clone(),
        "--json-out".into(),
        json.display().to_string(),
    ];
    if let Some(host) = &cfg.host {
        args.extend(["--host".into(), host.clone()]);
    }
    for pid in &scenario.proxy_pids {
        args.extend(["--proxy-pid".into(), pid.to_string()]);
    }
    let bench = opts.binaries.bench.display().to_string();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd =
        tokio::process::Command::from(trellis_tests::netns_command(netns, None, &bench, &argv));
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Bounded: the run itself, its hard deadline, and start-up.
    let limit = cfg.warmup + cfg.duration + 2 * cfg.timeout + Duration::from_secs(30);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| BenchError::Setup(format!("load in {netns} ran past {limit:?}")))??;
    let text = std::fs::read_to_string(&json);
    let _ = std::fs::remove_file(&json);
    match text {
        Ok(text) => {
            let mut report: ScenarioReport = serde_json::from_str(&text)?;
            report.baseline = scenario.baseline.clone();
            Ok(report)
        }
        Err(_) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let mut report = empty_report(scenario, settings)?;
            report.failure = Some(format!(
                "load generator in {netns} wrote no result ({}): {}",
                out.status,
                stderr.trim()
            ));
            Ok(report)
        }
    }
}

fn empty_report(scenario: &Scenario, settings: &SuiteSettings) -> Result<ScenarioReport> {
    ScenarioReport::empty(
        &scenario.name,
        scenario.mode,
        scenario.target.to_string(),
        settings.rate,
        settings.connections,
        scenario.baseline.clone(),
    )
}

async fn run_one(
    opts: &SuiteOptions,
    topology: &Topology,
    at: &Where,
    scenario: &Scenario,
    settings: &SuiteSettings,
) -> Result<ScenarioReport> {
    match (at, topology) {
        (Where::Pod { netns }, Topology::Netns(mesh)) => {
            run_in_pod(opts, mesh.dir(), netns, scenario, settings).await
        }
        _ => run_scenario(scenario, settings).await,
    }
}

async fn saturate(
    opts: &SuiteOptions,
    sat: &SaturationOptions,
    budget: Duration,
    topology: &Topology,
    at: &Where,
    scenario: &Scenario,
) -> Result<SaturationResult> {
    let base = &opts.settings;
    let cfg = SaturationConfig {
        start_rate: base.rate,
        max_rate: sat.max_rate,
        p99_limit_us: u64::try_from(sat.p99_limit.as_micros()).unwrap_or(u64::MAX),
        budget,
        // Process start-up and the pause come on top of the step itself.
        step_estimate: sat.step + sat.warmup + base.pause + Duration::from_millis(500),
        ..SaturationConfig::default()
    };
    // The search's steps charge nobody's CPU: its figures are latency and rate.
    let bare = Scenario {
        proxy_pids: Vec::new(),
        ..scenario.clone()
    };
    find_saturation(&cfg, |rate| {
        let settings = SuiteSettings {
            rate,
            duration: sat.step,
            warmup: sat.warmup,
            out_dir: None,
            ..base.clone()
        };
        let bare = bare.clone();
        async move {
            let r = run_one(opts, topology, at, &bare, &settings).await?;
            tokio::time::sleep(settings.pause).await;
            match r.failure {
                Some(why) if r.result.requests == 0 => Err(BenchError::Setup(why)),
                _ => Ok(r.result),
            }
        }
    })
    .await
}

/// Builds the topology, runs every scenario, then (if asked) the saturation search,
/// and writes `results.json`, `results.md` and `latency.svg` into
/// `opts.settings.out_dir`. Processes and namespaces are removed before it returns,
/// also on error.
pub async fn run_bench_suite(opts: &SuiteOptions) -> Result<Report> {
    opts.settings.validate()?;
    let Started {
        topology,
        planned,
        mut notes,
        description,
    } = start(opts).await?;
    println!("topology: {description}");
    for n in &notes {
        println!("{n}");
    }
    let planned: Vec<_> = planned
        .into_iter()
        .filter(|(s, _)| opts.only.is_empty() || opts.only.contains(&s.name))
        .collect();
    if planned.is_empty() {
        return Err(BenchError::Config(format!(
            "--only {:?} matches no scenario",
            opts.only
        )));
    }
    let load_before = load_average();
    let settings = &opts.settings;
    // Round-robin: every scenario once per round, so that a slow spell of the machine
    // lands on all scenarios rather than on whichever ran then.
    let mut rounds = Vec::with_capacity(settings.rounds);
    for round in 1..=settings.rounds {
        if settings.rounds > 1 {
            println!("round {round} of {}", settings.rounds);
        }
        let mut reports = Vec::with_capacity(planned.len());
        for (i, (scenario, at)) in planned.iter().enumerate() {
            if round > 1 || i > 0 {
                tokio::time::sleep(settings.pause).await;
            }
            let pids = scenario
                .proxy_pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "running {} ({} to {}{})",
                scenario.name,
                scenario.mode,
                scenario.target,
                if pids.is_empty() {
                    String::new()
                } else {
                    format!(", proxies pid {pids}")
                }
            );
            let report = run_one(opts, &topology, at, scenario, settings).await?;
            println!("{}", report.result.table_line());
            if let Some(why) = &report.failure {
                println!("    problem: {why}");
            }
            reports.push(report);
        }
        rounds.push(reports);
    }
    let mut reports = combine_rounds(rounds, settings.baseline.as_deref());
    if let Some(sat) = &opts.saturation {
        let n = u32::try_from(planned.len()).unwrap_or(u32::MAX).max(1);
        let budget = sat.total_budget / n;
        println!(
            "saturation search: p99 < {:?}, no errors; {budget:?} per scenario",
            sat.p99_limit
        );
        for ((scenario, at), report) in planned.iter().zip(&mut reports) {
            let result = saturate(opts, sat, budget, &topology, at, scenario).await?;
            match result.best_rate {
                Some(r) => println!("saturation {}: {r} rps", scenario.name),
                None if result.steps.is_empty() => println!(
                    "saturation {}: no step fits in {budget:?}; raise --saturation-budget",
                    scenario.name
                ),
                None => println!("saturation {}: no rate passed", scenario.name),
            }
            report.saturation = Some(result);
        }
    }
    if let (Topology::Netns(mesh), Some(dir)) = (&topology, &settings.out_dir)
        && reports.iter().any(|r| r.failure.is_some())
    {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("process-logs.txt");
        std::fs::write(&path, mesh.logs())?;
        notes.push(format!(
            "a scenario failed: the processes' logs are in {}",
            path.display()
        ));
    }
    if !opts.proxy_wrapper.is_empty() {
        // A profiler writes its data when the process exits: let it.
        stop_gracefully(&topology.proxy_pids(), Duration::from_secs(60)).await;
    }
    drop(topology);
    notes.push(format!(
        "machine load average (1, 5, 15 min) before: {load_before}; after: {} \
         (everything shares {} cores: other work on the machine shows up as noise)",
        load_average(),
        core_count()
    ));
    let mut report = Report {
        date: utc_now(),
        cores: core_count(),
        topology: description,
        load: settings.summary(),
        baseline: settings.baseline.clone(),
        scenarios: reports,
        notes,
        rounds: settings.rounds,
        versus_peer: Vec::new(),
        targets: Vec::new(),
    };
    report.summarize();
    if let Some(dir) = &settings.out_dir {
        report.write(dir)?;
    }
    Ok(report)
}
