//! Results: per-run figures from the histogram, added latency and ratios against a
//! baseline, medians over rounds, the comparison with the peer and the targets, and the
//! three outputs (`results.json`, `results.md`, `latency.svg`).

mod markdown;
mod rounds;
mod svg;
mod verdict;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::loadgen::{LoadConfig, LoadOutcome, Mode};
use crate::procstat::CpuCost;
use crate::saturation::SaturationResult;

pub use markdown::render_markdown;
pub use rounds::{
    RoundFigures, combine_rounds, compare_within_round, median_f64, median_i64, median_u64,
};
pub use svg::render_svg;
pub use verdict::{PeerComparison, TargetCheck, Verdict, check_targets, compare_with_peer};

/// Figures of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    pub mode: Mode,
    /// Offered rate, requests per second.
    pub rate: f64,
    pub connections: usize,
    /// Length of the measured window, seconds.
    pub duration_s: f64,
    /// Successful measured requests.
    pub requests: u64,
    /// Failed measured requests.
    pub errors: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// Successful requests per second of the measured window.
    pub achieved_rps: f64,
}

impl RunResult {
    /// Figures from a corrected-latency histogram (µs).
    pub fn from_histogram(
        scenario: &str,
        mode: Mode,
        rate: f64,
        connections: usize,
        measured: Duration,
        histogram: &Histogram<u64>,
        errors: u64,
    ) -> Self {
        let empty = histogram.is_empty();
        let q = |q: f64| {
            if empty {
                0
            } else {
                histogram.value_at_quantile(q)
            }
        };
        let duration_s = measured.as_secs_f64();
        let requests = histogram.len();
        Self {
            scenario: scenario.to_string(),
            mode,
            rate,
            connections,
            duration_s,
            requests,
            errors,
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if empty { 0 } else { histogram.max() },
            mean_us: if empty { 0.0 } else { histogram.mean() },
            achieved_rps: if duration_s > 0.0 {
                requests as f64 / duration_s
            } else {
                0.0
            },
        }
    }

    /// Figures of a finished [`crate::run_load`].
    pub fn from_outcome(scenario: &str, cfg: &LoadConfig, outcome: &LoadOutcome) -> Self {
        Self::from_histogram(
            scenario,
            cfg.mode,
            cfg.rate,
            cfg.connections,
            outcome.measured,
            &outcome.histogram,
            outcome.errors,
        )
    }

    /// One fixed-width line for terminals: name, mode, rate, percentiles in ms, errors.
    pub fn table_line(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "{:<20} {:<5} rate={:<8} conns={:<3} p50={:.3}ms p90={:.3}ms p99={:.3}ms \
             p99.9={:.3}ms max={:.3}ms mean={:.3}ms ok={} errors={} achieved={:.1}rps",
            self.scenario,
            self.mode.as_str(),
            self.rate,
            self.connections,
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.mean_us / 1000.0,
            self.requests,
            self.errors,
            self.achieved_rps
        )
    }
}

/// Latency added over a baseline scenario at each percentile (µs; may be negative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedLatency {
    pub baseline: String,
    pub p50_us: i64,
    pub p90_us: i64,
    pub p99_us: i64,
    pub p999_us: i64,
    pub max_us: i64,
}

/// `result - baseline` at each percentile.
pub fn added_latency(result: &RunResult, baseline: &RunResult) -> AddedLatency {
    let d = |a: u64, b: u64| {
        i64::try_from(a).unwrap_or(i64::MAX) - i64::try_from(b).unwrap_or(i64::MAX)
    };
    AddedLatency {
        baseline: baseline.scenario.clone(),
        p50_us: d(result.p50_us, baseline.p50_us),
        p90_us: d(result.p90_us, baseline.p90_us),
        p99_us: d(result.p99_us, baseline.p99_us),
        p999_us: d(result.p999_us, baseline.p999_us),
        max_us: d(result.max_us, baseline.max_us),
    }
}

/// p50 and p99 as multiples of the baseline's (1.5: half as slow again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyRatio {
    pub baseline: String,
    pub p50: f64,
    pub p99: f64,
}

/// `result / baseline` at p50 and p99; `None` when the baseline has no latencies.
pub fn latency_ratio(result: &RunResult, baseline: &RunResult) -> Option<LatencyRatio> {
    if baseline.p50_us == 0 || baseline.p99_us == 0 {
        return None;
    }
    Some(LatencyRatio {
        baseline: baseline.scenario.clone(),
        p50: result.p50_us as f64 / baseline.p50_us as f64,
        p99: result.p99_us as f64 / baseline.p99_us as f64,
    })
}

/// A point of the latency-by-percentile curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// 0 ..= 99.99
    pub percentile: f64,
    pub latency_us: u64,
}

/// Highest percentile on the curve (p99.99, `1/(1-p) = 10^4`).
pub const CURVE_MAX_DECADES: u32 = 4;
/// Curve points per decade of `1/(1-p)`.
pub const CURVE_POINTS_PER_DECADE: u32 = 20;

/// Latency at percentiles evenly spaced on a log scale of `1/(1-p)`, from p0 to p99.99.
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<CurvePoint> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let n = CURVE_MAX_DECADES * CURVE_POINTS_PER_DECADE;
    (0..=n)
        .map(|k| {
            let x = 10f64.powf(f64::from(k) / f64::from(CURVE_POINTS_PER_DECADE));
            let q = 1.0 - 1.0 / x;
            let latency_us = if k == 0 {
                histogram.min()
            } else {
                histogram.value_at_quantile(q)
            };
            CurvePoint {
                percentile: q * 100.0,
                latency_us,
            }
        })
        .collect()
}

/// Everything about one scenario of a suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub result: RunResult,
    pub target: String,
    /// CPU and memory of each proxy on the path, over the measured window.
    pub proxies: Vec<CpuCost>,
    /// Sum over the proxies of CPU seconds per 1,000 requests.
    pub proxy_cpu_s_per_1k_req_total: f64,
    /// Sum over the proxies of cores busy at the offered rate.
    pub proxy_vcpu_total: f64,
    /// The scenario this one is compared against, when not the suite's baseline
    /// (e.g. `baseline-tcp` for `trellis-tcp`).
    #[serde(default)]
    pub baseline: Option<String>,
    /// Against the baseline scenario (absent for the baseline itself).
    pub added: Option<AddedLatency>,
    /// p50 and p99 over the baseline's (absent for the baseline itself).
    #[serde(default)]
    pub ratio: Option<LatencyRatio>,
    pub curve: Vec<CurvePoint>,
    /// How late the load generator released requests, p99 and max (µs): when these are
    /// large the generator was short of CPU and the latencies are suspect.
    pub generator_lag_p99_us: u64,
    pub generator_lag_max_us: u64,
    /// Why the scenario did not run or its proxies could not be sampled.
    pub failure: Option<String>,
    /// The highest rate it held with p99 under the limit and no errors, when searched.
    #[serde(default)]
    pub saturation: Option<SaturationResult>,
    /// Each round's figures, when the suite ran in rounds; the figures above are then
    /// their medians (see [`combine_rounds`]).
    #[serde(default)]
    pub rounds: Vec<RoundFigures>,
}

impl ScenarioReport {
    /// A report with no measurements yet (a scenario that could not run).
    pub fn empty(
        name: &str,
        mode: Mode,
        target: String,
        rate: f64,
        connections: usize,
        baseline: Option<String>,
    ) -> Result<Self> {
        Ok(Self {
            result: RunResult::from_histogram(
                name,
                mode,
                rate,
                connections,
                Duration::ZERO,
                &crate::loadgen::new_histogram()?,
                0,
            ),
            target,
            proxies: Vec::new(),
            proxy_cpu_s_per_1k_req_total: 0.0,
            proxy_vcpu_total: 0.0,
            baseline,
            added: None,
            ratio: None,
            curve: Vec::new(),
            generator_lag_p99_us: 0,
            generator_lag_max_us: 0,
            failure: None,
            saturation: None,
            rounds: Vec::new(),
        })
    }
}

/// Load settings as written into the reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSummary {
    pub rate: f64,
    pub connections: usize,
    pub size: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub timeout_s: f64,
    pub max_requests: u64,
    pub pacer_spin_us: u64,
    pub path: String,
}

/// A whole suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// UTC, `YYYY-MM-DD HH:MM:SS`.
    pub date: String,
    pub cores: usize,
    /// Where it ran: network namespaces with iptables, or loopback.
    #[serde(default)]
    pub topology: String,
    pub load: LoadSummary,
    pub baseline: Option<String>,
    pub scenarios: Vec<ScenarioReport>,
    /// Scenarios skipped and why, and other remarks for the reader.
    #[serde(default)]
    pub notes: Vec<String>,
    /// How many times each scenario ran (interleaved); figures are medians.
    #[serde(default = "one")]
    pub rounds: usize,
    /// Trellis next to the HAProxy peer (empty when the peer did not run).
    #[serde(default)]
    pub versus_peer: Vec<PeerComparison>,
    /// The targets of issue 4, pass or fail.
    #[serde(default)]
    pub targets: Vec<TargetCheck>,
}

fn one() -> usize {
    1
}

impl Report {
    /// Fills in `added` and `ratio` for every scenario from its own baseline
    /// ([`ScenarioReport::baseline`]) or else the suite's, as one round.
    pub fn compute_added(&mut self) {
        compare_within_round(&mut self.scenarios, self.baseline.as_deref());
    }

    /// Fills in the comparison with the peer and the target checks from the (combined)
    /// scenarios.
    pub fn summarize(&mut self) {
        self.versus_peer = compare_with_peer(&self.scenarios);
        self.targets = check_targets(&self.scenarios, &self.versus_peer);
    }

    /// Writes `results.json`, `results.md` and `latency.svg` into `dir` (created if
    /// needed); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<[PathBuf; 3]> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join("results.json");
        let md = dir.join("results.md");
        let svg = dir.join("latency.svg");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)?;
        std::fs::write(&md, render_markdown(self))?;
        std::fs::write(&svg, render_svg(self))?;
        Ok([json, md, svg])
    }
}

/// Cores available to this process.
pub fn core_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Formats seconds since the Unix epoch as a UTC date and time.
pub fn format_utc(secs: u64) -> String {
    // Howard Hinnant's civil_from_days.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
