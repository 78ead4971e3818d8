//! The checks of a running control plane's mesh, from its debug port.

use std::time::{Duration, SystemTime};

use crate::control_api::{self, ProxyStatus, RegistryStatus, SyncState, WorkloadView};
use crate::output::short_duration;

use super::Check;

/// What the debug port says.
pub struct MeshFacts {
    pub addr: String,
    pub version: String,
    pub registry: RegistryStatus,
    pub workloads: Vec<WorkloadView>,
    pub proxies: Vec<ProxyStatus>,
}

pub async fn checks(addr: &str, min_cert_validity: Duration) -> Vec<Check> {
    let version = match control_api::version(addr).await {
        Ok(v) => v,
        Err(e) => {
            return vec![Check::failed(
                format!("control plane not reachable at {addr}: {e:#}"),
                "start it (`trellisctl demo`, or `trellis-control --registry-dir DIR`), or pass its debug address with --control-addr",
            )];
        }
    };
    let fetched = async {
        Ok::<_, anyhow::Error>(MeshFacts {
            addr: addr.to_owned(),
            version: version.version,
            registry: control_api::registry(addr).await?,
            workloads: control_api::workloads(addr).await?,
            proxies: control_api::proxies(addr).await?,
        })
    };
    match fetched.await {
        Ok(facts) => evaluate(&facts, min_cert_validity, SystemTime::now()),
        Err(e) => vec![Check::failed(
            format!("control plane at {addr} answered, but not its debug views: {e:#}"),
            "is --control-addr the debug port (15016), and trellisctl as new as the control plane?",
        )],
    }
}

pub fn evaluate(facts: &MeshFacts, min_cert_validity: Duration, now: SystemTime) -> Vec<Check> {
    let mut out = vec![Check::passed(format!(
        "control plane reachable at {} (trellis-control {})",
        facts.addr, facts.version
    ))];
    out.push(registry_check(&facts.registry));
    out.extend(connected_checks(&facts.workloads, &facts.proxies));
    out.extend(sync_checks(&facts.proxies));
    out.extend(certificate_checks(&facts.proxies, min_cert_validity, now));
    out
}

fn registry_check(registry: &RegistryStatus) -> Check {
    match registry.last_error.first() {
        None => Check::passed(format!(
            "registry valid ({} services, {} workloads)",
            registry.services, registry.workloads
        )),
        Some(e) => {
            let at = e.line.map_or(e.file.clone(), |l| format!("{}:{l}", e.file));
            Check::failed(
                format!(
                    "registry rejected: {at}: {} ({} errors; the last good model is served)",
                    e.reason,
                    registry.last_error.len()
                ),
                "fix the file; the control plane reloads it within a second",
            )
        }
    }
}

/// Every workload that runs a sidecar has a proxy connected for it.
fn connected_checks(workloads: &[WorkloadView], proxies: &[ProxyStatus]) -> Vec<Check> {
    let meshed: Vec<&WorkloadView> = workloads.iter().filter(|w| w.sidecar).collect();
    let missing: Vec<&WorkloadView> = meshed
        .iter()
        .copied()
        .filter(|w| {
            !proxies.iter().any(|p| match &p.workload {
                Some(name) => *name == w.workload,
                // A proxy whose proof named no workload stands for its identity.
                None => p.identity == w.identity,
            })
        })
        .collect();
    if missing.is_empty() {
        return vec![Check::passed(format!(
            "{} proxies connected ({} of {} workloads with a sidecar)",
            proxies.len(),
            meshed.len(),
            meshed.len()
        ))];
    }
    missing
        .into_iter()
        .map(|w| {
            Check::failed(
                format!("workload {} ({}) has no proxy connected", w.workload, w.identity),
                "start its sidecar; check its bootstrap token and that it reaches the control plane's discovery port (15010)",
            )
        })
        .collect()
}

fn who(p: &ProxyStatus) -> String {
    match &p.workload {
        Some(w) => format!("{} ({w})", p.identity),
        None => p.identity.clone(),
    }
}

fn sync_checks(proxies: &[ProxyStatus]) -> Vec<Check> {
    let mut out = Vec::new();
    for p in proxies {
        match p.sync {
            SyncState::Synced => {}
            SyncState::Nacked => out.push(Check::failed(
                format!(
                    "proxy {} rejected its config: {}",
                    who(p),
                    p.last_nack.as_deref().unwrap_or("(no message)")
                ),
                "fix the resource the message names; the proxy keeps serving its last good config",
            )),
            SyncState::Stale => {
                let waiting: Vec<&str> = p
                    .types
                    .iter()
                    .filter(|(_, t)| t.state == SyncState::Stale)
                    .map(|(name, _)| name.as_str())
                    .collect();
                out.push(Check::failed(
                    format!(
                        "proxy {} has not acknowledged its latest config ({})",
                        who(p),
                        if waiting.is_empty() { "nothing received yet".to_owned() } else { waiting.join(", ") }
                    ),
                    "run the check again; if it stays, the proxy is stuck: see its log and /config_dump",
                ));
            }
        }
    }
    if out.is_empty() {
        out.push(Check::passed(format!("{} proxies in sync", proxies.len())));
    }
    out
}

fn certificate_checks(
    proxies: &[ProxyStatus],
    min_validity: Duration,
    now: SystemTime,
) -> Vec<Check> {
    let mut out = Vec::new();
    let mut soonest: Option<u64> = None;
    let mut unknown = 0;
    for p in proxies {
        let Some(cert) = &p.certificate else {
            // Issued by an earlier run of the control plane; renewed at half its life.
            unknown += 1;
            continue;
        };
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(cert.not_after_unix);
        let left = not_after.duration_since(now).unwrap_or_default();
        soonest = Some(soonest.map_or(left.as_secs(), |s| s.min(left.as_secs())));
        if left < min_validity {
            out.push(Check::failed(
                format!(
                    "certificate of proxy {} expires in {} (serial {})",
                    who(p),
                    short_duration(left.as_secs()),
                    cert.serial
                ),
                "proxies renew at half the lifetime: is this one reaching the CA? see its log",
            ));
        }
    }
    if out.is_empty() {
        let mut message = format!(
            "certificates valid for more than {}",
            short_duration(min_validity.as_secs())
        );
        if let Some(s) = soonest {
            message.push_str(&format!(" (soonest expires in {})", short_duration(s)));
        }
        if unknown > 0 {
            message.push_str(&format!(
                "; {unknown} issued before this control plane started"
            ));
        }
        out.push(Check::passed(message));
    }
    out
}
