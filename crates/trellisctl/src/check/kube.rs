//! The checks of a Kubernetes install, read with the kubeconfig's credentials. Each
//! check is a pure function of the objects it read, so the tests feed it recorded
//! objects.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::version::Info;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use serde_json::Value;
use trellis_control::injector::ca_root::CA_ROOT_CONFIGMAP;
use trellis_control::injector::{annotations, injection_setting, namespace_enabled, sidecar};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Check;

#[cfg(test)]
mod tests;

/// The oldest Kubernetes the install supports (native sidecars GA; the API version
/// the control plane is built against).
pub const MIN_MINOR: u32 = 33;
/// The CRDs `trellisctl install` creates.
pub const CRD_NAMES: [&str; 3] = [
    "trafficpolicies.trellis.io",
    "authorizationpolicies.trellis.io",
    "peerauthentications.trellis.io",
];
pub const CONTROL_DEPLOYMENT: &str = "trellis-control";
pub const WEBHOOK_CONFIGURATION: &str = "trellis-injector";

async fn client() -> Result<kube::Client, Check> {
    kube::Client::try_default().await.map_err(|e| {
        Check::failed(
            format!("no Kubernetes client: {e}"),
            "set KUBECONFIG or the current context (kubectl config current-context)",
        )
    })
}

/// Before install: the API server answers, is new enough, and lets us install.
pub async fn pre_checks() -> Vec<Check> {
    let client = match client().await {
        Ok(c) => c,
        Err(failed) => return vec![failed],
    };
    let info = client.apiserver_version().await;
    let mut out = vec![version_check(info.as_ref().map_err(ToString::to_string))];
    if info.is_err() {
        return out;
    }
    let needed = [
        (
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "create",
        ),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "create",
        ),
        ("rbac.authorization.k8s.io", "clusterroles", "create"),
        ("", "namespaces", "create"),
    ];
    let reviews = Api::<SelfSubjectAccessReview>::all(client);
    let mut denied = Vec::new();
    for (group, resource, verb) in needed {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    verb: Some(verb.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let allowed = reviews
            .create(&PostParams::default(), &review)
            .await
            .ok()
            .and_then(|r| r.status)
            .is_some_and(|s| s.allowed);
        if !allowed {
            denied.push(format!("{verb} {resource}"));
        }
    }
    out.push(if denied.is_empty() {
        Check::passed("allowed to create CRDs, webhooks, cluster roles and namespaces")
    } else {
        Check::failed(
            format!("not allowed to {}", denied.join(", ")),
            "install as a cluster administrator",
        )
    });
    out
}

/// After install: everything `install` made is there and working.
pub async fn checks(namespace: &str) -> Vec<Check> {
    let client = match client().await {
        Ok(c) => c,
        Err(failed) => return vec![failed],
    };
    let info = client.apiserver_version().await;
    let mut out = vec![version_check(info.as_ref().map_err(ToString::to_string))];
    if info.is_err() {
        return out;
    }
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let mut found = Vec::new();
    for name in CRD_NAMES {
        match crds.get_opt(name).await {
            Ok(crd) => found.push((name, crd)),
            Err(e) => {
                tracing::debug!(crd = name, error = %e, "reading the CRD failed");
                found.push((name, None));
            }
        }
    }
    out.push(crds_check(&found));
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(CONTROL_DEPLOYMENT)
        .await
        .ok()
        .flatten();
    out.push(deployment_check(namespace, deployment.as_ref()));
    let lease = Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt(trellis_control::leader::LEASE_NAME)
        .await
        .ok()
        .flatten();
    out.push(lease_check(namespace, lease.as_ref(), SystemTime::now()));
    let webhook = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK_CONFIGURATION)
        .await
        .ok()
        .flatten();
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let enabled: Vec<String> = namespaces
        .iter()
        .filter(|ns| namespace_enabled(&ns.metadata.labels.clone().unwrap_or_default()))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect();
    let mut root = None;
    for ns in &enabled {
        if let Ok(Some(cm)) = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(CA_ROOT_CONFIGMAP)
            .await
        {
            root = cm.data.and_then(|d| d.get(sidecar::CA_ROOT_FILE).cloned());
            break;
        }
    }
    let mut webhook_result = webhook_check(webhook.as_ref(), root.as_deref(), SystemTime::now());
    if webhook_result.ok
        && let Some(config) = &webhook
    {
        webhook_result = verify_serving(webhook_result, config).await;
    }
    out.push(webhook_result);
    let mut pods = BTreeMap::new();
    for ns in &enabled {
        let listed = Api::<Pod>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        pods.insert(ns.clone(), listed);
    }
    out.push(uninjected_check(&pods));
    let mut policies = Vec::new();
    for kind in ["TrafficPolicy", "AuthorizationPolicy", "PeerAuthentication"] {
        let gvk = GroupVersionKind::gvk("trellis.io", "v1alpha1", kind);
        let resource = ApiResource::from_gvk(&gvk);
        if let Ok(list) = Api::<DynamicObject>::all_with(client.clone(), &resource)
            .list(&ListParams::default())
            .await
        {
            policies.extend(list.items.into_iter().map(|o| (kind, o)));
        }
    }
    out.extend(policy_checks(&policies));
    out
}

pub fn version_check(info: Result<&Info, String>) -> Check {
    let info = match info {
        Ok(info) => info,
        Err(e) => {
            return Check::failed(
                format!("Kubernetes API not reachable: {e}"),
                "check the kubeconfig's server and credentials (kubectl version)",
            );
        }
    };
    // Managed clusters say "33+".
    let minor: Option<u32> = info
        .minor
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok();
    let supported = info.major == "1" && minor.is_some_and(|m| m >= MIN_MINOR);
    if supported {
        Check::passed(format!("Kubernetes API reachable ({})", info.git_version))
    } else {
        Check::failed(
            format!(
                "Kubernetes {} is not supported (1.{MIN_MINOR} or newer is)",
                info.git_version
            ),
            "upgrade the cluster: the sidecar runs as a native sidecar (restartPolicy Always init container)",
        )
    }
}

pub fn crds_check(found: &[(&str, Option<CustomResourceDefinition>)]) -> Check {
    let mut problems = Vec::new();
    for (name, crd) in found {
        let Some(crd) = crd else {
            problems.push(format!("{name} missing"));
            continue;
        };
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if !established {
            problems.push(format!("{name} not Established"));
        }
    }
    if problems.is_empty() {
        Check::passed(format!("CRDs installed and Established ({})", found.len()))
    } else {
        Check::failed(
            format!("CRDs: {}", problems.join(", ")),
            "trellisctl install --crds-only | kubectl apply -f -",
        )
    }
}

pub fn deployment_check(namespace: &str, deployment: Option<&Deployment>) -> Check {
    let Some(deployment) = deployment else {
        return Check::failed(
            format!("control plane Deployment {namespace}/{CONTROL_DEPLOYMENT} not found"),
            "trellisctl install | kubectl apply -f -",
        );
    };
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    if ready >= 1 && ready >= wanted {
        Check::passed(format!("control plane ready ({ready}/{wanted} replicas)"))
    } else {
        Check::failed(
            format!("control plane not ready ({ready}/{wanted} replicas)"),
            format!(
                "kubectl -n {namespace} describe deployment {CONTROL_DEPLOYMENT}; kubectl -n {namespace} logs deployment/{CONTROL_DEPLOYMENT}"
            ),
        )
    }
}

pub fn lease_check(namespace: &str, lease: Option<&Lease>, now: SystemTime) -> Check {
    let name = trellis_control::leader::LEASE_NAME;
    let spec = lease.and_then(|l| l.spec.as_ref());
    let holder = spec
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty());
    let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
    let duration = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(0);
    let now = k8s_openapi::jiff::Timestamp::try_from(now).ok();
    let current = match (renewed, now) {
        (Some(renewed), Some(now)) => {
            let age = now.duration_since(renewed).as_secs();
            age <= i64::from(duration)
        }
        _ => false,
    };
    match holder {
        Some(holder) if current => Check::passed(format!(
            "leader elected ({holder} holds Lease {namespace}/{name})"
        )),
        Some(holder) => Check::failed(
            format!("Lease {namespace}/{name} held by {holder} but not renewed within {duration}s"),
            "the leader is stuck or gone: see the control plane's logs",
        ),
        None => Check::failed(
            format!("no leader: Lease {namespace}/{name} is not held"),
            "is the control plane running, and may it update Leases (RBAC)?",
        ),
    }
}

pub fn webhook_check(
    config: Option<&MutatingWebhookConfiguration>,
    mesh_root_pem: Option<&str>,
    now: SystemTime,
) -> Check {
    let Some(config) = config else {
        return Check::failed(
            format!("MutatingWebhookConfiguration {WEBHOOK_CONFIGURATION} not found"),
            "trellisctl install | kubectl apply -f -",
        );
    };
    let hooks = config.webhooks.as_deref().unwrap_or_default();
    if hooks.is_empty() {
        return Check::failed(
            format!("webhook configuration {WEBHOOK_CONFIGURATION} has no webhooks"),
            "trellisctl install | kubectl apply -f -",
        );
    }
    for hook in hooks {
        let Some(bundle) = hook
            .client_config
            .ca_bundle
            .as_ref()
            .filter(|b| !b.0.is_empty())
        else {
            return Check::failed(
                format!("webhook {} has no caBundle", hook.name),
                "the control plane fills it in when it leads: check its logs and that it may patch mutatingwebhookconfigurations",
            );
        };
        if let Err(why) = usable_ca(&bundle.0, now) {
            return Check::failed(
                format!("webhook {}: caBundle {why}", hook.name),
                "delete the caBundle; the leading control plane writes the current root again",
            );
        }
        if let Some(root) = mesh_root_pem
            && normalise_pem(root) != normalise_pem(&String::from_utf8_lossy(&bundle.0))
        {
            return Check::failed(
                format!(
                    "webhook {}: caBundle is not the mesh root that signs the webhook's certificate",
                    hook.name
                ),
                "the leading control plane rewrites it within seconds; if it stays, see its logs",
            );
        }
    }
    Check::passed(format!(
        "webhook {WEBHOOK_CONFIGURATION} configured with a valid caBundle ({} webhooks)",
        hooks.len()
    ))
}

/// Adds what a TLS handshake to each webhook's Service says to a passed check.
async fn verify_serving(passed: Check, config: &MutatingWebhookConfiguration) -> Check {
    let mut verified = 0;
    for hook in config.webhooks.iter().flatten() {
        let (Some(service), Some(bundle)) =
            (&hook.client_config.service, &hook.client_config.ca_bundle)
        else {
            continue;
        };
        let host = format!("{}.{}.svc", service.name, service.namespace);
        let port = service
            .port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(443);
        match super::webhook_tls::verify(&bundle.0, &host, port).await {
            None => {}
            Some(Ok(())) => verified += 1,
            Some(Err(e)) => {
                return Check::failed(
                    format!(
                        "webhook {}: caBundle does not verify the certificate of {host}:{port}: {e}",
                        hook.name
                    ),
                    "the leading control plane rewrites the caBundle within seconds; if it stays, see its logs",
                );
            }
        }
    }
    let mut message = passed.message;
    if verified > 0 {
        message.push_str("; it verifies the webhook's serving certificate");
    } else {
        message.push_str("; the webhook is not reachable from here to verify its certificate");
    }
    Check::passed(message)
}

fn normalise_pem(pem: &str) -> String {
    pem.split_whitespace().collect()
}

/// A CA certificate, valid now.
fn usable_ca(bundle_pem: &[u8], now: SystemTime) -> Result<(), String> {
    let text = String::from_utf8_lossy(bundle_pem);
    let parsed = pem::parse(text.as_bytes()).map_err(|e| format!("is not PEM: {e}"))?;
    let (_, cert) = X509Certificate::from_der(parsed.contents())
        .map_err(|e| format!("is not an X.509 certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("is not a CA certificate".to_owned());
    }
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    if cert.validity().not_after.timestamp() < now {
        return Err("has expired".to_owned());
    }
    Ok(())
}

/// Pods in enabled namespaces that should carry the sidecar and do not.
pub fn uninjected_check(pods_by_namespace: &BTreeMap<String, Vec<Pod>>) -> Check {
    let mut missing: Vec<String> = Vec::new();
    for (ns, pods) in pods_by_namespace {
        for pod in pods {
            let spec = pod.spec.clone().unwrap_or_default();
            let opted_out = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(annotations::INJECT))
                .and_then(|v| injection_setting(v))
                == Some(false);
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
            if !sidecar::has_proxy(&spec)
                && !opted_out
                && spec.host_network != Some(true)
                && !finished
            {
                missing.push(format!(
                    "{ns}/{}",
                    pod.metadata.name.clone().unwrap_or_default()
                ));
            }
        }
    }
    if missing.is_empty() {
        return Check::passed(format!(
            "every pod in the {} enabled namespaces has the sidecar",
            pods_by_namespace.len()
        ));
    }
    let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
    let more = missing.len().saturating_sub(shown.len());
    Check::failed(
        format!(
            "{} pods in enabled namespaces run without the sidecar: {}{}",
            missing.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
        "they started before the namespace was enabled or while the webhook was down: kubectl rollout restart their workloads",
    )
}

/// One ✖ per Trellis policy whose `Accepted` condition is False.
pub fn policy_checks(policies: &[(&str, DynamicObject)]) -> Vec<Check> {
    let mut out = Vec::new();
    for (kind, object) in policies {
        let conditions = object
            .data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let refused = conditions.iter().find(|c| {
            c.get("type").and_then(Value::as_str) == Some("Accepted")
                && c.get("status").and_then(Value::as_str) == Some("False")
        });
        if let Some(condition) = refused {
            let text = |k: &str| {
                condition
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            out.push(Check::failed(
                format!(
                    "{kind} {}/{} not accepted: {}: {}",
                    object.metadata.namespace.clone().unwrap_or_default(),
                    object.metadata.name.clone().unwrap_or_default(),
                    text("reason"),
                    text("message")
                ),
                "fix the fields the message names; until then the proxies fail closed for what it selects",
            ));
        }
    }
    if out.is_empty() {
        out.push(Check::passed(format!(
            "{} policies accepted",
            policies.len()
        )));
    }
    out
}
