//! The control plane's writes to a real API server: `trellis-control --kube` runs in
//! the node namespace against the test cluster (as an admin; the shipped RBAC is the
//! end-to-end test's business) and we check, with the real kubectl, that
//!
//! - an HTTPRoute with a Service parent and a missing backend gets a
//!   `status.parents` entry of ours with `Accepted=False` and a reason, and a Gateway
//!   parent's entry written by another controller stays;
//! - a refused policy gets an Event (events.k8s.io) on it;
//! - the mesh root namespace is the namespace the control plane runs in
//!   (`POD_NAMESPACE`), not `trellis-system`: two selector-less PeerAuthentications
//!   there conflict as mesh-wide ones.
//!
//! Gateway API's HTTPRoute CRD comes from its Go module (`sigs.k8s.io/gateway-api`,
//! through the Go module proxy, as the cluster binaries do). Every check runs and
//! all failures are reported together. Needs root, network namespaces and Go.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use trellis_tests::kube::{KubeCluster, run_cluster_tests};
use trellis_tests::{TestBed, target_binary};

const GATEWAY_API_MODULE: &str = "sigs.k8s.io/gateway-api@v1.4.0";
const ROOT: &str = "mesh-root";
const CONTROLLER_NAME: &str = "trellis.io/control-plane";
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    run_cluster_tests(&[(
        "route_status_policy_events_and_root_namespace_on_a_real_api_server",
        route_status_policy_events_and_root_namespace_on_a_real_api_server,
    )]);
}

/// The HTTPRoute CRD (standard channel) from the Gateway API Go module.
fn http_route_crd() -> Result<PathBuf> {
    let out = Command::new("go")
        .args(["mod", "download", "-json", GATEWAY_API_MODULE])
        .current_dir(std::env::temp_dir())
        .env("GOFLAGS", "-mod=mod")
        .stdin(Stdio::null())
        .output()
        .context("running `go mod download` for the Gateway API CRDs")?;
    ensure!(
        out.status.success(),
        "go mod download {GATEWAY_API_MODULE}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).context("go mod download JSON")?;
    let dir = info["Dir"]
        .as_str()
        .context("no Dir from go mod download")?;
    let crd = Path::new(dir).join("config/crd/standard/gateway.networking.k8s.io_httproutes.yaml");
    ensure!(crd.is_file(), "{} is missing", crd.display());
    Ok(crd)
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh-root}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// A route to a backend that does not exist, with a Gateway parent as well.
const BROKEN_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-nowhere, namespace: shop}
spec:
  parentRefs:
    - {group: "", kind: Service, name: echo, port: 80}
    - {name: public-gw}
  rules:
    - backendRefs: [{name: nowhere, port: 80}]
"#;

/// Two mesh-wide PeerAuthentications in the root: the younger one is refused.
const FIRST_MESH_POLICY: &str = r#"
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: mesh-default, namespace: mesh-root}
spec: {mtls: {mode: STRICT}}
"#;
const SECOND_MESH_POLICY: &str = r#"
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: mesh-override, namespace: mesh-root}
spec: {mtls: {mode: PERMISSIVE}}
"#;

fn route_status_policy_events_and_root_namespace_on_a_real_api_server() -> Result<()> {
    let crd = http_route_crd()?;
    let mut bed = TestBed::new("kstatus")?;
    let cluster = KubeCluster::start(&mut bed)?;
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for file in [
        crds.join("trafficpolicies.trellis.io.yaml"),
        crds.join("authorizationpolicies.trellis.io.yaml"),
        crds.join("peerauthentications.trellis.io.yaml"),
        crd,
    ] {
        // Server-side: the HTTPRoute CRD is too large for the last-applied annotation.
        cluster.kubectl(&["apply", "--server-side", "-f", &file.to_string_lossy()])?;
    }
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/httproutes.gateway.networking.k8s.io",
        "crd/peerauthentications.trellis.io",
    ])?;
    cluster.kubectl_apply_stdin(OBJECTS)?;

    let control = target_binary("trellis-control")?;
    let kubeconfig = cluster.kubeconfig_admin().to_string_lossy().into_owned();
    let node = bed.node().clone();
    let process = bed.spawn_env(
        &node,
        None,
        &control.to_string_lossy(),
        &[
            "--kube",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--debug-addr",
            "127.0.0.1:0",
        ],
        &[
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAMESPACE", ROOT),
            ("POD_NAME", "trellis-control-0"),
            ("RUST_LOG", "info,trellis_control=debug"),
        ],
    )?;
    process.wait_for_log("control plane started", WRITE_TIMEOUT)?;

    // The first mesh-wide policy first, so it is the older one.
    cluster.kubectl_apply_stdin(FIRST_MESH_POLICY)?;
    cluster.kubectl_apply_stdin(BROKEN_ROUTE)?;
    // Another controller's entry for the Gateway parent, as a Gateway would write it.
    let gateway_entry = r#"{"status": {"parents": [{"parentRef": {"name": "public-gw"},
        "controllerName": "example.com/gateway", "conditions": [{"type": "Accepted",
        "status": "True", "reason": "Accepted", "message": "",
        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}]}}"#;
    cluster.kubectl(&[
        "patch",
        "httproute",
        "to-nowhere",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        gateway_entry,
    ])?;
    cluster.wait_until("mesh-default is accepted", WRITE_TIMEOUT, |c| {
        Ok(accepted(c, "peerauthentication", ROOT, "mesh-default")?.is_some())
    })?;
    cluster.kubectl_apply_stdin(SECOND_MESH_POLICY)?;

    let checks: [(&str, Check); 3] = [
        ("route status.parents", route_parents_say_why),
        ("policy Event", refused_policy_has_an_event),
        ("root namespace", root_namespace_is_the_control_planes),
    ];
    let mut failures = Vec::new();
    for (what, check) in checks {
        if let Err(e) = check(&cluster) {
            failures.push(format!("{what}: {e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{}\ncontrol plane log (tail):\n{}",
            failures.join("\n"),
            tail(&process.log(), 80)
        );
    }
    Ok(())
}

/// One check against the cluster once everything is applied.
type Check = fn(&KubeCluster) -> Result<()>;

fn get_json(cluster: &KubeCluster, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = cluster.kubectl(&all)?;
    serde_json::from_str(&text).with_context(|| format!("kubectl {args:?}: not JSON"))
}

/// The `Accepted` condition of a Trellis object, once written.
fn accepted(cluster: &KubeCluster, kind: &str, ns: &str, name: &str) -> Result<Option<Value>> {
    let object = get_json(cluster, &["get", kind, name, "-n", ns])?;
    Ok(object["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
        .cloned())
}

fn route_parents_say_why(cluster: &KubeCluster) -> Result<()> {
    let mut last = Value::Null;
    let found = cluster.wait_until(
        "to-nowhere has our parent status and the Gateway's",
        WRITE_TIMEOUT,
        |c| {
            last =
                get_json(c, &["get", "httproute", "to-nowhere", "-n", "shop"])?["status"].clone();
            let parents = last["parents"].as_array().cloned().unwrap_or_default();
            let ours = parents
                .iter()
                .any(|p| p["controllerName"] == CONTROLLER_NAME);
            let theirs = parents
                .iter()
                .any(|p| p["controllerName"] == "example.com/gateway");
            Ok(ours && theirs)
        },
    );
    found.with_context(|| format!("last status: {last:#}"))?;
    let parents = last["parents"].as_array().context("parents")?;
    let ours: Vec<&Value> = parents
        .iter()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .collect();
    ensure!(
        ours.len() == 1,
        "one entry of ours, for the Service: {last:#}"
    );
    ensure!(
        ours[0]["parentRef"]["kind"] == "Service" && ours[0]["parentRef"]["name"] == "echo",
        "our entry is for the Service parent: {last:#}"
    );
    let condition = |type_: &str| {
        ours[0]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let accepted = condition("Accepted");
    ensure!(
        accepted["status"] == "False" && accepted["reason"] == "BackendNotFound",
        "Accepted: {accepted:#}"
    );
    let message = accepted["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("nowhere.shop does not exist"),
        "the message names the missing backend: {message}"
    );
    let resolved = condition("ResolvedRefs");
    ensure!(
        resolved["status"] == "False" && resolved["reason"] == "BackendNotFound",
        "ResolvedRefs: {resolved:#}"
    );
    Ok(())
}

fn events_in(cluster: &KubeCluster, ns: &str) -> Result<Vec<Value>> {
    let list = get_json(cluster, &["get", "events.events.k8s.io", "-n", ns])?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn refused_policy_has_an_event(cluster: &KubeCluster) -> Result<()> {
    let mut seen = Vec::new();
    let found = cluster.wait_until("an Event on mesh-override", WRITE_TIMEOUT, |c| {
        seen = events_in(c, ROOT)?;
        Ok(seen
            .iter()
            .any(|e| e["regarding"]["name"] == "mesh-override"))
    });
    found.with_context(|| format!("events in {ROOT}: {seen:#?}"))?;
    let event = seen
        .iter()
        .find(|e| e["regarding"]["name"] == "mesh-override")
        .context("the Event")?;
    ensure!(
        event["type"] == "Warning"
            && event["reason"] == "Conflicted"
            && event["reportingController"] == CONTROLLER_NAME
            && event["regarding"]["kind"] == "PeerAuthentication",
        "{event:#}"
    );
    ensure!(
        event["regarding"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "the Event names the object's uid: {event:#}"
    );
    // An accepted policy has none.
    ensure!(
        !seen
            .iter()
            .any(|e| e["regarding"]["name"] == "mesh-default"),
        "no Event for the accepted policy: {seen:#?}"
    );
    Ok(())
}

fn root_namespace_is_the_control_planes(cluster: &KubeCluster) -> Result<()> {
    let mut last = None;
    let found = cluster.wait_until("mesh-override is refused", WRITE_TIMEOUT, |c| {
        last = accepted(c, "peerauthentication", ROOT, "mesh-override")?;
        Ok(last.as_ref().is_some_and(|a| a["status"] == "False"))
    });
    found.with_context(|| format!("last Accepted: {last:?}"))?;
    let condition = last.context("Accepted")?;
    let message = condition["message"].as_str().unwrap_or_default();
    // In any other namespace the two would conflict as namespace-wide policies.
    ensure!(
        message.contains("the mesh already has PeerAuthentication mesh-default"),
        "{ROOT} is not the mesh root: {message}"
    );
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
