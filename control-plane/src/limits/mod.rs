//! Limits on what one client may take from the control plane: discovery streams per
//! workload, certificate requests per source, and the counters that report refusals.

mod certificates;
mod streams;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use certificates::RateLimitedCa;
pub use streams::StreamLimitedDiscovery;

/// The limits of the gRPC port (15010) and its services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcLimits {
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// TCP keepalive on accepted connections: a vanished proxy's stream is noticed.
    pub tcp_keepalive: Duration,
    /// HTTP/2 pings, and how long a ping may go unanswered before the connection closes.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// Deadline for a unary call (certificate requests); streams are not cut by it.
    pub request_timeout: Duration,
    /// Concurrent HTTP/2 streams on one connection (a proxy needs one or two).
    pub max_streams_per_connection: u32,
    /// Concurrent discovery streams per (identity, source address): one pod's proxy
    /// needs one, a few more cover reconnects.
    pub streams_per_workload: usize,
    /// Certificate requests per source address: a burst, then one per `csr_refill`.
    pub csr_burst: u32,
    pub csr_refill: Duration,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            handshake_timeout: Duration::from_secs(5),
            tcp_keepalive: Duration::from_secs(60),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            max_streams_per_connection: 32,
            streams_per_workload: 8,
            csr_burst: 20,
            csr_refill: Duration::from_millis(500),
        }
    }
}

/// Refusals by the limits: the metrics' own counters (see [`crate::metrics`]).
#[derive(Clone, Debug, Default)]
pub struct LimitCounters {
    pub certificate_requests_limited: prometheus_client::metrics::counter::Counter,
    pub discovery_streams_refused: prometheus_client::metrics::counter::Counter,
}

/// Counts what is held per key, with a cap per key.
pub struct ConcurrencyByKey<K: Eq + Hash> {
    open: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash> Default for ConcurrencyByKey<K> {
    fn default() -> Self {
        ConcurrencyByKey {
            open: Arc::default(),
        }
    }
}

impl<K: Eq + Hash> Clone for ConcurrencyByKey<K> {
    fn clone(&self) -> Self {
        ConcurrencyByKey {
            open: self.open.clone(),
        }
    }
}

/// One unit held under a key; given back when dropped.
pub struct KeySlot<K: Eq + Hash> {
    open: Arc<Mutex<HashMap<K, usize>>>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone> ConcurrencyByKey<K> {
    /// A slot under `key`, or `None` when `max` are already held.
    pub fn take(&self, key: K, max: usize) -> Option<KeySlot<K>> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            open: self.open.clone(),
            key: Some(key),
        })
    }

    /// How many are held under `key`.
    pub fn held(&self, key: &K) -> usize {
        self.open
            .lock()
            .map(|open| open.get(key).copied().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl<K: Eq + Hash> Drop for KeySlot<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        if let Ok(mut open) = self.open.lock()
            && let Some(n) = open.get_mut(&key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_key_and_given_back() {
        let slots = ConcurrencyByKey::<&str>::default();
        let first = slots.take("a", 2).unwrap();
        let _second = slots.take("a", 2).unwrap();
        assert!(slots.take("a", 2).is_none());
        assert!(slots.take("b", 2).is_some());
        drop(first);
        assert_eq!(slots.held(&"a"), 1);
        assert!(slots.take("a", 2).is_some());
    }
}
