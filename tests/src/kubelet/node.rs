//! The Node: registered with a Ready condition, its address and capacity, and kept
//! alive by a heartbeat (status and a Lease in `kube-node-lease`, every 10 s).

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::config::KubeletConfig;

const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_SECONDS: i32 = 40;
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Creates the Node if missing (without the not-ready taint the API server adds, since
/// no node-lifecycle controller would lift it) and marks it Ready.
pub async fn register(client: &Client, cfg: &KubeletConfig) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": cfg.node_name,
            "labels": {
                "kubernetes.io/hostname": cfg.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
            },
        },
        "spec": { "podCIDR": cfg.pod_cidr.to_string(), "podCIDRs": [cfg.pod_cidr.to_string()] },
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(node = %cfg.node_name, "node created"),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => return Err(e).context("create node"),
    }
    nodes
        .patch(
            &cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "taints": null } })),
        )
        .await
        .context("clear node taints")?;
    heartbeat_once(client, cfg).await
}

/// Writes the Ready condition and renews the Lease.
pub async fn heartbeat_once(client: &Client, cfg: &KubeletConfig) -> Result<()> {
    let now = Timestamp::now().to_string();
    // The conditions never change, so they last changed when this kubelet started.
    static SINCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let since = SINCE.get_or_init(|| now.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": kind, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        })
    };
    let capacity = json!({ "cpu": cpus.to_string(), "memory": "16Gi", "pods": "110", "ephemeral-storage": "20Gi" });
    let status = json!({
        "status": {
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory accounting"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk accounting"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "no pid accounting"),
                condition("Ready", "True", "KubeletReady", "trellis-test-kubelet is posting ready status"),
            ],
            "addresses": [
                { "type": "InternalIP", "address": cfg.node_ip.to_string() },
                { "type": "Hostname", "address": cfg.node_name },
            ],
            "capacity": capacity,
            "allocatable": capacity,
            "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
            "nodeInfo": {
                "architecture": std::env::consts::ARCH,
                "bootID": "", "machineID": "", "systemUUID": "",
                "containerRuntimeVersion": "trellis-netns://0.1",
                "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "v1.36.3-trellis-test",
                "operatingSystem": "linux", "osImage": "trellis test bed",
            },
        }
    });
    nodes
        .patch_status(
            &cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .context("node status")?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let micro = Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": cfg.node_name, "namespace": LEASE_NAMESPACE },
        "spec": { "holderIdentity": cfg.node_name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro },
    });
    leases
        .patch(
            &cfg.node_name,
            &PatchParams::apply("trellis-test-kubelet").force(),
            &Patch::Apply(lease),
        )
        .await
        .context("node lease")?;
    Ok(())
}

/// Heartbeats forever; failures are logged and retried at the next beat.
pub async fn heartbeat(client: Client, cfg: std::sync::Arc<KubeletConfig>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = heartbeat_once(&client, &cfg).await {
            tracing::warn!(error = format!("{e:#}"), "node heartbeat failed");
        }
    }
}
