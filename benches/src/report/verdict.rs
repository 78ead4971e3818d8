//! The questions the benchmark exists to answer: how Trellis compares with the HAProxy
//! peer in the same run, and whether it meets the targets of issue 4.

use serde::{Deserialize, Serialize};

use super::ScenarioReport;
use crate::loadgen::Mode;

/// The peer scenario Trellis is compared against.
pub const PEER: &str = "haproxy-mtls";
/// The scenario the targets are stated for (two sidecars, mTLS, HTTP/1.1).
pub const TARGET_SCENARIO: &str = "trellis-http1";
/// Targets: added p50 and p99 (µs), CPU seconds per 1,000 requests per proxy (which is
/// vCPU per 1,000 rps), peak RSS per proxy (KiB).
pub const TARGET_ADDED_P50_US: i64 = 100;
pub const TARGET_ADDED_P99_US: i64 = 300;
pub const TARGET_CPU_S_PER_1K_REQ: f64 = 0.05;
pub const TARGET_PEAK_RSS_KB: u64 = 15 * 1024;

/// A Trellis scenario next to the peer: each figure as (Trellis, peer, Trellis/peer).
/// A ratio below 1 means Trellis costs less.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerComparison {
    pub scenario: String,
    pub peer: String,
    pub added_p50_us: (i64, i64),
    pub added_p50_ratio: Option<f64>,
    pub added_p99_us: (i64, i64),
    pub added_p99_ratio: Option<f64>,
    /// CPU seconds per 1,000 requests, both proxies of the path together.
    pub cpu_s_per_1k_req: (f64, f64),
    pub cpu_ratio: Option<f64>,
    /// Highest peak RSS of a proxy on the path, KiB.
    pub peak_rss_kb: (u64, u64),
    pub rss_ratio: Option<f64>,
}

impl PeerComparison {
    /// The figures on which Trellis is lower than the peer.
    pub fn lower_on(&self) -> Vec<&'static str> {
        [
            ("added p50", self.added_p50_us.0 < self.added_p50_us.1),
            ("added p99", self.added_p99_us.0 < self.added_p99_us.1),
            ("CPU", self.cpu_s_per_1k_req.0 < self.cpu_s_per_1k_req.1),
            ("RSS", self.peak_rss_kb.0 < self.peak_rss_kb.1),
        ]
        .into_iter()
        .filter_map(|(name, lower)| lower.then_some(name))
        .collect()
    }
}

/// Pass, fail, or could not tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    NotMeasured,
}

impl Verdict {
    fn of(passed: bool) -> Self {
        if passed { Self::Pass } else { Self::Fail }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "yes",
            Self::Fail => "no",
            Self::NotMeasured => "not measured",
        }
    }
}

/// One target of issue 4 and what this run measured for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// `ours / peer`, when both figures are non-negative and the peer's is positive: a
/// ratio with a negative added latency (noise below the baseline) says nothing.
fn ratio(ours: f64, peer: f64) -> Option<f64> {
    (ours >= 0.0 && peer > 0.0).then(|| ours / peer)
}

fn max_peak_rss_kb(s: &ScenarioReport) -> u64 {
    s.proxies.iter().map(|p| p.peak_rss_kb).max().unwrap_or(0)
}

fn usable(s: &ScenarioReport) -> bool {
    s.failure.is_none() && s.result.requests > 0
}

/// Every Trellis HTTP scenario (HTTP/1.1, HTTP/2, gRPC) next to the peer, when the peer
/// ran. Each added latency is against the scenario's own baseline.
pub fn compare_with_peer(scenarios: &[ScenarioReport]) -> Vec<PeerComparison> {
    let Some(peer) = scenarios
        .iter()
        .find(|s| s.result.scenario == PEER && usable(s))
    else {
        return Vec::new();
    };
    let Some(peer_added) = &peer.added else {
        return Vec::new();
    };
    scenarios
        .iter()
        .filter(|s| s.result.scenario.starts_with("trellis-") && s.result.mode != Mode::Tcp)
        .filter(|s| usable(s))
        .filter_map(|s| {
            let added = s.added.as_ref()?;
            let rss = (max_peak_rss_kb(s), max_peak_rss_kb(peer));
            let cpu = (
                s.proxy_cpu_s_per_1k_req_total,
                peer.proxy_cpu_s_per_1k_req_total,
            );
            Some(PeerComparison {
                scenario: s.result.scenario.clone(),
                peer: PEER.to_string(),
                added_p50_us: (added.p50_us, peer_added.p50_us),
                added_p50_ratio: ratio(added.p50_us as f64, peer_added.p50_us as f64),
                added_p99_us: (added.p99_us, peer_added.p99_us),
                added_p99_ratio: ratio(added.p99_us as f64, peer_added.p99_us as f64),
                cpu_s_per_1k_req: cpu,
                cpu_ratio: ratio(cpu.0, cpu.1),
                peak_rss_kb: rss,
                rss_ratio: ratio(rss.0 as f64, rss.1 as f64),
            })
        })
        .collect()
}

fn ms(us: i64) -> String {
    format!("{:+.3} ms", us as f64 / 1000.0)
}

/// The targets of issue 4, checked on [`TARGET_SCENARIO`] (and the peer, when it ran).
pub fn check_targets(scenarios: &[ScenarioReport], peer: &[PeerComparison]) -> Vec<TargetCheck> {
    let subject = scenarios
        .iter()
        .find(|s| s.result.scenario == TARGET_SCENARIO && usable(s));
    let check = |target: String, measured: Option<(String, bool)>| match measured {
        Some((measured, passed)) => TargetCheck {
            target,
            measured,
            verdict: Verdict::of(passed),
        },
        None => TargetCheck {
            target,
            measured: "—".to_string(),
            verdict: Verdict::NotMeasured,
        },
    };
    let added = subject.and_then(|s| s.added.as_ref());
    let versus = peer.iter().find(|c| c.scenario == TARGET_SCENARIO);
    let cpu = subject.filter(|s| !s.proxies.is_empty()).map(|s| {
        s.proxies
            .iter()
            .map(|p| p.cpu_s_per_1k_req)
            .fold(0.0, f64::max)
    });
    let rss = subject
        .filter(|s| !s.proxies.is_empty())
        .map(max_peak_rss_kb);
    vec![
        check(
            format!("added p50 ≤ {}", ms(TARGET_ADDED_P50_US)),
            added.map(|a| (ms(a.p50_us), a.p50_us <= TARGET_ADDED_P50_US)),
        ),
        check(
            format!("added p99 ≤ {}", ms(TARGET_ADDED_P99_US)),
            added.map(|a| (ms(a.p99_us), a.p99_us <= TARGET_ADDED_P99_US)),
        ),
        check(
            format!("added p50 lower than {PEER}"),
            versus.map(|c| {
                let (ours, theirs) = c.added_p50_us;
                (format!("{} vs {}", ms(ours), ms(theirs)), ours < theirs)
            }),
        ),
        check(
            format!("added p99 lower than {PEER}"),
            versus.map(|c| {
                let (ours, theirs) = c.added_p99_us;
                (format!("{} vs {}", ms(ours), ms(theirs)), ours < theirs)
            }),
        ),
        check(
            format!("≤ {TARGET_CPU_S_PER_1K_REQ} vCPU per 1,000 rps per proxy"),
            cpu.map(|c| {
                (
                    format!("{c:.4} (busiest proxy)"),
                    c <= TARGET_CPU_S_PER_1K_REQ,
                )
            }),
        ),
        check(
            format!("≤ {} MB peak RSS per proxy", TARGET_PEAK_RSS_KB / 1024),
            rss.map(|kb| {
                (
                    format!("{:.1} MB (largest proxy)", kb as f64 / 1024.0),
                    kb <= TARGET_PEAK_RSS_KB,
                )
            }),
        ),
        check(
            "zero errors".to_string(),
            subject.map(|s| (s.result.errors.to_string(), s.result.errors == 0)),
        ),
    ]
}
