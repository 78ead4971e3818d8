//! What the kubelet knows of a pod's containers, and the Pod status built from it
//! (phase, IPs, conditions, container statuses) that the EndpointSlice, ReplicaSet and
//! Job controllers act on.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// One container's record.
#[derive(Debug, Clone)]
pub struct ContainerRecord {
    pub name: String,
    pub image: String,
    /// An init container with `restartPolicy: Always`.
    pub sidecar: bool,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub restart_count: i32,
    pub started: bool,
    pub ready: bool,
    pub pid: Option<u32>,
}

impl ContainerRecord {
    pub fn new(name: &str, image: &str, sidecar: bool) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            sidecar,
            state: waiting("PodInitializing", None),
            last_state: None,
            restart_count: 0,
            started: false,
            ready: false,
            pid: None,
        }
    }

    pub fn set_running(&mut self, pid: Option<u32>) {
        self.pid = pid;
        self.state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(now()),
            }),
            ..Default::default()
        };
    }

    pub fn set_terminated(&mut self, code: i32) {
        let started_at = self
            .state
            .running
            .as_ref()
            .and_then(|r| r.started_at.clone());
        self.pid = None;
        self.started = false;
        // A plain init container that finished with 0 reports ready: see `to_status`.
        self.ready = false;
        self.state = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                started_at,
                finished_at: Some(now()),
                ..Default::default()
            }),
            ..Default::default()
        };
    }

    pub fn set_waiting(&mut self, reason: &str, message: Option<String>) {
        if self.state.terminated.is_some() {
            self.last_state = Some(self.state.clone());
        }
        self.state = waiting(reason, message);
    }

    fn to_status(&self, init: bool) -> ContainerStatus {
        let ready = if init && !self.sidecar {
            self.state
                .terminated
                .as_ref()
                .is_some_and(|t| t.exit_code == 0)
        } else {
            self.ready
        };
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: String::new(),
            container_id: self.pid.map(|p| format!("trellis-netns://{p}")),
            ready,
            started: Some(self.started),
            restart_count: self.restart_count,
            state: Some(self.state.clone()),
            last_state: self.last_state.clone(),
            ..Default::default()
        }
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// A pod as the kubelet sees it.
#[derive(Debug, Clone)]
pub struct PodState {
    pub phase: Phase,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub network_ready: bool,
    pub initialized: bool,
    pub inits: Vec<ContainerRecord>,
    pub apps: Vec<ContainerRecord>,
    pub start_time: Time,
}

impl PodState {
    /// Containers that count for readiness: app containers and sidecars.
    pub fn containers_ready(&self) -> bool {
        self.apps.iter().all(|c| c.ready)
            && self.inits.iter().filter(|c| c.sidecar).all(|c| c.ready)
    }

    /// The `status` of the Pod, for a merge patch.
    pub fn to_status(
        &self,
        pod_ip: Option<std::net::Ipv4Addr>,
        host_ip: std::net::Ipv4Addr,
    ) -> Value {
        let terminal = self.phase.is_terminal();
        let containers_ready = !terminal && self.containers_ready();
        let ready = containers_ready && self.initialized && self.phase == Phase::Running;
        let cond = |kind: &str, ok: bool, reason: Option<&str>| PodCondition {
            type_: kind.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.map(Into::into),
            last_transition_time: Some(self.start_time.clone()),
            ..Default::default()
        };
        let not_ready_reason = if terminal {
            Some("PodCompleted")
        } else {
            Some("ContainersNotReady")
        };
        let conditions = vec![
            cond("PodScheduled", true, None),
            cond(
                "PodReadyToStartContainers",
                self.network_ready && !terminal,
                None,
            ),
            cond(
                "Initialized",
                self.initialized,
                (!self.initialized).then_some("ContainersNotInitialized"),
            ),
            cond(
                "ContainersReady",
                containers_ready,
                (!containers_ready).then_some(not_ready_reason).flatten(),
            ),
            cond(
                "Ready",
                ready,
                (!ready).then_some(not_ready_reason).flatten(),
            ),
        ];
        let ips = pod_ip.map(|ip| vec![PodIP { ip: ip.to_string() }]);
        json!({
            "phase": self.phase.as_str(),
            "reason": self.reason,
            "message": self.message,
            "hostIP": host_ip.to_string(),
            "hostIPs": [{ "ip": host_ip.to_string() }],
            "podIP": pod_ip.map(|ip| ip.to_string()),
            "podIPs": ips,
            "startTime": self.start_time,
            "conditions": conditions,
            "initContainerStatuses": self.inits.iter().map(|c| c.to_status(true)).collect::<Vec<_>>(),
            "containerStatuses": self.apps.iter().map(|c| c.to_status(false)).collect::<Vec<_>>(),
            // No qosClass: the API server sets it at creation from the resources (a
            // pod with requests is not BestEffort) and refuses any change.
        })
    }
}
