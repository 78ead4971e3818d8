//! The YAML shapes the file registry reads: Kubernetes `Service` and `EndpointSlice`,
//! Trellis `WorkloadEntry` and `BootstrapToken`.
//!
//! Unknown fields are rejected everywhere except in `metadata` (Kubernetes adds
//! many) and `status` (ignored whole). Fields Kubernetes itself fills in on objects
//! dumped from a cluster (`sessionAffinity`, `ipFamilies`, `nodeName`, ...) are
//! accepted and ignored. Values that can be checked alone (IP addresses, port numbers,
//! protocols) are checked here, so their errors carry the exact line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU16;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};

/// Only `apiVersion` and `kind`: read first to pick the shape.
#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "a Kubernetes object (a mapping with apiVersion and kind)"
)]
pub(super) struct TypeMeta {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
}

/// `metadata`: unknown fields are ignored.
#[derive(Deserialize)]
pub(super) struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => "default",
        }
    }
}

/// An object: `apiVersion`, `kind`, `metadata`, the kind's own fields, `status`.
macro_rules! object {
    ($name:ident { $($body:tt)* }) => {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub(super) struct $name {
            #[serde(rename = "apiVersion", default)]
            _api_version: Option<IgnoredAny>,
            #[serde(rename = "kind", default)]
            _kind: Option<IgnoredAny>,
            #[serde(rename = "status", default)]
            _status: Option<IgnoredAny>,
            pub metadata: ObjectMeta,
            $($body)*
        }
    };
}

object!(ServiceObject { pub spec: ServiceSpec });
object!(WorkloadEntryObject { pub spec: WorkloadEntrySpec });
object!(BootstrapTokenObject { pub spec: BootstrapTokenSpec });
object!(EndpointSliceObject {
    pub address_type: AddressType,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<SlicePort>,
});

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ServiceSpec {
    #[serde(rename = "clusterIP", default)]
    pub cluster_ip: Option<ClusterIp>,
    #[serde(rename = "clusterIPs", default, deserialize_with = "nullable")]
    pub cluster_ips: Vec<ClusterIp>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<ServicePortSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub selector: BTreeMap<String, String>,
    #[serde(rename = "type", default)]
    pub type_: Option<ServiceType>,
    // Filled in by Kubernetes; meaningless here.
    #[serde(rename = "sessionAffinity", default)]
    _session_affinity: Option<IgnoredAny>,
    #[serde(rename = "sessionAffinityConfig", default)]
    _session_affinity_config: Option<IgnoredAny>,
    #[serde(rename = "ipFamilies", default)]
    _ip_families: Option<IgnoredAny>,
    #[serde(rename = "ipFamilyPolicy", default)]
    _ip_family_policy: Option<IgnoredAny>,
    #[serde(rename = "internalTrafficPolicy", default)]
    _internal_traffic_policy: Option<IgnoredAny>,
    #[serde(rename = "externalTrafficPolicy", default)]
    _external_traffic_policy: Option<IgnoredAny>,
    #[serde(rename = "publishNotReadyAddresses", default)]
    _publish_not_ready_addresses: Option<IgnoredAny>,
    #[serde(rename = "trafficDistribution", default)]
    _traffic_distribution: Option<IgnoredAny>,
}

#[derive(Deserialize)]
pub(super) enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ServicePortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: NonZeroU16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// Checked (TCP only), then unused.
    #[serde(rename = "protocol", default)]
    _protocol: Option<Protocol>,
    #[serde(rename = "nodePort", default)]
    _node_port: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) enum AddressType {
    IPv4,
    IPv6,
    #[serde(rename = "FQDN")]
    Fqdn,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct SliceEndpoint {
    pub addresses: Vec<Ip>,
    #[serde(default)]
    pub conditions: Option<Conditions>,
    #[serde(default)]
    pub target_ref: Option<ObjectRef>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(rename = "nodeName", default)]
    _node_name: Option<IgnoredAny>,
    #[serde(rename = "hostname", default)]
    _hostname: Option<IgnoredAny>,
    #[serde(rename = "hints", default)]
    _hints: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Conditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(rename = "serving", default)]
    _serving: Option<IgnoredAny>,
    #[serde(rename = "terminating", default)]
    _terminating: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ObjectRef {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(rename = "uid", default)]
    _uid: Option<IgnoredAny>,
    #[serde(rename = "apiVersion", default)]
    _api_version: Option<IgnoredAny>,
    #[serde(rename = "resourceVersion", default)]
    _resource_version: Option<IgnoredAny>,
    #[serde(rename = "fieldPath", default)]
    _field_path: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: NonZeroU16,
    /// Checked (TCP only), then unused.
    #[serde(rename = "protocol", default)]
    _protocol: Option<Protocol>,
    /// The Service port's protocol rules.
    #[serde(rename = "appProtocol", default)]
    _app_protocol: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct WorkloadEntrySpec {
    /// The primary address; may be left out when `addresses` is given.
    #[serde(default)]
    pub address: Option<Ip>,
    /// Every address of a dual-stack workload (the first is the primary when
    /// `address` is not given).
    #[serde(default)]
    pub addresses: Vec<Ip>,
    pub service_account: String,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: BTreeMap<String, NonZeroU16>,
    #[serde(default)]
    pub sidecar_port: Option<NonZeroU16>,
    /// `false`: the workload runs no sidecar; meshed callers reach it in plaintext.
    #[serde(default)]
    pub sidecar: Option<bool>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Istio keeps a WorkloadEntry's labels here; merged over `metadata.labels`.
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct BootstrapTokenSpec {
    pub service_account: String,
    /// The WorkloadEntry (same namespace, same service account) the token is for.
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
}

/// `null` reads as the default (Kubernetes writes `endpoints: null`).
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// An IP address, with an error that names the bad value.
pub(super) struct Ip(pub IpAddr);

impl<'de> Deserialize<'de> for Ip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse()
            .map(Ip)
            .map_err(|_| de::Error::custom(format!("invalid IP address {s:?}")))
    }
}

/// A `clusterIP` value: an address, `None` (headless) or empty (unset).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ClusterIp {
    Unset,
    Headless,
    Ip(IpAddr),
}

impl<'de> Deserialize<'de> for ClusterIp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
        match s.as_str() {
            "" => Ok(ClusterIp::Unset),
            "None" => Ok(ClusterIp::Headless),
            _ => s.parse().map(ClusterIp::Ip).map_err(|_| {
                de::Error::custom(format!(
                    "invalid cluster IP {s:?}: expected an IP address or \"None\""
                ))
            }),
        }
    }
}

/// A port protocol: only TCP is supported.
pub(super) struct Protocol;

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        if s == "TCP" {
            Ok(Protocol)
        } else {
            Err(de::Error::custom(format!(
                "protocol {s} is not supported (only TCP)"
            )))
        }
    }
}

/// A port number or a port name (`targetPort`).
pub(super) enum IntOrString {
    Int(NonZeroU16),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535) or a port name")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                u16::try_from(v)
                    .ok()
                    .and_then(NonZeroU16::new)
                    .map(IntOrString::Int)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                if v.is_empty() {
                    return Err(E::invalid_value(de::Unexpected::Str(v), &self));
                }
                Ok(IntOrString::String(v.to_owned()))
            }
        }
        deserializer.deserialize_any(V)
    }
}
