//! The webhook on recorded AdmissionReviews: the patch is applied with `json-patch`
//! to the object the API server sent, and the result inspected.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::*;

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/injector")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn settings() -> InjectorSettings {
    InjectorSettings {
        proxy_image: "ghcr.io/trellis-mesh/trellis-proxy:0.1.0".into(),
        init_image: "ghcr.io/trellis-mesh/trellis-proxy-init:0.1.0".into(),
        ..InjectorSettings::default()
    }
}

fn enabled() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/metadata.name".into(), "shop".into()),
        ("trellis.io/inject".into(), "enabled".into()),
    ])
}

/// The response, and the object with its patch applied (None: no patch).
fn run(review_json: &Value, labels: Option<&BTreeMap<String, String>>) -> (Value, Option<Value>) {
    let answer = review(review_json.clone(), labels, &settings());
    let response = answer["response"].clone();
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], review_json["request"]["uid"]);
    let patched = response.get("patch").filter(|p| !p.is_null()).map(|p| {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p.as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut object = review_json["request"]["object"].clone();
        json_patch::patch(&mut object, &patch).expect("the patch applies cleanly");
        object
    });
    (response, patched)
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list:#}"))
}

#[test]
fn a_pod_in_an_enabled_namespace_gets_the_native_sidecar_and_init_container() {
    let (response, pod) = run(&fixture("review-deployment-pod.json"), Some(&enabled()));
    assert_eq!(response["allowed"], true);
    let pod = pod.expect("a patch");
    // Still a valid Pod for the Kubernetes types.
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    let spec = typed.spec.unwrap();

    let inits: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(inits, ["trellis-init", "trellis-proxy"]);

    let init = &pod["spec"]["initContainers"][0];
    // Its own image: iptables is not in the distroless sidecar image.
    assert_eq!(
        init["image"],
        "ghcr.io/trellis-mesh/trellis-proxy-init:0.1.0"
    );
    assert_eq!(init["args"][0], "init");
    assert_eq!(
        init["securityContext"]["capabilities"],
        json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
    );
    assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(init["securityContext"]["privileged"], false);

    let proxy = &pod["spec"]["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["image"], "ghcr.io/trellis-mesh/trellis-proxy:0.1.0");
    assert_eq!(proxy["args"][0], "run");
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        proxy["resources"]["requests"],
        json!({"cpu": "50m", "memory": "64Mi"})
    );
    assert_eq!(
        proxy["resources"]["limits"],
        json!({"cpu": "1", "memory": "256Mi"})
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(proxy[probe]["httpGet"]["port"], 15020, "{probe}");
    }
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let token_file = args
        .iter()
        .position(|a| *a == "--service-account-token-file")
        .unwrap();
    assert_eq!(
        args[token_file + 1],
        "/var/run/secrets/trellis/tokens/trellis-ca-token"
    );

    // The projected token for the CA, and the root through the downward API.
    let volumes = &pod["spec"]["volumes"];
    assert_eq!(
        volumes[0]["name"], "kube-api-access-x7k2p",
        "existing volumes stay"
    );
    let token = container(volumes, "trellis-token");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "trellis-ca", "expirationSeconds": 43200, "path": "trellis-ca-token"})
    );
    let root = container(volumes, "trellis-ca-root");
    assert_eq!(
        root["configMap"],
        json!({"name": "trellis-ca-root"}),
        "the root comes from the ConfigMap the control plane keeps"
    );
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["trellis.io/status"], "injected");
    assert!(
        annotations.get("trellis.io/ca-root").is_none(),
        "no root pasted into the Pod"
    );
    assert_eq!(
        annotations["kubectl.kubernetes.io/restartedAt"],
        "2025-05-01T10:00:00Z"
    );

    // The app's HTTP probes go through the proxy; the originals travel to it.
    let web = &pod["spec"]["containers"][0];
    assert_eq!(
        web["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/web/readyz", "port": 15020, "scheme": "HTTP"})
    );
    assert_eq!(web["readinessProbe"]["periodSeconds"], 5, "timing is kept");
    assert_eq!(
        web["livenessProbe"]["httpGet"]["path"],
        "/app-health/web/livez"
    );
    assert_eq!(
        web["livenessProbe"]["httpGet"]["httpHeaders"],
        json!([{"name": "X-Probe", "value": "kubelet"}])
    );
    let env = container(&proxy["env"], "TRELLIS_APP_PROBES");
    let probes: Value = serde_json::from_str(env["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        probes["/app-health/web/readyz"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 8080, "scheme": "HTTP"}),
        "the named port is resolved"
    );
    assert_eq!(
        probes["/app-health/web/livez"]["httpGet"]["path"],
        "/healthz/live"
    );
}

#[test]
fn an_opted_out_pod_is_untouched() {
    let (response, patched) = run(&fixture("review-opted-out-pod.json"), Some(&enabled()));
    assert_eq!(response["allowed"], true);
    assert!(patched.is_none(), "{response:#}");
}

#[test]
fn a_pod_in_an_unlabelled_namespace_is_untouched() {
    let labels = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "shop".to_owned())]);
    let (response, patched) = run(&fixture("review-deployment-pod.json"), Some(&labels));
    assert_eq!(response["allowed"], true);
    assert!(patched.is_none());
    let disabled = BTreeMap::from([("trellis.io/inject".to_owned(), "disabled".to_owned())]);
    let (_, patched) = run(&fixture("review-deployment-pod.json"), Some(&disabled));
    assert!(patched.is_none());
}

#[test]
fn injecting_twice_changes_nothing() {
    let mut review_json = fixture("review-deployment-pod.json");
    let (_, once) = run(&review_json, Some(&enabled()));
    review_json["request"]["object"] = once.unwrap();
    let (response, twice) = run(&review_json, Some(&enabled()));
    assert_eq!(response["allowed"], true);
    assert!(twice.is_none(), "a second patch: {response:#}");

    // The same when only the container is there (injected by an older version).
    let mut review_json = fixture("review-deployment-pod.json");
    review_json["request"]["object"]["spec"]["initContainers"] =
        json!([{"name": "trellis-proxy", "image": "x"}]);
    let (_, patched) = run(&review_json, Some(&enabled()));
    assert!(patched.is_none());
}

#[test]
fn a_job_pod_keeps_its_init_containers_after_the_mesh_ones() {
    let labels = BTreeMap::from([("trellis.io/inject".to_owned(), "enabled".to_owned())]);
    let (_, pod) = run(&fixture("review-job-pod.json"), Some(&labels));
    let pod = pod.unwrap();
    let names: Vec<_> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    // The app's own init container already runs with the proxy up.
    assert_eq!(names, ["trellis-init", "trellis-proxy", "fetch"]);
    let volumes: Vec<_> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        volumes,
        ["work", "trellis-token", "trellis-ca-root", "trellis-run"]
    );
    assert!(pod["spec"]["containers"][0].get("readinessProbe").is_none());
    assert!(
        container(
            &pod["spec"]["initContainers"][1]["env"],
            "TRELLIS_NAMESPACE"
        )["value"]
            .is_null(),
        "no app probes to carry"
    );
    assert!(
        pod["spec"]["initContainers"][1]["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "TRELLIS_APP_PROBES")
    );
}

#[test]
fn an_unknown_namespace_trusts_the_webhook_selector() {
    let (_, patched) = run(&fixture("review-deployment-pod.json"), None);
    assert!(patched.is_some());
}

#[test]
fn host_network_pods_updates_and_other_kinds_are_left_alone() {
    let mut host = fixture("review-deployment-pod.json");
    host["request"]["object"]["spec"]["hostNetwork"] = json!(true);
    assert!(run(&host, Some(&enabled())).1.is_none());

    let mut update = fixture("review-deployment-pod.json");
    update["request"]["operation"] = json!("UPDATE");
    assert!(run(&update, Some(&enabled())).1.is_none());

    let mut deployment = fixture("review-deployment-pod.json");
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    assert!(run(&deployment, Some(&enabled())).1.is_none());
}

#[test]
fn prometheus_is_pointed_at_the_proxy_unless_the_pod_says_otherwise() {
    let (_, pod) = run(&fixture("review-deployment-pod.json"), Some(&enabled()));
    let annotations = &pod.unwrap()["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(
        annotations::PROMETHEUS_SCRAPE[1].1,
        sidecar::HEALTH_PORT.to_string(),
        "the annotation names the health port, where the proxy serves /metrics"
    );

    // A Pod that points Prometheus at its app gets the proxy's annotations, and its
    // own go to the proxy, which serves the app's metrics with its own (merging).
    let mut review_json = fixture("review-deployment-pod.json");
    let own = &mut review_json["request"]["object"]["metadata"]["annotations"];
    own["prometheus.io/port"] = json!("9102");
    own["prometheus.io/path"] = json!("/stats");
    let (_, pod) = run(&review_json, Some(&enabled()));
    let pod = pod.unwrap();
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(annotations["trellis.io/status"], "injected");
    let proxy = container(&pod["spec"]["initContainers"], "trellis-proxy");
    let saved = container(&proxy["env"], "TRELLIS_APP_METRICS");
    assert_eq!(
        serde_json::from_str::<Value>(saved["value"].as_str().unwrap()).unwrap(),
        json!({"prometheus.io/port": "9102", "prometheus.io/path": "/stats"})
    );

    // Opted out, scraping turned off, or over https: the Pod's annotations stay as
    // they were and nothing is merged.
    for (key, value) in [
        ("trellis.io/merge-metrics", "false"),
        ("prometheus.io/scrape", "false"),
        ("prometheus.io/scheme", "https"),
    ] {
        let mut review_json = fixture("review-deployment-pod.json");
        let own = &mut review_json["request"]["object"]["metadata"]["annotations"];
        own["prometheus.io/port"] = json!("9102");
        own[key] = json!(value);
        let (_, pod) = run(&review_json, Some(&enabled()));
        let pod = pod.unwrap();
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"], "9102", "{key}");
        assert_eq!(annotations["trellis.io/status"], "injected");
        let proxy = container(&pod["spec"]["initContainers"], "trellis-proxy");
        assert!(
            !proxy["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "TRELLIS_APP_METRICS"),
            "{key}: merged anyway"
        );
    }

    // A Pod without any annotations gets them in the map the patch creates.
    let mut bare = fixture("review-deployment-pod.json");
    bare["request"]["object"]["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let (_, pod) = run(&bare, Some(&enabled()));
    let annotations = &pod.unwrap()["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["trellis.io/status"], "injected");
}

#[test]
fn annotations_tune_the_proxy() {
    let mut review_json = fixture("review-deployment-pod.json");
    let annotations = &mut review_json["request"]["object"]["metadata"]["annotations"];
    annotations["trellis.io/proxy-memory-limit"] = json!("512Mi");
    annotations["trellis.io/exclude-outbound-ports"] = json!("5432,6379");
    let (_, pod) = run(&review_json, Some(&enabled()));
    let pod = pod.unwrap();
    assert_eq!(
        pod["spec"]["initContainers"][1]["resources"]["limits"]["memory"],
        "512Mi"
    );
    let args = &pod["spec"]["initContainers"][0]["args"];
    assert_eq!(
        args,
        &json!([
            "init",
            "--proxy-uid",
            "1337",
            "--exclude-outbound-ports",
            "5432,6379"
        ])
    );
}

#[test]
fn a_pod_that_cannot_be_read_follows_the_failure_policy() {
    let mut broken = fixture("review-deployment-pod.json");
    broken["request"]["object"]["spec"]["containers"] = json!("not a list");
    let fail = settings();
    assert_eq!(
        fail.failure_policy,
        FailurePolicy::Fail,
        "fail closed by default"
    );
    let mut ignore = settings();
    ignore.failure_policy = FailurePolicy::Ignore;
    let answer = review(broken.clone(), Some(&enabled()), &fail);
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["uid"], broken["request"]["uid"]);

    let answer = review(broken, Some(&enabled()), &ignore);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not injected")
    );

    let answer = review(json!({"kind": "nonsense"}), None, &ignore);
    assert_eq!(answer["response"]["allowed"], true);
    let answer = review(json!({"kind": "nonsense"}), None, &fail);
    assert_eq!(answer["response"]["allowed"], false);
}

/// Every probe kind but exec goes through the proxy, keeping its timing; the
/// proxy learns the scheme, the service and the timeout.
#[test]
fn https_tcp_and_grpc_probes_are_rewritten_with_scheme_and_timeout() {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"containers": [{
            "name": "api", "image": "api:1",
            "ports": [{"name": "grpc", "containerPort": 9090}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8443, "scheme": "HTTPS"},
                               "timeoutSeconds": 3, "periodSeconds": 7},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
            "startupProbe": {"grpc": {"port": 9090, "service": "shop.Api"}, "failureThreshold": 30}
        }, {
            "name": "worker", "image": "worker:1",
            "livenessProbe": {"exec": {"command": ["true"]}}
        }]}
    });
    let patch = pod_patch(&pod, "", &settings()).unwrap().unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    let api = &pod["spec"]["containers"][0];
    for (field, path) in [
        ("readinessProbe", "/app-health/api/readyz"),
        ("livenessProbe", "/app-health/api/livez"),
        ("startupProbe", "/app-health/api/startupz"),
    ] {
        let probe = &api[field];
        assert_eq!(
            probe["httpGet"],
            json!({"path": path, "port": 15020, "scheme": "HTTP"}),
            "{field}"
        );
        assert!(probe.get("tcpSocket").is_none() && probe.get("grpc").is_none());
    }
    assert_eq!(api["readinessProbe"]["periodSeconds"], 7);
    assert_eq!(api["readinessProbe"]["timeoutSeconds"], 3);
    assert_eq!(api["startupProbe"]["failureThreshold"], 30);
    assert_eq!(
        pod["spec"]["containers"][1]["livenessProbe"],
        json!({"exec": {"command": ["true"]}}),
        "exec probes run in the app's container and are left alone"
    );

    let proxy = container(&pod["spec"]["initContainers"], "trellis-proxy");
    let env = container(&proxy["env"], "TRELLIS_APP_PROBES");
    let originals: Value = serde_json::from_str(env["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        originals,
        json!({
            "/app-health/api/readyz": {"httpGet": {"path": "/ready", "port": 8443, "scheme": "HTTPS"}, "timeoutSeconds": 3},
            "/app-health/api/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
            "/app-health/api/startupz": {"grpc": {"port": 9090, "service": "shop.Api"}},
        })
    );
}

/// An app running as the proxy's UID would slip past iptables: refused with a
/// message naming the container, by its own runAsUser or the Pod's, even when
/// the webhook would otherwise fail open.
#[test]
fn an_app_running_as_the_proxy_uid_is_refused() {
    let mut ignore = settings();
    ignore.failure_policy = FailurePolicy::Ignore;
    let mut own = fixture("review-deployment-pod.json");
    own["request"]["object"]["spec"]["containers"][0]["securityContext"] =
        json!({"runAsUser": 1337});
    let mut pod_wide = fixture("review-deployment-pod.json");
    pod_wide["request"]["object"]["spec"]["securityContext"] = json!({"runAsUser": 1337});
    for review_json in [own, pod_wide] {
        let (answer, event) = review_with_event(review_json, Some(&enabled()), &ignore);
        // An Event says so on the Pod's controller (the Pod has no name yet).
        let event = event.expect("an Event for the refused Pod");
        assert_eq!(
            (
                event.reason.as_str(),
                event.warning,
                event.regarding.kind.as_deref(),
                event.regarding.name.as_deref(),
                event.regarding.namespace.as_deref()
            ),
            (
                "PodRefused",
                true,
                Some("ReplicaSet"),
                Some("web-7c9d8f6b5"),
                Some("shop")
            )
        );
        assert!(event.note.contains("UID 1337"), "{}", event.note);
        let response = &answer["response"];
        assert_eq!(response["allowed"], false, "{response:#}");
        assert!(response.get("patch").is_none_or(Value::is_null));
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("\"web\"") && message.contains("UID 1337"),
            "{message}"
        );
    }

    // The container's own user wins over the Pod's.
    let mut overridden = fixture("review-deployment-pod.json");
    overridden["request"]["object"]["spec"]["securityContext"] = json!({"runAsUser": 1337});
    overridden["request"]["object"]["spec"]["containers"][0]["securityContext"] =
        json!({"runAsUser": 1000});
    let (response, patched) = run(&overridden, Some(&enabled()));
    assert_eq!(response["allowed"], true, "{response:#}");
    assert!(patched.is_some());
    let (_, event) = review_with_event(overridden, Some(&enabled()), &ignore);
    assert_eq!(event, None, "no Event for a Pod injected");
}

/// The namespace label and the Pod annotation take the same values.
#[test]
fn namespace_label_and_pod_annotation_accept_the_same_values() {
    let table = [
        ("enabled", Some(true)),
        ("true", Some(true)),
        ("disabled", Some(false)),
        ("false", Some(false)),
        ("", None),
        ("yes", None),
        ("Enabled", None),
    ];
    for (value, want) in table {
        assert_eq!(injection_setting(value), want, "{value:?}");
        let labels = BTreeMap::from([("trellis.io/inject".to_owned(), value.to_owned())]);
        assert_eq!(namespace_enabled(&labels), want == Some(true), "{value:?}");

        let mut pod = fixture("review-deployment-pod.json")["request"]["object"].clone();
        pod["metadata"]["annotations"]["trellis.io/inject"] = json!(value);
        let outcome = pod_patch(&pod, "", &settings()).unwrap();
        assert_eq!(
            outcome.err() == Some(Skip::OptedOut),
            want == Some(false),
            "{value:?}"
        );
    }
}

/// The webhook configuration's selectors say what `injection_setting` says.
#[test]
fn the_webhook_selectors_take_the_same_values() {
    let yaml = include_str!("../../../deploy/kustomize/webhook.yaml");
    let config: Value = serde_yaml_ng::from_str(yaml).unwrap();
    let webhook = &config["webhooks"][0];
    let namespaces = &webhook["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(namespaces["operator"], "In");
    for value in namespaces["values"].as_array().unwrap() {
        assert_eq!(injection_setting(value.as_str().unwrap()), Some(true));
    }
    assert_eq!(namespaces["values"].as_array().unwrap().len(), 2);
    let objects = &webhook["objectSelector"]["matchExpressions"][0];
    assert_eq!(objects["operator"], "NotIn");
    for value in objects["values"].as_array().unwrap() {
        assert_eq!(injection_setting(value.as_str().unwrap()), Some(false));
    }
    assert_eq!(objects["values"].as_array().unwrap().len(), 2);
}

#[test]
fn mesh_wide_tracing_reaches_every_proxy_and_is_absent_when_off() {
    let tuning = sidecar::Tuning::default();
    let env_names = |settings: &InjectorSettings| -> Vec<(String, Option<String>)> {
        sidecar::proxy_container(settings, &tuning, None, None)
            .env
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.name.contains("OTLP") || e.name.contains("TRACE"))
            .map(|e| (e.name, e.value))
            .collect()
    };
    assert!(env_names(&settings()).is_empty());
    let traced = InjectorSettings {
        tracing: Some(MeshTracing {
            otlp_endpoint: "http://otel-collector.observability:4317".into(),
            sampling_percent: 2.5,
        }),
        ..settings()
    };
    assert_eq!(
        env_names(&traced),
        [
            (
                "TRELLIS_OTLP_ENDPOINT".to_owned(),
                Some("http://otel-collector.observability:4317".to_owned())
            ),
            ("TRELLIS_TRACE_SAMPLING".to_owned(), Some("2.5".to_owned())),
        ]
    );
}
