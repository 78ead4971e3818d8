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
    /// The `version` the proxy last ACKed, when it ACKed the latest response.
    pub acked_version: Option<String>,
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

/// What one stream was sent of one type (name -> version), with a digest kept up
/// to date on each insert and removal: order-independent (a XOR of per-entry
/// digests), so it costs the change, not the size of the view.
#[derive(Clone, Debug, Default)]
pub struct SentVersions {
    versions: BTreeMap<String, String>,
    digest: u64,
}

impl SentVersions {
    pub fn from_held(versions: BTreeMap<String, String>) -> Self {
        let digest = versions
            .iter()
            .fold(0, |d, (name, version)| d ^ entry_digest(name, version));
        SentVersions { versions, digest }
    }

    pub fn versions(&self) -> &BTreeMap<String, String> {
        &self.versions
    }

    pub fn len(&self) -> usize {
        self.versions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    pub fn insert(&mut self, name: &str, version: &str) {
        if let Some(old) = self.versions.get(name) {
            self.digest ^= entry_digest(name, old);
        }
        self.digest ^= entry_digest(name, version);
        self.versions.insert(name.to_owned(), version.to_owned());
    }

    pub fn remove(&mut self, name: &str) {
        if let Some(old) = self.versions.remove(name) {
            self.digest ^= entry_digest(name, &old);
        }
    }

    /// Equal on two streams sent the same names and versions.
    pub fn digest(&self) -> String {
        hex::encode(&self.digest.to_be_bytes()[..6])
    }
}

fn entry_digest(name: &str, version: &str) -> u64 {
    let mut hasher = sha2::Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0]);
    hasher.update(version.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}
