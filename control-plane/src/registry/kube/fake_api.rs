//! A scripted Kubernetes API for tests, in the manner of kube-rs' own mock tests: a
//! `tower_test` pair behind a real [`kube::Client`], answering each request from a
//! script keyed by method, path and whether it is a watch. Requests nobody scripted
//! are logged and left hanging, as a quiet API server would.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kube::client::Body;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;

/// A recorded fixture under `control-plane/tests/fixtures/kube/`.
pub fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

enum Reply {
    Json {
        status: StatusCode,
        body: Value,
        gate: Option<oneshot::Receiver<()>>,
    },
    /// A watch: checks the resourceVersion it resumes from, then streams lines.
    Watch {
        resource_version: String,
        events: mpsc::UnboundedReceiver<Bytes>,
    },
}

/// The sending end of a scripted watch stream. Dropping it ends the stream.
pub struct WatchFeed(mpsc::UnboundedSender<Bytes>);

impl WatchFeed {
    /// Sends one watch event (a JSON line).
    pub fn send(&self, event: &Value) {
        let mut line = serde_json::to_vec(event).unwrap();
        line.push(b'\n');
        self.0.send(line.into()).unwrap();
    }

    /// Sends the `n`th line (0-based) of a `.jsonl` fixture.
    pub fn send_line(&self, fixture_name: &str, n: usize) {
        let text = fixture(fixture_name);
        let line = text
            .lines()
            .nth(n)
            .unwrap_or_else(|| panic!("{fixture_name}: no line {n}"));
        self.send(&serde_json::from_str(line).unwrap());
    }
}

type Key = (Method, String, bool);

/// What the fake saw: `METHOD path?query` per request, and the JSON bodies sent.
#[derive(Clone, Default)]
pub struct Seen {
    pub requests: Arc<Mutex<Vec<String>>>,
    pub bodies: Arc<Mutex<Vec<Value>>>,
}

impl Seen {
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

#[derive(Default)]
pub struct FakeApi {
    script: HashMap<Key, VecDeque<Reply>>,
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, key: Key, reply: Reply) {
        self.script.entry(key).or_default().push_back(reply);
    }

    /// A list (GET without `watch=true`) answered with `body`.
    pub fn list(&mut self, path: &str, body: Value) -> &mut Self {
        self.reply(Method::GET, path, 200, body)
    }

    /// A list answered only once `gate` fires.
    pub fn list_gated(&mut self, path: &str, body: Value, gate: oneshot::Receiver<()>) {
        self.reply_gated(Method::GET, path, 200, body, gate);
    }

    /// Any non-watch request answered only once `gate` fires.
    pub fn reply_gated(
        &mut self,
        method: Method,
        path: &str,
        status: u16,
        body: Value,
        gate: oneshot::Receiver<()>,
    ) {
        let reply = Reply::Json {
            status: StatusCode::from_u16(status).unwrap(),
            body,
            gate: Some(gate),
        };
        self.push((method, path.to_owned(), false), reply);
    }

    /// Any non-watch request answered with `status` and `body`.
    pub fn reply(&mut self, method: Method, path: &str, status: u16, body: Value) -> &mut Self {
        let reply = Reply::Json {
            status: StatusCode::from_u16(status).unwrap(),
            body,
            gate: None,
        };
        self.push((method, path.to_owned(), false), reply);
        self
    }

    /// A watch that must resume from `resource_version`; the feed sends its events.
    pub fn watch(&mut self, path: &str, resource_version: &str) -> WatchFeed {
        let (tx, rx) = mpsc::unbounded_channel();
        let reply = Reply::Watch {
            resource_version: resource_version.to_owned(),
            events: rx,
        };
        self.push((Method::GET, path.to_owned(), true), reply);
        WatchFeed(tx)
    }

    /// Starts answering; returns a client talking to this fake and what it sees.
    pub fn start(self) -> (kube::Client, Seen) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<FakeBody>>();
        let client = kube::Client::new(service, "default");
        let seen = Seen::default();
        let log = seen.clone();
        let mut script = self.script;
        tokio::spawn(async move {
            let mut parked = Vec::new();
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let path = parts.uri.path().to_owned();
                let query = parts.uri.query().unwrap_or("").to_owned();
                let is_watch = query.split('&').any(|q| q == "watch=true");
                log.requests
                    .lock()
                    .unwrap()
                    .push(format!("{} {path}?{query}", parts.method));
                if let Ok(bytes) = body.collect().await.map(|b| b.to_bytes())
                    && let Ok(json) = serde_json::from_slice::<Value>(&bytes)
                {
                    log.bodies.lock().unwrap().push(json);
                }
                let key = (parts.method.clone(), path.clone(), is_watch);
                let Some(reply) = script.get_mut(&key).and_then(VecDeque::pop_front) else {
                    parked.push(respond);
                    continue;
                };
                tokio::spawn(async move {
                    let response = match reply {
                        Reply::Json { status, body, gate } => {
                            if let Some(gate) = gate {
                                let _ = gate.await;
                            }
                            let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
                            let body = Full::new(bytes).boxed_unsync();
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(body)
                                .unwrap()
                        }
                        Reply::Watch {
                            resource_version,
                            events,
                        } => {
                            let want = format!("resourceVersion={resource_version}");
                            assert!(
                                query.split('&').any(|q| q == want),
                                "watch of {path} should resume from {want}: {query}"
                            );
                            let frames = UnboundedReceiverStream::new(events)
                                .map(|b| Ok::<_, Infallible>(Frame::data(b)));
                            Response::new(StreamBody::new(frames).boxed_unsync())
                        }
                    };
                    respond.send_response(response);
                });
            }
            drop(parked);
        });
        (client, seen)
    }
}
