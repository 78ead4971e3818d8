//! HTTP in the proxy: routing, traffic policy, pooled HTTP/2 over mTLS between
//! sidecars, retries and timeouts, and the errors the proxy answers itself.

pub mod app;
pub mod errors;
pub mod idle;
pub mod inbound;
pub mod mesh_h1;
pub mod normalize;
pub mod outbound;
pub mod plain;
pub mod policy;
pub mod pool;
pub mod route;
pub mod sniff;

/// Every body the proxy sends: app bodies stream through, its own are small.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Set by the client-side sidecar on requests that were HTTP/1 (carried as HTTP/2
/// between sidecars); the server-side sidecar removes it and speaks HTTP/1 to the app.
pub const ORIG_PROTO: http::HeaderName = http::HeaderName::from_static("trellis-orig-proto");
/// The caller's verified identity for the app (Envoy's header).
pub const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

/// Undoes, for a request the client-side sidecar carried as HTTP/2, what it did to an
/// HTTP/1 caller's request (`proto` is the `trellis-orig-proto` value it set): the
/// HTTP/1 version comes back, and `host` (the caller's authority) becomes `Host`.
pub fn restore_http1(
    parts: &mut http::request::Parts,
    proto: &http::HeaderValue,
    host: &http::uri::Authority,
) {
    parts.version = if proto.as_bytes() == b"HTTP/1.0" {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    };
    if let Ok(host) = http::HeaderValue::from_str(host.as_str()) {
        parts.headers.insert(http::header::HOST, host);
    }
}
