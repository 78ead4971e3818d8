//! Pod volumes, written to a per-pod folder on the node: `emptyDir`, `configMap`,
//! `secret`, `downwardAPI` and `projected` (with real, Pod-bound service-account tokens
//! from TokenRequest). Each container bind-mounts them in a mount namespace of its own
//! (see `exec.rs`). Files are replaced by rename, so a refreshed token shows through a
//! directory mount.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    DownwardAPIVolumeFile, KeyToPath, Pod, ServiceAccount, Volume, VolumeProjection,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::env::{PodAddresses, config_map_data, field_value, secret_data};

/// Where each volume of a pod lives on the node.
#[derive(Debug, Clone, Default)]
pub struct PodVolumes {
    dirs: BTreeMap<String, PathBuf>,
}

impl PodVolumes {
    /// The node folder of volume `name`.
    pub fn dir(&self, name: &str) -> Option<&Path> {
        self.dirs.get(name).map(PathBuf::as_path)
    }
}

/// What a (re)write of the volumes found out.
pub struct Written {
    pub volumes: PodVolumes,
    /// When projected tokens should be requested again (80% of the shortest life),
    /// if there are any.
    pub refresh_after: Option<Duration>,
}

/// Writes every volume of `pod` under `root/<volume>`. Called again to refresh tokens:
/// `emptyDir` contents are kept, the rest is rewritten.
pub async fn write_all(
    client: &Client,
    pod: &Pod,
    addrs: PodAddresses,
    root: &Path,
) -> Result<Written> {
    let mut volumes = PodVolumes::default();
    let mut shortest: Option<i64> = None;
    let spec_volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone());
    for volume in spec_volumes.unwrap_or_default() {
        let dir = root.join(&volume.name);
        make_dir(&dir, 0o755)?;
        let ttl = write_volume(client, pod, addrs, &volume, &dir)
            .await
            .with_context(|| format!("volume {}", volume.name))?;
        if let Some(ttl) = ttl {
            shortest = Some(shortest.map_or(ttl, |s| s.min(ttl)));
        }
        volumes.dirs.insert(volume.name.clone(), dir);
    }
    let refresh_after = shortest.map(|s| Duration::from_secs((s.max(60) as u64) * 8 / 10));
    Ok(Written {
        volumes,
        refresh_after,
    })
}

/// Writes one volume; returns the life of the shortest token in it.
async fn write_volume(
    client: &Client,
    pod: &Pod,
    addrs: PodAddresses,
    volume: &Volume,
    dir: &Path,
) -> Result<Option<i64>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    if volume.empty_dir.is_some() {
        // As the kubelet makes it: writable by any UID the containers run as.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
        return Ok(None);
    }
    if let Some(cm) = &volume.config_map {
        let optional = cm.optional.unwrap_or(false);
        let data = config_map_data(client, ns, &cm.name, optional).await?;
        write_keys(dir, data, cm.items.as_deref(), cm.default_mode)?;
        return Ok(None);
    }
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.as_deref().unwrap_or_default();
        let optional = secret.optional.unwrap_or(false);
        let data = secret_data(client, ns, name, optional).await?;
        write_keys(dir, data, secret.items.as_deref(), secret.default_mode)?;
        return Ok(None);
    }
    if let Some(dapi) = &volume.downward_api {
        write_downward(pod, addrs, dir, dapi.items.as_deref(), dapi.default_mode)?;
        return Ok(None);
    }
    if let Some(projected) = &volume.projected {
        let mut shortest = None;
        for source in projected.sources.iter().flatten() {
            if let Some(ttl) =
                write_projection(client, pod, addrs, source, dir, projected.default_mode).await?
            {
                shortest = Some(shortest.map_or(ttl, |s: i64| s.min(ttl)));
            }
        }
        return Ok(shortest);
    }
    bail!(
        "unsupported volume type (this kubelet knows emptyDir, configMap, secret, downwardAPI, projected)"
    )
}

async fn write_projection(
    client: &Client,
    pod: &Pod,
    addrs: PodAddresses,
    source: &VolumeProjection,
    dir: &Path,
    default_mode: Option<i32>,
) -> Result<Option<i64>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    if let Some(sat) = &source.service_account_token {
        let ttl = sat.expiration_seconds.unwrap_or(3600);
        let token = request_token(client, pod, sat.audience.as_deref(), ttl).await?;
        write_file(dir, &sat.path, token.as_bytes(), default_mode)?;
        return Ok(Some(ttl));
    }
    if let Some(cm) = &source.config_map {
        let optional = cm.optional.unwrap_or(false);
        let data = config_map_data(client, ns, &cm.name, optional).await?;
        write_keys(dir, data, cm.items.as_deref(), default_mode)?;
    }
    if let Some(secret) = &source.secret {
        let optional = secret.optional.unwrap_or(false);
        let data = secret_data(client, ns, &secret.name, optional).await?;
        write_keys(dir, data, secret.items.as_deref(), default_mode)?;
    }
    if let Some(dapi) = &source.downward_api {
        write_downward(pod, addrs, dir, dapi.items.as_deref(), default_mode)?;
    }
    if source.cluster_trust_bundle.is_some() {
        bail!("clusterTrustBundle projections are not supported");
    }
    Ok(None)
}

/// A TokenRequest for the pod's service account, bound to the Pod (so it dies with it).
async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: i64,
) -> Result<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // Empty: the API server's own audiences.
            audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let answer = api
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for serviceaccount {ns}/{sa}"))?;
    match answer.status {
        Some(status) if !status.token.is_empty() => Ok(status.token),
        _ => bail!("TokenRequest for {ns}/{sa} returned no token"),
    }
}

fn write_keys(
    dir: &Path,
    data: Option<BTreeMap<String, String>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) -> Result<()> {
    let Some(data) = data else { return Ok(()) };
    match items {
        Some(items) => {
            for item in items {
                let Some(value) = data.get(&item.key) else {
                    bail!("key {} not found", item.key);
                };
                write_file(
                    dir,
                    &item.path,
                    value.as_bytes(),
                    item.mode.or(default_mode),
                )?;
            }
        }
        None => {
            for (key, value) in &data {
                write_file(dir, key, value.as_bytes(), default_mode)?;
            }
        }
    }
    Ok(())
}

fn write_downward(
    pod: &Pod,
    addrs: PodAddresses,
    dir: &Path,
    items: Option<&[DownwardAPIVolumeFile]>,
    default_mode: Option<i32>,
) -> Result<()> {
    for item in items.unwrap_or_default() {
        let Some(field) = &item.field_ref else {
            // resourceFieldRef: this kubelet keeps no resource accounting.
            tracing::warn!(path = %item.path, "downwardAPI item without fieldRef skipped");
            continue;
        };
        let value = field_value(pod, addrs, &field.field_path)?;
        write_file(
            dir,
            &item.path,
            value.as_bytes(),
            item.mode.or(default_mode),
        )?;
    }
    Ok(())
}

/// Writes `dir/rel` by rename; `rel` must stay inside `dir` (no `..`, not absolute).
fn write_file(dir: &Path, rel: &str, content: &[u8], mode: Option<i32>) -> Result<()> {
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || !rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        bail!("volume file path `{rel}` must be relative and stay inside the volume");
    }
    let path = dir.join(rel_path);
    if let Some(parent) = path.parent() {
        make_dir(parent, 0o755)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
    let mode = mode.map_or(0o644, |m| (m as u32) & 0o777);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_stay_inside_the_volume() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write_file(dir.path(), "a/b.txt", b"x", Some(0o600))?;
        let meta = std::fs::metadata(dir.path().join("a/b.txt"))?;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(write_file(dir.path(), bad, b"x", None).is_err(), "{bad}");
        }
        Ok(())
    }
}
