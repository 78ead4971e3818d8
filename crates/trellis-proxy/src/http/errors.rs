//! Responses the proxy makes itself: proper HTTP statuses with a `trellis-error`
//! header saying why, or gRPC statuses for gRPC calls. One place maps failures.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;

/// The header on every answer the proxy makes itself, saying why. Only proxies set
/// it: the inbound side removes it from the app's responses.
pub const TRELLIS_ERROR: &str = "trellis-error";

/// Why the proxy answered instead of the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// No route or backend for the request (500).
    NoBackend,
    /// No ready endpoint (503).
    NoEndpoints,
    /// Every attempt to connect failed (503).
    ConnectFailed,
    /// The endpoint's pending-request limit is reached (503).
    Overflow,
    /// The upstream connection broke before a response (502).
    UpstreamReset,
    /// The request or try took too long (504).
    Timeout,
    /// The app behind the inbound side is unreachable (503).
    AppUnreachable,
    /// An authorization policy denied the request (403).
    Forbidden,
    /// The request cannot be forwarded as it is (400).
    BadRequest,
}

impl ProxyError {
    pub const ALL: [ProxyError; 9] = [
        ProxyError::NoBackend,
        ProxyError::NoEndpoints,
        ProxyError::ConnectFailed,
        ProxyError::Overflow,
        ProxyError::UpstreamReset,
        ProxyError::Timeout,
        ProxyError::AppUnreachable,
        ProxyError::Forbidden,
        ProxyError::BadRequest,
    ];

    /// The short name metrics (`response_flags`) and access logs use.
    pub fn flag(self) -> &'static str {
        match self {
            ProxyError::NoBackend => "no_backend",
            ProxyError::NoEndpoints => "no_endpoints",
            ProxyError::ConnectFailed => "connect_failed",
            ProxyError::Overflow => "overflow",
            ProxyError::UpstreamReset => "upstream_reset",
            ProxyError::Timeout => "timeout",
            ProxyError::AppUnreachable => "app_unreachable",
            ProxyError::Forbidden => "forbidden",
            ProxyError::BadRequest => "bad_request",
        }
    }

    /// The error whose [`reason`](Self::reason) a `trellis-error` header carries.
    pub fn from_reason(reason: &[u8]) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|e| e.reason().as_bytes() == reason)
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoBackend => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoEndpoints
            | ProxyError::ConnectFailed
            | ProxyError::Overflow
            | ProxyError::AppUnreachable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::NoBackend => "no route or backend for this request",
            ProxyError::NoEndpoints => "no ready endpoint",
            ProxyError::ConnectFailed => "connecting to the endpoint failed",
            ProxyError::Overflow => "too many pending requests for the endpoint",
            ProxyError::UpstreamReset => "the upstream connection was reset",
            ProxyError::Timeout => "request timed out",
            ProxyError::AppUnreachable => "the application is not reachable",
            ProxyError::Forbidden => "denied by authorization policy",
            ProxyError::BadRequest => "malformed request",
        }
    }

    /// The gRPC status code for the same failure.
    pub fn grpc_code(self) -> u32 {
        match self {
            ProxyError::Timeout => 4,    // DEADLINE_EXCEEDED
            ProxyError::Forbidden => 7,  // PERMISSION_DENIED
            ProxyError::BadRequest => 3, // INVALID_ARGUMENT
            ProxyError::NoBackend => 12, // UNIMPLEMENTED
            _ => 14,                     // UNAVAILABLE
        }
    }

    /// The response to send: gRPC callers get HTTP 200 with `grpc-status`
    /// (trailers-only), everyone else the HTTP status.
    pub fn response(self, grpc: bool, detail: Option<&str>) -> Response<Body> {
        let reason = self.reason();
        let mut response = if grpc {
            let mut r = Response::new(empty());
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from(self.grpc_code()));
            if let Ok(message) = HeaderValue::from_str(detail.unwrap_or(reason)) {
                r.headers_mut().insert("grpc-message", message);
            }
            r
        } else {
            let body = match detail {
                Some(d) => format!("{reason}: {d}\n"),
                None => format!("{reason}\n"),
            };
            let mut r = Response::new(full(Bytes::from(body)));
            *r.status_mut() = self.status();
            r
        };
        response
            .headers_mut()
            .insert(TRELLIS_ERROR, HeaderValue::from_static(reason));
        response
    }

    /// Whether `response` is a peer sidecar's [`ProxyError::AppUnreachable`]: the
    /// request never reached the app (it was gone, e.g. a pod shutting down during a
    /// rollout), so another endpoint may take it whatever its method.
    pub fn is_peer_app_unreachable<B>(response: &Response<B>) -> bool {
        Self::is_from_peer(ProxyError::AppUnreachable, response)
    }

    /// Whether `response` is a peer sidecar's [`ProxyError::UpstreamReset`]: its app
    /// took the request and broke off without an answer (killed mid-request, as when
    /// its pod stops).
    pub fn is_peer_app_reset<B>(response: &Response<B>) -> bool {
        Self::is_from_peer(ProxyError::UpstreamReset, response)
    }

    fn is_from_peer<B>(error: ProxyError, response: &Response<B>) -> bool {
        response
            .headers()
            .get(TRELLIS_ERROR)
            .is_some_and(|v| v.as_bytes() == error.reason().as_bytes())
    }
}

/// An empty body; boxing it allocates nothing (`Empty` is zero-sized).
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
