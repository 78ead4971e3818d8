//! Choosing an endpoint for a new connection: power of two choices over the number of
//! connections each endpoint has open, among ready endpoints only.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::discovery::state::Endpoint;

#[derive(Debug)]
pub struct EndpointSet {
    endpoints: Vec<(Endpoint, Arc<AtomicUsize>)>,
}

/// Counts a connection against its endpoint while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        EndpointSet {
            endpoints: endpoints
                .into_iter()
                .map(|e| (e, Arc::new(AtomicUsize::new(0))))
                .collect(),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().map(|(e, _)| e)
    }

    pub fn ready_count(&self) -> usize {
        self.endpoints.iter().filter(|(e, _)| e.ready).count()
    }

    /// Picks a ready endpoint, skipping `exclude` (endpoints that already failed for
    /// this connection).
    pub fn pick(&self, exclude: &[std::net::SocketAddr]) -> Option<(&Endpoint, ActiveGuard)> {
        let candidates: Vec<&(Endpoint, Arc<AtomicUsize>)> = self
            .endpoints
            .iter()
            .filter(|(e, _)| e.ready && !exclude.contains(&e.dial))
            .collect();
        let chosen = match candidates.len() {
            0 => return None,
            1 => candidates[0],
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ca, cb) = (candidates[a], candidates[b]);
                if cb.1.load(Ordering::Relaxed) < ca.1.load(Ordering::Relaxed) {
                    cb
                } else {
                    ca
                }
            }
        };
        chosen.1.fetch_add(1, Ordering::Relaxed);
        Some((&chosen.0, ActiveGuard(chosen.1.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16, ready: bool) -> Endpoint {
        let addr = std::net::SocketAddr::from(([10, 0, 0, 1], port));
        Endpoint {
            address: addr,
            identity: "spiffe://cluster.local/ns/a/sa/b".parse().unwrap(),
            dial: addr,
            ready,
            weight: 1,
        }
    }

    #[test]
    fn never_picks_unready_or_excluded() {
        let set = EndpointSet::new(vec![ep(1, false), ep(2, true), ep(3, true)]);
        let excluded = [ep(3, true).dial];
        for _ in 0..50 {
            let (e, _guard) = set.pick(&excluded).unwrap();
            assert_eq!(e.address.port(), 2);
        }
        assert!(set.pick(&[ep(2, true).dial, ep(3, true).dial]).is_none());
    }

    #[test]
    fn prefers_the_less_loaded_endpoint() {
        let set = EndpointSet::new(vec![ep(1, true), ep(2, true)]);
        // Hold many connections on whichever comes first; new picks go to the other.
        let (first, guard) = set.pick(&[]).unwrap();
        let busy = first.address;
        let mut held = vec![guard];
        for _ in 0..10 {
            held.push(ActiveGuard({
                let slot = &set
                    .endpoints
                    .iter()
                    .find(|(e, _)| e.address == busy)
                    .unwrap()
                    .1;
                slot.fetch_add(1, Ordering::Relaxed);
                slot.clone()
            }));
        }
        for _ in 0..20 {
            let (e, _g) = set.pick(&[]).unwrap();
            assert_ne!(e.address, busy);
        }
        drop(held);
        assert!(
            set.endpoints
                .iter()
                .all(|(_, n)| n.load(Ordering::Relaxed) == 0)
        );
    }
}
