//! The Helm charts installed once on the test cluster, as deploy/README.md tells a
//! user to: create and label the namespace, `helm install trellis-crds`, `helm install
//! trellis --wait` with the images set to ones the netns kubelet maps to the local
//! binaries. The two control-plane Pods (the chart's Deployment, its ServiceAccount
//! token and RBAC) become Ready, one holds and renews the leader Lease, the leader
//! fills the injector's caBundle; `helm upgrade` changes a value and the webhook still
//! has its caBundle after it; `helm uninstall` removes what the charts installed.
//! Needs root, network namespaces and Go (or the binaries built already); reported as
//! ignored, with a `SKIPPED` line saying why, otherwise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use trellis_tests::kube::{Helm, KubeCluster, helm_skip_reason, kube_skip_reason};
use trellis_tests::kubelet::Kubelet;
use trellis_tests::{TestBed, target_binary};

const NS: &str = "trellis-system";
const CRDS: [&str; 3] = [
    "trafficpolicies.trellis.io",
    "authorizationpolicies.trellis.io",
    "peerauthentications.trellis.io",
];
/// helm's own bound on `--wait`, and ours on a call that does not wait.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    let skip = trellis_tests::root_skip_reason()
        .map(str::to_string)
        .or_else(kube_skip_reason)
        .or_else(helm_skip_reason);
    trellis_tests::run_tests_unless(
        skip.as_deref(),
        &[(
            "helm_install_runs_the_control_plane_and_uninstall_removes_it",
            helm_install_runs_the_control_plane_and_uninstall_removes_it,
        )],
    );
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm_install_runs_the_control_plane_and_uninstall_removes_it() -> Result<()> {
    let started = Instant::now();
    let mut bed = TestBed::new("kubehelm")?;
    let helm = Helm::new(&bed.dir().join("helm"))?;
    let cluster = KubeCluster::start(&mut bed)?;
    let proxy = target_binary("trellis-proxy")?;
    let images = [
        ("trellis-control", target_binary("trellis-control")?),
        ("trellis-proxy", proxy.clone()),
        ("trellis-proxy-init", proxy),
    ];
    let kubelet = Kubelet::start(&mut bed, &cluster, &images)?;
    let result = scenario(&cluster, &helm);
    if result.is_err() || std::env::var_os("TRELLIS_SHOW_LOGS").is_some() {
        eprintln!("{}\n{}", kubelet.logs(), cluster.logs());
    }
    result?;
    println!("kube_helm: whole test {:?}", started.elapsed());
    Ok(())
}

fn scenario(cluster: &KubeCluster, helm: &Helm) -> Result<()> {
    let netns = cluster.node().netns.clone();
    let kubeconfig = format!("--kubeconfig={}", cluster.kubeconfig_admin().display());
    let chart = |name: &str| repo().join("deploy/helm").join(name).display().to_string();
    let helm_in_cluster = |args: &[&str], timeout: Duration| {
        let mut full = args.to_vec();
        full.push(&kubeconfig);
        helm.run_in_netns(&netns, &full, timeout)
    };

    // As deploy/README.md says: helm needs the release namespace first.
    cluster.kubectl(&["create", "namespace", NS])?;
    cluster.kubectl(&[
        "label",
        "namespace",
        NS,
        "trellis.io/inject=disabled",
        "pod-security.kubernetes.io/enforce=restricted",
    ])?;
    helm_in_cluster(
        &["install", "trellis-crds", &chart("trellis-crds"), "-n", NS],
        CALL_TIMEOUT,
    )?;
    for crd in CRDS {
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{crd}"),
            "--timeout=60s",
        ])?;
    }
    // Image names the kubelet maps to the local binaries; the tags show the values
    // reached the Deployment and the injector's flags.
    let wait = format!("--timeout={}s", INSTALL_TIMEOUT.as_secs());
    helm_in_cluster(
        &[
            "install",
            "trellis",
            &chart("trellis"),
            "-n",
            NS,
            "--wait",
            &wait,
            "--set",
            "controlPlane.image.repository=localhost/trellis-control,controlPlane.image.tag=helm-test",
            "--set",
            "proxy.image.tag=helm-test,proxyInit.image.tag=helm-test",
        ],
        INSTALL_TIMEOUT + CALL_TIMEOUT,
    )?;

    let status = helm_in_cluster(&["status", "trellis", "-n", NS, "-o", "json"], CALL_TIMEOUT)?;
    let status: serde_json::Value = serde_json::from_str(&status).context("helm status JSON")?;
    ensure!(
        status["info"]["status"] == "deployed",
        "release not deployed: {}",
        status["info"]
    );

    let pods = ready_control_pods(cluster)?;
    ensure!(
        pods.len() == 2,
        "expected 2 Ready control-plane pods: {pods:?}"
    );
    let image = cluster.kubectl(&[
        "get",
        "deployment",
        "trellis-control",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].args}",
    ])?;
    ensure!(
        image.starts_with("localhost/trellis-control:helm-test ")
            && image.contains("--proxy-image=ghcr.io/trellis-mesh/trellis-proxy:helm-test"),
        "the Deployment does not carry the values: {image}"
    );

    // One replica leads, by the Lease the chart's Role lets it take.
    cluster.wait_until(
        "a control-plane pod holds the Lease trellis-control",
        Duration::from_secs(30),
        |c| {
            let holder = c
                .kubectl(&[
                    "get",
                    "lease",
                    "trellis-control",
                    "-n",
                    NS,
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ])
                .unwrap_or_default();
            Ok(pods.iter().any(|p| *p == holder.trim()))
        },
    )?;
    // ... and keeps it (renewed every 2 s): the Role lets it update the Lease.
    let renewed = |c: &KubeCluster| {
        c.kubectl(&[
            "get",
            "lease",
            "trellis-control",
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.holderIdentity} {.spec.renewTime}",
        ])
    };
    let first = renewed(cluster)?;
    cluster.wait_until(
        "the leader renews the Lease",
        Duration::from_secs(30),
        |c| {
            let now = renewed(c)?;
            ensure!(
                now.split(' ').next() == first.split(' ').next(),
                "the Lease changed hands ({first} -> {now}) with both replicas up"
            );
            Ok(now != first)
        },
    )?;
    // The leader patched the chart's webhook with its root (RBAC on that one object).
    cluster.wait_until(
        "the leader fills the trellis-injector caBundle",
        Duration::from_secs(30),
        |c| {
            let bundle = c.kubectl(&[
                "get",
                "mutatingwebhookconfiguration",
                "trellis-injector",
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ])?;
            Ok(!bundle.trim().is_empty())
        },
    )?;

    // An upgrade changes what it should, and the webhook keeps a caBundle (a field the
    // chart does not set; the control plane wrote it).
    helm_in_cluster(
        &[
            "upgrade",
            "trellis",
            &chart("trellis"),
            "-n",
            NS,
            "--reuse-values",
            "--set",
            "webhook.failurePolicy=Ignore",
            "--wait",
            &wait,
        ],
        INSTALL_TIMEOUT + CALL_TIMEOUT,
    )?;
    let webhook = cluster.kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "trellis-injector",
        "-o",
        "jsonpath={.webhooks[0].failurePolicy} {.webhooks[0].clientConfig.caBundle}",
    ])?;
    let (policy, bundle) = webhook.split_once(' ').unwrap_or((webhook.as_str(), ""));
    ensure!(policy == "Ignore", "failurePolicy after upgrade: {policy}");
    ensure!(
        !bundle.trim().is_empty(),
        "helm upgrade dropped the caBundle"
    );
    cluster.wait_until(
        "the upgraded replicas run with --injector-failure-policy=ignore and are Ready",
        Duration::from_secs(60),
        |c| {
            let args = c.kubectl(&[
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/name=trellis-control",
                "-o",
                "jsonpath={range .items[*]}{.spec.containers[0].args} {end}",
            ])?;
            let ready = ready_control_pods(c)?;
            Ok(
                args.matches("--injector-failure-policy=ignore").count() == 2
                    && !args.contains("--injector-failure-policy=fail")
                    && ready.len() == 2,
            )
        },
    )?;

    helm_in_cluster(
        &["uninstall", "trellis", "-n", NS, "--wait", &wait],
        INSTALL_TIMEOUT + CALL_TIMEOUT,
    )?;
    cluster.wait_until(
        "the control-plane pods are gone",
        Duration::from_secs(60),
        |c| {
            let out = c.kubectl(&[
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/name=trellis-control",
                "-o",
                "name",
            ])?;
            Ok(out.trim().is_empty())
        },
    )?;
    for (kind, namespaced) in [
        ("deployment", true),
        ("service", true),
        ("serviceaccount", true),
        ("role", true),
        ("rolebinding", true),
        ("poddisruptionbudget", true),
        ("clusterrole", false),
        ("clusterrolebinding", false),
    ] {
        let mut args = vec![
            "get",
            kind,
            "trellis-control",
            "--ignore-not-found",
            "-o",
            "name",
        ];
        if namespaced {
            args.extend(["-n", NS]);
        }
        let left = cluster.kubectl(&args)?;
        ensure!(left.trim().is_empty(), "helm uninstall left {left}");
    }
    let webhook = cluster.kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "trellis-injector",
        "--ignore-not-found",
        "-o",
        "name",
    ])?;
    ensure!(webhook.trim().is_empty(), "helm uninstall left {webhook}");

    helm_in_cluster(
        &["uninstall", "trellis-crds", "-n", NS, "--wait"],
        CALL_TIMEOUT,
    )?;
    for crd in CRDS {
        let left = cluster.kubectl(&["get", "crd", crd, "--ignore-not-found", "-o", "name"])?;
        ensure!(
            left.trim().is_empty(),
            "helm uninstall trellis-crds left {left}"
        );
    }
    let releases = helm_in_cluster(&["list", "-A", "-q"], CALL_TIMEOUT)?;
    ensure!(releases.trim().is_empty(), "releases left: {releases}");
    Ok(())
}

/// The names of the control-plane pods whose Ready condition is True.
fn ready_control_pods(cluster: &KubeCluster) -> Result<Vec<String>> {
    let out = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/name=trellis-control",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type==\"Ready\")].status} {end}",
    ])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.strip_suffix("=True"))
        .map(str::to_owned)
        .collect())
}
