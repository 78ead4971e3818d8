//! Routes and policies into the snapshot, once its Services are known.
//!
//! Each object is validated and resolved by its `crate::api` type; its field errors
//! become file errors at the line where its document starts. References must
//! resolve: a route's parent or backend Service, or a TrafficPolicy's target, that
//! does not exist is an error of the folder (Kubernetes would instead mark the
//! object not accepted), so a typo never silently drops traffic rules.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{Object, Parsed, RegistryError};
use crate::api::FieldError;
use crate::model::{self, MeshSnapshot, ROOT_NAMESPACE, ServiceKey};

pub(super) fn add(
    objects: &[Parsed],
    snapshot: &mut MeshSnapshot,
    errors: &mut Vec<RegistryError>,
) {
    let services = &snapshot.services;
    let mut routes: BTreeMap<ServiceKey, Vec<model::HttpRouteRule>> = BTreeMap::new();
    let mut traffic: BTreeMap<ServiceKey, (model::TrafficPolicy, &Path, usize)> = BTreeMap::new();
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    // Namespace-wide (and mesh-wide) PeerAuthentications: one per namespace.
    let mut peer_wide: HashMap<String, (&str, &Path, usize)> = HashMap::new();
    for p in objects {
        let fail = |errors: &mut Vec<RegistryError>, field_errors: Vec<FieldError>| {
            errors.extend(
                field_errors
                    .into_iter()
                    .map(|e| RegistryError::new(&p.file, Some(p.line), e.to_string())),
            );
        };
        match &p.object {
            Object::HttpRoute(route) => match route.to_model(Some(services)) {
                Ok(resolved) => {
                    for note in resolved.ignored_parents {
                        tracing::info!(file = %p.file.display(), line = p.line, "{note}");
                    }
                    for (parent, rule) in resolved.rules {
                        routes.entry(parent).or_default().push(rule);
                    }
                }
                Err(e) => fail(errors, e),
            },
            Object::TrafficPolicy(policy) => match policy.to_model(Some(services)) {
                Ok(model) => {
                    let target = policy.target();
                    if let Some((other, file, line)) = traffic.get(&target) {
                        let reason = format!(
                            "spec.targetRef: Service {target} already has TrafficPolicy {} ({}:{line})",
                            other.source,
                            file.display(),
                        );
                        errors.push(RegistryError::new(&p.file, Some(p.line), reason));
                    } else {
                        traffic.insert(target, (model, &p.file, p.line));
                    }
                }
                Err(e) => fail(errors, e),
            },
            Object::AuthorizationPolicy(policy) => match policy.to_model() {
                Ok(model) => authz.push(model),
                Err(e) => fail(errors, e),
            },
            Object::PeerAuthentication(policy) => match policy.to_model() {
                Ok(model) => {
                    if model.selector.is_empty() {
                        let scope = if model.namespace == ROOT_NAMESPACE {
                            "the mesh".to_owned()
                        } else {
                            format!("namespace {}", model.namespace)
                        };
                        if let Some((other, file, line)) = peer_wide.get(&model.namespace) {
                            let reason = format!(
                                "spec.selector: {scope} already has PeerAuthentication {other} \
                                 without a selector ({}:{line})",
                                file.display()
                            );
                            errors.push(RegistryError::new(&p.file, Some(p.line), reason));
                            continue;
                        }
                        let name = policy.metadata.name.as_deref().unwrap_or_default();
                        peer_wide.insert(model.namespace.clone(), (name, &p.file, p.line));
                    }
                    peer.push(model);
                }
                Err(e) => fail(errors, e),
            },
            Object::Service(_)
            | Object::EndpointSlice(_)
            | Object::WorkloadEntry(_)
            | Object::BootstrapToken(_) => {}
        }
    }
    for rules in routes.values_mut() {
        model::sort_by_precedence(rules);
    }
    authz.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    peer.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    snapshot.routes = routes;
    snapshot.traffic_policies = traffic.into_iter().map(|(k, (p, _, _))| (k, p)).collect();
    snapshot.authorization_policies = authz;
    snapshot.peer_authentications = peer;
}
