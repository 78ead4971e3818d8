//! The test cluster itself: a real etcd, kube-apiserver and kube-controller-manager
//! (built from the pinned Go modules on first use) in a bed's node namespace, driven
//! with the real kubectl. Needs root, network namespaces and Go; elsewhere the test is
//! reported as ignored with a `SKIPPED` line saying why.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use trellis_tests::TestBed;
use trellis_tests::kube::{KubeCluster, run_cluster_tests};

/// Time allowed for a controller to act on a new object.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    run_cluster_tests(&[(
        "api_server_and_controller_manager_work",
        api_server_and_controller_manager_work,
    )]);
}

fn api_server_and_controller_manager_work() -> Result<()> {
    let mut bed = TestBed::new("kube")?;
    let cluster = KubeCluster::start(&mut bed)?;
    if let Some(took) = cluster.build_time() {
        println!(
            "built the test cluster binaries ({}) in {took:.1?}",
            cluster.bin_dir().display()
        );
    }
    let version = cluster.kubectl(&["version", "-o", "json"])?;
    let version: Value = serde_json::from_str(&version).context("kubectl version JSON")?;
    println!(
        "kube-apiserver {}",
        version["serverVersion"]["gitVersion"]
            .as_str()
            .unwrap_or("?")
    );

    // The `kubernetes` Service: the first ClusterIP, endpoints at the advertised address.
    let cluster_ip = cluster.kubectl(&[
        "get",
        "service",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    ensure!(
        cluster_ip == "10.96.0.1",
        "kubernetes ClusterIP: {cluster_ip}"
    );
    let endpoints = cluster.kubectl(&[
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=kubernetes",
        "-o",
        "jsonpath={.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}",
    ])?;
    ensure!(
        endpoints == "10.244.0.1:6443",
        "kubernetes endpoints: {endpoints}"
    );

    // The node's client certificate names the node, as a kubelet's does.
    let whoami = cluster.kubectl_as(
        cluster.kubeconfig_kubelet(),
        &["auth", "whoami", "-o", "json"],
        None,
    )?;
    let whoami: Value = serde_json::from_str(&whoami).context("whoami JSON")?;
    let user = &whoami["status"]["userInfo"];
    ensure!(
        user["username"] == "system:node:trellis-node"
            && user["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|x| x == "system:nodes")),
        "node identity: {whoami}"
    );

    cluster.kubectl(&["create", "namespace", "smoke"])?;
    cluster.kubectl(&["create", "serviceaccount", "app", "-n", "smoke"])?;

    // The root-CA publisher (controller manager) puts the cluster CA in every namespace.
    cluster.wait_until(
        "kube-root-ca.crt appears in smoke",
        CONTROLLER_TIMEOUT,
        |c| {
            Ok(
                c.kubectl(&["get", "configmap", "kube-root-ca.crt", "-n", "smoke"])
                    .is_ok(),
            )
        },
    )?;
    let published = cluster.kubectl(&[
        "get",
        "configmap",
        "kube-root-ca.crt",
        "-n",
        "smoke",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ])?;
    ensure!(
        published.trim() == cluster.ca_pem().trim(),
        "kube-root-ca.crt holds another CA:\n{published}"
    );

    token_request_and_review(&cluster)?;
    custom_resources(&cluster)?;
    deployment_makes_a_pending_pod(&cluster)?;
    Ok(())
}

/// TokenRequest with the Trellis CA's audience, and TokenReview as the CA does it. A
/// token for `trellis-ca` must not work as an API credential, nor pass a review that
/// asks for the API server's own audience.
fn token_request_and_review(cluster: &KubeCluster) -> Result<()> {
    let token = cluster.kubectl(&[
        "create",
        "token",
        "app",
        "-n",
        "smoke",
        "--audience",
        "trellis-ca",
    ])?;
    let token = token.trim();
    ensure!(token.split('.').count() == 3, "not a JWT: {token}");

    let review = token_review(cluster, token, Some("trellis-ca"))?;
    let status = &review["status"];
    ensure!(
        status["authenticated"] == Value::Bool(true),
        "TokenReview: {review}"
    );
    ensure!(
        status["user"]["username"] == "system:serviceaccount:smoke:app",
        "TokenReview user: {review}"
    );
    ensure!(
        status["audiences"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "trellis-ca")),
        "TokenReview audiences: {review}"
    );

    // Asked for the API server's own audience, the same token does not pass.
    let review = token_review(cluster, token, None)?;
    ensure!(
        review["status"]["authenticated"] != Value::Bool(true),
        "a trellis-ca token passed a review for the API audience: {review}"
    );

    // Nor does it authenticate a request; a token for the API server's audience does.
    let as_ca_token = cluster.dir().join("trellis-ca-token.kubeconfig");
    cluster.write_token_kubeconfig(&as_ca_token, token)?;
    let err = cluster
        .kubectl_as(&as_ca_token, &["get", "--raw", "/api"], None)
        .err()
        .context("a trellis-ca token was accepted as an API credential")?;
    ensure!(
        format!("{err:#}").contains("Unauthorized"),
        "expected 401 Unauthorized, got: {err:#}"
    );
    let api_token = cluster.kubectl(&["create", "token", "app", "-n", "smoke"])?;
    let as_api_token = cluster.dir().join("api-token.kubeconfig");
    cluster.write_token_kubeconfig(&as_api_token, api_token.trim())?;
    cluster.kubectl_as(&as_api_token, &["get", "--raw", "/api"], None)?;
    Ok(())
}

fn token_review(cluster: &KubeCluster, token: &str, audience: Option<&str>) -> Result<Value> {
    let mut spec = serde_json::json!({ "token": token });
    if let Some(aud) = audience {
        spec["audiences"] = serde_json::json!([aud]);
    }
    let review = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": spec,
    });
    let out = cluster.kubectl_stdin(&["create", "-f", "-", "-o", "json"], &review.to_string())?;
    serde_json::from_str(&out).context("TokenReview JSON")
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.trellis.test
spec:
  group: smoke.trellis.test
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
"#;

fn custom_resources(cluster: &KubeCluster) -> Result<()> {
    cluster.kubectl_apply_stdin(WIDGET_CRD)?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.smoke.trellis.test",
        "--timeout=60s",
    ])?;
    let widget = |size: i64| {
        format!(
            "apiVersion: smoke.trellis.test/v1\nkind: Widget\n\
             metadata: {{name: w1, namespace: smoke}}\nspec: {{size: {size}}}\n"
        )
    };
    // The schema is enforced by the real API server, naming the field.
    let err = cluster
        .kubectl_apply_stdin(&widget(0))
        .err()
        .context("a Widget with size 0 was accepted")?;
    ensure!(
        format!("{err:#}").contains("spec.size"),
        "rejection does not name spec.size: {err:#}"
    );
    cluster.kubectl_apply_stdin(&widget(3))?;
    let listed = cluster.kubectl(&["get", "widgets", "-n", "smoke", "-o", "name"])?;
    ensure!(
        listed.trim() == "widget.smoke.trellis.test/w1",
        "kubectl get widgets: {listed}"
    );
    Ok(())
}

const WEB_DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: smoke}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: app
      containers:
      - name: web
        image: trellis-testapp
"#;

/// The deployment and replicaset controllers run: a Deployment gets a ReplicaSet and
/// that a Pod, which stays Pending (no kubelet or scheduler here).
fn deployment_makes_a_pending_pod(cluster: &KubeCluster) -> Result<()> {
    cluster.kubectl_apply_stdin(WEB_DEPLOYMENT)?;
    let pods = |c: &KubeCluster| -> Result<Value> {
        let out = c.kubectl(&["get", "pods", "-n", "smoke", "-l", "app=web", "-o", "json"])?;
        serde_json::from_str(&out).context("pod list JSON")
    };
    cluster.wait_until("the Deployment's Pod exists", CONTROLLER_TIMEOUT, |c| {
        Ok(pods(c)?["items"].as_array().is_some_and(|a| a.len() == 1))
    })?;
    let replica_sets = cluster.kubectl(&["get", "replicasets", "-n", "smoke", "-o", "json"])?;
    let replica_sets: Value = serde_json::from_str(&replica_sets)?;
    let owner = &replica_sets["items"][0]["metadata"]["ownerReferences"][0];
    ensure!(
        owner["kind"] == "Deployment" && owner["name"] == "web",
        "ReplicaSet not owned by the Deployment: {replica_sets}"
    );
    let pods = pods(cluster)?;
    let pod = &pods["items"][0];
    ensure!(
        pod["status"]["phase"] == "Pending" && pod["spec"]["nodeName"].is_null(),
        "expected an unscheduled Pending pod: {pod}"
    );
    ensure!(
        pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet",
        "Pod not owned by a ReplicaSet: {pod}"
    );
    Ok(())
}
