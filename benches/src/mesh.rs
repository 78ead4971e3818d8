//! The mesh under test, on loopback: real `trellis-control` and two `trellis-proxy`
//! processes (explicit upstream listeners, no iptables), the benchmark servers as
//! their own processes, so /proc charges each proxy exactly its own CPU and memory.
//!
//! The network-namespace variant (iptables redirect, pods) is in [`crate::netns`];
//! this one runs anywhere without root and says so in its report.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{BenchError, Result};

/// Child processes, killed when dropped (also on error or panic).
pub struct Processes {
    children: Vec<(String, Child)>,
    pub dir: PathBuf,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Processes {
    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<u32> {
        self.spawn_wrapped(name, &[], program, args, env)
    }

    /// Starts `wrapper... program args...` (an empty wrapper runs `program` itself).
    fn spawn_wrapped(
        &mut self,
        name: &str,
        wrapper: &[String],
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<u32> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        let child = cmd
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("starting {}: {e}", program.display())))?;
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// The programs a suite starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// `trellis-bench` itself: servers, load generator and probes in pods.
    pub bench: PathBuf,
    pub proxy: PathBuf,
    pub control: PathBuf,
}

impl Binaries {
    /// The running executable and `trellis-proxy`/`trellis-control` beside it.
    pub fn beside_current_exe() -> Result<Self> {
        Ok(Self {
            bench: std::env::current_exe()?,
            proxy: sibling_binary("trellis-proxy")?,
            control: sibling_binary("trellis-control")?,
        })
    }
}

/// What the suite needs to know of the running mesh.
pub struct LoopbackMesh {
    pub processes: Processes,
    pub http_server: SocketAddr,
    pub tcp_server: SocketAddr,
    /// Client-side proxy listeners for the HTTP and TCP services.
    pub http_via_mesh: SocketAddr,
    pub tcp_via_mesh: SocketAddr,
    /// Client-side proxy listener for the gRPC service (`appProtocol: grpc`), which
    /// the HTTP server answers.
    pub grpc_via_mesh: SocketAddr,
    pub client_proxy_pid: u32,
    pub server_proxy_pid: u32,
    pub server_tcp_proxy_pid: u32,
    /// The HAProxy pair, when asked for and installed: client-side listener and the
    /// PIDs of the client- and server-side instances.
    pub haproxy: Option<(SocketAddr, [u32; 2])>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A binary built next to this one (`cargo build --release --workspace` builds them all).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| BenchError::Setup("no directory for the current executable".into()))?;
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(BenchError::Setup(format!(
        "{name} not found next to {}; run `cargo build --release --workspace` first",
        exe.display()
    )))
}

fn wait_port(
    addr: SocketAddr,
    what: &str,
    procs: &Processes,
    name: &str,
    limit: Duration,
) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if start.elapsed() > limit {
            return Err(BenchError::Setup(format!(
                "{what} did not listen on {addr}:\n{}",
                procs.log(name)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wait_ready(admin: SocketAddr, procs: &Processes, name: &str, limit: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        let ready = TcpStream::connect_timeout(&admin, Duration::from_millis(100))
            .and_then(|mut s| {
                s.write_all(b"GET /ready HTTP/1.0\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"))
            })
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(BenchError::Setup(format!(
                "proxy {name} not ready:\n{}",
                procs.log(name)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How to start the loopback mesh.
#[derive(Debug, Clone)]
pub struct LoopbackOptions {
    pub binaries: Binaries,
    pub response_size: usize,
    /// Start the HAProxy pair too (when `haproxy` is installed).
    pub haproxy: bool,
    /// Runs each proxy as `wrapper... trellis-proxy ...` (e.g. valgrind).
    pub proxy_wrapper: Vec<String>,
    /// How long to wait for each part to come up.
    pub ready_timeout: Duration,
}

/// Starts control plane, servers and the two proxies; returns when all are ready.
pub fn start_loopback_mesh(dir: &Path, opts: &LoopbackOptions) -> Result<LoopbackMesh> {
    let control = &opts.binaries.control;
    let proxy = &opts.binaries.proxy;
    let bench = &opts.binaries.bench;
    let response_size = opts.response_size;
    let wait = opts.ready_timeout;
    std::fs::create_dir_all(dir)?;
    let mut procs = Processes {
        children: Vec::new(),
        dir: dir.to_owned(),
    };
    let ports: Vec<u16> = (0..14).map(|_| free_port()).collect::<Result<_>>()?;
    let &[
        app_http,
        app_tcp,
        inbound,
        inbound_tcp,
        up_http,
        up_tcp,
        up_grpc,
        grpc,
        control_admin,
        admin_client,
        admin_server,
        admin_server_tcp,
        hap_client,
        hap_server,
    ] = ports.as_slice()
    else {
        return Err(BenchError::Setup("no free loopback ports".into()));
    };
    let registry = dir.join("registry");
    std::fs::create_dir_all(&registry)?;
    std::fs::write(
        registry.join("bench.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bench, namespace: default}}\nspec:\n  selector: {{app: bench}}\n  ports: [{{name: http, port: 8080, targetPort: {app_http}}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: bench-tcp, namespace: default}}\nspec:\n  selector: {{app: bench-tcp}}\n  ports: [{{name: tcp, port: 9000, targetPort: {app_tcp}}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: bench-grpc, namespace: default}}\nspec:\n  selector: {{app: bench}}\n  ports: [{{name: grpc, port: 50051, targetPort: {app_http}, appProtocol: grpc}}]\n---\napiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\nmetadata: {{name: server, namespace: default, labels: {{app: bench}}}}\nspec: {{address: 127.0.0.1, serviceAccount: server, sidecarPort: {inbound}}}\n---\napiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\nmetadata: {{name: server-tcp, namespace: default, labels: {{app: bench-tcp}}}}\nspec: {{address: 127.0.0.1, serviceAccount: server, sidecarPort: {inbound_tcp}}}\n---\napiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\nmetadata: {{name: server, namespace: default}}\nspec: {{serviceAccount: server, token: bench-server}}\n---\napiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\nmetadata: {{name: client, namespace: default}}\nspec: {{serviceAccount: client, token: bench-client}}\n"
        ),
    )?;
    let s = |v: &dyn std::fmt::Display| v.to_string();
    procs.spawn(
        "control",
        control,
        &[
            s(&"--registry-dir"),
            s(&registry.display()),
            s(&"--state-dir"),
            s(&dir.join("state").display()),
            s(&"--grpc-addr"),
            format!("127.0.0.1:{grpc}"),
            s(&"--admin-addr"),
            format!("127.0.0.1:{control_admin}"),
        ],
        &[],
    )?;
    procs.spawn(
        "http-server",
        bench,
        &[
            s(&"--threads"),
            s(&1),
            s(&"serve"),
            s(&"http"),
            s(&"--listen"),
            format!("127.0.0.1:{app_http}"),
            s(&"--size"),
            s(&response_size),
        ],
        &[],
    )?;
    procs.spawn(
        "tcp-server",
        bench,
        &[
            s(&"--threads"),
            s(&1),
            s(&"serve"),
            s(&"tcp"),
            s(&"--listen"),
            format!("127.0.0.1:{app_tcp}"),
        ],
        &[],
    )?;
    wait_port(
        SocketAddr::from(([127, 0, 0, 1], grpc)),
        "trellis-control",
        &procs,
        "control",
        wait,
    )?;
    let root = dir.join("state").join("root-cert.pem");
    let common = |sa: &str, admin: u16| {
        vec![
            s(&"run"),
            s(&"--namespace"),
            s(&"default"),
            s(&"--service-account"),
            s(&sa),
            s(&"--control-addr"),
            format!("127.0.0.1:{grpc}"),
            s(&"--ca-root"),
            s(&root.display()),
            s(&"--admin-addr"),
            format!("127.0.0.1:{admin}"),
        ]
    };
    let mut server_args = common("server", admin_server);
    server_args.extend([
        s(&"--inbound-addr"),
        format!("127.0.0.1:{inbound}"),
        s(&"--app-port"),
        s(&app_http),
    ]);
    let server_proxy_pid = procs.spawn_wrapped(
        "server-proxy",
        &opts.proxy_wrapper,
        proxy,
        &server_args,
        &[("TRELLIS_BOOTSTRAP_TOKEN", "bench-server")],
    )?;
    // On loopback a sidecar forwards inbound traffic to one app port, so the TCP
    // server gets a sidecar of its own (with iptables, one sidecar serves both).
    let mut tcp_args = common("server", admin_server_tcp);
    tcp_args.extend([
        s(&"--inbound-addr"),
        format!("127.0.0.1:{inbound_tcp}"),
        s(&"--app-port"),
        s(&app_tcp),
    ]);
    let server_tcp_proxy_pid = procs.spawn_wrapped(
        "server-tcp-proxy",
        &opts.proxy_wrapper,
        proxy,
        &tcp_args,
        &[("TRELLIS_BOOTSTRAP_TOKEN", "bench-server")],
    )?;
    let mut client_args = common("client", admin_client);
    client_args.extend([
        s(&"--inbound-addr"),
        s(&"127.0.0.1:0"),
        s(&"--upstream"),
        format!("bench.default:8080=127.0.0.1:{up_http}"),
        s(&"--upstream"),
        format!("bench-tcp.default:9000=127.0.0.1:{up_tcp}"),
        s(&"--upstream"),
        format!("bench-grpc.default:50051=127.0.0.1:{up_grpc}"),
    ]);
    let client_proxy_pid = procs.spawn_wrapped(
        "client-proxy",
        &opts.proxy_wrapper,
        proxy,
        &client_args,
        &[("TRELLIS_BOOTSTRAP_TOKEN", "bench-client")],
    )?;
    wait_ready(
        SocketAddr::from(([127, 0, 0, 1], admin_server)),
        &procs,
        "server-proxy",
        wait,
    )?;
    wait_ready(
        SocketAddr::from(([127, 0, 0, 1], admin_client)),
        &procs,
        "client-proxy",
        wait,
    )?;
    wait_port(
        SocketAddr::from(([127, 0, 0, 1], app_http)),
        "http server",
        &procs,
        "http-server",
        wait,
    )?;
    wait_port(
        SocketAddr::from(([127, 0, 0, 1], app_tcp)),
        "tcp server",
        &procs,
        "tcp-server",
        wait,
    )?;
    let app = SocketAddr::from(([127, 0, 0, 1], app_http));
    let haproxy = if opts.haproxy && crate::haproxy::haproxy_on_path().is_some() {
        let client = SocketAddr::from(([127, 0, 0, 1], hap_client));
        let server = SocketAddr::from(([127, 0, 0, 1], hap_server));
        let pids = start_haproxy_pair(&mut procs, client, server, app, wait)?;
        Some((client, pids))
    } else {
        None
    };
    Ok(LoopbackMesh {
        processes: procs,
        http_server: SocketAddr::from(([127, 0, 0, 1], app_http)),
        tcp_server: SocketAddr::from(([127, 0, 0, 1], app_tcp)),
        http_via_mesh: SocketAddr::from(([127, 0, 0, 1], up_http)),
        tcp_via_mesh: SocketAddr::from(([127, 0, 0, 1], up_tcp)),
        grpc_via_mesh: SocketAddr::from(([127, 0, 0, 1], up_grpc)),
        client_proxy_pid,
        server_proxy_pid,
        server_tcp_proxy_pid,
        haproxy,
    })
}

/// Certificates, configs checked with `haproxy -c`, then the server side and the
/// client side on loopback; returns their PIDs (client side first).
fn start_haproxy_pair(
    procs: &mut Processes,
    client_bind: SocketAddr,
    server: SocketAddr,
    app: SocketAddr,
    wait: Duration,
) -> Result<[u32; 2]> {
    let exe = crate::haproxy::haproxy_on_path()
        .ok_or_else(|| BenchError::Setup("haproxy is not installed".into()))?;
    let dir = procs.dir.join("haproxy");
    let pki = crate::certs::write_pki(&dir, "server-hap", "client-hap")?;
    let pair = crate::haproxy::MtlsPair {
        client_bind,
        server_addr: server,
        server_bind: server,
        app,
        client_pem: pki.client,
        server_pem: pki.server,
        root_pem: pki.root,
        verify_host: Some("server-hap".into()),
    };
    let (client_cfg, server_cfg) = crate::haproxy::write_configs(&pair, &dir)?;
    for cfg in [&client_cfg, &server_cfg] {
        crate::haproxy::check_config_ok(cfg)?;
    }
    let s = |p: &Path| p.display().to_string();
    let server_pid = procs.spawn(
        "haproxy-server",
        &exe,
        &["-f".into(), s(&server_cfg), "-db".into()],
        &[],
    )?;
    let client_pid = procs.spawn(
        "haproxy-client",
        &exe,
        &["-f".into(), s(&client_cfg), "-db".into()],
        &[],
    )?;
    wait_port(
        server,
        "haproxy (server side)",
        procs,
        "haproxy-server",
        wait,
    )?;
    wait_port(
        client_bind,
        "haproxy (client side)",
        procs,
        "haproxy-client",
        wait,
    )?;
    Ok([client_pid, server_pid])
}
