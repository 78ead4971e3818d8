use super::svg::{x_of_percentile, xml_escape, y_decades};
use super::*;

fn histogram(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
    let mut h = crate::loadgen::new_histogram().unwrap();
    for v in values {
        h.record(v).unwrap();
    }
    h
}

fn result(name: &str, values: impl IntoIterator<Item = u64>, errors: u64) -> RunResult {
    let h = histogram(values);
    RunResult::from_histogram(
        name,
        Mode::Http1,
        1000.0,
        16,
        Duration::from_secs(2),
        &h,
        errors,
    )
}

#[test]
fn percentiles_from_histogram() {
    // 1..=1000 µs, one each.
    let r = result("x", 1..=1000, 3);
    assert_eq!(r.requests, 1000);
    assert_eq!(r.errors, 3);
    assert_eq!(r.p50_us, 500);
    assert_eq!(r.p90_us, 900);
    assert_eq!(r.p99_us, 990);
    assert_eq!(r.p999_us, 999);
    assert_eq!(r.max_us, 1000);
    assert!((r.mean_us - 500.5).abs() < 0.5);
    assert!((r.achieved_rps - 500.0).abs() < 1e-9);
    assert_eq!(r.duration_s, 2.0);
}

#[test]
fn three_significant_digits() {
    // 123,456 µs is kept to within 0.1%.
    let r = result("x", [123_456], 0);
    let err = (r.p50_us as f64 - 123_456.0).abs() / 123_456.0;
    assert!(err < 0.001, "{}", r.p50_us);
}

#[test]
fn empty_histogram_is_zero() {
    let r = result("x", [], 5);
    assert_eq!(
        (r.requests, r.p50_us, r.max_us, r.mean_us, r.achieved_rps),
        (0, 0, 0, 0.0, 0.0)
    );
    assert!(percentile_curve(&histogram([])).is_empty());
}

#[test]
fn added_latency_is_signed_difference() {
    // Below 2048 µs the histogram is exact.
    let base = result("baseline", 1..=1000, 0);
    let slow = result("proxy", (1..=1000).map(|v| v + 300), 0);
    let a = added_latency(&slow, &base);
    assert_eq!(a.baseline, "baseline");
    assert_eq!(a.p50_us, 300);
    assert_eq!(a.p90_us, 300);
    assert_eq!(a.p99_us, 300);
    assert_eq!(a.max_us, 300);
    let b = added_latency(&base, &slow);
    assert_eq!(b.p50_us, -300);
}

#[test]
fn curve_spans_p0_to_p9999() {
    let h = histogram(1..=100_000);
    let c = percentile_curve(&h);
    assert_eq!(
        c.len(),
        (CURVE_MAX_DECADES * CURVE_POINTS_PER_DECADE + 1) as usize
    );
    assert_eq!(c[0].percentile, 0.0);
    assert_eq!(c[0].latency_us, 1);
    let last = c[c.len() - 1];
    assert!((last.percentile - 99.99).abs() < 1e-6);
    assert!((last.latency_us as f64 - 99_990.0).abs() < 100.0);
    assert!(c.windows(2).all(|w| w[0].latency_us <= w[1].latency_us));
    // p50 sits at x = log10(2), which is point 6 of 20 per decade (10^0.3 ≈ 1.995).
    assert!((c[20].percentile - 90.0).abs() < 1e-9);
    assert!((c[40].percentile - 99.0).abs() < 1e-9);
}

#[test]
fn svg_axes() {
    assert_eq!(x_of_percentile(0.0), 0.0);
    assert!((x_of_percentile(90.0) - 1.0).abs() < 1e-9);
    assert!((x_of_percentile(99.99) - 4.0).abs() < 1e-6);
    assert_eq!(x_of_percentile(100.0), 4.0);
    assert_eq!(y_decades(50, 2_500), (-2, 1)); // 0.05 ms .. 2.5 ms
    assert_eq!(y_decades(1000, 1000), (0, 1));
    assert_eq!(xml_escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
}

#[test]
fn dates() {
    assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(format_utc(1_798_761_599), "2026-12-31 23:59:59 UTC");
}

fn report() -> Report {
    let scenario = |r: RunResult| ScenarioReport {
        target: "127.0.0.1:1".into(),
        proxies: Vec::new(),
        proxy_cpu_s_per_1k_req_total: 0.0,
        proxy_vcpu_total: 0.0,
        added: None,
        ratio: None,
        rounds: Vec::new(),
        curve: percentile_curve(&histogram((1..=100).map(|v| v * 100))),
        generator_lag_p99_us: 0,
        generator_lag_max_us: 0,
        failure: None,
        baseline: None,
        saturation: None,
        result: r,
    };
    Report {
        date: utc_now(),
        cores: core_count(),
        topology: "loopback".into(),
        load: LoadSummary {
            rate: 1000.0,
            connections: 16,
            size: 1024,
            duration_s: 2.0,
            warmup_s: 1.0,
            timeout_s: 1.0,
            max_requests: 10,
            pacer_spin_us: 0,
            path: "/".into(),
        },
        baseline: Some("baseline".into()),
        scenarios: vec![
            scenario(result("baseline", [100, 200], 0)),
            scenario(result("a<b", [400, 500], 1)),
        ],
        notes: vec!["haproxy-mtls: skipped".into()],
        rounds: 1,
        versus_peer: Vec::new(),
        targets: Vec::new(),
    }
}

#[test]
fn report_renders() {
    let mut r = report();
    r.compute_added();
    assert!(r.scenarios[0].added.is_none());
    assert_eq!(r.scenarios[1].added.as_ref().unwrap().p50_us, 300);
    let md = render_markdown(&r);
    assert!(md.contains("| baseline | 0.100 |"), "{md}");
    assert!(md.contains("+0.300"), "{md}");
    let svg = render_svg(&r);
    assert!(svg.starts_with("<svg"));
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(svg.contains("a&lt;b"));
    assert!(svg.trim_end().ends_with("</svg>"));
}

#[test]
fn per_scenario_baseline_and_json_round_trip() {
    let mut r = report();
    let mk = |name: &str, v: u64| ScenarioReport {
        result: result(name, [v], 0),
        ..r.scenarios[0].clone()
    };
    let mut tcp_base = mk("baseline-tcp", 1000);
    tcp_base.baseline = Some("baseline-tcp".into());
    let mut tcp = mk("tcp", 1500);
    tcp.baseline = Some("baseline-tcp".into());
    r.scenarios.push(tcp_base);
    r.scenarios.push(tcp);
    r.compute_added();
    assert!(r.scenarios[2].added.is_none());
    let added = r.scenarios[3].added.as_ref().unwrap();
    assert_eq!(
        (added.baseline.as_str(), added.p50_us),
        ("baseline-tcp", 500)
    );
    assert_eq!(r.scenarios[1].added.as_ref().unwrap().baseline, "baseline");
    let md = render_markdown(&r);
    assert!(md.contains("+0.500 vs baseline-tcp"), "{md}");
    assert!(md.contains("- topology: loopback"), "{md}");
    assert!(md.contains("haproxy-mtls: skipped"), "{md}");

    let json = serde_json::to_string(&r).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.scenarios.len(), 4);
    assert_eq!(back.scenarios[3].result, r.scenarios[3].result);
    // Latencies survive exactly; percentiles to the last bit or so.
    let lat = |s: &ScenarioReport| s.curve.iter().map(|p| p.latency_us).collect::<Vec<_>>();
    assert_eq!(lat(&back.scenarios[3]), lat(&r.scenarios[3]));
    for (a, b) in back.scenarios[3].curve.iter().zip(&r.scenarios[3].curve) {
        assert!((a.percentile - b.percentile).abs() < 1e-9);
    }
    assert_eq!(back.topology, "loopback");
}

#[test]
fn saturation_table() {
    let mut r = report();
    r.scenarios[1].saturation = Some(crate::saturation::SaturationResult {
        best_rate: Some(4000.0),
        best: Some(result("a<b", [3000], 0)),
        steps: Vec::new(),
        cut_short: true,
    });
    let md = render_markdown(&r);
    assert!(md.contains("## Saturation"), "{md}");
    assert!(md.contains("| a<b | 4000 | 3.0"), "{md}");
    assert!(md.contains("| baseline | not searched |"), "{md}");
}

fn cost(pid: u32, cpu_s_per_1k_req: f64, peak_rss_kb: u64) -> crate::procstat::CpuCost {
    crate::procstat::CpuCost {
        pid,
        cpu_s: cpu_s_per_1k_req,
        cpu_s_per_1k_req,
        vcpu: cpu_s_per_1k_req,
        rss_kb: peak_rss_kb,
        peak_rss_kb,
    }
}

/// A scenario whose latencies are `values`, with one proxy per `(cpu, rss)`.
fn run(
    name: &str,
    values: impl IntoIterator<Item = u64>,
    proxies: &[(f64, u64)],
) -> ScenarioReport {
    let mut s = report().scenarios[0].clone();
    let h = histogram(values);
    s.result =
        RunResult::from_histogram(name, Mode::Http1, 1000.0, 16, Duration::from_secs(2), &h, 0);
    s.curve = percentile_curve(&h);
    s.proxies = (0..)
        .zip(proxies)
        .map(|(pid, &(cpu, rss))| cost(pid, cpu, rss))
        .collect();
    s.proxy_cpu_s_per_1k_req_total = s.proxies.iter().map(|p| p.cpu_s_per_1k_req).sum();
    s
}

#[test]
fn medians() {
    assert_eq!(median_u64([].into_iter()), 0);
    assert_eq!(median_u64([7].into_iter()), 7);
    assert_eq!(median_u64([9, 1, 5].into_iter()), 5);
    assert_eq!(median_u64([2, 5].into_iter()), 3);
    assert_eq!(median_u64([u64::MAX, u64::MAX].into_iter()), u64::MAX);
    assert_eq!(median_i64([-3, 2].into_iter()), -1);
    assert_eq!(median_i64([-4, -2, 10, 0].into_iter()), -1);
    assert_eq!(median_f64([4.0, 1.0, 2.0].into_iter()), 2.0);
    assert_eq!(median_f64([1.0, 2.0].into_iter()), 1.5);
}

#[test]
fn rounds_compare_within_the_round_then_median() {
    // The machine drifts: round 2 is 1 ms slower for everyone. Within each round the
    // proxy adds 300, 500 and 400 µs; the median of those is 400, although the median
    // proxy and median baseline figures alone would give another answer.
    let shift = [0u64, 1000, 200];
    let added = [300u64, 500, 400];
    let rounds: Vec<Vec<ScenarioReport>> = (0..3)
        .map(|k| {
            vec![
                run("baseline", (1..=1000).map(|v| v + shift[k]), &[]),
                run(
                    "proxy",
                    (1..=1000).map(|v| v + shift[k] + added[k]),
                    &[(0.01 * (k as f64 + 1.0), 1000 * (k as u64 + 1))],
                ),
            ]
        })
        .collect();
    let combined = combine_rounds(rounds, Some("baseline"));
    assert_eq!(combined.len(), 2);
    let (base, proxy) = (&combined[0], &combined[1]);
    assert!(base.added.is_none() && base.ratio.is_none());
    assert_eq!(base.result.p50_us, 500 + 200);
    assert_eq!(base.result.requests, 3000);
    assert_eq!(base.rounds.len(), 3);
    assert_eq!(
        base.rounds.iter().map(|r| r.p50_us).collect::<Vec<_>>(),
        [500, 1500, 700]
    );
    let a = proxy.added.as_ref().unwrap();
    assert_eq!(
        (a.p50_us, a.p99_us, a.baseline.as_str()),
        (400, 400, "baseline")
    );
    assert_eq!(
        proxy
            .rounds
            .iter()
            .map(|r| r.added.as_ref().unwrap().p50_us)
            .collect::<Vec<_>>(),
        [300, 500, 400]
    );
    // Round 3's ratio (1100/700) is the median of 800/500, 2000/1500, 1100/700.
    let q = proxy.ratio.as_ref().unwrap();
    assert!((q.p50 - 1100.0 / 700.0).abs() < 1e-9, "{q:?}");
    // CPU: the median; RSS: the largest.
    assert_eq!(proxy.proxies.len(), 1);
    assert!((proxy.proxies[0].cpu_s_per_1k_req - 0.02).abs() < 1e-12);
    assert_eq!(proxy.proxies[0].peak_rss_kb, 3000);
    assert!((proxy.proxy_cpu_s_per_1k_req_total - 0.02).abs() < 1e-12);
    // The curve is the per-point median: at p50, round 3's 200 + 400 + 500.
    let p50 = proxy
        .curve
        .iter()
        .find(|p| (p.percentile - 50.0).abs() < 1.0);
    assert!(p50.is_some());
    assert!(proxy.failure.is_none());
}

#[test]
fn a_failed_round_is_named_and_left_out() {
    let mut broken = run("proxy", [], &[]);
    broken.failure = Some("load failed: refused".into());
    broken.result.errors = 7;
    let rounds = vec![
        vec![run("baseline", [100], &[]), run("proxy", [400], &[])],
        vec![run("baseline", [100], &[]), broken],
        vec![run("baseline", [100], &[]), run("proxy", [600], &[])],
    ];
    let combined = combine_rounds(rounds, Some("baseline"));
    let proxy = &combined[1];
    assert_eq!(
        proxy.failure.as_deref(),
        Some("round 2: load failed: refused")
    );
    assert_eq!(proxy.result.errors, 7);
    assert_eq!(proxy.result.p50_us, 500);
    assert_eq!(proxy.added.as_ref().unwrap().p50_us, 400);
    assert!(proxy.rounds[1].added.is_none());
}

/// trellis-http1 adds 50 µs everywhere with proxies at 0.02 + 0.01 s/1k and 10 MB; the
/// peer adds 100 µs at 0.02 + 0.02 s/1k and 8 MB (all exact: below 2048 µs).
fn peer_report() -> Report {
    let mut r = report();
    r.scenarios = vec![
        run("baseline", 1..=1000, &[]),
        run(
            "trellis-http1",
            (1..=1000).map(|v| v + 50),
            &[(0.02, 10 * 1024), (0.01, 9 * 1024)],
        ),
        run(
            "haproxy-mtls",
            (1..=1000).map(|v| v + 100),
            &[(0.02, 8 * 1024), (0.02, 8 * 1024)],
        ),
    ];
    r.compute_added();
    r.summarize();
    r
}

#[test]
fn trellis_against_the_peer_and_the_targets() {
    let r = peer_report();
    let added = |i: usize| r.scenarios[i].added.clone().unwrap();
    let (ours, theirs) = (added(1), added(2));
    assert_eq!(r.versus_peer.len(), 1);
    let c = &r.versus_peer[0];
    assert_eq!(
        (c.scenario.as_str(), c.peer.as_str()),
        ("trellis-http1", "haproxy-mtls")
    );
    assert_eq!(c.added_p50_us, (ours.p50_us, theirs.p50_us));
    assert_eq!(c.added_p50_us, (50, 100));
    assert!((c.added_p50_ratio.unwrap() - 0.5).abs() < 1e-9);
    assert_eq!(c.added_p99_us, (ours.p99_us, theirs.p99_us));
    assert_eq!(c.added_p99_us, (50, 100));
    assert!((c.cpu_ratio.unwrap() - 0.75).abs() < 1e-9);
    assert_eq!(c.peak_rss_kb, (10 * 1024, 8 * 1024));
    assert!((c.rss_ratio.unwrap() - 1.25).abs() < 1e-9);

    assert_eq!(c.lower_on(), ["added p50", "added p99", "CPU"]);

    let verdicts: Vec<Verdict> = r.targets.iter().map(|t| t.verdict).collect();
    assert_eq!(verdicts, [Verdict::Pass; 7], "{:#?}", r.targets);
    let md = render_markdown(&r);
    assert!(md.contains("## Against haproxy-mtls"), "{md}");
    assert!(
        md.contains("| trellis-http1 | +0.050 / +0.100 | 0.50× |"),
        "{md}"
    );
    assert!(md.contains("## Targets (issue 4)"), "{md}");
    assert!(
        md.contains("| added p50 ≤ +0.100 ms | +0.050 ms | yes |"),
        "{md}"
    );
    assert!(!md.contains("## Spread across rounds"), "{md}");

    // Over budget on CPU and memory, with errors: those fail, the rest still pass.
    let mut r = peer_report();
    r.scenarios[1].proxies[1] = cost(1, 0.08, 20 * 1024);
    r.scenarios[1].result.errors = 2;
    r.summarize();
    let failed: Vec<&str> = r
        .targets
        .iter()
        .filter(|t| t.verdict == Verdict::Fail)
        .map(|t| t.target.as_str())
        .collect();
    assert_eq!(
        failed,
        [
            "≤ 0.05 vCPU per 1,000 rps per proxy",
            "≤ 15 MB peak RSS per proxy",
            "zero errors"
        ]
    );
}

#[test]
fn without_the_peer_its_targets_are_not_measured() {
    let mut r = peer_report();
    r.scenarios.truncate(2);
    r.summarize();
    assert!(r.versus_peer.is_empty());
    let not: Vec<&str> = r
        .targets
        .iter()
        .filter(|t| t.verdict == Verdict::NotMeasured)
        .map(|t| t.target.as_str())
        .collect();
    assert_eq!(
        not,
        [
            "added p50 lower than haproxy-mtls",
            "added p99 lower than haproxy-mtls"
        ]
    );
    let md = render_markdown(&r);
    assert!(md.contains("haproxy-mtls did not run"), "{md}");
}

#[test]
fn rounds_show_their_spread() {
    let rounds: Vec<Vec<ScenarioReport>> = [0u64, 100]
        .iter()
        .map(|&d| {
            vec![
                run("baseline", [1000 + d], &[]),
                run("trellis-http1", [1300 + 2 * d], &[]),
            ]
        })
        .collect();
    let mut r = report();
    r.scenarios = combine_rounds(rounds, Some("baseline"));
    r.rounds = 2;
    r.summarize();
    let md = render_markdown(&r);
    assert!(md.contains("- rounds: 2, interleaved"), "{md}");
    assert!(md.contains("## Spread across rounds"), "{md}");
    assert!(
        md.contains(
            "| trellis-http1 | 1.400 (1.300–1.500) | 1.400 (1.300–1.500) | +0.300, +0.400 |"
        ),
        "{md}"
    );
    let svg = render_svg(&r);
    assert!(svg.contains("median of 2 rounds"));
    let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back.rounds, 2);
    assert_eq!(back.scenarios[1].rounds, r.scenarios[1].rounds);
    assert_eq!(back.targets, r.targets);
}
