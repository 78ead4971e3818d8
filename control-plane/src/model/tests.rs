#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::*;

fn rule(route: &str, rule: usize, m: HttpMatch) -> HttpRouteRule {
    HttpRouteRule {
        origin: RouteOrigin {
            namespace: "demo".into(),
            name: route.into(),
            created: None,
            rule,
            match_index: 0,
        },
        port: None,
        request_match: m,
        request_headers: HeaderModifier::default(),
        response_headers: HeaderModifier::default(),
        backends: Vec::new(),
        request_timeout: None,
        backend_request_timeout: None,
    }
}

fn path(p: PathMatch) -> HttpMatch {
    HttpMatch {
        path: p,
        headers: Vec::new(),
        query_params: Vec::new(),
        method: None,
    }
}

fn header(name: &str) -> ValueMatch {
    ValueMatch {
        name: name.into(),
        value: StringMatch::Exact("1".into()),
    }
}

#[test]
fn routes_sort_by_gateway_api_precedence() {
    let prefix = |p: &str| PathMatch::Prefix(p.into());
    let mut with_method = path(prefix("/api"));
    with_method.method = Some("GET".into());
    let mut one_header = path(prefix("/api"));
    one_header.headers = vec![header("a")];
    let mut two_headers = one_header.clone();
    two_headers.headers.push(header("b"));
    let mut query = one_header.clone();
    query.query_params = vec![header("q")];
    let mut rules = vec![
        rule("z", 0, path(prefix("/"))),
        rule("z", 1, path(PathMatch::Regex("/api/.*/long-regex".into()))),
        rule("z", 2, one_header.clone()),
        rule("b", 0, path(prefix("/api"))),
        rule("a", 3, path(prefix("/api"))),
        rule("z", 3, two_headers),
        rule("z", 4, query),
        rule("z", 5, with_method),
        rule("z", 6, path(prefix("/api/v1"))),
        rule("z", 7, path(PathMatch::Exact("/x".into()))),
        rule("a", 0, path(prefix("/api"))),
    ];
    // An older route wins a tie even against a name earlier in the alphabet.
    rules[3].origin.created = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5));
    sort_by_precedence(&mut rules);
    let order: Vec<String> = rules.iter().map(HttpRouteRule::name).collect();
    assert_eq!(
        order,
        [
            "demo/z/7", // exact
            "demo/z/6", // the longest prefix
            "demo/z/5", // a method
            "demo/z/3", // two headers
            "demo/z/4", // one header and a query parameter
            "demo/z/2", // one header
            "demo/b/0", // the same match: the oldest route
            "demo/a/0", // then by name and rule index
            "demo/a/3", "demo/z/0", // prefix "/"
            "demo/z/1", // a regex ranks below every prefix
        ]
    );
}

pub(super) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

fn peer(ns: &str, name: &str, selector: &[(&str, &str)], mode: MtlsMode) -> PeerAuthentication {
    PeerAuthentication {
        namespace: ns.into(),
        name: name.into(),
        selector: labels(selector),
        mode,
        port_modes: BTreeMap::new(),
    }
}

fn effective(mode: MtlsMode, ports: &[(u16, MtlsMode)]) -> EffectivePeerAuthentication {
    EffectivePeerAuthentication {
        mode,
        port_modes: ports.iter().copied().collect(),
    }
}

#[test]
fn the_mesh_wide_peer_authentication_lives_in_the_snapshots_root_namespace() {
    use MtlsMode::*;
    let none = BTreeMap::new();
    let mut snapshot = MeshSnapshot {
        root_namespace: "mesh-root".into(),
        ..MeshSnapshot::default()
    };
    snapshot.peer_authentications = vec![peer(DEFAULT_ROOT_NAMESPACE, "old", &[], Disable)];
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &none),
        effective(Strict, &[]),
        "trellis-system is no root here"
    );
    snapshot.peer_authentications = vec![peer("mesh-root", "mesh", &[], Permissive)];
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &none),
        effective(Permissive, &[])
    );
}

#[test]
fn peer_authentication_precedence() {
    use MtlsMode::*;
    let mut snapshot = MeshSnapshot::default();
    let app = labels(&[("app", "legacy")]);
    let none = BTreeMap::new();
    // Nothing: STRICT.
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &none),
        effective(Strict, &[])
    );
    // Mesh-wide.
    snapshot.peer_authentications = vec![peer(DEFAULT_ROOT_NAMESPACE, "mesh", &[], Permissive)];
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &app),
        effective(Permissive, &[])
    );
    // Namespace-wide beats the mesh; UNSET inherits.
    snapshot
        .peer_authentications
        .push(peer("demo", "ns", &[], Disable));
    snapshot
        .peer_authentications
        .push(peer("other", "ns", &[], Unset));
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &app),
        effective(Disable, &[])
    );
    assert_eq!(
        snapshot.effective_peer_authentication("other", &app),
        effective(Permissive, &[])
    );
    // A workload policy beats its namespace; its ports beat it; an unset port and a
    // port with the workload's mode add nothing.
    let mut workload = peer("demo", "legacy", &[("app", "legacy")], Strict);
    workload.port_modes = BTreeMap::from([(9100, Permissive), (9200, Unset), (9300, Strict)]);
    snapshot.peer_authentications.push(workload);
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &app),
        effective(Strict, &[(9100, Permissive)])
    );
    // Not selected: the namespace's.
    assert_eq!(
        snapshot.effective_peer_authentication("demo", &none),
        effective(Disable, &[])
    );
    // A selector in another namespace does not apply.
    assert_eq!(
        snapshot.effective_peer_authentication("other", &app),
        effective(Permissive, &[])
    );
    // An UNSET workload mode inherits, and its ports resolve against that.
    let mut unset = peer("other", "w", &[("app", "legacy")], Unset);
    unset.port_modes = BTreeMap::from([(8080, Strict), (8081, Unset)]);
    snapshot.peer_authentications.push(unset);
    assert_eq!(
        snapshot.effective_peer_authentication("other", &app),
        effective(Permissive, &[(8080, Strict)])
    );
}

pub(super) fn workload(name: &str, sa: &str, pairs: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: "demo".into(),
        name: name.into(),
        address: "10.0.0.1".parse().unwrap(),
        addresses: Vec::new(),
        identity: SpiffeId::new("cluster.local", "demo", sa).unwrap(),
        labels: labels(pairs),
        ports: BTreeMap::new(),
        sidecar_port: None,
        sidecar: true,
        weight: 1,
        zone: String::new(),
    }
}

#[test]
fn a_shared_identity_gets_the_strictest_peer_authentication() {
    use MtlsMode::*;
    let mut a = peer("demo", "a", &[("app", "a")], Permissive);
    a.port_modes = BTreeMap::from([(9000, Disable), (9100, Strict)]);
    let mut b = peer("demo", "b", &[("app", "b")], Disable);
    b.port_modes = BTreeMap::from([(9000, Permissive)]);
    let snapshot = MeshSnapshot {
        workloads: vec![
            workload("a", "shared", &[("app", "a")]),
            workload("b", "shared", &[("app", "b")]),
        ],
        peer_authentications: vec![a, b],
        ..MeshSnapshot::default()
    };
    let id = SpiffeId::new("cluster.local", "demo", "shared").unwrap();
    let unknown = || UnknownWorkload::NotNamed;
    assert_eq!(
        snapshot.peer_authentication_for(&snapshot.identity_scope(&id, unknown())),
        effective(Permissive, &[(9100, Strict)])
    );
    // An identity without workloads: its namespace, no labels.
    let lone = SpiffeId::new("cluster.local", "demo", "lone").unwrap();
    assert_eq!(
        snapshot.peer_authentication_for(&snapshot.identity_scope(&lone, unknown())),
        effective(Strict, &[])
    );
}

#[test]
fn authorization_policy_selection() {
    let policy = |ns: &str, selector: &[(&str, &str)]| AuthorizationPolicy {
        namespace: ns.into(),
        name: "p".into(),
        selector: labels(selector),
        action: AuthorizationAction::Allow,
        rules: Vec::new(),
    };
    let echo = labels(&[("app", "echo"), ("tier", "web")]);
    assert!(policy("demo", &[]).selects(DEFAULT_ROOT_NAMESPACE, "demo", &echo));
    assert!(!policy("other", &[]).selects(DEFAULT_ROOT_NAMESPACE, "demo", &echo));
    assert!(policy("demo", &[("app", "echo")]).selects(DEFAULT_ROOT_NAMESPACE, "demo", &echo));
    assert!(!policy("demo", &[("app", "echo"), ("tier", "db")]).selects(
        DEFAULT_ROOT_NAMESPACE,
        "demo",
        &echo
    ));
    // The root namespace spans the mesh, with or without a selector.
    assert!(policy(DEFAULT_ROOT_NAMESPACE, &[]).selects(DEFAULT_ROOT_NAMESPACE, "demo", &echo));
    assert!(policy(DEFAULT_ROOT_NAMESPACE, &[("tier", "web")]).selects(
        DEFAULT_ROOT_NAMESPACE,
        "demo",
        &echo
    ));
    assert!(!policy(DEFAULT_ROOT_NAMESPACE, &[("tier", "db")]).selects(
        DEFAULT_ROOT_NAMESPACE,
        "demo",
        &echo
    ));
    // Another root (the control plane runs in mesh-root): trellis-system is then a
    // namespace like any other.
    assert!(policy("mesh-root", &[]).selects("mesh-root", "demo", &echo));
    assert!(!policy(DEFAULT_ROOT_NAMESPACE, &[]).selects("mesh-root", "demo", &echo));
}

fn service_port(name: &str, port: u16, target: u16, protocol: AppProtocol) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        target_port: TargetPort::Number(target),
        protocol,
    }
}

/// demo/db (tcp 5432 → 5432, undeclared 9187 → 9187) and demo/web (http 80 →
/// 8080), one workload behind each.
fn mesh_with_a_tcp_port() -> MeshSnapshot {
    let mut snapshot = MeshSnapshot::default();
    let mut db = workload("db-0", "db", &[("app", "db")]);
    db.address = "10.0.0.5".parse().unwrap();
    let web = workload("web-0", "web", &[("app", "web")]);
    for (name, w, ports) in [
        (
            "db",
            &db,
            vec![
                service_port("tcp-pg", 5432, 5432, AppProtocol::Tcp),
                service_port("metrics", 9187, 9187, AppProtocol::Unspecified),
            ],
        ),
        (
            "web",
            &web,
            vec![service_port("http", 80, 8080, AppProtocol::Http)],
        ),
    ] {
        let key = ServiceKey {
            namespace: "demo".into(),
            name: name.into(),
        };
        for p in &ports {
            let TargetPort::Number(target) = p.target_port else {
                unreachable!()
            };
            snapshot.endpoints.insert(
                (key.clone(), p.port),
                vec![Endpoint {
                    address: w.address,
                    port: target,
                    identity: Some(w.identity.clone()),
                    weight: 1,
                    zone: String::new(),
                    ready: true,
                    mesh_address: None,
                    sidecar: true,
                }],
            );
        }
        snapshot.services.insert(
            key.clone(),
            Service {
                key,
                vips: Vec::new(),
                ports,
                selector: labels(&[("app", name)]),
            },
        );
    }
    snapshot.workloads = vec![db, web];
    snapshot
}

fn authz(action: AuthorizationAction, rules: Vec<AuthorizationRule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        namespace: "demo".into(),
        name: "p".into(),
        selector: BTreeMap::new(),
        action,
        rules,
    }
}

#[test]
fn http_rules_on_an_opaque_port_are_found() {
    let snapshot = mesh_with_a_tcp_port();
    let get = AuthorizationRule {
        methods: vec!["GET".into()],
        ..AuthorizationRule::default()
    };
    let found = snapshot.l7_rules_on_opaque_ports(&authz(AuthorizationAction::Allow, vec![get]));
    // Only the tcp port: the undeclared one is detected, the http one is HTTP.
    assert_eq!(
        found,
        [L7RulesOnOpaquePort {
            action: AuthorizationAction::Allow,
            service: ServiceKey {
                namespace: "demo".into(),
                name: "db".into(),
            },
            service_port: 5432,
            protocol: AppProtocol::Tcp,
            target_port: 5432,
            workloads: vec!["demo/db-0".into()],
        }]
    );
    assert_eq!(
        found[0].to_string(),
        "rules with methods, paths or headers apply to port 5432 of demo/db-0 (Service db.demo \
         port 5432, tcp): the proxy cannot see HTTP on an opaque port, so they never match \
         there: those callers are refused"
    );
}

#[test]
fn rules_that_cannot_reach_an_opaque_port_are_not_reported() {
    let snapshot = mesh_with_a_tcp_port();
    let none = |rules| {
        snapshot
            .l7_rules_on_opaque_ports(&authz(AuthorizationAction::Deny, rules))
            .is_empty()
    };
    // L4-only rules are enforced as written.
    assert!(none(vec![AuthorizationRule {
        principals: vec!["*".into()],
        ports: vec![5432],
        ..AuthorizationRule::default()
    }]));
    // HTTP rules limited to other ports.
    assert!(none(vec![AuthorizationRule {
        paths: vec!["/admin*".into()],
        ports: vec![8080, 9187],
        ..AuthorizationRule::default()
    }]));
    // HTTP rules naming the tcp port, in a policy selecting only the web workload.
    let mut web_only = authz(
        AuthorizationAction::Deny,
        vec![AuthorizationRule {
            headers: vec![header("x-admin")],
            ports: vec![5432],
            ..AuthorizationRule::default()
        }],
    );
    web_only.selector = labels(&[("app", "web")]);
    assert!(snapshot.l7_rules_on_opaque_ports(&web_only).is_empty());
    // The same policy selecting the db workload is reported, as a DENY.
    web_only.selector = labels(&[("app", "db")]);
    let found = snapshot.l7_rules_on_opaque_ports(&web_only);
    assert_eq!(found.len(), 1);
    assert!(
        found[0]
            .to_string()
            .ends_with("so they match every connection from their sources there"),
        "{}",
        found[0]
    );
}

#[test]
fn an_endpoint_slice_cannot_move_a_meshed_address() {
    let at = |name: &str, ns: &str, ip: &str, sidecar: bool| Workload {
        namespace: ns.into(),
        address: ip.parse().unwrap(),
        sidecar,
        ..workload(name, "sa", &[])
    };
    let workloads = vec![
        at("payments-1", "shop", "10.0.0.1", true),
        at("web-1", "shop", "10.0.0.2", true),
        at("plain-1", "shop", "10.0.0.3", false),
    ];
    let index = WorkloadIndex::new(&workloads);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let name = |r: Result<Option<&Workload>, EndpointRefused>| r.map(|w| w.map(|w| w.name.clone()));

    // The usual cases: by targetRef, by address.
    let by_ref = index.find("shop", Some(("shop", "payments-1")), ip("10.0.0.1"));
    assert_eq!(name(by_ref), Ok(Some("payments-1".into())));
    assert_eq!(
        name(index.find("shop", None, ip("10.0.0.2"))),
        Ok(Some("web-1".into()))
    );
    // Nothing known at all (the API server): no workload, plaintext is fine.
    assert_eq!(name(index.find("evil", None, ip("10.9.9.9"))), Ok(None));
    // An unmeshed workload's address in another namespace: plaintext anyway.
    assert_eq!(name(index.find("evil", None, ip("10.0.0.3"))), Ok(None));

    // Another namespace's slice naming payments: refused, even with its own address.
    let cross = index.find("evil", Some(("shop", "payments-1")), ip("10.0.0.1"));
    assert!(
        matches!(cross, Err(EndpointRefused::CrossNamespaceRef { .. })),
        "{cross:?}"
    );
    // A targetRef to payments at web's address: refused, web's address keeps web.
    let moved = index.find("shop", Some(("shop", "payments-1")), ip("10.0.0.2"));
    assert!(
        matches!(moved, Err(EndpointRefused::NotItsAddress { .. })),
        "{moved:?}"
    );
    // Another namespace's slice listing payments' address without a targetRef: it
    // would be a plaintext endpoint at a meshed address.
    let downgrade = index.find("evil", None, ip("10.0.0.1"));
    assert!(
        matches!(&downgrade, Err(EndpointRefused::MeshedElsewhere { owner, .. }) if owner == "shop/payments-1"),
        "{downgrade:?}"
    );
}
