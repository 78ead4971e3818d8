//! Registries: where the mesh model comes from.
//!
//! - [`file`]: a folder of Kubernetes-shaped YAML (Services, EndpointSlices, Trellis
//!   `WorkloadEntry` and `BootstrapToken` objects), polled for changes.
//! - [`kube`]: the Kubernetes API, watched with kube-rs.

pub mod file;
pub mod kube;
pub mod policies;

pub use file::{RegistryError, RegistryErrorView, RegistryStatus, initial, load_dir, watch_dir};
