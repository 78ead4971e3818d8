//! The test kubelet against a real API server: a Deployment with a readiness probe
//! becomes Available, the real EndpointSlice controller publishes its pods, a Job's pod
//! reaches the Service by name through the kubelet's kube-proxy DNAT and completes, an
//! in-cluster client authenticates to the API server through the `kubernetes` Service
//! with its projected, Pod-bound token, and deleting the Deployment removes its pods'
//! namespaces. Needs root, network namespaces and Go (reported as ignored otherwise).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use trellis_tests::kube::{KubeCluster, run_cluster_tests};
use trellis_tests::kubelet::Kubelet;
use trellis_tests::{TestBed, netns, target_binary, testapp_path};

const NS: &str = "shop";

fn main() {
    run_cluster_tests(&[
        (
            "deployment_service_job_and_in_cluster_client_on_the_netns_kubelet",
            deployment_service_job_and_in_cluster_client_on_the_netns_kubelet,
        ),
        (
            "init_containers_native_sidecar_users_and_restarts",
            init_containers_native_sidecar_users_and_restarts,
        ),
    ]);
}

const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: { app: web }
  template:
    metadata:
      labels: { app: web }
    spec:
      terminationGracePeriodSeconds: 5
      containers:
        - name: web
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          args: ["http-echo", "--listen", "0.0.0.0:8080", "--name", "$(POD_NAME)"]
          env:
            - name: POD_NAME
              valueFrom: { fieldRef: { fieldPath: metadata.name } }
          ports:
            - { name: http, containerPort: 8080 }
          readinessProbe:
            httpGet: { path: /ready, port: http }
            periodSeconds: 1
          livenessProbe:
            tcpSocket: { port: 8080 }
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: { app: web }
  ports:
    - { name: http, port: 80, targetPort: http }
"#;

const CLIENTS: &str = r#"
apiVersion: batch/v1
kind: Job
metadata:
  name: client
  namespace: shop
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: client
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          args: ["http-get", "http://web.shop.svc.cluster.local/hello", "--count", "4"]
---
apiVersion: v1
kind: Pod
metadata:
  name: api-client
  namespace: shop
spec:
  restartPolicy: Never
  containers:
    - name: curl
      image: curlimages/curl
      command: ["sh", "-c"]
      args:
        - >-
          SA=/var/run/secrets/kubernetes.io/serviceaccount;
          curl -sS --max-time 10 --cacert $SA/ca.crt -H "Authorization: Bearer $(cat $SA/token)"
          https://kubernetes.default.svc/api/v1/namespaces/$(cat $SA/namespace)/pods
"#;

fn deployment_service_job_and_in_cluster_client_on_the_netns_kubelet() -> Result<()> {
    let started = Instant::now();
    let mut bed = TestBed::new("kubepods")?;
    let cluster = KubeCluster::start(&mut bed)?;
    let cluster_up = started.elapsed();
    let kubelet = Kubelet::start(&mut bed, &cluster, &[("trellis-testapp", testapp_path()?)])?;
    let result = scenario(&bed, &cluster, &kubelet);
    if result.is_err() || std::env::var_os("TRELLIS_SHOW_LOGS").is_some() {
        eprintln!("{}\n{}", kubelet.logs(), cluster.logs());
    }
    result?;
    let total = started.elapsed();
    println!("kube_pods: cluster up in {cluster_up:?}, whole test {total:?}");
    Ok(())
}

fn scenario(bed: &TestBed, cluster: &KubeCluster, kubelet: &Kubelet) -> Result<()> {
    let node = cluster.kubectl(&[
        "get",
        "node",
        kubelet.node_name(),
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ])?;
    ensure!(node.trim() == "True", "node not Ready: {node}");

    cluster.kubectl_apply_stdin(APPS)?;
    // `kubectl wait` on a namespace just created may race its informer; bounded retry.
    cluster.wait_until(
        "deployment web is Available",
        Duration::from_secs(90),
        |c| {
            let out = c.kubectl(&[
                "get",
                "deployment",
                "web",
                "-n",
                NS,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
            ])?;
            Ok(out.trim() == "True")
        },
    )?;
    let ips = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ])?;
    let mut pod_ips: Vec<&str> = ips.split_whitespace().collect();
    pod_ips.sort_unstable();
    ensure!(pod_ips.len() == 2, "expected 2 web pod IPs, got {ips:?}");
    for ip in &pod_ips {
        ensure!(
            ip.starts_with("10.244.")
                && ip
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|a| a.octets()[2] >= 128),
            "pod IP {ip} outside 10.244.128.0/17"
        );
    }
    cluster.wait_until("the EndpointSlice lists both web pods as ready", Duration::from_secs(30), |c| {
        let out = c.kubectl(&["get", "endpointslices", "-n", NS, "-l", "kubernetes.io/service-name=web", "-o", "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]} {end}"])?;
        let mut listed: Vec<&str> = out.split_whitespace().collect();
        listed.sort_unstable();
        Ok(listed == pod_ips)
    })?;

    cluster.kubectl_apply_stdin(CLIENTS)?;
    cluster.wait_until("job client completes", Duration::from_secs(60), |c| {
        let out = c.kubectl(&[
            "get",
            "job",
            "client",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.conditions[*].type}",
        ])?;
        if out.contains("Failed") {
            bail!("job client failed: {out}");
        }
        Ok(out.contains("Complete"))
    })?;
    let client_log = container_log(kubelet, "client-", "client")?;
    ensure!(
        client_log.matches("HTTP 200").count() == 4,
        "client log:\n{client_log}"
    );
    ensure!(
        client_log.contains("GET /hello") && client_log.contains("web-"),
        "client log:\n{client_log}"
    );

    cluster.wait_until("pod api-client finishes", Duration::from_secs(60), |c| {
        let out = c.kubectl(&[
            "get",
            "pod",
            "api-client",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.phase}",
        ])?;
        Ok(out == "Succeeded" || out == "Failed")
    })?;
    let api_log = container_log(kubelet, "api-client", "curl")?;
    // Authenticated as the pod's service account (which may not list pods): the API
    // server answered through 10.96.0.1, with the CA and token from kube-api-access.
    ensure!(
        api_log.contains("system:serviceaccount:shop:default")
            || api_log.contains("\"kind\": \"PodList\""),
        "api-client log:\n{api_log}"
    );
    let claims = token_claims(kubelet, "api-client")?;
    ensure!(
        claims["kubernetes.io"]["pod"]["name"] == "api-client"
            && claims["kubernetes.io"]["serviceaccount"]["name"] == "default",
        "token is not bound to the pod: {claims}"
    );

    cluster.kubectl(&["delete", "deployment", "web", "-n", NS, "--wait=true"])?;
    cluster.wait_until("web pods are gone", Duration::from_secs(60), |c| {
        let out = c.kubectl(&["get", "pods", "-n", NS, "-l", "app=web", "-o", "name"])?;
        Ok(out.trim().is_empty())
    })?;
    // The Job's and api-client's pods finished (their namespaces went then); the web
    // pods' went with them: none of the kubelet's namespaces is left.
    let prefix = format!("{}-k", bed.id());
    cluster.wait_until(
        "every pod namespace is removed",
        Duration::from_secs(30),
        |_| Ok(!netns::list()?.iter().any(|n| n.starts_with(&prefix))),
    )?;
    Ok(())
}

/// The log of `container` in the pod whose name starts with `pod_prefix`.
fn container_log(kubelet: &Kubelet, pod_prefix: &str, container: &str) -> Result<String> {
    let dir = pod_dir(kubelet, pod_prefix)?;
    let path = dir.join(format!("{container}.log"));
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

fn pod_dir(kubelet: &Kubelet, pod_prefix: &str) -> Result<std::path::PathBuf> {
    let pods = kubelet.state_dir().join("pods");
    for entry in std::fs::read_dir(&pods)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&format!("{NS}_{pod_prefix}")) {
            return Ok(path);
        }
    }
    bail!("no pod {pod_prefix}* under {}", pods.display())
}

/// The claims of the kube-api-access token the kubelet wrote for pod `pod`.
fn token_claims(kubelet: &Kubelet, pod: &str) -> Result<serde_json::Value> {
    let volumes = pod_dir(kubelet, pod)?.join("volumes");
    let token = find_token(&volumes)?;
    let payload = token.split('.').nth(1).context("token is not a JWT")?;
    let json =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))?;
    Ok(serde_json::from_slice(&json)?)
}

fn find_token(volumes: &Path) -> Result<String> {
    for entry in
        std::fs::read_dir(volumes).with_context(|| format!("read {}", volumes.display()))?
    {
        let path = entry?.path().join("token");
        if path.is_file() {
            return Ok(std::fs::read_to_string(path)?.trim().to_string());
        }
    }
    bail!("no token volume under {}", volumes.display())
}

/// `{APP_DIR}` is replaced by the folder of `trellis-testapp`, so `sh` finds it on PATH.
const ORDERED: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: batch/v1
kind: Job
metadata:
  name: ordered
  namespace: shop
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      volumes:
        - name: work
          emptyDir: {}
      initContainers:
        - name: setup
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          command: ["sh", "-c", "echo setup-uid=$(id -u) > /data/work/setup"]
          securityContext: { runAsUser: 1000 }
          volumeMounts: [{ name: work, mountPath: /data/work }]
        - name: side
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          restartPolicy: Always
          args: ["tcp-echo", "--listen", "0.0.0.0:7000", "--name", "side"]
          securityContext: { runAsUser: 1337, runAsGroup: 1337 }
          startupProbe:
            tcpSocket: { port: 7000 }
            periodSeconds: 1
      containers:
        - name: main
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          command: ["sh", "-c"]
          args:
            - cat /data/work/setup; echo main-ids=$(id -u):$(id -g):$(id -G); exec trellis-testapp tcp-send 127.0.0.1:7000 ping
          env:
            - { name: PATH, value: "{APP_DIR}:/usr/bin:/bin" }
          securityContext: { runAsUser: 2000, runAsGroup: 3000 }
          volumeMounts: [{ name: work, mountPath: /data/work }]
---
apiVersion: v1
kind: Pod
metadata:
  name: flaky
  namespace: shop
spec:
  restartPolicy: OnFailure
  volumes:
    - name: work
      emptyDir: {}
  containers:
    - name: flaky
      image: busybox
      command: ["sh", "-c", "if [ -e /mnt/work/once ]; then echo second-run; exit 0; fi; touch /mnt/work/once; echo first-run; exit 3"]
      volumeMounts: [{ name: work, mountPath: /mnt/work }]
---
apiVersion: v1
kind: Pod
metadata:
  name: liveness
  namespace: shop
spec:
  terminationGracePeriodSeconds: 2
  containers:
    - name: echo
      image: ghcr.io/trellis-mesh/trellis-testapp:latest
      args: ["tcp-echo", "--listen", "0.0.0.0:7000"]
      livenessProbe:
        tcpSocket: { port: 7001 }
        periodSeconds: 1
        failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata:
  name: meshinit
  namespace: shop
spec:
  restartPolicy: Never
  volumes:
    - name: trellis-run
      emptyDir: { medium: Memory }
  initContainers:
    - name: trellis-init
      image: ghcr.io/trellis-mesh/trellis-proxy-init:latest
      args: ["init", "--proxy-uid", "1337"]
      securityContext: { runAsUser: 0, runAsGroup: 0 }
      volumeMounts: [{ name: trellis-run, mountPath: /run }]
  containers:
    - name: rules
      image: debian
      command: ["iptables-save", "-t", "nat"]
"#;

fn init_containers_native_sidecar_users_and_restarts() -> Result<()> {
    let mut bed = TestBed::new("kubeinit")?;
    let cluster = KubeCluster::start(&mut bed)?;
    let app = testapp_path()?;
    let app_dir = app
        .parent()
        .context("testapp has no folder")?
        .display()
        .to_string();
    let proxy = target_binary("trellis-proxy")?;
    let images = [
        ("trellis-testapp", app.clone()),
        ("trellis-proxy-init", proxy.clone()),
        ("trellis-proxy", proxy),
    ];
    let kubelet = Kubelet::start(&mut bed, &cluster, &images)?;
    let result = ordered_scenario(&cluster, &kubelet, &ORDERED.replace("{APP_DIR}", &app_dir));
    if result.is_err() || std::env::var_os("TRELLIS_SHOW_LOGS").is_some() {
        eprintln!("{}\n{}", kubelet.logs(), cluster.logs());
    }
    result
}

fn ordered_scenario(cluster: &KubeCluster, kubelet: &Kubelet, manifest: &str) -> Result<()> {
    cluster.kubectl_apply_stdin(manifest)?;
    cluster.wait_until("job ordered completes", Duration::from_secs(60), |c| {
        let out = c.kubectl(&[
            "get",
            "job",
            "ordered",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.conditions[*].type}",
        ])?;
        if out.contains("Failed") {
            bail!("job ordered failed: {out}");
        }
        Ok(out.contains("Complete"))
    })?;
    // The sidecar answered, so it was started (startup probe) before `main`; each
    // container ran as its securityContext says; the emptyDir was shared.
    let main = container_log(kubelet, "ordered-", "main")?;
    ensure!(main.contains("setup-uid=1000"), "main log:\n{main}");
    ensure!(
        main.contains("main-ids=2000:3000:3000"),
        "main log:\n{main}"
    );
    ensure!(main.contains("side: ping"), "main log:\n{main}");
    // The Job completed although the sidecar never exits by itself: it was stopped.
    let side_state = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "job-name=ordered",
        "-o",
        "jsonpath={.items[0].status.initContainerStatuses[?(@.name==\"side\")].state}",
    ])?;
    ensure!(
        side_state.contains("terminated"),
        "sidecar state: {side_state}"
    );

    cluster.wait_until(
        "pod flaky succeeds after a restart",
        Duration::from_secs(60),
        |c| {
            let out = c.kubectl(&[
                "get",
                "pod",
                "flaky",
                "-n",
                NS,
                "-o",
                "jsonpath={.status.phase}",
            ])?;
            if out == "Failed" {
                bail!("pod flaky failed");
            }
            Ok(out == "Succeeded")
        },
    )?;
    let restarts = cluster.kubectl(&[
        "get",
        "pod",
        "flaky",
        "-n",
        NS,
        "-o",
        "jsonpath={.status.containerStatuses[0].restartCount}",
    ])?;
    ensure!(restarts.trim() == "1", "restartCount {restarts}");
    let flaky = container_log(kubelet, "flaky", "flaky")?;
    ensure!(
        flaky.contains("first-run") && flaky.contains("second-run"),
        "flaky log:\n{flaky}"
    );

    // A failing liveness probe gets the container killed (SIGTERM) and restarted.
    cluster.wait_until("pod liveness is restarted by its probe", Duration::from_secs(60), |c| {
        let out = c.kubectl(&["get", "pod", "liveness", "-n", NS, "-o", "jsonpath={.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].lastState.terminated.exitCode}"])?;
        Ok(out.split_whitespace().nth(1) == Some("143"))
    })?;

    // The injected init container's image runs `trellis-proxy init` for real in the
    // pod's namespace; its OUTPUT hook comes before the kube-proxy chain's, so a meshed
    // pod's connections to a ClusterIP reach the sidecar before any DNAT.
    cluster.wait_until("pod meshinit finishes", Duration::from_secs(60), |c| {
        let out = c.kubectl(&[
            "get",
            "pod",
            "meshinit",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.phase}",
        ])?;
        Ok(out == "Succeeded" || out == "Failed")
    })?;
    let rules = container_log(kubelet, "meshinit", "rules")?;
    let position = |rule: &str| rules.lines().position(|l| l == rule);
    let trellis_hook = position("-A OUTPUT -p tcp -j TRELLIS_OUTPUT");
    let kube_hook = position("-A OUTPUT -j KUBE-SERVICES");
    ensure!(
        matches!((trellis_hook, kube_hook), (Some(t), Some(k)) if t < k),
        "OUTPUT hooks out of order:\n{rules}"
    );
    Ok(())
}
