//! The manifests under `deploy/` (and the kind test's under `tests/kind/`) against
//! the Kubernetes schemas, as k8s-openapi types: every document must be a known
//! kind, parse into its type, and survive a round trip unchanged (k8s-openapi does
//! not deny unknown fields, so a misspelt field shows up as a value the typed
//! object dropped). Then the facts an install depends on: replicas, non-root,
//! probes on the admin port, flags the binary has, the webhook's path, selectors
//! and ports, least-privilege RBAC.
//!
//! The CRDs under `deploy/crds/` are generated from the Rust policy types;
//! `tests/crds.rs` checks they are up to date and that their schemas admit the
//! shipped policies and reject what they can.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use trellis_control::api::{AuthorizationPolicy, PeerAuthentication, TrafficPolicy};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `*.yaml` under `dir`, sorted, except kustomizations and `deploy/helm/`.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("a directory entry").path();
            // Helm templates are not YAML until rendered; tests/tests/helm_chart.rs
            // renders them and compares them with the kustomize base.
            if path.ends_with("deploy/helm") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && path.file_name().is_some_and(|n| n != "kustomization.yaml")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML stream, as JSON values (empty documents dropped).
fn docs_of(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin} document {i}: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// One parsed document: its JSON and where it came from.
struct Doc {
    origin: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn typed<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone())
            .unwrap_or_else(|e| panic!("{} {}: {e}", self.origin, self.kind()))
    }
}

fn load(dir: &str) -> Vec<Doc> {
    let mut out = Vec::new();
    for file in yaml_files(&repo().join(dir)) {
        let text = std::fs::read_to_string(&file).expect("a readable file");
        let rel = file
            .strip_prefix(repo())
            .expect("under the repository")
            .display()
            .to_string();
        for (i, value) in docs_of(&text, &rel).into_iter().enumerate() {
            out.push(Doc {
                origin: format!("{rel}#{i}"),
                value,
            });
        }
    }
    assert!(!out.is_empty(), "no manifests under {dir}");
    out
}

fn deploy_docs() -> Vec<Doc> {
    load("deploy")
}

/// Paths in `original` that `round_tripped` lacks or holds differently.
fn lost(original: &Value, round_tripped: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_tripped) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => lost(v, w, &p, out),
                    // An explicit empty value the type leaves out is no loss.
                    None if is_empty(v) => {}
                    None => out.push(format!("{p}: unknown field (dropped by the typed object)")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Parses `doc` as `T` and checks nothing was dropped or changed on the way.
fn round_trip<T: DeserializeOwned + serde::Serialize>(doc: &Doc) -> Vec<String> {
    let typed: T = doc.typed();
    let again = serde_json::to_value(&typed).expect("serializable");
    let mut out = Vec::new();
    lost(&doc.value, &again, "", &mut out);
    out.into_iter()
        .map(|e| format!("{} ({} {}): {e}", doc.origin, doc.kind(), doc.name()))
        .collect()
}

/// Checks one document against the type of its `apiVersion` and `kind`.
fn validate(doc: &Doc) -> Vec<String> {
    let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
    match (api_version, doc.kind()) {
        ("v1", "Namespace") => round_trip::<Namespace>(doc),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "Pod") => round_trip::<Pod>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("batch/v1", "Job") => round_trip::<Job>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            round_trip::<MutatingWebhookConfiguration>(doc)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(doc)
        }
        // Trellis' own kinds: the Rust types deny unknown fields themselves, and
        // `validate` checks values as the control plane would.
        ("trellis.io/v1alpha1", "TrafficPolicy") => {
            policy_errors(doc, doc.typed::<TrafficPolicy>().validate())
        }
        ("trellis.io/v1alpha1", "AuthorizationPolicy") => {
            policy_errors(doc, doc.typed::<AuthorizationPolicy>().validate())
        }
        ("trellis.io/v1alpha1", "PeerAuthentication") => {
            policy_errors(doc, doc.typed::<PeerAuthentication>().validate())
        }
        // The Prometheus Operator's kinds under deploy/observability/ (not part of
        // the install): k8s-openapi has no types for them;
        // tests/tests/observability.rs checks their rules' PromQL and metric names.
        ("monitoring.coreos.com/v1", "PrometheusRule" | "PodMonitor") => {
            let mut errors = Vec::new();
            if doc.name().is_empty() {
                errors.push(format!("{}: no metadata.name", doc.origin));
            }
            if !doc.value["spec"].is_object() {
                errors.push(format!("{}: no spec", doc.origin));
            }
            errors
        }
        (api_version, kind) => vec![format!(
            "{}: unknown kind {api_version}/{kind}: add it to validate() in control-plane/tests/deploy.rs",
            doc.origin
        )],
    }
}

fn policy_errors(
    doc: &Doc,
    result: Result<(), Vec<trellis_control::api::FieldError>>,
) -> Vec<String> {
    match result {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_iter()
            .map(|e| format!("{}: {e}", doc.origin))
            .collect(),
    }
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let mut errors = Vec::new();
    let mut docs = deploy_docs();
    docs.extend(load("tests/kind"));
    for doc in &docs {
        errors.extend(validate(doc));
    }
    assert!(
        errors.is_empty(),
        "invalid manifests:\n{}",
        errors.join("\n")
    );
}

#[test]
fn the_round_trip_check_catches_typos() {
    let doc = Doc {
        origin: "inline".into(),
        value: serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "x"},
            "spec": {
                "replica": 2,
                "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {"containers": [{"name": "c", "imagePullPolicy": "Always", "readinesProbe": {}}]}}
            }
        }),
    };
    let errors = validate(&doc);
    assert!(
        errors
            .iter()
            .any(|e| e.contains(".spec.replica: unknown field")),
        "{errors:?}"
    );
    let kind = Doc {
        origin: "inline".into(),
        value: serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}),
    };
    assert!(validate(&kind)[0].contains("unknown kind v1/Secret"));
}

fn one<T: DeserializeOwned>(docs: &[Doc], kind: &str) -> T {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind} under deploy/");
    found[0].typed()
}

/// `--flag=value` or `--flag`: the flag.
fn flag(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(f, _)| f)
}

#[test]
fn the_control_plane_deployment() {
    let docs = deploy_docs();
    let deployment: Deployment = one(&docs, "Deployment");
    let meta = &deployment.metadata;
    assert_eq!(meta.name.as_deref(), Some("trellis-control"));
    assert_eq!(meta.namespace.as_deref(), Some("trellis-system"));
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let template = spec.template;
    let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    for (k, v) in spec.selector.match_labels.unwrap() {
        assert_eq!(
            labels.get(&k),
            Some(&v),
            "the selector selects the template"
        );
    }
    let pod = template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("trellis-control"));
    let pod_security = pod.security_context.unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert!(pod_security.run_as_user.is_some_and(|u| u != 0));
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    let resources = c.resources.as_ref().unwrap();
    for part in ["cpu", "memory"] {
        assert!(resources.requests.as_ref().unwrap().contains_key(part));
        assert!(resources.limits.as_ref().unwrap().contains_key(part));
    }
    for (probe, path) in [(&c.readiness_probe, "/ready"), (&c.liveness_probe, "/live")] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(15014));
    }
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [15010, 15017, 15014]);

    // The args are flags trellis-control has, listening where the ports say.
    let args = c.args.clone().unwrap();
    for required in ["--kube", "--injector"] {
        assert!(args.iter().any(|a| a == required), "{required} in {args:?}");
    }
    for (f, want) in [
        ("--grpc-addr", "0.0.0.0:15010"),
        ("--admin-addr", "0.0.0.0:15014"),
        ("--injector-addr", "0.0.0.0:15017"),
        ("--webhook-configuration", "trellis-injector"),
        (
            "--injector-control-addr",
            "trellis-control.trellis-system.svc:15010",
        ),
    ] {
        assert!(
            args.contains(&format!("{f}={want}")),
            "{f}={want} in {args:?}"
        );
    }
    let help = Command::new(env!("CARGO_BIN_EXE_trellis-control"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for arg in &args {
        let f = flag(arg);
        assert!(
            help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")),
            "trellis-control has no flag {f} (from deploy/kustomize/deployment.yaml):\n{help}"
        );
    }
    // Kube mode keeps the CA root in the Secret shared by the replicas: no
    // --state-dir, no volume where a second root could be made.
    assert!(!args.iter().any(|a| flag(a) == "--state-dir"), "{args:?}");
    assert!(c.volume_mounts.is_none() && pod.volumes.is_none());
    // The sidecar and the iptables init container are different images.
    let image = |f: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{f}=")))
            .unwrap_or_else(|| panic!("{f} in {args:?}"))
    };
    assert!(image("--proxy-image").contains("/trellis-proxy:"));
    assert!(image("--init-image").contains("/trellis-proxy-init:"));
    // The Lease holder and namespace come from the downward API.
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = c.env.iter().flatten().find(|e| e.name == name).unwrap();
        let field = var.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(field.field_path, path);
    }

    let pdb: PodDisruptionBudget = one(&docs, "PodDisruptionBudget");
    let pdb = pdb.spec.unwrap();
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb.selector.unwrap().match_labels,
        deployment_selector(&docs)
    );
}

fn deployment_selector(docs: &[Doc]) -> Option<std::collections::BTreeMap<String, String>> {
    one::<Deployment>(docs, "Deployment")
        .spec
        .expect("a spec")
        .selector
        .match_labels
}

#[test]
fn the_service_reaches_the_deployment() {
    let docs = deploy_docs();
    let service: Service = one(&docs, "Service");
    assert_eq!(service.metadata.name.as_deref(), Some("trellis-control"));
    assert_eq!(
        service.metadata.namespace.as_deref(),
        Some("trellis-system")
    );
    let spec = service.spec.unwrap();
    assert_eq!(spec.selector, deployment_selector(&docs));
    let deployment: Deployment = one(&docs, "Deployment");
    let container = deployment.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let named = |name: &str| {
        container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };
    let mut ports = Vec::new();
    for p in spec.ports.unwrap() {
        let target = match p.target_port.unwrap() {
            IntOrString::Int(n) => n,
            IntOrString::String(name) => named(&name).unwrap_or_else(|| panic!("port {name}")),
        };
        ports.push((p.port, target));
    }
    assert_eq!(ports, [(15010, 15010), (15017, 15017), (15014, 15014)]);
}

#[test]
fn the_webhook_configuration() {
    use trellis_control::injector::{annotations, webhook};
    let docs = deploy_docs();
    let config: MutatingWebhookConfiguration = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        config.metadata.name.as_deref(),
        Some(webhook::WEBHOOK_CONFIGURATION)
    );
    let hooks = config.webhooks.unwrap();
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook.admission_review_versions, ["v1"]);
    assert_eq!(hook.side_effects, "None");
    // Fail closed: a Pod in an enabled namespace is never admitted without its sidecar.
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
    let service = hook.client_config.service.as_ref().unwrap();
    assert_eq!(service.name, "trellis-control");
    assert_eq!(service.namespace, "trellis-system");
    assert_eq!(service.path.as_deref(), Some(webhook::PATH));
    assert_eq!(service.port, Some(15017));
    assert!(
        hook.client_config.ca_bundle.is_none(),
        "the control plane fills caBundle"
    );
    let ns = hook.namespace_selector.as_ref().unwrap();
    let opt_in = &ns.match_expressions.as_ref().unwrap()[0];
    assert_eq!(opt_in.key, annotations::INJECT_LABEL);
    assert_eq!(opt_in.operator, "In");
    assert_eq!(
        opt_in.values.as_deref(),
        Some(&["enabled".to_owned(), "true".to_owned()][..])
    );
    let object = hook.object_selector.as_ref().unwrap();
    let opt_out = &object.match_expressions.as_ref().unwrap()[0];
    assert_eq!(opt_out.key, annotations::INJECT);
    assert_eq!(opt_out.operator, "NotIn");
    assert_eq!(
        opt_out.values.as_deref(),
        Some(&["disabled".to_owned(), "false".to_owned()][..])
    );
    let rules = hook.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods".to_owned()][..])
    );
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["CREATE".to_owned()][..])
    );

    // trellis-system itself is never injected, and the control plane opts out.
    let namespace: Namespace = one(&docs, "Namespace");
    assert_ne!(
        namespace
            .metadata
            .labels
            .unwrap()
            .get(annotations::INJECT_LABEL)
            .map(String::as_str),
        Some("enabled")
    );
}

#[test]
fn rbac_is_least_privilege() {
    let docs = deploy_docs();
    let role: ClusterRole = one(&docs, "ClusterRole");
    let rules = role.rules.unwrap();
    let mut granted = Vec::new();
    for rule in &rules {
        assert!(rule.non_resource_urls.is_none());
        let groups = rule.api_groups.clone().unwrap();
        let resources = rule.resources.clone().unwrap();
        for list in [&groups, &resources, &rule.verbs] {
            assert!(!list.iter().any(|x| x == "*"), "no wildcards: {rule:?}");
        }
        assert!(
            !resources.iter().any(|r| r == "secrets"),
            "no secrets in the ClusterRole: {rule:?}"
        );
        // ConfigMaps: only the mesh root's (`trellis-ca-root`, in every namespace);
        // RBAC cannot name the object of a create, so create alone is unnamed.
        if resources.iter().any(|r| r == "configmaps") {
            let named = rule.resource_names.as_deref() == Some(&["trellis-ca-root".to_owned()][..]);
            assert!(
                named || rule.verbs == ["create"],
                "configmaps only by the name trellis-ca-root (or create): {rule:?}"
            );
            assert!(
                !rule
                    .verbs
                    .iter()
                    .any(|v| v == "delete" || v == "list" || v == "watch"),
                "configmaps: no delete, list or watch: {rule:?}"
            );
        }
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    granted.push((g.clone(), r.clone(), v.clone(), rule.resource_names.clone()));
                }
            }
        }
    }
    let has = |g: &str, r: &str, v: &str| {
        granted
            .iter()
            .any(|(gg, rr, vv, _)| gg == g && rr == r && vv == v)
    };
    for r in ["services", "pods", "namespaces", "serviceaccounts"] {
        for v in ["get", "list", "watch"] {
            assert!(has("", r, v), "{v} {r}");
        }
    }
    assert!(has("discovery.k8s.io", "endpointslices", "watch"));
    assert!(has("gateway.networking.k8s.io", "httproutes", "watch"));
    assert!(has(
        "gateway.networking.k8s.io",
        "httproutes/status",
        "patch"
    ));
    assert!(
        !has("gateway.networking.k8s.io", "httproutes", "patch"),
        "only the status of routes"
    );
    assert!(has("authentication.k8s.io", "tokenreviews", "create"));
    // kube-runtime's event recorder creates Events and patches repeats.
    assert!(has("events.k8s.io", "events", "create"));
    assert!(has("events.k8s.io", "events", "patch"));
    for kind in [
        "trafficpolicies",
        "authorizationpolicies",
        "peerauthentications",
    ] {
        assert!(has("trellis.io", kind, "watch"));
        assert!(has("trellis.io", &format!("{kind}/status"), "patch"));
        assert!(
            !has("trellis.io", kind, "patch"),
            "only the status of {kind}"
        );
    }
    // Writes outside status: only the one webhook configuration, by name (and the
    // mesh root's ConfigMaps, checked above, and Events).
    for (g, r, v, names) in &granted {
        let write = !["get", "list", "watch"].contains(&v.as_str());
        let event =
            g == "events.k8s.io" && r == "events" && ["create", "patch"].contains(&v.as_str());
        if write && !r.ends_with("/status") && r != "tokenreviews" && r != "configmaps" && !event {
            assert_eq!(r, "mutatingwebhookconfigurations", "{g}/{r} {v}");
            assert_eq!(names.as_deref(), Some(&["trellis-injector".to_owned()][..]));
        }
    }

    // In trellis-system only (a Role): the Lease and the CA root Secret; reads and
    // updates by name, create (which RBAC cannot limit by name) on the kind.
    let role: Role = one(&docs, "Role");
    assert_eq!(role.metadata.namespace.as_deref(), Some("trellis-system"));
    let mut granted = Vec::new();
    for rule in role.rules.unwrap() {
        for g in rule.api_groups.clone().unwrap() {
            for r in rule.resources.clone().unwrap() {
                for v in &rule.verbs {
                    granted.push((g.clone(), r.clone(), v.clone(), rule.resource_names.clone()));
                }
            }
        }
    }
    let named = |n: &str| Some(vec![n.to_owned()]);
    let mut want = vec![
        (
            "coordination.k8s.io",
            "leases",
            "get",
            named("trellis-control"),
        ),
        (
            "coordination.k8s.io",
            "leases",
            "update",
            named("trellis-control"),
        ),
        ("coordination.k8s.io", "leases", "create", None),
        (
            "",
            "secrets",
            "get",
            named(trellis_control::ca::ROOT_SECRET),
        ),
        // A replica starting mid-rotation writes the old root's retirement time back.
        (
            "",
            "secrets",
            "update",
            named(trellis_control::ca::ROOT_SECRET),
        ),
        ("", "secrets", "create", None),
    ]
    .into_iter()
    .map(|(g, r, v, n)| (g.to_owned(), r.to_owned(), v.to_owned(), n))
    .collect::<Vec<_>>();
    want.sort();
    granted.sort();
    assert_eq!(granted, want);
    assert_eq!(trellis_control::leader::LEASE_NAME, "trellis-control");

    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let doc = docs.iter().find(|d| d.kind() == kind).unwrap();
        let subjects = &doc.value["subjects"];
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"], "trellis-control");
        assert_eq!(subjects[0]["namespace"], "trellis-system");
    }
}

/// `kubectl kustomize` (where kubectl exists) renders the base, CRDs included.
#[test]
fn kustomize_renders_the_base() {
    let Ok(output) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join("deploy/kustomize"))
        .output()
    else {
        eprintln!("SKIPPED: no kubectl");
        return;
    };
    assert!(
        output.status.success(),
        "kubectl kustomize deploy/kustomize: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = docs_of(&String::from_utf8(output.stdout).unwrap(), "kustomize");
    let mut kinds: Vec<String> = rendered
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    // deploy/observability/ is applied on its own, next to a Prometheus Operator.
    let mut expected: Vec<String> = deploy_docs()
        .iter()
        .filter(|d| !d.origin.starts_with("deploy/observability/"))
        .map(|d| d.kind().to_owned())
        .collect();
    expected.sort();
    assert_eq!(kinds, expected, "the base renders every file under deploy/");
}
