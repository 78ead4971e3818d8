//! App probes under STRICT mTLS, as Istio does it: the kubelet cannot speak mesh
//! mTLS, and a TCP probe would be accepted by the proxy whether or not the app is
//! up, so every HTTP, TCP and gRPC probe of an app container becomes an `httpGet` on
//! the proxy's health port (`:15020/app-health/<container>/<readyz|livez|startupz>`).
//! The original handler and its `timeoutSeconds` go to the proxy in the
//! `TRELLIS_APP_PROBES` environment variable (JSON: path on 15020 → the original),
//! and the proxy runs it over loopback: HTTP or HTTPS, a TCP connect, or
//! `grpc.health.v1`. Exec probes are left as they are.

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
    /// The whole new probe: the original's timing, an `httpGet` on 15020.
    pub probe: Value,
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
            let Some(probe) = probe else {
                continue;
            };
            let Some(original) = original_handler(c, probe) else {
                continue;
            };
            let path = format!("/app-health/{}/{suffix}", c.name);
            let mut original = original;
            if let Some(timeout) = probe.timeout_seconds {
                original["timeoutSeconds"] = json!(timeout);
            }
            originals.insert(path.clone(), original);
            let rewritten = Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(path),
                    port: IntOrString::Int(HEALTH_PORT),
                    scheme: Some("HTTP".to_owned()),
                    http_headers: probe.http_get.as_ref().and_then(|g| g.http_headers.clone()),
                    host: None,
                }),
                tcp_socket: None,
                grpc: None,
                ..probe.clone()
            };
            let Ok(rewritten) = serde_json::to_value(&rewritten) else {
                continue;
            };
            out.push(Rewrite {
                field,
                container: i,
                probe: rewritten,
            });
        }
    }
    (out, originals)
}

/// The probe's handler for the proxy, its port a number; `None` for an exec probe
/// or a named port the container does not declare.
fn original_handler(c: &Container, probe: &Probe) -> Option<Value> {
    if let Some(get) = &probe.http_get {
        let port = resolve_port(c, &get.port)?;
        let get = HTTPGetAction {
            port: IntOrString::Int(port),
            ..get.clone()
        };
        return Some(json!({ "httpGet": serde_json::to_value(get).ok()? }));
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = resolve_port(c, &tcp.port)?;
        return Some(json!({ "tcpSocket": { "port": port } }));
    }
    if let Some(grpc) = &probe.grpc {
        let mut original = json!({ "grpc": { "port": grpc.port } });
        if let Some(service) = &grpc.service {
            original["grpc"]["service"] = json!(service);
        }
        return Some(original);
    }
    None
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
