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
