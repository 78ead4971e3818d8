//! The `trellis-proxy` binary as an operator meets it. (Building this test also
//! builds the binary that the network-namespace tests run inside pods.)

use std::process::Command;

const PROXY: &str = env!("CARGO_BIN_EXE_trellis-proxy");

#[test]
fn init_dry_run_prints_the_redirect_rules() {
    let out = Command::new(PROXY)
        .args(["init", "--dry-run", "--exclude-outbound-ports", "5432"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8_lossy(&out.stdout);
    assert!(rules.contains("--to-ports 15001"), "{rules}");
    assert!(rules.contains("--to-ports 15006"), "{rules}");
    assert!(rules.contains("--uid-owner 1337"), "{rules}");
    assert!(rules.contains("--dport 5432"), "{rules}");
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    let out = Command::new(PROXY)
        .args([
            "init",
            "--dry-run",
            "--exclude-outbound-cidrs",
            "10.0.0.0/33",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("10.0.0.0/33"));

    let out = Command::new(PROXY)
        .args([
            "run",
            "--namespace",
            "default",
            "--service-account",
            "x",
            "--ca-root",
            "/nonexistent/root.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/root.pem"));
}
