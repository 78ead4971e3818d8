//! The mesh root in every namespace, as Istio's `istio-ca-root-cert`: a ConfigMap
//! [`CA_ROOT_CONFIGMAP`] with the root PEM under [`CA_ROOT_FILE`], which injected
//! proxies mount as a configMap volume. The leader writes it (server-side apply,
//! field manager `trellis-control`) into every namespace but Kubernetes' own, so a
//! Pod injected offline by `trellisctl inject` finds it too, and a new root reaches
//! running Pods without re-creating them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::watch;

use super::sidecar::CA_ROOT_FILE;
use crate::registry::kube::{FIELD_MANAGER, NamespaceLabels};

pub const CA_ROOT_CONFIGMAP: &str = "trellis-ca-root";
/// Kubernetes' own namespaces, where no injected Pod runs.
const SKIPPED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// How often every ConfigMap is written again (repairs edits and deletions).
pub const RESYNC: Duration = Duration::from_secs(300);
/// After a failed write, how long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The ConfigMap as applied.
pub fn config_map(namespace: &str, root_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CA_ROOT_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/part-of".to_owned(), "trellis".to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            CA_ROOT_FILE.to_owned(),
            root_pem.to_owned(),
        )])),
        ..ConfigMap::default()
    }
}

/// Writes the root into every namespace while `leading`; runs until `namespaces`
/// closes. A closed `leading` channel keeps its last value.
pub async fn publish_ca_root(
    client: Client,
    root_pem: String,
    mut namespaces: watch::Receiver<Arc<NamespaceLabels>>,
    mut leading: watch::Receiver<bool>,
) {
    // Namespaces written since the last resync (or since becoming leader).
    let mut written = BTreeSet::new();
    let mut leading_open = true;
    let resync = tokio::time::sleep(RESYNC);
    tokio::pin!(resync);
    loop {
        let leads = *leading.borrow_and_update();
        let current = namespaces.borrow_and_update().clone();
        let mut failed = 0;
        if leads {
            for namespace in current.keys() {
                if SKIPPED.contains(&namespace.as_str()) || written.contains(namespace) {
                    continue;
                }
                match apply(&client, namespace, &root_pem).await {
                    Ok(()) => {
                        written.insert(namespace.clone());
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(namespace, error = %e, "writing the mesh root ConfigMap failed; will try again");
                    }
                }
            }
        } else {
            written.clear();
        }
        written.retain(|n| current.contains_key(n));
        tokio::select! {
            changed = namespaces.changed() => if changed.is_err() {
                return;
            },
            changed = leading.changed(), if leading_open => if changed.is_err() {
                leading_open = false;
            },
            _ = &mut resync => {
                written.clear();
                resync.as_mut().reset(tokio::time::Instant::now() + RESYNC);
            }
            _ = tokio::time::sleep(RETRY_AFTER), if failed > 0 => {}
        }
    }
}

async fn apply(client: &Client, namespace: &str, root_pem: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let object = config_map(namespace, root_pem);
    api.patch(CA_ROOT_CONFIGMAP, &params, &Patch::Apply(&object))
        .await?;
    tracing::debug!(namespace, "mesh root ConfigMap written");
    Ok(())
}

#[cfg(test)]
mod tests;
