//! `trellisctl inject -f FILE`: the webhook's mutation, offline, for manifests.
//!
//! Reads multi-document YAML (a file, or `-` for stdin) and injects every Pod and
//! every Pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob).
//! The proxy reads the mesh root from the ConfigMap `trellis-ca-root` that the
//! control plane keeps in every namespace, so no root is needed here. Other objects
//! pass through unchanged; so do Pods opted out with
//! `trellis.io/inject: disabled` (or `"false"`) and ones already injected.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize as _;
use serde_json::Value;
use trellis_control::injector::{self, InjectorSettings};

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// Manifest to inject (`-` reads stdin).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    #[arg(long, default_value = trellis_control::injector::DEFAULT_PROXY_IMAGE)]
    proxy_image: String,
    /// The iptables init container's image (needs iptables).
    #[arg(long, default_value = trellis_control::injector::DEFAULT_INIT_IMAGE)]
    init_image: String,
    /// The control plane's gRPC address as Pods dial it.
    #[arg(long, default_value = "trellis-control.trellis-system.svc:15010")]
    control_addr: String,
    #[arg(long, default_value = trellis_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
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
    let control_server_name = args
        .control_addr
        .rsplit_once(':')
        .map_or(args.control_addr.as_str(), |(host, _)| host)
        .to_owned();
    let settings = InjectorSettings {
        proxy_image: args.proxy_image,
        init_image: args.init_image,
        trust_domain: args.trust_domain,
        control_addr: args.control_addr,
        control_server_name,
        ..InjectorSettings::default()
    };
    print!("{}", inject_manifests(&text, &settings)?);
    Ok(())
}

/// Injects every Pod and Pod template in a multi-document YAML text.
pub fn inject_manifests(text: &str, settings: &InjectorSettings) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for (n, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .with_context(|| format!("document {}", n + 1))?;
        if value.is_null() {
            continue;
        }
        let mut object: Value = serde_json::to_value(value)?;
        inject_object(&mut object, settings).with_context(|| format!("document {}", n + 1))?;
        out.push(serde_yaml_ng::to_string(&object)?);
    }
    Ok(out.join("---\n"))
}

/// Where a kind keeps its Pod (template), as a JSON pointer.
pub fn pod_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn inject_object(object: &mut Value, settings: &InjectorSettings) -> anyhow::Result<()> {
    if object.get("kind").and_then(Value::as_str) == Some("List") {
        if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, settings)?;
            }
        }
        return Ok(());
    }
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(pointer) = pod_pointer(&kind) else {
        return Ok(());
    };
    let Some(pod) = object.pointer_mut(pointer) else {
        bail!("{kind} has no Pod template at {pointer}");
    };
    match injector::pod_patch(pod, "", settings)? {
        Ok(patch) => json_patch::patch(pod, &patch).context("applying the injection patch")?,
        Err(skip) => eprintln!("{kind} not injected: {skip:?}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        readinessProbe:
          httpGet: {path: /ready, port: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report, namespace: shop}
spec:
  schedule: '0 * * * *'
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {trellis.io/inject: 'false'}
        spec:
          restartPolicy: Never
          containers: [{name: report, image: report:1}]
";

    fn docs(text: &str) -> Vec<Value> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn injects_templates_and_passes_the_rest_through() {
        let out = inject_manifests(MANIFEST, &InjectorSettings::default()).unwrap();
        let before = docs(MANIFEST);
        let after = docs(&out);
        assert_eq!(after.len(), 3);
        let template = &after[0]["spec"]["template"];
        let inits: Vec<_> = template["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(inits, ["trellis-init", "trellis-proxy"]);
        assert_eq!(
            template["metadata"]["annotations"]["trellis.io/status"],
            "injected"
        );
        assert_eq!(
            template["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
            15020
        );
        assert_eq!(after[1], before[1], "a Service is left as it is");
        assert_eq!(after[2], before[2], "an opted-out CronJob is left as it is");

        // Injecting the output again changes nothing.
        let again = inject_manifests(&out, &InjectorSettings::default()).unwrap();
        assert_eq!(docs(&again), after);
    }
}
