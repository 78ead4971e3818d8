//! Transparent interception, the way Kubernetes runs it: pods are network namespaces
//! on a bridge, `trellis-proxy init` writes their iptables rules, the proxy runs as
//! UID 1337, and the app knows nothing of the mesh.
//!
//! Needs root and network namespaces. Elsewhere every test is reported as ignored in
//! the runner's summary (`harness = false`: [`run_root_tests`] decides at run time).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trellis_init::InitConfig;
use trellis_tests::{
    ChildHandle, NODE_IP, Pod, TestBed, run_root_tests, shared_dir, target_binary,
};

const APP: &str = env!("CARGO_BIN_EXE_trellis-testapp");
const READY: Duration = Duration::from_secs(15);

fn main() {
    run_root_tests(&[
        (
            "app_calls_a_service_by_name_over_mtls",
            app_calls_a_service_by_name_over_mtls,
        ),
        (
            "plain_tcp_works_through_the_mesh",
            plain_tcp_works_through_the_mesh,
        ),
        (
            "an_unmeshed_pod_is_refused_by_strict_inbound",
            an_unmeshed_pod_is_refused_by_strict_inbound,
        ),
        (
            "excluded_ports_bypass_the_proxy",
            excluded_ports_bypass_the_proxy,
        ),
        (
            "authorization_matrix_across_pods",
            authorization_matrix_across_pods,
        ),
        (
            "meshed_callers_reach_pods_without_mtls_in_plaintext",
            meshed_callers_reach_pods_without_mtls_in_plaintext,
        ),
    ]);
}

/// A small cluster: control plane in the node namespace, meshed pods `client` and
/// `echo` (plus any extra meshed callers), and `plain`, a pod without a sidecar.
struct Cluster {
    bed: TestBed,
    client: Pod,
    /// Meshed callers besides `client`, each with the service account of its name.
    others: Vec<Pod>,
    echo: Pod,
    plain: Pod,
    _procs: Vec<ChildHandle>,
}

const ECHO_VIP: &str = "10.96.0.10";
const LINE_VIP: &str = "10.96.0.11";
const LEGACY_VIP: &str = "10.96.0.12";

fn registry(callers: &[Pod], echo: &Pod) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: {ECHO_VIP}
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lines, namespace: default}}
spec:
  clusterIP: {LINE_VIP}
  selector: {{app: echo}}
  ports: [{{name: tcp, port: 9000, targetPort: 9000, appProtocol: tcp}}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: echo, namespace: default, labels: {{app: echo}}}}
spec: {{address: {echo_ip}, serviceAccount: echo}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: echo, namespace: default}}
spec: {{serviceAccount: echo, token: echo-token}}
"#,
        echo_ip = echo.ip,
    );
    // Each caller pod runs as the service account named like the pod.
    for caller in callers {
        yaml.push_str(&format!(
            r#"---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: {sa}, namespace: default, labels: {{app: {sa}}}}}
spec: {{address: {ip}, serviceAccount: {sa}}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: {sa}, namespace: default}}
spec: {{serviceAccount: {sa}, token: {sa}-token}}
"#,
            sa = caller.name,
            ip = caller.ip,
        ));
    }
    yaml
}

fn cluster(name: &str, client_init: InitConfig, others: &[&str]) -> Result<Cluster> {
    let proxy = target_binary("trellis-proxy")?;
    let control = target_binary("trellis-control")?;
    let mut bed = TestBed::new(name)?;
    let client = bed.add_pod("client")?;
    let echo = bed.add_pod("echo")?;
    let plain = bed.add_pod("plain")?;
    let others = others
        .iter()
        .map(|name| bed.add_pod(name))
        .collect::<Result<Vec<Pod>>>()?;
    let callers: Vec<Pod> = std::iter::once(client.clone())
        .chain(others.iter().cloned())
        .collect();
    bed.add_service("echo", "default", ECHO_VIP.parse()?)?;
    bed.add_service("lines", "default", LINE_VIP.parse()?)?;

    let files = shared_dir(bed.dir(), "files")?;
    let registry_dir = files.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    std::fs::write(registry_dir.join("mesh.yaml"), registry(&callers, &echo))?;
    for sa in std::iter::once("echo").chain(callers.iter().map(|p| p.name.as_str())) {
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

    // The sample apps, unaware of the mesh.
    procs.push(bed.spawn(
        &echo,
        None,
        APP,
        &["http-echo", "--listen", "0.0.0.0:8080", "--name", "echo"],
    )?);
    procs.push(bed.spawn(&echo, None, APP, &["tcp-echo", "--listen", "0.0.0.0:9000"])?);
    for p in &procs[1..] {
        p.wait_listening(READY)?;
    }

    let sidecars = std::iter::once((&echo, InitConfig::default()))
        .chain(std::iter::once((&client, client_init)))
        .chain(others.iter().map(|p| (p, InitConfig::default())));
    for (pod, init) in sidecars {
        let sa = pod.name.as_str();
        bed.apply_init(pod, &init)?;
        let token = files.join(format!("{sa}.token"));
        let handle = bed.spawn_env(
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
        )?;
        procs.push(handle);
    }
    let cluster = Cluster {
        bed,
        client,
        others,
        echo,
        plain,
        _procs: procs,
    };
    let meshed = [&cluster.client, &cluster.echo]
        .into_iter()
        .chain(cluster.others.iter());
    for pod in meshed {
        cluster.eventually(&format!("the proxy in {} is ready", pod.name), || {
            // The status, not the body: "not ready" contains "ready".
            Ok(cluster.admin(pod, "/ready")?.contains("HTTP 200"))
        })?;
    }
    Ok(cluster)
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
}

fn default_cluster(name: &str) -> Result<Cluster> {
    cluster(name, InitConfig::default(), &[])
}

fn app_calls_a_service_by_name_over_mtls() -> Result<()> {
    let c = default_cluster("byname")?;
    let out = c.bed.exec_ok(
        &c.client,
        APP,
        &["http-get", "http://echo.default.svc.cluster.local/hello"],
    )?;
    if !out.contains("HTTP 200") || !out.contains("echo GET /hello") {
        bail!("unexpected answer: {out}\n{}", c.bed.logs());
    }
    // The server-side proxy terminated mTLS and saw the caller's identity; the
    // client-side proxy verified the server's.
    c.eventually("echo's proxy recorded the client identity", || {
        c.metric(
            &c.echo,
            r#"trellis_inbound_connections_total{peer_identity="spiffe://cluster.local/ns/default/sa/client"}"#,
        )
    })?;
    c.eventually("client's proxy verified echo's identity", || {
        c.metric(
            &c.client,
            r#"trellis_outbound_connections_total{service="echo.default",peer_identity="spiffe://cluster.local/ns/default/sa/echo"}"#,
        )
    })?;
    // The proxy's own connection to the echo pod was not looped back into it.
    if c.metric(&c.client, "trellis_outbound_failures_total")? {
        bail!("outbound failures: {}", c.admin(&c.client, "/metrics")?);
    }
    Ok(())
}

fn plain_tcp_works_through_the_mesh() -> Result<()> {
    let c = default_cluster("tcp")?;
    let out = c
        .bed
        .exec_ok(
            &c.client,
            APP,
            &["tcp-send", "lines.default:9000", "a line of tcp"],
        )
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", c.bed.logs()))?;
    if out.trim() != "a line of tcp" {
        bail!("unexpected answer: {out:?}\n{}", c.bed.logs());
    }
    c.eventually("echo's proxy carried the TCP connection", || {
        c.metric(&c.echo, r#"trellis_inbound_connections_total{peer_identity="spiffe://cluster.local/ns/default/sa/client"}"#)
    })
}

fn an_unmeshed_pod_is_refused_by_strict_inbound() -> Result<()> {
    let c = default_cluster("strict")?;
    let echo_ip = c.echo.ip;
    c.bed
        .add_kube_proxy_dnat(&c.plain, ECHO_VIP.parse()?, 80, &[(echo_ip, 8080)])?;
    let out = c.bed.exec(
        &c.plain,
        APP,
        &[
            "http-get",
            "http://echo.default.svc.cluster.local/",
            "--timeout",
            "3",
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() || stdout.contains("echo GET") {
        bail!("a plaintext caller reached the app: {stdout}");
    }
    c.eventually("echo's proxy counted the refused plaintext", || {
        c.metric(
            &c.echo,
            r#"trellis_inbound_refused_total{reason="tls_handshake"}"#,
        )
    })
}

fn excluded_ports_bypass_the_proxy() -> Result<()> {
    let init = InitConfig {
        exclude_outbound_ports: vec![9100],
        ..InitConfig::default()
    };
    let mut c = cluster("exclude", init, &[])?;
    // Two line servers outside the mesh, in the pod without a sidecar.
    let plain = c.plain.clone();
    for port in ["9100", "9101"] {
        let p = c.bed.spawn(
            &plain,
            None,
            APP,
            &["tcp-echo", "--listen", &format!("0.0.0.0:{port}")],
        )?;
        p.wait_listening(READY)?;
        c._procs.push(p);
    }
    let excluded = c.bed.exec_ok(
        &c.client,
        APP,
        &["tcp-send", &format!("{}:9100", plain.ip), "direct"],
    )?;
    if excluded.trim() != "direct" {
        bail!("excluded port: {excluded:?}");
    }
    if c.metric(&c.client, "trellis_passthrough_connections_total 1")? {
        bail!("the excluded port went through the proxy");
    }
    let proxied = c.bed.exec_ok(
        &c.client,
        APP,
        &["tcp-send", &format!("{}:9101", plain.ip), "proxied"],
    )?;
    if proxied.trim() != "proxied" {
        bail!("passthrough port: {proxied:?}");
    }
    c.eventually("the other port passed through the proxy", || {
        c.metric(&c.client, "trellis_passthrough_connections_total 1")
    })
}

/// `client` may GET public paths, `ops` may GET anything; nobody else gets in.
const ALLOW_POLICY: &str = r#"apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-readers, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {methods: [GET], paths: ["/public/*"]}}]
  - from: [{source: {principals: ["*/sa/ops"]}}]
    to: [{operation: {methods: [GET, HEAD]}}]
"#;

/// `client` is shut out; `ops` may not touch private paths; the rest is open.
const DENY_POLICY: &str = r#"apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-some, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/sa/client"]}}]
  - from: [{source: {principals: ["spiffe://cluster.local/ns/default/*"]}}]
    to: [{operation: {paths: ["/private"]}}]
"#;

/// Three caller identities, proven across pods, × {allowed path, denied path,
/// denied method} × {ALLOW policy, DENY policy, none}: exactly the expected matrix.
fn authorization_matrix_across_pods() -> Result<()> {
    let c = cluster("authz", InitConfig::default(), &["ops", "stranger"])?;
    let registry = c.bed.dir().join("files").join("registry");
    let callers: Vec<&Pod> = std::iter::once(&c.client).chain(c.others.iter()).collect();
    let requests = [
        ("GET", "/public/x"),
        ("GET", "/private"),
        ("DELETE", "/public/x"),
    ];
    // Rows: client, ops, stranger; columns: the requests above.
    let cases: [(&str, &str, [[u16; 3]; 3]); 3] = [
        (
            "ALLOW",
            ALLOW_POLICY,
            [[200, 403, 403], [200, 200, 403], [403, 403, 403]],
        ),
        (
            "DENY",
            DENY_POLICY,
            [[403, 403, 403], [200, 403, 200], [200, 403, 200]],
        ),
        (
            "none",
            "",
            [[200, 200, 200], [200, 200, 200], [200, 200, 200]],
        ),
    ];
    for (name, policy, expected) in cases {
        std::fs::write(registry.join("policy.yaml"), policy)?;
        // The policy reaches the sidecar within a second or so; then every caller's
        // every request must get its expected answer.
        let mut last = Vec::new();
        let applied = c.eventually(&format!("{name} policy applied"), || {
            last = callers
                .iter()
                .map(|caller| {
                    let row = requests
                        .iter()
                        .map(|(method, path)| status_from(&c, caller, method, path))
                        .collect::<Result<Vec<u16>>>()?;
                    Ok(row)
                })
                .collect::<Result<Vec<Vec<u16>>>>()?;
            Ok(last
                .iter()
                .zip(expected.iter())
                .all(|(got, want)| got == want))
        });
        if applied.is_err() {
            bail!(
                "{name} policy: expected {expected:?} (client, ops, stranger), got {last:?}\n{}",
                c.bed.logs()
            );
        }
    }
    Ok(())
}

fn status_from(c: &Cluster, caller: &Pod, method: &str, path: &str) -> Result<u16> {
    let url = format!("http://echo.default.svc.cluster.local{path}");
    let out = c
        .bed
        .exec(caller, APP, &["http-get", &url, "--method", method])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout
        .lines()
        .find_map(|l| l.strip_prefix("HTTP "))
        .and_then(|code| code.trim().parse().ok())
        .unwrap_or(0))
}

/// A Service whose pod runs no sidecar: meshed callers reach it in plaintext (HTTP
/// and TCP), as Istio's auto-mTLS and Linkerd do; and a meshed pod whose
/// PeerAuthentication is DISABLE is reached in plaintext too.
fn meshed_callers_reach_pods_without_mtls_in_plaintext() -> Result<()> {
    let mut c = default_cluster("plaintext")?;
    let plain = c.plain.clone();
    for args in [
        ["http-echo", "--listen", "0.0.0.0:8080", "--name", "legacy"],
        ["tcp-echo", "--listen", "0.0.0.0:9000", "", ""],
        ["http-inspect", "--listen", "0.0.0.0:8081", "", ""],
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let p = c.bed.spawn(&plain, None, APP, &args)?;
        p.wait_listening(READY)?;
        c._procs.push(p);
    }
    c.bed
        .add_service("legacy", "default", LEGACY_VIP.parse()?)?;
    let registry = c.bed.dir().join("files").join("registry");
    std::fs::write(
        registry.join("legacy.yaml"),
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: legacy, namespace: default}}
spec:
  clusterIP: {LEGACY_VIP}
  selector: {{app: legacy}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, appProtocol: http}}
  - {{name: tcp, port: 9000, targetPort: 9000, appProtocol: tcp}}
  - {{name: inspect, port: 81, targetPort: 8081}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: legacy, namespace: default, labels: {{app: legacy}}}}
spec: {{address: {ip}, serviceAccount: legacy, sidecar: false}}
"#,
            ip = plain.ip
        ),
    )?;
    c.eventually("HTTP to the pod without a sidecar", || {
        let out = c.bed.exec_ok(
            &c.client,
            APP,
            &["http-get", "http://legacy.default.svc.cluster.local/hi"],
        )?;
        Ok(out.contains("HTTP 200") && out.contains("legacy GET /hi"))
    })?;
    // The app sees the caller's authority, not the pod address dialled, whichever
    // protocol the caller spoke (virtual hosts and gRPC servers route on it).
    for h2 in [false, true] {
        let mut args = vec![
            "raw-http",
            "legacy.default.svc.cluster.local:81",
            "/who",
            "--host",
            "legacy.default.svc.cluster.local:81",
        ];
        if h2 {
            args.push("--h2");
        }
        let out = c.bed.exec_ok(&c.client, APP, &args)?;
        if !out.contains("HTTP 200")
            || !out.contains("authority=legacy.default.svc.cluster.local:81\n")
        {
            bail!(
                "authority at the pod without a sidecar (h2: {h2}): {out}\n{}",
                c.bed.logs()
            );
        }
    }
    let line = c.bed.exec_ok(
        &c.client,
        APP,
        &["tcp-send", "legacy.default:9000", "plain bytes"],
    )?;
    if line.trim() != "plain bytes" {
        bail!(
            "TCP to the pod without a sidecar: {line:?}\n{}",
            c.bed.logs()
        );
    }
    c.eventually("the client's proxy counted a plaintext connection", || {
        c.metric(
            &c.client,
            r#"trellis_outbound_connections_total{service="legacy.default",peer_identity="plaintext"}"#,
        )
    })?;

    // echo's sidecar switched to DISABLE takes plaintext only; the client follows.
    std::fs::write(
        registry.join("peer.yaml"),
        r#"apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: echo, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: DISABLE}
"#,
    )?;
    c.eventually("TCP to echo under DISABLE goes in plaintext", || {
        let out = c
            .bed
            .exec_ok(&c.client, APP, &["tcp-send", "lines.default:9000", "x"])?;
        Ok(out.trim() == "x"
            && c.metric(
                &c.client,
                r#"trellis_outbound_connections_total{service="lines.default",peer_identity="plaintext"}"#,
            )?)
    })?;
    let out = c.bed.exec_ok(
        &c.client,
        APP,
        &["http-get", "http://echo.default.svc.cluster.local/after"],
    )?;
    if !out.contains("HTTP 200") || !out.contains("echo GET /after") {
        bail!("HTTP to echo under DISABLE: {out}\n{}", c.bed.logs());
    }
    Ok(())
}
