//! Fail closed, in the netns bed: inbound traffic goes to the pod IP, so a port the
//! app bound to localhost only is out of the mesh's reach unless the workload opts
//! in; and a slowloris from another pod against the health port (15020) does not
//! stop the kubelet's probes from the node.
//!
//! Needs root and network namespaces; elsewhere every test is reported as ignored.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trellis_init::InitConfig;
use trellis_tests::{
    ChildHandle, NODE_IP, Pod, TestBed, run_root_tests, shared_dir, target_binary,
};

const APP: &str = env!("CARGO_BIN_EXE_trellis-testapp");
const READY: Duration = Duration::from_secs(20);

fn main() {
    run_root_tests(&[
        (
            "inbound_goes_to_the_pod_ip_and_localhost_needs_an_opt_in",
            inbound_goes_to_the_pod_ip_and_localhost_needs_an_opt_in,
        ),
        (
            "a_slowloris_on_the_health_port_does_not_stop_probes",
            a_slowloris_on_the_health_port_does_not_stop_probes,
        ),
    ]);
}

/// A workload: its WorkloadEntry and BootstrapToken (service account = pod name).
fn workload_yaml(pod: &Pod) -> String {
    format!(
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
        sa = pod.name,
        ip = pod.ip,
    )
}

struct Mesh {
    bed: TestBed,
    files: PathBuf,
    root: PathBuf,
    procs: Vec<ChildHandle>,
}

impl Mesh {
    /// A bed with the control plane in the node namespace serving `registry`
    /// (services) plus a workload for each of `workloads`.
    fn new(name: &str, pods: &[&str], services: &str) -> Result<(Mesh, Vec<Pod>)> {
        let control = target_binary("trellis-control")?;
        let mut bed = TestBed::new(name)?;
        let pods = pods
            .iter()
            .map(|p| bed.add_pod(p))
            .collect::<Result<Vec<_>>>()?;
        let files = shared_dir(bed.dir(), "files")?;
        let registry = files.join("registry");
        std::fs::create_dir_all(&registry)?;
        let mut yaml = services.to_owned();
        for pod in &pods {
            yaml.push_str(&workload_yaml(pod));
            std::fs::write(
                files.join(format!("{}.token", pod.name)),
                format!("{}-token", pod.name),
            )?;
        }
        std::fs::write(registry.join("mesh.yaml"), yaml)?;
        let state = files.join("state");
        let node = bed.node().clone();
        let control = bed.spawn(
            &node,
            None,
            control.to_str().context("path")?,
            &[
                "--registry-dir",
                registry.to_str().context("path")?,
                "--state-dir",
                state.to_str().context("path")?,
                "--grpc-addr",
                &format!("{NODE_IP}:15010"),
                "--admin-addr",
                &format!("{NODE_IP}:15014"),
            ],
        )?;
        control.wait_for_log("control plane started", READY)?;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755))?;
        let mesh = Mesh {
            bed,
            files,
            root: state.join("root-cert.pem"),
            procs: vec![control],
        };
        Ok((mesh, pods))
    }

    /// Redirects `pod`'s traffic and starts its sidecar (UID 1337) with `extra` flags;
    /// waits until it is ready.
    fn sidecar(&mut self, pod: &Pod, extra: &[&str]) -> Result<()> {
        let proxy = target_binary("trellis-proxy")?;
        self.bed.apply_init(pod, &InitConfig::default())?;
        let token = self.files.join(format!("{}.token", pod.name));
        let grpc = format!("{NODE_IP}:15010");
        let mut args = vec![
            "run",
            "--namespace",
            "default",
            "--service-account",
            &pod.name,
            "--control-addr",
            &grpc,
            "--ca-root",
            self.root.to_str().context("path")?,
            "--bootstrap-token-file",
            token.to_str().context("path")?,
            "--outbound-addr",
            "0.0.0.0:15001",
        ];
        args.extend_from_slice(extra);
        let handle = self.bed.spawn_env(
            pod,
            Some(1337),
            proxy.to_str().context("path")?,
            &args,
            &[("RUST_LOG", "info,trellis_proxy=debug")],
        )?;
        self.procs.push(handle);
        self.eventually(&format!("the proxy in {} is ready", pod.name), || {
            Ok(self
                .get(pod, "http://127.0.0.1:15000/ready", 5)?
                .contains("HTTP 200"))
        })
    }

    /// Starts the test app in `pod` and waits until it listens.
    fn app(&mut self, pod: &Pod, args: &[&str]) -> Result<()> {
        let handle = self.bed.spawn(pod, None, APP, args)?;
        handle.wait_listening(READY)?;
        self.procs.push(handle);
        Ok(())
    }

    /// `http-get` from `pod`: its output, failed or not.
    fn get(&self, pod: &Pod, url: &str, timeout_secs: u64) -> Result<String> {
        let timeout = timeout_secs.to_string();
        let out = self
            .bed
            .exec(pod, APP, &["http-get", url, "--timeout", &timeout])?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    fn eventually(&self, what: &str, check: impl FnMut() -> Result<bool>) -> Result<()> {
        self.bed.eventually(what, READY, check)
    }
}

const WEB_VIP: &str = "10.96.0.20";
const LOCAL_VIP: &str = "10.96.0.21";

fn inbound_goes_to_the_pod_ip_and_localhost_needs_an_opt_in() -> Result<()> {
    let services = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {WEB_VIP}
  selector: {{app: web}}
  ports:
  - {{name: loopback-only, port: 8080, targetPort: 8080, appProtocol: http}}
  - {{name: all, port: 8081, targetPort: 8081, appProtocol: http}}
  - {{name: tcp-loopback-only, port: 9000, targetPort: 9000, appProtocol: tcp}}
---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  clusterIP: {LOCAL_VIP}
  selector: {{app: local}}
  ports: [{{name: http, port: 8080, targetPort: 8080, appProtocol: http}}]
"#
    );
    let (mut mesh, pods) = Mesh::new("podip", &["client", "web", "local"], &services)?;
    let [client, web, local] = &pods[..] else {
        bail!("three pods");
    };
    mesh.bed.add_service("web", "default", WEB_VIP.parse()?)?;
    mesh.bed
        .add_service("local", "default", LOCAL_VIP.parse()?)?;
    // `web` binds 8080 and 9000 to localhost only, 8081 to every address.
    let loopback_http = [
        "http-echo",
        "--listen",
        "127.0.0.1:8080",
        "--name",
        "web-lo",
    ];
    mesh.app(web, &loopback_http)?;
    mesh.app(
        web,
        &["http-echo", "--listen", "0.0.0.0:8081", "--name", "web"],
    )?;
    mesh.app(web, &["tcp-echo", "--listen", "127.0.0.1:9000"])?;
    mesh.app(
        local,
        &["http-echo", "--listen", "127.0.0.1:8080", "--name", "local"],
    )?;
    mesh.sidecar(client, &[])?;
    mesh.sidecar(web, &[])?;
    mesh.sidecar(local, &["--inbound-to-localhost"])?;

    let all = mesh.get(client, "http://web.default:8081/all", 10)?;
    if !all.contains("HTTP 200") || !all.contains("web GET /all") {
        bail!("an app on 0.0.0.0 is reachable: {all}\n{}", mesh.bed.logs());
    }
    let lo = mesh.get(client, "http://web.default:8080/secret", 10)?;
    if lo.contains("web-lo") || lo.contains("HTTP 200") {
        bail!(
            "an app bound to localhost only was reached through the mesh: {lo}\n{}",
            mesh.bed.logs()
        );
    }
    let tcp = mesh
        .bed
        .exec(client, APP, &["tcp-send", "web.default:9000", "secret"])?;
    if tcp.status.success() {
        bail!(
            "a TCP app bound to localhost only answered through the mesh: {}\n{}",
            String::from_utf8_lossy(&tcp.stdout),
            mesh.bed.logs()
        );
    }
    let opted_in = mesh.get(client, "http://local.default:8080/x", 10)?;
    if !opted_in.contains("HTTP 200") || !opted_in.contains("local GET /x") {
        bail!(
            "with --inbound-to-localhost the localhost app is reachable: {opted_in}\n{}",
            mesh.bed.logs()
        );
    }
    Ok(())
}

/// Slow connections the attacker keeps open: more than the health server's overall
/// cap (256), so only the per-source cap keeps room for the kubelet.
const SLOW_CONNECTIONS: &str = "400";

fn a_slowloris_on_the_health_port_does_not_stop_probes() -> Result<()> {
    let (mut mesh, pods) = Mesh::new("slowloris", &["web", "attacker"], "")?;
    let [web, attacker] = &pods[..] else {
        bail!("two pods");
    };
    mesh.app(
        web,
        &["http-echo", "--listen", "0.0.0.0:8080", "--name", "web"],
    )?;
    mesh.sidecar(web, &["--health-addr", "0.0.0.0:15020"])?;
    let target = format!("{}:15020", web.ip);
    // The attacker has no sidecar: it talks to the pod IP directly, as any pod can.
    let slow = mesh.bed.spawn(
        attacker,
        None,
        "sh",
        &[
            "-c",
            &format!(
                "ulimit -n 4096; exec {APP} slow-headers {target} --connections {SLOW_CONNECTIONS} --seconds 40"
            ),
        ],
    )?;
    slow.wait_for_log("opened", READY)?;
    mesh.procs.push(slow);
    // The kubelet's view from the node: each probe must answer within its 1 s timeout.
    let node = mesh.bed.node().clone();
    let probe = format!("http://{}:15020/ready", web.ip);
    for i in 0..10 {
        let answer = mesh.get(&node, &probe, 1)?;
        if !answer.contains("HTTP 200") {
            bail!(
                "probe {i} failed during the slowloris: {answer}\n{}",
                mesh.bed.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // The attack was real: the attacker kept reconnecting to the health port.
    let log = mesh.procs.last().map(|p| p.log()).unwrap_or_default();
    if !log.contains("opened") {
        bail!("the slowloris did not run: {log}");
    }
    Ok(())
}
