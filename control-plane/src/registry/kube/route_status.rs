//! `status.parents` of Gateway API HTTPRoutes, GAMMA style: one entry per parent
//! that is a Service (the parents this mesh owns), with `controllerName`
//! [`CONTROLLER_NAME`] and two conditions:
//!
//! - `Accepted`: True (`Accepted`) when the route is served; False when it is not,
//!   with reason `NoMatchingParent` (this parent, or another Service parent of the
//!   route, is no Service or has no such port), `BackendNotFound` (a backend
//!   Service is missing: Trellis serves a route whole or not at all) or
//!   `UnsupportedValue` (a value is wrong), and every field error as the message.
//! - `ResolvedRefs`: False (`BackendNotFound`) while a backend Service or port is
//!   missing, True (`ResolvedRefs`) otherwise.
//!
//! Entries of other controllers (a Gateway parent's) are kept as they are; ours for
//! parents no longer in the spec are dropped. The list is written whole (a JSON
//! merge patch cannot touch one entry), so the write is conditional on the
//! resourceVersion read: a controller writing in between makes it fail with a
//! conflict, and the next watch event brings the list to merge into again.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

use super::status::{ACCEPTED, JudgedCondition, joined, timed_conditions};
use crate::events::CONTROLLER_NAME;
use crate::model::{Service, ServiceKey};
use crate::registry::policies::{Rejection, Verdict};

pub const RESOLVED_REFS: &str = "ResolvedRefs";

/// One parent's entry as judged, before it has times.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgedParent {
    /// The `parentRef` as the spec has it (status must repeat it exactly).
    pub parent_ref: Value,
    pub conditions: Vec<JudgedCondition>,
}

/// The references of a route as its spec writes them (read raw, so a route the
/// control plane cannot read still gets a status for its Service parents).
#[derive(Clone, Debug, Default)]
pub(super) struct RouteRefs {
    parents: Vec<Value>,
    backends: Vec<Value>,
}

impl RouteRefs {
    pub(super) fn of(spec: Option<&Value>) -> Self {
        let list = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
        let spec = spec.unwrap_or(&Value::Null);
        RouteRefs {
            parents: list(spec.get("parentRefs")),
            backends: list(spec.get("rules"))
                .iter()
                .flat_map(|rule| list(rule.get("backendRefs")))
                .collect(),
        }
    }
}

fn field<'a>(reference: &'a Value, name: &str) -> Option<&'a str> {
    reference.get(name).and_then(Value::as_str)
}

/// The Service a reference names, if it is one (`group` and `kind` take Gateway
/// API's defaults: a parent defaults to a Gateway, a backend to a Service).
fn service_of(reference: &Value, namespace: &str, default_kind: &str) -> Option<ServiceKey> {
    let default_group = if default_kind == "Service" {
        ""
    } else {
        "gateway.networking.k8s.io"
    };
    let group = field(reference, "group").unwrap_or(default_group);
    let kind = field(reference, "kind").unwrap_or(default_kind);
    if !(matches!(group, "" | "core") && kind == "Service") {
        return None;
    }
    Some(ServiceKey {
        namespace: field(reference, "namespace")
            .unwrap_or(namespace)
            .to_owned(),
        name: field(reference, "name")?.to_owned(),
    })
}

/// Why the Service (and port) a reference names is not there, if it is not.
fn missing(
    reference: &Value,
    key: &ServiceKey,
    what: &str,
    services: &BTreeMap<ServiceKey, Service>,
) -> Option<String> {
    let Some(service) = services.get(key) else {
        return Some(format!("{what} Service {key} does not exist"));
    };
    let port = reference.get("port").and_then(Value::as_u64)?;
    (!service.ports.iter().any(|p| u64::from(p.port) == port))
        .then(|| format!("{what} Service {key} has no port {port}"))
}

/// The entries this mesh owns for a route in `namespace`: none when no parent is a
/// Service.
pub(super) fn judge_parents<S>(
    refs: &RouteRefs,
    namespace: &str,
    verdict: &Verdict<S>,
    services: &BTreeMap<ServiceKey, Service>,
) -> Vec<JudgedParent> {
    let service_parents: Vec<(&Value, Option<String>)> = refs
        .parents
        .iter()
        .filter_map(|r| {
            let key = service_of(r, namespace, "Gateway")?;
            Some((r, missing(r, &key, "parent", services)))
        })
        .collect();
    let missing_backends: Vec<String> = refs
        .backends
        .iter()
        .filter_map(|r| {
            missing(
                r,
                &service_of(r, namespace, "Service")?,
                "backend",
                services,
            )
        })
        .collect();
    let resolved_refs = if missing_backends.is_empty() {
        condition(RESOLVED_REFS, true, "ResolvedRefs", String::new())
    } else {
        condition(
            RESOLVED_REFS,
            false,
            "BackendNotFound",
            joined(&missing_backends),
        )
    };
    let mut judged: Vec<JudgedParent> = Vec::with_capacity(service_parents.len());
    for (parent_ref, parent_missing) in service_parents {
        // The same parent twice in the spec has one entry.
        if judged.iter().any(|j| j.parent_ref == *parent_ref) {
            continue;
        }
        let accepted = match &verdict.rejected {
            None => condition(ACCEPTED, true, "Accepted", String::new()),
            Some((rejection, errors)) => {
                let reason = if parent_missing.is_some() {
                    "NoMatchingParent"
                } else if *rejection == Rejection::Invalid {
                    "UnsupportedValue"
                } else if !missing_backends.is_empty() {
                    "BackendNotFound"
                } else {
                    "NoMatchingParent"
                };
                condition(ACCEPTED, false, reason, joined(errors))
            }
        };
        judged.push(JudgedParent {
            parent_ref: parent_ref.clone(),
            conditions: vec![accepted, resolved_refs.clone()],
        });
    }
    judged
}

fn condition(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
) -> JudgedCondition {
    JudgedCondition {
        type_,
        status,
        reason,
        message,
    }
}

/// `status.parents` of a route as read (anything unreadable counts as none).
pub(super) fn current_parents(status: Option<&Value>) -> Vec<Value> {
    status
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn is_ours(entry: &Value) -> bool {
    field(entry, "controllerName") == Some(CONTROLLER_NAME)
}

fn entry(parent_ref: &Value, conditions: &[Condition]) -> Value {
    json!({
        "parentRef": parent_ref,
        "controllerName": CONTROLLER_NAME,
        "conditions": conditions,
    })
}

/// The `status.parents` to write, or `None` when `current` already says what
/// `judged` does. Others' entries stay as they are and first; ours follow.
pub fn next_parents(
    current: &[Value],
    judged: &[JudgedParent],
    observed_generation: Option<i64>,
    now: &Time,
) -> Option<Vec<Value>> {
    let conditions_of = |parent_ref: &Value| -> Vec<Condition> {
        current
            .iter()
            .filter(|e| is_ours(e) && e.get("parentRef") == Some(parent_ref))
            .find_map(|e| serde_json::from_value(e.get("conditions")?.clone()).ok())
            .unwrap_or_default()
    };
    let ours: Vec<(Value, Vec<Condition>)> = judged
        .iter()
        .map(|j| {
            let before = conditions_of(&j.parent_ref);
            let after = timed_conditions(&before, &j.conditions, observed_generation, now);
            (j.parent_ref.clone(), after)
        })
        .collect();
    let current_ours = current.iter().filter(|e| is_ours(e)).count();
    let same = current_ours == ours.len()
        && ours.iter().all(|(parent_ref, conditions)| {
            let before = conditions_of(parent_ref);
            before.len() == conditions.len() && conditions.iter().all(|c| before.contains(c))
        });
    if same {
        return None;
    }
    let mut next: Vec<Value> = current.iter().filter(|e| !is_ours(e)).cloned().collect();
    next.extend(ours.iter().map(|(r, c)| entry(r, c)));
    Some(next)
}

#[cfg(test)]
mod tests;
