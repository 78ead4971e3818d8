//! Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1): the subset the mesh
//! reads, GAMMA style (a Service as parent). Owned here rather than taken from the
//! `gateway-api` crate, so the control plane pins neither its version nor its
//! Kubernetes dependencies.
//!
//! ```yaml
//! apiVersion: gateway.networking.k8s.io/v1
//! kind: HTTPRoute
//! metadata: {name: echo-canary, namespace: demo}
//! spec:
//!   parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
//!   rules:
//!   - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: x-canary, value: "1"}]}]
//!     filters:
//!     - type: RequestHeaderModifier
//!       requestHeaderModifier: {set: [{name: x-route, value: canary}]}
//!     backendRefs: [{name: echo-v2, port: 8080, weight: 90}, {name: echo, port: 8080, weight: 10}]
//!     timeouts: {request: 10s, backendRequest: 2s}
//! ```
//!
//! Only parents of kind Service (group `""` or `core`) matter; other parents (a
//! Gateway) belong to another controller and are skipped. A route in the parent's
//! namespace is a producer route (for every client); a route in another namespace
//! is a consumer route, for clients in its own namespace only, which then ignore the
//! producer routes. `hostnames` is accepted and ignored, as GAMMA says.

use std::collections::BTreeSet;
use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use serde::{Deserialize, Serialize};

use super::{
    Errors, FieldError, Services, check_regex, is_header_name, is_header_value, name_of,
    namespace_of,
};
use crate::model::{self, ServiceKey, StringMatch, ValueMatch};

/// The object. See the module docs of [`super`] for why it is written by hand.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: HttpRouteSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HttpRouteStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentReference>,
    /// Ignored for Service parents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Default: one rule matching every request, to the parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HttpRouteRule>,
}

/// Defaults as Gateway API's: group `gateway.networking.k8s.io`, kind `Gateway`, the
/// route's namespace. For a Service: group `""` (or `core`), kind `Service`, and
/// optionally the Service `port` the route is for (unset: every port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// Gateway listeners only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Any match selects the rule. Default: path prefix `/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted split. Empty: the parent Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// Every part given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Default: `PathPrefix` `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HttpQueryParamMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// Default `PathPrefix`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<PathMatchType>,
    /// Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    /// Whole path segments: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    PathPrefix,
    /// Matches the whole path (Rust `regex` syntax).
    RegularExpression,
}

/// Header names are case-insensitive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderMatch {
    /// Default `Exact`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<ValueMatchType>,
    pub name: String,
    pub value: String,
}

/// Query parameter names are exact (case-sensitive).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpQueryParamMatch {
    /// Default `Exact`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<ValueMatchType>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    Exact,
    /// Matches the whole value (Rust `regex` syntax).
    RegularExpression,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }
}

/// Only the header modifiers; the field named by `type` must be set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub type_: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HttpHeaderFilter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
}

/// Applied in this order: remove, set (replace), add (append).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeaderFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// A Service: group `""` (or `core`), kind `Service` (the defaults), and its `port`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// Default: the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Required: a port of that Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 0 to 1000000; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Durations; unset or `0s`: none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Each attempt to a backend; at most `request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// Gateway API route status: conditions per parent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteStatus {
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: ParentReference,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// An HTTPRoute resolved against the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedRoute {
    /// Per Service parent, one rule per (rule, match), unsorted.
    pub rules: Vec<(ServiceKey, model::HttpRouteRule)>,
    /// Parents skipped because they are not Services: for status, not errors.
    pub ignored_parents: Vec<FieldError>,
}

const MAX_WEIGHT: u32 = 1_000_000;

impl HttpRoute {
    pub fn new(name: &str, spec: HttpRouteSpec) -> Self {
        HttpRoute {
            api_version: super::GATEWAY_API_VERSION.to_owned(),
            kind: "HTTPRoute".to_owned(),
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }

    /// Checks values, not references.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        self.to_model(None).map(|_| ())
    }

    /// The rules for each Service parent. With `services`, parents and backends must
    /// be Services there, with the ports named.
    pub fn to_model(&self, services: Services<'_>) -> Result<ResolvedRoute, Vec<FieldError>> {
        let mut errors = Errors::default();
        let name = name_of(&self.metadata, &mut errors).to_owned();
        let namespace = namespace_of(&self.metadata).to_owned();
        let mut resolved = ResolvedRoute::default();
        let mut parents = Vec::new();
        for (i, parent) in self.spec.parent_refs.iter().enumerate() {
            let p = format!("spec.parentRefs[{i}]");
            let group = parent
                .group
                .as_deref()
                .unwrap_or("gateway.networking.k8s.io");
            let kind = parent.kind.as_deref().unwrap_or("Gateway");
            if !(matches!(group, "" | "core") && kind == "Service") {
                resolved.ignored_parents.push(FieldError {
                    field: p,
                    reason: format!("{group}/{kind} {} is not a Service: skipped", parent.name),
                });
                continue;
            }
            if parent.section_name.is_some() {
                errors.push(
                    format!("{p}.sectionName"),
                    "is not supported for a Service: use port",
                );
            }
            let key = ServiceKey {
                namespace: parent
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone()),
                name: parent.name.clone(),
            };
            if let Some(reason) = check_service(services, &key, parent.port, true) {
                errors.push(p, reason);
            }
            if !parents.contains(&(key.clone(), parent.port)) {
                parents.push((key, parent.port));
            }
        }
        let created = self
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0));
        let default_rule = [HttpRouteRule::default()];
        let rules = match self.spec.rules.as_slice() {
            [] => &default_rule[..],
            rules => rules,
        };
        for (r, rule) in rules.iter().enumerate() {
            let p = format!("spec.rules[{r}]");
            let Some(shared) = rule_body(&p, rule, &namespace, services, &mut errors) else {
                continue;
            };
            let default_match = [HttpRouteMatch::default()];
            let matches = match rule.matches.as_slice() {
                [] => &default_match[..],
                matches => matches,
            };
            for (m, request_match) in matches.iter().enumerate() {
                let p = format!("{p}.matches[{m}]");
                let Some(request_match) = http_match(&p, request_match, &mut errors) else {
                    continue;
                };
                for (parent, port) in &parents {
                    let mut rule = shared.clone();
                    rule.origin = model::RouteOrigin {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        created,
                        rule: r,
                        match_index: m,
                    };
                    rule.port = *port;
                    rule.request_match = request_match.clone();
                    resolved.rules.push((parent.clone(), rule));
                }
            }
        }
        errors.into_result(resolved)
    }
}

/// Why `key` (and `port`) is not a Service (port) in `services`, if known.
fn check_service(
    services: Services<'_>,
    key: &ServiceKey,
    port: Option<u16>,
    parent: bool,
) -> Option<String> {
    let services = services?;
    let what = if parent { "parent" } else { "backend" };
    let Some(service) = services.get(key) else {
        return Some(format!("{what} Service {key} does not exist"));
    };
    let port = port?;
    if service.ports.iter().any(|p| p.port == port) {
        None
    } else {
        Some(format!("{what} Service {key} has no port {port}"))
    }
}

/// Everything of a rule but its match (and where it attaches).
fn rule_body(
    p: &str,
    rule: &HttpRouteRule,
    namespace: &str,
    services: Services<'_>,
    errors: &mut Errors,
) -> Option<model::HttpRouteRule> {
    let before = errors.0.len();
    let (mut request_headers, mut response_headers) = (None, None);
    for (i, filter) in rule.filters.iter().enumerate() {
        let p = format!("{p}.filters[{i}]");
        let (slot, given, other, field) = match filter.type_ {
            FilterType::RequestHeaderModifier => (
                &mut request_headers,
                &filter.request_header_modifier,
                &filter.response_header_modifier,
                "requestHeaderModifier",
            ),
            FilterType::ResponseHeaderModifier => (
                &mut response_headers,
                &filter.response_header_modifier,
                &filter.request_header_modifier,
                "responseHeaderModifier",
            ),
        };
        if other.is_some() {
            errors.push(
                p.clone(),
                format!("only {field} goes with type {:?}", filter.type_),
            );
        }
        let Some(given) = given else {
            errors.push(
                format!("{p}.{field}"),
                format!("is required with type {:?}", filter.type_),
            );
            continue;
        };
        if slot.is_some() {
            errors.push(
                format!("{p}.type"),
                format!("{:?} is given twice", filter.type_),
            );
            continue;
        }
        *slot = Some(header_modifier(&format!("{p}.{field}"), given, errors));
    }
    let mut backends = Vec::new();
    for (i, b) in rule.backend_refs.iter().enumerate() {
        let p = format!("{p}.backendRefs[{i}]");
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        if !(matches!(group, "" | "core") && kind == "Service") {
            errors.push(
                p,
                format!("{group}/{kind} is not supported: only Service backends"),
            );
            continue;
        }
        let Some(port) = b.port.filter(|p| *p > 0) else {
            errors.push(format!("{p}.port"), "is required for a Service (1-65535)");
            continue;
        };
        let weight = b.weight.unwrap_or(1);
        if weight > MAX_WEIGHT {
            errors.push(
                format!("{p}.weight"),
                format!("{weight} is over {MAX_WEIGHT}"),
            );
        }
        let service = ServiceKey {
            namespace: b.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
            name: b.name.clone(),
        };
        if let Some(reason) = check_service(services, &service, Some(port), false) {
            errors.push(p, reason);
        }
        backends.push(model::WeightedBackend {
            service,
            port,
            weight,
        });
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        errors.push(
            format!("{p}.backendRefs"),
            "every weight is 0: nothing would be served",
        );
    }
    let timeouts = rule.timeouts.clone().unwrap_or_default();
    let nonzero = |d: Option<std::time::Duration>| d.filter(|d| !d.is_zero());
    let request_timeout = nonzero(errors.duration(
        &format!("{p}.timeouts.request"),
        timeouts.request.as_deref(),
    ));
    let backend_request_timeout = nonzero(errors.duration(
        &format!("{p}.timeouts.backendRequest"),
        timeouts.backend_request.as_deref(),
    ));
    if let (Some(request), Some(backend)) = (request_timeout, backend_request_timeout)
        && backend > request
    {
        errors.push(
            format!("{p}.timeouts.backendRequest"),
            "must not be more than timeouts.request",
        );
    }
    if errors.0.len() > before {
        return None;
    }
    Some(model::HttpRouteRule {
        origin: model::RouteOrigin {
            namespace: String::new(),
            name: String::new(),
            created: None,
            rule: 0,
            match_index: 0,
        },
        port: None,
        request_match: model::HttpMatch {
            path: model::PathMatch::Prefix("/".to_owned()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        },
        request_headers: request_headers.unwrap_or_default(),
        response_headers: response_headers.unwrap_or_default(),
        backends,
        request_timeout,
        backend_request_timeout,
    })
}

fn header_modifier(p: &str, f: &HttpHeaderFilter, errors: &mut Errors) -> model::HeaderModifier {
    let mut out = model::HeaderModifier::default();
    for (list, headers, into) in [("set", &f.set, &mut out.set), ("add", &f.add, &mut out.add)] {
        for (i, h) in headers.iter().enumerate() {
            let name = h.name.to_ascii_lowercase();
            if !is_header_name(&h.name) {
                errors.push(
                    format!("{p}.{list}[{i}].name"),
                    format!("{:?} is not a header name", h.name),
                );
            } else if into.contains_key(&name) {
                errors.push(
                    format!("{p}.{list}[{i}].name"),
                    format!("{:?} is given twice", h.name),
                );
            }
            if !is_header_value(&h.value) {
                errors.push(
                    format!("{p}.{list}[{i}].value"),
                    format!("{:?} is not a header value", h.value),
                );
            }
            into.insert(name, h.value.clone());
        }
    }
    let mut seen = BTreeSet::new();
    for (i, name) in f.remove.iter().enumerate() {
        if !is_header_name(name) {
            errors.push(
                format!("{p}.remove[{i}]"),
                format!("{name:?} is not a header name"),
            );
        } else if !seen.insert(name.to_ascii_lowercase()) {
            errors.push(
                format!("{p}.remove[{i}]"),
                format!("{name:?} is given twice"),
            );
        }
    }
    out.remove = seen.into_iter().collect();
    out
}

fn http_match(p: &str, m: &HttpRouteMatch, errors: &mut Errors) -> Option<model::HttpMatch> {
    let before = errors.0.len();
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.unwrap_or_else(|| "/".to_owned());
    let field = format!("{p}.path.value");
    let path = match path.type_.unwrap_or(PathMatchType::PathPrefix) {
        PathMatchType::Exact | PathMatchType::PathPrefix if !value.starts_with('/') => {
            errors.push(field, format!("{value:?} must start with /"));
            model::PathMatch::Prefix(value)
        }
        PathMatchType::Exact => model::PathMatch::Exact(value),
        PathMatchType::PathPrefix => model::PathMatch::Prefix(value),
        PathMatchType::RegularExpression => {
            if let Err(reason) = check_regex(&value) {
                errors.push(field, reason);
            }
            model::PathMatch::Regex(value)
        }
    };
    let mut headers: Vec<ValueMatch> = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let p = format!("{p}.headers[{i}]");
        let name = h.name.to_ascii_lowercase();
        if !is_header_name(&h.name) {
            errors.push(
                format!("{p}.name"),
                format!("{:?} is not a header name", h.name),
            );
        } else if headers.iter().any(|v| v.name == name) {
            errors.push(
                format!("{p}.name"),
                format!("{:?} is matched twice", h.name),
            );
        }
        let value = value_match(&format!("{p}.value"), h.type_, &h.value, errors);
        headers.push(ValueMatch { name, value });
    }
    let mut query_params: Vec<ValueMatch> = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let p = format!("{p}.queryParams[{i}]");
        if q.name.is_empty() || q.name.contains(['&', '=', '#']) {
            errors.push(
                format!("{p}.name"),
                format!("{:?} is not a query parameter name", q.name),
            );
        } else if query_params.iter().any(|v| v.name == q.name) {
            errors.push(
                format!("{p}.name"),
                format!("{:?} is matched twice", q.name),
            );
        }
        let value = value_match(&format!("{p}.value"), q.type_, &q.value, errors);
        query_params.push(ValueMatch {
            name: q.name.clone(),
            value,
        });
    }
    if errors.0.len() > before {
        return None;
    }
    Some(model::HttpMatch {
        path,
        headers,
        query_params,
        method: m.method.map(|m| m.as_str().to_owned()),
    })
}

fn value_match(
    field: &str,
    type_: Option<ValueMatchType>,
    value: &str,
    errors: &mut Errors,
) -> StringMatch {
    match type_.unwrap_or(ValueMatchType::Exact) {
        ValueMatchType::Exact => {
            if !is_header_value(value) {
                errors.push(
                    field,
                    format!("{value:?} has characters that cannot be matched"),
                );
            }
            StringMatch::Exact(value.to_owned())
        }
        ValueMatchType::RegularExpression => {
            if let Err(reason) = check_regex(value) {
                errors.push(field, reason);
            }
            StringMatch::Regex(value.to_owned())
        }
    }
}
