//! `trellis-bench scale`: the control plane under a large simulated mesh.
//!
//! The control plane runs in a child process (`trellis-bench scale-control`) so its
//! CPU and memory are its own: a [`SimulatedRegistry`] fed straight into its model
//! (no API server, no files), serving the real discovery gRPC over real mTLS on
//! loopback. This process runs the discovery clients ([`client`]), each with its own
//! workload certificate from the control plane's CA, sends the child the churn one
//! change at a time over stdin, and times each change until the last client ACKed it.

pub mod client;
pub mod model;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;
use trellis_control::ca::{CertificateAuthority, Proven};
use trellis_identity::{WorkloadCertificate, WorkloadKey, WorkloadName};

use crate::procstat::sample_proc;
use crate::{BenchError, Result};
pub use client::{ControlTarget, FirstConfig, Observations};
pub use model::{Change, SimulatedRegistry};

/// The name in the control plane's serving certificate that clients dial.
const SERVER_NAME: &str = "trellis-control.trellis-system.svc";
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug)]
pub struct ScaleOptions {
    pub services: usize,
    pub clients: usize,
    /// Endpoint flaps (each one a change).
    pub flaps: usize,
    /// Services rolled, each pod by pod (five changes each).
    pub rollouts: usize,
    /// TrafficPolicy edits.
    pub policy_edits: usize,
    /// Proxies started one by one after the churn, alone, for the first-config time
    /// of a new proxy in a settled mesh.
    pub late_joiners: usize,
    /// Bound on the initial sync and on each change.
    pub timeout: Duration,
    /// Where the child keeps its CA.
    pub work_dir: PathBuf,
}

/// One size's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScaleRow {
    pub services: usize,
    pub clients: usize,
    /// Clients that completed their first sync within the bound.
    pub synced: usize,
    /// Start to every type answered, all clients starting at once.
    pub first_config_p50_s: f64,
    pub first_config_p99_s: f64,
    /// The same for one new proxy at a time after the churn (max over late joiners).
    pub late_first_config_max_s: f64,
    /// Per change, change to the last client's ACK.
    pub changes: usize,
    pub changes_complete: usize,
    pub last_ack_p50_s: f64,
    pub last_ack_p99_s: f64,
    /// Response bytes (protobuf) received by all clients per change, mean.
    pub bytes_per_change: u64,
    /// Resources and bytes of one client's first full view, mean.
    pub view_resources: u64,
    pub view_bytes: u64,
    /// Control-plane CPU seconds: start and model, initial sync, churn.
    pub cpu_start_s: f64,
    pub cpu_sync_s: f64,
    pub cpu_churn_s: f64,
    pub peak_rss_mb: f64,
    /// Client streams that failed (or ended) and were opened again.
    pub reconnects: u64,
}

/// Runs the control-plane process and the clients for one size.
pub async fn run_scale(options: &ScaleOptions) -> Result<ScaleRow> {
    let state_dir = options.work_dir.join(format!("ca-{}", options.services));
    let _ = std::fs::remove_dir_all(&state_dir);
    std::fs::create_dir_all(&state_dir)?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("scale-control")
        .arg("--services")
        .arg(options.services.to_string())
        .arg("--state-dir")
        .arg(&state_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| BenchError::Setup("control plane exited".to_owned()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Setup("no stdout".to_owned()))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(options.timeout, lines.next_line())
        .await
        .map_err(|_| BenchError::Setup("control plane did not start in time".to_owned()))??
        .ok_or_else(|| BenchError::Setup("control plane exited before ready".to_owned()))?;
    let addr = ready
        .strip_prefix("ready ")
        .ok_or_else(|| BenchError::Setup(format!("unexpected line from control plane: {ready}")))?
        .to_owned();
    let started = sample_proc(pid)?;

    let ca = CertificateAuthority::load_or_create(&state_dir, model::TRUST_DOMAIN, CERT_TTL)
        .map_err(|e| BenchError::Setup(format!("CA: {e}")))?;
    let target = ControlTarget {
        addr,
        server_name: SERVER_NAME.to_owned(),
        root_pem: ca.trust_bundle_pem().concat(),
    };
    let mut certs = (0..options.clients + options.late_joiners)
        .map(|i| workload_certificate(&ca, i % options.services))
        .collect::<Result<Vec<_>>>()?;
    let (mut certs, late) = {
        let late = certs.split_off(options.clients);
        (certs, late)
    };

    let observations = Arc::new(Observations::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = tokio::task::JoinSet::new();
    for cert in certs.drain(..) {
        clients.spawn(client::run_client(
            target.clone(),
            cert,
            observations.clone(),
            stop_rx.clone(),
        ));
    }
    let deadline = Instant::now() + options.timeout;
    while observations.first_configs().len() < options.clients && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = observations.first_configs();
    let synced = sample_proc(pid)?;
    tracing::info!(
        services = options.services,
        synced = first.len(),
        "initial sync done"
    );

    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| BenchError::Setup("no stdin".to_owned()))?;
    let changes = churn(options);
    let mut last_acks = Vec::new();
    let mut bytes = 0;
    for change in &changes {
        let (type_url, name) = change.resource();
        let before = observations
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        observations.watch(type_url, name);
        send(&mut stdin, &change.command()).await?;
        let deadline = Instant::now() + options.timeout;
        let expected = first.len();
        loop {
            let acks = observations.acks();
            if acks.len() >= expected {
                last_acks.push(acks.iter().max().copied().unwrap_or_default());
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    ?change,
                    acked = acks.len(),
                    expected,
                    "change not ACKed by all in time"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bytes += observations
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            - before;
    }
    let churned = sample_proc(pid)?;

    let mut late_times = Vec::new();
    for cert in late {
        let joined = Arc::new(Observations::default());
        let task = tokio::spawn(client::run_client(
            target.clone(),
            cert,
            joined.clone(),
            stop_rx.clone(),
        ));
        let deadline = Instant::now() + options.timeout;
        while joined.first_configs().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        late_times.extend(joined.first_configs().iter().map(|f| f.elapsed));
        task.abort();
    }
    let _ = stop_tx.send(true);
    while clients.join_next().await.is_some() {}
    let end = sample_proc(pid)?;
    stop_child(&mut child, stdin).await;

    let mut first_times: Vec<Duration> = first.iter().map(|f| f.elapsed).collect();
    let synced_count = first.len().max(1) as u64;
    Ok(ScaleRow {
        services: options.services,
        clients: options.clients,
        synced: first.len(),
        first_config_p50_s: percentile(&mut first_times, 0.50),
        first_config_p99_s: percentile(&mut first_times, 0.99),
        late_first_config_max_s: late_times
            .iter()
            .max()
            .map_or(f64::NAN, Duration::as_secs_f64),
        changes: changes.len(),
        changes_complete: last_acks.len(),
        last_ack_p50_s: percentile(&mut last_acks, 0.50),
        last_ack_p99_s: percentile(&mut last_acks, 0.99),
        bytes_per_change: bytes / changes.len().max(1) as u64,
        view_resources: first.iter().map(|f| f.resources).sum::<u64>() / synced_count,
        view_bytes: first.iter().map(|f| f.bytes).sum::<u64>() / synced_count,
        cpu_start_s: started.cpu_s,
        cpu_sync_s: synced.cpu_s - started.cpu_s,
        cpu_churn_s: churned.cpu_s - synced.cpu_s,
        peak_rss_mb: end.peak_rss_kb as f64 / 1024.0,
        reconnects: observations
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Flaps (down and up), rolling updates pod by pod, then policy edits, each on a
/// different service spread over the mesh.
fn churn(options: &ScaleOptions) -> Vec<Change> {
    let n = options.services;
    let spread = |i: usize| (i * 7919 + 13) % n;
    let mut changes = Vec::new();
    for i in 0..options.flaps {
        changes.push(Change::Flap {
            service: spread(i / 2),
        });
    }
    for i in 0..options.rollouts {
        let service = spread(1000 + i);
        for pod in 0..model::ENDPOINTS_PER_SERVICE {
            changes.push(Change::Roll { service, pod });
        }
    }
    for i in 0..options.policy_edits {
        // Only every POLICY_EVERY-th service has a policy.
        let service = (spread(2000 + i) / model::POLICY_EVERY) * model::POLICY_EVERY;
        changes.push(Change::Policy { service });
    }
    changes
}

fn workload_certificate(ca: &CertificateAuthority, service: usize) -> Result<WorkloadCertificate> {
    let identity = model::service_identity(service)?;
    let setup = |what: &str, e: &dyn std::fmt::Display| BenchError::Setup(format!("{what}: {e}"));
    let key = WorkloadKey::generate().map_err(|e| setup("key", &e))?;
    let csr = key.csr_pem(&identity).map_err(|e| setup("CSR", &e))?;
    let granted = Proven {
        workload: Some(WorkloadName::new(
            identity.namespace(),
            model::pod_name(service, 0),
        )),
        identity: identity.clone(),
    };
    let leaf = ca
        .sign_workload(&csr, &granted, None)
        .map_err(|e| setup("signing", &e))?;
    key.certify(&ca.leaf_chain(leaf), &identity)
        .map_err(|e| setup("certificate", &e))
}

async fn send(stdin: &mut ChildStdin, line: &str) -> Result<()> {
    stdin.write_all(format!("{line}\n").as_bytes()).await?;
    stdin.flush().await?;
    Ok(())
}

async fn stop_child(child: &mut Child, mut stdin: ChildStdin) {
    let _ = send(&mut stdin, "quit").await;
    drop(stdin);
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The `q` quantile (nearest rank) in seconds; NaN when empty.
fn percentile(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1].as_secs_f64()
}

/// The child: builds the model, serves it, and applies the changes read from stdin,
/// one line each, until `quit` or end of input.
pub async fn serve_control(services: usize, state_dir: PathBuf) -> Result<()> {
    let setup = |what: &str, e: &dyn std::fmt::Display| BenchError::Setup(format!("{what}: {e}"));
    let mut registry = SimulatedRegistry::new(services)?;
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&state_dir, model::TRUST_DOMAIN, CERT_TTL)
            .map_err(|e| setup("CA", &e))?,
    );
    let (snapshots, snapshot_rx) = watch::channel(Arc::new(registry.snapshot.clone()));
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let config = trellis_control::ControlConfig {
        registry_dir: state_dir.clone(),
        state_dir,
        trust_domain: model::TRUST_DOMAIN.to_owned(),
        grpc_addr: loopback,
        admin_addr: loopback,
        cert_ttl: CERT_TTL,
        server_names: vec![SERVER_NAME.to_owned()],
    };
    let mut options = trellis_control::server::ServeOptions::default();
    // Every client connects from 127.0.0.1; a few share an identity when there are
    // more clients than services.
    options.grpc.streams_per_workload = 1 << 16;
    let running = trellis_control::server::start_with_model(config, options, ca, snapshot_rx)
        .await
        .map_err(|e| setup("control plane", &e))?;
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("ready {}\n", running.grpc_addr).as_bytes())
        .await?;
    stdout.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "quit" {
            break;
        }
        let Some(change) = Change::parse(&line) else {
            tracing::warn!(line, "unknown change");
            continue;
        };
        registry.apply(change)?;
        snapshots.send_replace(Arc::new(registry.snapshot.clone()));
    }
    running.stop().await;
    Ok(())
}

/// The table for benches/RESULTS.md.
pub fn markdown(rows: &[ScaleRow]) -> String {
    let mut out = String::from(
        "| services | clients | synced | first config p50 / p99 (all at once) | first config, one new proxy | change → last ACK p50 / p99 | changes done | bytes per change (all clients) | view per client | CP CPU s: start / sync / churn | CP peak RSS | reconnects |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} s / {:.3} s | {:.3} s | {:.3} s / {:.3} s | {}/{} | {} KB | {} resources, {} KB | {:.1} / {:.1} / {:.1} | {:.0} MB | {} |\n",
            r.services,
            r.clients,
            r.synced,
            r.first_config_p50_s,
            r.first_config_p99_s,
            r.late_first_config_max_s,
            r.last_ack_p50_s,
            r.last_ack_p99_s,
            r.changes_complete,
            r.changes,
            r.bytes_per_change / 1000,
            r.view_resources,
            r.view_bytes / 1000,
            r.cpu_start_s,
            r.cpu_sync_s,
            r.cpu_churn_s,
            r.peak_rss_mb,
            r.reconnects,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut values, 0.5), 0.05);
        assert_eq!(percentile(&mut values, 0.99), 0.099);
        assert!(percentile(&mut [], 0.5).is_nan());
    }
}
