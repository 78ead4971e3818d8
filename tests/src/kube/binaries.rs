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
    /// How long this process waited for `build.sh` when the binaries were missing (its
    /// own build, or another test process's that held the lock); `None` when they were
    /// already there (or came from [`BIN_DIR_VAR`]).
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
    match Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "needs the go command to build kube-apiserver and etcd (`go version` failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!(
            "needs the go command to build kube-apiserver and etcd ({e})"
        )),
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
    let dir = run_script(&script, &["--dir"], Duration::from_secs(30))?;
    if BINARIES.iter().all(|b| dir.join(b).is_file()) {
        return Ok(KubeBinaries {
            dir,
            built_in: None,
        });
    }
    // Said up front: the build is silent and long, and the test runner shows nothing else.
    eprintln!(
        "building the test cluster binaries into {} with {} (first time on this machine: \
         about 20 minutes on 2 cores)",
        dir.display(),
        script.display()
    );
    let start = Instant::now();
    let dir = run_script(&script, &[], BUILD_TIMEOUT)?;
    let built_in = start.elapsed();
    eprintln!("built the test cluster binaries in {built_in:.0?}");
    tracing::info!(dir = %dir.display(), took = ?built_in, "built the test cluster binaries");
    Ok(KubeBinaries {
        dir,
        built_in: Some(built_in),
    })
}

/// Runs `build.sh args`; returns the folder it prints last.
fn run_script(script: &Path, args: &[&str], timeout: Duration) -> Result<PathBuf> {
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(args);
    let out = run_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        // Without the hundreds of "go: downloading" lines, the error is what is left.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("go: downloading"))
            .collect();
        return Err(anyhow!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            errors.join("\n")
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{} printed no folder", script.display()))
}
