//! Trellis on a real Kubernetes (issue #16, item 4), each step as a user takes it with
//! the real kubectl, on one cluster (a real kube-apiserver, etcd and
//! kube-controller-manager, and the netns test kubelet):
//!
//! 1. `trellisctl install | kubectl apply -f -`: the 2-replica control plane runs as
//!    pods with its own ServiceAccount token and the shipped RBAC (any `forbidden` in
//!    its logs fails the test);
//! 2. `kubectl label namespace shop trellis.io/inject=enabled`, a server and a client
//!    Deployment and a Job: injected native sidecars, the Job completes, traffic is
//!    mTLS with the expected SPIFFE IDs (certificates proven by a real TokenReview);
//! 3. the policy kinds: schema and CEL rejections by the API server naming the field,
//!    printer columns, `status` written once and by the leader only, a DENY rule
//!    answering 403;
//! 4. the leading control-plane pod is deleted: the other takes the Lease, traffic
//!    keeps flowing, certificates keep renewing;
//! 5. a rolling update of the server under steady traffic loses no request;
//! 6. `trellisctl install | kubectl delete -f -` leaves no Trellis object behind.
//!
//! Trellis does not ship the Gateway API CRDs; the test installs the HTTPRoute CRD of
//! the standard channel from the `sigs.k8s.io/gateway-api` Go module (the module proxy
//! serves it, as it serves the Kubernetes sources), as a user installs it.
//!
//! Needs root, network namespaces and Go (reported as ignored otherwise), and the
//! workspace binaries (`cargo build -p trellisctl -p trellis-control -p trellis-proxy`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use trellis_tests::kube::{KubeCluster, run_cluster_tests};
use trellis_tests::kubelet::Kubelet;
use trellis_tests::{ChildHandle, Pod, TestBed, target_binary, testapp_path};

const SYSTEM: &str = "trellis-system";
const SHOP: &str = "shop";
const TRUST_DOMAIN: &str = "cluster.local";
/// Workload certificates this short renew every 30 s, so a renewal after a failover
/// shows within a test.
const CERT_TTL: &str = "60s";
/// How long pods may take to come up on a busy 2-core machine.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(150);
/// Rolling updates of the server under load.
const ROLLOUTS: usize = 3;
/// How long a policy may take to reach the proxies.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    run_cluster_tests(&[(
        "install_inject_policy_failover_rollout_uninstall",
        install_inject_policy_failover_rollout_uninstall,
    )]);
}

fn install_inject_policy_failover_rollout_uninstall() -> Result<()> {
    let started = Instant::now();
    let mut bed = TestBed::new("kubee2e")?;
    let cluster = KubeCluster::start(&mut bed)?;
    let app = testapp_path()?;
    let proxy = target_binary("trellis-proxy")?;
    let images = [
        ("trellis-control", target_binary("trellis-control")?),
        ("trellis-proxy", proxy.clone()),
        ("trellis-proxy-init", proxy),
        ("trellis-testapp", app.clone()),
    ];
    let kubelet = Kubelet::start(&mut bed, &cluster, &images)?;
    let mut e2e = E2e {
        bed,
        cluster,
        kubelet,
        app,
        timings: Vec::new(),
    };
    let result = e2e.scenarios(started);
    if result.is_err() || std::env::var_os("TRELLIS_SHOW_LOGS").is_some() {
        eprintln!(
            "{}\n{}\n{}",
            e2e.kubelet.logs(),
            e2e.cluster.log_tails(80),
            e2e.bed.logs()
        );
    }
    result?;
    for (phase, took) in &e2e.timings {
        println!("kube_e2e: {phase} took {took:.1?}");
    }
    println!("kube_e2e: whole test {:.1?}", started.elapsed());
    Ok(())
}

struct E2e {
    bed: TestBed,
    cluster: KubeCluster,
    kubelet: Kubelet,
    app: PathBuf,
    timings: Vec<(&'static str, Duration)>,
}

impl E2e {
    fn scenarios(&mut self, started: Instant) -> Result<()> {
        self.timings
            .push(("cluster and kubelet start", started.elapsed()));
        self.phase("1 install", Self::install)?;
        self.phase("2 inject and mTLS", Self::inject_and_mtls)?;
        self.phase("3 policies", Self::policies)?;
        self.phase("3 HTTPRoute", Self::http_route)?;
        self.phase("4 control-plane failover", Self::failover)?;
        self.phase("5 rolling update", Self::rolling_update)?;
        self.no_forbidden_in_control_plane_logs()?;
        self.phase("6 uninstall", Self::uninstall)?;
        Ok(())
    }

    fn phase(&mut self, name: &'static str, f: fn(&mut Self) -> Result<()>) -> Result<()> {
        let start = Instant::now();
        println!("kube_e2e: phase {name}");
        f(self).with_context(|| format!("phase {name}"))?;
        self.timings.push((name, start.elapsed()));
        Ok(())
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.cluster.kubectl(args)
    }

    // ----- 1 -----

    fn install(&mut self) -> Result<()> {
        let manifests = trellisctl(&[
            "install",
            "--control-image=registry.example/trellis-control:e2e",
            "--proxy-image=registry.example/trellis-proxy:e2e",
            "--init-image=registry.example/trellis-proxy-init:e2e",
        ])?;
        // As an operator's kustomize patch would: short workload certificates.
        let arg = "            - --trust-domain=cluster.local\n";
        ensure!(
            manifests.contains(arg),
            "the Deployment's args changed:\n{manifests}"
        );
        let manifests =
            manifests.replace(arg, &format!("{arg}            - --cert-ttl={CERT_TTL}\n"));
        self.cluster.kubectl_apply_stdin(&manifests)?;
        self.wait_deployment(SYSTEM, "trellis-control", 2)?;
        let holder = self.leader()?;
        let pods = self.pod_names(SYSTEM, "app.kubernetes.io/name=trellis-control")?;
        ensure!(
            pods.contains(&holder),
            "Lease holder {holder:?} is not one of {pods:?}"
        );
        // The leader keeps the webhook's caBundle equal to the CA root.
        self.cluster
            .wait_until("the webhook's caBundle is set", PROPAGATION_TIMEOUT, |c| {
                let ca = c.kubectl(&[
                    "get",
                    "mutatingwebhookconfiguration",
                    "trellis-injector",
                    "-o",
                    "jsonpath={.webhooks[0].clientConfig.caBundle}",
                ])?;
                Ok(!ca.trim().is_empty())
            })?;
        // The control plane runs with its own token, as its ServiceAccount.
        let spec = self.kubectl(&[
            "get",
            "pod",
            &holder,
            "-n",
            SYSTEM,
            "-o",
            "jsonpath={.spec.serviceAccountName} {.spec.containers[0].image}",
        ])?;
        ensure!(
            spec == "trellis-control registry.example/trellis-control:e2e",
            "control-plane pod: {spec}"
        );
        self.no_forbidden_in_control_plane_logs()
    }

    // ----- 2 -----

    fn inject_and_mtls(&mut self) -> Result<()> {
        self.kubectl(&["create", "namespace", SHOP])?;
        self.kubectl(&["label", "namespace", SHOP, "trellis.io/inject=enabled"])?;
        self.cluster.kubectl_apply_stdin(APPS)?;
        self.wait_deployment(SHOP, "web", 2)?;
        self.wait_deployment(SHOP, "client", 1)?;
        self.cluster.kubectl_apply_stdin(JOB)?;
        self.wait_job(SHOP, "hello")?;

        // Injected: the proxy as a native sidecar, after the iptables init container.
        for pod in self.pod_names(SHOP, "app in (web, client)")? {
            let inits = self.kubectl(&[
                "get",
                "pod",
                &pod,
                "-n",
                SHOP,
                "-o",
                "jsonpath={range .spec.initContainers[*]}{.name}:{.restartPolicy} {end}",
            ])?;
            ensure!(
                inits.trim() == "trellis-init: trellis-proxy:Always",
                "pod {pod} init containers: {inits}"
            );
        }
        // The Job's requests went client sidecar -> mTLS -> web sidecar, whose
        // verified peer identity the app sees in x-forwarded-client-cert.
        let log = self.container_log(SHOP, "hello-", "hello")?;
        let xfcc = format!(
            "xfcc=By={};URI={}",
            spiffe(SHOP, "web"),
            spiffe(SHOP, "client")
        );
        ensure!(
            log.matches("HTTP 200").count() == 3 && log.matches(&xfcc).count() == 3,
            "job hello log (expected 3 answers with {xfcc}):\n{log}"
        );
        // Each sidecar holds a certificate for its own ServiceAccount, issued by the
        // control plane after a TokenReview of its projected token.
        for (app, sa) in [("web", "web"), ("client", "client")] {
            let pod = self.pod_names(SHOP, &format!("app={app}"))?;
            let certs = self.proxy_certs(SHOP, &pod[0])?;
            ensure!(
                certs.to_string().contains(&spiffe(SHOP, sa)),
                "{app} proxy /certs: {certs}"
            );
        }
        let issued = self.control_plane_logs()?.concat();
        for sa in ["web", "client"] {
            ensure!(
                issued
                    .lines()
                    .any(|l| l.contains("certificate issued") && l.contains(&spiffe(SHOP, sa))),
                "no certificate issued for {sa} in the control-plane logs"
            );
        }
        // Plain text to a meshed server's pod IP, from outside the mesh, is refused.
        let web_ip = self.kubectl(&[
            "get",
            "pods",
            "-n",
            SHOP,
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])?;
        let node = self.cluster.node().clone();
        let out = self.bed.exec(
            &node,
            &self.app.to_string_lossy(),
            &[
                "http-get",
                &format!("http://{web_ip}:8080/hello"),
                "--timeout",
                "5",
            ],
        )?;
        ensure!(
            !String::from_utf8_lossy(&out.stdout).contains("HTTP 200"),
            "plaintext from the node reached the app: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        self.no_forbidden_in_control_plane_logs()
    }

    // ----- 3 -----

    fn policies(&mut self) -> Result<()> {
        // Rejected by the API server's schema and CEL rules, naming the field.
        let rejections = [
            (BAD_ACTION, "spec.action"),
            (BAD_RETRIES, "spec.retries"),
            (BAD_PEER_AUTHN, "portLevelMtls needs a selector"),
        ];
        for (yaml, field) in rejections {
            let err = self
                .cluster
                .kubectl_apply_stdin(yaml)
                .err()
                .with_context(|| format!("accepted:\n{yaml}"))?;
            ensure!(
                format!("{err:#}").contains(field),
                "rejection does not name {field}: {err:#}"
            );
        }

        self.cluster.kubectl_apply_stdin(POLICIES)?;
        for (kind, name) in [
            ("authorizationpolicy", "web-deny-admin"),
            ("trafficpolicy", "web"),
            ("peerauthentication", "strict"),
        ] {
            self.cluster.wait_until(
                &format!("{kind} {name} is Accepted"),
                PROPAGATION_TIMEOUT,
                |c| {
                    let out = c.kubectl(&[
                        "get",
                        kind,
                        name,
                        "-n",
                        SHOP,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}",
                    ])?;
                    Ok(out.trim() == "True")
                },
            )?;
        }
        // Printer columns, through the `trellis` category.
        let table = self.kubectl(&["get", "trellis", "-n", SHOP])?;
        for expected in [
            "ACTION",
            "DENY",
            "TARGET",
            "ALGORITHM",
            "ROUND_ROBIN",
            "MODE",
            "STRICT",
            "ACCEPTED",
            "authorizationpolicy.trellis.io/web-deny-admin",
        ] {
            ensure!(
                table.contains(expected),
                "`kubectl get trellis` lacks {expected}:\n{table}"
            );
        }
        // Written once, by the leader only, for the generation it judged.
        let leader = self.leader()?;
        for (kind, name) in [
            ("AuthorizationPolicy", "web-deny-admin"),
            ("TrafficPolicy", "web"),
            ("PeerAuthentication", "strict"),
        ] {
            let writes = |e: &Self| -> Result<Vec<(String, usize)>> {
                Ok(e.control_plane_logs_by_pod()?
                    .into_iter()
                    .map(|(pod, log)| {
                        let n = log
                            .lines()
                            .filter(|l| {
                                l.contains("status written")
                                    && l.contains(&format!("kind=\"{kind}\""))
                                    && l.contains(&format!(" name={name} "))
                            })
                            .count();
                        (pod, n)
                    })
                    .collect())
            };
            // The condition is visible a moment before the writer logs it.
            self.bed.eventually(
                &format!("the status write of {kind} {name} is logged"),
                Duration::from_secs(10),
                || Ok(writes(self)?.iter().any(|(_, n)| *n > 0)),
            )?;
            let writes = writes(self)?;
            let total: usize = writes.iter().map(|(_, n)| n).sum();
            ensure!(
                total == 1 && writes.iter().any(|(p, n)| *p == leader && *n == 1),
                "{kind} {name}: status writes per pod {writes:?} (leader {leader})"
            );
            let generations = self.kubectl(&[
                "get", &kind.to_ascii_lowercase(), name, "-n", SHOP, "-o",
                "jsonpath={.metadata.generation} {.status.conditions[?(@.type==\"Accepted\")].observedGeneration}",
            ])?;
            let g: Vec<&str> = generations.split_whitespace().collect();
            ensure!(
                g.len() == 2 && g[0] == g[1],
                "{kind} {name}: generation and observedGeneration {generations:?}"
            );
        }

        // The DENY rule takes effect on traffic; other paths still pass.
        let client = self.client_pod()?;
        self.bed.eventually(
            "GET /admin from the client is denied (403)",
            PROPAGATION_TIMEOUT,
            || Ok(self.get_from(&client, "/admin/users")?.contains("HTTP 403")),
        )?;
        let ok = self.get_from(&client, "/hello")?;
        ensure!(ok.contains("HTTP 200"), "GET /hello after the policy: {ok}");
        self.no_forbidden_in_control_plane_logs()
    }

    /// A GAMMA route (parent: the web Service) sends `/v2` to another Service.
    fn http_route(&mut self) -> Result<()> {
        self.cluster
            .kubectl_apply_stdin(&gateway_api_http_route_crd()?)?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/httproutes.gateway.networking.k8s.io",
            "--timeout=50s",
        ])?;
        self.cluster.kubectl_apply_stdin(WEB_V2)?;
        self.wait_deployment(SHOP, "web-v2", 1)?;
        // The Gateway API's own CEL rules, enforced by the API server.
        let err = self
            .cluster
            .kubectl_apply_stdin(BAD_ROUTE)
            .err()
            .context("an HTTPRoute with a port-less Service backend was accepted")?;
        let err = format!("{err:#}");
        ensure!(
            err.contains("spec.rules[0].backendRefs[0]") && err.contains("Must have port"),
            "rejection does not name the backendRef: {err}"
        );
        self.cluster.kubectl_apply_stdin(ROUTE)?;
        let client = self.client_pod()?;
        self.bed.eventually(
            "GET /v2/hello from the client is routed to web-v2",
            PROPAGATION_TIMEOUT,
            || {
                Ok(self
                    .get_from(&client, "/v2/hello")?
                    .contains("v2 GET /v2/hello"))
            },
        )?;
        let other = self.get_from(&client, "/hello")?;
        ensure!(
            other.contains("HTTP 200") && other.contains("path=/hello"),
            "GET /hello no longer reaches web: {other}"
        );
        self.no_forbidden_in_control_plane_logs()
    }

    // ----- 4 -----

    fn failover(&mut self) -> Result<()> {
        let leader = self.leader()?;
        let client = self.client_pod()?;
        let client_name = self.pod_names(SHOP, "app=client")?.remove(0);
        let load = self.start_load(&client, "failover", 50)?;
        self.kubectl(&["delete", "pod", &leader, "-n", SYSTEM, "--wait=false"])?;
        let took = self.cluster.wait_until(
            "another replica takes the Lease",
            Duration::from_secs(60),
            |c| {
                let holder = lease_holder(c)?;
                Ok(!holder.is_empty() && holder != leader)
            },
        )?;
        println!("kube_e2e: Lease taken over {took:.1?} after the leader's pod was deleted");
        self.cluster.wait_until(
            "the old leader's pod is gone",
            Duration::from_secs(60),
            |c| Ok(c.kubectl(&["get", "pod", &leader, "-n", SYSTEM]).is_err()),
        )?;
        // Every certificate from here on comes from the remaining replicas.
        let serial = |e: &Self| -> Result<String> {
            Ok(e.proxy_certs(SHOP, &client_name)?["serial"].to_string())
        };
        let before = serial(self)?;
        self.bed.eventually(
            "the client's sidecar renews its certificate after the failover",
            Duration::from_secs(90),
            || Ok(serial(self)? != before),
        )?;
        self.wait_deployment(SYSTEM, "trellis-control", 2)?;
        self.stop_load(load, "failover")?;
        self.no_forbidden_in_control_plane_logs()
    }

    // ----- 5 -----

    /// Two rollouts in a row, so every request path of a pod going away (pooled
    /// connections, endpoint removal, the app exiting before its sidecar) is crossed
    /// several times.
    fn rolling_update(&mut self) -> Result<()> {
        let client = self.client_pod()?;
        let load = self.start_load(&client, "rollout", 20)?;
        for round in 0..ROLLOUTS {
            let before = self.pod_names(SHOP, "app=web")?;
            self.kubectl(&["rollout", "restart", "deployment/web", "-n", SHOP])?;
            self.wait_deployment(SHOP, "web", 2)?;
            self.cluster.wait_until(
                &format!("rollout {round}: the old web pods are gone"),
                ROLLOUT_TIMEOUT,
                |c| {
                    let now =
                        c.kubectl(&["get", "pods", "-n", SHOP, "-l", "app=web", "-o", "name"])?;
                    Ok(!before.iter().any(|p| now.contains(p.as_str())))
                },
            )?;
        }
        self.stop_load(load, "rollout")
    }

    // ----- 6 -----

    fn uninstall(&mut self) -> Result<()> {
        let manifests = trellisctl(&["install"])?;
        self.cluster.kubectl_stdin(
            &["delete", "-f", "-", "--ignore-not-found", "--wait=false"],
            &manifests,
        )?;
        let kinds = "customresourcedefinitions,mutatingwebhookconfigurations,\
                     validatingwebhookconfigurations,clusterroles,clusterrolebindings,\
                     namespaces,configmaps,leases,secrets,serviceaccounts,roles,rolebindings,\
                     services,deployments,pods";
        let mut left = String::new();
        let waited =
            self.cluster
                .wait_until("no Trellis object is left", Duration::from_secs(120), |c| {
                    let out = c.kubectl(&["get", kinds, "-A", "-o", "name"])?;
                    left = out
                        .lines()
                        // The test kubelet's Node Lease is not Trellis'.
                        .filter(|l| l.contains("trellis") && !l.ends_with("/trellis-node"))
                        .collect::<Vec<_>>()
                        .join("\n");
                    Ok(left.is_empty())
                });
        waited.with_context(|| format!("left behind:\n{left}"))?;
        Ok(())
    }

    // ----- helpers -----

    fn wait_deployment(&self, ns: &str, name: &str, replicas: u32) -> Result<Duration> {
        let want = format!("{replicas} {replicas} {replicas} {replicas}");
        self.cluster.wait_until(
            &format!("deployment {ns}/{name} has {replicas} updated, available pods"),
            ROLLOUT_TIMEOUT,
            |c| {
                let out = c.kubectl(&[
                    "get", "deployment", name, "-n", ns, "-o",
                    "jsonpath={.status.replicas} {.status.updatedReplicas} {.status.readyReplicas} {.status.availableReplicas} {.metadata.generation} {.status.observedGeneration}",
                ])?;
                let fields: Vec<&str> = out.split_whitespace().collect();
                Ok(fields.len() == 6 && fields[..4].join(" ") == want && fields[4] == fields[5])
            },
        )
    }

    fn wait_job(&self, ns: &str, name: &str) -> Result<Duration> {
        self.cluster.wait_until(
            &format!("job {ns}/{name} completes"),
            ROLLOUT_TIMEOUT,
            |c| {
                let out = c.kubectl(&[
                    "get",
                    "job",
                    name,
                    "-n",
                    ns,
                    "-o",
                    "jsonpath={.status.conditions[*].type}",
                ])?;
                if out.contains("Failed") {
                    bail!("job {name} failed: {out}");
                }
                Ok(out.contains("Complete"))
            },
        )
    }

    fn leader(&self) -> Result<String> {
        let holder = lease_holder(&self.cluster)?;
        ensure!(!holder.is_empty(), "the Lease has no holder");
        Ok(holder)
    }

    /// Names of the running (not terminating) pods in `ns` matching `selector`.
    fn pod_names(&self, ns: &str, selector: &str) -> Result<Vec<String>> {
        let out = self.kubectl(&["get", "pods", "-n", ns, "-l", selector, "-o", "json"])?;
        let list: Value = serde_json::from_str(&out).context("pod list JSON")?;
        let names: Vec<String> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter(|p| p["status"]["phase"] == "Running")
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        ensure!(
            !names.is_empty(),
            "no running pod in {ns} matches {selector}"
        );
        Ok(names)
    }

    /// The bed's view of a running pod: its network namespace, from the kubelet log.
    fn bed_pod(&self, ns: &str, name: &str) -> Result<Pod> {
        let span = format!("pod{{pod={ns}/{name}}}");
        let log = self.kubelet.log();
        let line = log
            .lines()
            .rfind(|l| l.contains(&span) && l.contains("pod network ready"))
            .with_context(|| format!("the kubelet never set up {ns}/{name}"))?;
        let field = |key: &str| -> Result<String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
                .with_context(|| format!("no {key} in {line:?}"))
        };
        Ok(Pod {
            name: name.to_owned(),
            netns: field("netns=")?,
            ip: field("ip=")?.parse()?,
            ipv6: None,
        })
    }

    fn client_pod(&self) -> Result<Pod> {
        let name = self.pod_names(SHOP, "app=client")?.remove(0);
        self.bed_pod(SHOP, &name)
    }

    /// `GET path` to the web Service, from inside `client` as its app would (UID 1000,
    /// so the pod's iptables send it through the sidecar).
    fn get_from(&self, client: &Pod, path: &str) -> Result<String> {
        let url = format!("http://web.{SHOP}.svc.cluster.local{path}");
        let out = self.bed.exec_as(
            client,
            Some(1000),
            &self.app.to_string_lossy(),
            &["http-get", &url, "--timeout", "10"],
            Duration::from_secs(15),
        )?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// The sidecar's `/certs` in pod `ns/name`.
    fn proxy_certs(&self, ns: &str, name: &str) -> Result<Value> {
        let pod = self.bed_pod(ns, name)?;
        let page = self.bed.proxy_admin(&pod, "/certs")?;
        let json = page
            .split_once('\n')
            .map(|(_, body)| body)
            .context("empty /certs answer")?;
        serde_json::from_str(json).with_context(|| format!("/certs JSON: {page}"))
    }

    /// Steady GETs from `client` to the web Service until [`E2e::stop_load`].
    fn start_load(&mut self, client: &Pod, name: &str, interval_ms: u32) -> Result<ChildHandle> {
        let stop = self.bed.dir().join(format!("{name}.stop"));
        let url = format!("http://web.{SHOP}.svc.cluster.local/hello");
        let app = self.app.to_string_lossy().into_owned();
        let stop_arg = stop.to_string_lossy().into_owned();
        let interval = interval_ms.to_string();
        let load = self.bed.spawn(
            client,
            Some(1000),
            &app,
            &[
                "http-load",
                &url,
                "--count",
                "20000",
                "--interval-ms",
                &interval,
                "--seconds",
                "300",
                "--stop-file",
                &stop_arg,
            ],
        )?;
        load.wait_for_log("load: started", Duration::from_secs(10))?;
        Ok(load)
    }

    /// Stops the load and fails unless every request was answered 200.
    fn stop_load(&self, load: ChildHandle, name: &str) -> Result<()> {
        std::fs::write(self.bed.dir().join(format!("{name}.stop")), b"")?;
        let summary = load.wait_for_log("load: sent=", Duration::from_secs(30))?;
        let log = load.log();
        let line = log
            .lines()
            .find(|l| l.starts_with("load: sent="))
            .unwrap_or(&summary);
        println!("kube_e2e: {name} traffic: {line}");
        ensure!(
            line.ends_with("failed=0") && !line.contains("sent=0 "),
            "{name}: requests failed:\n{log}"
        );
        Ok(())
    }

    fn container_log(&self, ns: &str, pod_prefix: &str, container: &str) -> Result<String> {
        let pods = self.kubelet.state_dir().join("pods");
        let prefix = format!("{ns}_{pod_prefix}");
        for entry in std::fs::read_dir(&pods)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(&prefix) {
                let log = path.join(format!("{container}.log"));
                return std::fs::read_to_string(&log)
                    .with_context(|| format!("read {}", log.display()));
            }
        }
        bail!("no pod {prefix}* under {}", pods.display())
    }

    /// Every control-plane pod's log (dead ones included), by pod name.
    fn control_plane_logs_by_pod(&self) -> Result<Vec<(String, String)>> {
        let pods = self.kubelet.state_dir().join("pods");
        let mut logs = Vec::new();
        for entry in std::fs::read_dir(&pods)? {
            let path = entry?.path();
            let dir = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(rest) = dir.strip_prefix(&format!("{SYSTEM}_")) {
                let pod = rest.rsplit_once('_').map_or(rest, |(name, _uid)| name);
                let log =
                    std::fs::read_to_string(path.join("trellis-control.log")).unwrap_or_default();
                logs.push((pod.to_owned(), strip_ansi(&log)));
            }
        }
        Ok(logs)
    }

    fn control_plane_logs(&self) -> Result<Vec<String>> {
        Ok(self
            .control_plane_logs_by_pod()?
            .into_iter()
            .map(|(_, log)| log)
            .collect())
    }

    /// The shipped RBAC must cover everything the control plane does.
    fn no_forbidden_in_control_plane_logs(&self) -> Result<()> {
        for (pod, log) in self.control_plane_logs_by_pod()? {
            let denied: Vec<&str> = log
                .lines()
                .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
                .collect();
            ensure!(
                denied.is_empty(),
                "control-plane pod {pod} was refused by RBAC:\n{}",
                denied.join("\n")
            );
        }
        Ok(())
    }
}

fn lease_holder(cluster: &KubeCluster) -> Result<String> {
    Ok(cluster
        .kubectl(&[
            "get",
            "lease",
            "trellis-control",
            "-n",
            SYSTEM,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?
        .trim()
        .to_owned())
}

/// Log text without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// The Gateway API release whose HTTPRoute CRD the test installs.
const GATEWAY_API_MODULE: &str = "sigs.k8s.io/gateway-api@v1.4.0";

/// The standard-channel HTTPRoute CRD, from the Gateway API's Go module (downloaded
/// through the Go module proxy into the module cache, once per machine).
fn gateway_api_http_route_crd() -> Result<String> {
    let out = std::process::Command::new("go")
        .args(["mod", "download", "-json", GATEWAY_API_MODULE])
        .current_dir(std::env::temp_dir())
        .output()
        .context("run go mod download")?;
    ensure!(
        out.status.success(),
        "go mod download {GATEWAY_API_MODULE}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let info: Value = serde_json::from_slice(&out.stdout).context("go mod download JSON")?;
    let dir = info["Dir"]
        .as_str()
        .context("no Dir from go mod download")?;
    let crd =
        PathBuf::from(dir).join("config/crd/standard/gateway.networking.k8s.io_httproutes.yaml");
    std::fs::read_to_string(&crd).with_context(|| format!("read {}", crd.display()))
}

fn trellisctl(args: &[&str]) -> Result<String> {
    let bin = target_binary("trellisctl")?;
    let out = std::process::Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "trellisctl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A server Deployment (two replicas, readiness probe) and a client Deployment, each
/// with its own ServiceAccount.
const APPS: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: { name: web, namespace: shop }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: client, namespace: shop }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  replicas: 2
  selector: { matchLabels: { app: web } }
  strategy:
    rollingUpdate: { maxSurge: 1, maxUnavailable: 0 }
  template:
    metadata: { labels: { app: web } }
    spec:
      serviceAccountName: web
      terminationGracePeriodSeconds: 10
      containers:
        - name: web
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          args: ["http-inspect", "--listen", "0.0.0.0:8080"]
          ports: [{ name: http, containerPort: 8080 }]
          readinessProbe:
            httpGet: { path: /ready, port: http }
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  selector: { app: web }
  ports: [{ name: http, port: 80, targetPort: http }]
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: client, namespace: shop }
spec:
  replicas: 1
  selector: { matchLabels: { app: client } }
  template:
    metadata: { labels: { app: client } }
    spec:
      serviceAccountName: client
      containers:
        - name: client
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          args: ["tcp-echo", "--listen", "127.0.0.1:7000"]
"#;

/// Applied once the server is up (with no ready endpoint the client's sidecar
/// answers 503, as a ClusterIP without endpoints refuses).
const JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: { name: hello, namespace: shop }
spec:
  backoffLimit: 0
  template:
    spec:
      serviceAccountName: client
      restartPolicy: Never
      containers:
        - name: hello
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          args: ["http-get", "http://web.shop.svc.cluster.local/hello", "--count", "3", "--timeout", "30"]
"#;

const POLICIES: &str = r#"
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-deny-admin, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  action: DENY
  rules:
    - to: [{ operation: { paths: ["/admin*"] } }]
---
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: { name: web, namespace: shop }
spec:
  targetRef: { kind: Service, name: web }
  loadBalancer: { algorithm: ROUND_ROBIN }
  timeouts: { request: 10s }
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: { name: strict, namespace: shop }
spec:
  mtls: { mode: STRICT }
"#;

/// A second version of the server, reached only through the route.
const WEB_V2: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: web-v2, namespace: shop }
spec:
  replicas: 1
  selector: { matchLabels: { app: web-v2 } }
  template:
    metadata: { labels: { app: web-v2 } }
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: ghcr.io/trellis-mesh/trellis-testapp:latest
          args: ["http-echo", "--listen", "0.0.0.0:8080", "--name", "v2"]
          ports: [{ name: http, containerPort: 8080 }]
---
apiVersion: v1
kind: Service
metadata: { name: web-v2, namespace: shop }
spec:
  selector: { app: web-v2 }
  ports: [{ name: http, port: 80, targetPort: http }]
"#;

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web-v2, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules:
    - matches: [{ path: { type: PathPrefix, value: /v2 } }]
      backendRefs: [{ name: web-v2, port: 80 }]
    - backendRefs: [{ name: web, port: 80 }]
"#;

const BAD_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: bad-route, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules:
    - backendRefs: [{ name: web-v2 }]
"#;

const BAD_ACTION: &str = r#"
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: bad-action, namespace: shop }
spec:
  action: PERMIT
"#;

const BAD_RETRIES: &str = r#"
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: { name: bad-retries, namespace: shop }
spec:
  targetRef: { kind: Service, name: web }
  retries: { attempts: 2, retryOn: [retriable-status-codes] }
"#;

const BAD_PEER_AUTHN: &str = r#"
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: { name: bad-ports, namespace: shop }
spec:
  mtls: { mode: STRICT }
  portLevelMtls: { "8080": { mode: PERMISSIVE } }
"#;
