//! Request metrics (issue 12) on pods that are network namespaces with real
//! iptables: traffic to a Service VIP, redirected into the client's sidecar and the
//! server's, is counted by both with the labels they learn there (the service from
//! the VIP on one side, from the endpoint the caller dialed on the other), including
//! a 503 the server's sidecar makes when the app port is closed; then `trellisctl top
//! --once` run in the client pod against its sidecar's admin port.
//!
//! Needs root and network namespaces; elsewhere reported as ignored.

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
const WEB_VIP: &str = "10.96.0.30";
const WEB: &str = "web.default.svc.cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

fn main() {
    run_root_tests(&[(
        "both_sidecars_count_vip_traffic_and_top_shows_it",
        both_sidecars_count_vip_traffic_and_top_shows_it,
    )]);
}

fn registry(client: &Pod, web: &Pod) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {WEB_VIP}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, appProtocol: http}}
  - {{name: closed, port: 81, targetPort: 8081, appProtocol: http}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: web, namespace: default, labels: {{app: web}}}}
spec: {{address: {web_ip}, serviceAccount: web}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: web, namespace: default}}
spec: {{serviceAccount: web, token: web-token}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{address: {client_ip}, serviceAccount: client}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: client, namespace: default}}
spec: {{serviceAccount: client, token: client-token}}
"#,
        web_ip = web.ip,
        client_ip = client.ip,
    )
}

/// The sum of `name`'s series carrying every label in `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn both_sidecars_count_vip_traffic_and_top_shows_it() -> Result<()> {
    let proxy = target_binary("trellis-proxy")?;
    let control = target_binary("trellis-control")?;
    let trellisctl = target_binary("trellisctl")?;
    let mut bed = TestBed::new("reqmetrics")?;
    let client = bed.add_pod("client")?;
    let web = bed.add_pod("web")?;
    bed.add_service("web", "default", WEB_VIP.parse()?)?;

    let files = shared_dir(bed.dir(), "files")?;
    let registry_dir = files.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    std::fs::write(registry_dir.join("mesh.yaml"), registry(&client, &web))?;
    for sa in ["web", "client"] {
        std::fs::write(files.join(format!("{sa}.token")), format!("{sa}-token"))?;
    }
    let state = files.join("state");
    let node = bed.node().clone();
    let grpc = format!("{NODE_IP}:15010");
    let mut procs: Vec<ChildHandle> = vec![bed.spawn(
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
    let app = bed.spawn(
        &web,
        None,
        APP,
        &["http-echo", "--listen", "0.0.0.0:8080", "--name", "web"],
    )?;
    app.wait_listening(READY)?;
    procs.push(app);
    for pod in [&web, &client] {
        let sa = pod.name.as_str();
        bed.apply_init(pod, &InitConfig::default())?;
        let token = files.join(format!("{sa}.token"));
        procs.push(bed.spawn(
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
        )?);
    }
    let get = |path: &str, count: u32| -> Result<String> {
        let out = bed.exec(
            &client,
            APP,
            &[
                "http-get",
                &format!("http://{WEB}{path}"),
                "--count",
                &count.to_string(),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    bed.eventually("a meshed call goes through", READY, || {
        Ok(get("/warm", 1)?.contains("HTTP 200"))
    })?;
    let before_client = bed.proxy_admin(&client, "/metrics")?;
    let before_web = bed.proxy_admin(&web, "/metrics")?;

    // Known traffic: four 200s, and one call to a port with nothing behind it.
    let ok = get("/ok", 4)?;
    if ok.matches("HTTP 200").count() != 4 {
        bail!("four 200s expected: {ok}");
    }
    let out = bed.exec(
        &client,
        APP,
        &["http-get", &format!("http://{WEB}:81/closed")],
    )?;
    let closed = String::from_utf8_lossy(&out.stdout);
    if !closed.contains("HTTP 503") {
        bail!("the server's sidecar answers 503 for a closed app port: {closed}");
    }

    let source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "web"),
        ("destination_principal", WEB_ID),
        ("destination_service", "web.default"),
    ];
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "web"),
        ("destination_principal", WEB_ID),
        ("destination_service", "web.default"),
    ];
    let delta = |before: &str, after: &str, name: &str, labels: &[(&str, &str)]| {
        metric(after, name, labels) - metric(before, name, labels)
    };
    let with = |side: &[(&'static str, &'static str)], rest: &[(&'static str, &'static str)]| {
        side.iter().chain(rest).copied().collect::<Vec<_>>()
    };
    let ok_port80 = [
        ("destination_port", "80"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("request_protocol", "http"),
    ];
    let closed_port81 = [
        ("destination_port", "81"),
        ("response_code", "503"),
        ("response_flags", "app_unreachable"),
    ];
    // Both sidecars, once the last request has been recorded on each.
    let mut wrong = Vec::new();
    bed.eventually("both sidecars recorded everything", READY, || {
        let after_client = bed.proxy_admin(&client, "/metrics")?;
        let after_web = bed.proxy_admin(&web, "/metrics")?;
        wrong.clear();
        let checks = [
            (
                "client: 200s",
                delta(
                    &before_client,
                    &after_client,
                    "trellis_requests_total",
                    &with(&source, &ok_port80),
                ),
                4.0,
            ),
            (
                "client: 200s' durations",
                delta(
                    &before_client,
                    &after_client,
                    "trellis_request_duration_milliseconds_count",
                    &with(&source, &ok_port80),
                ),
                4.0,
            ),
            (
                "client: the peer's 503 (one request, whatever the tries)",
                delta(
                    &before_client,
                    &after_client,
                    "trellis_requests_total",
                    &with(&source, &closed_port81),
                ),
                1.0,
            ),
            (
                "web: 200s",
                delta(
                    &before_web,
                    &after_web,
                    "trellis_requests_total",
                    &with(&destination, &ok_port80),
                ),
                4.0,
            ),
            (
                "web: 200s' response sizes in +Inf",
                delta(
                    &before_web,
                    &after_web,
                    "trellis_response_bytes_bucket",
                    &with(&destination, &[("le", "+Inf"), ("response_code", "200")]),
                ),
                4.0,
            ),
            (
                // The client tries the only endpoint three times (nothing reached
                // the app, so each try may go elsewhere), and each try is a request
                // to the server's sidecar.
                "web: its own 503s",
                delta(
                    &before_web,
                    &after_web,
                    "trellis_requests_total",
                    &with(&destination, &closed_port81),
                ),
                3.0,
            ),
        ];
        for (what, got, want) in checks {
            if got != want {
                wrong.push(format!("{what}: {got}, want {want}"));
            }
        }
        Ok(wrong.is_empty())
    })
    .with_context(|| format!("{wrong:?}"))?;

    // `trellisctl top --once` in the client pod, against its sidecar, during traffic.
    let stop = bed.dir().join("stop-load");
    let load = bed.spawn(
        &client,
        None,
        APP,
        &[
            "http-load",
            &format!("http://{WEB}/load"),
            "--count",
            "1000",
            "--interval-ms",
            "20",
            "--seconds",
            "30",
            "--stop-file",
            stop.to_str().context("path")?,
        ],
    )?;
    let top = bed.exec(
        &client,
        trellisctl.to_str().context("path")?,
        &["top", "--once", "-o", "json", "127.0.0.1:15000"],
    );
    std::fs::write(&stop, "")?;
    drop(load);
    let top = top?;
    let rows: serde_json::Value = serde_json::from_slice(&top.stdout).with_context(|| {
        format!(
            "trellisctl top: {}{}",
            String::from_utf8_lossy(&top.stdout),
            String::from_utf8_lossy(&top.stderr)
        )
    })?;
    let row = rows
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["destination"] == "web.default"))
        .with_context(|| format!("no web.default row: {rows}"))?;
    if row["source"] != "client" || row["reporter"] != "source" {
        bail!("top's row names the wrong path: {row}");
    }
    if row["rps"].as_f64().is_none_or(|rps| rps <= 0.0) || row["total"].as_f64() < Some(6.0) {
        bail!("top saw no traffic: {row}");
    }
    drop(procs);
    Ok(())
}
