//! Trellis latency benchmark.
//!
//! An open-loop, coordinated-omission-corrected load generator (HTTP/1.1, HTTP/2 prior
//! knowledge, gRPC unary over HTTP/2, TCP request/response), the servers it is pointed at, `/proc` sampling of
//! the proxies under test, and the reports (`results.json`, `results.md`, `latency.svg`).
//!
//! A *scenario* is a name, a target address, a mode and the PIDs of the proxies on the
//! path ([`suite::Scenario`]); [`suite::run_suite`] runs a list of them with one set of
//! load settings and writes the reports. [`runner::run_bench_suite`] is the whole
//! benchmark: it builds the system under test — pods in network namespaces with
//! iptables and sidecars when run as root ([`netns`]), loopback otherwise ([`mesh`]) —
//! runs every scenario (the load generator inside the client pod), optionally each
//! one's saturation search, and writes one report.

pub mod apply;
pub mod callgrind;
pub mod certs;
pub mod grpc;
pub mod haproxy;
pub mod loadgen;
pub mod mesh;
pub mod netns;
pub mod probe;
pub mod procstat;
pub mod report;
pub mod runner;
pub mod saturation;
pub mod scale;
pub mod server;
pub mod suite;

pub use loadgen::{LoadConfig, LoadOutcome, Mode, resolve_target, run_load, run_load_with};
pub use mesh::Binaries;
pub use report::{Report, RunResult, ScenarioReport};
pub use runner::{SaturationOptions, SuiteOptions, TopologyChoice, run_bench_suite};
pub use suite::{Scenario, SuiteSettings, run_suite};

/// Errors of the benchmark library.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("http: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("http request: {0}")]
    Http(#[from] http::Error),
    #[error("unexpected HTTP status {0}")]
    Status(u16),
    #[error("short response: expected {expected} bytes, got {got}")]
    ShortResponse { expected: usize, got: usize },
    #[error("gRPC response without grpc-status")]
    GrpcNoStatus,
    #[error("gRPC status {code}: {message}")]
    GrpcStatus { code: String, message: String },
    #[error("request timed out")]
    Timeout,
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("setting up the mesh under test: {0}")]
    Setup(String),
    #[error("histogram: {0}")]
    Histogram(String),
    #[error("parsing {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<std::convert::Infallible> for BenchError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// Result alias for the library.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
