//! Carrying opaque TCP: bytes both ways until either side closes, or until the
//! connection has been silent in both directions for the service's idle timeout.

use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// What a carried connection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// Bytes from `a` to `b`, and back.
    pub a_to_b: u64,
    pub b_to_a: u64,
    /// Closed by the proxy because nothing moved for the idle timeout.
    pub idle_timeout: bool,
}

/// Copies between `a` and `b` until one side closes. With `idle`, a connection on
/// which no byte moved either way for that long is shut down on both sides.
pub async fn carry<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> io::Result<Carried>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(idle) = idle else {
        // No timer: the plain copy, with nothing added per read.
        let (a_to_b, b_to_a) = tokio::io::copy_bidirectional(a, b).await?;
        return Ok(Carried {
            a_to_b,
            b_to_a,
            idle_timeout: false,
        });
    };
    let activity = Activity::new();
    // Every byte either way passes through `a`, so watching `a` alone is enough.
    let mut watched = Watched {
        inner: a,
        activity: &activity,
    };
    {
        let mut copy = pin!(tokio::io::copy_bidirectional(&mut watched, b));
        loop {
            let deadline = activity.last() + idle;
            tokio::select! {
                copied = &mut copy => {
                    let (a_to_b, b_to_a) = copied?;
                    return Ok(Carried { a_to_b, b_to_a, idle_timeout: false });
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if activity.last() + idle <= Instant::now() {
                        break;
                    }
                }
            }
        }
    }
    // Shut both sides down so each peer reads an orderly end; a peer that does not
    // read gets no longer than another idle period.
    let _ = tokio::time::timeout(idle, watched.inner.shutdown()).await;
    let _ = tokio::time::timeout(idle, b.shutdown()).await;
    Ok(Carried {
        a_to_b: activity.read.load(Ordering::Relaxed),
        b_to_a: activity.written.load(Ordering::Relaxed),
        idle_timeout: true,
    })
}

/// When bytes last moved, as microseconds since `start`, and how many.
struct Activity {
    start: Instant,
    last_us: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_us: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_micros(self.last_us.load(Ordering::Relaxed))
    }

    fn touch(&self, counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
            let now = self.start.elapsed().as_micros() as u64;
            self.last_us.store(now, Ordering::Relaxed);
        }
    }
}

/// A stream that records its reads and writes in an `Activity`.
struct Watched<'a, S: ?Sized> {
    inner: &'a mut S,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.activity
                .touch(&self.activity.read, buf.filled().len() - before);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.activity.touch(&self.activity.written, n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_and_an_active_one_is_not() {
        let (mut app, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(300);
        let carried = tokio::spawn(async move { carry(&mut a, &mut b, Some(idle)).await });

        // Traffic every 100 ms for a second keeps it open (paused clock: exact).
        for i in 0..10u8 {
            app.write_all(&[i]).await.unwrap();
            let mut got = [0u8; 1];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [i]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!carried.is_finished());
        server.write_all(b"pong").await.unwrap();
        let mut got = [0u8; 4];
        app.read_exact(&mut got).await.unwrap();

        // Then silence: both sides read the end.
        let mut rest = Vec::new();
        assert_eq!(app.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
        let carried = carried.await.unwrap().unwrap();
        assert_eq!(
            carried,
            Carried {
                a_to_b: 10,
                b_to_a: 4,
                idle_timeout: true
            }
        );
    }

    #[tokio::test]
    async fn without_a_timeout_it_is_a_plain_copy() {
        let (mut app, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let carried = tokio::spawn(async move { carry(&mut a, &mut b, None).await });
        app.write_all(b"hello").await.unwrap();
        drop(app);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        drop(server);
        let carried = carried.await.unwrap().unwrap();
        assert_eq!((carried.a_to_b, carried.idle_timeout), (5, false));
    }
}
