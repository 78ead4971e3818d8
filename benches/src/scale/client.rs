//! Lightweight discovery clients: one TLS connection and one delta stream each, with
//! the proxy's own control-plane channel, subscribing like a proxy and ACKing every
//! response without building a proxy's state. They keep counters, not resources, so
//! thousands fit in one process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use trellis_identity::WorkloadCertificate;
use trellis_proto::discovery::v1::aggregated_discovery_client::AggregatedDiscoveryClient;
use trellis_proto::discovery::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};

use crate::{BenchError, Result};

/// What a proxy subscribes to, in the proxy's order.
pub const TYPES: [&str; 7] = trellis_control::discovery::TYPE_URLS;

/// Where the control plane is and how to trust it.
#[derive(Clone, Debug)]
pub struct ControlTarget {
    pub addr: String,
    pub server_name: String,
    pub root_pem: String,
}

/// One client's first sync: how long from start until every type was answered and
/// ACKed, and what it received then (its view).
#[derive(Clone, Copy, Debug, Default)]
pub struct FirstConfig {
    pub elapsed: Duration,
    pub resources: u64,
    pub bytes: u64,
}

/// The resource a change rewrites, and when the change was made.
#[derive(Clone, Debug)]
struct Watched {
    type_url: &'static str,
    name: String,
    since: Instant,
}

/// Shared between the driver and every client.
#[derive(Default)]
pub struct Observations {
    /// Encoded size of every response received (protobuf bytes, without gRPC, HTTP/2
    /// and TLS framing).
    pub bytes: AtomicU64,
    pub responses: AtomicU64,
    /// Streams that failed or ended and were opened again.
    pub reconnects: AtomicU64,
    watched: Mutex<Option<Watched>>,
    /// For the watched change: per client, change to its ACK.
    acks: Mutex<Vec<Duration>>,
    first: Mutex<Vec<FirstConfig>>,
}

impl Observations {
    /// Starts timing a change to (`type_url`, `name`), made now.
    pub fn watch(&self, type_url: &'static str, name: String) {
        if let Ok(mut acks) = self.acks.lock() {
            acks.clear();
        }
        if let Ok(mut watched) = self.watched.lock() {
            *watched = Some(Watched {
                type_url,
                name,
                since: Instant::now(),
            });
        }
    }

    pub fn acks(&self) -> Vec<Duration> {
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }

    pub fn first_configs(&self) -> Vec<FirstConfig> {
        self.first.lock().map(|f| f.clone()).unwrap_or_default()
    }

    fn on_response(&self, response: &DeltaDiscoveryResponse) -> Option<Instant> {
        self.bytes
            .fetch_add(response.encoded_len() as u64, Ordering::Relaxed);
        self.responses.fetch_add(1, Ordering::Relaxed);
        let watched = self.watched.lock().ok()?;
        let watched = watched.as_ref()?;
        let hit = response.type_url == watched.type_url
            && (response.resources.iter().any(|r| r.name == watched.name)
                || response.removed_resources.contains(&watched.name));
        hit.then_some(watched.since)
    }
}

/// Runs one client until `stop` turns true, reconnecting with backoff as a proxy
/// does when its stream fails (a handshake timing out under load, most often).
pub async fn run_client(
    target: ControlTarget,
    cert: WorkloadCertificate,
    observations: Arc<Observations>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let started = Instant::now();
    let mut first_done = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = stream_once(
            &target,
            &cert,
            &observations,
            stop.clone(),
            started,
            &mut first_done,
        )
        .await;
        if *stop.borrow() {
            return Ok(());
        }
        observations.reconnects.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            tracing::debug!(error = %e, "discovery client: reconnecting");
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn stream_once(
    target: &ControlTarget,
    cert: &WorkloadCertificate,
    observations: &Observations,
    mut stop: watch::Receiver<bool>,
    started: Instant,
    first_done: &mut bool,
) -> Result<()> {
    let channel = trellis_proxy::control::channel(
        &target.addr,
        &target.server_name,
        &target.root_pem,
        None,
        Some(cert),
    )
    .map_err(|e| BenchError::Setup(format!("control channel: {e}")))?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for (i, type_url) in TYPES.iter().enumerate() {
        let node = (i == 0).then(|| Node {
            id: cert.id.to_string(),
            metadata: [("version".to_owned(), "scale-bench".to_owned())].into(),
        });
        tx.send(DeltaDiscoveryRequest {
            node,
            type_url: (*type_url).to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            ..Default::default()
        })
        .await
        .map_err(|_| BenchError::Setup("request channel closed".to_owned()))?;
    }
    let mut responses = AggregatedDiscoveryClient::new(channel)
        .max_decoding_message_size(trellis_proxy::discovery::MAX_RESPONSE_BYTES)
        .delta_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| BenchError::Setup(format!("discovery stream: {e}")))?
        .into_inner();
    let mut unanswered: Vec<&str> = if *first_done {
        Vec::new()
    } else {
        TYPES.to_vec()
    };
    let mut first = FirstConfig::default();
    loop {
        let response = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            message = responses.message() => message,
        };
        let response = match response {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(()),
            Err(status) => return Err(BenchError::Setup(format!("discovery: {status}"))),
        };
        let change_since = observations.on_response(&response);
        let was_unanswered = unanswered.len();
        unanswered.retain(|t| *t != response.type_url);
        if unanswered.len() < was_unanswered {
            first.resources += response.resources.len() as u64;
            first.bytes += response.encoded_len() as u64;
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: response.type_url,
            response_nonce: response.nonce,
            ..Default::default()
        })
        .await
        .map_err(|_| BenchError::Setup("request channel closed".to_owned()))?;
        if let Some(since) = change_since
            && let Ok(mut acks) = observations.acks.lock()
        {
            acks.push(since.elapsed());
        }
        if unanswered.is_empty() && was_unanswered > 0 {
            *first_done = true;
            first.elapsed = started.elapsed();
            if let Ok(mut all) = observations.first.lock() {
                all.push(first);
            }
        }
    }
}
