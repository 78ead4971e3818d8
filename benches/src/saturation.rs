//! Saturation search: the highest offered rate a path sustains with p99 under a limit
//! and no errors.
//!
//! Rates double from `start_rate` until a step fails (or `max_rate` passes), then the
//! gap between the best passing and the lowest failing rate is bisected until it is
//! within `precision`. If even `start_rate` fails, the search bisects down towards
//! `min_rate`. Every step is a short run made by the caller's closure; the whole search
//! stops before a step would overrun `budget`, and after `max_steps`.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::report::RunResult;

/// Search parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SaturationConfig {
    pub start_rate: f64,
    pub max_rate: f64,
    /// Below this the downward search gives up.
    pub min_rate: f64,
    /// A step passes when its p99 is below this (and it had no errors).
    pub p99_limit_us: u64,
    /// Stop bisecting when `failing / passing <= 1 + precision`.
    pub precision: f64,
    /// Wall-clock budget for the whole search.
    pub budget: Duration,
    /// How long one step takes (warm-up + run + pause); a step is only started when it
    /// fits in what is left of the budget.
    pub step_estimate: Duration,
    pub max_steps: usize,
}

impl Default for SaturationConfig {
    /// 1k rps upward, at most 512k, p99 < 10 ms, 5 %, 5 minutes, 30 steps.
    fn default() -> Self {
        Self {
            start_rate: 1000.0,
            max_rate: 512_000.0,
            min_rate: 10.0,
            p99_limit_us: 10_000,
            precision: 0.05,
            budget: Duration::from_secs(300),
            step_estimate: Duration::from_secs(5),
            max_steps: 30,
        }
    }
}

/// One step of the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaturationStep {
    pub rate: f64,
    pub passed: bool,
    pub p99_us: u64,
    pub errors: u64,
    pub achieved_rps: f64,
    /// Set when the run itself failed.
    pub failure: Option<String>,
}

/// Outcome of the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaturationResult {
    /// Highest passing rate, if any step passed.
    pub best_rate: Option<f64>,
    pub best: Option<RunResult>,
    pub steps: Vec<SaturationStep>,
    /// The search stopped for lack of time or steps rather than by converging.
    pub cut_short: bool,
}

/// Whether a step meets the bar.
pub fn passes(r: &RunResult, p99_limit_us: u64) -> bool {
    r.errors == 0 && r.requests > 0 && r.p99_us < p99_limit_us
}

/// Runs the search; `run(rate)` performs one short run at `rate` rps.
pub async fn find_saturation<F, Fut>(cfg: &SaturationConfig, mut run: F) -> Result<SaturationResult>
where
    F: FnMut(f64) -> Fut,
    Fut: Future<Output = Result<RunResult>>,
{
    let started = Instant::now();
    let mut out = SaturationResult {
        best_rate: None,
        best: None,
        steps: Vec::new(),
        cut_short: false,
    };
    let mut lowest_fail: Option<f64> = None;
    let mut rate = cfg.start_rate.max(cfg.min_rate).min(cfg.max_rate).round();
    loop {
        if out.steps.len() >= cfg.max_steps || started.elapsed() + cfg.step_estimate > cfg.budget {
            out.cut_short = true;
            break;
        }
        let (passed, step) = match run(rate).await {
            Ok(r) => {
                let passed = passes(&r, cfg.p99_limit_us);
                let step = SaturationStep {
                    rate,
                    passed,
                    p99_us: r.p99_us,
                    errors: r.errors,
                    achieved_rps: r.achieved_rps,
                    failure: None,
                };
                if passed && out.best_rate.is_none_or(|b| rate > b) {
                    out.best_rate = Some(rate);
                    out.best = Some(r);
                }
                (passed, step)
            }
            Err(e) => (
                false,
                SaturationStep {
                    rate,
                    passed: false,
                    p99_us: 0,
                    errors: 0,
                    achieved_rps: 0.0,
                    failure: Some(e.to_string()),
                },
            ),
        };
        tracing::info!(
            rate,
            passed,
            p99_us = step.p99_us,
            errors = step.errors,
            "saturation step"
        );
        out.steps.push(step);
        if !passed {
            lowest_fail = Some(lowest_fail.map_or(rate, |f| f.min(rate)));
        }
        match next_rate(out.best_rate, lowest_fail, cfg) {
            Some(next) => rate = next,
            None => break,
        }
    }
    Ok(out)
}

/// The next rate to try, or `None` when the search has converged.
pub fn next_rate(
    best: Option<f64>,
    lowest_fail: Option<f64>,
    cfg: &SaturationConfig,
) -> Option<f64> {
    match (best, lowest_fail) {
        // Still climbing.
        (Some(b), None) => {
            if b >= cfg.max_rate {
                None
            } else {
                Some((b * 2.0).min(cfg.max_rate).round())
            }
        }
        (Some(b), Some(f)) => {
            let mid = ((b + f) / 2.0).round();
            (f > b * (1.0 + cfg.precision) && mid > b && mid < f).then_some(mid)
        }
        // Nothing passed yet: go down.
        (None, Some(f)) => {
            let mid = (f / 2.0).round();
            (mid >= cfg.min_rate).then_some(mid)
        }
        (None, None) => Some(cfg.start_rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::Mode;

    fn fake(rate: f64, capacity: f64) -> RunResult {
        let p99_us = if rate <= capacity { 2_000 } else { 50_000 };
        RunResult {
            scenario: "fake".into(),
            mode: Mode::Http1,
            rate,
            connections: 1,
            duration_s: 1.0,
            requests: 100,
            errors: 0,
            p50_us: 100,
            p90_us: 200,
            p99_us,
            p999_us: p99_us,
            max_us: p99_us,
            mean_us: 150.0,
            achieved_rps: rate,
        }
    }

    fn cfg() -> SaturationConfig {
        SaturationConfig {
            step_estimate: Duration::ZERO,
            ..SaturationConfig::default()
        }
    }

    #[tokio::test]
    async fn climbs_then_bisects() {
        let r = find_saturation(&cfg(), |rate| async move { Ok(fake(rate, 5000.0)) })
            .await
            .unwrap();
        let rates: Vec<f64> = r.steps.iter().map(|s| s.rate).collect();
        assert_eq!(
            rates,
            [
                1000.0, 2000.0, 4000.0, 8000.0, 6000.0, 5000.0, 5500.0, 5250.0
            ]
        );
        assert_eq!(r.best_rate, Some(5000.0));
        assert_eq!(r.best.unwrap().rate, 5000.0);
        assert!(!r.cut_short);
    }

    #[tokio::test]
    async fn goes_down_when_start_fails() {
        let r = find_saturation(&cfg(), |rate| async move { Ok(fake(rate, 300.0)) })
            .await
            .unwrap();
        let best = r.best_rate.unwrap();
        assert!((285.0..=300.0).contains(&best), "{best}");
    }

    #[tokio::test]
    async fn errors_fail_and_max_rate_caps() {
        let c = SaturationConfig {
            max_rate: 3000.0,
            ..cfg()
        };
        let r = find_saturation(&c, |rate| async move { Ok(fake(rate, 1e9)) })
            .await
            .unwrap();
        assert_eq!(r.best_rate, Some(3000.0));
        let r = find_saturation(&cfg(), |rate| async move {
            let mut f = fake(rate, 1e9);
            f.errors = u64::from(rate > 1500.0);
            Ok(f)
        })
        .await
        .unwrap();
        assert_eq!(r.best_rate, Some(1500.0));
    }

    #[tokio::test]
    async fn budget_bounds_the_search() {
        let c = SaturationConfig {
            budget: Duration::ZERO,
            step_estimate: Duration::from_secs(1),
            ..cfg()
        };
        let r = find_saturation(&c, |rate| async move { Ok(fake(rate, 1e9)) })
            .await
            .unwrap();
        assert!(r.steps.is_empty() && r.cut_short && r.best_rate.is_none());
        let c = SaturationConfig {
            max_steps: 3,
            ..cfg()
        };
        let r = find_saturation(&c, |rate| async move { Ok(fake(rate, 1e9)) })
            .await
            .unwrap();
        assert_eq!(r.steps.len(), 3);
        assert!(r.cut_short);
    }
}
