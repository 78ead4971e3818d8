//! Kubernetes Events for what an operator should see in `kubectl describe`: a route
//! or policy refused or served with a warning (written by the leader, once per
//! change of its status), a certificate refused to a Pod, a Pod the injector
//! refused. kube-runtime's [`Recorder`] writes them (`events.k8s.io/v1`; a repeat
//! within minutes becomes a series on the same Event). One task writes, behind a
//! bounded queue: no admission or certificate request waits on the API server, and
//! a flood of refusals costs at most the queue.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

/// `reportingController` of every Event, and the HTTPRoute parent status'
/// `controllerName`.
pub const CONTROLLER_NAME: &str = "trellis.io/control-plane";
/// Events waiting to be written; more are dropped (and logged).
const QUEUE: usize = 256;
/// The Events API caps `note` at 1 kB.
const MAX_NOTE: usize = 1024;

/// One Event to record.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshEvent {
    /// The object the Event is about (it lands in that object's namespace).
    pub regarding: ObjectReference,
    pub warning: bool,
    /// Why, in PascalCase: `Invalid`, `CertificateRefused`, ...
    pub reason: String,
    /// What was done, in PascalCase: `Validate`, `IssueCertificate`, `Inject`.
    pub action: &'static str,
    pub note: String,
}

/// Where Events go. Cloning shares the queue; a disabled sink drops everything
/// (file mode has no API server to write to).
#[derive(Clone, Debug, Default)]
pub struct EventSink {
    queue: Option<mpsc::Sender<MeshEvent>>,
}

impl EventSink {
    pub fn disabled() -> Self {
        EventSink::default()
    }

    /// A sink whose Events arrive on the receiver (tests, or another writer).
    pub fn channel() -> (Self, mpsc::Receiver<MeshEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (EventSink { queue: Some(tx) }, rx)
    }

    /// A sink that writes Events through the API as `instance` (this replica's Pod
    /// name); the task runs until every clone of the sink is dropped.
    pub fn spawn(client: Client, instance: String) -> (Self, tokio::task::JoinHandle<()>) {
        let (sink, rx) = Self::channel();
        let reporter = Reporter {
            controller: CONTROLLER_NAME.to_owned(),
            instance: Some(instance),
        };
        let task = tokio::spawn(publish(Recorder::new(client, reporter), rx));
        (sink, task)
    }

    /// Queues `event`; never waits.
    pub fn record(&self, event: MeshEvent) {
        let Some(queue) = &self.queue else {
            return;
        };
        if let Err(e) = queue.try_send(event) {
            let event = match &e {
                mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev,
            };
            tracing::debug!(
                reason = %event.reason,
                name = ?event.regarding.name,
                namespace = ?event.regarding.namespace,
                "event dropped: the queue is full or closed"
            );
        }
    }
}

async fn publish(recorder: Recorder, mut queue: mpsc::Receiver<MeshEvent>) {
    while let Some(event) = queue.recv().await {
        let published = recorder
            .publish(
                &Event {
                    type_: if event.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: event.reason.clone(),
                    note: Some(truncated(event.note.clone(), MAX_NOTE)),
                    action: event.action.to_owned(),
                    secondary: None,
                },
                &event.regarding,
            )
            .await;
        match published {
            Ok(()) => tracing::debug!(
                reason = %event.reason,
                kind = ?event.regarding.kind,
                namespace = ?event.regarding.namespace,
                name = ?event.regarding.name,
                "event recorded"
            ),
            Err(e) => tracing::warn!(
                reason = %event.reason,
                kind = ?event.regarding.kind,
                namespace = ?event.regarding.namespace,
                name = ?event.regarding.name,
                error = %e,
                "recording an event failed"
            ),
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
pub(crate) fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// A Pod by namespace and name (the API server names the event after it).
pub fn pod_reference(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}

/// What a Pod being admitted can be named by: itself when it has a name, else its
/// controller (a ReplicaSet, a Job: a Pod with only `generateName` has no name yet,
/// and an Event cannot be named after one).
pub fn admitted_pod_reference(namespace: &str, meta: &ObjectMeta) -> Option<ObjectReference> {
    if let Some(name) = meta.name.as_deref().filter(|n| !n.is_empty()) {
        return Some(pod_reference(namespace, name));
    }
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))?;
    Some(ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        namespace: Some(namespace.to_owned()),
        name: Some(owner.name.clone()),
        uid: Some(owner.uid.clone()),
        ..ObjectReference::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncated("short".into(), 10), "short");
        let long = "é".repeat(600);
        let cut = truncated(long, MAX_NOTE);
        assert!(
            cut.len() <= MAX_NOTE && cut.ends_with("..."),
            "{}",
            cut.len()
        );
    }

    #[test]
    fn an_unnamed_pod_is_referred_to_by_its_controller() {
        let mut meta = ObjectMeta {
            generate_name: Some("web-5d9c-".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(admitted_pod_reference("shop", &meta), None);
        meta.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "web-5d9c".into(),
            uid: "u-1".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        let owner = admitted_pod_reference("shop", &meta).unwrap();
        assert_eq!(
            (owner.kind.as_deref(), owner.name.as_deref()),
            (Some("ReplicaSet"), Some("web-5d9c"))
        );
        meta.name = Some("web-1".into());
        let pod = admitted_pod_reference("shop", &meta).unwrap();
        assert_eq!(
            (pod.kind.as_deref(), pod.namespace.as_deref()),
            (Some("Pod"), Some("shop"))
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_waiting() {
        let (sink, mut rx) = EventSink::channel();
        let event = MeshEvent {
            regarding: pod_reference("shop", "web-1"),
            warning: true,
            reason: "CertificateRefused".into(),
            action: "IssueCertificate",
            note: String::new(),
        };
        for _ in 0..QUEUE + 10 {
            sink.record(event.clone());
        }
        let mut received = 0;
        while rx.try_recv().is_ok() {
            received += 1;
        }
        assert_eq!(received, QUEUE);
        EventSink::disabled().record(event);
    }
}
