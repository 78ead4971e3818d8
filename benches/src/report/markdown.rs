//! `results.md`.

use std::fmt::Write as _;

use super::{Report, ScenarioReport, median_u64};

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn signed_ms(us: i64) -> String {
    format!("{:+.3}", us as f64 / 1000.0)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "—".to_string(), |r| format!("{r:.2}×"))
}

fn per_proxy(s: &ScenarioReport, f: impl Fn(&crate::procstat::CpuCost) -> String) -> String {
    if s.proxies.is_empty() {
        "—".to_string()
    } else {
        s.proxies.iter().map(f).collect::<Vec<_>>().join(" / ")
    }
}

/// The Markdown summary of a suite.
pub fn render_markdown(report: &Report) -> String {
    let l = &report.load;
    let mut out = String::new();
    let _ = writeln!(out, "# Trellis latency benchmark\n");
    let _ = writeln!(out, "- date: {}", report.date);
    let _ = writeln!(out, "- machine: {} cores available", report.cores);
    if !report.topology.is_empty() {
        let _ = writeln!(out, "- topology: {}", report.topology);
    }
    let _ = writeln!(
        out,
        "- load: open loop, {} rps over {} connections, {} s measured after {} s warm-up, \
         size {} B, timeout {} s, at most {} requests, pacer spin {} µs, path `{}`",
        l.rate,
        l.connections,
        l.duration_s,
        l.warmup_s,
        l.size,
        l.timeout_s,
        l.max_requests,
        l.pacer_spin_us,
        l.path
    );
    let _ = writeln!(
        out,
        "- baseline: {}",
        report.baseline.as_deref().unwrap_or("(none)")
    );
    if report.rounds > 1 {
        let _ = writeln!(
            out,
            "- rounds: {}, interleaved (each round runs every scenario once, in table \
             order); figures are medians across rounds; added latency and ratios are taken \
             against the baseline of the same round, then medianed; CPU is the median, \
             peak RSS the maximum, requests and errors the totals",
            report.rounds
        );
    }
    let _ = writeln!(
        out,
        "- latency in ms, from each request's intended send time to the end of its \
         response (coordinated omission corrected); × base is the scenario's latency over \
         its baseline's at the same percentile; CPU and RSS from /proc over the measured \
         window, one figure per proxy on the path\n"
    );
    let _ = writeln!(
        out,
        "| scenario | p50 | p90 | p99 | p99.9 | max | added p50 | added p99 | p50 × base | \
         p99 × base | CPU/1k req per proxy (s) | vCPU per proxy at the rate | peak RSS (MB) \
         | errors |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in &report.scenarios {
        let r = &s.result;
        let (added50, added99) = match &s.added {
            Some(a) if Some(&a.baseline) != report.baseline.as_ref() => (
                format!("{} vs {}", signed_ms(a.p50_us), a.baseline),
                signed_ms(a.p99_us),
            ),
            Some(a) => (signed_ms(a.p50_us), signed_ms(a.p99_us)),
            None => ("—".to_string(), "—".to_string()),
        };
        let failed = if s.failure.is_some() { " (failed)" } else { "" };
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            failed,
            ms(r.p50_us),
            ms(r.p90_us),
            ms(r.p99_us),
            ms(r.p999_us),
            ms(r.max_us),
            added50,
            added99,
            ratio(s.ratio.as_ref().map(|q| q.p50)),
            ratio(s.ratio.as_ref().map(|q| q.p99)),
            per_proxy(s, |c| format!("{:.4}", c.cpu_s_per_1k_req)),
            per_proxy(s, |c| format!("{:.3}", c.vcpu)),
            per_proxy(s, |c| format!("{:.1}", c.peak_rss_kb as f64 / 1024.0)),
            r.errors
        );
    }
    let _ = writeln!(
        out,
        "\n| scenario | mode | target | ok requests | achieved rps | mean (ms) | \
         generator lag p99 / max (ms) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for s in &report.scenarios {
        let r = &s.result;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {:.3} | {} / {} |",
            r.scenario,
            r.mode,
            s.target,
            r.requests,
            r.achieved_rps,
            r.mean_us / 1000.0,
            ms(s.generator_lag_p99_us),
            ms(s.generator_lag_max_us)
        );
    }
    if report.rounds > 1 {
        render_spread(&mut out, report);
    }
    render_peer(&mut out, report);
    render_targets(&mut out, report);
    if report.scenarios.iter().any(|s| s.saturation.is_some()) {
        let _ = writeln!(
            out,
            "\n## Saturation\n\nThe highest offered rate held with p99 under the limit and no \
             errors (doubling, then bisection to 5 %; short steps, so a guide, not a \
             certificate).\n"
        );
        let _ = writeln!(
            out,
            "| scenario | highest passing rate (rps) | p99 there (ms) | p50 there (ms) | \
             steps | lowest failing rate (rps) | search |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for s in &report.scenarios {
            let name = &s.result.scenario;
            let Some(sat) = &s.saturation else {
                let _ = writeln!(out, "| {name} | not searched | | | | | |");
                continue;
            };
            let best = match sat.best_rate {
                Some(r) => format!("{r:.0}"),
                None if sat.steps.is_empty() => "no step fit in the budget".to_string(),
                None => "none passed".to_string(),
            };
            let (p99, p50) = sat.best.as_ref().map_or_else(
                || ("—".to_string(), "—".to_string()),
                |b| (ms(b.p99_us), ms(b.p50_us)),
            );
            let lowest_fail = sat
                .steps
                .iter()
                .filter(|st| !st.passed)
                .map(|st| st.rate)
                .reduce(f64::min)
                .map_or_else(|| "—".to_string(), |r| format!("{r:.0}"));
            let how = if sat.cut_short {
                "cut short by its time budget"
            } else {
                "converged"
            };
            let _ = writeln!(
                out,
                "| {name} | {best} | {p99} | {p50} | {} | {lowest_fail} | {how} |",
                sat.steps.len()
            );
        }
    }
    if !report.notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n");
        for n in &report.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    let failures: Vec<_> = report
        .scenarios
        .iter()
        .filter_map(|s| s.failure.as_ref().map(|f| (&s.result.scenario, f)))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Problems\n");
        for (name, why) in failures {
            let _ = writeln!(out, "- {name}: {why}");
        }
    }
    out
}

/// Each scenario's p50 and p99 as median (min–max) over the rounds, and the added p50
/// of every round.
fn render_spread(out: &mut String, report: &Report) {
    let _ = writeln!(
        out,
        "\n## Spread across rounds\n\nMedian (min–max) over the rounds in ms; added p50 \
         per round against that round's baseline, in round order.\n"
    );
    let _ = writeln!(
        out,
        "| scenario | p50 | p99 | added p50 per round | added p99 per round | errors per round |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for s in &report.scenarios {
        let ran: Vec<_> = s.rounds.iter().filter(|f| f.failure.is_none()).collect();
        let spread = |f: fn(&super::RoundFigures) -> u64| {
            let values = || ran.iter().map(|r| f(r));
            match (values().min(), values().max()) {
                (Some(lo), Some(hi)) => {
                    format!("{} ({}–{})", ms(median_u64(values())), ms(lo), ms(hi))
                }
                _ => "—".to_string(),
            }
        };
        let per_round = |f: fn(&super::AddedLatency) -> i64| {
            let v: Vec<String> = s
                .rounds
                .iter()
                .map(|r| {
                    r.added
                        .as_ref()
                        .map_or_else(|| "—".to_string(), |a| signed_ms(f(a)))
                })
                .collect();
            if s.rounds.iter().all(|r| r.added.is_none()) {
                "—".to_string()
            } else {
                v.join(", ")
            }
        };
        let errors: Vec<String> = s.rounds.iter().map(|r| r.errors.to_string()).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            s.result.scenario,
            spread(|r| r.p50_us),
            spread(|r| r.p99_us),
            per_round(|a| a.p50_us),
            per_round(|a| a.p99_us),
            errors.join(", ")
        );
    }
}

/// Trellis next to the HAProxy peer: "do we beat HAProxy", figure by figure.
fn render_peer(out: &mut String, report: &Report) {
    let peer = super::verdict::PEER;
    let _ = writeln!(out, "\n## Against {peer}\n");
    if report.versus_peer.is_empty() {
        let _ = writeln!(
            out,
            "{peer} did not run (or did not finish), so there is no comparison."
        );
        return;
    }
    let _ = writeln!(
        out,
        "Trellis / {peer}: below 1× Trellis costs less. Added latency is each against its \
         own baseline ({peer} carries HTTP/1.1 over its `baseline`); CPU is both proxies \
         of the path together; RSS is the larger proxy's peak.\n"
    );
    let _ = writeln!(
        out,
        "| scenario | added p50 (ms): Trellis / {peer} | ratio | added p99 (ms) | ratio | \
         CPU s per 1k req | ratio | peak RSS (MB) | ratio | Trellis lower on |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for c in &report.versus_peer {
        let _ = writeln!(
            out,
            "| {} | {} / {} | {} | {} / {} | {} | {:.4} / {:.4} | {} | {:.1} / {:.1} | {} | {} |",
            c.scenario,
            signed_ms(c.added_p50_us.0),
            signed_ms(c.added_p50_us.1),
            ratio(c.added_p50_ratio),
            signed_ms(c.added_p99_us.0),
            signed_ms(c.added_p99_us.1),
            ratio(c.added_p99_ratio),
            c.cpu_s_per_1k_req.0,
            c.cpu_s_per_1k_req.1,
            ratio(c.cpu_ratio),
            c.peak_rss_kb.0 as f64 / 1024.0,
            c.peak_rss_kb.1 as f64 / 1024.0,
            ratio(c.rss_ratio),
            {
                let lower = c.lower_on();
                if lower.is_empty() {
                    "nothing".to_string()
                } else {
                    lower.join(", ")
                }
            },
        );
    }
}

/// The targets of issue 4, pass or fail.
fn render_targets(out: &mut String, report: &Report) {
    if report.targets.is_empty() {
        return;
    }
    let l = &report.load;
    let _ = writeln!(
        out,
        "\n## Targets (issue 4)\n\nStated for `{}`: two sidecars, mTLS, HTTP/1.1, 1 KB \
         responses at 1,000 rps; this run offered {} rps with {} B.\n",
        super::verdict::TARGET_SCENARIO,
        l.rate,
        l.size
    );
    let _ = writeln!(out, "| target | measured | met? |");
    let _ = writeln!(out, "|---|---|---|");
    for t in &report.targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            t.target,
            t.measured,
            t.verdict.as_str()
        );
    }
}
