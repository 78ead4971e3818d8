#![allow(clippy::unwrap_used)]

use prost::Message;
use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1 as pb;
use trellis_proto::discovery::v1::type_url;

use super::{ProxyView, TYPE_URLS, view_for};
use crate::model::MeshSnapshot;

const TD: &str = "cluster.local";

/// The view of a proxy of `identity` whose certificate names no workload.
fn view(snapshot: &MeshSnapshot, identity: &SpiffeId) -> ProxyView {
    view_for(snapshot, TD, &[], &snapshot.policy_scope(identity, None))
}

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
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec: {address: 10.0.0.1, serviceAccount: echo}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: db-1, namespace: demo, labels: {app: db}}
spec: {address: 10.0.0.2, serviceAccount: db}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: X-Canary, value: '1'}], method: GET}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: canary}], remove: [x-debug]}
    backendRefs: [{name: echo-v2, port: 80, weight: 90}, {name: echo, port: 80, weight: 10}]
    timeouts: {request: 10s, backendRequest: 2s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-for-ops, namespace: ops}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, namespace: demo}]
  rules: [{backendRefs: [{name: echo-v2, namespace: demo, port: 80}]}]
---
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: demo}
spec:
  targetRef: {kind: Service, name: echo}
  loadBalancer: {algorithm: CONSISTENT_HASH, consistentHash: {cookie: session}}
  retries:
    attempts: 2
    retryOn: [gateway-error, retriable-status-codes]
    statusCodes: [429]
    perTryTimeout: 500ms
    backoff: {baseInterval: 10ms}
    budget: {ratio: 0.25, ttl: 5s}
  timeouts: {connect: 1s}
  outlierDetection: {consecutiveFailures: 3}
  connectionLimits: {maxConnections: 100}
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
metadata: {name: echo-clients, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: ['spiffe://cluster.local/ns/demo/*']}}]
    to: [{operation: {methods: [GET], ports: [8080]}}]
    when: [{key: 'request.headers[x-tenant]', values: [blue]}]
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-clients, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {namespaces: [demo]}}]}]
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: demo, namespace: demo}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: db, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls: {9100: {mode: DISABLE}}
";

fn snapshot() -> MeshSnapshot {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
    crate::registry::load_dir(dir.path(), TD).unwrap()
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

/// The resource named `name` of `type_url`, through the wire and back.
fn decoded(view: &super::ProxyView, type_url: &str, name: &str) -> pb::resource::Kind {
    let resource = &view.by_type[type_url][name];
    let bytes = resource.encode_to_vec();
    let back = pb::Resource::decode(bytes.as_slice()).unwrap();
    assert_eq!(&back, resource.as_ref());
    back.kind.unwrap()
}

fn names(view: &super::ProxyView, type_url: &str) -> Vec<String> {
    view.by_type[type_url].keys().cloned().collect()
}

#[test]
fn every_type_is_in_every_view() {
    let view = view(&snapshot(), &id("demo", "nobody"));
    assert_eq!(view.by_type.len(), TYPE_URLS.len());
    assert_eq!(names(&view, type_url::ROUTE_TABLE), ["echo.demo"]);
    assert_eq!(names(&view, type_url::TRAFFIC_POLICY), ["echo.demo"]);
    // Without a workload: namespace-wide and mesh-wide policies only.
    assert_eq!(
        names(&view, type_url::AUTHORIZATION_POLICY),
        ["trellis-system/deny-admin"]
    );
    assert_eq!(
        names(&view, type_url::PEER_AUTHENTICATION),
        ["demo/effective"]
    );
}

#[test]
fn security_policy_is_scoped_to_the_proxy_workload() {
    let snapshot = snapshot();
    let echo = view(&snapshot, &id("demo", "echo"));
    let db = view(&snapshot, &id("demo", "db"));
    assert_eq!(
        names(&echo, type_url::AUTHORIZATION_POLICY),
        ["demo/echo-clients", "trellis-system/deny-admin"]
    );
    assert_eq!(
        names(&db, type_url::AUTHORIZATION_POLICY),
        ["demo/db-clients", "trellis-system/deny-admin"]
    );
    use pb::peer_authentication::Mode;
    let peer = |view| match decoded(view, type_url::PEER_AUTHENTICATION, "demo/effective") {
        pb::resource::Kind::PeerAuthentication(p) => p,
        other => panic!("{other:?}"),
    };
    let echo_peer = peer(&echo);
    assert_eq!(
        (echo_peer.name.as_str(), echo_peer.namespace.as_str()),
        ("effective", "demo")
    );
    assert_eq!(echo_peer.mode, Mode::Permissive as i32);
    assert!(echo_peer.port_modes.is_empty());
    let db_peer = peer(&db);
    assert_eq!(db_peer.mode, Mode::Strict as i32);
    assert_eq!(db_peer.port_modes, [(9100, Mode::Disable as i32)].into());
    // Routes and traffic policy are the same for both.
    assert_eq!(
        echo.by_type[type_url::ROUTE_TABLE],
        db.by_type[type_url::ROUTE_TABLE]
    );
    assert_eq!(
        echo.by_type[type_url::TRAFFIC_POLICY],
        db.by_type[type_url::TRAFFIC_POLICY]
    );
}

#[test]
fn authorization_policy_on_the_wire() {
    let view = view(&snapshot(), &id("demo", "echo"));
    let pb::resource::Kind::AuthorizationPolicy(p) =
        decoded(&view, type_url::AUTHORIZATION_POLICY, "demo/echo-clients")
    else {
        panic!("not an AuthorizationPolicy");
    };
    assert_eq!(
        p,
        pb::AuthorizationPolicy {
            name: "echo-clients".into(),
            namespace: "demo".into(),
            action: pb::authorization_policy::Action::Allow as i32,
            rules: vec![pb::AuthorizationRule {
                principals: vec!["spiffe://cluster.local/ns/demo/*".into()],
                namespaces: vec![],
                ports: vec![8080],
                methods: vec!["GET".into()],
                paths: vec![],
                headers: vec![pb::ValueMatch {
                    name: "x-tenant".into(),
                    value: "blue".into(),
                    regex: false,
                }],
            }],
        }
    );
}

#[test]
fn route_table_on_the_wire() {
    let view = view(&snapshot(), &id("demo", "client"));
    let pb::resource::Kind::RouteTable(table) = decoded(&view, type_url::ROUTE_TABLE, "echo.demo")
    else {
        panic!("not a RouteTable");
    };
    assert_eq!(
        table,
        pb::RouteTable {
            service: "echo".into(),
            namespace: "demo".into(),
            routes: vec![pb::HttpRoute {
                name: "demo/echo/0".into(),
                port: 80,
                matches: vec![pb::HttpMatch {
                    path: Some(pb::PathMatch {
                        kind: pb::path_match::Kind::Prefix as i32,
                        value: "/v2".into(),
                    }),
                    headers: vec![pb::ValueMatch {
                        name: "x-canary".into(),
                        value: "1".into(),
                        regex: false,
                    }],
                    query_params: vec![],
                    method: "GET".into(),
                }],
                request_headers: Some(pb::HeaderModifier {
                    set: [("x-route".to_owned(), "canary".to_owned())].into(),
                    add: Default::default(),
                    remove: vec!["x-debug".into()],
                }),
                response_headers: None,
                backends: vec![
                    pb::WeightedBackend {
                        service: "echo-v2".into(),
                        namespace: "demo".into(),
                        port: 80,
                        weight: 90,
                    },
                    pb::WeightedBackend {
                        service: "echo".into(),
                        namespace: "demo".into(),
                        port: 80,
                        weight: 10,
                    },
                ],
                request_timeout_ms: 10_000,
                backend_request_timeout_ms: 2_000,
            }],
        }
    );
}

#[test]
fn consumer_routes_replace_producer_routes_in_their_namespace() {
    let snapshot = snapshot();
    let route_names = |ns: &str| {
        let view = view(&snapshot, &id(ns, "client"));
        let pb::resource::Kind::RouteTable(t) = decoded(&view, type_url::ROUTE_TABLE, "echo.demo")
        else {
            panic!("not a RouteTable");
        };
        t.routes.into_iter().map(|r| r.name).collect::<Vec<_>>()
    };
    assert_eq!(route_names("demo"), ["demo/echo/0"]);
    assert_eq!(route_names("elsewhere"), ["demo/echo/0"]);
    assert_eq!(route_names("ops"), ["ops/echo-for-ops/0"]);
}

#[test]
fn traffic_policy_on_the_wire() {
    let view = view(&snapshot(), &id("demo", "client"));
    let pb::resource::Kind::TrafficPolicy(p) =
        decoded(&view, type_url::TRAFFIC_POLICY, "echo.demo")
    else {
        panic!("not a TrafficPolicy");
    };
    assert_eq!(
        p,
        pb::TrafficPolicy {
            service: "echo".into(),
            namespace: "demo".into(),
            load_balancer: Some(pb::LoadBalancer {
                algorithm: pb::load_balancer::Algorithm::ConsistentHash as i32,
                hash_header: String::new(),
                hash_cookie: "session".into(),
            }),
            retries: Some(pb::RetryPolicy {
                attempts: 2,
                retry_on: vec!["gateway-error".into(), "retriable-status-codes".into()],
                status_codes: vec![429],
                grpc_statuses: vec![],
                per_try_timeout_ms: 500,
                backoff_base_ms: 10,
                backoff_max_ms: 250,
                budget: Some(pb::RetryBudget {
                    ratio: 0.25,
                    min_retries_per_second: 10,
                    ttl_ms: 5_000,
                }),
                retry_non_idempotent: false,
            }),
            timeouts: Some(pb::Timeouts {
                connect_ms: 1_000,
                request_ms: 0,
                idle_ms: 0,
            }),
            outlier_detection: Some(pb::OutlierDetection {
                consecutive_failures: 3,
                base_ejection_ms: 30_000,
                max_ejection_percent: 50,
            }),
            limits: Some(pb::ConnectionLimits {
                max_connections: 100,
                max_pending_requests: 0,
            }),
        }
    );
}

#[test]
fn endpoints_without_mtls_are_marked_plaintext() {
    const PLAIN: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: metrics, port: 9100, targetPort: 9100}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: web-1, namespace: demo, labels: {app: web, tier: meshed}}
spec: {address: 10.0.0.1, serviceAccount: web}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: web-2, namespace: demo, labels: {app: web}}
spec: {address: 10.0.0.2, serviceAccount: legacy, sidecar: false}
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web, namespace: demo}
spec:
  selector: {matchLabels: {tier: meshed}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {9100: {mode: DISABLE}}
";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), PLAIN).unwrap();
    let snapshot = crate::registry::load_dir(dir.path(), TD).unwrap();
    let view = view(&snapshot, &id("demo", "client"));
    let endpoints = |name: &str| match decoded(&view, type_url::ENDPOINTS, name) {
        pb::resource::Kind::Endpoints(e) => e
            .endpoints
            .into_iter()
            .map(|e| (e.address, e.identity, e.plaintext))
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let web = id("demo", "web").to_string();
    // PERMISSIVE still takes mTLS, so meshed callers use it; the workload without a
    // sidecar is reached in plaintext.
    assert_eq!(
        endpoints("web.demo:80"),
        vec![
            ("10.0.0.1".to_owned(), web, false),
            ("10.0.0.2".to_owned(), String::new(), true),
        ]
    );
    // DISABLE on the port: its sidecar would take no mTLS there.
    assert_eq!(
        endpoints("web.demo:9100"),
        vec![
            ("10.0.0.1".to_owned(), String::new(), true),
            ("10.0.0.2".to_owned(), String::new(), true),
        ]
    );
}
