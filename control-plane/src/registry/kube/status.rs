//! `status.conditions` of the Trellis policy objects: what the registry judged,
//! written back by the replica that leads.
//!
//! - `Accepted`: True (reason `Accepted`) when the object is served; False with
//!   reason `Invalid`, `TargetNotFound` or `Conflicted` and the field errors as the
//!   message when it is not (Gateway API's policy conditions).
//! - `L7RulesOnOpaquePort`: True (reason `OpaquePort`) on an AuthorizationPolicy whose
//!   HTTP rules reach a port declared `tcp` or `opaque`. It is still `Accepted`, as it
//!   is enforced (failing closed); this condition says how. Absent otherwise.
//!
//! Conditions of other types are left as they are. `lastTransitionTime` moves only
//! when a condition's status does. A status is written (a JSON merge patch of the
//! `/status` subresource, field manager `trellis-control`, conditional on the
//! resourceVersion judged) only when it differs from the object's, so writing never
//! feeds itself. HTTPRoutes get Gateway API's per-parent status instead
//! ([`super::route_status`]).
//!
//! Each write of a refusal or a warning is also a Kubernetes Event on the object
//! (by the leader, as only it writes; once per change, as writes are).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tokio::sync::watch;

use super::route_status::{self, JudgedParent};
use crate::events::{EventSink, MeshEvent};
use crate::registry::RegistryErrorView;
use crate::registry::policies::Verdict;

pub const FIELD_MANAGER: &str = "trellis-control";
pub const ACCEPTED: &str = "Accepted";
pub const L7_RULES_ON_OPAQUE_PORT: &str = "L7RulesOnOpaquePort";
/// The condition types this control plane owns on its objects.
const OWNED: [&str; 2] = [ACCEPTED, L7_RULES_ON_OPAQUE_PORT];
/// Kubernetes caps a condition's message at 32768 bytes.
const MAX_MESSAGE: usize = 32_768;
/// After a failed write, how long before trying again without a new report.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The route and policy kinds, read untyped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    HttpRoute,
    TrafficPolicy,
    AuthorizationPolicy,
    PeerAuthentication,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::HttpRoute => "HTTPRoute",
            PolicyKind::TrafficPolicy => "TrafficPolicy",
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
        }
    }

    pub fn resource(self) -> ApiResource {
        match self {
            PolicyKind::HttpRoute => super::http_route_resource(),
            _ => ApiResource::from_gvk(&GroupVersionKind::gvk(
                "trellis.io",
                "v1alpha1",
                self.as_str(),
            )),
        }
    }
}

/// A condition as judged, before it has a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JudgedCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// One object and the conditions it should have.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusTarget {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// The version judged: a write is conditional on it.
    pub resource_version: Option<String>,
    /// For the Events about it.
    pub uid: Option<String>,
    /// `status.conditions` of that version.
    pub current: Vec<Condition>,
    pub judged: Vec<JudgedCondition>,
    /// HTTPRoute: `status.parents` of that version, every controller's.
    pub current_parents: Vec<serde_json::Value>,
    /// HTTPRoute: the entries for its Service parents.
    pub parents: Vec<JudgedParent>,
}

/// What the registry judged, for every Trellis policy object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusReport {
    pub targets: Vec<StatusTarget>,
}

impl StatusReport {
    /// Adds an object and its verdict. An HTTPRoute comes with its parents judged;
    /// one with no Service parent, and none of ours in its status, is another
    /// controller's alone.
    pub(super) fn push<S>(&mut self, mut target: StatusTarget, verdict: &Verdict<S>) {
        if target.kind == PolicyKind::HttpRoute {
            let ours = target
                .current_parents
                .iter()
                .any(|e| e["controllerName"] == crate::events::CONTROLLER_NAME);
            if target.parents.is_empty() && !ours {
                return;
            }
        } else {
            target.judged = judge(verdict);
        }
        self.targets.push(target);
    }

    pub(super) fn sort(&mut self) {
        self.targets
            .sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    }

    /// The objects served with a warning, for the admin view.
    pub fn warnings(&self) -> Vec<RegistryErrorView> {
        self.targets
            .iter()
            .flat_map(|t| {
                t.judged
                    .iter()
                    .filter(|c| c.type_ == L7_RULES_ON_OPAQUE_PORT && c.status)
                    .map(|c| RegistryErrorView {
                        file: format!("kube:{} {}/{}", t.kind.as_str(), t.namespace, t.name),
                        line: None,
                        reason: c.message.clone(),
                    })
            })
            .collect()
    }
}

fn judge<S>(verdict: &Verdict<S>) -> Vec<JudgedCondition> {
    let mut judged = vec![match &verdict.rejected {
        None => JudgedCondition {
            type_: ACCEPTED,
            status: true,
            reason: "Accepted",
            message: String::new(),
        },
        Some((rejection, errors)) => JudgedCondition {
            type_: ACCEPTED,
            status: false,
            reason: rejection.as_str(),
            message: joined(errors),
        },
    }];
    if !verdict.l7_on_opaque_ports.is_empty() {
        judged.push(JudgedCondition {
            type_: L7_RULES_ON_OPAQUE_PORT,
            status: true,
            reason: "OpaquePort",
            message: joined(&verdict.l7_on_opaque_ports),
        });
    }
    judged
}

pub(super) fn joined<T: ToString>(items: &[T]) -> String {
    let mut message = items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

/// `status.conditions` of an object; an unreadable one counts as none (and will be
/// overwritten).
pub(super) fn current_conditions(o: &DynamicObject) -> Vec<Condition> {
    o.data
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// The conditions to write, or `None` when `current` already says what `judged`
/// does. Ours take `observed_generation`; a condition keeps its
/// `lastTransitionTime` unless its status changes; others' conditions stay.
pub fn next_conditions(
    current: &[Condition],
    judged: &[JudgedCondition],
    observed_generation: Option<i64>,
    now: &Time,
) -> Option<Vec<Condition>> {
    let mut next = timed_conditions(current, judged, observed_generation, now);
    next.extend(
        current
            .iter()
            .filter(|c| !OWNED.contains(&c.type_.as_str()))
            .cloned(),
    );
    let same = next.len() == current.len() && next.iter().all(|n| current.contains(n));
    (!same).then_some(next)
}

/// `judged` as conditions: each keeps the `lastTransitionTime` of the `current`
/// condition of its type and status, or takes `now`.
pub(super) fn timed_conditions(
    current: &[Condition],
    judged: &[JudgedCondition],
    observed_generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    judged
        .iter()
        .map(|j| {
            let status = if j.status { "True" } else { "False" };
            let last_transition_time = current
                .iter()
                .find(|c| c.type_ == j.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: j.type_.to_owned(),
                status: status.to_owned(),
                reason: j.reason.to_owned(),
                message: j.message.clone(),
                observed_generation,
                last_transition_time,
            }
        })
        .collect()
}

/// How the writer is doing (for the admin view and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterProgress {
    /// Reports looked at, as leader or not.
    pub reports_seen: u64,
    /// Objects in the last report looked at.
    pub targets: usize,
    /// Whether this replica led when it looked at the last one.
    pub leader: bool,
    pub patched: u64,
    /// Writes of the last pass that failed (tried again later).
    pub failed: usize,
}

/// Writes the statuses `reports` asks for while `leader` says this replica leads,
/// and records an Event for each refusal or warning written. A closed `leader`
/// channel keeps its last value. Runs until `reports` closes.
pub async fn write_statuses(
    client: Client,
    mut reports: watch::Receiver<Arc<StatusReport>>,
    mut leader: watch::Receiver<bool>,
    progress: watch::Sender<WriterProgress>,
    events: EventSink,
) {
    let mut writer = StatusWriter {
        client,
        events,
        written: HashMap::new(),
    };
    let mut leader_open = true;
    loop {
        let leads = *leader.borrow_and_update();
        let report = reports.borrow_and_update().clone();
        let (patched, failed) = if leads {
            writer.pass(&report).await
        } else {
            (0, 0)
        };
        progress.send_modify(|p| {
            p.reports_seen += 1;
            p.targets = report.targets.len();
            p.leader = leads;
            p.patched += patched;
            p.failed = failed;
        });
        tokio::select! {
            changed = reports.changed() => if changed.is_err() {
                return;
            },
            changed = leader.changed(), if leader_open => if changed.is_err() {
                leader_open = false;
            },
            _ = tokio::time::sleep(RETRY_AFTER), if failed > 0 => {}
        }
    }
}

type TargetKey = (PolicyKind, String, String);

/// What a write was for: the version judged and the verdict.
type Written = (Option<String>, Vec<JudgedCondition>, Vec<JudgedParent>);

struct StatusWriter {
    client: Client,
    events: EventSink,
    /// What was written for which version: until the watch brings the version the
    /// write made, a report still shows the old status, which must not be written
    /// again.
    written: HashMap<TargetKey, Written>,
}

impl StatusWriter {
    /// Writes what differs; returns (patched, failed).
    async fn pass(&mut self, report: &StatusReport) -> (u64, usize) {
        let (mut patched, mut failed) = (0, 0);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        for t in &report.targets {
            let key = (t.kind, t.namespace.clone(), t.name.clone());
            if self.written.get(&key).is_some_and(|(rv, judged, parents)| {
                *rv == t.resource_version && *judged == t.judged && *parents == t.parents
            }) {
                continue;
            }
            let status = if t.kind == PolicyKind::HttpRoute {
                route_status::next_parents(&t.current_parents, &t.parents, t.generation, &now)
                    .map(|parents| serde_json::json!({ "parents": parents }))
            } else {
                next_conditions(&t.current, &t.judged, t.generation, &now)
                    .map(|conditions| serde_json::json!({ "conditions": conditions }))
            };
            let Some(status) = status else {
                continue;
            };
            match self.patch(t, status).await {
                Ok(()) => {
                    patched += 1;
                    for event in events_for(t) {
                        self.events.record(event);
                    }
                    self.written.insert(
                        key,
                        (
                            t.resource_version.clone(),
                            t.judged.clone(),
                            t.parents.clone(),
                        ),
                    );
                }
                Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {
                    // Deleted or changed since: the watch brings what to do next.
                    tracing::debug!(kind = t.kind.as_str(), namespace = %t.namespace, name = %t.name, code = s.code, "status not written: the object moved on");
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(kind = t.kind.as_str(), namespace = %t.namespace, name = %t.name, error = %e, "writing the status failed; will try again");
                }
            }
        }
        self.written.retain(|(kind, ns, name), _| {
            report
                .targets
                .iter()
                .any(|t| t.kind == *kind && t.namespace == *ns && t.name == *name)
        });
        (patched, failed)
    }

    async fn patch(&self, t: &StatusTarget, status: serde_json::Value) -> Result<(), kube::Error> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &t.namespace, &t.kind.resource());
        let mut body = serde_json::json!({ "status": status });
        if let Some(rv) = &t.resource_version {
            body["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        api.patch_status(&t.name, &params, &Patch::Merge(&body))
            .await?;
        tracing::info!(
            kind = t.kind.as_str(),
            namespace = %t.namespace,
            name = %t.name,
            generation = t.generation,
            "status written"
        );
        Ok(())
    }
}

/// The Events a write of `t`'s status stands for: a refusal or a warning, one per
/// reason.
pub fn events_for(t: &StatusTarget) -> Vec<MeshEvent> {
    let resource = t.kind.resource();
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(resource.api_version),
        kind: Some(resource.kind),
        namespace: Some(t.namespace.clone()),
        name: Some(t.name.clone()),
        uid: t.uid.clone(),
        ..Default::default()
    };
    let what = format!("{} {}/{}", t.kind.as_str(), t.namespace, t.name);
    let parent_conditions = t.parents.iter().flat_map(|p| {
        let parent = p.parent_ref["name"].as_str().unwrap_or_default().to_owned();
        p.conditions.iter().map(move |c| (Some(parent.clone()), c))
    });
    let mut events: Vec<MeshEvent> = Vec::new();
    for (parent, c) in t.judged.iter().map(|c| (None, c)).chain(parent_conditions) {
        let (note, action) = match (c.type_, c.status) {
            (ACCEPTED, false) => match &parent {
                Some(parent) => (
                    format!(
                        "{what} is not served for parent Service {parent}: {}",
                        c.message
                    ),
                    "Route",
                ),
                None => (format!("{what} is not served: {}", c.message), "Validate"),
            },
            (L7_RULES_ON_OPAQUE_PORT, true) => {
                (format!("{what} is served, but {}", c.message), "Validate")
            }
            _ => continue,
        };
        if events.iter().any(|e| e.reason == c.reason) {
            continue;
        }
        events.push(MeshEvent {
            regarding: regarding.clone(),
            warning: true,
            reason: c.reason.to_owned(),
            action,
            note,
        });
    }
    events
}

#[cfg(test)]
mod tests;
