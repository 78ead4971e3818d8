//! AuthorizationPolicy rules about HTTP (methods, paths, headers) that reach a port
//! declared opaque (`tcp` or `opaque`). The proxy never parses requests there, so it
//! judges those connections at L4 and fails closed: such an ALLOW rule never matches,
//! such a DENY rule matches every connection its sources and ports match. The policy
//! is enforced, but probably not as its author meant, so both registries report it.

use std::collections::BTreeMap;

use super::{
    AppProtocol, AuthorizationAction, AuthorizationPolicy, AuthorizationRule, MeshSnapshot,
    ServiceKey, WorkloadIndex,
};

/// One Service port where HTTP rules of a policy meet opaque traffic.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct L7RulesOnOpaquePort {
    pub action: AuthorizationAction,
    pub service: ServiceKey,
    pub service_port: u16,
    pub protocol: AppProtocol,
    /// The workload port behind it, which the rules' `ports` name or leave open.
    pub target_port: u16,
    /// `namespace/name` of the selected workloads behind it, sorted.
    pub workloads: Vec<String>,
}

impl std::fmt::Display for L7RulesOnOpaquePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.protocol {
            AppProtocol::Opaque => "opaque",
            _ => "tcp",
        };
        let effect = match self.action {
            AuthorizationAction::Allow => "never match there: those callers are refused",
            AuthorizationAction::Deny => "match every connection from their sources there",
        };
        write!(
            f,
            "rules with methods, paths or headers apply to port {} of {} (Service {} port {}, \
             {protocol}): the proxy cannot see HTTP on an opaque port, so they {effect}",
            self.target_port,
            self.workloads.join(", "),
            self.service,
            self.service_port,
        )
    }
}

impl AuthorizationRule {
    /// Whether the rule has conditions only an HTTP request can satisfy.
    pub fn is_http(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.headers.is_empty()
    }
}

impl MeshSnapshot {
    /// Where `policy`'s HTTP rules reach workload ports behind Service ports declared
    /// `tcp` or `opaque` (undeclared ports are detected, so HTTP may be seen there).
    /// Workloads are found through the Service's endpoints, as both registries fill
    /// them; empty when there is nothing to report.
    pub fn l7_rules_on_opaque_ports(
        &self,
        policy: &AuthorizationPolicy,
    ) -> Vec<L7RulesOnOpaquePort> {
        let http_rules: Vec<&AuthorizationRule> =
            policy.rules.iter().filter(|r| r.is_http()).collect();
        if http_rules.is_empty() {
            return Vec::new();
        }
        let index = WorkloadIndex::new(&self.workloads);
        let mut found: BTreeMap<(ServiceKey, u16, u16), L7RulesOnOpaquePort> = BTreeMap::new();
        for ((key, service_port), endpoints) in &self.endpoints {
            let Some(port) = self
                .services
                .get(key)
                .and_then(|s| s.ports.iter().find(|p| p.port == *service_port))
            else {
                continue;
            };
            if !matches!(port.protocol, AppProtocol::Tcp | AppProtocol::Opaque) {
                continue;
            }
            for e in endpoints {
                let Ok(Some(w)) = index.find(&key.namespace, None, e.address) else {
                    continue;
                };
                let reached = http_rules
                    .iter()
                    .any(|r| r.ports.is_empty() || r.ports.contains(&e.port));
                if !reached || !policy.selects(&self.root_namespace, &w.namespace, &w.labels) {
                    continue;
                }
                let entry = found
                    .entry((key.clone(), *service_port, e.port))
                    .or_insert_with(|| L7RulesOnOpaquePort {
                        action: policy.action,
                        service: key.clone(),
                        service_port: *service_port,
                        protocol: port.protocol,
                        target_port: e.port,
                        workloads: Vec::new(),
                    });
                entry.workloads.push(format!("{}/{}", w.namespace, w.name));
            }
        }
        let mut found: Vec<_> = found.into_values().collect();
        for f in &mut found {
            f.workloads.sort();
            f.workloads.dedup();
        }
        found
    }
}
