//! HTTP in the proxy: routing, traffic policy, pooled HTTP/2 over mTLS between
//! sidecars, retries and timeouts, and the errors the proxy answers itself.

pub mod policy;
pub mod route;
