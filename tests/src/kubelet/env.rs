//! Container environment: `env`, `envFrom`, the downward API's field references, the
//! `kubernetes` Service's variables, and `$(VAR)` expansion as the kubelet does it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client};

/// What the downward API needs to know beyond the Pod object.
#[derive(Debug, Clone, Copy)]
pub struct PodAddresses {
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
}

/// `PATH` for containers that set none (images would set one).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The value of a downward-API `fieldPath`, for env `fieldRef` and `downwardAPI` volumes.
pub fn field_value(pod: &Pod, addrs: PodAddresses, path: &str) -> Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => key_values(meta.labels.as_ref()),
        "metadata.annotations" => key_values(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => addrs.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => addrs.host_ip.to_string(),
        other => {
            if let Some(key) = subscript(other, "metadata.labels") {
                lookup(meta.labels.as_ref(), key)
            } else if let Some(key) = subscript(other, "metadata.annotations") {
                lookup(meta.annotations.as_ref(), key)
            } else {
                bail!("unsupported fieldPath `{other}`");
            }
        }
    };
    Ok(value)
}

/// `metadata.labels['key']` → `key`.
fn subscript<'a>(path: &'a str, field: &str) -> Option<&'a str> {
    path.strip_prefix(field)?
        .strip_prefix("['")?
        .strip_suffix("']")
}

fn lookup(map: Option<&BTreeMap<String, String>>, key: &str) -> String {
    map.and_then(|m| m.get(key)).cloned().unwrap_or_default()
}

/// The downward API's rendering of a whole map: `key="value"` lines, sorted.
fn key_values(map: Option<&BTreeMap<String, String>>) -> String {
    map.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect::<String>()
    })
    .unwrap_or_default()
}

/// Expands `$(NAME)` from `vars`; `$$(NAME)` is a literal `$(NAME)`; an unknown name
/// stays as written (all as the kubelet does).
pub fn expand(input: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(body) = tail.strip_prefix("$(")
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Everything a container's process environment holds, in order (later wins).
pub async fn container_env(
    client: &Client,
    pod: &Pod,
    container: &Container,
    addrs: PodAddresses,
    kubernetes_service: (Ipv4Addr, u16),
) -> Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut vars: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        (
            "HOSTNAME".into(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        (
            "KUBERNETES_SERVICE_HOST".into(),
            kubernetes_service.0.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            kubernetes_service.1.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".into(),
            kubernetes_service.1.to_string(),
        ),
    ];
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or("");
        if let Some(cm) = &source.config_map_ref {
            let optional = cm.optional.unwrap_or(false);
            if let Some(data) = config_map_data(client, ns, &cm.name, optional).await? {
                vars.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
            }
        }
        if let Some(sr) = &source.secret_ref {
            let optional = sr.optional.unwrap_or(false);
            if let Some(data) = secret_data(client, ns, &sr.name, optional).await? {
                vars.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => expand(v, &vars),
            (None, None) => String::new(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    field_value(pod, addrs, &f.field_path)?
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match config_map_data(client, ns, &r.name, optional).await? {
                        Some(data) => match data.get(&r.key) {
                            Some(v) => v.clone(),
                            None if optional => continue,
                            None => bail!("configmap {ns}/{} has no key {}", r.name, r.key),
                        },
                        None => continue,
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match secret_data(client, ns, &r.name, optional).await? {
                        Some(data) => match data.get(&r.key) {
                            Some(v) => v.clone(),
                            None if optional => continue,
                            None => bail!("secret {ns}/{} has no key {}", r.name, r.key),
                        },
                        None => continue,
                    }
                } else {
                    bail!(
                        "env {}: only fieldRef, configMapKeyRef and secretKeyRef are supported",
                        var.name
                    );
                }
            }
        };
        vars.push((var.name.clone(), value));
    }
    // Last definition wins, as in a real process environment.
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<(String, String)> = vars
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    out.reverse();
    Ok(out)
}

/// A ConfigMap's `data` (and `binaryData` as lossy text); `None` when it is missing and
/// `optional`.
pub async fn config_map_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, String>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let Some(cm) = api
        .get_opt(name)
        .await
        .with_context(|| format!("get configmap {ns}/{name}"))?
    else {
        return if optional {
            Ok(None)
        } else {
            Err(anyhow!("configmap {ns}/{name} not found"))
        };
    };
    let mut data = cm.data.unwrap_or_default();
    for (k, v) in cm.binary_data.unwrap_or_default() {
        data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
    }
    Ok(Some(data))
}

/// A Secret's data, decoded; `None` when it is missing and `optional`.
pub async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, String>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let Some(secret) = api
        .get_opt(name)
        .await
        .with_context(|| format!("get secret {ns}/{name}"))?
    else {
        return if optional {
            Ok(None)
        } else {
            Err(anyhow!("secret {ns}/{name} not found"))
        };
    };
    let mut data: BTreeMap<String, String> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    data.extend(secret.string_data.unwrap_or_default());
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let v = vars(&[("A", "1"), ("B", "two")]);
        assert_eq!(expand("x$(A)y$(B)", &v), "x1ytwo");
        assert_eq!(expand("$(C) stays", &v), "$(C) stays");
        assert_eq!(expand("$$(A) is literal", &v), "$(A) is literal");
        assert_eq!(expand("cost $5 $(A", &v), "cost $5 $(A");
    }

    #[test]
    fn downward_fields() -> Result<()> {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                annotations: Some([("a/b".to_string(), "x\"y".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let addrs = PodAddresses {
            pod_ip: Ipv4Addr::new(10, 244, 128, 1),
            host_ip: Ipv4Addr::new(10, 244, 0, 1),
        };
        assert_eq!(field_value(&pod, addrs, "metadata.namespace")?, "shop");
        assert_eq!(field_value(&pod, addrs, "status.podIP")?, "10.244.128.1");
        assert_eq!(field_value(&pod, addrs, "metadata.labels['app']")?, "web");
        assert_eq!(
            field_value(&pod, addrs, "metadata.annotations['a/b']")?,
            "x\"y"
        );
        assert_eq!(
            field_value(&pod, addrs, "metadata.labels")?,
            "app=\"web\"\n"
        );
        assert_eq!(
            field_value(&pod, addrs, "spec.serviceAccountName")?,
            "default"
        );
        assert!(field_value(&pod, addrs, "spec.bogus").is_err());
        Ok(())
    }
}
