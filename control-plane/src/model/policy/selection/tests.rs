#![allow(clippy::unwrap_used)]

use crate::model::tests::{labels, workload};
use crate::model::*;
use trellis_identity::SpiffeId;

fn shared() -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", "shared").unwrap()
}

fn policy(
    name: &str,
    app: &str,
    action: AuthorizationAction,
    principal: &str,
) -> AuthorizationPolicy {
    AuthorizationPolicy {
        namespace: "demo".into(),
        name: name.into(),
        selector: labels(&[("app", app)]),
        action,
        rules: vec![AuthorizationRule {
            principals: vec![format!("spiffe://cluster.local/ns/demo/sa/{principal}")],
            ..AuthorizationRule::default()
        }],
    }
}

/// web and payments share sa/shared; web ALLOWs sa/client, payments only sa/checkout;
/// each DENYs one caller of its own.
fn mesh() -> MeshSnapshot {
    use AuthorizationAction::*;
    MeshSnapshot {
        workloads: vec![
            workload("payments-1", "shared", &[("app", "payments")]),
            workload("web-1", "shared", &[("app", "web")]),
            workload("other-1", "other", &[("app", "web")]),
        ],
        authorization_policies: vec![
            policy("payments-allow-checkout", "payments", Allow, "checkout"),
            policy("payments-deny-intruder", "payments", Deny, "intruder"),
            policy("web-allow-client", "web", Allow, "client"),
            policy("web-deny-bot", "web", Deny, "bot"),
        ],
        ..MeshSnapshot::default()
    }
}

fn names(policies: &[std::borrow::Cow<'_, AuthorizationPolicy>]) -> Vec<String> {
    policies.iter().map(|p| p.name.clone()).collect()
}

#[test]
fn a_known_workload_gets_only_its_own_policies() {
    let mesh = mesh();
    let id = shared();
    let payments = mesh.policy_scope(&id, Some("payments-1"));
    assert!(matches!(payments, PolicyScope::Workload(w) if w.name == "payments-1"));
    assert_eq!(
        names(&mesh.authorization_policies_for(&payments)),
        ["payments-allow-checkout", "payments-deny-intruder"]
    );
    let web = mesh.policy_scope(&id, Some("web-1"));
    assert_eq!(
        names(&mesh.authorization_policies_for(&web)),
        ["web-allow-client", "web-deny-bot"]
    );
}

#[test]
fn an_unknown_workload_gets_every_deny_and_an_allow_nothing_never_the_union() {
    let mesh = mesh();
    let id = shared();
    for scope in [
        mesh.policy_scope(&id, None),
        mesh.policy_scope(&id, Some("payments-2")),
        // Named, but runs as sa/other: the certificate cannot be for it.
        mesh.policy_scope(&id, Some("other-1")),
    ] {
        let PolicyScope::Unknown { candidates, .. } = &scope else {
            panic!("{scope:?} should be unknown");
        };
        assert_eq!(candidates.len(), 2, "{scope:?}");
        let policies = mesh.authorization_policies_for(&scope);
        assert_eq!(
            names(&policies),
            [
                "payments-deny-intruder",
                "web-deny-bot",
                UNKNOWN_WORKLOAD_POLICY
            ],
            "{}",
            scope.describe()
        );
        let allow_nothing = policies.last().unwrap();
        assert_eq!(allow_nothing.action, AuthorizationAction::Allow);
        assert!(
            allow_nothing.rules.is_empty(),
            "an ALLOW without rules matches nothing"
        );
    }
}

#[test]
fn candidates_with_the_same_allows_keep_them() {
    let mut mesh = mesh();
    // One namespace-wide ALLOW and no per-app ALLOW: both candidates have the same.
    mesh.authorization_policies
        .retain(|p| p.action == AuthorizationAction::Deny);
    let mut everyone = policy("ns-allow-client", "x", AuthorizationAction::Allow, "client");
    everyone.selector.clear();
    mesh.authorization_policies.insert(0, everyone);
    let id = shared();
    let policies = |mesh: &MeshSnapshot| {
        names(&mesh.authorization_policies_for(&mesh.policy_scope(&id, None)))
    };
    assert_eq!(
        policies(&mesh),
        ["payments-deny-intruder", "web-deny-bot", "ns-allow-client"]
    );
    // No ALLOW at all on either: nothing to add (allow by default, as for each).
    mesh.authorization_policies.remove(0);
    assert_eq!(policies(&mesh), ["payments-deny-intruder", "web-deny-bot"]);
}

#[test]
fn an_identity_without_workloads_is_its_namespace_without_labels() {
    let mut mesh = mesh();
    let mut ns_wide = policy("ns-allow-client", "x", AuthorizationAction::Allow, "client");
    ns_wide.selector.clear();
    mesh.authorization_policies.push(ns_wide);
    let lone = SpiffeId::new("cluster.local", "demo", "lone").unwrap();
    let scope = mesh.policy_scope(&lone, None);
    assert_eq!(
        names(&mesh.authorization_policies_for(&scope)),
        ["ns-allow-client"]
    );
}

#[test]
fn peer_authentication_follows_the_workload() {
    use MtlsMode::*;
    let mut mesh = mesh();
    let peer = |app: &str, mode| PeerAuthentication {
        namespace: "demo".into(),
        name: app.into(),
        selector: labels(&[("app", app)]),
        mode,
        port_modes: Default::default(),
    };
    mesh.peer_authentications = vec![peer("payments", Strict), peer("web", Permissive)];
    let id = shared();
    let web = mesh.policy_scope(&id, Some("web-1"));
    assert_eq!(mesh.peer_authentication_for(&web).mode, Permissive);
    let payments = mesh.policy_scope(&id, Some("payments-1"));
    assert_eq!(mesh.peer_authentication_for(&payments).mode, Strict);
    let unknown = mesh.policy_scope(&id, None);
    assert_eq!(mesh.peer_authentication_for(&unknown).mode, Strict);
}
