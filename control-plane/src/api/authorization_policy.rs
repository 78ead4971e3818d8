//! `AuthorizationPolicy` (trellis.io/v1alpha1), in Istio's shape: which callers may
//! reach the workloads it selects.
//!
//! ```yaml
//! apiVersion: trellis.io/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: {name: echo-readers, namespace: demo}
//! spec:
//!   selector: {matchLabels: {app: echo}}
//!   action: ALLOW
//!   rules:
//!   - from:
//!     - source: {principals: ["spiffe://cluster.local/ns/demo/sa/client"]}
//!     - source: {namespaces: [monitoring]}
//!     to:
//!     - operation: {methods: [GET], paths: ["/api/*"]}
//!     when:
//!     - {key: "request.headers[x-tenant]", values: [blue, "green-*"]}
//! ```
//!
//! Semantics (Istio's): with any ALLOW policy on a workload, a request must match one
//! of them; a request matching a DENY policy is refused; DENY wins. A rule matches
//! when one of its `from`, one of its `to` and every `when` condition match; an
//! empty list matches anything, so `rules: [{}]` matches every request and `rules: []` none.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_identity::SpiffeId;

use super::{
    Errors, FieldError, HTTP_METHODS, PolicyStatus, WorkloadSelector, check_selector, is_dns_label,
    name_of, namespace_of,
};
use crate::model::{self, StringMatch, ValueMatch};

/// Which callers may reach the selected workloads. (The derive makes the object
/// type, [`AuthorizationPolicy`].)
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, CustomResource, JsonSchema,
)]
// Each `printcolumn(...)` repeats `type_ = "string"`, which is no duplicate.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "trellis.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "authz",
    category = "trellis",
    doc = "ALLOW or DENY rules on source identity, namespace, port, HTTP method and path for the selected workloads.",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Accepted")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Unset or empty: every workload of the namespace; in the root namespace
    /// `trellis-system`, the selector (or its absence) spans the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Default `ALLOW`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// A request must match one of the workload's ALLOW policies.
    Allow,
    /// A request that matches is refused; DENY wins over ALLOW.
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Any of these sources; empty: any caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    /// Any of these operations; empty: any request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
    /// Every condition must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

/// Both lists must match when given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs (`spiffe://cluster.local/ns/demo/sa/client`), exact or with one
    /// leading or trailing `*`: `spiffe://cluster.local/ns/demo/*`, `*/sa/client`,
    /// `*` (any mesh identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Namespaces of the caller's identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 63), pattern(super::DNS_LABEL_PATTERN)))]
    pub namespaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

/// Every list must match when given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Workload (target) ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1)))]
    pub ports: Vec<u16>,
    /// Upper-case HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "methods_schema")]
    pub methods: Vec<String>,
    /// Starting with `/`: exact, or a prefix when ending with `*` (`/api/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^/[^*]*\*?$")))]
    pub paths: Vec<String>,
}

/// `key: request.headers[<name>]`; the header must have one of `values`, each
/// exact or with one leading or trailing `*` (`*` alone: present).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[schemars(pattern(KEY_PATTERN))]
    pub key: String,
    #[schemars(length(min = 1))]
    pub values: Vec<String>,
}

/// `request.headers[<name>]`, the one condition key supported.
const KEY_PATTERN: &str = r"^request\.headers\[[A-Za-z0-9!#$%&'*+.^_|~`-]+\]$";

/// `methods`: a list of [`HTTP_METHODS`].
fn methods_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "string", "enum": HTTP_METHODS},
    })
}

impl AuthorizationPolicy {
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        self.to_model().map(|_| ())
    }

    /// The policy with its rules flattened: one rule per (from, to) pair.
    pub fn to_model(&self) -> Result<model::AuthorizationPolicy, Vec<FieldError>> {
        let mut errors = Errors::default();
        let name = name_of(&self.metadata, &mut errors).to_owned();
        let spec = &self.spec;
        let selector = spec.selector.clone().unwrap_or_default();
        check_selector("spec.selector", &selector, &mut errors);
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().enumerate() {
            rules.extend(flatten(&format!("spec.rules[{i}]"), rule, &mut errors));
        }
        errors.into_result(model::AuthorizationPolicy {
            namespace: namespace_of(&self.metadata).to_owned(),
            name,
            selector: selector.match_labels,
            action: match spec.action {
                None | Some(Action::Allow) => model::AuthorizationAction::Allow,
                Some(Action::Deny) => model::AuthorizationAction::Deny,
            },
            rules,
        })
    }
}

fn flatten(p: &str, rule: &Rule, errors: &mut Errors) -> Vec<model::AuthorizationRule> {
    let mut sources = Vec::new();
    for (i, from) in rule.from.iter().enumerate() {
        let p = format!("{p}.from[{i}].source");
        let s = &from.source;
        for (j, principal) in s.principals.iter().enumerate() {
            if let Err(reason) = check_principal(principal) {
                errors.push(format!("{p}.principals[{j}]"), reason);
            }
        }
        for (j, ns) in s.namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                errors.push(
                    format!("{p}.namespaces[{j}]"),
                    format!("{ns:?} is not a namespace name"),
                );
            }
        }
        sources.push((s.principals.clone(), s.namespaces.clone()));
    }
    let mut operations = Vec::new();
    for (i, to) in rule.to.iter().enumerate() {
        let p = format!("{p}.to[{i}].operation");
        let o = &to.operation;
        for (j, port) in o.ports.iter().enumerate() {
            if *port == 0 {
                errors.push(format!("{p}.ports[{j}]"), "0 is not a port (1-65535)");
            }
        }
        for (j, method) in o.methods.iter().enumerate() {
            if !HTTP_METHODS.contains(&method.as_str()) {
                errors.push(
                    format!("{p}.methods[{j}]"),
                    format!("{method:?} is not an upper-case HTTP method (GET, POST, ...)"),
                );
            }
        }
        for (j, path) in o.paths.iter().enumerate() {
            let body = path.strip_suffix('*').unwrap_or(path);
            if !body.starts_with('/') || body.contains('*') {
                errors.push(
                    format!("{p}.paths[{j}]"),
                    format!("{path:?} must start with / and may only end with a *"),
                );
            }
        }
        operations.push((o.ports.clone(), o.methods.clone(), o.paths.clone()));
    }
    let headers: Vec<ValueMatch> = rule
        .when
        .iter()
        .enumerate()
        .filter_map(|(i, c)| header_condition(&format!("{p}.when[{i}]"), c, errors))
        .collect();
    if sources.is_empty() {
        sources.push(Default::default());
    }
    if operations.is_empty() {
        operations.push(Default::default());
    }
    let mut rules = Vec::with_capacity(sources.len() * operations.len());
    for (principals, namespaces) in &sources {
        for (ports, methods, paths) in &operations {
            rules.push(model::AuthorizationRule {
                principals: principals.clone(),
                namespaces: namespaces.clone(),
                ports: ports.clone(),
                methods: methods.clone(),
                paths: paths.clone(),
                headers: headers.clone(),
            });
        }
    }
    rules
}

/// An exact SPIFFE ID, or one with a single leading or trailing `*`.
fn check_principal(principal: &str) -> Result<(), String> {
    let bad = || format!("{principal:?} is not an exact SPIFFE ID or a prefix/suffix wildcard");
    if principal == "*" {
        return Ok(());
    }
    if let Some(prefix) = principal.strip_suffix('*') {
        return if prefix.starts_with("spiffe://") && !prefix.contains('*') {
            Ok(())
        } else {
            Err(bad())
        };
    }
    if let Some(suffix) = principal.strip_prefix('*') {
        return if !suffix.is_empty() && !suffix.contains('*') {
            Ok(())
        } else {
            Err(bad())
        };
    }
    if principal.contains('*') {
        return Err(bad());
    }
    principal
        .parse::<SpiffeId>()
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", bad()))
}

/// One header match for a condition: the value itself when it is one exact value,
/// else a regular expression with an alternative per value. (The proxy ANDs the
/// header matches of a rule, as a route match does.)
fn header_condition(p: &str, condition: &Condition, errors: &mut Errors) -> Option<ValueMatch> {
    let name = condition
        .key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'));
    let Some(name) = name.filter(|n| super::is_header_name(n)) else {
        errors.push(
            format!("{p}.key"),
            format!(
                "{:?} is not supported: only request.headers[<name>]",
                condition.key
            ),
        );
        return None;
    };
    if condition.values.is_empty() {
        errors.push(format!("{p}.values"), "give at least one value");
        return None;
    }
    let mut alternatives = Vec::new();
    for (i, value) in condition.values.iter().enumerate() {
        let body = value.strip_prefix('*').or_else(|| value.strip_suffix('*'));
        if body.unwrap_or(value).contains('*') || !super::is_header_value(value) {
            errors.push(
                format!("{p}.values[{i}]"),
                format!("{value:?} is not a header value, exact or with one leading or trailing *"),
            );
            continue;
        }
        alternatives.push(match (value.strip_prefix('*'), value.strip_suffix('*')) {
            _ if value == "*" => ".*".to_owned(),
            (Some(suffix), _) => format!(".*{}", regex::escape(suffix)),
            (None, Some(prefix)) => format!("{}.*", regex::escape(prefix)),
            (None, None) => regex::escape(value),
        });
    }
    let value = match condition.values.as_slice() {
        [one] if !one.contains('*') => StringMatch::Exact(one.clone()),
        // Anchored, so the whole value must match however the proxy compiles it.
        _ => StringMatch::Regex(format!("^(?:{})$", alternatives.join("|"))),
    };
    Some(ValueMatch {
        name: name.to_ascii_lowercase(),
        value,
    })
}
