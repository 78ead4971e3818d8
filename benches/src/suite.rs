//! A suite: several scenarios run one after another with the same load settings, the
//! proxies of each sampled from `/proc` over its measured window, repeated in rounds,
//! and the reports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::loadgen::{LoadConfig, Mode, run_load_with};
use crate::procstat::{ProcSample, cpu_cost, sample_proc};
use crate::report::{
    LoadSummary, Report, RunResult, ScenarioReport, combine_rounds, core_count, percentile_curve,
    utc_now,
};
use crate::{BenchError, Result};

/// One path to measure: where the load goes, how, and which proxies are on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// For example `baseline`, `trellis-http1`, `haproxy-mtls`.
    pub name: String,
    pub target: SocketAddr,
    pub mode: Mode,
    /// Processes whose CPU and memory are charged to this path.
    pub proxy_pids: Vec<u32>,
    /// `Host`/`:authority` for this scenario, overriding [`SuiteSettings::host`].
    pub host: Option<String>,
    /// Scenario to compare against, overriding [`SuiteSettings::baseline`].
    pub baseline: Option<String>,
}

impl Scenario {
    pub fn new(name: impl Into<String>, target: SocketAddr, mode: Mode) -> Self {
        Self {
            name: name.into(),
            target,
            mode,
            proxy_pids: Vec::new(),
            host: None,
            baseline: None,
        }
    }

    /// Compares this scenario against `baseline` rather than the suite's baseline.
    pub fn with_baseline(mut self, baseline: impl Into<String>) -> Self {
        self.baseline = Some(baseline.into());
        self
    }

    pub fn with_proxies(mut self, pids: impl IntoIterator<Item = u32>) -> Self {
        self.proxy_pids = pids.into_iter().collect();
        self
    }

    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }
}

/// Load settings shared by every scenario of a suite.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteSettings {
    pub rate: f64,
    pub connections: usize,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub timeout: Duration,
    pub max_requests: u64,
    /// See [`LoadConfig::pacer_spin`].
    pub pacer_spin: Duration,
    pub path: String,
    pub host: Option<String>,
    /// Scenario the others are compared against (added latency).
    pub baseline: Option<String>,
    /// Where `results.json`, `results.md` and `latency.svg` go; `None` writes nothing.
    pub out_dir: Option<PathBuf>,
    /// Quiet time between scenarios.
    pub pause: Duration,
    /// Times each scenario runs, round-robin (every scenario once per round), so that
    /// drift of the machine hits all of them alike; reports carry medians.
    pub rounds: usize,
}

impl Default for SuiteSettings {
    /// 1,000 rps, 16 connections, 1 KiB, 30 s after 5 s warm-up, 1 s timeout.
    fn default() -> Self {
        Self {
            rate: 1000.0,
            connections: 16,
            size: 1024,
            duration: Duration::from_secs(30),
            warmup: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            max_requests: 10_000_000,
            pacer_spin: Duration::ZERO,
            path: "/".into(),
            host: None,
            baseline: Some("baseline".into()),
            out_dir: None,
            pause: Duration::from_secs(1),
            rounds: 1,
        }
    }
}

impl SuiteSettings {
    /// The load run for `scenario` under these settings.
    pub fn load_config(&self, scenario: &Scenario) -> LoadConfig {
        LoadConfig {
            target: scenario.target,
            mode: scenario.mode,
            host: scenario.host.clone().or_else(|| self.host.clone()),
            path: self.path.clone(),
            rate: self.rate,
            connections: self.connections,
            size: self.size,
            duration: self.duration,
            warmup: self.warmup,
            timeout: self.timeout,
            max_requests: self.max_requests,
            pacer_spin: self.pacer_spin,
        }
    }

    /// Checks what the load generator does not: at least one round.
    pub fn validate(&self) -> Result<()> {
        if self.rounds == 0 {
            return Err(BenchError::Config("rounds must be > 0".into()));
        }
        Ok(())
    }

    pub fn summary(&self) -> LoadSummary {
        LoadSummary {
            rate: self.rate,
            connections: self.connections,
            size: self.size,
            duration_s: self.duration.as_secs_f64(),
            warmup_s: self.warmup.as_secs_f64(),
            timeout_s: self.timeout.as_secs_f64(),
            max_requests: self.max_requests,
            pacer_spin_us: u64::try_from(self.pacer_spin.as_micros()).unwrap_or(u64::MAX),
            path: self.path.clone(),
        }
    }
}

type Samples = (Instant, Vec<(u32, Result<ProcSample>)>);

fn sample_all(pids: &[u32]) -> Samples {
    let samples = pids.iter().map(|&pid| (pid, sample_proc(pid))).collect();
    (Instant::now(), samples)
}

/// Runs one scenario and samples its proxies at the end of the warm-up and at the end.
/// A scenario that cannot run is reported with `failure` set, not as an error.
pub async fn run_scenario(scenario: &Scenario, settings: &SuiteSettings) -> Result<ScenarioReport> {
    let cfg = settings.load_config(scenario);
    let before: Arc<Mutex<Option<Samples>>> = Arc::default();
    let slot = Arc::clone(&before);
    let pids = scenario.proxy_pids.clone();
    let outcome = run_load_with(&cfg, move || {
        let samples = sample_all(&pids);
        if let Ok(mut guard) = slot.lock() {
            *guard = Some(samples);
        }
    })
    .await;
    let after = sample_all(&scenario.proxy_pids);
    let mut report = ScenarioReport::empty(
        &scenario.name,
        scenario.mode,
        scenario.target.to_string(),
        cfg.rate,
        cfg.connections,
        scenario.baseline.clone(),
    )?;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            report.failure = Some(format!("load failed: {e}"));
            return Ok(report);
        }
    };
    report.result = RunResult::from_outcome(&scenario.name, &cfg, &outcome);
    report.curve = percentile_curve(&outcome.histogram);
    if !outcome.schedule_lag.is_empty() {
        report.generator_lag_p99_us = outcome.schedule_lag.value_at_quantile(0.99);
        report.generator_lag_max_us = outcome.schedule_lag.max();
    }
    let before = before.lock().ok().and_then(|mut g| g.take());
    let mut problems = Vec::new();
    match before {
        None if !scenario.proxy_pids.is_empty() => {
            problems.push("proxies were not sampled at the end of the warm-up".to_string());
        }
        None => {}
        Some((t0, samples0)) => {
            let wall = after.0.saturating_duration_since(t0);
            let measured = outcome.requests + outcome.errors;
            for ((pid, b), (_, a)) in samples0.into_iter().zip(after.1) {
                match (b, a) {
                    (Ok(b), Ok(a)) => report.proxies.push(cpu_cost(&b, &a, measured, wall)),
                    (Err(e), _) | (_, Err(e)) => problems.push(format!("pid {pid}: {e}")),
                }
            }
        }
    }
    report.proxy_cpu_s_per_1k_req_total = report.proxies.iter().map(|c| c.cpu_s_per_1k_req).sum();
    report.proxy_vcpu_total = report.proxies.iter().map(|c| c.vcpu).sum();
    if !problems.is_empty() {
        report.failure = Some(problems.join("; "));
    }
    Ok(report)
}

/// Runs every scenario in turn, `settings.rounds` times round-robin, compares each
/// with its baseline within the round, combines the rounds into medians, and writes
/// the three reports into `settings.out_dir` when set.
pub async fn run_suite(scenarios: &[Scenario], settings: &SuiteSettings) -> Result<Report> {
    settings.validate()?;
    let mut rounds = Vec::with_capacity(settings.rounds);
    for round in 1..=settings.rounds {
        let mut reports = Vec::with_capacity(scenarios.len());
        for (i, scenario) in scenarios.iter().enumerate() {
            if round > 1 || i > 0 {
                tokio::time::sleep(settings.pause).await;
            }
            tracing::info!(round, scenario = %scenario.name, target = %scenario.target, mode = %scenario.mode, "running");
            let report = run_scenario(scenario, settings).await?;
            match &report.failure {
                Some(why) => tracing::warn!(scenario = %scenario.name, %why, "scenario problem"),
                None => tracing::info!("{}", report.result.table_line()),
            }
            reports.push(report);
        }
        rounds.push(reports);
    }
    let mut report = Report {
        date: utc_now(),
        cores: core_count(),
        topology: String::new(),
        load: settings.summary(),
        baseline: settings.baseline.clone(),
        scenarios: combine_rounds(rounds, settings.baseline.as_deref()),
        notes: Vec::new(),
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
