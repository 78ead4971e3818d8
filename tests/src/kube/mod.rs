//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager, built from the pinned Go modules under `tests/k8s/`, run
//! inside the test bed's node namespace.
//!
//! ```no_run
//! use trellis_tests::TestBed;
//! use trellis_tests::kube::KubeCluster;
//! # fn main() -> anyhow::Result<()> {
//! let mut bed = TestBed::new("kube")?;
//! let cluster = KubeCluster::start(&mut bed)?;
//! cluster.kubectl(&["create", "namespace", "shop"])?;
//! let sa = cluster.kubectl(&["get", "serviceaccount", "default", "-n", "shop", "-o", "name"]);
//! # Ok(()) }
//! ```
//!
//! Everything listens inside the node namespace, so only the bed's namespaces reach it:
//! the API server at <https://10.244.0.1:6443> (also the `kubernetes` Service's
//! ClusterIP 10.96.0.1 once something DNATs it), etcd on the node's 127.0.0.1. No node
//! or kubelet is registered here; the test kubelet does that.
//!
//! Test files whose tests need a cluster hand them to [`run_cluster_tests`], which
//! reports them as ignored (saying why) when the machine lacks root, network
//! namespaces or Go.

mod binaries;
mod helm;
mod pki;

pub use binaries::{
    BIN_DIR_VAR, BINARIES, KubeBinaries, build_script, kube_binaries, kube_skip_reason,
};
pub use helm::{
    HELM_BIN_VAR, HELM_TIMEOUT, Helm, helm_binary, helm_build_script, helm_skip_reason,
};
pub use pki::{ClusterPki, PkiFiles};

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::process::{ChildHandle, netns_command, run_with_input};
use crate::{NODE_IP, Pod, RootTest, TestBed};

/// The node the test kubelet registers; the node client certificate is for
/// `system:node:<NODE_NAME>`.
pub const NODE_NAME: &str = "trellis-node";
/// Where the API server listens and what it advertises (the bed's bridge address).
pub const API_SERVER_IP: Ipv4Addr = NODE_IP;
/// The API server's port.
pub const API_SERVER_PORT: u16 = 6443;
/// The Service ClusterIP range (`--service-cluster-ip-range`), as in the bed.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/12";
/// The `kubernetes` Service's ClusterIP: the first address of the range.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The issuer of service-account tokens (`iss`), and the API server's own audience.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The controllers kube-controller-manager runs (canonical names of the pinned release).
pub const CONTROLLERS: &[&str] = &[
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "job-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
];

/// etcd's client port on the node namespace's loopback (the namespace is the bed's
/// own, so a fixed port cannot collide with another test).
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// How long the control plane may take to come up on a busy 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// The time limit of one kubectl call.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);

/// The `main` of a `harness = false` test file whose tests need a [`KubeCluster`]: as
/// [`crate::run_root_tests`], and the tests are also reported as ignored (with a
/// `SKIPPED` line saying why) when [`kube_skip_reason`] says the cluster cannot be built.
pub fn run_cluster_tests(tests: &[RootTest]) -> ! {
    let skip = crate::root_skip_reason()
        .map(str::to_string)
        .or_else(kube_skip_reason);
    crate::run_tests_unless(skip.as_deref(), tests)
}

/// A running control plane in a bed's node namespace. Dropping it kills its processes
/// and removes its folder (the bed's Drop would kill them too).
pub struct KubeCluster {
    node: Pod,
    binaries: KubeBinaries,
    dir: PathBuf,
    pki: ClusterPki,
    /// etcd, kube-apiserver, kube-controller-manager, in start order.
    processes: Vec<ChildHandle>,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("node", &self.node.netns)
            .field("dir", &self.dir)
            .field("bin_dir", &self.binaries.dir)
            .finish()
    }
}

impl KubeCluster {
    /// Builds the binaries if needed (first use on a machine: minutes), writes the PKI,
    /// starts etcd, the API server and the controller manager in `bed`'s node
    /// namespace, and waits until `/readyz` is ok and the controller manager has made
    /// the `default` ServiceAccount. One cluster per bed: the ports are fixed inside
    /// the node namespace.
    pub fn start(bed: &mut TestBed) -> Result<Self> {
        let binaries = kube_binaries()?.clone();
        let node = bed.node().clone();
        let dir = bed.dir().join("kube");
        let pki = ClusterPki::write(&dir.join("pki"), &api_server_url())?;
        let mut cluster = Self {
            node,
            binaries,
            dir,
            pki,
            processes: Vec::new(),
        };
        let started = Instant::now();
        cluster.start_processes(bed).with_context(|| {
            format!("test cluster logs, last lines:\n{}", cluster.log_tails(30))
        })?;
        tracing::info!(took = ?started.elapsed(), bed = bed.id(), "test cluster ready");
        Ok(cluster)
    }

    fn start_processes(&mut self, bed: &mut TestBed) -> Result<()> {
        self.start_etcd(bed)?;
        self.start_api_server(bed)?;
        self.wait_until("the API server's /readyz is ok", START_TIMEOUT, |c| {
            Ok(c.kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|body| body.trim() == "ok"))
        })?;
        self.start_controller_manager(bed)?;
        self.wait_until(
            "the controller manager creates ServiceAccount default/default",
            START_TIMEOUT,
            |c| {
                Ok(
                    c.kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                        .is_ok(),
                )
            },
        )?;
        Ok(())
    }

    fn start_etcd(&mut self, bed: &mut TestBed) -> Result<()> {
        let data = self.dir.join("etcd");
        let client = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let initial_cluster = format!("trellis={peer}");
        let args = [
            "--name=trellis",
            &format!("--data-dir={}", data.display()),
            &format!("--listen-client-urls={client}"),
            &format!("--advertise-client-urls={client}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-state=new",
            // A test cluster lives for seconds; fsync would only slow a shared disk.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ];
        self.spawn(bed, "etcd", &args)
    }

    fn start_api_server(&mut self, bed: &mut TestBed) -> Result<()> {
        let f = &self.pki.files;
        let p = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
        let args = [
            format!("--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            format!("--advertise-address={API_SERVER_IP}"),
            "--bind-address=0.0.0.0".into(),
            format!("--secure-port={API_SERVER_PORT}"),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            p("tls-cert-file", &f.apiserver_cert),
            p("tls-private-key-file", &f.apiserver_key),
            p("client-ca-file", &f.ca_cert),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,NodeRestriction,\
             MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
                .into(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            p("service-account-key-file", &f.service_account_pub),
            p("service-account-signing-key-file", &f.service_account_key),
            // Only the API server's own audience: a token minted for `trellis-ca` is
            // good for a TokenReview that asks for that audience, not as an API
            // credential.
            format!("--api-audiences={SERVICE_ACCOUNT_ISSUER}"),
            // Webhook Services are reached through their endpoints (pod IPs on the
            // bridge): no kube-proxy on the node namespace is needed for them.
            "--enable-aggregator-routing=true".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(bed, "kube-apiserver", &args)
    }

    fn start_controller_manager(&mut self, bed: &mut TestBed) -> Result<()> {
        let f = &self.pki.files;
        let p = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
        let args = [
            p("kubeconfig", &f.controller_manager_kubeconfig),
            p(
                "authentication-kubeconfig",
                &f.controller_manager_kubeconfig,
            ),
            p("authorization-kubeconfig", &f.controller_manager_kubeconfig),
            format!("--controllers={}", CONTROLLERS.join(",")),
            p("root-ca-file", &f.ca_cert),
            p("service-account-private-key-file", &f.service_account_key),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--profiling=false".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(bed, "kube-controller-manager", &args)
    }

    fn spawn(&mut self, bed: &mut TestBed, binary: &str, args: &[&str]) -> Result<()> {
        let path = self.binaries.path(binary);
        let program = path.to_str().context("binary path is not UTF-8")?;
        let child = bed.spawn(&self.node, None, program, args)?;
        self.processes.push(child);
        Ok(())
    }

    /// Fails with the log of any control-plane process that has exited.
    pub fn check_running(&self) -> Result<()> {
        for p in &self.processes {
            if let Some(status) = p.try_wait()? {
                bail!(
                    "{} exited ({status}); log:\n{}",
                    p.description,
                    tail(&p.log(), 60)
                );
            }
        }
        Ok(())
    }

    /// Polls `check` every 250 ms until it returns true; fails after `within`, or at
    /// once when `check` errs or a control-plane process has died.
    pub fn wait_until(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if check(self)? {
                return Ok(start.elapsed());
            }
            self.check_running()
                .with_context(|| format!("while waiting until {what}"))?;
            if start.elapsed() >= within {
                bail!("{what}: not true within {within:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs the real kubectl in the node namespace as `admin`; returns stdout, or an
    /// error with stderr when it exits non-zero.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, None)
    }

    /// `kubectl apply -f -` with `yaml` on stdin.
    pub fn kubectl_apply_stdin(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// kubectl with `input` on stdin (e.g. `create -f - -o json`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        self.kubectl_with_input(args, Some(input))
    }

    fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        self.kubectl_as(self.kubeconfig_admin(), args, input)
    }

    /// kubectl in the node namespace as whoever `kubeconfig` names (e.g.
    /// [`KubeCluster::kubeconfig_kubelet`], or one with a service-account token), with
    /// `input` on stdin if given.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String> {
        let kubectl = self.binaries.path("kubectl");
        let program = kubectl.to_str().context("kubectl path is not UTF-8")?;
        let kubeconfig = format!("--kubeconfig={}", kubeconfig.display());
        let cache = format!("--cache-dir={}", self.dir.join("kubectl-cache").display());
        let mut full = vec![kubeconfig.as_str(), cache.as_str()];
        full.extend_from_slice(args);
        let cmd = netns_command(&self.node.netns, None, program, &full);
        let out = run_with_input(cmd, input.map(str::as_bytes), KUBECTL_TIMEOUT)?;
        if !out.status.success() {
            return Err(anyhow!(
                "`kubectl {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a kubeconfig at `path` that authenticates with a bearer `token` (e.g. a
    /// service account's), for [`KubeCluster::kubectl_as`].
    pub fn write_token_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let content = pki::token_kubeconfig(&self.api_server_url(), &self.pki.ca_pem, token);
        std::fs::write(path, content).with_context(|| format!("write {}", path.display()))
    }

    /// The admin kubeconfig (user `admin`, group `system:masters`), certificates inline.
    pub fn kubeconfig_admin(&self) -> &Path {
        &self.pki.files.admin_kubeconfig
    }

    /// The node's kubeconfig (`system:node:trellis-node`, group `system:nodes`): what
    /// a kubelet uses; the Node authorizer and NodeRestriction apply to it.
    pub fn kubeconfig_kubelet(&self) -> &Path {
        &self.pki.files.kubelet_kubeconfig
    }

    /// The controller manager's kubeconfig.
    pub fn kubeconfig_controller_manager(&self) -> &Path {
        &self.pki.files.controller_manager_kubeconfig
    }

    /// Every key, certificate and kubeconfig path.
    pub fn pki_files(&self) -> &PkiFiles {
        &self.pki.files
    }

    /// The cluster CA certificate, PEM (what `kube-root-ca.crt` holds).
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// `https://10.244.0.1:6443`.
    pub fn api_server_url(&self) -> String {
        api_server_url()
    }

    /// The folder holding etcd, kube-apiserver, kube-controller-manager and kubectl.
    pub fn bin_dir(&self) -> &Path {
        &self.binaries.dir
    }

    /// How long this process spent building the binaries, if it built them.
    pub fn build_time(&self) -> Option<Duration> {
        self.binaries.built_in
    }

    /// The node name a kubelet registers ([`NODE_NAME`]).
    pub fn node_name(&self) -> &str {
        NODE_NAME
    }

    /// The namespace everything runs in (the bed's node namespace).
    pub fn node(&self) -> &Pod {
        &self.node
    }

    /// The cluster's own folder (PKI, etcd data, kubectl cache) inside the bed's.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The logs of etcd, the API server and the controller manager.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in &self.processes {
            s += &format!("===== {} =====\n{}\n", p.description, p.log());
        }
        s
    }

    /// The last `lines` lines of each process's log, for error messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for p in &self.processes {
            s += &format!("===== {} =====\n{}\n", p.description, tail(&p.log(), lines));
        }
        s
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        for p in self.processes.iter().rev() {
            if let Err(e) = p.kill() {
                tracing::warn!(pid = p.pid, error = %e, "could not kill control-plane process");
            }
        }
        // After a panic the bed keeps its folder for the post-mortem; so does this.
        if !std::thread::panicking()
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove cluster dir");
        }
    }
}

fn api_server_url() -> String {
    format!("https://{API_SERVER_IP}:{API_SERVER_PORT}")
}

/// The last `n` lines of `log`.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
