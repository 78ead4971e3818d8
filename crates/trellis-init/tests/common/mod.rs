//! Helpers for the root-only tests: the skip check and a self-deleting network namespace.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Returns true (after printing `SKIPPED: ...` to stdout and stderr) when the test cannot
/// run here: not root, or `ip netns` does not work. The one place to change skip reporting.
pub fn skip_unless_root(test: &str) -> bool {
    let reason = if !is_root() {
        Some("needs root and network namespaces (not root)")
    } else if !netns_works() {
        Some("needs root and network namespaces (`ip netns` unavailable)")
    } else {
        None
    };
    match reason {
        Some(reason) => {
            println!("SKIPPED: {test}: {reason}");
            eprintln!("SKIPPED: {test}: {reason}");
            true
        }
        None => false,
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn netns_works() -> bool {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success())
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
