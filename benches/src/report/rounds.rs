//! Repeated rounds: each round runs every scenario once, comparisons are made within a
//! round (so drift between rounds cancels), and the report carries the median of each
//! figure across rounds with every round's figures beside it.

use serde::{Deserialize, Serialize};

use super::{AddedLatency, LatencyRatio, ScenarioReport, added_latency, latency_ratio};
use crate::procstat::CpuCost;

/// One round's figures of a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundFigures {
    /// 1-based.
    pub round: usize,
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Against the baseline of the same round.
    pub added: Option<AddedLatency>,
    pub ratio: Option<LatencyRatio>,
    pub proxy_cpu_s_per_1k_req_total: f64,
    pub failure: Option<String>,
}

impl RoundFigures {
    fn of(round: usize, s: &ScenarioReport) -> Self {
        let r = &s.result;
        Self {
            round,
            requests: r.requests,
            errors: r.errors,
            p50_us: r.p50_us,
            p90_us: r.p90_us,
            p99_us: r.p99_us,
            p999_us: r.p999_us,
            max_us: r.max_us,
            added: s.added.clone(),
            ratio: s.ratio.clone(),
            proxy_cpu_s_per_1k_req_total: s.proxy_cpu_s_per_1k_req_total,
            failure: s.failure.clone(),
        }
    }
}

/// Fills in `added` and `ratio` of every scenario of one round from its own baseline
/// ([`ScenarioReport::baseline`]) or else `suite_baseline`, both taken from this round.
pub fn compare_within_round(scenarios: &mut [ScenarioReport], suite_baseline: Option<&str>) {
    let bases: Vec<_> = scenarios
        .iter()
        .map(|s| {
            let name = s.baseline.as_deref().or(suite_baseline)?;
            scenarios
                .iter()
                .find(|b| b.result.scenario == name && b.failure.is_none())
                .map(|b| b.result.clone())
        })
        .collect();
    for (s, base) in scenarios.iter_mut().zip(bases) {
        (s.added, s.ratio) = match &base {
            Some(b) if b.scenario != s.result.scenario && s.result.requests > 0 => (
                Some(added_latency(&s.result, b)),
                latency_ratio(&s.result, b),
            ),
            _ => (None, None),
        };
    }
}

/// Combines rounds into one report per scenario. `rounds[r][i]` is scenario `i` in
/// round `r`; every round has the same scenarios in the same order. Comparisons are
/// made within each round first, then medianed.
pub fn combine_rounds(
    mut rounds: Vec<Vec<ScenarioReport>>,
    suite_baseline: Option<&str>,
) -> Vec<ScenarioReport> {
    for round in &mut rounds {
        compare_within_round(round, suite_baseline);
    }
    let n = rounds.first().map_or(0, Vec::len);
    (0..n)
        .filter_map(|i| {
            let runs: Vec<&ScenarioReport> = rounds.iter().filter_map(|r| r.get(i)).collect();
            combine_runs(&runs)
        })
        .collect()
}

/// The median run of one scenario: latency percentiles, curve, CPU and comparisons are
/// medians over the rounds that ran; requests and errors are totals; peak RSS and the
/// generator's lag are maxima. Failed rounds are named in `failure`.
fn combine_runs(runs: &[&ScenarioReport]) -> Option<ScenarioReport> {
    let first = runs.first()?;
    let ran: Vec<&ScenarioReport> = runs
        .iter()
        .copied()
        .filter(|s| s.failure.is_none() && s.result.requests > 0)
        .collect();
    let mut out = (*ran.first().unwrap_or(first)).clone();
    out.rounds = runs
        .iter()
        .enumerate()
        .map(|(k, s)| RoundFigures::of(k + 1, s))
        .collect();
    out.saturation = None;
    out.result.requests = runs.iter().map(|s| s.result.requests).sum();
    out.result.errors = runs.iter().map(|s| s.result.errors).sum();
    out.generator_lag_p99_us = runs
        .iter()
        .map(|s| s.generator_lag_p99_us)
        .max()
        .unwrap_or(0);
    out.generator_lag_max_us = runs
        .iter()
        .map(|s| s.generator_lag_max_us)
        .max()
        .unwrap_or(0);
    let failures: Vec<String> = runs
        .iter()
        .enumerate()
        .filter_map(|(k, s)| s.failure.as_ref().map(|f| format!("round {}: {f}", k + 1)))
        .collect();
    out.failure = (!failures.is_empty()).then(|| failures.join("; "));
    if ran.len() < 2 {
        return Some(out);
    }
    let r = &mut out.result;
    r.p50_us = median_u64(ran.iter().map(|s| s.result.p50_us));
    r.p90_us = median_u64(ran.iter().map(|s| s.result.p90_us));
    r.p99_us = median_u64(ran.iter().map(|s| s.result.p99_us));
    r.p999_us = median_u64(ran.iter().map(|s| s.result.p999_us));
    r.max_us = median_u64(ran.iter().map(|s| s.result.max_us));
    r.mean_us = median_f64(ran.iter().map(|s| s.result.mean_us));
    r.achieved_rps = median_f64(ran.iter().map(|s| s.result.achieved_rps));
    r.duration_s = median_f64(ran.iter().map(|s| s.result.duration_s));
    if ran.iter().all(|s| s.curve.len() == out.curve.len()) {
        for (k, point) in out.curve.iter_mut().enumerate() {
            point.latency_us = median_u64(ran.iter().map(|s| s.curve[k].latency_us));
        }
    }
    if ran.iter().all(|s| s.proxies.len() == out.proxies.len()) {
        for (k, p) in out.proxies.iter_mut().enumerate() {
            let each = |f: fn(&CpuCost) -> f64| median_f64(ran.iter().map(|s| f(&s.proxies[k])));
            p.cpu_s = each(|c| c.cpu_s);
            p.cpu_s_per_1k_req = each(|c| c.cpu_s_per_1k_req);
            p.vcpu = each(|c| c.vcpu);
            p.rss_kb = ran.iter().map(|s| s.proxies[k].rss_kb).max().unwrap_or(0);
            p.peak_rss_kb = ran
                .iter()
                .map(|s| s.proxies[k].peak_rss_kb)
                .max()
                .unwrap_or(0);
        }
    }
    out.proxy_cpu_s_per_1k_req_total =
        median_f64(ran.iter().map(|s| s.proxy_cpu_s_per_1k_req_total));
    out.proxy_vcpu_total = median_f64(ran.iter().map(|s| s.proxy_vcpu_total));
    let added: Vec<&AddedLatency> = ran.iter().filter_map(|s| s.added.as_ref()).collect();
    out.added = added.first().map(|a| AddedLatency {
        baseline: a.baseline.clone(),
        p50_us: median_i64(added.iter().map(|a| a.p50_us)),
        p90_us: median_i64(added.iter().map(|a| a.p90_us)),
        p99_us: median_i64(added.iter().map(|a| a.p99_us)),
        p999_us: median_i64(added.iter().map(|a| a.p999_us)),
        max_us: median_i64(added.iter().map(|a| a.max_us)),
    });
    let ratios: Vec<&LatencyRatio> = ran.iter().filter_map(|s| s.ratio.as_ref()).collect();
    out.ratio = ratios.first().map(|q| LatencyRatio {
        baseline: q.baseline.clone(),
        p50: median_f64(ratios.iter().map(|q| q.p50)),
        p99: median_f64(ratios.iter().map(|q| q.p99)),
    });
    Some(out)
}

/// The median; for an even count, the mean of the middle two. 0 when empty.
pub fn median_f64(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median, rounded down between the middle two. 0 when empty.
pub fn median_u64(values: impl Iterator<Item = u64>) -> u64 {
    let mut v: Vec<u64> = values.collect();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => v[n / 2 - 1] / 2 + v[n / 2] / 2 + (v[n / 2 - 1] % 2 + v[n / 2] % 2) / 2,
    }
}

/// The median, rounded towards negative infinity between the middle two. 0 when empty.
pub fn median_i64(values: impl Iterator<Item = i64>) -> i64 {
    let mut v: Vec<i64> = values.collect();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => {
            let (a, b) = (i128::from(v[n / 2 - 1]), i128::from(v[n / 2]));
            i64::try_from((a + b).div_euclid(2)).unwrap_or(i64::MAX)
        }
    }
}
