//! At most N concurrent discovery streams per workload (identity and source
//! address): a misbehaving or hostile proxy cannot make the control plane hold
//! unbounded per-stream state.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use trellis_identity::spiffe_id_of;
use trellis_proto::discovery::v1::aggregated_discovery_server::{
    AggregatedDiscovery, AggregatedDiscoveryServer,
};
use trellis_proto::discovery::v1::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::{ConcurrencyByKey, LimitCounters};
use crate::discovery::DiscoveryServer;

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// The discovery service with a cap on concurrent streams per workload.
pub struct StreamLimitedDiscovery {
    inner: DiscoveryServer,
    open: ConcurrencyByKey<(String, Option<IpAddr>)>,
    max: usize,
    counters: Arc<LimitCounters>,
}

impl StreamLimitedDiscovery {
    pub fn new(inner: DiscoveryServer, max: usize, counters: Arc<LimitCounters>) -> Self {
        StreamLimitedDiscovery {
            inner,
            open: ConcurrencyByKey::default(),
            max,
            counters,
        }
    }

    pub fn into_server(self) -> AggregatedDiscoveryServer<Self> {
        AggregatedDiscoveryServer::new(self)
    }
}

#[tonic::async_trait]
impl AggregatedDiscovery for StreamLimitedDiscovery {
    type DeltaResourcesStream = ResponseStream;

    async fn delta_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaResourcesStream>, Status> {
        // Without a usable certificate the inner service refuses the stream itself.
        let identity = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| spiffe_id_of(c).ok()));
        let Some(identity) = identity else {
            return self.inner.delta_resources(request).await;
        };
        let remote = request.remote_addr().map(|a| a.ip());
        let key = (identity.to_string(), remote);
        let Some(slot) = self.open.take(key, self.max) else {
            self.counters.discovery_streams_refused.inc();
            tracing::warn!(
                %identity,
                ?remote,
                limit = self.max,
                "discovery stream refused: too many open for this workload"
            );
            return Err(Status::resource_exhausted(format!(
                "at most {} discovery streams per workload",
                self.max
            )));
        };
        let response = self.inner.delta_resources(request).await?;
        // The slot is held as long as the response stream: tonic drops it when the
        // stream ends or the proxy goes away.
        let stream = response.into_inner().map(move |item| {
            let _held = &slot;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
