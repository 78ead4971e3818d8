//! What changed between two mesh snapshots, per kind of object: the registry events
//! the control plane counts, whichever registry produced the snapshots.

use std::collections::BTreeMap;

use super::MeshSnapshot;

/// `(kind, event, count)` for every kind with a change; `event` is `add`, `update`
/// or `delete`.
pub fn changes(old: &MeshSnapshot, new: &MeshSnapshot) -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::new();
    let mut tally = |kind: &'static str, (added, updated, deleted): (u64, u64, u64)| {
        for (event, n) in [("add", added), ("update", updated), ("delete", deleted)] {
            if n > 0 {
                out.push((kind, event, n));
            }
        }
    };
    tally("service", compare(&old.services, &new.services));
    tally("endpoints", compare(&old.endpoints, &new.endpoints));
    tally("route", compare(&old.routes, &new.routes));
    tally(
        "traffic_policy",
        compare(&old.traffic_policies, &new.traffic_policies),
    );
    let workload = |w: &super::Workload| (w.namespace.clone(), w.name.clone());
    tally(
        "workload",
        compare(
            &keyed(&old.workloads, workload),
            &keyed(&new.workloads, workload),
        ),
    );
    let authz = |p: &super::AuthorizationPolicy| (p.namespace.clone(), p.name.clone());
    tally(
        "authorization_policy",
        compare(
            &keyed(&old.authorization_policies, authz),
            &keyed(&new.authorization_policies, authz),
        ),
    );
    let peer = |p: &super::PeerAuthentication| (p.namespace.clone(), p.name.clone());
    tally(
        "peer_authentication",
        compare(
            &keyed(&old.peer_authentications, peer),
            &keyed(&new.peer_authentications, peer),
        ),
    );
    let token = |t: &super::BootstrapToken| t.token_sha256;
    tally(
        "bootstrap_token",
        compare(
            &keyed(&old.bootstrap_tokens, token),
            &keyed(&new.bootstrap_tokens, token),
        ),
    );
    out
}

/// (added, updated, deleted) between two keyed collections.
fn compare<K: Ord, V: PartialEq>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> (u64, u64, u64) {
    let mut counts = (0, 0, 0);
    for (key, value) in new {
        match old.get(key) {
            None => counts.0 += 1,
            Some(before) if before != value => counts.1 += 1,
            Some(_) => {}
        }
    }
    counts.2 = old.keys().filter(|k| !new.contains_key(*k)).count() as u64;
    counts
}

fn keyed<T, K: Ord>(items: &[T], key: impl Fn(&T) -> K) -> BTreeMap<K, &T> {
    items.iter().map(|item| (key(item), item)).collect()
}
