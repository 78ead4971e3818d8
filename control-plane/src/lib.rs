//! trellis-control: watches a registry, issues workload certificates, and streams
//! each proxy its view of the mesh.

pub mod admin;
pub mod api;
pub mod ca;
pub mod discovery;
pub mod events;
pub mod http_server;
pub mod injector;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod server;

pub use server::{ControlConfig, RunningControlPlane, start};
