//! kube-proxy's job, in the manner of the test bed: every pod namespace gets a nat
//! chain `KUBE-SERVICES` (jumped to from OUTPUT) that DNATs each ClusterIP port to its
//! ready endpoints (spread with `-m statistic`), rewritten whole with
//! `iptables-restore --noflush` when Services or EndpointSlices change; and a hosts file
//! naming every Service (`name`, `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local`)
//! in place of cluster DNS. Headless and ExternalName Services, NodePorts, session
//! affinity and UDP/SCTP are not handled.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// The nat chain each pod's OUTPUT jumps to.
pub const KUBE_SERVICES_CHAIN: &str = "KUBE-SERVICES";

/// A Service as the rules need it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<PortView>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortView {
    pub port: u16,
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// A pod namespace the proxy keeps up to date.
#[derive(Debug, Clone)]
struct PodEntry {
    ip: Ipv4Addr,
    hostname: String,
    /// What was last written, to skip unchanged rewrites.
    written: Option<(String, String)>,
}

/// Watches Services and EndpointSlices and programs every registered pod namespace.
#[derive(Clone)]
pub struct ServiceProxy {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Arc<Mutex<BTreeMap<String, PodEntry>>>,
    changed: Arc<Notify>,
}

impl ServiceProxy {
    /// Starts the watches and waits for their first listing.
    pub async fn start(client: Client) -> Result<Self> {
        let changed = Arc::new(Notify::new());
        let (services, svc_writer) = reflector::store();
        let (slices, slice_writer) = reflector::store();
        let svc_stream = reflector::reflector(
            svc_writer,
            watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects()
        .boxed();
        let slice_stream = reflector::reflector(
            slice_writer,
            watcher(
                Api::<EndpointSlice>::all(client),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects()
        .boxed();
        let notify = changed.clone();
        tokio::spawn(async move {
            let mut merged = futures::stream::select(
                svc_stream.map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
                slice_stream.map(|r| r.map(|_| ()).map_err(|e| e.to_string())),
            );
            while let Some(item) = merged.next().await {
                match item {
                    Ok(()) => notify.notify_one(),
                    Err(e) => tracing::warn!(error = %e, "service watch"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), async {
            services.wait_until_ready().await?;
            slices.wait_until_ready().await
        })
        .await
        .map_err(|_| anyhow!("services and endpointslices not listed within 60s"))?
        .context("service watch")?;
        let proxy = Self {
            services,
            slices,
            pods: Arc::default(),
            changed,
        };
        let worker = proxy.clone();
        tokio::spawn(async move { worker.sync_loop().await });
        Ok(proxy)
    }

    /// The hosts file a pod gets right now.
    pub fn hosts_for(&self, pod_ip: Ipv4Addr, hostname: &str) -> String {
        hosts_file(&self.views(), pod_ip, hostname)
    }

    /// Adds a pod namespace (made by [`super::network::PodNetwork::create`]) and programs
    /// it before returning, so its containers find the Services from the start.
    pub async fn register(&self, netns: &str, ip: Ipv4Addr, hostname: &str) -> Result<()> {
        if let Ok(mut pods) = self.pods.lock() {
            pods.insert(
                netns.to_string(),
                PodEntry {
                    ip,
                    hostname: hostname.to_string(),
                    written: None,
                },
            );
        }
        self.sync_one(netns).await
    }

    /// Forgets a pod namespace (before it is deleted).
    pub fn unregister(&self, netns: &str) {
        if let Ok(mut pods) = self.pods.lock() {
            pods.remove(netns);
        }
    }

    async fn sync_loop(&self) {
        loop {
            self.changed.notified().await;
            // Let a burst of changes (a rollout) settle into one rewrite.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let names: Vec<String> = match self.pods.lock() {
                Ok(pods) => pods.keys().cloned().collect(),
                Err(_) => return,
            };
            for netns in names {
                if let Err(e) = self.sync_one(&netns).await {
                    tracing::warn!(%netns, error = format!("{e:#}"), "kube-proxy sync failed");
                }
            }
        }
    }

    async fn sync_one(&self, netns: &str) -> Result<()> {
        let views = self.views();
        let Some(entry) = self.pods.lock().ok().and_then(|p| p.get(netns).cloned()) else {
            return Ok(());
        };
        let hosts = hosts_file(&views, entry.ip, &entry.hostname);
        let rules = restore_input(&views);
        let (hosts_same, rules_same) = entry
            .written
            .as_ref()
            .map_or((false, false), |(h, r)| (*h == hosts, *r == rules));
        // Each only when it changed: the hosts file is rewritten in place (truncated,
        // then written), so a name looked up meanwhile would not resolve, and
        // endpoints change far more often than Services.
        if !hosts_same {
            crate::netns::write_hosts(netns, &hosts)?;
        }
        if !rules_same {
            iptables_restore(netns, &rules).await?;
        }
        if hosts_same && rules_same {
            return Ok(());
        }
        tracing::debug!(%netns, services = views.len(), "kube-proxy rules written");
        if let Ok(mut pods) = self.pods.lock()
            && let Some(e) = pods.get_mut(netns)
        {
            e.written = Some((hosts, rules));
        }
        Ok(())
    }

    fn views(&self) -> Vec<ServiceView> {
        let services: Vec<Arc<Service>> = self.services.state();
        let slices: Vec<Arc<EndpointSlice>> = self.slices.state();
        service_views(&services, &slices)
    }
}

/// Services with an IPv4 ClusterIP and their ready endpoints per port, sorted.
pub fn service_views(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> Vec<ServiceView> {
    let mut views = Vec::new();
    for svc in services {
        let (Some(name), Some(ns), Some(spec)) = (
            svc.metadata.name.as_deref(),
            svc.metadata.namespace.as_deref(),
            svc.spec.as_ref(),
        ) else {
            continue;
        };
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let own_slices: Vec<&EndpointSlice> = slices
            .iter()
            .map(AsRef::as_ref)
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && s.address_type == "IPv4"
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        .is_some_and(|n| n == name)
            })
            .collect();
        let mut ports = Vec::new();
        for sp in spec.ports.iter().flatten() {
            if sp.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            let want = sp.name.as_deref().unwrap_or("");
            let mut backends = Vec::new();
            for slice in &own_slices {
                let Some(target) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref().unwrap_or("") == want)
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    if !ready {
                        continue;
                    }
                    if let Some(addr) = ep.addresses.first().and_then(|a| a.parse().ok()) {
                        backends.push((addr, target));
                    }
                }
            }
            backends.sort();
            backends.dedup();
            ports.push(PortView { port, backends });
        }
        views.push(ServiceView {
            namespace: ns.to_string(),
            name: name.to_string(),
            cluster_ip,
            ports,
        });
    }
    views.sort();
    views
}

/// A pod's hosts file: localhost, itself, and every Service by its four names.
pub fn hosts_file(views: &[ServiceView], pod_ip: Ipv4Addr, hostname: &str) -> String {
    let mut s = String::from(
        "# written by trellis-test-kubelet\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    let _ = writeln!(s, "{pod_ip}\t{hostname}");
    for v in views {
        let (n, ns) = (&v.name, &v.namespace);
        let _ = writeln!(
            s,
            "{}\t{n}.{ns}.svc.cluster.local {n}.{ns}.svc {n}.{ns} {n}",
            v.cluster_ip
        );
    }
    s
}

/// `iptables-restore --noflush` input that replaces the whole `KUBE-SERVICES` chain.
pub fn restore_input(views: &[ServiceView]) -> String {
    let mut s = format!("*nat\n:{KUBE_SERVICES_CHAIN} - [0:0]\n");
    for v in views {
        for p in &v.ports {
            let n = p.backends.len();
            for (i, (addr, port)) in p.backends.iter().enumerate() {
                let _ = write!(
                    s,
                    "-A {KUBE_SERVICES_CHAIN} -d {}/32 -p tcp -m tcp --dport {} -m comment --comment \"{}/{}:{}\"",
                    v.cluster_ip, p.port, v.namespace, v.name, p.port
                );
                if i + 1 < n {
                    let _ = write!(
                        s,
                        " -m statistic --mode random --probability {:.5}",
                        1.0 / (n - i) as f64
                    );
                }
                let _ = writeln!(s, " -j DNAT --to-destination {addr}:{port}");
            }
        }
    }
    s.push_str("COMMIT\n");
    s
}

async fn iptables_restore(netns: &str, input: &str) -> Result<()> {
    let mut child = tokio::process::Command::new("/usr/sbin/ip")
        .args([
            "netns",
            "exec",
            netns,
            "iptables-restore",
            "--noflush",
            "-w",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start iptables-restore")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| anyhow!("iptables-restore in {netns} took over 30s"))??;
    if !out.status.success() {
        bail!(
            "iptables-restore in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn service(name: &str, ip: &str, port: i32, port_name: Option<&str>) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(vec![ServicePort {
                    name: port_name.map(Into::into),
                    port,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn slice(svc: &str, port: i32, eps: &[(&str, Option<bool>)]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{svc}-abc")),
                namespace: Some("shop".into()),
                labels: Some([("kubernetes.io/service-name".to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: eps
                .iter()
                .map(|(ip, ready)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                port: Some(port),
                ..Default::default()
            }]),
        })
    }

    #[test]
    fn ready_endpoints_become_dnat_rules() {
        let services = vec![
            service("web", "10.96.0.20", 80, None),
            service("headless", "None", 80, None),
        ];
        let slices = vec![slice(
            "web",
            8080,
            &[
                ("10.244.128.2", Some(true)),
                ("10.244.128.1", None),
                ("10.244.128.3", Some(false)),
            ],
        )];
        let views = service_views(&services, &slices);
        assert_eq!(views.len(), 1, "headless services get no rules");
        assert_eq!(
            views[0].ports[0].backends,
            vec![
                (Ipv4Addr::new(10, 244, 128, 1), 8080),
                (Ipv4Addr::new(10, 244, 128, 2), 8080)
            ]
        );
        let rules = restore_input(&views);
        assert!(
            rules.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"),
            "{rules}"
        );
        assert!(
            rules.contains("--probability 0.50000 -j DNAT --to-destination 10.244.128.1:8080"),
            "{rules}"
        );
        assert!(rules.contains("--dport 80 -m comment --comment \"shop/web:80\" -j DNAT --to-destination 10.244.128.2:8080"), "{rules}");
        assert!(
            !rules.contains("10.244.128.3"),
            "not-ready endpoints get no traffic"
        );
        let hosts = hosts_file(&views, Ipv4Addr::new(10, 244, 128, 9), "client");
        assert!(hosts.contains("10.244.128.9\tclient\n"));
        assert!(
            hosts.contains("10.96.0.20\tweb.shop.svc.cluster.local web.shop.svc web.shop web\n")
        );
    }
}
