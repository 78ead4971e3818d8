//! The control-plane binaries (etcd, kube-apiserver, kube-controller-manager, kubectl):
//! built once per machine by `tests/k8s/build.sh` from the pinned Go modules, found once
//! per test process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::process::run_with_timeout;

/// Set to a folder holding the four binaries to use them instead of building.
pub const BIN_DIR_VAR: &str = "TRELLIS_K8S_BIN_DIR";

/// The four binaries a cluster needs, by file name.
pub const BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
];

/// A cold build on a 2-core machine takes minutes; this bounds a hung one.
const BUILD_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Where the binaries are, and how long this process spent building them.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    /// The folder holding [`BINARIES`].
    pub dir: PathBuf,
    /// How long `build.sh` took when this process ran a real build; `None` when the
    /// binaries were already there (or came from [`BIN_DIR_VAR`]).
    pub built_in: Option<Duration>,
}

impl KubeBinaries {
    /// The path of one of [`BINARIES`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// `tests/k8s/build.sh` in this source tree.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh")
}

/// Why this machine cannot run a test cluster, or `None` if it can: the binaries come
/// from [`BIN_DIR_VAR`], or the `go` command is there to build them.
pub fn kube_skip_reason() -> Option<String> {
    if let Some(dir) = std::env::var_os(BIN_DIR_VAR) {
        let dir = PathBuf::from(dir);
        let missing: Vec<_> = BINARIES.iter().filter(|b| !dir.join(b).is_file()).collect();
        if missing.is_empty() {
            return None;
        }
        return Some(format!("{BIN_DIR_VAR}={} lacks {missing:?}", dir.display()));
    }
    let go = Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if go {
        None
    } else {
        Some("needs the go command to build kube-apiserver and etcd (not found)".into())
    }
}

/// The binaries, built on first use in this process (`build.sh` itself returns at once
/// when its cache is warm, and serialises concurrent test processes with a lock).
pub fn kube_binaries() -> Result<&'static KubeBinaries> {
    static BINARIES_ONCE: OnceLock<Result<KubeBinaries, String>> = OnceLock::new();
    BINARIES_ONCE
        .get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("test cluster binaries: {e}"))
}

fn find_or_build() -> Result<KubeBinaries> {
    if let Some(dir) = std::env::var_os(BIN_DIR_VAR) {
        return Ok(KubeBinaries {
            dir: PathBuf::from(dir),
            built_in: None,
        });
    }
    let script = build_script();
    let start = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    let out = run_with_timeout(cmd, BUILD_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(anyhow!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            stderr.trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("{} printed no folder", script.display()))?;
    // build.sh says "built in" only when it built something.
    let built_in = stderr.contains("built in").then(|| start.elapsed());
    if let Some(took) = built_in {
        tracing::info!(dir, ?took, "built the test cluster binaries");
    }
    Ok(KubeBinaries {
        dir: PathBuf::from(dir),
        built_in,
    })
}
