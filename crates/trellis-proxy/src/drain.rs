//! Graceful shutdown: on SIGTERM the listeners close, connections in flight get a
//! drain period to finish, then the process exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Held by accept loops (to stop) and by every connection (to be waited for).
#[derive(Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
}

/// The owner's side: starts the drain and waits for it.
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    open: Arc<AtomicUsize>,
}

/// Counts one connection while it lives.
pub struct ConnectionGuard(Arc<AtomicUsize>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn channel() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    (
        DrainTrigger {
            signal: tx,
            open: open.clone(),
        },
        Drain { signal: rx, open },
    )
}

impl Drain {
    /// Resolves when draining starts.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn track(&self) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.open.clone())
    }
}

impl DrainTrigger {
    /// Stops accepting and waits up to `grace` for open connections to finish.
    /// Returns how many were still open when the time ran out.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.signal.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let open = self.open.load(Ordering::Acquire);
            if open == 0 || tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_open_connections_then_gives_up() {
        let (trigger, drain) = channel();
        let guard = drain.track();
        let waiting = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let left = trigger.drain(Duration::from_secs(5)).await;
            (left, start.elapsed())
        });
        drain.signaled().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(guard);
        let (left, took) = waiting.await.unwrap();
        assert_eq!(left, 0);
        assert!(took < Duration::from_secs(5));

        let (trigger, drain) = channel();
        let _stuck = drain.track();
        assert_eq!(trigger.drain(Duration::from_millis(100)).await, 1);
    }
}
