//! HTTPRoute rules (GAMMA: a Service as parent), compiled once per update: regexes
//! built, header names parsed. Matching is allocation-free.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};
use regex::Regex;
use trellis_proto::discovery::v1 as pb;

#[derive(Debug, thiserror::Error)]
#[error("route {route}: {reason}")]
pub struct RouteError {
    pub route: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct RouteTable {
    pub rules: Vec<RouteRule>,
}

#[derive(Debug)]
pub struct RouteRule {
    /// Shared, so request metrics keep it without copying.
    pub name: std::sync::Arc<str>,
    /// 0: every port.
    pub port: u16,
    pub matches: Vec<Match>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// (service "name.namespace", port, weight); empty: the parent service.
    pub backends: Vec<Backend>,
    pub total_weight: u32,
    pub request_timeout: Option<Duration>,
    pub backend_request_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub service: String,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug)]
pub struct Match {
    path: Option<PathMatch>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug, Default)]
pub struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

fn anchored(route: &str, pattern: &str) -> Result<Regex, RouteError> {
    // Gateway API regexes match the whole value.
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| RouteError {
        route: route.to_owned(),
        reason: format!("regex {pattern:?}: {e}"),
    })
}

fn header_pair(
    route: &str,
    name: &str,
    value: &str,
) -> Result<(HeaderName, HeaderValue), RouteError> {
    let err = |what: &str| RouteError {
        route: route.to_owned(),
        reason: format!("header {what} {name:?}: {value:?} is not valid"),
    };
    Ok((
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| err("name"))?,
        HeaderValue::from_str(value).map_err(|_| err("value"))?,
    ))
}

fn edits(route: &str, m: Option<&pb::HeaderModifier>) -> Result<HeaderEdits, RouteError> {
    let Some(m) = m else {
        return Ok(HeaderEdits::default());
    };
    let mut edits = HeaderEdits::default();
    for (name, value) in &m.set {
        edits.set.push(header_pair(route, name, value)?);
    }
    for (name, value) in &m.add {
        edits.add.push(header_pair(route, name, value)?);
    }
    for name in &m.remove {
        edits.remove.push(header_pair(route, name, "")?.0);
    }
    Ok(edits)
}

fn value_match(route: &str, v: &pb::ValueMatch) -> Result<ValueMatch, RouteError> {
    Ok(if v.regex {
        ValueMatch::Regex(anchored(route, &v.value)?)
    } else {
        ValueMatch::Exact(v.value.clone())
    })
}

impl RouteTable {
    pub fn compile(table: &pb::RouteTable) -> Result<Self, RouteError> {
        let mut rules = Vec::with_capacity(table.routes.len());
        for r in &table.routes {
            let name = r.name.as_str();
            let err = |reason: String| RouteError {
                route: name.to_owned(),
                reason,
            };
            let mut matches = Vec::with_capacity(r.matches.len());
            for m in &r.matches {
                let path = match &m.path {
                    None => None,
                    Some(p) => Some(match pb::path_match::Kind::try_from(p.kind) {
                        Ok(pb::path_match::Kind::Exact) => PathMatch::Exact(p.value.clone()),
                        Ok(pb::path_match::Kind::Prefix) => PathMatch::Prefix(p.value.clone()),
                        Ok(pb::path_match::Kind::Regex) => {
                            PathMatch::Regex(anchored(name, &p.value)?)
                        }
                        Err(_) => return Err(err(format!("unknown path match kind {}", p.kind))),
                    }),
                };
                let mut headers = Vec::new();
                for h in &m.headers {
                    let header = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| err(format!("header name {:?}", h.name)))?;
                    headers.push((header, value_match(name, h)?));
                }
                let mut query = Vec::new();
                for q in &m.query_params {
                    query.push((q.name.clone(), value_match(name, q)?));
                }
                let method = if m.method.is_empty() {
                    None
                } else {
                    Some(
                        Method::from_bytes(m.method.as_bytes())
                            .map_err(|_| err(format!("method {:?}", m.method)))?,
                    )
                };
                matches.push(Match {
                    path,
                    headers,
                    query,
                    method,
                });
            }
            let mut backends = Vec::new();
            for b in &r.backends {
                let port = u16::try_from(b.port)
                    .map_err(|_| err(format!("backend port {} is out of range", b.port)))?;
                backends.push(Backend {
                    service: format!("{}.{}", b.service, b.namespace),
                    port,
                    weight: b.weight,
                });
            }
            let total_weight = backends.iter().map(|b| b.weight).sum();
            if !backends.is_empty() && total_weight == 0 {
                return Err(err("every backend has weight 0".to_owned()));
            }
            let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
            rules.push(RouteRule {
                name: r.name.as_str().into(),
                port: u16::try_from(r.port).map_err(|_| err(format!("port {}", r.port)))?,
                matches,
                request_headers: edits(name, r.request_headers.as_ref())?,
                response_headers: edits(name, r.response_headers.as_ref())?,
                backends,
                total_weight,
                request_timeout: ms(r.request_timeout_ms),
                backend_request_timeout: ms(r.backend_request_timeout_ms),
            });
        }
        Ok(RouteTable { rules })
    }

    /// The first rule (in precedence order) matching the request on `port`.
    pub fn find<B>(&self, port: u16, req: &Request<B>) -> Option<&RouteRule> {
        self.rules
            .iter()
            .filter(|r| r.port == 0 || r.port == port)
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
    }
}

impl Match {
    fn matches<B>(&self, req: &Request<B>) -> bool {
        if let Some(method) = &self.method
            && req.method() != method
        {
            return false;
        }
        let path = req.uri().path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => path == p,
            Some(PathMatch::Prefix(p)) => prefix_matches(path, p),
            Some(PathMatch::Regex(r)) => r.is_match(path),
        };
        if !path_ok {
            return false;
        }
        for (name, want) in &self.headers {
            let found = req
                .headers()
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| want.matches(v)));
            if !found {
                return false;
            }
        }
        if !self.query.is_empty() {
            let query = req.uri().query().unwrap_or("");
            for (name, want) in &self.query {
                let found = query
                    .split('&')
                    .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                    .any(|(k, v)| k == name && want.matches(v));
                if !found {
                    return false;
                }
            }
        }
        true
    }
}

/// Gateway API PathPrefix matches whole path elements: "/foo" matches "/foo" and
/// "/foo/bar", not "/foobar".
fn prefix_matches(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl RouteRule {
    /// Picks a backend by weight.
    pub fn pick_backend(&self) -> Option<&Backend> {
        if self.backends.is_empty() {
            return None;
        }
        let mut n = rand::random_range(0..self.total_weight);
        for b in &self.backends {
            if n < b.weight {
                return Some(b);
            }
            n -= b.weight;
        }
        self.backends.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: Vec<pb::HttpRoute>) -> RouteTable {
        RouteTable::compile(&pb::RouteTable {
            service: "echo".into(),
            namespace: "default".into(),
            routes,
        })
        .unwrap()
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn route(name: &str, m: pb::HttpMatch) -> pb::HttpRoute {
        pb::HttpRoute {
            name: name.into(),
            matches: vec![m],
            ..Default::default()
        }
    }

    #[test]
    fn matches_path_header_query_and_method() {
        let t = table(vec![
            route(
                "exact",
                pb::HttpMatch {
                    path: Some(pb::PathMatch {
                        kind: pb::path_match::Kind::Exact as i32,
                        value: "/a".into(),
                    }),
                    ..Default::default()
                },
            ),
            route(
                "header",
                pb::HttpMatch {
                    headers: vec![pb::ValueMatch {
                        name: "x-canary".into(),
                        value: "yes".into(),
                        regex: false,
                    }],
                    ..Default::default()
                },
            ),
            route(
                "query",
                pb::HttpMatch {
                    query_params: vec![pb::ValueMatch {
                        name: "v".into(),
                        value: "[0-9]+".into(),
                        regex: true,
                    }],
                    ..Default::default()
                },
            ),
            route(
                "post",
                pb::HttpMatch {
                    method: "POST".into(),
                    ..Default::default()
                },
            ),
            route(
                "prefix",
                pb::HttpMatch {
                    path: Some(pb::PathMatch {
                        kind: pb::path_match::Kind::Prefix as i32,
                        value: "/api/".into(),
                    }),
                    ..Default::default()
                },
            ),
        ]);
        let name = |r: Request<()>| t.find(80, &r).map(|r| &*r.name);
        assert_eq!(name(req("GET", "/a", &[])), Some("exact"));
        assert_eq!(
            name(req("GET", "/b", &[("x-canary", "yes")])),
            Some("header")
        );
        assert_eq!(name(req("GET", "/b?v=12", &[])), Some("query"));
        assert_eq!(name(req("GET", "/b?v=x", &[])), None);
        assert_eq!(name(req("POST", "/b", &[])), Some("post"));
        assert_eq!(name(req("GET", "/api", &[])), Some("prefix"));
        assert_eq!(name(req("GET", "/api/x", &[])), Some("prefix"));
        assert_eq!(name(req("GET", "/apix", &[])), None);
    }

    #[test]
    fn weighted_split_follows_weights() {
        let t = table(vec![pb::HttpRoute {
            name: "split".into(),
            backends: vec![
                pb::WeightedBackend {
                    service: "v1".into(),
                    namespace: "default".into(),
                    port: 80,
                    weight: 90,
                },
                pb::WeightedBackend {
                    service: "v2".into(),
                    namespace: "default".into(),
                    port: 80,
                    weight: 10,
                },
            ],
            ..Default::default()
        }]);
        let rule = t.find(80, &req("GET", "/", &[])).unwrap();
        let v1 = (0..10_000)
            .filter(|_| rule.pick_backend().unwrap().service == "v1.default")
            .count();
        assert!((8_700..=9_300).contains(&v1), "{v1}");
    }

    #[test]
    fn bad_regex_is_refused() {
        let err = RouteTable::compile(&pb::RouteTable {
            service: "echo".into(),
            namespace: "default".into(),
            routes: vec![route(
                "bad",
                pb::HttpMatch {
                    path: Some(pb::PathMatch {
                        kind: pb::path_match::Kind::Regex as i32,
                        value: "(".into(),
                    }),
                    ..Default::default()
                },
            )],
        })
        .unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
    }
}
