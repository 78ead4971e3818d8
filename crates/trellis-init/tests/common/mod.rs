//! Helpers for the root-only tests: the skip check and runner, and a self-deleting
//! network namespace.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why this machine cannot run the root tests, or `None` if it can. The same check as
/// `trellis_tests::root_skip_reason` (copied: trellis-tests depends on this crate).
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

/// The `main` of a `harness = false` test file whose tests all need root and network
/// namespaces, as `trellis_tests::run_root_tests`: runs `tests` with libtest-mimic (a
/// panic is a failure), and when [`root_skip_reason`] says they cannot run here, prints
/// one `SKIPPED (reported as ignored): <reason>` line and marks every test ignored, so
/// the runner's summary counts them as ignored rather than passed.
pub fn run_root_tests(tests: &[(&'static str, fn())]) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    let skip = root_skip_reason();
    // Not with `--list`: tools such as cargo-nextest parse that output.
    if let (Some(reason), false) = (skip, args.list) {
        println!("SKIPPED (reported as ignored): {reason}");
    }
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                test();
                Ok(())
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Whether a binary can be started (`BIN --version`).
pub fn have_binary(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A network namespace `trellis-init-<pid>-<n>`, deleted on drop (also on panic).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("trellis-init-{}-{n}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        Self { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `*-save -t nat` output without comments and counters, for comparing runs.
pub fn normalized_nat(netns: &str, save_binary: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, save_binary, "-t", "nat"])
        .output()
        .expect("run iptables-save");
    assert!(out.status.success(), "{save_binary} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
