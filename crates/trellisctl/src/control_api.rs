//! The control plane's debug views as trellisctl reads them (the JSON of
//! `trellis_control::admin` and `trellis_control::discovery::ProxyStatus`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::admin_client::get_json;

/// Where `--control-addr` points by default: the debug port on this host.
pub const DEFAULT_CONTROL_DEBUG: &str = "127.0.0.1:15016";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionInfo {
    pub component: String,
    pub version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SyncState {
    Synced,
    Stale,
    Nacked,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Synced => "SYNCED",
            SyncState::Stale => "STALE",
            SyncState::Nacked => "NACKED",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TypeSync {
    pub version: String,
    pub resources: usize,
    pub sent_nonce: String,
    pub acked_nonce: Option<String>,
    pub state: SyncState,
    pub last_nack: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssuedLeaf {
    pub serial: String,
    pub not_after_unix: u64,
    /// Fingerprint of the root that signed the leaf (empty from older control planes).
    #[serde(default)]
    pub signing_root: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub identity: String,
    pub workload: Option<String>,
    pub policy_scope: String,
    pub proxy_version: Option<String>,
    pub connected_at_unix: u64,
    pub last_ack_unix: Option<u64>,
    pub last_nack: Option<String>,
    pub last_nack_unix: Option<u64>,
    pub types: BTreeMap<String, TypeSync>,
    pub sync: SyncState,
    pub config_version: String,
    pub certificate: Option<IssuedLeaf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadView {
    pub workload: String,
    pub identity: String,
    pub sidecar: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistryError {
    pub file: String,
    pub line: Option<usize>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistryStatus {
    pub generation: u64,
    pub last_error: Vec<RegistryError>,
    pub services: usize,
    pub workloads: usize,
}

pub async fn version(addr: &str) -> anyhow::Result<VersionInfo> {
    get_json(addr, "/version").await
}

pub async fn proxies(addr: &str) -> anyhow::Result<Vec<ProxyStatus>> {
    get_json(addr, "/debug/proxies").await
}

pub async fn workloads(addr: &str) -> anyhow::Result<Vec<WorkloadView>> {
    get_json(addr, "/debug/workloads").await
}

pub async fn registry(addr: &str) -> anyhow::Result<RegistryStatus> {
    get_json(addr, "/registry").await
}
