//! What the control plane knows of each connected proxy: the `/debug/proxies` view,
//! which `trellisctl proxy-status` and `check` read.

use std::collections::BTreeMap;

use sha2::Digest as _;

use crate::ca::IssuedLeaf;

/// Whether a proxy holds what it was last sent, per type or in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SyncState {
    /// It ACKed the last response sent.
    Synced,
    /// A response is sent and not answered yet.
    Stale,
    /// It rejected the last response it answered (and kept its last good config).
    Nacked,
}

/// One resource type on one proxy's stream.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TypeSync {
    /// A digest of the names and versions last sent: equal on two proxies when they
    /// were sent the same resources.
    pub version: String,
    pub resources: usize,
    pub sent_nonce: String,
    pub acked_nonce: Option<String>,
    pub state: SyncState,
    /// The proxy's error detail for its last NACK of this type.
    pub last_nack: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProxyStatus {
    pub identity: String,
    /// The workload its certificate names, if any.
    pub workload: Option<String>,
    /// Whose security policy it gets: `workload <ns>/<name>`, or `fail-closed (…)`
    /// when its workload is unknown.
    pub policy_scope: String,
    /// The proxy's own version, as it said on its first request (at most 64 bytes).
    pub proxy_version: Option<String>,
    pub connected_at_unix: u64,
    /// `<type_url>/<name>` -> version, as ACKed.
    pub acked: BTreeMap<String, String>,
    pub last_ack_unix: Option<u64>,
    /// `<type_url>: <message>` of the last NACK.
    pub last_nack: Option<String>,
    pub last_nack_unix: Option<u64>,
    /// Per type (short name, `Service`).
    pub types: BTreeMap<&'static str, TypeSync>,
    /// The worst of the types: NACKED over STALE over SYNCED.
    pub sync: SyncState,
    /// A digest of every type's version: equal on two proxies sent the same config.
    pub config_version: String,
    /// The last leaf the CA issued to this identity and workload (filled in by the
    /// debug view).
    pub certificate: Option<IssuedLeaf>,
}

impl ProxyStatus {
    pub fn new(identity: String, workload: Option<String>, connected_at_unix: u64) -> Self {
        ProxyStatus {
            identity,
            workload,
            policy_scope: String::new(),
            proxy_version: None,
            connected_at_unix,
            acked: BTreeMap::new(),
            last_ack_unix: None,
            last_nack: None,
            last_nack_unix: None,
            types: BTreeMap::new(),
            sync: SyncState::Stale,
            config_version: String::new(),
            certificate: None,
        }
    }

    /// Recomputes [`ProxyStatus::sync`] and the config version from the types.
    pub fn refresh(&mut self) {
        let versions = self
            .types
            .iter()
            .map(|(t, s)| ((*t).to_owned(), s.version.clone()))
            .collect();
        self.config_version = version_digest(&versions);
        let states = self.types.values().map(|t| t.state);
        self.sync = if self.types.is_empty() {
            SyncState::Stale
        } else if states.clone().any(|s| s == SyncState::Nacked) {
            SyncState::Nacked
        } else if states.into_iter().any(|s| s == SyncState::Stale) {
            SyncState::Stale
        } else {
            SyncState::Synced
        };
    }
}

/// A short digest of `name -> version`.
pub fn version_digest(sent: &BTreeMap<String, String>) -> String {
    let mut hasher = sha2::Sha256::new();
    for (name, version) in sent {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(version.as_bytes());
        hasher.update([b'\n']);
    }
    hex::encode(&hasher.finalize()[..6])
}
