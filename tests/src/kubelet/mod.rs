//! A small kubelet (and kube-proxy) for the real-API-server test cluster: pods run as
//! network namespaces on the test bed's bridge, their containers as local binaries.
//!
//! The binary `trellis-test-kubelet run` lives in the bed's node network namespace
//! (entered with `nsenter --net`, so it shares the test's mount namespace and the pod
//! namespaces it makes are visible to `ip netns` and to the bed's sweep). It
//!
//! - registers its Node (Ready, address, capacity) and keeps it alive (status and a
//!   Lease in `kube-node-lease` every 10 s);
//! - is the scheduler too: binds every Pending, unbound Pod of the default scheduler to
//!   its node with the Binding subresource;
//! - runs a bound Pod as namespace `<bed-id>-k<n>` with an address from 10.244.128.0/17
//!   (the bed hands out 10.244.0.2 upwards); init containers in order (the injected
//!   `trellis-proxy init` writes the pod's iptables for real), native sidecars
//!   (`restartPolicy: Always`) started and kept running before the next init container,
//!   then app containers, restarted per the pod's restartPolicy with a backoff capped at
//!   10 s; a pod whose app containers all finish (Never/OnFailure) is Succeeded or Failed
//!   and its sidecars are stopped, so Jobs complete;
//! - maps images to binaries by bare name (`--images trellis-proxy=...`); `command`
//!   replaces the binary (its first word is mapped by file name, else run as written),
//!   `args` are passed; `$(VAR)` expanded; `runAsUser`/`runAsGroup` honoured;
//! - gives env from the spec (`value`, downward-API `fieldRef`, `configMapKeyRef`,
//!   `secretKeyRef`, `envFrom`) plus `KUBERNETES_SERVICE_HOST`/`_PORT`;
//! - writes `emptyDir`, `configMap`, `secret`, `downwardAPI` and `projected` volumes
//!   (service-account tokens from a real TokenRequest bound to the Pod, refreshed at 80%
//!   of their life) and mounts them at each container's `volumeMounts` in a private
//!   mount namespace;
//! - probes (startup, readiness, liveness; httpGet over HTTP or HTTPS, tcpSocket, grpc,
//!   exec) from the node namespace to the pod IP, and writes Pod status (phase, IPs,
//!   conditions, container statuses) for the controllers;
//! - deletes gracefully: SIGTERM to app containers, then sidecars in reverse order,
//!   SIGKILL at the grace period (capped at 10 s), namespace removed, then the Pod
//!   object deleted with grace 0;
//! - does kube-proxy's job in each pod namespace ([`services`]).
//!
//! It does NOT: pull or isolate images (containers share the node's file system, PID and
//! IPC namespaces, and users), enforce resources, capabilities, seccomp, readOnlyRootFilesystem
//! or runAsNonRoot, serve the kubelet API (no `kubectl logs`/`exec`/`port-forward`: logs are
//! files under `<state-dir>/pods/`), support hostNetwork, hostPath, PVCs, ephemeral
//! containers, lifecycle hooks, service links, DNS, headless or ExternalName Services,
//! resourceFieldRef, or recover pods across its own restart. On SIGTERM it kills every
//! pod's containers and removes their namespaces (the Pod objects stay).

mod config;
mod container;
mod env;
mod exec;
mod handle;
mod network;
mod node;
mod pod;
mod probe;
mod services;
mod status;
mod volumes;

pub use config::{ImageMap, KubeletConfig, image_name};
pub use exec::container_exec;
pub use handle::Kubelet;
pub use services::{KUBE_SERVICES_CHAIN, ServiceView, hosts_file, restore_input};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use network::IpPool;
use pod::{KubeletShared, PodSignal};

/// The line the kubelet logs once its Node is registered and Ready.
pub const READY_LINE: &str = "kubelet ready";

struct Worker {
    signals: watch::Sender<PodSignal>,
    task: JoinHandle<()>,
}

/// Runs the kubelet until SIGTERM or SIGINT.
pub async fn run(cfg: KubeletConfig) -> Result<()> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&cfg.kubeconfig)
        .with_context(|| format!("read kubeconfig {}", cfg.kubeconfig.display()))?;
    let client_cfg = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .context("kubeconfig")?;
    let client = Client::try_from(client_cfg).context("kube client")?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create {}", cfg.state_dir.display()))?;
    let cfg = Arc::new(cfg);
    node::register(&client, &cfg).await?;
    tokio::spawn(node::heartbeat(client.clone(), cfg.clone()));
    let proxy = services::ServiceProxy::start(client.clone()).await?;
    let shared = Arc::new(KubeletShared {
        client: client.clone(),
        cfg: cfg.clone(),
        proxy,
        pool: Mutex::new(IpPool::new(cfg.pod_cidr)),
        next_index: Default::default(),
        exe: std::env::current_exe().context("own path")?,
    });
    tracing::info!(node = %cfg.node_name, "{READY_LINE}");

    let mut events = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut ending: Vec<JoinHandle<()>> = Vec::new();
    let mut bound: HashSet<String> = HashSet::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                    on_pod(&shared, &mut workers, &mut bound, pod);
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    bound.remove(&uid);
                    if let Some(w) = workers.remove(&uid) {
                        w.signals.send_modify(|s| s.gone = true);
                        ending.push(w.task);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch"),
                None => break,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        workers.retain(|_, w| !w.task.is_finished());
        ending.retain(|t| !t.is_finished());
    }
    tracing::info!(pods = workers.len(), "shutting down: stopping every pod");
    for w in workers.values() {
        w.signals.send_modify(|s| s.shutdown = true);
    }
    ending.extend(workers.into_values().map(|w| w.task));
    let all = futures::future::join_all(ending);
    if tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .is_err()
    {
        tracing::warn!("some pods did not stop within 20s");
    }
    Ok(())
}

fn on_pod(
    shared: &Arc<KubeletShared>,
    workers: &mut HashMap<String, Worker>,
    bound: &mut HashSet<String>,
    pod: Pod,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let spec = pod.spec.as_ref();
    let node = spec.and_then(|s| s.node_name.as_deref());
    let Some(node) = node else {
        let ours = spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|n| n == "default-scheduler");
        if ours && !deleting && bound.insert(uid) {
            tokio::spawn(bind(
                shared.client.clone(),
                shared.cfg.node_name.clone(),
                pod,
            ));
        }
        return;
    };
    if node != shared.cfg.node_name {
        return;
    }
    let pod = Arc::new(pod);
    if let Some(w) = workers.get(&uid) {
        w.signals.send_modify(|s| s.pod = pod);
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let finished = matches!(phase, Some("Succeeded" | "Failed"));
    if deleting || finished {
        // Never started here (or finished before a restart of this kubelet).
        if deleting {
            tokio::spawn(delete_now(shared.client.clone(), pod));
        }
        return;
    }
    let (signals, rx) = watch::channel(PodSignal {
        pod,
        gone: false,
        shutdown: false,
    });
    let task = tokio::spawn(pod::run_pod(shared.clone(), rx));
    workers.insert(uid, Worker { signals, task });
}

/// The scheduler's one act: bind the Pod to this node.
async fn bind(client: Client, node: String, pod: Pod) {
    let (Some(name), Some(ns)) = (
        pod.metadata.name.as_deref(),
        pod.metadata.namespace.as_deref(),
    ) else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(client, ns);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": { "name": name, "namespace": ns, "uid": pod.metadata.uid },
        "target": { "apiVersion": "v1", "kind": "Node", "name": node },
    });
    match api
        .create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), %node, "bound"),
        Err(e) => tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "binding failed"),
    }
}

async fn delete_now(client: Client, pod: Arc<Pod>) {
    let (Some(name), Some(ns)) = (
        pod.metadata.name.as_deref(),
        pod.metadata.namespace.as_deref(),
    ) else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(client, ns);
    if let Err(e) = api
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
    {
        tracing::debug!(error = %e, "delete of a pod that never ran");
    }
}
