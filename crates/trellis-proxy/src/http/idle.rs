//! The idle timeout of an app's HTTP connection to the proxy: requests in flight
//! (until their response body ends) and when the last one ended, so that a connection
//! with nothing in flight for the timeout is shut down gracefully. HTTP/1 has hyper's
//! header timer as well; this is what covers HTTP/2, where hyper has no idle timer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::time::Instant;

use super::Body;

/// Shared by a connection's requests and its idle watcher.
pub struct IdleTracker {
    opened: Instant,
    in_flight: AtomicUsize,
    /// When a request last started or ended, in µs since `opened`.
    last_us: AtomicU64,
}

impl IdleTracker {
    pub fn new() -> Arc<Self> {
        Arc::new(IdleTracker {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_us: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_micros() as u64;
        self.last_us.store(now, Ordering::Relaxed);
    }

    /// Counts a request as in flight until its response body ends or is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once nothing has been in flight for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.opened + Duration::from_micros(self.last_us.load(Ordering::Relaxed));
            if self.in_flight.load(Ordering::Relaxed) == 0 && last + idle <= Instant::now() {
                return;
            }
            // While requests are in flight, look again after another period.
            tokio::time::sleep_until((last + idle).max(Instant::now() + idle / 4)).await;
        }
    }
}

/// One request in flight.
pub struct InFlight(Arc<IdleTracker>);

impl InFlight {
    /// Keeps the request in flight until the response body is done.
    pub fn attach(self, response: Response<Body>) -> Response<Body> {
        response.map(|inner| {
            TrackedBody {
                inner,
                _in_flight: self,
            }
            .boxed()
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = <Body as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_when_nothing_is_in_flight_for_the_period() {
        let tracker = IdleTracker::new();
        let idle = Duration::from_millis(300);
        let request = tracker.start();
        let response = request.attach(Response::new(super::super::errors::full(
            bytes::Bytes::from_static(b"body"),
        )));
        // A response body outstanding for ten periods keeps it busy.
        let waiting = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.idle_for(idle).await }
        });
        tokio::time::sleep(idle * 10).await;
        assert!(!waiting.is_finished());
        let started = Instant::now();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"body");
        waiting.await.unwrap();
        assert!(started.elapsed() >= idle, "idle before the period passed");
    }
}
