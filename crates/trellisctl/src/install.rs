//! `trellisctl install`: prints the manifests of `deploy/` (the CRDs, then the
//! kustomize base, in `kustomization.yaml` order) as one multi-document YAML, for
//! `trellisctl install | kubectl apply -f -`. The files are embedded, so what it
//! prints is what `kubectl apply -k deploy/kustomize` applies.

use std::io::Write;

use clap::Args;

/// The default images the manifests name, replaced by `--control-image`,
/// `--proxy-image` and `--init-image`.
const CONTROL_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-control:latest";
const PROXY_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-proxy:latest";
const INIT_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-proxy-init:latest";

/// `(path under deploy/, contents)`, CRDs first so that one `kubectl apply` of the
/// whole stream can create them before anything that uses them.
pub const CRDS: [(&str, &str); 3] = [
    (
        "crds/trafficpolicies.trellis.io.yaml",
        include_str!("../../../deploy/crds/trafficpolicies.trellis.io.yaml"),
    ),
    (
        "crds/authorizationpolicies.trellis.io.yaml",
        include_str!("../../../deploy/crds/authorizationpolicies.trellis.io.yaml"),
    ),
    (
        "crds/peerauthentications.trellis.io.yaml",
        include_str!("../../../deploy/crds/peerauthentications.trellis.io.yaml"),
    ),
];

pub const RESOURCES: [(&str, &str); 5] = [
    (
        "kustomize/namespace.yaml",
        include_str!("../../../deploy/kustomize/namespace.yaml"),
    ),
    (
        "kustomize/rbac.yaml",
        include_str!("../../../deploy/kustomize/rbac.yaml"),
    ),
    (
        "kustomize/deployment.yaml",
        include_str!("../../../deploy/kustomize/deployment.yaml"),
    ),
    (
        "kustomize/service.yaml",
        include_str!("../../../deploy/kustomize/service.yaml"),
    ),
    (
        "kustomize/webhook.yaml",
        include_str!("../../../deploy/kustomize/webhook.yaml"),
    ),
];

#[derive(Args, Debug, Default)]
pub struct InstallArgs {
    /// Print only the CustomResourceDefinitions.
    #[arg(long, conflicts_with = "skip_crds")]
    crds_only: bool,
    /// Leave the CustomResourceDefinitions out (they are installed already).
    #[arg(long)]
    skip_crds: bool,
    /// The control plane's image.
    #[arg(long, default_value = CONTROL_IMAGE)]
    control_image: String,
    /// The sidecar image the injector adds to Pods.
    #[arg(long, default_value = PROXY_IMAGE)]
    proxy_image: String,
    /// The image of the injected iptables init container (needs iptables).
    #[arg(long, default_value = INIT_IMAGE)]
    init_image: String,
}

pub fn run(args: InstallArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(render(&args).as_bytes())?;
    out.flush()?;
    Ok(())
}

/// The manifests as one YAML stream.
pub fn render(args: &InstallArgs) -> String {
    let crds = CRDS.iter().filter(|_| !args.skip_crds);
    let resources = RESOURCES.iter().filter(|_| !args.crds_only);
    let mut out = String::new();
    for (path, text) in crds.chain(resources) {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&format!("# Source: deploy/{path}\n"));
        let text = text
            .replace(CONTROL_IMAGE, &args.control_image)
            .replace(PROXY_IMAGE, &args.proxy_image)
            .replace(INIT_IMAGE, &args.init_image);
        out.push_str(&text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn defaults() -> InstallArgs {
        InstallArgs {
            control_image: CONTROL_IMAGE.into(),
            proxy_image: PROXY_IMAGE.into(),
            init_image: INIT_IMAGE.into(),
            ..InstallArgs::default()
        }
    }

    fn docs(yaml: &str) -> Vec<serde_json::Value> {
        serde_yaml_ng::Deserializer::from_str(yaml)
            .map(|doc| serde_json::Value::deserialize(doc).expect("valid YAML"))
            .filter(|v| !v.is_null())
            .collect()
    }

    fn kinds(yaml: &str) -> Vec<String> {
        docs(yaml)
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn prints_crds_then_everything_else() {
        let kinds = kinds(&render(&defaults()));
        assert_eq!(
            kinds,
            [
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Deployment",
                "PodDisruptionBudget",
                "Service",
                "MutatingWebhookConfiguration",
            ]
        );
    }

    #[test]
    fn crds_only_and_skip_crds() {
        let only = InstallArgs {
            crds_only: true,
            ..defaults()
        };
        assert!(
            kinds(&render(&only))
                .iter()
                .all(|k| k == "CustomResourceDefinition")
        );
        let skip = InstallArgs {
            skip_crds: true,
            ..defaults()
        };
        let kinds = kinds(&render(&skip));
        assert_eq!(kinds.len(), 10);
        assert!(!kinds.iter().any(|k| k == "CustomResourceDefinition"));
    }

    #[test]
    fn replaces_images() {
        let args = InstallArgs {
            control_image: "registry.example/control:v1".into(),
            proxy_image: "registry.example/proxy:v1".into(),
            init_image: "registry.example/proxy-init:v1".into(),
            ..defaults()
        };
        let yaml = render(&args);
        for image in [CONTROL_IMAGE, PROXY_IMAGE, INIT_IMAGE] {
            assert!(!yaml.contains(image), "{image} left in");
        }
        let deployment = docs(&yaml)
            .into_iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["image"], "registry.example/control:v1");
        assert!(
            container["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "--proxy-image=registry.example/proxy:v1")
        );
        assert!(
            container["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "--init-image=registry.example/proxy-init:v1")
        );
    }

    /// Fail closed by default: the API server refuses a Pod it cannot have
    /// injected, and so does the webhook.
    #[test]
    fn the_webhook_fails_closed_by_default() {
        let docs = docs(&render(&defaults()));
        let webhook = docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
            .unwrap();
        assert_eq!(webhook["webhooks"][0]["failurePolicy"], "Fail");
        let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(
            args.as_array()
                .unwrap()
                .iter()
                .any(|a| a == "--injector-failure-policy=fail"),
            "{args}"
        );
    }

    /// A file added to a kustomization must be added here too.
    #[test]
    fn embeds_what_the_kustomizations_list() {
        let listed = |kustomization: &str, dir: &str| -> Vec<String> {
            let k: serde_json::Value = serde_yaml_ng::from_str(kustomization).unwrap();
            k["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .filter(|r| *r != "../crds")
                .map(|r| format!("{dir}/{r}"))
                .collect()
        };
        let crds = listed(
            include_str!("../../../deploy/crds/kustomization.yaml"),
            "crds",
        );
        let base = listed(
            include_str!("../../../deploy/kustomize/kustomization.yaml"),
            "kustomize",
        );
        assert_eq!(crds, CRDS.map(|(p, _)| p.to_owned()));
        assert_eq!(base, RESOURCES.map(|(p, _)| p.to_owned()));
        assert!(
            include_str!("../../../deploy/kustomize/kustomization.yaml").contains("- ../crds"),
            "the base installs the CRDs"
        );
    }
}
