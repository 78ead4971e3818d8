//! A simulated registry: N services with a few endpoints each over 50 namespaces,
//! built straight as the control plane's model, and the churn applied to it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use trellis_control::model::{
    AppProtocol, ConnectionLimits, Endpoint, LoadBalancer, MeshSnapshot, Service, ServiceKey,
    ServicePort, TargetPort, Timeouts, TrafficPolicy, Workload,
};
use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1::type_url;

use crate::{BenchError, Result};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACES: usize = 50;
pub const ENDPOINTS_PER_SERVICE: usize = 5;
pub const SERVICE_PORT: u16 = 8080;
/// One service in this many has a TrafficPolicy.
pub const POLICY_EVERY: usize = 10;

/// One change to the mesh, as a registry would see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The first endpoint of `service` turns unready, or ready again.
    Flap { service: usize },
    /// Pod `pod` of `service` is replaced by a new one at a new address.
    Roll { service: usize, pod: usize },
    /// The request timeout of `service`'s TrafficPolicy is edited.
    Policy { service: usize },
}

impl Change {
    /// The line the driver sends the control-plane process.
    pub fn command(&self) -> String {
        match self {
            Change::Flap { service } => format!("flap {service}"),
            Change::Roll { service, pod } => format!("roll {service} {pod}"),
            Change::Policy { service } => format!("policy {service}"),
        }
    }

    pub fn parse(line: &str) -> Option<Change> {
        let mut words = line.split_whitespace();
        let verb = words.next()?;
        let service = words.next()?.parse().ok()?;
        match verb {
            "flap" => Some(Change::Flap { service }),
            "roll" => Some(Change::Roll {
                service,
                pod: words.next()?.parse().ok()?,
            }),
            "policy" => Some(Change::Policy { service }),
            _ => None,
        }
    }

    /// The discovery resource (type URL, name) the change rewrites.
    pub fn resource(&self) -> (&'static str, String) {
        match self {
            Change::Flap { service } | Change::Roll { service, .. } => (
                type_url::ENDPOINTS,
                format!("{}:{SERVICE_PORT}", service_key(*service)),
            ),
            Change::Policy { service } => {
                (type_url::TRAFFIC_POLICY, service_key(*service).to_string())
            }
        }
    }
}

pub fn service_key(service: usize) -> ServiceKey {
    ServiceKey {
        namespace: format!("ns-{}", service % NAMESPACES),
        name: format!("svc-{service}"),
    }
}

/// The identity of `service`'s pods (one service account per service).
pub fn service_identity(service: usize) -> Result<SpiffeId> {
    let key = service_key(service);
    SpiffeId::new(TRUST_DOMAIN, &key.namespace, &key.name)
        .map_err(|e| BenchError::Setup(format!("identity: {e}")))
}

pub fn pod_name(service: usize, pod: usize) -> String {
    format!("svc-{service}-{pod}")
}

fn address(base: u32, index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(base.wrapping_add(index as u32)))
}

/// The registry's state and the churn applied to it.
pub struct SimulatedRegistry {
    pub snapshot: MeshSnapshot,
    services: usize,
    /// Pods created by rolling updates so far (for fresh addresses).
    rolled: usize,
}

impl SimulatedRegistry {
    pub fn new(services: usize) -> Result<Self> {
        let mut snapshot = MeshSnapshot::default();
        for i in 0..services {
            let key = service_key(i);
            let identity = service_identity(i)?;
            snapshot.services.insert(
                key.clone(),
                Service {
                    key: key.clone(),
                    vips: vec![address(0x0A60_0000, i)],
                    ports: vec![ServicePort {
                        name: "http".to_owned(),
                        port: SERVICE_PORT,
                        target_port: TargetPort::Number(SERVICE_PORT),
                        protocol: AppProtocol::Http,
                    }],
                    selector: [("app".to_owned(), key.name.clone())].into(),
                },
            );
            let mut endpoints = Vec::with_capacity(ENDPOINTS_PER_SERVICE);
            for pod in 0..ENDPOINTS_PER_SERVICE {
                let addr = address(0x0A80_0000, i * ENDPOINTS_PER_SERVICE + pod);
                snapshot
                    .workloads
                    .push(workload(&key, &identity, pod_name(i, pod), addr));
                endpoints.push(endpoint(&identity, addr));
            }
            snapshot
                .endpoints
                .insert((key.clone(), SERVICE_PORT), endpoints);
            if i % POLICY_EVERY == 0 {
                snapshot
                    .traffic_policies
                    .insert(key.clone(), traffic_policy(&key, Duration::from_secs(5)));
            }
        }
        Ok(SimulatedRegistry {
            snapshot,
            services,
            rolled: 0,
        })
    }

    pub fn services(&self) -> usize {
        self.services
    }

    pub fn apply(&mut self, change: Change) -> Result<()> {
        let (Change::Flap { service } | Change::Roll { service, .. } | Change::Policy { service }) =
            change;
        if service >= self.services {
            return Err(BenchError::Setup(format!("no service {service}")));
        }
        let key = service_key(service);
        let missing = || BenchError::Setup(format!("service {service} has no such object"));
        match change {
            Change::Flap { .. } => {
                let endpoints = self
                    .snapshot
                    .endpoints
                    .get_mut(&(key, SERVICE_PORT))
                    .ok_or_else(missing)?;
                let first = endpoints.first_mut().ok_or_else(missing)?;
                first.ready = !first.ready;
            }
            Change::Roll { pod, .. } => {
                let addr = address(0x0AC0_0000, self.rolled);
                self.rolled += 1;
                let name = pod_name(service, pod);
                let workload = self
                    .snapshot
                    .workloads
                    .iter_mut()
                    .find(|w| w.namespace == key.namespace && w.name == name)
                    .ok_or_else(missing)?;
                workload.address = addr;
                let endpoints = self
                    .snapshot
                    .endpoints
                    .get_mut(&(key, SERVICE_PORT))
                    .ok_or_else(missing)?;
                let endpoint = endpoints.get_mut(pod).ok_or_else(missing)?;
                endpoint.address = addr;
            }
            Change::Policy { .. } => {
                let policy = self
                    .snapshot
                    .traffic_policies
                    .get_mut(&key)
                    .ok_or_else(missing)?;
                let request = policy.timeouts.request.unwrap_or_default();
                policy.timeouts.request = Some(request + Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

fn workload(key: &ServiceKey, identity: &SpiffeId, name: String, addr: IpAddr) -> Workload {
    Workload {
        namespace: key.namespace.clone(),
        name,
        address: addr,
        addresses: Vec::new(),
        identity: identity.clone(),
        labels: [("app".to_owned(), key.name.clone())].into(),
        ports: BTreeMap::new(),
        sidecar_port: None,
        sidecar: true,
        weight: 1,
        zone: "zone-a".to_owned(),
    }
}

fn endpoint(identity: &SpiffeId, addr: IpAddr) -> Endpoint {
    Endpoint {
        address: addr,
        port: SERVICE_PORT,
        identity: Some(identity.clone()),
        weight: 1,
        zone: "zone-a".to_owned(),
        ready: true,
        mesh_address: None,
        sidecar: true,
    }
}

fn traffic_policy(key: &ServiceKey, request: Duration) -> TrafficPolicy {
    TrafficPolicy {
        source: format!("{}/{}", key.namespace, key.name),
        load_balancer: LoadBalancer::P2cEwma,
        retries: None,
        timeouts: Timeouts {
            connect: None,
            request: Some(request),
            idle: None,
        },
        outlier_detection: None,
        connection_limits: ConnectionLimits::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_has_what_it_says_and_each_change_rewrites_its_resource() -> Result<()> {
        let mut registry = SimulatedRegistry::new(100)?;
        assert_eq!(registry.snapshot.services.len(), 100);
        assert_eq!(registry.snapshot.workloads.len(), 500);
        assert_eq!(registry.snapshot.traffic_policies.len(), 10);
        let before = registry.snapshot.clone();
        for change in [
            Change::Flap { service: 7 },
            Change::Roll { service: 7, pod: 2 },
            Change::Policy { service: 20 },
        ] {
            assert_eq!(Change::parse(&change.command()), Some(change));
            registry.apply(change)?;
        }
        assert_ne!(before.endpoints, registry.snapshot.endpoints);
        assert_ne!(before.traffic_policies, registry.snapshot.traffic_policies);
        assert!(registry.apply(Change::Policy { service: 7 }).is_err());
        Ok(())
    }
}
