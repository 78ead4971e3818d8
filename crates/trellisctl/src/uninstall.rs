//! `trellisctl uninstall`: removes what `install` created, in a safe order: the
//! webhook first (so no Pod creation waits on a control plane about to go), then the
//! control plane, then its RBAC and namespace, and the CRDs last (deleting them
//! deletes every policy) unless `--keep-crds`. Prints the objects for
//! `kubectl delete -f -` (kubectl deletes in stream order), or deletes them itself
//! with `--apply`, with the `trellis-ca-root` ConfigMaps the control plane wrote.

use anyhow::Context;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use serde::Deserialize as _;
use serde_json::{Value, json};
use trellis_control::injector::ca_root::CA_ROOT_CONFIGMAP;

use crate::install::{CRDS, RESOURCES};

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// Leave the CustomResourceDefinitions (and so every policy) in place.
    #[arg(long)]
    keep_crds: bool,
    /// Delete from the cluster (kubeconfig) instead of printing.
    #[arg(long)]
    apply: bool,
}

/// An object to delete: enough of it for `kubectl delete -f`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doomed {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

/// Lower goes first.
fn phase(kind: &str) -> u8 {
    match kind {
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => 0,
        "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" => 2,
        "Namespace" => 3,
        "CustomResourceDefinition" => 4,
        // The control plane: Deployment, Service, PodDisruptionBudget, ...
        _ => 1,
    }
}

/// Everything `install` applies, in deletion order.
pub fn plan(keep_crds: bool) -> anyhow::Result<Vec<Doomed>> {
    let crds = CRDS.iter().filter(|_| !keep_crds);
    let mut doomed = Vec::new();
    for (path, text) in RESOURCES.iter().chain(crds) {
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).with_context(|| format!("deploy/{path}"))?;
            let text = |p: &str| value.pointer(p).and_then(Value::as_str).map(str::to_owned);
            let (Some(api_version), Some(kind), Some(name)) =
                (text("/apiVersion"), text("/kind"), text("/metadata/name"))
            else {
                continue;
            };
            doomed.push(Doomed {
                api_version,
                kind,
                name,
                namespace: text("/metadata/namespace"),
            });
        }
    }
    // Stable: within a phase, install's order.
    doomed.sort_by_key(|d| phase(&d.kind));
    Ok(doomed)
}

pub fn render(doomed: &[Doomed]) -> anyhow::Result<String> {
    let mut docs = Vec::new();
    for d in doomed {
        let mut metadata = json!({ "name": d.name });
        if let Some(ns) = &d.namespace {
            metadata["namespace"] = json!(ns);
        }
        let object = json!({"apiVersion": d.api_version, "kind": d.kind, "metadata": metadata});
        docs.push(serde_yaml_ng::to_string(&object)?);
    }
    Ok(docs.join("---\n"))
}

pub async fn run(args: UninstallArgs) -> anyhow::Result<()> {
    let doomed = plan(args.keep_crds)?;
    if !args.apply {
        print!("{}", render(&doomed)?);
        return Ok(());
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    for (i, d) in doomed.iter().enumerate() {
        delete(&client, d).await?;
        // The root ConfigMaps go with the control plane, before its RBAC.
        let next_phase = doomed.get(i + 1).map(|n| phase(&n.kind));
        if phase(&d.kind) == 1 && next_phase != Some(1) {
            delete_root_config_maps(&client).await?;
        }
    }
    Ok(())
}

async fn delete(client: &kube::Client, d: &Doomed) -> anyhow::Result<()> {
    let (group, version) = d
        .api_version
        .rsplit_once('/')
        .unwrap_or(("", &d.api_version));
    let gvk = GroupVersionKind::gvk(group, version, &d.kind);
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("finding {}", d.kind))?;
    let api: Api<DynamicObject> = match &d.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let what = match &d.namespace {
        Some(ns) => format!("{} {ns}/{}", d.kind, d.name),
        None => format!("{} {}", d.kind, d.name),
    };
    match api.delete(&d.name, &DeleteParams::foreground()).await {
        Ok(_) => println!("deleted {what}"),
        Err(kube::Error::Api(status)) if status.code == 404 => println!("{what} already gone"),
        Err(e) => return Err(e).with_context(|| format!("deleting {what}")),
    }
    Ok(())
}

async fn delete_root_config_maps(client: &kube::Client) -> anyhow::Result<()> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"));
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let listed = all
        .list(&ListParams::default().fields(&format!("metadata.name={CA_ROOT_CONFIGMAP}")))
        .await
        .context("listing the trellis-ca-root ConfigMaps")?;
    for cm in listed.items {
        let Some(ns) = cm.metadata.namespace.clone() else {
            continue;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
        match api
            .delete(CA_ROOT_CONFIGMAP, &DeleteParams::default())
            .await
        {
            Ok(_) => println!("deleted ConfigMap {ns}/{CA_ROOT_CONFIGMAP}"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("deleting ConfigMap {ns}/{CA_ROOT_CONFIGMAP}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_first_crds_last() {
        let kinds: Vec<String> = plan(false).unwrap().into_iter().map(|d| d.kind).collect();
        assert_eq!(
            kinds.first().map(String::as_str),
            Some("MutatingWebhookConfiguration")
        );
        let first_rbac = kinds.iter().position(|k| k == "ClusterRole").unwrap();
        let deployment = kinds.iter().position(|k| k == "Deployment").unwrap();
        let namespace = kinds.iter().position(|k| k == "Namespace").unwrap();
        assert!(deployment < first_rbac && first_rbac < namespace);
        assert_eq!(&kinds[kinds.len() - 3..], ["CustomResourceDefinition"; 3]);
    }

    #[test]
    fn keep_crds_keeps_them() {
        let doomed = plan(true).unwrap();
        assert!(doomed.iter().all(|d| d.kind != "CustomResourceDefinition"));
    }
}
