//! Workload identity for Trellis: who a workload is, how it proves it, and the rustls
//! configurations that enforce it on every mesh connection.

mod log_filter;
mod spiffe;
mod tls;
mod verify;
mod workload;
mod workload_name;

pub use log_filter::log_filter;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
pub use tls::{
    ALPN_H2, ALPN_HTTP1, ALPN_TCP, MeshTls, TlsConfigError, TrustBundle, crypto_provider,
    root_fingerprint,
};
pub use verify::{PeerIdentityError, SpiffeClientVerifier, SpiffeServerVerifier, spiffe_id_of};
pub use workload::{CertificateError, WorkloadCertificate, WorkloadKey};
pub use workload_name::{WorkloadName, workload_name_of};
