//! App probes under STRICT mTLS, as Istio does it: the kubelet cannot speak mesh
//! mTLS, so each HTTP probe of an app container is pointed at the proxy's health port
//! (`:15020/app-health/<container>/<readyz|livez|startupz>`), and the original probe
//! is handed to the proxy in the `TRELLIS_APP_PROBES` environment variable (JSON:
//! path on 15020 → the original `httpGet`), for it to make the request over
//! loopback. TCP and gRPC probes are left as they are.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::sidecar::HEALTH_PORT;

pub const APP_PROBES_ENV: &str = "TRELLIS_APP_PROBES";

/// One probe to rewrite: where in the container, and what it becomes.
pub struct Rewrite {
    /// `readinessProbe`, `livenessProbe` or `startupProbe`.
    pub field: &'static str,
    pub container: usize,
    /// The new `httpGet`.
    pub http_get: Value,
}

/// The rewrites for a Pod's app containers, and the originals for the proxy.
pub fn rewrites(containers: &[Container]) -> (Vec<Rewrite>, BTreeMap<String, Value>) {
    let mut out = Vec::new();
    let mut originals = BTreeMap::new();
    for (i, c) in containers.iter().enumerate() {
        let probes = [
            ("readinessProbe", "readyz", &c.readiness_probe),
            ("livenessProbe", "livez", &c.liveness_probe),
            ("startupProbe", "startupz", &c.startup_probe),
        ];
        for (field, suffix, probe) in probes {
            let Some(Probe {
                http_get: Some(get),
                ..
            }) = probe
            else {
                continue;
            };
            let Some(port) = resolve_port(c, &get.port) else {
                continue;
            };
            let path = format!("/app-health/{}/{suffix}", c.name);
            let original = HTTPGetAction {
                port: IntOrString::Int(port),
                ..get.clone()
            };
            let Ok(original) = serde_json::to_value(&original) else {
                continue;
            };
            originals.insert(path.clone(), json!({ "httpGet": original }));
            let mut http_get = json!({
                "path": path,
                "port": HEALTH_PORT,
                "scheme": "HTTP",
            });
            if let Some(headers) = &get.http_headers {
                http_get["httpHeaders"] = serde_json::to_value(headers).unwrap_or_default();
            }
            out.push(Rewrite {
                field,
                container: i,
                http_get,
            });
        }
    }
    (out, originals)
}

/// A probe's port as a number; a name is looked up among the container's ports.
fn resolve_port(c: &Container, port: &IntOrString) -> Option<i32> {
    match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => match name.parse() {
            Ok(n) => Some(n),
            Err(_) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        },
    }
}
