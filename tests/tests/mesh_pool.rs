//! The mesh hop's connection pools on loopback, against mesh servers with real mTLS
//! (a real CA, rustls on both ends):
//!
//! - HTTP/1.1 (`mesh_h1`): one kept-alive connection reused by sequential requests;
//!   a new connection resumes the TLS session; at most `max` connections per
//!   endpoint, with a wait queue and a clear `Busy` error when the wait runs out; a
//!   connection the peer closed while idle is replaced without failing the request;
//!   a request the peer closed on without a byte of answer is told apart (the outbound
//!   sends it again elsewhere when it is idempotent);
//!   never a connection to a peer proving another identity.
//! - HTTP/2 (`pool`): slow readers on some streams cannot stall the connection's
//!   other streams; at the stream limit another connection is opened instead of
//!   queueing; evicting a broken connection leaves a fresh healthy one alone.
//!
//! Loops are bounded; waits are `eventually`-style with generous limits.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use trellis_control::ca::{CertificateAuthority, Proven};
use trellis_identity::{MeshTls, SpiffeId, TrustBundle, WorkloadKey};
use trellis_proxy::http::Body;
use trellis_proxy::http::mesh_h1::{MeshHttp1Error, MeshHttp1Pool, Target};
use trellis_proxy::http::pool::MeshPool;
use trellis_proxy::metrics::Metrics;
use trellis_tests::loopback::eventually;

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", sa).unwrap()
}

fn root_ca() -> Arc<CertificateAuthority> {
    Arc::new(CertificateAuthority::new_root(TD, Duration::from_secs(3600)).unwrap())
}

/// A workload's TLS material, signed by `ca`.
fn workload(ca: &CertificateAuthority, sa: &str) -> Arc<MeshTls> {
    let key = WorkloadKey::generate().unwrap();
    let proven = Proven {
        identity: id(sa),
        workload: None,
    };
    let leaf = ca
        .sign_workload(&key.csr_pem(&id(sa)).unwrap(), &proven, None)
        .unwrap();
    let cert = key.certify(&[leaf], &id(sa)).unwrap();
    let bundle = TrustBundle::from_pem(TD, &ca.trust_bundle_pem()).unwrap();
    Arc::new(MeshTls::new(cert, &bundle).unwrap())
}

fn body(bytes: &'static [u8]) -> Body {
    http_body_util::Full::new(Bytes::from_static(bytes))
        .map_err(|never| match never {})
        .boxed()
}

/// What a test mesh server saw.
#[derive(Default)]
struct Seen {
    /// Completed handshakes.
    accepted: AtomicUsize,
    /// Of which resumed a TLS session.
    resumed: AtomicUsize,
    /// Connections that have ended.
    closed: AtomicUsize,
    /// Requests inside the handler now.
    in_handler: AtomicUsize,
    /// Closes every open connection when notified.
    kill: tokio::sync::Notify,
}

/// How the test server answers.
#[derive(Clone)]
struct Behavior {
    /// Requests wait here (one permit each) before answering; `None` answers at once.
    gate: Option<Arc<Semaphore>>,
    /// HTTP/1: how long an idle keep-alive connection is kept (hyper's header read
    /// timeout).
    idle: Option<Duration>,
    /// HTTP/2: the stream limit the server advertises.
    max_streams: Option<u32>,
}

impl Behavior {
    fn plain() -> Self {
        Behavior {
            gate: None,
            idle: None,
            max_streams: None,
        }
    }
}

/// `/big` answers 3 MiB, anything else `ok`.
async fn answer(
    req: Request<Incoming>,
    seen: Arc<Seen>,
    gate: Option<Arc<Semaphore>>,
) -> Response<Body> {
    seen.in_handler.fetch_add(1, Ordering::SeqCst);
    if let Some(gate) = gate {
        gate.acquire().await.unwrap().forget();
    }
    seen.in_handler.fetch_sub(1, Ordering::SeqCst);
    if req.uri().path() == "/big" {
        return Response::new(
            http_body_util::Full::new(Bytes::from(vec![b'x'; 3 * 1024 * 1024]))
                .map_err(|never| match never {})
                .boxed(),
        );
    }
    Response::new(body(b"ok"))
}

/// A mesh server presenting `tls`, speaking HTTP/1.1 or HTTP/2 as ALPN says.
async fn mesh_server(tls: Arc<MeshTls>, behavior: Behavior) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counted = seen.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen, behavior) = (acceptor.clone(), counted.clone(), behavior.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    seen.resumed.fetch_add(1, Ordering::SeqCst);
                }
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                let (handler_seen, gate) = (seen.clone(), behavior.gate.clone());
                let service = hyper::service::service_fn(move |req| {
                    let (seen, gate) = (handler_seen.clone(), gate.clone());
                    async move { Ok::<_, std::convert::Infallible>(answer(req, seen, gate).await) }
                });
                let killed = seen.kill.notified();
                let served = async {
                    if h2 {
                        let mut builder =
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                        if let Some(max) = behavior.max_streams {
                            builder.max_concurrent_streams(max);
                        }
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    } else {
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder.timer(TokioTimer::new());
                        builder.header_read_timeout(behavior.idle);
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                };
                tokio::select! {
                    () = served => {}
                    () = killed => {}
                }
                seen.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

fn target<'a>(
    addr: SocketAddr,
    identity: &'a SpiffeId,
    tls: &'a Arc<MeshTls>,
    max: usize,
) -> Target<'a> {
    Target {
        addr,
        identity,
        tls,
        connect_timeout: Duration::from_secs(5),
        max,
        idle: None,
        service: "web.default",
    }
}

/// A GET through the HTTP/1.1 pool, the way the outbound sends one.
async fn send_h1(
    pool: &MeshHttp1Pool,
    target: &Target<'_>,
) -> Result<Response<Body>, MeshHttp1Error> {
    let checkout = pool.checkout(target).await?;
    pool.send(checkout, target, get("/")).await
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header(http::header::HOST, "web.default")
        .body(body(b""))
        .unwrap()
}

async fn read_ok(response: Response<Body>) {
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"ok");
}

// ---------------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_reuse_one_connection_and_new_connections_resume_tls() {
    let ca = root_ca();
    let gate = Arc::new(Semaphore::new(0));
    let behavior = Behavior {
        gate: Some(gate.clone()),
        ..Behavior::plain()
    };
    let (addr, seen) = mesh_server(workload(&ca, "web"), behavior).await;
    let client = workload(&ca, "client");
    let pool = Arc::new(MeshHttp1Pool::new(Metrics::new()));
    let web = id("web");
    for _ in 0..3 {
        gate.add_permits(1);
        let response = send_h1(&pool, &target(addr, &web, &client, 8))
            .await
            .unwrap();
        read_ok(response).await;
    }
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
    assert_eq!(pool.idle_count(), 1);

    // Two at once need two connections; the second resumes the first's session.
    let sends: Vec<_> = (0..2)
        .map(|_| {
            let (pool, client, web) = (pool.clone(), client.clone(), web.clone());
            tokio::spawn(async move {
                let response = send_h1(&pool, &target(addr, &web, &client, 8))
                    .await
                    .unwrap();
                read_ok(response).await;
            })
        })
        .collect();
    eventually("both requests reached the server", WAIT, || async {
        seen.in_handler.load(Ordering::SeqCst) == 2
    })
    .await;
    gate.add_permits(2);
    for send in sends {
        send.await.unwrap();
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(
        seen.resumed.load(Ordering::SeqCst),
        1,
        "the new connection resumed TLS"
    );
    assert_eq!(pool.idle_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_are_bounded_and_requests_wait_their_turn() {
    let ca = root_ca();
    let gate = Arc::new(Semaphore::new(0));
    let behavior = Behavior {
        gate: Some(gate.clone()),
        ..Behavior::plain()
    };
    let (addr, seen) = mesh_server(workload(&ca, "web"), behavior).await;
    let client = workload(&ca, "client");
    let pool = Arc::new(MeshHttp1Pool::new(Metrics::new()));
    let sends: Vec<_> = (0..6)
        .map(|_| {
            let (pool, client) = (pool.clone(), client.clone());
            tokio::spawn(async move {
                let web = id("web");
                let response = send_h1(&pool, &target(addr, &web, &client, 2))
                    .await
                    .unwrap();
                read_ok(response).await;
            })
        })
        .collect();
    eventually("two requests reached the server", WAIT, || async {
        seen.in_handler.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        2,
        "no more than max connections"
    );
    gate.add_permits(6);
    for send in sends {
        send.await.unwrap();
    }
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        2,
        "the waiters took the same two"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_too_long_for_a_connection_is_refused_as_busy() {
    let ca = root_ca();
    let gate = Arc::new(Semaphore::new(0));
    let behavior = Behavior {
        gate: Some(gate.clone()),
        ..Behavior::plain()
    };
    let (addr, seen) = mesh_server(workload(&ca, "web"), behavior).await;
    let client = workload(&ca, "client");
    let pool = Arc::new(MeshHttp1Pool::new(Metrics::new()));
    let web = id("web");
    let first = {
        let (pool, client, web) = (pool.clone(), client.clone(), web.clone());
        tokio::spawn(async move {
            let response = send_h1(&pool, &target(addr, &web, &client, 1))
                .await
                .unwrap();
            read_ok(response).await;
        })
    };
    eventually("the first request reached the server", WAIT, || async {
        seen.in_handler.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut short = target(addr, &web, &client, 1);
    short.connect_timeout = Duration::from_millis(100);
    let err = send_h1(&pool, &short).await.unwrap_err();
    assert!(matches!(err, MeshHttp1Error::Busy { max: 1, .. }), "{err}");
    assert!(
        err.is_connect_error(),
        "nothing was sent: another endpoint may take it"
    );
    gate.add_permits(1);
    first.await.unwrap();
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_peer_closed_while_idle_is_replaced_without_an_error() {
    let ca = root_ca();
    let behavior = Behavior {
        idle: Some(Duration::from_millis(100)),
        ..Behavior::plain()
    };
    let (addr, seen) = mesh_server(workload(&ca, "web"), behavior).await;
    let client = workload(&ca, "client");
    let pool = MeshHttp1Pool::new(Metrics::new());
    let web = id("web");
    for round in 1..=3 {
        let response = send_h1(&pool, &target(addr, &web, &client, 4))
            .await
            .unwrap();
        read_ok(response).await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), round);
        eventually("the server closed the idle connection", WAIT, || async {
            seen.closed.load(Ordering::SeqCst) == round
        })
        .await;
    }
}

/// A peer that takes the request head and closes without a byte of answer, as a
/// sidecar does when its pod stops just as a request arrives on an idle connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_peer_closed_on_unanswered_is_reported_as_unanswered() {
    use tokio::io::AsyncReadExt;
    let ca = root_ca();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(workload(&ca, "web").server_config());
    let heads = Arc::new(AtomicUsize::new(0));
    let seen_heads = heads.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut stream) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            seen_heads.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let client = workload(&ca, "client");
    let pool = MeshHttp1Pool::new(Metrics::new());
    let web = id("web");
    let err = send_h1(&pool, &target(addr, &web, &client, 4))
        .await
        .unwrap_err();
    assert_eq!(
        heads.load(Ordering::SeqCst),
        1,
        "the request reached the peer"
    );
    assert!(err.is_unanswered(), "{err:?}");
    assert!(!err.is_connect_error(), "{err:?}");
    assert_eq!(pool.idle_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_connection_is_never_made_to_a_peer_proving_another_identity() {
    let ca = root_ca();
    let (addr, seen) = mesh_server(workload(&ca, "other"), Behavior::plain()).await;
    let client = workload(&ca, "client");
    let pool = MeshHttp1Pool::new(Metrics::new());
    let web = id("web");
    let err = send_h1(&pool, &target(addr, &web, &client, 4))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("mTLS handshake"), "{err}");
    assert_eq!(seen.in_handler.load(Ordering::SeqCst), 0);
    assert_eq!(pool.idle_count(), 0);
}

// ---------------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_cannot_stall_the_other_streams_of_a_mesh_connection() {
    let ca = root_ca();
    let (addr, seen) = mesh_server(workload(&ca, "web"), Behavior::plain()).await;
    let client = workload(&ca, "client");
    let pool = MeshPool::new(Metrics::new());
    let web = id("web");
    let timeout = Duration::from_secs(5);
    // Eight responses of 3 MiB that nobody reads: each fills its stream window.
    let mut unread = Vec::new();
    for _ in 0..8 {
        let mut sender = pool
            .sender(addr, &web, &client, timeout, "svc", None)
            .await
            .unwrap();
        let request = Request::get("http://web.default/big")
            .body(body(b""))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        unread.push(response);
    }
    // A small response on the same connection still arrives whole.
    let mut sender = pool
        .sender(addr, &web, &client, timeout, "svc", None)
        .await
        .unwrap();
    let request = Request::get("http://web.default/").body(body(b"")).unwrap();
    let small = tokio::time::timeout(WAIT, async move {
        let response = sender.send_request(request).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    })
    .await
    .expect("a small response stalled behind unread ones");
    assert_eq!(&small[..], b"ok");
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    drop(unread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_stream_limit_the_pool_opens_another_connection() {
    let ca = root_ca();
    let gate = Arc::new(Semaphore::new(0));
    let limit = trellis_proxy::http::inbound::MESH_MAX_STREAMS;
    let behavior = Behavior {
        gate: Some(gate.clone()),
        max_streams: Some(limit),
        ..Behavior::plain()
    };
    let (addr, seen) = mesh_server(workload(&ca, "web"), behavior).await;
    let client = workload(&ca, "client");
    let pool = Arc::new(MeshPool::new(Metrics::new()));
    let total = limit as usize + 6;
    let sends: Vec<_> = (0..total)
        .map(|_| {
            let (pool, client) = (pool.clone(), client.clone());
            tokio::spawn(async move {
                let web = id("web");
                let mut sender = pool
                    .sender(addr, &web, &client, Duration::from_secs(5), "svc", None)
                    .await
                    .unwrap();
                let request = Request::get("http://web.default/").body(body(b"")).unwrap();
                let response = sender.send_request(request).await.unwrap();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&bytes[..], b"ok");
            })
        })
        .collect();
    eventually("every request reached the server at once", WAIT, || async {
        seen.in_handler.load(Ordering::SeqCst) == total
    })
    .await;
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        2,
        "one more connection, no queue"
    );
    gate.add_permits(total);
    for send in sends {
        send.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_a_broken_connection_leaves_a_fresh_one_alone() {
    let ca = root_ca();
    let behavior = Behavior {
        gate: None,
        ..Behavior::plain()
    };
    let (addr, seen) = mesh_server(workload(&ca, "web"), behavior).await;
    let client = workload(&ca, "client");
    let pool = MeshPool::new(Metrics::new());
    let web = id("web");
    let timeout = Duration::from_secs(5);
    let mut broken = pool
        .sender(addr, &web, &client, timeout, "svc", None)
        .await
        .unwrap();
    let request = Request::get("http://web.default/").body(body(b"")).unwrap();
    read_ok(broken.send_request(request).await.unwrap()).await;
    // The first connection breaks (the peer restarted, say); a request made after
    // that gets a fresh one.
    seen.kill.notify_waiters();
    eventually("the first connection is closed", WAIT, || async {
        broken.is_closed()
    })
    .await;
    let fresh = pool
        .sender(addr, &web, &client, timeout, "svc", None)
        .await
        .unwrap();
    assert!(!fresh.is_closed());
    eventually(
        "the server accepted the second connection",
        WAIT,
        || async { seen.accepted.load(Ordering::SeqCst) == 2 },
    )
    .await;
    // Only now does the request that was on the broken one report its failure.
    pool.evict(addr, &broken);
    assert_eq!(pool.len(), 1, "the fresh connection stays pooled");
    let mut again = pool
        .sender(addr, &web, &client, timeout, "svc", None)
        .await
        .unwrap();
    let request = Request::get("http://web.default/").body(body(b"")).unwrap();
    read_ok(again.send_request(request).await.unwrap()).await;
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        2,
        "no third connection"
    );
}
