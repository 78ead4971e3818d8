//! `trellisctl check` against a real API server (etcd, kube-apiserver and
//! kube-controller-manager in a test bed's node namespace): before install, with only
//! the CRDs, a not-accepted policy and a pod without the sidecar.

use std::process::Output;
use std::time::Duration;

use anyhow::{Result, ensure};
use trellis_tests::kube::{KubeCluster, run_cluster_tests};
use trellis_tests::{TestBed, netns_command, run_with_timeout};

fn main() {
    run_cluster_tests(&[
        (
            "check_reports_a_partial_install",
            check_reports_a_partial_install,
        ),
        (
            "uninstall_apply_removes_everything_webhook_first",
            uninstall_apply_removes_everything_webhook_first,
        ),
        (
            "root_rotation_steps_edit_the_root_secret",
            root_rotation_steps_edit_the_root_secret,
        ),
    ]);
}

/// trellisctl in the node namespace (where the API server is), as the admin.
fn trellisctl(cluster: &KubeCluster, args: &[&str]) -> Result<Output> {
    let mut cmd = netns_command(
        &cluster.node().netns,
        None,
        env!("CARGO_BIN_EXE_trellisctl"),
        args,
    );
    cmd.env("KUBECONFIG", cluster.kubeconfig_admin())
        .env("NO_COLOR", "1");
    run_with_timeout(cmd, Duration::from_secs(60))
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

const POLICY: &str = "apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
";

const POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop}
spec:
  containers: [{name: app, image: app:1}]
";

fn check_reports_a_partial_install() -> Result<()> {
    let mut bed = TestBed::new("ctlchk")?;
    let cluster = KubeCluster::start(&mut bed)?;

    let pre = trellisctl(&cluster, &["check", "--pre"])?;
    let out = lines(&pre);
    ensure!(pre.status.success(), "check --pre failed: {out:?}");
    ensure!(
        out[0].starts_with("✔ Kubernetes API reachable (v1."),
        "{out:?}"
    );
    ensure!(
        out[1] == "✔ allowed to create CRDs, webhooks, cluster roles and namespaces",
        "{out:?}"
    );

    let before = trellisctl(&cluster, &["check"])?;
    let out = lines(&before);
    ensure!(before.status.code() == Some(1), "{out:?}");
    ensure!(
        out[1]
            == "✖ CRDs: trafficpolicies.trellis.io missing, authorizationpolicies.trellis.io missing, peerauthentications.trellis.io missing",
        "{out:?}"
    );

    let crds = trellisctl(&cluster, &["install", "--crds-only"])?;
    cluster.kubectl_apply_stdin(&String::from_utf8_lossy(&crds.stdout))?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/trafficpolicies.trellis.io",
        "crd/authorizationpolicies.trellis.io",
        "crd/peerauthentications.trellis.io",
    ])?;
    cluster.kubectl(&["create", "namespace", "shop"])?;
    cluster.kubectl(&["label", "namespace", "shop", "trellis.io/inject=enabled"])?;
    cluster.kubectl_apply_stdin(POLICY)?;
    cluster.kubectl(&[
        "patch",
        "peerauthentication",
        "web",
        "-n",
        "shop",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Accepted","status":"False","reason":"Invalid","message":"spec.portLevelMtls: needs a selector","lastTransitionTime":"2026-01-01T00:00:00Z","observedGeneration":1}]}}"#,
    ])?;
    cluster.kubectl_apply_stdin(POD)?;

    let after = trellisctl(&cluster, &["check"])?;
    let out = lines(&after);
    ensure!(after.status.code() == Some(1), "{out:?}");
    let expected = [
        "✔ CRDs installed and Established (3)",
        "✖ control plane Deployment trellis-system/trellis-control not found",
        "    hint: trellisctl install | kubectl apply -f -",
        "✖ no leader: Lease trellis-system/trellis-control is not held",
        "    hint: is the control plane running, and may it update Leases (RBAC)?",
        "✖ MutatingWebhookConfiguration trellis-injector not found",
        "    hint: trellisctl install | kubectl apply -f -",
        "✖ 1 pods in enabled namespaces run without the sidecar: shop/legacy",
        "    hint: they started before the namespace was enabled or while the webhook was down: kubectl rollout restart their workloads",
        "✖ PeerAuthentication shop/web not accepted: Invalid: spec.portLevelMtls: needs a selector",
        "    hint: fix the fields the message names; until then the proxies fail closed for what it selects",
        "",
        "✖ 5 of 7 checks failed",
    ];
    ensure!(out[1..] == expected, "{}", out.join("\n"));
    Ok(())
}

fn uninstall_apply_removes_everything_webhook_first() -> Result<()> {
    let mut bed = TestBed::new("ctluni")?;
    let cluster = KubeCluster::start(&mut bed)?;
    let manifests = trellisctl(&cluster, &["install"])?;
    ensure!(manifests.status.success());
    // CRDs first: the rest of the stream may use them.
    let manifests = String::from_utf8_lossy(&manifests.stdout).into_owned();
    cluster.kubectl_apply_stdin(&manifests)?;
    cluster.kubectl(&["create", "namespace", "shop"])?;
    cluster.kubectl(&[
        "create",
        "configmap",
        "trellis-ca-root",
        "-n",
        "shop",
        "--from-literal=root-cert.pem=x",
    ])?;

    let removed = trellisctl(&cluster, &["uninstall", "--apply"])?;
    let out = lines(&removed);
    ensure!(removed.status.success(), "{out:?}");
    let expected = [
        "deleted MutatingWebhookConfiguration trellis-injector",
        "deleted Deployment trellis-system/trellis-control",
        "deleted PodDisruptionBudget trellis-system/trellis-control",
        "deleted Service trellis-system/trellis-control",
        "deleted ConfigMap shop/trellis-ca-root",
        "deleted ServiceAccount trellis-system/trellis-control",
        "deleted ClusterRole trellis-control",
        "deleted ClusterRoleBinding trellis-control",
        "deleted Role trellis-system/trellis-control",
        "deleted RoleBinding trellis-system/trellis-control",
        "deleted Namespace trellis-system",
        "deleted CustomResourceDefinition trafficpolicies.trellis.io",
        "deleted CustomResourceDefinition authorizationpolicies.trellis.io",
        "deleted CustomResourceDefinition peerauthentications.trellis.io",
    ];
    ensure!(out == expected, "{}", out.join("\n"));
    // A CRD goes once its objects are cleaned up (a finalizer): wait for that. Slow on
    // a loaded machine (once over 60 s in a full suite run beside two builds), so the
    // wait is generous and a failure shows where the CRDs were stuck.
    let crds = [
        "crd/trafficpolicies.trellis.io",
        "crd/authorizationpolicies.trellis.io",
        "crd/peerauthentications.trellis.io",
    ];
    // Waits of 50 s each (the harness stops any kubectl at 60 s), three at most.
    let mut wait = vec!["wait", "--for=delete", "--timeout=50s"];
    wait.extend(crds);
    let mut waited = cluster.kubectl(&wait);
    for _ in 0..2 {
        if waited.is_ok() {
            break;
        }
        waited = cluster.kubectl(&wait);
    }
    if let Err(e) = waited {
        let mut get = vec!["get", "-o", "yaml"];
        get.extend(crds);
        let stuck = cluster.kubectl(&get).unwrap_or_else(|e| format!("{e:#}"));
        anyhow::bail!("{e:#}\nthe CRDs still there:\n{stuck}");
    }
    let left = cluster.kubectl(&[
        "get",
        "crd,mutatingwebhookconfiguration,clusterrole",
        "-o",
        "name",
    ])?;
    ensure!(!left.contains("trellis"), "left behind: {left}");
    // Again: nothing left to delete is no error.
    let again = trellisctl(&cluster, &["uninstall", "--apply"])?;
    ensure!(again.status.success(), "{:?}", lines(&again));
    ensure!(
        lines(&again)[0] == "MutatingWebhookConfiguration trellis-injector already gone",
        "{:?}",
        lines(&again)
    );
    Ok(())
}

/// `trellisctl root --kube` on the real API server: each step rewrites the shared root
/// Secret (read, then replaced with its resourceVersion), retiring too early is refused,
/// and the old root's key never stays in the Secret once the new root signs.
fn root_rotation_steps_edit_the_root_secret() -> Result<()> {
    use trellis_control::ca::{RootSet, secret_data};
    let mut bed = TestBed::new("ctlroot")?;
    let cluster = KubeCluster::start(&mut bed)?;
    cluster.kubectl(&["create", "namespace", "trellis-system"])?;
    // The Secret as a control plane makes it on first start.
    let roots = RootSet::generate("cluster.local")?;
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": trellis_control::ca::ROOT_SECRET, "namespace": "trellis-system"},
        "data": secret_data(&roots),
    });
    cluster.kubectl_stdin(&["create", "-f", "-"], &secret.to_string())?;
    let keys = || -> Result<Vec<String>> {
        let out = cluster.kubectl(&[
            "get",
            "secret",
            "-n",
            "trellis-system",
            trellis_control::ca::ROOT_SECRET,
            "-o",
            "json",
        ])?;
        let secret: serde_json::Value = serde_json::from_str(&out)?;
        let mut keys: Vec<String> = secret["data"]
            .as_object()
            .map(|data| data.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        Ok(keys)
    };
    let root = |step: &[&str]| -> Result<Output> {
        let mut args = vec!["root"];
        args.extend_from_slice(step);
        args.push("--kube");
        trellisctl(&cluster, &args)
    };
    let ok = |out: Output| -> Result<String> {
        ensure!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let single = keys()?;
    // `phase     <phase>`, the first line of every step's output.
    let phase = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("phase"))
            .map(|p| p.trim().to_owned())
    };

    let status = ok(root(&["status"])?)?;
    ensure!(phase(&status).as_deref() == Some("single"), "{status}");

    ok(root(&["add"])?)?;
    let added = keys()?;
    ensure!(
        added.iter().any(|k| k.contains("next")) && added.len() > single.len(),
        "add left the Secret with {added:?}"
    );
    let status = ok(root(&["status"])?)?;
    ensure!(phase(&status).as_deref() == Some("added"), "{status}");

    let activated_out = ok(root(&["activate", "--max-leaf-ttl", "1h"])?)?;
    ensure!(
        phase(&activated_out).as_deref() == Some("activated"),
        "{activated_out}"
    );
    let activated = keys()?;
    ensure!(
        !activated.iter().any(|k| k.contains("next")),
        "activate left {activated:?}"
    );
    ensure!(
        activated.iter().any(|k| k.contains("previous")),
        "activate kept no previous root: {activated:?}"
    );
    ensure!(
        !activated
            .iter()
            .any(|k| k.contains("previous") && k.contains("key")),
        "the old root's key stayed in the Secret: {activated:?}"
    );

    let early = root(&["retire"])?;
    ensure!(
        !early.status.success(),
        "retiring an hour early was allowed: {}",
        String::from_utf8_lossy(&early.stdout)
    );
    ensure!(keys()? == activated, "a refused retire changed the Secret");

    ok(root(&["retire", "--force"])?)?;
    let retired = keys()?;
    ensure!(
        retired == single,
        "after retire: {retired:?}, at first: {single:?}"
    );
    let status = ok(root(&["status"])?)?;
    ensure!(phase(&status).as_deref() == Some("single"), "{status}");
    Ok(())
}
