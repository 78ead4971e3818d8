//! IPv6 on dual-stack pods: every address family is intercepted. A meshed caller
//! reaching a pod's IPv6 address goes over mTLS; an unmeshed one is refused (STRICT);
//! an init container that cannot write ip6tables rules on a pod with IPv6 fails.
//!
//! Needs root and network namespaces. Elsewhere every test is reported as ignored in
//! the runner's summary (`harness = false`: [`run_root_tests`] decides at run time).

#![allow(clippy::unwrap_used)]

use std::net::Ipv6Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trellis_init::InitConfig;
use trellis_tests::{
    ChildHandle, NODE_IP, Pod, TestBed, netns_command, run_root_tests, run_with_timeout,
    shared_dir, target_binary,
};

const APP: &str = env!("CARGO_BIN_EXE_trellis-testapp");
const READY: Duration = Duration::from_secs(15);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

fn main() {
    run_root_tests(&[
        (
            "a_meshed_call_to_a_pod_ipv6_address_uses_mtls",
            a_meshed_call_to_a_pod_ipv6_address_uses_mtls,
        ),
        (
            "plaintext_ipv6_from_an_unmeshed_pod_is_refused",
            plaintext_ipv6_from_an_unmeshed_pod_is_refused,
        ),
        (
            "tcp_over_ipv6_works_through_the_mesh",
            tcp_over_ipv6_works_through_the_mesh,
        ),
        (
            "init_without_ip6tables_on_a_pod_with_ipv6_fails",
            init_without_ip6tables_on_a_pod_with_ipv6_fails,
        ),
    ]);
}

/// Dual-stack pods: `client` and `echo` meshed, `plain` without a sidecar; the control
/// plane in the node namespace.
struct Cluster {
    bed: TestBed,
    client: Pod,
    echo: Pod,
    plain: Pod,
    _procs: Vec<ChildHandle>,
}

fn v6(pod: &Pod) -> Ipv6Addr {
    pod.ipv6.unwrap_or(Ipv6Addr::UNSPECIFIED)
}

/// Services with both families' VIPs (as a dual-stack Kubernetes Service), and each
/// workload at both of its addresses.
fn registry(client: &Pod, echo: &Pod) -> String {
    let mut yaml = String::from(
        r#"apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  selector: {app: echo}
  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: lines, namespace: default}
spec:
  clusterIPs: [10.96.0.11, "fd00:10:96::11"]
  selector: {app: echo}
  ports: [{name: tcp, port: 9000, targetPort: 9000, appProtocol: tcp}]
"#,
    );
    for pod in [client, echo] {
        yaml.push_str(&format!(
            r#"---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: {sa}, namespace: default, labels: {{app: {sa}}}}}
spec: {{addresses: [{ip}, "{ip6}"], serviceAccount: {sa}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: {sa}, namespace: default}}
spec: {{serviceAccount: {sa}, token: {sa}-token}}
"#,
            sa = pod.name,
            ip = pod.ip,
            ip6 = v6(pod),
        ));
    }
    yaml
}

fn cluster(name: &str) -> Result<Cluster> {
    let proxy = target_binary("trellis-proxy")?;
    let control = target_binary("trellis-control")?;
    let mut bed = TestBed::new(name)?;
    let client = bed.add_dual_stack_pod("client")?;
    let echo = bed.add_dual_stack_pod("echo")?;
    let plain = bed.add_dual_stack_pod("plain")?;

    let files = shared_dir(bed.dir(), "files")?;
    let registry_dir = files.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    std::fs::write(registry_dir.join("mesh.yaml"), registry(&client, &echo))?;
    for sa in ["client", "echo"] {
        std::fs::write(files.join(format!("{sa}.token")), format!("{sa}-token"))?;
    }
    let state = files.join("state");
    let node = bed.node().clone();
    let grpc = format!("{NODE_IP}:15010");
    let mut procs = vec![bed.spawn(
        &node,
        None,
        control.to_str().context("path")?,
        &[
            "--registry-dir",
            registry_dir.to_str().context("path")?,
            "--state-dir",
            state.to_str().context("path")?,
            "--grpc-addr",
            &grpc,
            "--admin-addr",
            &format!("{NODE_IP}:15014"),
        ],
    )?];
    procs[0].wait_for_log("control plane started", READY)?;
    let root = state.join("root-cert.pem");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755))?;

    // The apps listen on both families ([::] is dual-stack), as most servers do: without
    // ip6tables rules, IPv6 callers would reach them directly.
    procs.push(bed.spawn(
        &echo,
        None,
        APP,
        &["http-echo", "--listen", "[::]:8080", "--name", "echo"],
    )?);
    procs.push(bed.spawn(&echo, None, APP, &["tcp-echo", "--listen", "[::]:9000"])?);
    for p in &procs[1..] {
        p.wait_listening(READY)?;
    }
    for pod in [&echo, &client] {
        let sa = pod.name.as_str();
        bed.apply_init(pod, &InitConfig::default())?;
        let token = files.join(format!("{sa}.token"));
        procs.push(bed.spawn_env(
            pod,
            Some(1337),
            proxy.to_str().context("path")?,
            &[
                "run",
                "--namespace",
                "default",
                "--service-account",
                sa,
                "--control-addr",
                &grpc,
                "--ca-root",
                root.to_str().context("path")?,
                "--bootstrap-token-file",
                token.to_str().context("path")?,
                "--outbound-addr",
                "0.0.0.0:15001",
            ],
            &[("RUST_LOG", "info,trellis_proxy=debug")],
        )?);
    }
    let c = Cluster {
        bed,
        client,
        echo,
        plain,
        _procs: procs,
    };
    for pod in [&c.client, &c.echo] {
        c.eventually(&format!("the proxy in {} is ready", pod.name), || {
            Ok(c.admin(pod, "/ready")?.contains("HTTP 200"))
        })?;
    }
    Ok(c)
}

impl Cluster {
    /// An admin page of the proxy in `pod`.
    fn admin(&self, pod: &Pod, path: &str) -> Result<String> {
        self.bed.proxy_admin(pod, path)
    }

    fn eventually(&self, what: &str, check: impl FnMut() -> Result<bool>) -> Result<()> {
        self.bed.eventually(what, READY, check)
    }

    fn metric(&self, pod: &Pod, needle: &str) -> Result<bool> {
        Ok(self
            .admin(pod, "/metrics")?
            .lines()
            .any(|l| l.starts_with(needle)))
    }

    fn inbound_from_client(&self) -> Result<()> {
        self.eventually("echo's proxy recorded the client identity", || {
            self.metric(
                &self.echo,
                &format!(r#"trellis_inbound_connections_total{{peer_identity="{CLIENT_ID}"}}"#),
            )
        })
    }
}

fn a_meshed_call_to_a_pod_ipv6_address_uses_mtls() -> Result<()> {
    let c = cluster("v6mtls")?;
    let url = format!("http://[{}]:8080/hello", v6(&c.echo));
    let out = c
        .bed
        .exec_ok(&c.client, APP, &["http-get", &url])
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", c.bed.logs()))?;
    if !out.contains("HTTP 200") || !out.contains("echo GET /hello") {
        bail!("unexpected answer: {out}\n{}", c.bed.logs());
    }
    // The server-side proxy terminated mTLS and saw the caller's identity; the
    // client-side proxy verified the server's.
    c.inbound_from_client()?;
    c.eventually("client's proxy verified echo's identity", || {
        c.metric(
            &c.client,
            r#"trellis_outbound_connections_total{service="echo.default",peer_identity="spiffe://cluster.local/ns/default/sa/echo"}"#,
        )
    })
}

fn plaintext_ipv6_from_an_unmeshed_pod_is_refused() -> Result<()> {
    let c = cluster("v6strict")?;
    let url = format!("http://[{}]:8080/", v6(&c.echo));
    let out = c
        .bed
        .exec(&c.plain, APP, &["http-get", &url, "--timeout", "3"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() || stdout.contains("echo GET") {
        bail!("a plaintext IPv6 caller reached the app: {stdout}");
    }
    // Refused by the proxy (not merely unreachable): the bypass was tried and stopped.
    c.eventually("echo's proxy counted the refused plaintext", || {
        c.metric(
            &c.echo,
            r#"trellis_inbound_refused_total{reason="tls_handshake"}"#,
        )
    })?;
    // The same pod still reaches the app's IPv4 address only through the proxy too.
    let out = c.bed.exec(
        &c.plain,
        APP,
        &[
            "http-get",
            &format!("http://{}:8080/", c.echo.ip),
            "--timeout",
            "3",
        ],
    )?;
    if String::from_utf8_lossy(&out.stdout).contains("echo GET") {
        bail!("a plaintext IPv4 caller reached the app");
    }
    Ok(())
}

fn tcp_over_ipv6_works_through_the_mesh() -> Result<()> {
    let c = cluster("v6tcp")?;
    let addr = format!("[{}]:9000", v6(&c.echo));
    let out = c
        .bed
        .exec_ok(&c.client, APP, &["tcp-send", &addr, "a line over ipv6"])
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", c.bed.logs()))?;
    if out.trim() != "a line over ipv6" {
        bail!("unexpected answer: {out:?}\n{}", c.bed.logs());
    }
    c.inbound_from_client()
}

/// A folder for PATH holding `ip`, `cat` and the IPv4 iptables binaries, but no
/// ip6tables: a init image built without it.
fn path_without_ip6tables(base: &Path) -> Result<PathBuf> {
    let dir = base.join("no-ip6tables-bin");
    std::fs::create_dir_all(&dir)?;
    let mut linked = 0;
    for name in [
        "ip",
        "cat",
        "iptables-nft",
        "iptables-nft-restore",
        "iptables-nft-save",
        "iptables-legacy",
        "iptables-legacy-restore",
        "iptables-legacy-save",
    ] {
        for folder in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
            let target = Path::new(folder).join(name);
            if target.exists() {
                std::os::unix::fs::symlink(&target, dir.join(name))?;
                linked += 1;
                break;
            }
        }
    }
    if linked < 3 {
        bail!("ip, cat and iptables-nft or -legacy are needed on this machine");
    }
    Ok(dir)
}

fn init_without_ip6tables_on_a_pod_with_ipv6_fails() -> Result<()> {
    let proxy = target_binary("trellis-proxy")?;
    let proxy = proxy.to_str().context("path")?;
    let mut bed = TestBed::new("v6init")?;
    let pod = bed.add_dual_stack_pod("app")?;
    let only_v4 = path_without_ip6tables(bed.dir())?;

    let mut cmd = netns_command(&pod.netns, None, proxy, &["init"]);
    cmd.env("PATH", &only_v4);
    let out = run_with_timeout(cmd, Duration::from_secs(30))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        bail!("init succeeded without ip6tables on a pod with IPv6: {stderr}");
    }
    let addr = v6(&pod).to_string();
    for needle in [
        "refusing to leave IPv6 traffic unredirected",
        addr.as_str(),
        "ip6tables",
    ] {
        if !stderr.contains(needle) {
            bail!("init's error lacks `{needle}`: {stderr}");
        }
    }
    // Nothing half-written: no IPv4 rules either.
    let saved = bed.exec_ok(&pod, "iptables-save", &["-t", "nat"])?;
    if saved.contains("TRELLIS") {
        bail!("IPv4 rules were written alone:\n{saved}");
    }

    // With ip6tables there, the same init writes both families.
    let out = bed.exec(&pod, proxy, &["init"])?;
    if !out.status.success() {
        bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let saved6 = bed.exec_ok(&pod, "ip6tables-save", &["-t", "nat"])?;
    if !saved6.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN") {
        bail!("no IPv6 rules:\n{saved6}");
    }
    Ok(())
}
