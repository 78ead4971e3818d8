//! Route parent statuses: what is judged per parent, what is kept of others'.

use serde_json::json;

use super::*;
use crate::api::FieldError;
use crate::model::{AppProtocol, ServicePort, TargetPort};

fn at(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
}

fn services() -> BTreeMap<ServiceKey, Service> {
    let key = ServiceKey {
        namespace: "shop".into(),
        name: "echo".into(),
    };
    let service = Service {
        key: key.clone(),
        vips: Vec::new(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            target_port: TargetPort::Number(8080),
            protocol: AppProtocol::Http,
        }],
        selector: BTreeMap::new(),
    };
    BTreeMap::from([(key, service)])
}

fn refs(spec: Value) -> RouteRefs {
    RouteRefs::of(Some(&spec))
}

fn verdict(rejected: Option<(Rejection, &str)>) -> Verdict<()> {
    let mut v = Verdict::new(());
    v.rejected = rejected.map(|(r, message)| {
        (
            r,
            vec![FieldError {
                field: "spec".into(),
                reason: message.into(),
            }],
        )
    });
    v
}

/// (type, status, reason) of each condition of each parent.
fn summary(judged: &[JudgedParent]) -> Vec<Vec<(&str, bool, &str)>> {
    judged
        .iter()
        .map(|p| {
            p.conditions
                .iter()
                .map(|c| (c.type_, c.status, c.reason))
                .collect()
        })
        .collect()
}

const SERVICE_PARENT: &str = r#"{"group": "", "kind": "Service", "name": "echo", "port": 80}"#;

#[test]
fn a_served_route_is_accepted_by_each_service_parent_only() {
    let parent: Value = serde_json::from_str(SERVICE_PARENT).unwrap();
    let spec = json!({
        "parentRefs": [parent, {"name": "public-gw"}, parent],
        "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]
    });
    let judged = judge_parents(&refs(spec), "shop", &verdict(None), &services());
    // The Gateway is another controller's; the repeated parent has one entry.
    assert_eq!(judged.len(), 1);
    assert_eq!(judged[0].parent_ref, parent);
    assert_eq!(
        summary(&judged),
        [[
            (ACCEPTED, true, "Accepted"),
            (RESOLVED_REFS, true, "ResolvedRefs")
        ]]
    );
}

#[test]
fn a_rejected_route_says_why_for_each_parent() {
    let spec = json!({
        "parentRefs": [
            {"group": "", "kind": "Service", "name": "echo", "port": 80},
            {"group": "", "kind": "Service", "name": "gone"},
            {"group": "core", "kind": "Service", "name": "echo", "port": 81},
        ],
        "rules": [{"backendRefs": [{"name": "missing", "port": 80}]}]
    });
    let rejected = verdict(Some((
        Rejection::TargetNotFound,
        "parent Service gone.shop does not exist",
    )));
    let judged = judge_parents(&refs(spec), "shop", &rejected, &services());
    assert_eq!(
        summary(&judged),
        [
            [
                (ACCEPTED, false, "BackendNotFound"),
                (RESOLVED_REFS, false, "BackendNotFound")
            ],
            [
                (ACCEPTED, false, "NoMatchingParent"),
                (RESOLVED_REFS, false, "BackendNotFound")
            ],
            [
                (ACCEPTED, false, "NoMatchingParent"),
                (RESOLVED_REFS, false, "BackendNotFound")
            ],
        ]
    );
    assert_eq!(
        judged[0].conditions[0].message,
        "spec: parent Service gone.shop does not exist"
    );
    assert_eq!(
        judged[0].conditions[1].message,
        "backend Service missing.shop does not exist"
    );

    // Invalid values, with every reference there.
    let spec = json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}]});
    let invalid = verdict(Some((
        Rejection::Invalid,
        "spec.rules[0].timeouts.request: bad",
    )));
    let judged = judge_parents(&refs(spec), "shop", &invalid, &services());
    assert_eq!(
        summary(&judged),
        [[
            (ACCEPTED, false, "UnsupportedValue"),
            (RESOLVED_REFS, true, "ResolvedRefs")
        ]]
    );

    // Only Gateways: nothing of ours.
    let spec = json!({"parentRefs": [{"name": "public-gw"}]});
    assert!(judge_parents(&refs(spec), "shop", &invalid, &services()).is_empty());
}

fn judged_parent(accepted: bool) -> JudgedParent {
    JudgedParent {
        parent_ref: serde_json::from_str(SERVICE_PARENT).unwrap(),
        conditions: vec![
            JudgedCondition {
                type_: ACCEPTED,
                status: accepted,
                reason: if accepted {
                    "Accepted"
                } else {
                    "UnsupportedValue"
                },
                message: String::new(),
            },
            JudgedCondition {
                type_: RESOLVED_REFS,
                status: true,
                reason: "ResolvedRefs",
                message: String::new(),
            },
        ],
    }
}

#[test]
fn others_entries_are_kept_and_ours_written_once() {
    let gateway = json!({
        "parentRef": {"name": "public-gw"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    });
    let stale_ours = json!({
        "parentRef": {"group": "", "kind": "Service", "name": "old"},
        "controllerName": CONTROLLER_NAME,
        "conditions": []
    });
    let current = vec![gateway.clone(), stale_ours];
    let next = next_parents(&current, &[judged_parent(true)], Some(2), &at(100)).unwrap();
    assert_eq!(next.len(), 2, "{next:#?}");
    assert_eq!(next[0], gateway, "the Gateway's entry is untouched");
    assert_eq!(next[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(next[1]["parentRef"]["name"], "echo");
    assert_eq!(next[1]["conditions"][0]["type"], "Accepted");
    assert_eq!(next[1]["conditions"][0]["observedGeneration"], 2);

    // As the API server gives it back (in any order): nothing to write.
    let echoed = vec![next[1].clone(), gateway.clone()];
    assert_eq!(
        next_parents(&echoed, &[judged_parent(true)], Some(2), &at(200)),
        None
    );
    // Rejected now: rewritten, the transition time moves with the status only.
    let next = next_parents(&echoed, &[judged_parent(false)], Some(3), &at(300)).unwrap();
    let ours = &next[1]["conditions"];
    assert_eq!(ours[0]["status"], "False");
    assert_eq!(ours[0]["lastTransitionTime"], json!(at(300)));
    assert_eq!(ours[1]["lastTransitionTime"], json!(at(100)));
    // No Service parent any more: ours go, the Gateway's stays.
    assert_eq!(
        next_parents(&echoed, &[], Some(4), &at(400)),
        Some(vec![gateway])
    );
}
