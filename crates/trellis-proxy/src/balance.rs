//! Choosing an endpoint: power of two choices over peak-EWMA latency (default), least
//! request, round robin, or consistent hashing; ready endpoints only; endpoints with
//! consecutive failures ejected with growing back-off, never more than a set share.
//!
//! Per-endpoint statistics are atomics shared by every connection and carried over
//! when discovery replaces the endpoint list, so a config update loses no history.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::discovery::state::Endpoint;
use crate::http::policy::{LbAlgorithm, Outlier};

/// Decay time of the latency average.
const EWMA_TAU: Duration = Duration::from_secs(10);
/// Cost of an endpoint with no latency sample yet (1 ms), so new ones get tried.
const DEFAULT_RTT_US: f64 = 1_000.0;
/// Weight of one outcome in the failure rate: five failures in a row make it 0.67.
const FAILURE_ALPHA: f64 = 0.2;
/// Lowest success rate the cost divides by: a failing endpoint costs at most 10,000
/// times its latency, so it still gets a request when the other one is that slow.
const MIN_SUCCESS_RATE: f64 = 0.01;

/// `e^(-age / EWMA_TAU)` for an age in microseconds, to 0.2 %: `(e^(-x/64))^64` with
/// the inner value from its Taylor series. libm's `exp` would keep its code pages
/// resident in every sidecar for this one use; a decay weight needs no more precision.
fn decay(age_us: f64) -> f64 {
    let x = age_us / EWMA_TAU.as_micros() as f64;
    // e^-40 is 4e-18: nothing is left to weigh (and NaN or a negative age gives 1).
    if x >= 40.0 {
        return 0.0;
    }
    if x.is_nan() || x <= 0.0 {
        return 1.0;
    }
    let y = x / 64.0;
    let mut w = 1.0 - y * (1.0 - y / 2.0 * (1.0 - y / 3.0 * (1.0 - y / 4.0)));
    for _ in 0..6 {
        w *= w;
    }
    w
}

fn now_us() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// What the balancer knows of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections (L4) or requests (L7) in flight.
    active: AtomicUsize,
    ewma_us: AtomicU64,
    /// Recent share of failed requests (f64 bits), decaying with `stamp_us` like
    /// the latency.
    failure_rate: AtomicU64,
    stamp_us: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_us: AtomicU64,
}

impl EndpointStats {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn ewma(&self, now: u64) -> f64 {
        let bits = self.ewma_us.load(Ordering::Relaxed);
        if bits == 0 {
            return DEFAULT_RTT_US;
        }
        let value = f64::from_bits(bits);
        let age = now.saturating_sub(self.stamp_us.load(Ordering::Relaxed)) as f64;
        // An idle endpoint's cost decays towards the default, so it gets tried again.
        let w = decay(age);
        value * w + DEFAULT_RTT_US * (1.0 - w)
    }

    fn failure_rate(&self, now: u64) -> f64 {
        let rate = f64::from_bits(self.failure_rate.load(Ordering::Relaxed));
        // The usual case on the request path: nothing failed, no decay to compute.
        if rate == 0.0 {
            return 0.0;
        }
        let age = now.saturating_sub(self.stamp_us.load(Ordering::Relaxed)) as f64;
        // Like the latency, failures are forgotten while the endpoint is left alone.
        rate * decay(age)
    }

    /// P2C's cost: peak-EWMA latency times the load, divided by the square of the
    /// success rate. An endpoint that succeeds with probability p costs 1/p tries
    /// per success; squaring it makes one that fails fast lose to a slower healthy
    /// one (a fast 500 would otherwise look like the best endpoint).
    fn p2c_cost(&self, now: u64) -> f64 {
        let success = (1.0 - self.failure_rate(now)).max(MIN_SUCCESS_RATE);
        self.ewma(now) * (self.active() as f64 + 1.0) / (success * success)
    }

    fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_us.load(Ordering::Relaxed) > now
    }

    /// Records one request's outcome: latency into the peak-EWMA, the outcome into
    /// the failure rate, and failures towards ejection.
    pub fn observe(&self, latency: Duration, success: bool, outlier: &Outlier) {
        let now = now_us();
        let sample = latency.as_micros() as f64;
        let current = self.ewma(now);
        let failure = if success { 0.0 } else { 1.0 };
        let rate = self.failure_rate(now) * (1.0 - FAILURE_ALPHA) + failure * FAILURE_ALPHA;
        // Below 0.1 % it changes no choice; zero keeps `failure_rate` cheap.
        let rate = if rate < 1e-3 { 0.0 } else { rate };
        self.failure_rate.store(rate.to_bits(), Ordering::Relaxed);
        // Peak-sensitive: a slow response raises the cost at once, recovery is gradual.
        let next = if sample > current {
            sample
        } else {
            let age = now.saturating_sub(self.stamp_us.load(Ordering::Relaxed)) as f64;
            let w = decay(age);
            current * w + sample * (1.0 - w)
        };
        self.ewma_us
            .store(next.max(1.0).to_bits(), Ordering::Relaxed);
        self.stamp_us.store(now, Ordering::Relaxed);
        if success {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= outlier.consecutive_failures {
            let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
            let ejection = outlier.base_ejection.saturating_mul(n.min(10));
            self.ejected_until_us
                .store(now + ejection.as_micros() as u64, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            tracing::info!(ejection = ?ejection, times = n, "endpoint ejected after consecutive failures");
        }
    }
}

/// Counts a connection or request against its endpoint while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<EndpointStats>);

impl ActiveGuard {
    pub fn stats(&self) -> &EndpointStats {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Vec<(Endpoint, Arc<EndpointStats>)>,
    next: AtomicUsize,
}

impl EndpointSet {
    /// A set for `endpoints`, keeping the statistics of those `previous` also had.
    pub fn new(endpoints: Vec<Endpoint>, previous: Option<&EndpointSet>) -> Self {
        EndpointSet {
            endpoints: endpoints
                .into_iter()
                .map(|e| {
                    let stats = previous
                        .and_then(|p| p.endpoints.iter().find(|(old, _)| old.dial == e.dial))
                        .map(|(_, s)| s.clone())
                        .unwrap_or_default();
                    (e, stats)
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().map(|(e, _)| e)
    }

    pub fn ready_count(&self) -> usize {
        self.endpoints.iter().filter(|(e, _)| e.ready).count()
    }

    /// L4: P2C over open connections, default outlier settings.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<(&Endpoint, ActiveGuard)> {
        self.pick_with(
            &LbAlgorithm::LeastRequest,
            None,
            exclude,
            &Outlier::default(),
        )
    }

    /// Picks a ready, not ejected endpoint not in `exclude`. Ejection is ignored for
    /// endpoints beyond `max_ejection_percent`, and when every endpoint is out.
    pub fn pick_with(
        &self,
        algorithm: &LbAlgorithm,
        hash: Option<u64>,
        exclude: &[SocketAddr],
        outlier: &Outlier,
    ) -> Option<(&Endpoint, ActiveGuard)> {
        let now = now_us();
        let ready = self
            .endpoints
            .iter()
            .filter(|(e, _)| e.ready && !exclude.contains(&e.dial));
        let total = ready.clone().count();
        if total == 0 {
            return None;
        }
        let ejected = ready.clone().filter(|(_, s)| s.is_ejected(now)).count();
        let max_ejected = total * outlier.max_ejection_percent as usize / 100;
        let honour_ejection = ejected <= max_ejected && ejected < total;
        // Candidates are walked again by index rather than collected: no allocation
        // per request, and sets are small.
        let candidates = ready.filter(|(_, s)| !honour_ejection || !s.is_ejected(now));
        let n = candidates.clone().count();
        let nth = |i: usize| candidates.clone().nth(i);
        let chosen = match (algorithm, n) {
            (_, 0) => return None,
            (_, 1) => nth(0)?,
            (LbAlgorithm::RoundRobin, n) => nth(self.next.fetch_add(1, Ordering::Relaxed) % n)?,
            (LbAlgorithm::ConsistentHash { .. }, _) => {
                let key = hash.unwrap_or_else(rand::random);
                // Rendezvous hashing: the endpoint with the highest score for the key.
                candidates.clone().max_by_key(|(e, _)| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (key, e.dial).hash(&mut h);
                    h.finish()
                })?
            }
            (algorithm, n) => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                // Endpoint weights scale the cost: weight 2 looks half as loaded.
                let cost = |(e, s): &(Endpoint, Arc<EndpointStats>)| {
                    let load = match algorithm {
                        LbAlgorithm::P2cEwma => s.p2c_cost(now),
                        _ => s.active() as f64 + 1.0,
                    };
                    load / f64::from(e.weight.max(1))
                };
                let (ca, cb) = (nth(a)?, nth(b)?);
                if cost(cb) < cost(ca) { cb } else { ca }
            }
        };
        chosen.1.active.fetch_add(1, Ordering::Relaxed);
        Some((&chosen.0, ActiveGuard(chosen.1.clone())))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_decay_weight_follows_exp_closely_and_never_rises() {
        let tau = EWMA_TAU.as_micros() as f64;
        let mut last = decay(0.0);
        assert_eq!(last, 1.0);
        for i in 1..=4_000 {
            let age = tau * f64::from(i) / 100.0;
            let w = decay(age);
            let exact = (-age / tau).exp();
            assert!(w <= last, "rises at {age}");
            assert!(
                (w - exact).abs() <= exact * 2e-3 + 1e-12,
                "{w} vs {exact} at {age}"
            );
            last = w;
        }
        assert_eq!(decay(tau * 41.0), 0.0);
        assert_eq!(decay(-5.0), 1.0);
        assert_eq!(decay(f64::NAN), 1.0);
    }

    use super::*;

    fn ep(port: u16, ready: bool) -> Endpoint {
        let addr = SocketAddr::from(([10, 0, 0, 1], port));
        Endpoint {
            address: addr,
            identity: Some("spiffe://cluster.local/ns/a/sa/b".parse().unwrap()),
            dial: addr,
            ready,
            weight: 1,
            workload: Default::default(),
        }
    }

    #[test]
    fn never_picks_unready_or_excluded() {
        let set = EndpointSet::new(vec![ep(1, false), ep(2, true), ep(3, true)], None);
        let excluded = [ep(3, true).dial];
        for _ in 0..50 {
            let (e, _guard) = set.pick(&excluded).unwrap();
            assert_eq!(e.address.port(), 2);
        }
        assert!(set.pick(&[ep(2, true).dial, ep(3, true).dial]).is_none());
    }

    #[test]
    fn prefers_the_less_loaded_endpoint() {
        let set = EndpointSet::new(vec![ep(1, true), ep(2, true)], None);
        let mut held = Vec::new();
        let busy = {
            let (first, guard) = set.pick(&[]).unwrap();
            held.push(guard);
            first.address
        };
        for _ in 0..10 {
            let stats = &set
                .endpoints
                .iter()
                .find(|(e, _)| e.address == busy)
                .unwrap()
                .1;
            stats.active.fetch_add(1, Ordering::Relaxed);
            held.push(ActiveGuard(stats.clone()));
        }
        for _ in 0..20 {
            let (e, _g) = set.pick(&[]).unwrap();
            assert_ne!(e.address, busy);
        }
        drop(held);
        assert!(set.endpoints.iter().all(|(_, s)| s.active() == 0));
    }

    #[test]
    fn p2c_ewma_avoids_the_slow_endpoint() {
        let set = EndpointSet::new(vec![ep(1, true), ep(2, true)], None);
        let outlier = Outlier::default();
        set.endpoints[0]
            .1
            .observe(Duration::from_millis(50), true, &outlier);
        set.endpoints[1]
            .1
            .observe(Duration::from_millis(1), true, &outlier);
        let slow = (0..1000)
            .filter(|_| {
                let (e, _g) = set
                    .pick_with(&LbAlgorithm::P2cEwma, None, &[], &outlier)
                    .unwrap();
                e.address.port() == 1
            })
            .count();
        assert_eq!(slow, 0, "with two endpoints P2C always compares both");
    }

    #[test]
    fn p2c_ewma_avoids_an_endpoint_that_fails_fast() {
        // Ejection off: the failure rate alone must steer traffic away.
        let outlier = Outlier {
            consecutive_failures: u32::MAX,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 0,
        };
        let set = EndpointSet::new(vec![ep(1, true), ep(2, true)], None);
        let mut failing = 0;
        for _ in 0..400 {
            let (e, _g) = set
                .pick_with(&LbAlgorithm::P2cEwma, None, &[], &outlier)
                .unwrap();
            let stats = &set.endpoints[usize::from(e.address.port() - 1)].1;
            if e.address.port() == 1 {
                failing += 1;
                stats.observe(Duration::from_micros(100), false, &outlier);
            } else {
                stats.observe(Duration::from_millis(5), true, &outlier);
            }
        }
        assert!(
            failing < 40,
            "the fast-failing endpoint got {failing} of 400"
        );
        assert!(failing > 0, "it was never tried");
    }

    #[test]
    fn the_failure_rate_recovers_with_successes() {
        let outlier = Outlier::default();
        let stats = EndpointStats::default();
        for _ in 0..3 {
            stats.observe(Duration::from_millis(1), false, &outlier);
        }
        let failing = stats.p2c_cost(now_us());
        for _ in 0..20 {
            stats.observe(Duration::from_millis(1), true, &outlier);
        }
        let recovered = stats.p2c_cost(now_us());
        assert!(recovered < failing / 2.0, "{recovered} vs {failing}");
        assert!(stats.failure_rate(now_us()) < 0.05);
    }

    #[test]
    fn ejects_after_consecutive_failures_but_not_everyone() {
        let set = EndpointSet::new(vec![ep(1, true), ep(2, true)], None);
        let outlier = Outlier {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        };
        for _ in 0..3 {
            set.endpoints[0]
                .1
                .observe(Duration::from_millis(1), false, &outlier);
        }
        for _ in 0..50 {
            let (e, _g) = set
                .pick_with(&LbAlgorithm::RoundRobin, None, &[], &outlier)
                .unwrap();
            assert_eq!(e.address.port(), 2);
        }
        // Ejecting the second too would exceed 50%: both are used again.
        for _ in 0..3 {
            set.endpoints[1]
                .1
                .observe(Duration::from_millis(1), false, &outlier);
        }
        let ports: std::collections::HashSet<u16> = (0..20)
            .map(|_| {
                set.pick_with(&LbAlgorithm::RoundRobin, None, &[], &outlier)
                    .unwrap()
                    .0
                    .address
                    .port()
            })
            .collect();
        assert_eq!(ports.len(), 2);
    }

    #[test]
    fn consistent_hashing_is_sticky_and_carries_over() {
        let set = EndpointSet::new(vec![ep(1, true), ep(2, true), ep(3, true)], None);
        let algo = LbAlgorithm::ConsistentHash {
            header: None,
            cookie: Some("user".into()),
        };
        let outlier = Outlier::default();
        let first = set
            .pick_with(&algo, Some(42), &[], &outlier)
            .unwrap()
            .0
            .dial;
        for _ in 0..20 {
            assert_eq!(
                set.pick_with(&algo, Some(42), &[], &outlier)
                    .unwrap()
                    .0
                    .dial,
                first
            );
        }
        set.endpoints[0]
            .1
            .observe(Duration::from_millis(7), true, &outlier);
        let next = EndpointSet::new(vec![ep(1, true), ep(4, true)], Some(&set));
        assert!(Arc::ptr_eq(&next.endpoints[0].1, &set.endpoints[0].1));
        assert_eq!(next.endpoints[1].1.active(), 0);
    }
}
