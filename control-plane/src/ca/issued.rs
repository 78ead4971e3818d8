//! The last leaf the CA signed for each identity and workload, for the debug view's
//! certificate expiry. Only serials and dates: nothing secret is kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use x509_parser::prelude::{FromDer, X509Certificate};

/// What `/debug/proxies` shows of a leaf.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IssuedLeaf {
    pub serial: String,
    pub not_after_unix: u64,
    /// The fingerprint of the root that signed it (see `roots::fingerprint`): during
    /// a rotation, which proxies still hold a leaf of the old root.
    pub signing_root: String,
}

type Key = (String, Option<String>);

/// Shared between the CA service (writes) and the debug view (reads).
#[derive(Clone, Default)]
pub struct IssuedLeaves {
    by_subject: Arc<Mutex<HashMap<Key, IssuedLeaf>>>,
}

impl IssuedLeaves {
    /// Records `leaf_pem` for `identity` and `workload`, and forgets expired leaves so
    /// the map stays as small as the set of live workloads.
    pub fn record(
        &self,
        identity: &str,
        workload: Option<&str>,
        leaf_pem: &str,
        signing_root: &str,
    ) {
        let Some(leaf) = describe(leaf_pem, signing_root) else {
            tracing::debug!(identity, "issued leaf unreadable; not recorded");
            return;
        };
        let now = unix(SystemTime::now());
        if let Ok(mut map) = self.by_subject.lock() {
            map.retain(|_, l| l.not_after_unix > now);
            map.insert((identity.to_owned(), workload.map(str::to_owned)), leaf);
        }
    }

    /// The last leaf for `identity` and `workload`, if it has not expired.
    pub fn last(&self, identity: &str, workload: Option<&str>) -> Option<IssuedLeaf> {
        let key = (identity.to_owned(), workload.map(str::to_owned));
        self.by_subject.lock().ok()?.get(&key).cloned()
    }
}

fn describe(leaf_pem: &str, signing_root: &str) -> Option<IssuedLeaf> {
    let der = pem::parse(leaf_pem).ok()?;
    let (_, cert) = X509Certificate::from_der(der.contents()).ok()?;
    Some(IssuedLeaf {
        serial: cert.raw_serial_as_string(),
        not_after_unix: u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
        signing_root: signing_root.to_owned(),
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
