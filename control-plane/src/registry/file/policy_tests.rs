//! Routes and policies in the folder: loaded, checked, and kept when broken.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::tests::write_dir;
use super::*;
use crate::model::{self, ServiceKey};

const TD: &str = "cluster.local";

const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: demo}
spec:
  selector: {app: echo-v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec: {address: 10.0.0.1, serviceAccount: echo}
";

const ROUTES: &str = "\
# canary by header, the rest to v1
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo, port: 80}]
  - matches: [{headers: [{name: x-canary, value: '1'}]}]
    backendRefs: [{name: echo-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: exact, namespace: demo}
spec:
  parentRefs: [{group: core, kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: Exact, value: /healthz}}]
";

const POLICIES: &str = "\
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: demo}
spec:
  targetRef: {kind: Service, name: echo}
  retries: {attempts: 2, retryOn: [gateway-error], budget: {ratio: 0.2}}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: trellis-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin/*]}}]}]
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: clients, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules: [{from: [{source: {principals: [spiffe://cluster.local/ns/demo/sa/client]}}]}]
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: trellis-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: metrics, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  portLevelMtls: {9100: {mode: PERMISSIVE}}
";

fn load(files: &[(&str, &str)]) -> Result<MeshSnapshot, Vec<RegistryError>> {
    let dir = write_dir(files);
    load_dir(dir.path(), TD)
}

/// The errors, as "file:line: reason", the folder written `{DIR}`.
fn errors(files: &[(&str, &str)]) -> Vec<String> {
    let dir = write_dir(files);
    let errors = load_dir(dir.path(), TD).expect_err("the folder should be rejected");
    let prefix = format!("{}/", dir.path().display());
    errors
        .iter()
        .map(|e| {
            let name = e.file.file_name().unwrap().to_string_lossy();
            let reason = e.reason.replace(&prefix, "{DIR}");
            format!("{name}:{}: {reason}", e.line.unwrap_or(0))
        })
        .collect()
}

fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

#[test]
fn loads_every_kind() {
    let snapshot = load(&[
        ("mesh.yaml", MESH),
        ("routes.yaml", ROUTES),
        ("policies.yaml", POLICIES),
    ])
    .unwrap();

    // Both routes attach to echo; precedence: exact path, header, the catch-all.
    let rules = &snapshot.routes[&key("demo", "echo")];
    let names: Vec<String> = rules.iter().map(model::HttpRouteRule::name).collect();
    assert_eq!(names, ["demo/exact/0", "demo/echo/1", "demo/echo/0"]);
    assert_eq!(rules[0].port, None);
    assert_eq!(rules[1].port, Some(80));
    assert_eq!(rules[1].backends[0].service, key("demo", "echo-v2"));
    assert_eq!(snapshot.routes.len(), 1);

    let traffic = &snapshot.traffic_policies[&key("demo", "echo")];
    assert_eq!(traffic.source, "demo/echo");
    let retries = traffic.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 2);
    assert_eq!(retries.retry_on, [model::RetryOn::GatewayError]);

    let authz: Vec<_> = snapshot
        .authorization_policies
        .iter()
        .map(|p| (p.namespace.as_str(), p.name.as_str(), p.action))
        .collect();
    assert_eq!(
        authz,
        [
            ("demo", "clients", model::AuthorizationAction::Allow),
            (
                "trellis-system",
                "deny-admin",
                model::AuthorizationAction::Deny
            ),
        ]
    );
    assert_eq!(snapshot.peer_authentications.len(), 2);
    let echo = &snapshot.workloads[0];
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &echo.labels),
        model::EffectivePeerAuthentication {
            mode: model::MtlsMode::Strict,
            port_modes: [(9100, model::MtlsMode::Permissive)].into(),
        }
    );
}

#[test]
fn semantic_errors_name_file_line_and_field() {
    let bad = "\
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: ok, namespace: demo}
spec: {}
---

# who may call echo
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: demo}
spec:
  rules:
  - from:
    - source:
        principals: [spiffe://cluster.local/ns/demo/sa/client, 'spiffe://a*b']
    to:
    - operation: {methods: [get]}
";
    assert_eq!(
        errors(&[("mesh.yaml", MESH), ("policy.yaml", bad)]),
        [
            "policy.yaml:8: spec.rules[0].from[0].source.principals[1]: \"spiffe://a*b\" is not \
             an exact SPIFFE ID or a prefix/suffix wildcard",
            "policy.yaml:8: spec.rules[0].to[0].operation.methods[0]: \"get\" is not an \
             upper-case HTTP method (GET, POST, ...)",
        ]
    );
}

#[test]
fn shape_errors_have_the_exact_line() {
    let bad = "\
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: demo}
spec:
  targetRef: {kind: Service, name: echo}
  retries:
    attempts: 2
    retryOn: [5xxx]
";
    let errors = errors(&[("mesh.yaml", MESH), ("tp.yaml", bad)]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("tp.yaml:8: spec.retries.retryOn[0]: unknown variant `5xxx`"),
        "{errors:?}"
    );
}

/// The object types ignore unknown top-level fields (the API server prunes them);
/// a file has no API server, so there they are errors.
#[test]
fn top_level_typos_are_errors() {
    let bad = "\
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: p, namespace: demo}
spec: {mtls: {mode: STRICT}}
stauts: {}
";
    let found = errors(&[("mesh.yaml", MESH), ("pa.yaml", bad)]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("pa.yaml:5: unknown field `stauts`"),
        "{found:?}"
    );
    let no_metadata = "apiVersion: trellis.io/v1alpha1\nkind: TrafficPolicy\nspec: {targetRef: {kind: Service, name: echo}}\n";
    assert_eq!(
        errors(&[("mesh.yaml", MESH), ("tp.yaml", no_metadata)]),
        [
            "tp.yaml:1: metadata.name: is required",
            // No namespace either: `default`, which has no echo.
            "tp.yaml:1: spec.targetRef: Service echo.default does not exist",
        ]
    );
}

#[test]
fn references_must_resolve() {
    let route = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 8080}, {name: gw}]
  rules: [{backendRefs: [{name: echo-v3, port: 80}]}]
";
    let policy = "\
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: p, namespace: demo}
spec: {targetRef: {kind: Service, name: ech0}}
";
    assert_eq!(
        errors(&[("mesh.yaml", MESH), ("r.yaml", route), ("p.yaml", policy)]),
        [
            "p.yaml:1: spec.targetRef: Service ech0.demo does not exist",
            "r.yaml:1: spec.parentRefs[0]: parent Service echo.demo has no port 8080",
            "r.yaml:1: spec.rules[0].backendRefs[0]: backend Service echo-v3.demo does not exist",
        ]
    );
}

#[test]
fn conflicts_are_errors() {
    let two = "\
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: a, namespace: demo}
spec: {targetRef: {kind: Service, name: echo}}
---
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: b, namespace: demo}
spec: {targetRef: {kind: Service, name: echo}}
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: a, namespace: demo}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: b, namespace: demo}
spec: {}
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: b, namespace: demo}
spec: {}
";
    let errors = errors(&[("mesh.yaml", MESH), ("two.yaml", two)]);
    assert_eq!(
        errors,
        [
            "two.yaml:21: duplicate PeerAuthentication demo/b: first declared at {DIR}two.yaml:16",
            "two.yaml:6: spec.targetRef: Service echo.demo already has TrafficPolicy demo/a \
             ({DIR}two.yaml:1)",
            "two.yaml:16: spec.selector: namespace demo already has PeerAuthentication a \
             without a selector ({DIR}two.yaml:11)",
        ]
        .map(|e| e.to_owned()),
    );
}

#[tokio::test]
async fn a_bad_policy_keeps_the_last_good_snapshot() {
    const POLL: Duration = Duration::from_millis(20);
    const DEADLINE: Duration = Duration::from_secs(2);
    let dir = write_dir(&[("mesh.yaml", MESH), ("policies.yaml", POLICIES)]);
    let path = dir.path().to_owned();
    let first = Arc::new(initial(&path, TD).unwrap());
    assert_eq!(first.authorization_policies.len(), 2);
    assert_eq!(
        accepted_objects(&first),
        BTreeMap::from([
            (
                "AuthorizationPolicy",
                vec![
                    "demo/clients".to_owned(),
                    "trellis-system/deny-admin".into()
                ]
            ),
            (
                "PeerAuthentication",
                vec!["demo/metrics".into(), "trellis-system/default".into()]
            ),
            ("TrafficPolicy", vec!["demo/echo".into()]),
        ])
    );
    let (snap_tx, mut snap_rx) = watch::channel(first.clone());
    let (status_tx, mut status_rx) = watch::channel(RegistryStatus::default());
    let task = tokio::spawn(watch_dir(path.clone(), TD.into(), POLL, snap_tx, status_tx));

    // A bad principal: reported, the snapshot stays.
    let broken = POLICIES.replace("spiffe://cluster.local/ns/demo/sa/client", "'spiffe://a*b'");
    std::fs::write(path.join("policies.yaml"), broken).unwrap();
    let status = tokio::time::timeout(DEADLINE, status_rx.wait_for(|s| !s.last_error.is_empty()))
        .await
        .expect("timed out waiting for errors")
        .unwrap()
        .clone();
    assert_eq!(status.last_error.len(), 1, "{status:#?}");
    let e = &status.last_error[0];
    assert!(e.file.ends_with("policies.yaml"), "{e:?}");
    assert_eq!(e.line, Some(15));
    assert!(
        e.reason
            .starts_with("spec.rules[0].from[0].source.principals[0]: "),
        "{e:?}"
    );
    assert!(Arc::ptr_eq(&snap_rx.borrow(), &first));
    assert!(!snap_rx.has_changed().unwrap());

    // Fixed with one policy less: a new snapshot without it.
    let fixed = POLICIES.replace("'spiffe://a*b'", "spiffe://cluster.local/ns/demo/sa/client");
    let fixed = fixed
        .split("---\n")
        .take(2)
        .collect::<Vec<_>>()
        .join("---\n");
    std::fs::write(path.join("policies.yaml"), fixed).unwrap();
    let snap = tokio::time::timeout(
        DEADLINE,
        snap_rx.wait_for(|s| s.authorization_policies.len() == 1),
    )
    .await
    .expect("timed out waiting for a new snapshot")
    .unwrap()
    .clone();
    assert_eq!(snap.authorization_policies[0].name, "deny-admin");
    assert!(snap.peer_authentications.is_empty());
    let status = tokio::time::timeout(DEADLINE, status_rx.wait_for(|s| s.generation == 1))
        .await
        .expect("timed out waiting for the status")
        .unwrap()
        .clone();
    assert!(status.last_error.is_empty());
    assert_eq!(
        status.accepted["AuthorizationPolicy"],
        ["trellis-system/deny-admin"]
    );
    assert!(!status.accepted.contains_key("PeerAuthentication"));
    task.abort();
}

/// A Postgres Service declared `tcp`, and a policy with an HTTP rule for it.
const DB_WITH_AN_HTTP_RULE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  selector: {app: db}
  ports: [{name: pg, port: 5432, appProtocol: tcp}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: db-0, namespace: demo, labels: {app: db}}
spec: {address: 10.0.0.7, serviceAccount: db}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-readers, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
";

const DB_WARNING: &str = "rules with methods, paths or headers apply to port 5432 of demo/db-0 \
     (Service db.demo port 5432, tcp): the proxy cannot see HTTP on an opaque port, so they \
     never match there: those callers are refused";

#[test]
fn http_rules_on_an_opaque_port_are_served_with_a_warning() {
    let dir = write_dir(&[("mesh.yaml", MESH), ("db.yaml", DB_WITH_AN_HTTP_RULE)]);
    let (snapshot, warnings) = load_dir_with_warnings(dir.path(), TD).unwrap();
    // Enforced (the proxy fails closed), so served.
    assert_eq!(snapshot.authorization_policies.len(), 1);
    let got: Vec<_> = warnings
        .iter()
        .map(|w| {
            (
                w.file.file_name().unwrap().to_owned(),
                w.line,
                w.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(got, [("db.yaml".into(), Some(13), DB_WARNING)]);

    // The same rule limited to another port: nothing to say.
    let other_port =
        DB_WITH_AN_HTTP_RULE.replace("methods: [GET]", "methods: [GET], ports: [8080]");
    let dir = write_dir(&[("mesh.yaml", MESH), ("db.yaml", &other_port)]);
    let (_, warnings) = load_dir_with_warnings(dir.path(), TD).unwrap();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[tokio::test]
async fn the_registry_view_shows_the_warning_for_its_file() {
    const DEADLINE: Duration = Duration::from_secs(2);
    let dir = write_dir(&[("mesh.yaml", MESH)]);
    let path = dir.path().to_owned();
    let first = Arc::new(initial(&path, TD).unwrap());
    let (snap_tx, _snap_rx) = watch::channel(first);
    let (status_tx, mut status_rx) = watch::channel(RegistryStatus::default());
    let poll = Duration::from_millis(20);
    let task = tokio::spawn(watch_dir(path.clone(), TD.into(), poll, snap_tx, status_tx));

    std::fs::write(path.join("db.yaml"), DB_WITH_AN_HTTP_RULE).unwrap();
    let status = tokio::time::timeout(DEADLINE, status_rx.wait_for(|s| !s.warnings.is_empty()))
        .await
        .expect("timed out waiting for the warning")
        .unwrap()
        .clone();
    assert!(status.last_error.is_empty(), "{status:#?}");
    assert_eq!(status.accepted["AuthorizationPolicy"], ["demo/db-readers"]);
    // As /registry serves it.
    let view = serde_json::to_value(&status).unwrap();
    let warning = &view["warnings"][0];
    assert!(
        warning["file"].as_str().unwrap().ends_with("/db.yaml"),
        "{view:#}"
    );
    assert_eq!(warning["line"], 13);
    assert_eq!(warning["reason"], DB_WARNING);

    // Declared HTTP: the warning goes away.
    std::fs::write(
        path.join("db.yaml"),
        DB_WITH_AN_HTTP_RULE.replace("appProtocol: tcp", "appProtocol: http"),
    )
    .unwrap();
    tokio::time::timeout(DEADLINE, status_rx.wait_for(|s| s.warnings.is_empty()))
        .await
        .expect("timed out waiting for the warning to clear")
        .unwrap();
    task.abort();
}
