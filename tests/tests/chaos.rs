//! Chaos under load (issue 13, item 1), on pods that are network namespaces with real
//! iptables: a control plane on the node, a client pod whose app sends open-loop
//! HTTP/1.1 GETs (10,000 per scenario) to the `web` Service VIP and keeps long-lived
//! TCP echo streams open through it, and `web` pods, each an HTTP echo, a TCP echo and
//! a sidecar. While the load runs, one event happens; afterwards every request and
//! every broken stream is counted (`trellis-testapp chaos-load` records them all) and
//! a row of the chaos table is printed:
//!
//! `chaos | scenario | requests | failed | broken streams | p99 during event | p99 before`
//!
//! The promise is 0 failed idempotent requests in every scenario here; a test fails on
//! any. Streams are held to 0 breaks where nothing they ride on goes away, and only
//! reported where their endpoint is removed or killed (nothing keeps a TCP connection
//! to a process that is gone). Latency is reported, never asserted.
//!
//! Run: `cargo test -p trellis-tests --test chaos -- --nocapture` (as root), then
//! `grep '^chaos |'`. Needs root and network namespaces; elsewhere reported as ignored.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use trellis_init::InitConfig;
use trellis_tests::{
    ChildHandle, NODE_IP, Pod, TestBed, run_root_tests, shared_dir, target_binary,
};

const APP: &str = env!("CARGO_BIN_EXE_trellis-testapp");
const READY: Duration = Duration::from_secs(20);
const WEB_VIP: &str = "10.96.0.40";
const WEB: &str = "web.default.svc.cluster.local";
/// Requests per scenario (the floor) and the open-loop rate.
const REQUESTS: u32 = 10_000;
const RATE: u32 = 500;
const STREAMS: u32 = 4;

fn main() {
    run_root_tests(&[
        ("endpoint_rollout", endpoint_rollout),
        ("certificate_rotation", certificate_rotation),
        ("trust_root_rotation", trust_root_rotation),
        (
            "control_plane_killed_and_restarted",
            control_plane_killed_and_restarted,
        ),
        (
            "control_plane_gone_for_60_seconds",
            control_plane_gone_for_60_seconds,
        ),
        ("config_churn", config_churn),
        (
            "server_sidecars_drained_and_killed",
            server_sidecars_drained_and_killed,
        ),
        ("link_down_for_2_seconds", link_down_for_2_seconds),
        (
            "pooled_connection_idle_past_the_peers_timeout",
            pooled_connection_idle_past_the_peers_timeout,
        ),
    ]);
}

// ---------------------------------------------------------------------------------
// The mesh
// ---------------------------------------------------------------------------------

struct Web {
    name: String,
    pod: Pod,
    sidecar: ChildHandle,
    apps: Vec<ChildHandle>,
    /// Listed in the registry (its endpoint is published).
    published: bool,
}

struct Chaos {
    bed: TestBed,
    proxy: PathBuf,
    control_bin: PathBuf,
    files: PathBuf,
    registry: PathBuf,
    control_args: Vec<String>,
    control: Option<ChildHandle>,
    client: Pod,
    webs: Vec<Web>,
    next_web: usize,
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

impl Chaos {
    /// A mesh with `webs` published web pods; `control_extra` is added to the control
    /// plane's command line.
    fn new(name: &str, webs: usize, control_extra: &[&str]) -> Result<Self> {
        let mut bed = TestBed::new(name)?;
        let client = bed.add_pod("client")?;
        bed.add_service("web", "default", WEB_VIP.parse()?)?;
        let files = shared_dir(bed.dir(), "files")?;
        let registry = files.join("registry");
        std::fs::create_dir_all(&registry)?;
        for sa in ["web", "client"] {
            std::fs::write(files.join(format!("{sa}.token")), format!("{sa}-token"))?;
        }
        let state = files.join("state");
        let mut control_args: Vec<String> = vec![
            "--registry-dir".into(),
            path_str(&registry)?.into(),
            "--state-dir".into(),
            path_str(&state)?.into(),
            "--grpc-addr".into(),
            format!("{NODE_IP}:15010"),
            "--admin-addr".into(),
            format!("{NODE_IP}:15014"),
        ];
        control_args.extend(control_extra.iter().map(|s| (*s).to_owned()));
        let mut chaos = Self {
            proxy: target_binary("trellis-proxy")?,
            control_bin: target_binary("trellis-control")?,
            bed,
            files,
            registry,
            control_args,
            control: None,
            client,
            webs: Vec::new(),
            next_web: 0,
        };
        chaos.write_registry()?;
        chaos.start_control()?;
        // The sidecars (UID 1337) read the root certificate.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755))?;
        for _ in 0..webs {
            chaos.add_web()?;
            let last = chaos.webs.len() - 1;
            chaos.webs[last].published = true;
        }
        chaos.write_registry()?;
        let client = chaos.client.clone();
        chaos.start_sidecar(&client, "client")?;
        chaos.wait_for_endpoints()?;
        Ok(chaos)
    }

    fn write_registry(&self) -> Result<()> {
        let mut docs = vec![format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec:\n  clusterIP: {WEB_VIP}\n  selector: {{app: web}}\n  ports:\n\
             \x20 - {{name: http, port: 80, targetPort: 8080, appProtocol: http}}\n\
             \x20 - {{name: echo, port: 7000, targetPort: 7000, appProtocol: tcp}}\n"
        )];
        for web in self.webs.iter().filter(|w| w.published) {
            docs.push(format!(
                "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\n\
                 metadata: {{name: {}, namespace: default, labels: {{app: web}}}}\n\
                 spec: {{address: {}, serviceAccount: web}}\n",
                web.name, web.pod.ip
            ));
        }
        docs.push(format!(
            "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\n\
             metadata: {{name: client, namespace: default, labels: {{app: client}}}}\n\
             spec: {{address: {}, serviceAccount: client}}\n",
            self.client.ip
        ));
        for sa in ["web", "client"] {
            docs.push(format!(
                "apiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\n\
                 metadata: {{name: {sa}, namespace: default}}\n\
                 spec: {{serviceAccount: {sa}, token: {sa}-token}}\n"
            ));
        }
        self.write_registry_file("mesh.yaml", &docs.join("---\n"))
    }

    /// Writes a registry file whole (a rename: the control plane never reads half).
    fn write_registry_file(&self, name: &str, content: &str) -> Result<()> {
        let tmp = self.registry.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.registry.join(name))?;
        Ok(())
    }

    fn start_control(&mut self) -> Result<()> {
        let node = self.bed.node().clone();
        let args: Vec<&str> = self.control_args.iter().map(String::as_str).collect();
        let control = self
            .bed
            .spawn(&node, None, path_str(&self.control_bin)?, &args)?;
        control.wait_for_log("control plane started", READY)?;
        self.control = Some(control);
        Ok(())
    }

    /// SIGKILLs the control plane.
    fn kill_control(&mut self) -> Result<()> {
        if let Some(control) = self.control.take() {
            control.kill()?;
        }
        Ok(())
    }

    fn start_sidecar(&mut self, pod: &Pod, sa: &str) -> Result<ChildHandle> {
        self.bed.apply_init(pod, &InitConfig::default())?;
        let token = self.files.join(format!("{sa}.token"));
        let root = self.files.join("state").join("root-cert.pem");
        let grpc = format!("{NODE_IP}:15010");
        let sidecar = self.bed.spawn(
            pod,
            Some(1337),
            path_str(&self.proxy)?,
            &[
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
                "--drain",
                "3s",
            ],
        )?;
        self.bed
            .eventually(&format!("sidecar of {} ready", pod.name), READY, || {
                Ok(self.bed.proxy_admin(pod, "/ready")?.contains("HTTP 200"))
            })?;
        Ok(sidecar)
    }

    /// Starts a web pod (apps and sidecar), not yet published.
    fn add_web(&mut self) -> Result<usize> {
        let name = format!("web-{}", self.next_web);
        self.next_web += 1;
        let pod = self.bed.add_pod(&name)?;
        let http = self.bed.spawn(
            &pod,
            None,
            APP,
            &["http-echo", "--listen", "0.0.0.0:8080", "--name", &name],
        )?;
        http.wait_listening(READY)?;
        let tcp = self
            .bed
            .spawn(&pod, None, APP, &["tcp-echo", "--listen", "0.0.0.0:7000"])?;
        tcp.wait_listening(READY)?;
        let sidecar = self.start_sidecar(&pod, "web")?;
        self.webs.push(Web {
            name,
            pod,
            sidecar,
            apps: vec![http, tcp],
            published: false,
        });
        Ok(self.webs.len() - 1)
    }

    /// The web endpoints (`ip:8080`) the client's sidecar holds as ready.
    fn client_endpoints(&self) -> Result<Vec<String>> {
        let page = self.bed.proxy_admin(&self.client, "/config_dump")?;
        let json = page.split_once('\n').map(|(_, b)| b).unwrap_or_default();
        let dump: serde_json::Value =
            serde_json::from_str(json).with_context(|| format!("/config_dump: {page}"))?;
        let mut found = Vec::new();
        for resource in dump["endpoints"].as_array().into_iter().flatten() {
            for ep in resource["endpoints"].as_array().into_iter().flatten() {
                let address = ep["address"].as_str().unwrap_or_default();
                if ep["ready"].as_bool() == Some(true) && address.ends_with(":8080") {
                    found.push(address.to_owned());
                }
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Waits until the client's sidecar holds exactly the published web endpoints.
    fn wait_for_endpoints(&self) -> Result<()> {
        let mut want: Vec<String> = self
            .webs
            .iter()
            .filter(|w| w.published)
            .map(|w| format!("{}:8080", w.pod.ip))
            .collect();
        want.sort();
        self.bed.eventually(
            "the client's sidecar holds the published endpoints",
            READY,
            || Ok(self.client_endpoints()? == want),
        )
    }

    fn web(&self, index: usize) -> &Web {
        &self.webs[index]
    }

    /// Starts the load from the client pod (as its app, UID 1000).
    fn start_load(&mut self, name: &str, rate: u32, extra: &[&str]) -> Result<Load> {
        // The app runs as UID 1000: its record goes to a folder it may write.
        let records = shared_dir(self.bed.dir(), "records")?;
        std::fs::set_permissions(&records, std::fs::Permissions::from_mode(0o777))?;
        let out = records.join(format!("{name}.load"));
        let url = format!("http://{WEB}/chaos");
        let tcp = format!("{WEB}:7000");
        let rate_arg = rate.to_string();
        let count = REQUESTS.to_string();
        let streams = STREAMS.to_string();
        let mut args = vec![
            "chaos-load",
            &url,
            "--rate",
            &rate_arg,
            "--count",
            &count,
            "--seconds",
            "200",
            "--tcp",
            &tcp,
            "--streams",
            &streams,
            "--out",
            path_str(&out)?,
        ];
        args.extend_from_slice(extra);
        let process = self.bed.spawn(&self.client, Some(1000), APP, &args)?;
        process.wait_for_log("chaos-load: started", READY)?;
        Ok(Load {
            process,
            out,
            started_us: now_us(),
        })
    }

    /// On failure, adds the warnings and errors of every process in the bed.
    fn with_logs(&self, result: Result<()>) -> Result<()> {
        result.map_err(|e| {
            let logs = self.bed.logs();
            let notable: Vec<&str> = logs
                .lines()
                .filter(|l| l.starts_with("=====") || l.contains("WARN") || l.contains("ERROR"))
                .take(200)
                .collect();
            e.context(format!(
                "warnings and errors in the bed:\n{}",
                notable.join("\n")
            ))
        })
    }

    fn signal(&self, process: &ChildHandle, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &process.pid.to_string()])
            .status()?;
        ensure!(status.success(), "kill -{signal} {}", process.description);
        Ok(())
    }

    /// Waits for `process` to exit by itself.
    fn wait_exit(&self, process: &ChildHandle, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while process.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("{} did not exit within {within:?}", process.description);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Load and its record
// ---------------------------------------------------------------------------------

struct Load {
    process: ChildHandle,
    out: PathBuf,
    started_us: u64,
}

struct Request {
    at_us: u64,
    latency_us: u64,
    outcome: String,
}

struct Record {
    requests: Vec<Request>,
    breaks: Vec<(u64, String)>,
    pings: u64,
}

impl Load {
    fn finish(self, within: Duration) -> Result<Record> {
        let summary = self.process.wait_for_log("chaos-load: sent=", within)?;
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("read {}", self.out.display()))?;
        let mut requests = Vec::new();
        let mut breaks = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.splitn(4, ' ').collect();
            match fields.as_slice() {
                ["req", at, latency, outcome] => requests.push(Request {
                    at_us: at.parse()?,
                    latency_us: latency.parse()?,
                    outcome: (*outcome).to_owned(),
                }),
                ["brk", at, reason @ ..] => breaks.push((at.parse()?, reason.join(" "))),
                _ => bail!("bad record line `{line}`"),
            }
        }
        let pings = summary
            .split("pings=")
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        let _ = self.started_us;
        Ok(Record {
            requests,
            breaks,
            pings,
        })
    }
}

/// The 99th percentile and the maximum, in ms.
fn p99_and_max(latencies: &mut [u64]) -> String {
    if latencies.is_empty() {
        return "-".into();
    }
    latencies.sort_unstable();
    let i = ((latencies.len() as f64) * 0.99).ceil() as usize;
    let p99 = latencies[i.saturating_sub(1).min(latencies.len() - 1)];
    let max = latencies[latencies.len() - 1];
    format!(
        "{:.1} ms (max {:.0} ms)",
        p99 as f64 / 1000.0,
        max as f64 / 1000.0
    )
}

impl Record {
    fn failed(&self) -> Vec<&Request> {
        self.requests
            .iter()
            .filter(|r| r.outcome != "200")
            .collect()
    }

    /// Prints the scenario's row; `event` is the (start, end) of the event in unix µs
    /// (requests scheduled up to a second after its end count as during it).
    fn report(&self, scenario: &str, event: (u64, u64)) {
        let (start, end) = event;
        let mut during: Vec<u64> = self
            .requests
            .iter()
            .filter(|r| r.at_us >= start && r.at_us <= end + 1_000_000)
            .map(|r| r.latency_us)
            .collect();
        let mut before: Vec<u64> = self
            .requests
            .iter()
            .filter(|r| r.at_us < start)
            .map(|r| r.latency_us)
            .collect();
        let failed = self.failed();
        println!(
            "chaos | {scenario} | {} | {} | {} | {} | {} |",
            self.requests.len(),
            failed.len(),
            self.breaks.len(),
            p99_and_max(&mut during),
            p99_and_max(&mut before),
        );
        let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
        for r in &failed {
            *kinds.entry(r.outcome.as_str()).or_default() += 1;
        }
        for (outcome, n) in kinds {
            println!("chaos:   {scenario}: {n} failed with {outcome}");
        }
        let mut slowest: Vec<&Request> = self.requests.iter().collect();
        slowest.sort_by_key(|r| std::cmp::Reverse(r.latency_us));
        let first = self.requests.iter().map(|r| r.at_us).min().unwrap_or(start);
        for r in slowest.iter().take(3) {
            println!(
                "chaos:   {scenario}: slow: {:.0} ms, sent {:+.3} s from the event ({:.3} s into the run)",
                r.latency_us as f64 / 1000.0,
                (r.at_us as f64 - start as f64) / 1e6,
                (r.at_us - first) as f64 / 1e6,
            );
        }
        for (at, reason) in &self.breaks {
            println!(
                "chaos:   {scenario}: stream broke at {:+.2} s from the event: {reason}",
                (*at as f64 - start as f64) / 1e6
            );
        }
    }

    /// Fails unless every request got 200 and the streams pinged at all.
    fn ensure_no_failed_requests(&self, scenario: &str) -> Result<()> {
        ensure!(
            self.requests.len() as u32 >= REQUESTS,
            "{scenario}: only {} of {REQUESTS} requests were sent",
            self.requests.len()
        );
        ensure!(self.pings > 0, "{scenario}: no stream ever got an echo");
        let failed = self.failed();
        if let Some(first) = failed.first() {
            bail!(
                "{scenario}: {} of {} requests failed; the first, {} µs late: {}",
                failed.len(),
                self.requests.len(),
                first.latency_us,
                first.outcome
            );
        }
        Ok(())
    }

    fn ensure_no_broken_streams(&self, scenario: &str) -> Result<()> {
        if let Some((_, reason)) = self.breaks.first() {
            bail!(
                "{scenario}: {} stream breaks; the first: {reason}",
                self.breaks.len()
            );
        }
        Ok(())
    }
}

/// The load's duration at `rate` with some slack, for waiting on it.
fn load_time(rate: u32) -> Duration {
    Duration::from_secs(u64::from(REQUESTS / rate.max(1)) + 30)
}

// ---------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------

/// Two web pods replaced one by one, as a Deployment's rolling update: the new pod
/// starts and is published, the client's sidecar learns it, the old one is
/// unpublished, the client's sidecar forgets it, then the old sidecar is SIGTERMed
/// (it drains) and its apps stop.
fn endpoint_rollout() -> Result<()> {
    let mut chaos = Chaos::new("chaos-rollout", 2, &[])?;
    let load = chaos.start_load("rollout", RATE, &[])?;
    std::thread::sleep(Duration::from_secs(2));
    let start = now_us();
    for old in 0..2 {
        let new = chaos.add_web()?;
        chaos.webs[new].published = true;
        chaos.write_registry()?;
        chaos.wait_for_endpoints()?;
        chaos.webs[old].published = false;
        chaos.write_registry()?;
        chaos.wait_for_endpoints()?;
        let web = chaos.web(old);
        chaos.signal(&web.sidecar, "TERM")?;
        chaos.wait_exit(&web.sidecar, Duration::from_secs(10))?;
        for app in &web.apps {
            app.kill()?;
        }
    }
    let end = now_us();
    let record = load.finish(load_time(RATE))?;
    record.report("endpoint rollout (2 pods replaced)", (start, end));
    // Streams on a removed pod end when its sidecar's drain does: reported only.
    chaos.with_logs(record.ensure_no_failed_requests("endpoint rollout"))
}

/// Leaves of 6 s, renewed at half life: every sidecar renews about 3 times during the
/// run. Streams must outlive the leaf they were made with.
fn certificate_rotation() -> Result<()> {
    let mut chaos = Chaos::new("chaos-certs", 2, &["--cert-ttl", "6s"])?;
    let load = chaos.start_load("certs", RATE, &[])?;
    let start = now_us();
    let record = load.finish(load_time(RATE))?;
    let end = now_us();
    let mut renewals = Vec::new();
    for pod in [&chaos.client, &chaos.web(0).pod, &chaos.web(1).pod] {
        let metrics = chaos.bed.proxy_admin(pod, "/metrics")?;
        let renewed: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("trellis_cert_renewals_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        renewals.push(renewed);
    }
    record.report(
        &format!("certificate rotation (6 s leaves, renewals {renewals:?})"),
        (start, end),
    );
    chaos.with_logs(record.ensure_no_failed_requests("certificate rotation"))?;
    chaos.with_logs(record.ensure_no_broken_streams("certificate rotation"))?;
    ensure!(
        renewals.iter().all(|r| *r >= 2.0),
        "each sidecar renews its leaf at least twice during the run: {renewals:?}"
    );
    Ok(())
}

/// `trellisctl root add`, `activate` and `retire` with a control-plane restart after
/// each, as the README's procedure, with 6 s leaves: every sidecar moves to the new
/// root and ends trusting only it while the load runs.
fn trust_root_rotation() -> Result<()> {
    let rate = 250;
    let mut chaos = Chaos::new("chaos-roots", 2, &["--cert-ttl", "6s"])?;
    let trellisctl = target_binary("trellisctl")?;
    let state = chaos.files.join("state");
    let root = |args: &[&str]| -> Result<String> {
        let out = Command::new(&trellisctl)
            .arg("root")
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(out.status.success(), "trellisctl root {args:?}: {text}");
        Ok(text)
    };
    let restart = |chaos: &mut Chaos| -> Result<()> {
        chaos.kill_control()?;
        chaos.start_control()
    };
    // (signed_by, trust_bundle) of every sidecar.
    let pods: Vec<Pod> = [chaos.client.clone()]
        .into_iter()
        .chain(chaos.webs.iter().map(|w| w.pod.clone()))
        .collect();
    let all_at = |chaos: &Chaos, signer: &str, bundle: usize| -> Result<bool> {
        for pod in &pods {
            let page = chaos.bed.proxy_admin(pod, "/certs")?;
            let json = page.split_once('\n').map(|(_, b)| b).unwrap_or_default();
            let certs: serde_json::Value = serde_json::from_str(json)?;
            let roots = certs["trust_bundle"].as_array().map_or(0, Vec::len);
            if certs["signed_by"].as_str() != Some(signer) || roots != bundle {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let fingerprint = |text: &str| -> Result<String> {
        text.lines()
            .find_map(|l| l.strip_prefix("signing"))
            .map(|f| f.trim().to_owned())
            .context("no `signing` line")
    };
    let old = fingerprint(&root(&["status"])?)?;

    let load = chaos.start_load("roots", rate, &[])?;
    std::thread::sleep(Duration::from_secs(2));
    let start = now_us();
    root(&["add"])?;
    restart(&mut chaos)?;
    chaos
        .bed
        .eventually("every sidecar trusts both roots", READY, || {
            all_at(&chaos, &old, 2)
        })?;
    let new = fingerprint(&root(&["activate", "--max-leaf-ttl", "6s"])?)?;
    restart(&mut chaos)?;
    chaos
        .bed
        .eventually("every sidecar holds a leaf of the new root", READY, || {
            all_at(&chaos, &new, 2)
        })?;
    // Retiring is refused until the old root's last leaf has expired.
    let deadline = Instant::now() + Duration::from_secs(30);
    while root(&["retire"]).is_err() {
        ensure!(Instant::now() < deadline, "retire still refused after 30 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    restart(&mut chaos)?;
    chaos
        .bed
        .eventually("every sidecar trusts only the new root", READY, || {
            all_at(&chaos, &new, 1)
        })?;
    let end = now_us();
    let record = load.finish(load_time(rate))?;
    record.report("trust-root rotation (add, activate, retire)", (start, end));
    chaos.with_logs(record.ensure_no_failed_requests("trust-root rotation"))?;
    chaos.with_logs(record.ensure_no_broken_streams("trust-root rotation"))
}

fn control_plane_killed_and_restarted() -> Result<()> {
    let mut chaos = Chaos::new("chaos-cpkill", 2, &[])?;
    let load = chaos.start_load("cpkill", RATE, &[])?;
    std::thread::sleep(Duration::from_secs(2));
    let start = now_us();
    chaos.kill_control()?;
    std::thread::sleep(Duration::from_secs(2));
    chaos.start_control()?;
    let end = now_us();
    let record = load.finish(load_time(RATE))?;
    record.report("control plane SIGKILLed, back after 2 s", (start, end));
    chaos.with_logs(record.ensure_no_failed_requests("control plane killed"))?;
    chaos.with_logs(record.ensure_no_broken_streams("control plane killed"))
}

/// The control plane is gone for 60 s: the proxies serve from their last config; a
/// pod started meanwhile is not ready until it returns, then is.
fn control_plane_gone_for_60_seconds() -> Result<()> {
    let rate = 150;
    let mut chaos = Chaos::new("chaos-cpgone", 2, &[])?;
    let load = chaos.start_load("cpgone", rate, &[])?;
    std::thread::sleep(Duration::from_secs(3));
    let start = now_us();
    chaos.kill_control()?;
    // A new pod meanwhile: its sidecar cannot get a certificate, so it stays unready.
    let pod = chaos.bed.add_pod("late")?;
    let late = {
        chaos.bed.apply_init(&pod, &InitConfig::default())?;
        let token = chaos.files.join("web.token");
        let root = chaos.files.join("state").join("root-cert.pem");
        chaos.bed.spawn(
            &pod,
            Some(1337),
            path_str(&chaos.proxy)?,
            &[
                "run",
                "--namespace",
                "default",
                "--service-account",
                "web",
                "--control-addr",
                &format!("{NODE_IP}:15010"),
                "--ca-root",
                path_str(&root)?,
                "--bootstrap-token-file",
                path_str(&token)?,
            ],
        )?
    };
    std::thread::sleep(Duration::from_secs(30));
    let unready = chaos.bed.proxy_admin(&pod, "/ready")?;
    ensure!(
        !unready.contains("HTTP 200") && late.try_wait()?.is_none(),
        "a sidecar started without a control plane is alive and not ready: {unready}"
    );
    std::thread::sleep(Duration::from_secs(30));
    chaos.start_control()?;
    let end = now_us();
    chaos
        .bed
        .eventually("the late sidecar becomes ready", READY, || {
            Ok(chaos.bed.proxy_admin(&pod, "/ready")?.contains("HTTP 200"))
        })?;
    let record = load.finish(load_time(rate))?;
    record.report("control plane gone for 60 s", (start, end));
    chaos.with_logs(record.ensure_no_failed_requests("control plane gone"))?;
    chaos.with_logs(record.ensure_no_broken_streams("control plane gone"))
}

/// A TrafficPolicy and an HTTPRoute for `web` rewritten ten times a second.
fn config_churn() -> Result<()> {
    let mut chaos = Chaos::new("chaos-churn", 2, &[])?;
    let load = chaos.start_load("churn", RATE, &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let start = now_us();
    for i in 0..80u32 {
        let policy = format!(
            "apiVersion: trellis.io/v1alpha1\nkind: TrafficPolicy\n\
             metadata: {{name: web, namespace: default}}\n\
             spec:\n  targetRef: {{kind: Service, name: web}}\n\
             \x20 loadBalancer: {{algorithm: {}}}\n\
             \x20 retries: {{attempts: {}, retryOn: [gateway-error, connect-failure]}}\n\
             \x20 timeouts: {{request: {}s}}\n\
             ---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: web, namespace: default}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n\
             \x20 rules:\n  - matches: [{{path: {{type: PathPrefix, value: /v{i}}}}}]\n\
             \x20   backendRefs: [{{name: web, port: 80}}]\n\
             \x20 - backendRefs: [{{name: web, port: 80}}]\n",
            if i % 2 == 0 {
                "ROUND_ROBIN"
            } else {
                "LEAST_REQUEST"
            },
            1 + i % 3,
            5 + i % 4,
        );
        chaos.write_registry_file("churn.yaml", &policy)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = now_us();
    let record = load.finish(load_time(RATE))?;
    let dump = chaos.bed.proxy_admin(&chaos.client, "/config_dump")?;
    record.report("config churn (10 rewrites/s for 8 s)", (start, end));
    ensure!(
        dump.contains("/v79"),
        "the client's sidecar ends on the last route written"
    );
    chaos.with_logs(record.ensure_no_failed_requests("config churn"))?;
    chaos.with_logs(record.ensure_no_broken_streams("config churn"))
}

/// Three endpoints: one sidecar is SIGTERMed (it drains), another SIGKILLed, both
/// still published (as when a pod dies before the registry notices): the client's
/// sidecar ejects them and retries the GETs elsewhere.
fn server_sidecars_drained_and_killed() -> Result<()> {
    let mut chaos = Chaos::new("chaos-sidecars", 3, &[])?;
    let load = chaos.start_load("sidecars", RATE, &[])?;
    std::thread::sleep(Duration::from_secs(2));
    let start = now_us();
    chaos.signal(&chaos.web(0).sidecar, "TERM")?;
    std::thread::sleep(Duration::from_secs(2));
    chaos.web(1).sidecar.kill()?;
    std::thread::sleep(Duration::from_secs(1));
    let end = now_us();
    let record = load.finish(load_time(RATE))?;
    record.report("server sidecars SIGTERMed and SIGKILLed", (start, end));
    // Streams through the two stopped sidecars break: reported only.
    chaos.with_logs(record.ensure_no_failed_requests("server sidecars stopped"))
}

/// The veth of one of two web pods goes down for 2 s (in the node namespace).
fn link_down_for_2_seconds() -> Result<()> {
    let mut chaos = Chaos::new("chaos-link", 2, &[])?;
    let load = chaos.start_load("link", RATE, &[])?;
    std::thread::sleep(Duration::from_secs(2));
    // web-0 is the bed's second pod (the client is the first): veth vp1.
    let node = chaos.bed.node().netns.clone();
    let link = |state: &str| -> Result<()> {
        trellis_tests::netns::ip(&["-n", &node, "link", "set", "vp1", state])?;
        Ok(())
    };
    let start = now_us();
    link("down")?;
    std::thread::sleep(Duration::from_secs(2));
    link("up")?;
    let end = now_us();
    let record = load.finish(load_time(RATE))?;
    record.report("link to one of two pods down for 2 s", (start, end));
    chaos.with_logs(record.ensure_no_failed_requests("link down"))?;
    chaos.with_logs(record.ensure_no_broken_streams("link down"))
}

/// A pooled mesh connection reused at the edge of its idle timeout: the service's
/// idle timeout (1 s) caps the client sidecar's pool, and the load pauses after every
/// 500 requests for 0.8 to 1.2 s, so pooled connections are picked just before, at
/// and just after the moment they count as idle. The peer's own limit (its 30 s wait
/// for the next request head) is kept above the pool's (20 s at most) on purpose, so
/// the peer never closes a connection the pool still offers; this checks the pool's
/// side of that edge. The app's own connections are dialed again after each pause:
/// the sidecar closes an app connection idle for 1 s too, and an app that reuses one
/// at that instant sees a reset, as with any HTTP/1.1 server's idle timeout.
fn pooled_connection_idle_past_the_peers_timeout() -> Result<()> {
    let mut chaos = Chaos::new("chaos-idle", 1, &[])?;
    chaos.write_registry_file(
        "idle.yaml",
        "apiVersion: trellis.io/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {name: web, namespace: default}\n\
         spec:\n  targetRef: {kind: Service, name: web}\n  timeouts: {idle: 1s}\n",
    )?;
    chaos
        .bed
        .eventually("the idle policy reaches the client", READY, || {
            Ok(chaos
                .bed
                .proxy_admin(&chaos.client, "/config_dump")?
                .contains("TrafficPolicy"))
        })?;
    let load = chaos.start_load(
        "idle",
        2_000,
        &[
            "--pause-every",
            "500",
            "--pause-ms",
            "1000",
            "--pause-spread-ms",
            "200",
        ],
    )?;
    let start = now_us();
    let record = load.finish(Duration::from_secs(90))?;
    let end = now_us();
    record.report(
        "pooled connection reused at its 1 s idle timeout",
        (start, end),
    );
    chaos.with_logs(record.ensure_no_failed_requests("idle pooled connection"))
}
