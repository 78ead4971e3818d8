//! The real `helm` command for the chart tests: built once per machine by
//! `tests/k8s/build-helm.sh` from the pinned `helm.sh/helm/v4` module, found once per
//! test process, and run with its own config, cache and data folders so a test never
//! reads or writes the user's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::process::{netns_command, run_with_input, run_with_timeout};

/// Set to a `helm` binary to use it instead of building one.
pub const HELM_BIN_VAR: &str = "TRELLIS_HELM_BIN";

/// A cold build on a busy 2-core machine takes minutes; this bounds a hung one.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The time limit of one helm call that does not wait on the cluster.
pub const HELM_TIMEOUT: Duration = Duration::from_secs(120);

/// `tests/k8s/build-helm.sh` in this source tree.
pub fn helm_build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build-helm.sh")
}

/// Why this machine cannot run helm, or `None` if it can: the binary comes from
/// [`HELM_BIN_VAR`], is built already, or the `go` command is there to build it.
pub fn helm_skip_reason() -> Option<String> {
    if let Some(bin) = std::env::var_os(HELM_BIN_VAR) {
        let bin = PathBuf::from(bin);
        return (!bin.is_file()).then(|| format!("{HELM_BIN_VAR}={} is no file", bin.display()));
    }
    if let Ok(dir) = run_script(&["--dir"], Duration::from_secs(30))
        && dir.join("helm").is_file()
    {
        return None;
    }
    match Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "needs the go command to build helm (`go version` failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("needs the go command to build helm ({e})")),
    }
}

/// The helm binary, built on first use in this process (`build-helm.sh` returns at
/// once when its cache is warm, and serialises concurrent test processes with a lock).
pub fn helm_binary() -> Result<&'static Path> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    HELM.get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow!("helm: {e}"))
}

fn find_or_build() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(HELM_BIN_VAR) {
        return Ok(PathBuf::from(bin));
    }
    let dir = run_script(&["--dir"], Duration::from_secs(30))?;
    let bin = dir.join("helm");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "building helm into {} with {} (first time on this machine: a few minutes)",
        dir.display(),
        helm_build_script().display()
    );
    let start = Instant::now();
    let dir = run_script(&[], BUILD_TIMEOUT)?;
    eprintln!("built helm in {:.0?}", start.elapsed());
    tracing::info!(dir = %dir.display(), took = ?start.elapsed(), "built helm");
    Ok(dir.join("helm"))
}

/// Runs `build-helm.sh args`; returns the folder it prints last.
fn run_script(args: &[&str], timeout: Duration) -> Result<PathBuf> {
    let script = helm_build_script();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(args);
    let out = run_with_timeout(cmd, timeout)?;
    if !out.status.success() {
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
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{} printed no folder", script.display()))
}

/// helm with a home of its own: `HELM_CONFIG_HOME`, `HELM_CACHE_HOME` and
/// `HELM_DATA_HOME` under `home` (no repositories, plugins or registry logins of the
/// user's), and no kubeconfig but the one a call names.
#[derive(Debug, Clone)]
pub struct Helm {
    bin: PathBuf,
    home: PathBuf,
}

impl Helm {
    /// helm (built if needed) keeping its state under `home`.
    pub fn new(home: &Path) -> Result<Self> {
        let bin = helm_binary()?.to_path_buf();
        std::fs::create_dir_all(home).with_context(|| format!("create {}", home.display()))?;
        Ok(Self {
            bin,
            home: home.to_path_buf(),
        })
    }

    /// The binary.
    pub fn path(&self) -> &Path {
        &self.bin
    }

    /// Runs `helm args` here; returns its output whatever its exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args);
        self.run(cmd, HELM_TIMEOUT)
    }

    /// Runs `helm args` here; returns stdout, or an error with stderr when it fails.
    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        ok_stdout(args, &out)
    }

    /// Runs `helm args` inside network namespace `netns` (where a test cluster's API
    /// server is reachable), allowing `timeout`; stdout, or an error with stderr.
    pub fn run_in_netns(&self, netns: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let program = self.bin.to_str().context("helm path is not UTF-8")?;
        let cmd = netns_command(netns, None, program, args);
        let out = self.run(cmd, timeout)?;
        ok_stdout(args, &out)
    }

    fn run(&self, mut cmd: Command, timeout: Duration) -> Result<Output> {
        cmd.env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .env_remove("KUBECONFIG")
            .env_remove("HELM_NAMESPACE")
            .env_remove("HELM_KUBECONTEXT");
        run_with_input(cmd, None, timeout)
    }
}

fn ok_stdout(args: &[&str], out: &Output) -> Result<String> {
    if !out.status.success() {
        return Err(anyhow!(
            "`helm {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
