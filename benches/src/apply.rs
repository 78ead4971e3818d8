//! How long a sidecar takes to apply one discovery response, by mesh size: the time
//! its data path would stand still if the response were applied on the data thread.
//!
//! A mesh of N services (5 endpoints each, 50 namespaces) is applied as two whole
//! responses (Services, then Endpoints), then one endpoint of one service flaps
//! `changes` times, one single-resource Endpoints delta each, like a rollout.

use std::time::{Duration, Instant};

use trellis_proto::discovery::v1::{self as pb, resource::Kind, type_url};
use trellis_proxy::discovery::MeshState;

use crate::{BenchError, Result};

const ENDPOINTS_PER_SERVICE: usize = 5;
const NAMESPACES: usize = 50;

/// One mesh size's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ApplyRow {
    pub services: usize,
    /// Applying every Service, then every Endpoints resource.
    pub initial: Duration,
    pub change_p50: Duration,
    pub change_p99: Duration,
    pub change_max: Duration,
}

fn namespace(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn service(i: usize) -> pb::Resource {
    let ns = namespace(i);
    pb::Resource {
        name: format!("svc-{i}.{ns}"),
        version: "1".to_owned(),
        kind: Some(Kind::Service(pb::Service {
            name: format!("svc-{i}"),
            namespace: ns,
            vips: vec![format!("10.96.{}.{}", i / 250, i % 250 + 1)],
            ports: vec![pb::ServicePort {
                name: "http".to_owned(),
                port: 80,
                target_port: 8080,
                protocol: pb::Protocol::Http as i32,
            }],
            hostnames: vec![],
        })),
    }
}

fn endpoints(i: usize, version: u64, flapped: bool) -> pb::Resource {
    let ns = namespace(i);
    let endpoints = (0..ENDPOINTS_PER_SERVICE)
        .map(|e| {
            let n = i * ENDPOINTS_PER_SERVICE + e;
            pb::Endpoint {
                address: format!("10.{}.{}.{}", 100 + n / 62500, n / 250 % 250, n % 250 + 1),
                port: 8080,
                identity: format!("spiffe://cluster.local/ns/{ns}/sa/svc-{i}"),
                ready: !(flapped && e == 0),
                ..Default::default()
            }
        })
        .collect();
    pb::Resource {
        name: format!("svc-{i}.{ns}:80"),
        version: version.to_string(),
        kind: Some(Kind::Endpoints(pb::Endpoints {
            service: format!("svc-{i}"),
            namespace: ns,
            port: 80,
            endpoints,
        })),
    }
}

fn response(type_url: &str, resources: Vec<pb::Resource>) -> pb::DeltaDiscoveryResponse {
    pb::DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        system_version_info: String::new(),
        resources,
        removed_resources: vec![],
        nonce: "1".to_owned(),
    }
}

fn apply(state: &MeshState, response: &pb::DeltaDiscoveryResponse) -> Result<MeshState> {
    state
        .apply(response)
        .map_err(|e| BenchError::Setup(format!("the simulated mesh was refused: {e}")))
}

/// Applies a mesh of `services` services, then `changes` single-endpoint deltas.
pub fn measure(services: usize, changes: usize) -> Result<ApplyRow> {
    let started = Instant::now();
    let state = apply(
        &MeshState::default(),
        &response(type_url::SERVICE, (0..services).map(service).collect()),
    )?;
    let mut state = apply(
        &state,
        &response(
            type_url::ENDPOINTS,
            (0..services).map(|i| endpoints(i, 1, false)).collect(),
        ),
    )?;
    let initial = started.elapsed();
    let mut times = Vec::with_capacity(changes);
    for c in 0..changes {
        let i = c * 7919 % services.max(1);
        let delta = response(
            type_url::ENDPOINTS,
            vec![endpoints(i, c as u64 + 2, c % 2 == 0)],
        );
        let started = Instant::now();
        state = apply(&state, &delta)?;
        times.push(started.elapsed());
    }
    times.sort();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(ApplyRow {
        services,
        initial,
        change_p50: at(0.5),
        change_p99: at(0.99),
        change_max: times.last().copied().unwrap_or_default(),
    })
}

/// The rows as a markdown table.
pub fn markdown(rows: &[ApplyRow]) -> String {
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    let mut out = String::from(
        "| services | endpoints | initial apply, ms | one change p50, ms | p99, ms | max, ms |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.services,
            r.services * ENDPOINTS_PER_SERVICE,
            ms(r.initial),
            ms(r.change_p50),
            ms(r.change_p99),
            ms(r.change_max),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_small_mesh_is_accepted_and_measured() {
        let row = super::measure(20, 10).unwrap();
        assert_eq!(row.services, 20);
        assert!(row.change_max >= row.change_p50);
        assert!(super::markdown(&[row]).contains("| 20 | 100 |"));
    }
}
