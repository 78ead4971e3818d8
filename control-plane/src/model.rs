//! The mesh model: what the registry knows, in Trellis' own terms.
//!
//! Registries (file, kube) fill it; the discovery server turns it into per-proxy
//! resources. Nothing here knows of YAML, Kubernetes or protobuf.

pub mod diff;
mod opaque_port_rules;
mod policy;
mod route;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use trellis_identity::SpiffeId;

pub use opaque_port_rules::L7RulesOnOpaquePort;
pub use policy::{
    AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Backoff, ConnectionLimits,
    EffectivePeerAuthentication, HashKey, LoadBalancer, MtlsMode, OutlierDetection,
    PeerAuthentication, PolicyScope, Ratio, RetryBudget, RetryOn, RetryPolicy, Timeouts,
    TrafficPolicy, UNKNOWN_WORKLOAD_POLICY, UnknownWorkload, WorkloadLookup,
};
pub use route::{
    HeaderModifier, HttpMatch, HttpRouteRule, PathMatch, RouteOrigin, StringMatch, ValueMatch,
    WeightedBackend, sort_by_precedence,
};

/// The root namespace when nothing else says: policies there without a selector
/// apply to the whole mesh. On Kubernetes it is the control plane's own namespace
/// ([`MeshSnapshot::root_namespace`]); a file registry keeps this one.
pub const DEFAULT_ROOT_NAMESPACE: &str = "trellis-system";

/// How a Service port's traffic is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Not declared: the proxy detects it.
    Unspecified,
    Tcp,
    Http,
    Http2,
    Grpc,
    /// Never inspected (server-first protocols).
    Opaque,
}

/// A Service key: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// The port on the workload; resolved per endpoint when it is a name.
    pub target_port: TargetPort,
    pub protocol: AppProtocol,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    pub key: ServiceKey,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Workloads whose labels match all of these back the service. Empty: only
    /// explicit EndpointSlices do.
    pub selector: BTreeMap<String, String>,
}

/// A workload: something with an address and an identity that runs a sidecar.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    /// The primary address (a Pod's `status.podIP`).
    pub address: IpAddr,
    /// Every address of a dual-stack workload besides or including `address` (a Pod's
    /// `status.podIPs`); empty for a single-address one. See [`Workload::all_addresses`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    pub identity: SpiffeId,
    pub labels: BTreeMap<String, String>,
    /// Named ports of the app (for named target ports and loopback deployments).
    pub ports: BTreeMap<String, u16>,
    /// Where its sidecar takes mesh traffic when no iptables redirect exists.
    pub sidecar_port: Option<u16>,
    /// Whether it runs a sidecar at all; without one, meshed callers reach its app
    /// in plaintext.
    pub sidecar: bool,
    pub weight: u32,
    pub zone: String,
}

impl Workload {
    /// The primary address, then every other one (each once): what callers may reach
    /// this workload at, over either family.
    pub fn all_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.address).chain(
            self.addresses
                .iter()
                .enumerate()
                .filter(|(i, a)| **a != self.address && !self.addresses[..*i].contains(a))
                .map(|(_, a)| *a),
        )
    }
}

/// One backend of one service port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    /// The identity of its workload; `None` for an address no workload is known
    /// at (the API server's own endpoint), which is reached in plaintext.
    pub identity: Option<SpiffeId>,
    pub weight: u32,
    pub zone: String,
    pub ready: bool,
    pub mesh_address: Option<SocketAddr>,
    /// Whether its workload runs a sidecar (see [`Workload::sidecar`]).
    pub sidecar: bool,
}

/// A bootstrap token (file registry): proof of identity for the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapToken {
    /// Where it was declared, for messages.
    pub name: String,
    /// SHA-256 of the token; tokens themselves are never kept.
    pub token_sha256: [u8; 32],
    pub identity: SpiffeId,
    /// The WorkloadEntry (in the identity's namespace) the token is bound to: the
    /// proxy holding it gets that workload's policies. `None`: the workload is
    /// unknown and the proxy gets the fail-closed view of its identity.
    pub workload: Option<String>,
}

impl BootstrapToken {
    pub fn workload_name(&self) -> Option<trellis_identity::WorkloadName> {
        let name = self.workload.as_deref()?;
        Some(trellis_identity::WorkloadName::new(
            self.identity.namespace(),
            name,
        ))
    }
}

/// Everything the registry knows at one moment. Replaced whole on every change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSnapshot {
    /// Where mesh-wide policies live (see [`DEFAULT_ROOT_NAMESPACE`]).
    pub root_namespace: String,
    pub services: BTreeMap<ServiceKey, Service>,
    /// Endpoints per service and service port.
    pub endpoints: BTreeMap<(ServiceKey, u16), Vec<Endpoint>>,
    pub workloads: Vec<Workload>,
    pub bootstrap_tokens: Vec<BootstrapToken>,
    /// HTTP route rules per parent Service, producer and consumer routes together,
    /// in Gateway API precedence order ([`sort_by_precedence`]).
    pub routes: BTreeMap<ServiceKey, Vec<HttpRouteRule>>,
    /// At most one TrafficPolicy per Service.
    pub traffic_policies: BTreeMap<ServiceKey, TrafficPolicy>,
    /// Sorted by namespace and name.
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Sorted by namespace and name.
    pub peer_authentications: Vec<PeerAuthentication>,
}

impl Default for MeshSnapshot {
    fn default() -> Self {
        MeshSnapshot {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            workloads: Vec::new(),
            bootstrap_tokens: Vec::new(),
            routes: BTreeMap::new(),
            traffic_policies: BTreeMap::new(),
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
        }
    }
}

impl MeshSnapshot {
    /// The bootstrap token `token` is, if the registry knows it.
    pub fn bootstrap_token(&self, token: &str) -> Option<&BootstrapToken> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        // Compare digests, not tokens: the digest comparison leaks nothing useful.
        self.bootstrap_tokens
            .iter()
            .find(|t| t.token_sha256 == digest)
    }
}

#[cfg(test)]
mod tests;

/// Workloads by name and by address, per namespace: how both registries find the
/// workload (and so the identity) behind an EndpointSlice endpoint.
pub struct WorkloadIndex<'a> {
    by_name: std::collections::HashMap<(&'a str, &'a str), &'a Workload>,
    by_address: std::collections::HashMap<(&'a str, IpAddr), Vec<&'a Workload>>,
}

impl<'a> WorkloadIndex<'a> {
    pub fn new(workloads: &'a [Workload]) -> Self {
        let mut index = WorkloadIndex {
            by_name: Default::default(),
            by_address: Default::default(),
        };
        for w in workloads {
            index.by_name.insert((&w.namespace, &w.name), w);
            // Every address: an IPv6 EndpointSlice names the dual-stack pod's IPv6 one.
            for address in w.all_addresses() {
                index
                    .by_address
                    .entry((&w.namespace, address))
                    .or_default()
                    .push(w);
            }
        }
        index
    }

    /// The workload behind an endpoint at `address` of an EndpointSlice in
    /// `namespace`: the one its targetRef (namespace, name) names, or else the one
    /// workload in `namespace` with `address`. `Ok(None)`: no workload is known there.
    /// Refused, so that no slice can give a meshed address another identity or take
    /// its mTLS away: a targetRef into another namespace, a targetRef to a workload
    /// that does not own `address`, and an address no workload of `namespace` owns
    /// but a meshed workload elsewhere does.
    pub fn find(
        &self,
        namespace: &str,
        target: Option<(&str, &str)>,
        address: IpAddr,
    ) -> Result<Option<&'a Workload>, EndpointRefused> {
        let here = self.by_address.get(&(namespace, address));
        if let Some((ref_namespace, name)) = target {
            if ref_namespace != namespace {
                return Err(EndpointRefused::CrossNamespaceRef {
                    target: format!("{ref_namespace}/{name}"),
                });
            }
            // The endpoint controller's targetRef is authoritative, if its workload
            // owns the address.
            if let Some(&w) = self.by_name.get(&(ref_namespace, name)) {
                let owns = here.is_some_and(|list| list.iter().any(|o| std::ptr::eq(*o, w)));
                return match owns {
                    true => Ok(Some(w)),
                    false => Err(EndpointRefused::NotItsAddress {
                        target: format!("{ref_namespace}/{name}"),
                        address,
                    }),
                };
            }
        }
        // The address is the fallback for slices written by hand or by other
        // controllers.
        match here {
            Some(list) if list.len() == 1 => return Ok(Some(list[0])),
            Some(_) => return Ok(None),
            None => {}
        }
        let meshed_elsewhere = self
            .by_address
            .iter()
            .filter(|((_, a), _)| *a == address)
            .flat_map(|(_, list)| list)
            .find(|w| w.sidecar);
        match meshed_elsewhere {
            Some(w) => Err(EndpointRefused::MeshedElsewhere {
                address,
                owner: format!("{}/{}", w.namespace, w.name),
            }),
            None => Ok(None),
        }
    }
}

/// Why an EndpointSlice endpoint is dropped (see [`WorkloadIndex::find`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointRefused {
    #[error("its targetRef names {target}, in another namespace than the EndpointSlice")]
    CrossNamespaceRef { target: String },
    #[error("its targetRef names {target}, which does not have address {address}")]
    NotItsAddress { target: String, address: IpAddr },
    #[error(
        "address {address} belongs to meshed workload {owner} of another namespace; \
         it would reach it without its identity"
    )]
    MeshedElsewhere { address: IpAddr, owner: String },
}
