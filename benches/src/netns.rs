//! The benchmark in network namespaces, as a cluster runs it: pods are namespaces on a
//! bridge (the `trellis-tests` test bed), meshed pods get the real `trellis-proxy init`
//! iptables rules and a sidecar running as UID 1337, services have VIPs, and the load
//! generator runs inside the client pod.
//!
//! ```text
//! node namespace: bridge 10.244.0.1/16, trellis-control on 10.244.0.1:15010
//! client-base ─VIP 10.96.0.20/.21 (kube-proxy DNAT)─────────────────────► server-base app
//! client-mesh ─VIP 10.96.0.30/.31/.32─► iptables ─► sidecar ══mTLS══► sidecar ─► server-mesh app
//! client-hap ─► haproxy 127.0.0.1:18080 ══TLS 1.3, client cert══► haproxy ─► server-hap app
//! ```
//!
//! Nothing is added to the root namespace: traffic only flows between namespaces made
//! here, and [`trellis_tests::TestBed`] removes them when this is dropped (a killed run's
//! namespaces are swept by the next one). Proxies share the root PID namespace, so
//! their `/proc` entries are sampled as on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_init::InitConfig;
use trellis_tests::{NODE_IP, Pod, TestBed};

use crate::loadgen::Mode;
use crate::mesh::Binaries;
use crate::suite::Scenario;
use crate::{BenchError, Result};

/// Service VIPs: baseline (DNAT to `server-base`) and meshed (`server-mesh`).
pub const VIP_BASE_HTTP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const VIP_BASE_TCP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
pub const VIP_MESH_HTTP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
pub const VIP_MESH_TCP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
/// The meshed gRPC service (`appProtocol: grpc`), served by the same app as HTTP.
pub const VIP_MESH_GRPC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 32);
/// Service ports (what clients dial) and app ports (where the servers listen).
pub const HTTP_PORT: u16 = 80;
pub const TCP_PORT: u16 = 9000;
pub const GRPC_PORT: u16 = 50051;
pub const APP_HTTP_PORT: u16 = 8080;
pub const APP_TCP_PORT: u16 = 9000;
/// HAProxy: client side on the client pod's loopback, server side on the pod IP.
pub const HAP_CLIENT_PORT: u16 = 18080;
pub const HAP_SERVER_PORT: u16 = 18443;
/// The meshed HTTP service's name, sent as `Host`.
pub const MESH_HOST: &str = "bench.default.svc.cluster.local";
/// The meshed gRPC service's name, sent as `:authority`.
pub const MESH_GRPC_HOST: &str = "bench-grpc.default.svc.cluster.local";
/// The sidecars' UID (iptables leaves its traffic alone).
pub const PROXY_UID: u32 = 1337;

/// How to build the topology.
#[derive(Debug, Clone)]
pub struct NetnsOptions {
    pub binaries: Binaries,
    pub response_size: usize,
    /// Add the HAProxy pods (when `haproxy` is installed).
    pub haproxy: bool,
    /// Runs each sidecar as `wrapper... trellis-proxy ...` (e.g. valgrind).
    pub proxy_wrapper: Vec<String>,
    /// How long each part may take to come up.
    pub ready_timeout: Duration,
}

/// A scenario and the pod its load generator runs in.
#[derive(Debug, Clone)]
pub struct PodScenario {
    pub scenario: Scenario,
    pub pod: Pod,
}

/// The running topology; dropping it stops every process and removes the namespaces.
pub struct NetnsMesh {
    bed: TestBed,
    /// Every scenario, in run order.
    pub scenarios: Vec<PodScenario>,
    /// What was skipped and why.
    pub notes: Vec<String>,
    /// PIDs of the client- and server-side sidecars.
    pub mesh_proxies: [u32; 2],
    /// PIDs of the client- and server-side HAProxy, when running.
    pub haproxy: Option<[u32; 2]>,
}

fn setup(e: anyhow::Error) -> BenchError {
    BenchError::Setup(format!("{e:#}"))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| BenchError::Setup(format!("path is not UTF-8: {}", p.display())))
}

/// A folder the sidecars (UID 1337) can read: world-readable, parents traversable.
fn shared_dir(base: &Path, name: &str) -> Result<PathBuf> {
    trellis_tests::shared_dir(base, name).map_err(setup)
}

fn registry_yaml(client: &Pod, server: &Pod) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: bench, namespace: default}}
spec:
  clusterIP: {VIP_MESH_HTTP}
  selector: {{app: bench}}
  ports: [{{name: http, port: {HTTP_PORT}, targetPort: {APP_HTTP_PORT}, appProtocol: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: bench-tcp, namespace: default}}
spec:
  clusterIP: {VIP_MESH_TCP}
  selector: {{app: bench}}
  ports: [{{name: tcp, port: {TCP_PORT}, targetPort: {APP_TCP_PORT}, appProtocol: tcp}}]
---
apiVersion: v1
kind: Service
metadata: {{name: bench-grpc, namespace: default}}
spec:
  clusterIP: {VIP_MESH_GRPC}
  selector: {{app: bench}}
  ports: [{{name: grpc, port: {GRPC_PORT}, targetPort: {APP_HTTP_PORT}, appProtocol: grpc}}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: server, namespace: default, labels: {{app: bench}}}}
spec: {{address: {server_ip}, serviceAccount: server}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{address: {client_ip}, serviceAccount: client}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: server, namespace: default}}
spec: {{serviceAccount: server, token: bench-server}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: client, namespace: default}}
spec: {{serviceAccount: client, token: bench-client}}
"#,
        server_ip = server.ip,
        client_ip = client.ip,
    )
}

impl NetnsMesh {
    /// Builds pods, services, control plane, servers, sidecars and (if asked for and
    /// installed) the HAProxy pair, and checks every path answers. Blocking.
    pub fn start(opts: &NetnsOptions) -> Result<Self> {
        let bed = TestBed::new("bench").map_err(setup)?;
        let mut mesh = Self {
            bed,
            scenarios: Vec::new(),
            notes: Vec::new(),
            mesh_proxies: [0, 0],
            haproxy: None,
        };
        match mesh.build(opts) {
            Ok(()) => Ok(mesh),
            Err(e) => Err(BenchError::Setup(format!(
                "{e}\n----- process logs (tail) -----\n{}",
                tail(&mesh.bed.logs(), 6000)
            ))),
        }
    }

    /// The folder of logs and generated files (removed on drop).
    pub fn dir(&self) -> &Path {
        self.bed.dir()
    }

    /// Every process's log so far.
    pub fn logs(&self) -> String {
        self.bed.logs()
    }

    /// Runs `trellis-bench wait ...` in `pod` and fails with its output if not ready.
    fn wait_in(&self, bench: &str, pod: &Pod, probe: &[&str], limit: Duration) -> Result<()> {
        let secs = limit.as_secs_f64().to_string();
        let mut args = vec!["wait", "--timeout", &secs];
        args.extend_from_slice(probe);
        let out = self
            .bed
            .exec_as(pod, None, bench, &args, limit + Duration::from_secs(10))
            .map_err(setup)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(BenchError::Setup(format!(
                "in pod {}: `wait {}` failed: {}",
                pod.name,
                probe.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn build(&mut self, opts: &NetnsOptions) -> Result<()> {
        let bench = path_str(&opts.binaries.bench)?.to_string();
        let bench = bench.as_str();
        let proxy = path_str(&opts.binaries.proxy)?.to_string();
        let control = path_str(&opts.binaries.control)?.to_string();
        let ready = opts.ready_timeout;
        let size = opts.response_size.to_string();
        let bed = &mut self.bed;

        let client_base = bed.add_pod("client-base").map_err(setup)?;
        let server_base = bed.add_pod("server-base").map_err(setup)?;
        let client_mesh = bed.add_pod("client-mesh").map_err(setup)?;
        let server_mesh = bed.add_pod("server-mesh").map_err(setup)?;
        let hap_exe = crate::haproxy::haproxy_on_path();
        let hap_pods = match (opts.haproxy, &hap_exe) {
            (true, Some(_)) => Some((
                bed.add_pod("client-hap").map_err(setup)?,
                bed.add_pod("server-hap").map_err(setup)?,
            )),
            (true, None) => {
                self.notes.push(
                    "haproxy-mtls: skipped, haproxy is not installed (apt-get install haproxy)"
                        .into(),
                );
                None
            }
            (false, _) => {
                self.notes
                    .push("haproxy-mtls: skipped (--no-haproxy)".into());
                None
            }
        };
        for (name, vip) in [
            ("bench-base", VIP_BASE_HTTP),
            ("bench-base-tcp", VIP_BASE_TCP),
            ("bench", VIP_MESH_HTTP),
            ("bench-tcp", VIP_MESH_TCP),
            ("bench-grpc", VIP_MESH_GRPC),
        ] {
            bed.add_service(name, "default", vip).map_err(setup)?;
        }
        bed.add_kube_proxy_dnat(
            &client_base,
            VIP_BASE_HTTP,
            HTTP_PORT,
            &[(server_base.ip, APP_HTTP_PORT)],
        )
        .map_err(setup)?;
        bed.add_kube_proxy_dnat(
            &client_base,
            VIP_BASE_TCP,
            TCP_PORT,
            &[(server_base.ip, APP_TCP_PORT)],
        )
        .map_err(setup)?;

        // Control plane in the node namespace, with a file registry.
        let files = shared_dir(bed.dir(), "files")?;
        let registry = files.join("registry");
        std::fs::create_dir_all(&registry)?;
        std::fs::write(
            registry.join("bench.yaml"),
            registry_yaml(&client_mesh, &server_mesh),
        )?;
        for (sa, token) in [("server", "bench-server"), ("client", "bench-client")] {
            std::fs::write(files.join(format!("{sa}.token")), token)?;
        }
        let state = files.join("state");
        let grpc = format!("{NODE_IP}:15010");
        let node = bed.node().clone();
        let cp = bed
            .spawn_env(
                &node,
                None,
                &control,
                &[
                    "--registry-dir",
                    path_str(&registry)?,
                    "--state-dir",
                    path_str(&state)?,
                    "--grpc-addr",
                    &grpc,
                    "--admin-addr",
                    &format!("{NODE_IP}:15014"),
                ],
                &[("RUST_LOG", "warn,trellis_control=info")],
            )
            .map_err(setup)?;
        cp.wait_for_log("control plane started", ready)
            .map_err(setup)?;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755))?;
        let root = state.join("root-cert.pem");

        // The apps: one HTTP and one TCP echo server per server pod, each its own
        // process with one worker thread.
        let http_listen = format!("0.0.0.0:{APP_HTTP_PORT}");
        let tcp_listen = format!("0.0.0.0:{APP_TCP_PORT}");
        let mut servers = Vec::new();
        for pod in [&server_base, &server_mesh] {
            servers.push(
                bed.spawn(
                    pod,
                    None,
                    bench,
                    &[
                        "--threads",
                        "1",
                        "serve",
                        "http",
                        "--listen",
                        &http_listen,
                        "--size",
                        &size,
                    ],
                )
                .map_err(setup)?,
            );
            servers.push(
                bed.spawn(
                    pod,
                    None,
                    bench,
                    &["--threads", "1", "serve", "tcp", "--listen", &tcp_listen],
                )
                .map_err(setup)?,
            );
        }
        if let Some((_, server_hap)) = &hap_pods {
            let listen = format!("127.0.0.1:{APP_HTTP_PORT}");
            servers.push(
                bed.spawn(
                    server_hap,
                    None,
                    bench,
                    &[
                        "--threads",
                        "1",
                        "serve",
                        "http",
                        "--listen",
                        &listen,
                        "--size",
                        &size,
                    ],
                )
                .map_err(setup)?,
            );
        }
        for s in &servers {
            s.wait_listening(ready).map_err(setup)?;
        }

        // Sidecars: iptables first (as the init container), then the proxy as 1337.
        let mut pids = [0u32; 2];
        for (i, (pod, sa)) in [(&client_mesh, "client"), (&server_mesh, "server")]
            .into_iter()
            .enumerate()
        {
            bed.apply_init(pod, &InitConfig::default()).map_err(setup)?;
            let token = files.join(format!("{sa}.token"));
            let mut argv: Vec<&str> = opts.proxy_wrapper.iter().map(String::as_str).collect();
            argv.extend([
                proxy.as_str(),
                "run",
                "--namespace",
                "default",
                "--service-account",
                sa,
                "--control-addr",
                &grpc,
                "--ca-root",
                path_str(&root)?,
                "--bootstrap-token-file",
                path_str(&token)?,
                "--outbound-addr",
                "0.0.0.0:15001",
            ]);
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| BenchError::Setup("empty proxy command".into()))?;
            let handle = bed
                .spawn_env(pod, Some(PROXY_UID), program, args, &[("RUST_LOG", "warn")])
                .map_err(setup)?;
            pids[i] = handle.pid;
        }
        self.mesh_proxies = pids;

        // HAProxy pair.
        if let (Some((client_hap, server_hap)), Some(exe)) = (&hap_pods, &hap_exe) {
            let dir = self.bed.dir().join("haproxy");
            let pki = crate::certs::write_pki(&dir, "server-hap", "client-hap")?;
            let pair = crate::haproxy::MtlsPair {
                client_bind: SocketAddr::from(([127, 0, 0, 1], HAP_CLIENT_PORT)),
                server_addr: SocketAddr::from((server_hap.ip, HAP_SERVER_PORT)),
                server_bind: SocketAddr::from(([0, 0, 0, 0], HAP_SERVER_PORT)),
                app: SocketAddr::from(([127, 0, 0, 1], APP_HTTP_PORT)),
                client_pem: pki.client,
                server_pem: pki.server,
                root_pem: pki.root,
                verify_host: Some("server-hap".into()),
            };
            let (client_cfg, server_cfg) = crate::haproxy::write_configs(&pair, &dir)?;
            crate::haproxy::check_config_ok(&client_cfg)?;
            crate::haproxy::check_config_ok(&server_cfg)?;
            let exe = path_str(exe)?;
            let server = self
                .bed
                .spawn(
                    server_hap,
                    None,
                    exe,
                    &["-f", path_str(&server_cfg)?, "-db"],
                )
                .map_err(setup)?;
            let client = self
                .bed
                .spawn(
                    client_hap,
                    None,
                    exe,
                    &["-f", path_str(&client_cfg)?, "-db"],
                )
                .map_err(setup)?;
            self.haproxy = Some([client.pid, server.pid]);
        }

        // Every path answers before any load: baseline, sidecars ready, through the
        // mesh (HTTP and TCP), through HAProxy.
        let vip = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port)).to_string();
        self.wait_in(
            bench,
            &client_base,
            &["--http", &vip(VIP_BASE_HTTP, HTTP_PORT)],
            ready,
        )?;
        self.wait_in(
            bench,
            &client_base,
            &["--tcp-echo", &vip(VIP_BASE_TCP, TCP_PORT)],
            ready,
        )?;
        self.wait_in(
            bench,
            &client_base,
            &["--grpc", &vip(VIP_BASE_HTTP, HTTP_PORT)],
            ready,
        )?;
        for pod in [&client_mesh, &server_mesh] {
            self.wait_in(
                bench,
                pod,
                &["--http", "127.0.0.1:15000", "--path", "/ready"],
                ready,
            )?;
        }
        self.wait_in(
            bench,
            &client_mesh,
            &[
                "--http",
                &vip(VIP_MESH_HTTP, HTTP_PORT),
                "--host",
                MESH_HOST,
            ],
            ready,
        )?;
        self.wait_in(
            bench,
            &client_mesh,
            &[
                "--grpc",
                &vip(VIP_MESH_GRPC, GRPC_PORT),
                "--host",
                MESH_GRPC_HOST,
            ],
            ready,
        )?;
        self.wait_in(
            bench,
            &client_mesh,
            &["--tcp-echo", &vip(VIP_MESH_TCP, TCP_PORT)],
            ready,
        )?;
        if let Some((client_hap, _)) = &hap_pods {
            self.wait_in(
                bench,
                client_hap,
                &["--http", &format!("127.0.0.1:{HAP_CLIENT_PORT}")],
                ready,
            )?;
        }

        let mesh = self.mesh_proxies;
        let at = |pod: &Pod, scenario: Scenario| PodScenario {
            scenario,
            pod: pod.clone(),
        };
        let addr = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
        self.scenarios = vec![
            at(
                &client_base,
                Scenario::new("baseline", addr(VIP_BASE_HTTP, HTTP_PORT), Mode::Http1),
            ),
            at(
                &client_mesh,
                Scenario::new("trellis-http1", addr(VIP_MESH_HTTP, HTTP_PORT), Mode::Http1)
                    .with_proxies(mesh)
                    .with_host(MESH_HOST),
            ),
            at(
                &client_mesh,
                Scenario::new("trellis-http2", addr(VIP_MESH_HTTP, HTTP_PORT), Mode::Http2)
                    .with_proxies(mesh)
                    .with_host(MESH_HOST),
            ),
        ];
        if let (Some((client_hap, _)), Some(pids)) = (&hap_pods, self.haproxy) {
            self.scenarios.push(at(
                client_hap,
                Scenario::new(
                    "haproxy-mtls",
                    addr(Ipv4Addr::LOCALHOST, HAP_CLIENT_PORT),
                    Mode::Http1,
                )
                .with_proxies(pids),
            ));
        }
        // gRPC: the baseline calls the same app directly (the HTTP VIP; no sidecar
        // looks at the port), the mesh goes through the service declared grpc.
        self.scenarios.push(at(
            &client_base,
            Scenario::new("baseline-grpc", addr(VIP_BASE_HTTP, HTTP_PORT), Mode::Grpc)
                .with_baseline("baseline-grpc"),
        ));
        self.scenarios.push(at(
            &client_mesh,
            Scenario::new("trellis-grpc", addr(VIP_MESH_GRPC, GRPC_PORT), Mode::Grpc)
                .with_proxies(mesh)
                .with_host(MESH_GRPC_HOST)
                .with_baseline("baseline-grpc"),
        ));
        self.scenarios.push(at(
            &client_base,
            Scenario::new("baseline-tcp", addr(VIP_BASE_TCP, TCP_PORT), Mode::Tcp)
                .with_baseline("baseline-tcp"),
        ));
        self.scenarios.push(at(
            &client_mesh,
            Scenario::new("trellis-tcp", addr(VIP_MESH_TCP, TCP_PORT), Mode::Tcp)
                .with_proxies(mesh)
                .with_baseline("baseline-tcp"),
        ));
        Ok(())
    }
}

/// The last `max` bytes of `s` (on a character boundary).
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
