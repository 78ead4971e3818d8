//! HTTP routes of a Service (Gateway API `HTTPRoute` with a Service parent, GAMMA).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::ServiceKey;

/// Where a rule comes from; the last tie-breakers of the precedence order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouteOrigin {
    /// The HTTPRoute's namespace: the parent Service's (a producer route) or a
    /// client's (a consumer route, applied only to clients in that namespace).
    pub namespace: String,
    pub name: String,
    /// When the HTTPRoute was created, if known (Kubernetes); older routes win ties.
    pub created: Option<SystemTime>,
    /// Index of the rule in `spec.rules`.
    pub rule: usize,
    /// Index of the match in the rule's `matches`.
    pub match_index: usize,
}

/// One match of one rule of an HTTPRoute, attached to one parent Service.
///
/// Gateway API ranks matches, not rules, so a rule with several matches becomes
/// several `HttpRouteRule`s sharing everything but the match.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HttpRouteRule {
    pub origin: RouteOrigin,
    /// The parent Service port the rule applies to (`parentRefs[].port`); `None`: all.
    pub port: Option<u16>,
    pub request_match: HttpMatch,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    /// A request goes to one backend picked by weight. Empty: the parent Service.
    pub backends: Vec<WeightedBackend>,
    /// `timeouts.request`; `None`: no timeout.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`; `None`: no timeout.
    pub backend_request_timeout: Option<Duration>,
}

impl HttpRouteRule {
    /// `<namespace>/<route>/<rule-index>`, as telemetry names it.
    pub fn name(&self) -> String {
        let o = &self.origin;
        format!("{}/{}/{}", o.namespace, o.name, o.rule)
    }
}

/// A request matches when every part matches. A rule without matches in the
/// HTTPRoute gets the Gateway API default: path prefix `/`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HttpMatch {
    pub path: PathMatch,
    /// Header names in lower case.
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    /// An upper-case HTTP method; `None`: any.
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    /// Whole path segments: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    /// Matches the whole path (checked to compile).
    Regex(String),
}

impl PathMatch {
    pub fn value(&self) -> &str {
        match self {
            PathMatch::Exact(v) | PathMatch::Prefix(v) | PathMatch::Regex(v) => v,
        }
    }

    /// Exact before prefix before regular expression (as Istio ranks them).
    fn rank(&self) -> u8 {
        match self {
            PathMatch::Exact(_) => 3,
            PathMatch::Prefix(_) => 2,
            PathMatch::Regex(_) => 1,
        }
    }
}

/// A header or query parameter match.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ValueMatch {
    pub name: String,
    pub value: StringMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", content = "value")]
pub enum StringMatch {
    Exact(String),
    /// Matches the whole value (checked to compile).
    Regex(String),
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`; header names in lower case.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeaderModifier {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WeightedBackend {
    pub service: ServiceKey,
    /// A port of that Service.
    pub port: u16,
    pub weight: u32,
}

/// Sorts rules in Gateway API precedence order, the first matching rule winning:
/// exact path, then the longest prefix (then regex, longest first); then a method
/// match; then more header matches; then more query parameter matches; then the
/// oldest route, the route's namespace/name, the rule index and the match index.
pub fn sort_by_precedence(rules: &mut [HttpRouteRule]) {
    rules.sort_by(precedence);
}

fn precedence(a: &HttpRouteRule, b: &HttpRouteRule) -> Ordering {
    let (ma, mb) = (&a.request_match, &b.request_match);
    let specificity = |m: &HttpMatch| {
        (
            m.path.rank(),
            m.path.value().chars().count(),
            m.method.is_some(),
            m.headers.len(),
            m.query_params.len(),
        )
    };
    // More specific first.
    specificity(mb)
        .cmp(&specificity(ma))
        .then_with(|| origin_key(&a.origin).cmp(&origin_key(&b.origin)))
}

/// Known creation times first, oldest first; then by name.
fn origin_key(o: &RouteOrigin) -> (bool, Option<SystemTime>, &str, &str, usize, usize) {
    (
        o.created.is_none(),
        o.created,
        &o.namespace,
        &o.name,
        o.rule,
        o.match_index,
    )
}
