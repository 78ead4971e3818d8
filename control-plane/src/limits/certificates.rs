//! A token bucket per source address in front of the CA: a client that asks for
//! certificates faster than any proxy needs (one at start, one per half-life) gets
//! RESOURCE_EXHAUSTED, counted, before any token review or signing is done.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::{Request, Response, Status};
use trellis_proto::ca::v1::certificate_authority_server::{
    CertificateAuthority, CertificateAuthorityServer,
};
use trellis_proto::ca::v1::{IssueCertificateRequest, IssueCertificateResponse};

use super::{GrpcLimits, LimitCounters};
use crate::ca::CaService;

/// Keys kept before idle buckets are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// The CA service behind a per-source rate limit.
pub struct RateLimitedCa {
    inner: CaService,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    counters: Arc<LimitCounters>,
}

impl RateLimitedCa {
    pub fn new(inner: CaService, limits: &GrpcLimits, counters: Arc<LimitCounters>) -> Self {
        let burst = NonZeroU32::new(limits.csr_burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(limits.csr_refill)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        RateLimitedCa {
            inner,
            limiter: RateLimiter::keyed(quota),
            counters,
        }
    }

    pub fn into_server(self) -> CertificateAuthorityServer<Self> {
        CertificateAuthorityServer::new(self)
    }
}

#[tonic::async_trait]
impl CertificateAuthority for RateLimitedCa {
    async fn issue_certificate(
        &self,
        request: Request<IssueCertificateRequest>,
    ) -> Result<Response<IssueCertificateResponse>, Status> {
        // No address (not over TCP): one shared bucket, still bounded.
        let source = request
            .remote_addr()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        if self.limiter.len() > PRUNE_ABOVE {
            self.limiter.retain_recent();
        }
        if self.limiter.check_key(&source).is_err() {
            self.counters.certificate_requests_limited.inc();
            tracing::warn!(%source, "certificate request refused: rate limit");
            return Err(Status::resource_exhausted(
                "too many certificate requests from this address; retry later",
            ));
        }
        self.inner.issue_certificate(request).await
    }
}
