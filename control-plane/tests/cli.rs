//! The `trellis-control` binary as an operator meets it. (Building this test also
//! builds the binary that the network-namespace tests run in the node namespace.)

use std::process::Command;

const CONTROL: &str = env!("CARGO_BIN_EXE_trellis-control");

#[test]
fn a_malformed_registry_at_start_is_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    std::fs::create_dir(&registry).unwrap();
    std::fs::write(
        registry.join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 99999}]\n",
    )
    .unwrap();
    let out = Command::new(CONTROL)
        .arg("--registry-dir")
        .arg(&registry)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml:5"), "{stderr}");
}
