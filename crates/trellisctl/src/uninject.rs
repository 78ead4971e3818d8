//! `trellisctl uninject -f FILE`: the inverse of `inject`. Removes what the injector
//! added (the two init containers, the three volumes, the `trellis.io/status`
//! annotation, and the `prometheus.io/*` ones when they are exactly the injector's)
//! and puts back the app probes it rewrote, from the proxy's
//! `TRELLIS_APP_PROBES`. `uninject(inject(x)) == x` object for object.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize as _;
use serde_json::{Map, Value};
use trellis_control::injector::APP_METRICS_ENV;
use trellis_control::injector::annotations;
use trellis_control::injector::probes::APP_PROBES_ENV;
use trellis_control::injector::sidecar::{
    CA_ROOT_VOLUME, HEALTH_PORT, INIT_CONTAINER, PROXY_CONTAINER, RUN_VOLUME, TOKEN_VOLUME,
};

use crate::inject::pod_pointer;

#[derive(clap::Args, Debug)]
pub struct UninjectArgs {
    /// Manifest to uninject (`-` reads stdin).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
}

pub fn run(args: UninjectArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    print!("{}", uninject_manifests(&text)?);
    Ok(())
}

pub fn uninject_manifests(text: &str) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for (n, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .with_context(|| format!("document {}", n + 1))?;
        if value.is_null() {
            continue;
        }
        let mut object: Value = serde_json::to_value(value)?;
        uninject_object(&mut object).with_context(|| format!("document {}", n + 1))?;
        out.push(serde_yaml_ng::to_string(&object)?);
    }
    Ok(out.join("---\n"))
}

fn uninject_object(object: &mut Value) -> anyhow::Result<()> {
    if object.get("kind").and_then(Value::as_str) == Some("List") {
        for item in object
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            uninject_object(item)?;
        }
        return Ok(());
    }
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(pointer) = pod_pointer(kind) else {
        return Ok(());
    };
    if let Some(pod) = object.pointer_mut(pointer) {
        uninject_pod(pod)?;
    }
    Ok(())
}

/// Undoes the injection of one Pod (or template); a Pod never injected is left as is.
pub fn uninject_pod(pod: &mut Value) -> anyhow::Result<()> {
    let proxy = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .and_then(|inits| {
            inits
                .iter()
                .find(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
        })
        .cloned();
    let Some(proxy) = proxy else {
        return Ok(());
    };
    let originals: Map<String, Value> = match env_value(&proxy, APP_PROBES_ENV) {
        Some(json) => serde_json::from_str(&json)
            .with_context(|| format!("the proxy's {APP_PROBES_ENV} is not a JSON object"))?,
        None => Map::new(),
    };
    let own_scrape: Map<String, Value> = match env_value(&proxy, APP_METRICS_ENV) {
        Some(json) => serde_json::from_str(&json)
            .with_context(|| format!("the proxy's {APP_METRICS_ENV} is not a JSON object"))?,
        None => Map::new(),
    };
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        for container in spec
            .get_mut("containers")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            restore_probes(container, &originals);
        }
        remove_named(spec, "initContainers", &[INIT_CONTAINER, PROXY_CONTAINER]);
        remove_named(spec, "volumes", &[TOKEN_VOLUME, CA_ROOT_VOLUME, RUN_VOLUME]);
    }
    if let Some(metadata) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(map) = metadata
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            map.remove(annotations::STATUS);
            // The injector adds these only where the Pod had none of the keys, so
            // the injector's exact values are its own (a Pod's app cannot serve
            // on the proxy's port 15020).
            let scrape_is_injected = annotations::PROMETHEUS_SCRAPE
                .iter()
                .all(|(key, value)| map.get(*key).and_then(Value::as_str) == Some(*value));
            if scrape_is_injected {
                for (key, _) in annotations::PROMETHEUS_SCRAPE {
                    map.remove(key);
                }
            }
            // The Pod's own, when the injector merged its app's metrics.
            map.extend(own_scrape);
            if map.is_empty() {
                metadata.remove("annotations");
            }
        }
        if metadata.is_empty()
            && let Some(pod) = pod.as_object_mut()
        {
            pod.remove("metadata");
        }
    }
    Ok(())
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    container
        .get("env")?
        .as_array()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))?
        .get("value")?
        .as_str()
        .map(str::to_owned)
}

/// Drops the list entries named `names`, and the list when nothing is left (the
/// injector made it).
fn remove_named(spec: &mut Map<String, Value>, key: &str, names: &[&str]) {
    let Some(list) = spec.get_mut(key).and_then(Value::as_array_mut) else {
        return;
    };
    list.retain(|item| {
        !item
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| names.contains(&n))
    });
    if list.is_empty() {
        spec.remove(key);
    }
}

/// Puts back each probe the injector pointed at the proxy's health port.
fn restore_probes(container: &mut Value, originals: &Map<String, Value>) {
    let name = container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    for (field, suffix) in [
        ("readinessProbe", "readyz"),
        ("livenessProbe", "livez"),
        ("startupProbe", "startupz"),
    ] {
        let path = format!("/app-health/{name}/{suffix}");
        let Some(probe) = container.get_mut(field).and_then(Value::as_object_mut) else {
            continue;
        };
        let rewritten = probe.get("httpGet").is_some_and(|g| {
            g.get("path").and_then(Value::as_str) == Some(path.as_str())
                && g.get("port").and_then(Value::as_i64) == Some(i64::from(HEALTH_PORT))
        });
        let Some(Value::Object(original)) = originals.get(&path) else {
            continue;
        };
        if !rewritten {
            continue;
        }
        probe.remove("httpGet");
        for (key, value) in original {
            // The timeout stayed on the probe; the copy was for the proxy.
            if key != "timeoutSeconds" {
                probe.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_control::injector::InjectorSettings;

    use super::*;
    use crate::inject::inject_manifests;

    const MANIFEST: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      serviceAccountName: web
      containers:
      - name: web
        image: ghcr.io/trellis/web:1.4.2
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /ready, port: 8080, scheme: HTTP}
          periodSeconds: 3
        livenessProbe:
          tcpSocket: {port: 8080}
          timeoutSeconds: 2
        startupProbe:
          grpc: {port: 9090, service: health}
      - name: sidecar
        image: busybox
        livenessProbe:
          exec: {command: ['true']}
---
apiVersion: v1
kind: Pod
metadata:
  name: lone
  namespace: shop
  annotations: {team: payments, prometheus.io/scrape: 'true', prometheus.io/port: '9102'}
spec:
  initContainers: [{name: migrate, image: migrate:1}]
  volumes: [{name: data, emptyDir: {}}]
  containers: [{name: app, image: app:1}]
---
apiVersion: v1
kind: Pod
spec:
  containers: [{name: bare, image: bare:1}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

    fn docs(text: &str) -> Vec<Value> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn uninject_inverts_inject_exactly() {
        let injected = inject_manifests(MANIFEST, &InjectorSettings::default()).unwrap();
        assert_ne!(docs(&injected), docs(MANIFEST), "inject changed something");
        let restored = uninject_manifests(&injected).unwrap();
        assert_eq!(docs(&restored), docs(MANIFEST));
    }

    #[test]
    fn uninjected_manifests_pass_through() {
        let once = uninject_manifests(MANIFEST).unwrap();
        assert_eq!(docs(&once), docs(MANIFEST));
    }
}
