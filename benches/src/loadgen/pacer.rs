//! The pacer: one OS thread that releases requests at their intended times.
//!
//! Tokio's timer has millisecond granularity and rounds deadlines up, so a task that
//! sleeps until a request's intended time wakes up 0–2 ms late, and with latency
//! measured from the intended time that lateness would be charged to the server (on
//! loopback, where a round trip is ~30 µs, it would be most of the figure). The pacer
//! sleeps with `std::thread::sleep` (`nanosleep`, ~50 µs timer slack) and, for each
//! request that is due, bumps its connection's release counter and wakes it.
//!
//! It also records how late it released each request: a large lag means the load
//! generator itself was short of CPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Notify;

use super::{latency_us, new_histogram};
use crate::Result;

/// Longest single sleep, so that a stopped pacer notices within this.
const MAX_NAP: Duration = Duration::from_millis(20);

struct Shared {
    /// `released[c] = k + 1` once connection `c`'s `k`-th request is due.
    released: Vec<AtomicU64>,
    wake: Vec<Notify>,
    stop: AtomicBool,
}

/// A connection's view of the pacer.
pub(crate) struct Gate {
    shared: Arc<Shared>,
    conn: usize,
}

impl Gate {
    /// Returns once this connection's `k`-th request is due (at once if it already is).
    pub async fn wait(&self, k: u64) {
        let (Some(released), Some(wake)) = (
            self.shared.released.get(self.conn),
            self.shared.wake.get(self.conn),
        ) else {
            return;
        };
        // `notify_one` stores a permit when nobody waits, so no wake-up is lost
        // between the check and the await.
        while released.load(Ordering::Acquire) <= k {
            wake.notified().await;
        }
    }
}

/// The pacer thread; dropping it stops the thread.
pub(crate) struct Pacer {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<Histogram<u64>>>,
}

impl Pacer {
    /// Starts releasing requests `0..total` at `start + i / rate`, request `i` going to
    /// connection `i % conns`.
    /// Within `spin` of a due time it yields in a loop instead of sleeping: more exact,
    /// at the cost of CPU.
    pub fn start(
        start: Instant,
        rate: f64,
        total: u64,
        conns: usize,
        spin: Duration,
    ) -> Result<(Self, Vec<Gate>)> {
        let shared = Arc::new(Shared {
            released: (0..conns).map(|_| AtomicU64::new(0)).collect(),
            wake: (0..conns).map(|_| Notify::new()).collect(),
            stop: AtomicBool::new(false),
        });
        let mut lag = new_histogram()?;
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("trellis-pacer".into())
            .spawn(move || {
                run(&s, start, rate, total, spin, &mut lag);
                lag
            })?;
        let gates = (0..conns)
            .map(|conn| Gate {
                shared: Arc::clone(&shared),
                conn,
            })
            .collect();
        Ok((
            Self {
                shared,
                thread: Some(thread),
            },
            gates,
        ))
    }

    /// Stops the thread and returns how late it released requests (µs).
    pub async fn finish(mut self) -> Option<Histogram<u64>> {
        self.shared.stop.store(true, Ordering::Release);
        let thread = self.thread.take()?;
        tokio::task::spawn_blocking(move || thread.join().ok())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

fn run(
    shared: &Shared,
    start: Instant,
    rate: f64,
    total: u64,
    spin: Duration,
    lag: &mut Histogram<u64>,
) {
    let conns = shared.released.len() as u64;
    let mut i = 0u64;
    while i < total && !shared.stop.load(Ordering::Acquire) {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if due > now {
            let wait = due - now;
            if wait > spin {
                std::thread::sleep((wait - spin).min(MAX_NAP));
            } else {
                std::thread::yield_now();
            }
            continue;
        }
        // Release everything that is due by now.
        while i < total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due > now {
                break;
            }
            let c = (i % conns) as usize;
            if let (Some(r), Some(w)) = (shared.released.get(c), shared.wake.get(c)) {
                r.store(i / conns + 1, Ordering::Release);
                w.notify_one();
            }
            lag.saturating_record(latency_us(due.into(), now.into()));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn releases_in_order_and_on_time() {
        let start = Instant::now();
        let (pacer, gates) =
            Pacer::start(start, 1000.0, 40, 4, Duration::from_micros(100)).unwrap();
        // Connection 3 owns requests 3, 7, ..., 39; its 9th (k = 9) is request 39 at 39 ms.
        gates[3].wait(9).await;
        assert!(start.elapsed() >= Duration::from_millis(39));
        // Earlier slots are already released.
        gates[0].wait(0).await;
        let lag = pacer.finish().await.unwrap();
        assert_eq!(lag.len(), 40);
    }

    #[tokio::test]
    async fn stop_ends_the_thread() {
        let (pacer, _gates) = Pacer::start(Instant::now(), 0.5, 1_000, 1, Duration::ZERO).unwrap();
        let lag = tokio::time::timeout(Duration::from_secs(5), pacer.finish())
            .await
            .unwrap()
            .unwrap();
        assert!(lag.len() <= 1);
    }
}
