//! The Trellis end-to-end test bed: pods are network namespaces on a bridge inside a
//! "node" namespace, with real iptables, `/etc/hosts` names for services, and a small
//! test app (`trellis-testapp`) to run inside them.
//!
//! ```no_run
//! use trellis_tests::TestBed;
//! # fn main() -> anyhow::Result<()> {
//! let mut bed = TestBed::new("mytest")?;
//! let a = bed.add_pod("a")?;
//! let b = bed.add_pod("b")?;
//! let app = trellis_tests::testapp_path()?;
//! let app = app.to_str().unwrap_or_default();
//! let srv = bed.spawn(&b, None, app, &["tcp-echo", "--listen", "0.0.0.0:7000"])?;
//! srv.wait_listening(std::time::Duration::from_secs(10))?;
//! let addr = format!("{}:7000", b.ip);
//! let out = bed.exec_ok(&a, app, &["tcp-send", &addr, "hi"])?;
//! assert!(out.contains("hi"));
//! # Ok(()) }
//! ```
//!
//! Everything needs root and `ip netns`: test files set `harness = false` and hand their
//! tests to [`run_root_tests`], which reports them as ignored elsewhere. Network
//! rule: the bed never adds addresses or routes to the root namespace, so traffic only
//! flows between namespaces the bed created.

mod bed;
pub mod kube;
pub mod kubelet;
pub mod loopback;
pub mod netns;
mod process;

pub use bed::{
    EXEC_TIMEOUT, NODE_IP, NODE_IPV6, POD_IPV6_PREFIX_LEN, POD_PREFIX_LEN, Pod, SERVICE_CIDR,
    Service, TestBed,
};
pub use process::{ChildHandle, netns_command, run_with_input, run_with_timeout};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

/// Why this machine cannot run the root tests, or `None` if it can.
pub fn root_skip_reason() -> Option<&'static str> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("needs root and network namespaces (not root)");
    }
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !netns {
        return Some("needs root and network namespaces (`ip netns` unavailable)");
    }
    None
}

/// A root test for [`run_root_tests`]: its name and body.
pub type RootTest = (&'static str, fn() -> Result<()>);

/// The `main` of a `harness = false` test file whose tests all need root and network
/// namespaces: parses the usual test-runner arguments, and runs `tests` with
/// libtest-mimic. When [`root_skip_reason`] says they cannot run here, prints one
/// `SKIPPED (reported as ignored): <reason>` line and marks every test ignored, so the
/// runner's summary counts them as ignored rather than passed (the line is left out
/// with `--list`). Exits with the runner's
/// status (`--ignored` / `--include-ignored` still force them to run).
pub fn run_root_tests(tests: &[RootTest]) -> ! {
    run_tests_unless(root_skip_reason(), tests)
}

/// The body of [`run_root_tests`] for any reason to skip: with `skip` set, prints
/// `SKIPPED (reported as ignored): <skip>` and marks every test ignored.
pub fn run_tests_unless(skip: Option<&str>, tests: &[RootTest]) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    // Not with `--list`: tools such as cargo-nextest parse that output.
    if let (Some(reason), false) = (skip, args.list) {
        println!("SKIPPED (reported as ignored): {reason}");
    }
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                test().map_err(|e| libtest_mimic::Failed::from(format!("{e:#}")))
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Finds a binary built into the same target folder as the running test (e.g.
/// `trellis-testapp`, or `trellis-proxy` after `cargo build -p trellis-proxy`).
/// `TRELLIS_<NAME>_BIN` (upper case, `-` as `_`) overrides.
pub fn target_binary(name: &str) -> Result<PathBuf> {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    let var = if var.starts_with("TRELLIS_") {
        var
    } else {
        format!("TRELLIS_{var}")
    };
    if let Ok(p) = std::env::var(&var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut tried = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    bail!(
        "binary `{name}` not found (set {var}); tried {}",
        tried.join(", ")
    )
}

/// The path of `trellis-testapp` (built with this package).
pub fn testapp_path() -> Result<PathBuf> {
    if let Some(p) = option_env!("CARGO_BIN_EXE_trellis-testapp") {
        return Ok(PathBuf::from(p));
    }
    target_binary("trellis-testapp")
}

/// A folder `base/name` whose files the proxy (UID 1337) can read: world-readable, and
/// every folder above it made traversable.
pub fn shared_dir(base: &Path, name: &str) -> Result<PathBuf> {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let mut up = base.to_path_buf();
    loop {
        let mode = std::fs::metadata(&up)?.permissions().mode();
        if mode & 0o111 != 0o111 {
            std::fs::set_permissions(&up, std::fs::Permissions::from_mode(mode | 0o111))?;
        }
        if !up.pop() || up.as_os_str().len() <= 4 {
            break;
        }
    }
    Ok(dir)
}
