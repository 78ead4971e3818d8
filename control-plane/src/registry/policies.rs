//! Routes and policies into a snapshot whose Services, workloads and endpoints are
//! known: the one path both registries take, so a folder and a cluster holding the
//! same objects serve the same model.
//!
//! Each object is validated and resolved by its [`crate::api`] type. An object that
//! fails is left out and its verdict says why; the registry decides what that means
//! (the file registry rejects the folder, the kube registry writes a status).
//! Conflicts go to the first object given: the caller orders them (file order, or
//! oldest first in a cluster, as Gateway API resolves conflicts).

use std::collections::{BTreeMap, HashMap};

use crate::api::{self, FieldError};
use crate::model::{self, L7RulesOnOpaquePort, MeshSnapshot, ServiceKey};

/// A route or policy object, as a registry read it.
#[derive(Clone, Copy, Debug)]
pub enum PolicyObject<'a> {
    HttpRoute(&'a api::HttpRoute),
    TrafficPolicy(&'a api::TrafficPolicy),
    AuthorizationPolicy(&'a api::AuthorizationPolicy),
    PeerAuthentication(&'a api::PeerAuthentication),
}

/// An object with the registry's handle on it.
#[derive(Debug)]
pub struct Declared<'a, S> {
    /// What the registry needs to report on the object (a file and line, a key).
    pub source: S,
    /// Where it is declared, named in messages about objects that conflict with it;
    /// `None` when its kind and name say enough.
    pub location: Option<String>,
    pub object: PolicyObject<'a>,
}

/// Why an object is not served, in the words of Gateway API's policy conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// A value is wrong.
    Invalid,
    /// Valid, but a Service it names does not exist.
    TargetNotFound,
    /// Valid, but another object already holds its place.
    Conflicted,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Invalid => "Invalid",
            Rejection::TargetNotFound => "TargetNotFound",
            Rejection::Conflicted => "Conflicted",
        }
    }
}

/// What became of one object.
#[derive(Debug)]
pub struct Verdict<S> {
    pub source: S,
    /// `None`: accepted and in the snapshot.
    pub rejected: Option<(Rejection, Vec<FieldError>)>,
    /// Accepted, with parts that do not apply (an HTTPRoute's parents that are not
    /// Services, for instance).
    pub notes: Vec<FieldError>,
    /// Accepted AuthorizationPolicy whose HTTP rules reach opaque ports.
    pub l7_on_opaque_ports: Vec<L7RulesOnOpaquePort>,
}

impl<S> Verdict<S> {
    pub fn new(source: S) -> Self {
        Verdict {
            source,
            rejected: None,
            notes: Vec::new(),
            l7_on_opaque_ports: Vec::new(),
        }
    }

    fn reject(&mut self, rejection: Rejection, errors: Vec<FieldError>) {
        self.rejected = Some((rejection, errors));
    }
}

/// Sets the routes and policies of `snapshot` from `objects`; one verdict per object,
/// in order.
pub fn add<S>(objects: Vec<Declared<'_, S>>, snapshot: &mut MeshSnapshot) -> Vec<Verdict<S>> {
    let services = &snapshot.services;
    let root_namespace = snapshot.root_namespace.as_str();
    let mut verdicts = Vec::with_capacity(objects.len());
    let mut routes: BTreeMap<ServiceKey, Vec<model::HttpRouteRule>> = BTreeMap::new();
    // The TrafficPolicy of each Service, with where it was declared.
    let mut traffic: BTreeMap<ServiceKey, (model::TrafficPolicy, Option<String>)> = BTreeMap::new();
    // With the index of its verdict, for the opaque-port check below.
    let mut authz: Vec<(model::AuthorizationPolicy, usize)> = Vec::new();
    let mut peer = Vec::new();
    // Namespace-wide (and mesh-wide) PeerAuthentications: one per namespace.
    let mut peer_wide: HashMap<String, (String, Option<String>)> = HashMap::new();
    for Declared {
        source,
        location,
        object,
    } in objects
    {
        let mut verdict = Verdict::new(source);
        match object {
            PolicyObject::HttpRoute(route) => match route.to_model(Some(services)) {
                Ok(resolved) => {
                    verdict.notes = resolved.ignored_parents;
                    for (parent, rule) in resolved.rules {
                        routes.entry(parent).or_default().push(rule);
                    }
                }
                Err(e) => verdict.reject(unresolved_or_invalid(route.validate()), e),
            },
            PolicyObject::TrafficPolicy(policy) => match policy.to_model(Some(services)) {
                Ok(model) => {
                    let target = policy.target();
                    if let Some((other, other_at)) = traffic.get(&target) {
                        let reason = format!(
                            "Service {target} already has TrafficPolicy {}{}",
                            other.source,
                            in_parens(other_at)
                        );
                        verdict.reject(
                            Rejection::Conflicted,
                            vec![field_error("spec.targetRef", reason)],
                        );
                    } else {
                        traffic.insert(target, (model, location));
                    }
                }
                Err(e) => verdict.reject(unresolved_or_invalid(policy.validate()), e),
            },
            PolicyObject::AuthorizationPolicy(policy) => match policy.to_model() {
                Ok(model) => authz.push((model, verdicts.len())),
                Err(e) => verdict.reject(Rejection::Invalid, e),
            },
            PolicyObject::PeerAuthentication(policy) => match policy.to_model() {
                Ok(model) => {
                    if model.selector.is_empty() {
                        if let Some((other, other_at)) = peer_wide.get(&model.namespace) {
                            let scope = if model.namespace == root_namespace {
                                "the mesh".to_owned()
                            } else {
                                format!("namespace {}", model.namespace)
                            };
                            let reason = format!(
                                "{scope} already has PeerAuthentication {other} without a \
                                 selector{}",
                                in_parens(other_at)
                            );
                            verdict.reject(
                                Rejection::Conflicted,
                                vec![field_error("spec.selector", reason)],
                            );
                        } else {
                            peer_wide
                                .insert(model.namespace.clone(), (model.name.clone(), location));
                            peer.push(model);
                        }
                    } else {
                        peer.push(model);
                    }
                }
                Err(e) => verdict.reject(Rejection::Invalid, e),
            },
        }
        verdicts.push(verdict);
    }
    for rules in routes.values_mut() {
        model::sort_by_precedence(rules);
    }
    for (policy, i) in &authz {
        verdicts[*i].l7_on_opaque_ports = snapshot.l7_rules_on_opaque_ports(policy);
    }
    let mut authz: Vec<_> = authz.into_iter().map(|(p, _)| p).collect();
    authz.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    peer.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    snapshot.routes = routes;
    snapshot.traffic_policies = traffic.into_iter().map(|(k, (p, _))| (k, p)).collect();
    snapshot.authorization_policies = authz;
    snapshot.peer_authentications = peer;
    verdicts
}

/// An object that failed with its references resolved: if it is valid without
/// them, what it names is missing.
fn unresolved_or_invalid(without_references: Result<(), Vec<FieldError>>) -> Rejection {
    match without_references {
        Ok(()) => Rejection::TargetNotFound,
        Err(_) => Rejection::Invalid,
    }
}

fn field_error(field: &str, reason: String) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason,
    }
}

fn in_parens(location: &Option<String>) -> String {
    location
        .as_ref()
        .map(|l| format!(" ({l})"))
        .unwrap_or_default()
}
