//! Whose AuthorizationPolicies and PeerAuthentication a proxy enforces.
//!
//! A proxy enforces the policies that select its own workload. Which workload that
//! is comes from its certificate (the CA writes the workload its proof was bound to);
//! when that cannot be established, the proxy may be any workload running as its
//! identity, and it gets a view that is at least as strict as each of theirs: every
//! candidate's DENY policies; the candidates' ALLOW policies only when they all have
//! exactly the same ones, else an ALLOW policy that matches nothing; per port the
//! strictest PeerAuthentication. Never the union of ALLOWs, which would let a
//! caller allowed to one workload reach the others.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use trellis_identity::SpiffeId;

use super::{
    AuthorizationAction, AuthorizationPolicy, EffectivePeerAuthentication, MeshSnapshot, MtlsMode,
};
use crate::model::Workload;

/// The name of the allow-nothing policy of the fail-closed view. Not a valid object
/// name, so it never collides with a real policy.
pub const UNKNOWN_WORKLOAD_POLICY: &str = "fail-closed:workload-unknown";

/// Which workload's policy a proxy gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyScope<'a> {
    /// The proxy's own workload, as its certificate proves.
    Workload(&'a Workload),
    /// The workload could not be established: the proxy may be any of `candidates`
    /// (the workloads running as `identity`; none when the registry knows none).
    Unknown {
        identity: &'a SpiffeId,
        candidates: Vec<&'a Workload>,
        reason: UnknownWorkload,
    },
}

/// Why a proxy's workload is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnknownWorkload {
    /// Its certificate names none (older certificate, or a proof not bound to one).
    NotNamed,
    /// The named workload is not in the registry (yet, or any more).
    NotInRegistry(String),
    /// The named workload runs as another identity.
    OtherIdentity(String),
}

impl std::fmt::Display for UnknownWorkload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnknownWorkload::NotNamed => f.write_str("the certificate names no workload"),
            UnknownWorkload::NotInRegistry(name) => {
                write!(f, "workload {name} is not in the registry")
            }
            UnknownWorkload::OtherIdentity(name) => {
                write!(f, "workload {name} runs as another identity")
            }
        }
    }
}

impl PolicyScope<'_> {
    /// The identity of the proxy this scope is for.
    pub fn identity(&self) -> &SpiffeId {
        match self {
            PolicyScope::Workload(w) => &w.identity,
            PolicyScope::Unknown { identity, .. } => identity,
        }
    }

    /// For logs and the control plane's `/proxies` view.
    pub fn describe(&self) -> String {
        match self {
            PolicyScope::Workload(w) => format!("workload {}/{}", w.namespace, w.name),
            PolicyScope::Unknown {
                candidates, reason, ..
            } => {
                let names: Vec<&str> = candidates.iter().map(|w| w.name.as_str()).collect();
                format!("fail-closed ({reason}; candidates: [{}])", names.join(", "))
            }
        }
    }
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// A snapshot's workloads by (namespace, name) and by identity, as positions in
/// [`MeshSnapshot::workloads`]: built once per snapshot, so that finding a proxy's
/// scope does not scan every workload (the discovery server does it per stream).
#[derive(Clone, Debug, Default)]
pub struct WorkloadLookup {
    by_name: HashMap<(String, String), usize>,
    by_identity: HashMap<SpiffeId, Vec<usize>>,
}

impl WorkloadLookup {
    pub fn new(workloads: &[Workload]) -> Self {
        let mut lookup = WorkloadLookup::default();
        for (i, w) in workloads.iter().enumerate() {
            // The first of a duplicated name, as a scan would find.
            lookup
                .by_name
                .entry((w.namespace.clone(), w.name.clone()))
                .or_insert(i);
            lookup
                .by_identity
                .entry(w.identity.clone())
                .or_default()
                .push(i);
        }
        lookup
    }
}

impl MeshSnapshot {
    /// The workloads running as `identity`.
    pub fn workloads_of<'a>(
        &'a self,
        identity: &'a SpiffeId,
    ) -> impl Iterator<Item = &'a Workload> {
        self.workloads
            .iter()
            .filter(move |w| &w.identity == identity)
    }

    /// The scope of the proxy of `identity` whose certificate names `workload` (a name
    /// in the identity's namespace, or `None`).
    pub fn policy_scope<'a>(
        &'a self,
        identity: &'a SpiffeId,
        workload: Option<&str>,
    ) -> PolicyScope<'a> {
        self.policy_scope_in(&WorkloadLookup::new(&self.workloads), identity, workload)
    }

    /// [`MeshSnapshot::policy_scope`] with `lookup`, which must be this snapshot's.
    pub fn policy_scope_in<'a>(
        &'a self,
        lookup: &WorkloadLookup,
        identity: &'a SpiffeId,
        workload: Option<&str>,
    ) -> PolicyScope<'a> {
        let reason = match workload {
            None => UnknownWorkload::NotNamed,
            Some(name) => {
                let namespace = identity.namespace();
                let found = lookup
                    .by_name
                    .get(&(namespace.to_owned(), name.to_owned()))
                    .and_then(|&i| self.workloads.get(i));
                match found {
                    Some(w) if &w.identity == identity => return PolicyScope::Workload(w),
                    Some(_) => UnknownWorkload::OtherIdentity(format!("{namespace}/{name}")),
                    None => UnknownWorkload::NotInRegistry(format!("{namespace}/{name}")),
                }
            }
        };
        self.identity_scope_in(lookup, identity, reason)
    }

    /// The fail-closed scope of any proxy of `identity`.
    pub fn identity_scope<'a>(
        &'a self,
        identity: &'a SpiffeId,
        reason: UnknownWorkload,
    ) -> PolicyScope<'a> {
        PolicyScope::Unknown {
            identity,
            candidates: self.workloads_of(identity).collect(),
            reason,
        }
    }

    /// [`MeshSnapshot::identity_scope`] with `lookup`, which must be this snapshot's.
    pub fn identity_scope_in<'a>(
        &'a self,
        lookup: &WorkloadLookup,
        identity: &'a SpiffeId,
        reason: UnknownWorkload,
    ) -> PolicyScope<'a> {
        let candidates = lookup
            .by_identity
            .get(identity)
            .map(|positions| {
                positions
                    .iter()
                    .filter_map(|&i| self.workloads.get(i))
                    .collect()
            })
            .unwrap_or_default();
        PolicyScope::Unknown {
            identity,
            candidates,
            reason,
        }
    }

    /// The AuthorizationPolicies the proxy of `scope` enforces, in the snapshot's
    /// order. For an unknown workload, see the module's doc; the allow-nothing policy
    /// is [`UNKNOWN_WORKLOAD_POLICY`] in the identity's namespace.
    pub fn authorization_policies_for(
        &self,
        scope: &PolicyScope<'_>,
    ) -> Vec<Cow<'_, AuthorizationPolicy>> {
        let selecting = |namespace: &str, labels: &BTreeMap<String, String>| {
            self.authorization_policies
                .iter()
                .filter(|p| p.selects(&self.root_namespace, namespace, labels))
                .collect::<Vec<_>>()
        };
        let (identity, candidates) = match scope {
            PolicyScope::Workload(w) => {
                let own = selecting(&w.namespace, &w.labels);
                return own.into_iter().map(Cow::Borrowed).collect();
            }
            PolicyScope::Unknown {
                identity,
                candidates,
                ..
            } => (*identity, candidates),
        };
        // With no workload known, the identity is taken as a workload without
        // labels in its namespace.
        let scopes: Vec<(&str, &BTreeMap<String, String>)> = if candidates.is_empty() {
            vec![(identity.namespace(), &NO_LABELS)]
        } else {
            candidates
                .iter()
                .map(|w| (w.namespace.as_str(), &w.labels))
                .collect()
        };
        let allows_of = |(namespace, labels): (&str, &BTreeMap<String, String>)| {
            selecting(namespace, labels)
                .into_iter()
                .filter(|p| p.action == AuthorizationAction::Allow)
                .collect::<Vec<_>>()
        };
        let mut allow_sets = scopes.iter().copied().map(allows_of);
        let first = allow_sets.next().unwrap_or_default();
        let same_allows = allow_sets.all(|set| set == first);
        let mut policies: Vec<Cow<'_, AuthorizationPolicy>> = self
            .authorization_policies
            .iter()
            .filter(|p| p.action == AuthorizationAction::Deny)
            .filter(|p| {
                scopes
                    .iter()
                    .any(|(ns, labels)| p.selects(&self.root_namespace, ns, labels))
            })
            .map(Cow::Borrowed)
            .collect();
        if same_allows {
            policies.extend(first.into_iter().map(Cow::Borrowed));
        } else {
            policies.push(Cow::Owned(AuthorizationPolicy {
                namespace: identity.namespace().to_owned(),
                name: UNKNOWN_WORKLOAD_POLICY.to_owned(),
                selector: BTreeMap::new(),
                action: AuthorizationAction::Allow,
                rules: Vec::new(),
            }));
        }
        policies
    }

    /// The PeerAuthentication in force for the proxy of `scope`: its workload's, or
    /// for an unknown workload the strictest of the candidates' per port.
    pub fn peer_authentication_for(&self, scope: &PolicyScope<'_>) -> EffectivePeerAuthentication {
        match scope {
            PolicyScope::Workload(w) => self.effective_peer_authentication(&w.namespace, &w.labels),
            PolicyScope::Unknown {
                identity,
                candidates,
                ..
            } if candidates.is_empty() => {
                self.effective_peer_authentication(identity.namespace(), &NO_LABELS)
            }
            PolicyScope::Unknown { candidates, .. } => candidates
                .iter()
                .map(|w| self.effective_peer_authentication(&w.namespace, &w.labels))
                .reduce(EffectivePeerAuthentication::strictest)
                .unwrap_or(EffectivePeerAuthentication {
                    mode: MtlsMode::Strict,
                    port_modes: BTreeMap::new(),
                }),
        }
    }
}

#[cfg(test)]
mod tests;
