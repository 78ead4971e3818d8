//! The test side: start `trellis-test-kubelet` in the bed's node namespace and read its
//! logs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{ImageMap, READY_LINE};
use crate::process::read_log;
use crate::{ChildHandle, TestBed};

/// How long the kubelet may take to register its Node.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to stop its pods on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// A running `trellis-test-kubelet`. Dropping it stops the kubelet with SIGTERM, which
/// kills every pod's containers and removes their namespaces (the bed would only
/// SIGKILL it).
pub struct Kubelet {
    child: ChildHandle,
    state_dir: PathBuf,
    node_name: String,
}

impl Kubelet {
    /// Starts the kubelet for the API server that `kubeconfig` names, with `images`
    /// (bare image name → binary), and waits until its Node is registered Ready.
    pub fn start_with_kubeconfig(
        bed: &mut TestBed,
        kubeconfig: &Path,
        images: &[(&str, PathBuf)],
    ) -> Result<Self> {
        let exe = kubelet_binary()?;
        let state_dir = bed.dir().join("kubelet");
        let node_name = "trellis-node".to_string();
        let images = ImageMap::new(images.iter().map(|(n, p)| (n.to_string(), p.clone())));
        let mut cmd = Command::new("nsenter");
        // Only the network namespace: the pod namespaces it makes must be visible here.
        cmd.arg(format!("--net=/run/netns/{}", bed.node().netns))
            .arg("--")
            .arg(&exe)
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", &node_name, "--bed-id", bed.id()])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--images", &images.to_flag()])
            .env(
                "RUST_LOG",
                std::env::var("TRELLIS_KUBELET_LOG").unwrap_or_else(|_| "info".into()),
            );
        let child = bed.spawn_command("node-kubelet", "node: trellis-test-kubelet".into(), cmd)?;
        child
            .wait_for_log(READY_LINE, START_TIMEOUT)
            .context("kubelet did not become ready")?;
        Ok(Self {
            child,
            state_dir,
            node_name,
        })
    }

    /// Where pod folders (`pods/<ns>_<name>_<uid>/`: container logs, volumes) live.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The kubelet's own log.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// The kubelet's log and every container's log (`<ns>_<pod>_<uid>/<container>.log`).
    pub fn logs(&self) -> String {
        let mut s = format!("===== trellis-test-kubelet =====\n{}", self.child.log());
        let mut files = Vec::new();
        if let Ok(pods) = std::fs::read_dir(self.state_dir.join("pods")) {
            for pod in pods.flatten() {
                if let Ok(entries) = std::fs::read_dir(pod.path()) {
                    files.extend(
                        entries
                            .flatten()
                            .map(|e| e.path())
                            .filter(|p| p.extension().is_some_and(|e| e == "log")),
                    );
                }
            }
        }
        files.sort();
        for f in files {
            let name = f
                .strip_prefix(self.state_dir.join("pods"))
                .unwrap_or(&f)
                .display()
                .to_string();
            s += &format!("\n===== {name} =====\n{}", read_log(&f));
        }
        s
    }

    /// Stops the kubelet (SIGTERM), waiting for it to clean up its pods.
    pub fn stop(&self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.child.pid.to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        bail!("kubelet did not stop within {STOP_TIMEOUT:?}; killed")
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = format!("{e:#}"), "kubelet stop");
        }
    }
}

/// `trellis-test-kubelet`, built with this package.
pub fn kubelet_binary() -> Result<PathBuf> {
    if let Some(p) = option_env!("CARGO_BIN_EXE_trellis-test-kubelet") {
        return Ok(PathBuf::from(p));
    }
    crate::target_binary("trellis-test-kubelet")
}

impl Kubelet {
    /// Starts the kubelet for `cluster` (with its admin credentials: this kubelet is the
    /// scheduler and kube-proxy too) and waits until its Node is Ready.
    pub fn start(
        bed: &mut TestBed,
        cluster: &crate::kube::KubeCluster,
        images: &[(&str, PathBuf)],
    ) -> Result<Self> {
        Self::start_with_kubeconfig(bed, cluster.kubeconfig_admin(), images)
    }
}
