//! trellis-proxy: the sidecar. It gets its identity from the CA, its view of the mesh
//! from discovery, and carries the app's connections over mutual TLS.

pub mod access_log;
pub mod admin;
pub mod app_metrics;
pub mod app_probe;
pub mod authz;
pub mod balance;
pub mod config;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod health;
pub mod http;
pub mod http_server;
pub mod identity;
pub mod inbound;
pub mod listen;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod ports;
pub mod proxy;
pub mod request_metrics;
pub mod tcp;
pub mod trace;

pub use config::{OutboundPolicy, ProxyConfig, Upstream};
pub use proxy::{RunningProxy, StartError, start};
