use super::*;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

fn policy(
    name: &str,
    action: pb::authorization_policy::Action,
    rules: Vec<pb::AuthorizationRule>,
) -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        name: name.into(),
        namespace: "default".into(),
        action: action as i32,
        rules,
    }
}

fn rule(principals: &[&str], methods: &[&str], paths: &[&str]) -> pb::AuthorizationRule {
    pb::AuthorizationRule {
        principals: principals.iter().map(|s| s.to_string()).collect(),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        paths: paths.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn decide(authz: &Authorizer, peer: &SpiffeId, method: &str, path: &str) -> bool {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let headers = HeaderMap::new();
    authz.decide(&RequestInfo {
        peer: Some(peer),
        port: 8080,
        http: Some(HttpInfo {
            method: &method,
            path,
            headers: &headers,
        }),
    }) == Decision::Allow
}

/// Three callers × {allowed path, denied path, denied method} × {ALLOW, DENY, none}.
#[test]
fn decision_matrix() {
    use pb::authorization_policy::Action::{Allow, Deny};
    let (a, b, c) = (id("a"), id("b"), id("c"));
    let allow = Authorizer::compile(&[policy(
        "allow-a-b",
        Allow,
        vec![rule(
            &["spiffe://cluster.local/ns/default/sa/a", "*/sa/b"],
            &["GET"],
            &["/public/*"],
        )],
    )])
    .unwrap();
    let deny = Authorizer::compile(&[policy(
        "deny-c",
        Deny,
        vec![rule(&["spiffe://cluster.local/ns/default/sa/c"], &[], &[])],
    )])
    .unwrap();
    let none = Authorizer::default();
    let requests = [
        ("GET", "/public/x"),
        ("GET", "/private"),
        ("DELETE", "/public/x"),
    ];
    let cases: [(&Authorizer, &SpiffeId, [bool; 3]); 9] = [
        (&allow, &a, [true, false, false]),
        (&allow, &b, [true, false, false]),
        (&allow, &c, [false, false, false]),
        (&deny, &a, [true, true, true]),
        (&deny, &b, [true, true, true]),
        (&deny, &c, [false, false, false]),
        (&none, &a, [true, true, true]),
        (&none, &b, [true, true, true]),
        (&none, &c, [true, true, true]),
    ];
    for (authz, peer, expected) in cases {
        for ((method, path), want) in requests.iter().zip(expected) {
            assert_eq!(
                decide(authz, peer, method, path),
                want,
                "{peer} {method} {path}"
            );
        }
    }
}

#[test]
fn deny_wins_and_names_the_policy() {
    use pb::authorization_policy::Action::{Allow, Deny};
    let authz = Authorizer::compile(&[
        policy("allow-all", Allow, vec![pb::AuthorizationRule::default()]),
        policy("deny-delete", Deny, vec![rule(&[], &["DELETE"], &[])]),
    ])
    .unwrap();
    assert!(decide(&authz, &id("a"), "GET", "/"));
    let method = Method::DELETE;
    let headers = HeaderMap::new();
    let decision = authz.decide(&RequestInfo {
        peer: Some(&id("a")),
        port: 80,
        http: Some(HttpInfo {
            method: &method,
            path: "/",
            headers: &headers,
        }),
    });
    assert_eq!(
        decision,
        Decision::Deny {
            policy: "default/deny-delete".into()
        }
    );
}

#[test]
fn an_allow_policy_without_rules_denies_everything() {
    let authz = Authorizer::compile(&[policy(
        "nothing",
        pb::authorization_policy::Action::Allow,
        vec![],
    )])
    .unwrap();
    assert!(!decide(&authz, &id("a"), "GET", "/"));
}

#[test]
fn l7_rules_fail_closed_on_tcp() {
    use pb::authorization_policy::Action::{Allow, Deny};
    let l4 = |authz: &Authorizer| {
        authz.decide(&RequestInfo {
            peer: Some(&id("a")),
            port: 9000,
            http: None,
        }) == Decision::Allow
    };
    let allow_get =
        Authorizer::compile(&[policy("allow-get", Allow, vec![rule(&[], &["GET"], &[])])]).unwrap();
    assert!(
        !l4(&allow_get),
        "an ALLOW rule on methods cannot allow a TCP connection"
    );
    let deny_get =
        Authorizer::compile(&[policy("deny-get", Deny, vec![rule(&[], &["GET"], &[])])]).unwrap();
    assert!(
        !l4(&deny_get),
        "a DENY rule on methods denies a TCP connection"
    );
    let allow_ns = Authorizer::compile(&[policy(
        "ns",
        Allow,
        vec![pb::AuthorizationRule {
            namespaces: vec!["default".into()],
            ..Default::default()
        }],
    )])
    .unwrap();
    assert!(l4(&allow_ns));
}

#[test]
fn plaintext_callers_match_no_principal() {
    let authz = Authorizer::compile(&[policy(
        "any-mesh",
        pb::authorization_policy::Action::Allow,
        vec![rule(&["*"], &[], &[])],
    )])
    .unwrap();
    assert_eq!(
        authz.decide(&RequestInfo {
            peer: None,
            port: 80,
            http: None
        }),
        Decision::Deny {
            policy: "no ALLOW policy matched (default/any-mesh)".into()
        }
    );
}

#[test]
fn bad_wildcards_are_refused() {
    let err = Authorizer::compile(&[policy(
        "bad",
        pb::authorization_policy::Action::Allow,
        vec![rule(&["spiffe://a*b"], &[], &[])],
    )])
    .unwrap_err();
    assert!(err.to_string().contains("spiffe://a*b"), "{err}");
}

#[test]
fn peer_authentication_by_port() {
    let pa = PeerAuth::compile(&pb::PeerAuthentication {
        name: "x".into(),
        namespace: "default".into(),
        mode: pb::peer_authentication::Mode::Permissive as i32,
        port_modes: [(9000, pb::peer_authentication::Mode::Strict as i32)].into(),
    });
    assert_eq!(pa.mode(8080), MtlsMode::Permissive);
    assert_eq!(pa.mode(9000), MtlsMode::Strict);
    assert_eq!(PeerAuth::default().mode(1), MtlsMode::Strict);
}

mod fail_closed {
    use super::*;
    use pb::authorization_policy::Action::{Allow, Deny};

    fn on_port(authz: &Authorizer, peer: &SpiffeId, port: u16) -> Decision {
        authz.decide(&RequestInfo {
            peer: Some(peer),
            port,
            http: None,
        })
    }

    fn with_ports(mut r: pb::AuthorizationRule, ports: &[u32]) -> pb::AuthorizationRule {
        r.ports = ports.to_vec();
        r
    }

    #[test]
    fn a_policy_that_does_not_compile_denies_its_ports_and_spares_the_rest() {
        let bad = policy(
            "bad-deny",
            Deny,
            vec![with_ports(rule(&["spiffe://*/sa/*"], &[], &[]), &[8080])],
        );
        let authz = Authorizer::compile_each([&bad]);
        assert!(!authz.is_empty());
        let [rejected] = authz.rejected() else {
            panic!("one rejection: {:?}", authz.rejected());
        };
        assert_eq!(rejected.name, "default/bad-deny");
        assert_eq!(rejected.ports, Some(vec![8080]));
        assert!(rejected.reason.contains("wildcard"), "{}", rejected.reason);
        assert!(matches!(
            on_port(&authz, &id("a"), 8080),
            Decision::Deny { policy } if policy.contains("default/bad-deny")
        ));
        // No ALLOW policy and the broken DENY is only about 8080.
        assert_eq!(on_port(&authz, &id("a"), 9090), Decision::Allow);
        // The strict compile still reports the same error.
        let err = Authorizer::compile(&[bad]).unwrap_err();
        assert_eq!(err.policy, "default/bad-deny");
    }

    #[test]
    fn a_broken_policy_without_ports_denies_everything() {
        let bad = policy("bad", Deny, vec![rule(&["a*b*"], &[], &[])]);
        let good = policy("good", Allow, vec![rule(&["*"], &[], &[])]);
        let authz = Authorizer::compile_each(&[bad, good]);
        assert_eq!(authz.rejected()[0].ports, None);
        for port in [80, 8080, 9090] {
            assert!(matches!(
                on_port(&authz, &id("a"), port),
                Decision::Deny { .. }
            ));
        }
    }

    #[test]
    fn a_broken_allow_policy_still_requires_a_matching_allow() {
        // Only about port 8080, but as an ALLOW it made every other port need a
        // match too; losing it must not open 9090.
        let bad = policy(
            "bad-allow",
            Allow,
            vec![with_ports(rule(&["*"], &["NOT A METHOD"], &[]), &[8080])],
        );
        let authz = Authorizer::compile_each([&bad]);
        assert!(matches!(
            on_port(&authz, &id("a"), 8080),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            on_port(&authz, &id("a"), 9090),
            Decision::Deny { .. }
        ));
        // With a good ALLOW that matches, other ports follow it; 8080 stays denied.
        let good = policy("good", Allow, vec![rule(&["*/sa/a"], &[], &[])]);
        let authz = Authorizer::compile_each(&[bad, good]);
        assert_eq!(on_port(&authz, &id("a"), 9090), Decision::Allow);
        assert!(matches!(
            on_port(&authz, &id("b"), 9090),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            on_port(&authz, &id("a"), 8080),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn an_unknown_action_is_rejected_and_denies() {
        let mut odd = policy("odd", Allow, vec![rule(&["*"], &[], &[])]);
        odd.action = 7;
        let authz = Authorizer::compile_each(&[odd]);
        assert!(authz.rejected()[0].reason.contains("unknown action"));
        assert!(matches!(
            on_port(&authz, &id("a"), 80),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn good_policies_compile_without_rejections() {
        let good = policy("good", Allow, vec![rule(&["*/sa/a"], &["GET"], &["/x*"])]);
        let authz = Authorizer::compile_each(&[good]);
        assert!(authz.rejected().is_empty());
    }
}
