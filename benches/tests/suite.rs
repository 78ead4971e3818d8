//! The whole `trellis-bench suite` for well under a second per scenario at a low rate,
//! in two rounds, so it does not rot: real control plane and sidecars (the debug builds
//! in this target folder), network namespaces with iptables when root (loopback
//! otherwise), haproxy when installed, a one-step saturation search, the three reports.
//! No timing assertions: the machine is shared and noisy.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use trellis_bench::{Binaries, SaturationOptions, SuiteOptions, SuiteSettings, run_bench_suite};

fn binaries() -> Result<Binaries, String> {
    let find = |name: &str| trellis_tests::target_binary(name).map_err(|e| format!("{e:#}"));
    Ok(Binaries {
        bench: PathBuf::from(env!("CARGO_BIN_EXE_trellis-bench")),
        proxy: find("trellis-proxy")?,
        control: find("trellis-control")?,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_suite_runs_briefly() {
    let binaries = match binaries() {
        Ok(b) => b,
        Err(why) => {
            // `cargo test --workspace` builds them; `cargo test -p trellis-bench` may not.
            println!(
                "SKIPPED whole_suite_runs_briefly: the mesh binaries are not built ({why}); \
                 run `cargo build -p trellis-proxy -p trellis-control` or `cargo test --workspace`"
            );
            return;
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let out = std::env::temp_dir().join(format!(
        "trellis-bench-suite-{}-{nanos}",
        std::process::id()
    ));
    let settings = SuiteSettings {
        rate: 100.0,
        connections: 2,
        size: 1024,
        duration: Duration::from_millis(400),
        warmup: Duration::from_millis(200),
        rounds: 2,
        timeout: Duration::from_secs(2),
        max_requests: 1_000,
        pause: Duration::from_millis(100),
        out_dir: Some(out.clone()),
        ..SuiteSettings::default()
    };
    let mut opts = SuiteOptions::new(binaries, settings);
    // One short step per scenario: exercises the search's wiring, not its outcome.
    opts.saturation = Some(SaturationOptions {
        total_budget: Duration::from_secs(9),
        step: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        ..SaturationOptions::default()
    });
    let start = Instant::now();
    let report = run_bench_suite(&opts).await.unwrap();
    println!(
        "suite took {:?} in topology: {}",
        start.elapsed(),
        report.topology
    );
    for n in &report.notes {
        println!("note: {n}");
    }

    let root = trellis_tests::root_skip_reason().is_none();
    assert_eq!(report.topology.starts_with("network namespaces"), root);
    let names: Vec<&str> = report
        .scenarios
        .iter()
        .map(|s| s.result.scenario.as_str())
        .collect();
    let haproxy = trellis_bench::haproxy::haproxy_on_path().is_some();
    let mut expected = vec!["baseline", "trellis-http1", "trellis-http2"];
    if haproxy {
        expected.push("haproxy-mtls");
    } else {
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("haproxy-mtls: skipped"))
        );
    }
    expected.extend([
        "baseline-grpc",
        "trellis-grpc",
        "baseline-tcp",
        "trellis-tcp",
    ]);
    assert_eq!(names, expected);
    assert_eq!(report.rounds, 2);
    for s in &report.scenarios {
        let name = &s.result.scenario;
        assert!(s.failure.is_none(), "{name}: {:?}", s.failure);
        assert_eq!(s.rounds.len(), 2, "{name}");
        assert!(
            s.rounds.iter().all(|r| r.requests > 0 && r.errors == 0),
            "{name}"
        );
        assert!(s.result.requests > 0, "{name}");
        assert_eq!(s.result.errors, 0, "{name}");
        assert!(!s.curve.is_empty(), "{name}");
        let proxies = if name.starts_with("baseline") { 0 } else { 2 };
        assert_eq!(s.proxies.len(), proxies, "{name}");
        assert!(s.proxies.iter().all(|p| p.peak_rss_kb > 0), "{name}");
        assert!(
            s.saturation.as_ref().is_some_and(|r| !r.steps.is_empty()),
            "{name}"
        );
        if !name.starts_with("baseline") {
            let added = s.added.as_ref().unwrap();
            let base = if name.ends_with("tcp") {
                "baseline-tcp"
            } else if name.ends_with("grpc") {
                "baseline-grpc"
            } else {
                "baseline"
            };
            assert_eq!(added.baseline, base, "{name}");
            assert_eq!(s.ratio.as_ref().unwrap().baseline, base, "{name}");
            assert!(s.rounds.iter().all(|r| r.added.is_some()), "{name}");
        }
    }
    assert_eq!(report.targets.len(), 7);
    if haproxy {
        let compared: Vec<&str> = report
            .versus_peer
            .iter()
            .map(|c| c.scenario.as_str())
            .collect();
        assert_eq!(compared, ["trellis-http1", "trellis-http2", "trellis-grpc"]);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        json["scenarios"].as_array().map(Vec::len),
        Some(expected.len())
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("- topology: "), "{md}");
    assert!(md.contains("## Saturation"), "{md}");
    assert!(md.contains("## Spread across rounds"), "{md}");
    assert!(md.contains("## Targets (issue 4)"), "{md}");
    assert!(md.contains("## Against haproxy-mtls"), "{md}");
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), expected.len());
    let _ = std::fs::remove_dir_all(&out);

    if root {
        // Nothing of the bed is left behind.
        let left = trellis_tests::netns::list().unwrap_or_default();
        let me = format!("trellis-bench-{}-", std::process::id());
        assert!(!left.iter().any(|n| n.starts_with(&me)), "{left:?}");
    }
}
