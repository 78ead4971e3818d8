//! Zero-trust enforcement on the inbound side: who may call this workload
//! (AuthorizationPolicy) and whether callers must use mTLS (PeerAuthentication).
//! The caller's identity is the one its certificate proved; nothing else counts.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;
use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1 as pb;

#[derive(Debug, thiserror::Error)]
#[error("authorization policy {policy}: {reason}")]
pub struct AuthzError {
    pub policy: String,
    pub reason: String,
}

/// What is known of a request (or, at L4, of a connection).
pub struct RequestInfo<'a> {
    /// `None` for a plaintext caller (PERMISSIVE or DISABLE ports).
    pub peer: Option<&'a SpiffeId>,
    pub port: u16,
    /// `None` at L4: rules about methods, paths or headers cannot be checked.
    pub http: Option<HttpInfo<'a>>,
}

pub struct HttpInfo<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied; names the policy (and rule) that decided.
    Deny {
        policy: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug)]
struct Policy {
    name: String,
    action: Action,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    principals: Vec<Pattern>,
    namespaces: Vec<String>,
    ports: Vec<u16>,
    methods: Vec<Method>,
    paths: Vec<Pattern>,
    headers: Vec<(HeaderName, HeaderMatch)>,
}

#[derive(Debug)]
enum HeaderMatch {
    Exact(String),
    Regex(Regex),
}

/// Exact, `prefix*`, or `*suffix`; a lone `*` matches anything present.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, String> {
        let stars = text.matches('*').count();
        match (stars, text) {
            (0, _) => Ok(Pattern::Exact(text.to_owned())),
            (1, "*") => Ok(Pattern::Any),
            (1, t) if t.ends_with('*') => Ok(Pattern::Prefix(t[..t.len() - 1].to_owned())),
            (1, t) if t.starts_with('*') => Ok(Pattern::Suffix(t[1..].to_owned())),
            _ => Err(format!("{text:?}: a wildcard may only lead or trail, once")),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(p) => value == p,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            Pattern::Any => true,
        }
    }
}

impl Rule {
    fn has_l7(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.headers.is_empty()
    }

    /// At L4, L7 conditions cannot be checked: they count as matching in a DENY
    /// policy and as not matching in an ALLOW policy, so both fail closed.
    fn matches(&self, req: &RequestInfo<'_>, action: Action) -> bool {
        let peer = req.peer.map(ToString::to_string);
        if !self.principals.is_empty()
            && !peer
                .as_deref()
                .is_some_and(|p| self.principals.iter().any(|pat| pat.matches(p)))
        {
            return false;
        }
        if !self.namespaces.is_empty()
            && !req
                .peer
                .is_some_and(|p| self.namespaces.iter().any(|ns| ns == p.namespace()))
        {
            return false;
        }
        if !self.ports.is_empty() && !self.ports.contains(&req.port) {
            return false;
        }
        let Some(http) = &req.http else {
            return !self.has_l7() || action == Action::Deny;
        };
        if !self.methods.is_empty() && !self.methods.contains(http.method) {
            return false;
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|p| p.matches(http.path)) {
            return false;
        }
        self.headers.iter().all(|(name, want)| {
            http.headers.get_all(name).iter().any(|v| {
                v.to_str().is_ok_and(|v| match want {
                    HeaderMatch::Exact(e) => v == e,
                    HeaderMatch::Regex(r) => r.is_match(v),
                })
            })
        })
    }
}

/// A policy that did not compile. It is not dropped: it denies every request on the
/// ports it governs, so a typo never turns into allow-all.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RejectedPolicy {
    /// `namespace/name`
    pub name: String,
    pub reason: String,
    /// The ports its rules name, when every rule names some; `None`: all ports.
    pub ports: Option<Vec<u16>>,
    /// What is reported as the deciding policy of a denial.
    #[serde(skip)]
    denial: String,
}

impl RejectedPolicy {
    fn governs(&self, port: u16) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ports| ports.contains(&port))
    }
}

/// The policies that select this workload, compiled.
#[derive(Debug, Default)]
pub struct Authorizer {
    policies: Vec<Policy>,
    rejected: Vec<RejectedPolicy>,
}

/// The ports a policy's rules are about, if every rule names ports that are valid.
fn governed_ports(p: &pb::AuthorizationPolicy) -> Option<Vec<u16>> {
    if p.rules.is_empty() || p.rules.iter().any(|r| r.ports.is_empty()) {
        return None;
    }
    let mut ports = Vec::new();
    for port in p.rules.iter().flat_map(|r| &r.ports) {
        ports.push(u16::try_from(*port).ok()?);
    }
    ports.sort_unstable();
    ports.dedup();
    Some(ports)
}

fn compile_policy(p: &pb::AuthorizationPolicy, name: String) -> Result<Policy, AuthzError> {
    let err = |reason: String| AuthzError {
        policy: name.clone(),
        reason,
    };
    let action = match pb::authorization_policy::Action::try_from(p.action) {
        Ok(pb::authorization_policy::Action::Allow) => Action::Allow,
        Ok(pb::authorization_policy::Action::Deny) => Action::Deny,
        Err(_) => return Err(err(format!("unknown action {}", p.action))),
    };
    let mut rules = Vec::new();
    for r in &p.rules {
        let principals = r
            .principals
            .iter()
            .map(|s| Pattern::parse(s))
            .collect::<Result<_, _>>()
            .map_err(&err)?;
        let paths = r
            .paths
            .iter()
            .map(|s| Pattern::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        if paths.iter().any(|p| matches!(p, Pattern::Suffix(_))) {
            return Err(err("paths are exact or prefix (trailing *)".into()));
        }
        let ports = r
            .ports
            .iter()
            .map(|p| u16::try_from(*p).map_err(|_| err(format!("port {p}"))))
            .collect::<Result<_, _>>()?;
        let methods = r
            .methods
            .iter()
            .map(|m| Method::from_bytes(m.as_bytes()).map_err(|_| err(format!("method {m:?}"))))
            .collect::<Result<_, _>>()?;
        let mut headers = Vec::new();
        for h in &r.headers {
            let header = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| err(format!("header {:?}", h.name)))?;
            let want = if h.regex {
                HeaderMatch::Regex(
                    Regex::new(&format!("^(?:{})$", h.value))
                        .map_err(|e| err(format!("header regex {:?}: {e}", h.value)))?,
                )
            } else {
                HeaderMatch::Exact(h.value.clone())
            };
            headers.push((header, want));
        }
        rules.push(Rule {
            principals,
            namespaces: r.namespaces.clone(),
            ports,
            methods,
            paths,
            headers,
        });
    }
    Ok(Policy {
        name,
        action,
        rules,
    })
}

impl Authorizer {
    /// Compiles every policy; the first that does not compile is the error. For
    /// enforcement use [`Authorizer::compile_each`], which keeps the others.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a pb::AuthorizationPolicy>,
    ) -> Result<Self, AuthzError> {
        let authorizer = Self::compile_each(policies);
        match authorizer.rejected.first() {
            Some(r) => Err(AuthzError {
                policy: r.name.clone(),
                reason: r.reason.clone(),
            }),
            None => Ok(authorizer),
        }
    }

    /// Compiles each policy on its own. One that does not compile is kept as a
    /// [`RejectedPolicy`]: it denies every request on the ports it governs (all ports
    /// when they cannot be told), and a rejected ALLOW policy still counts as an ALLOW
    /// policy that matches nothing. Fail closed: never allow-all by accident.
    pub fn compile_each<'a>(
        policies: impl IntoIterator<Item = &'a pb::AuthorizationPolicy>,
    ) -> Self {
        let mut compiled = Vec::new();
        let mut rejected = Vec::new();
        for p in policies {
            let name = format!("{}/{}", p.namespace, p.name);
            match compile_policy(p, name.clone()) {
                Ok(policy) => compiled.push(policy),
                Err(e) => {
                    // Any action but an explicit DENY may have been an ALLOW: keep
                    // its presence so requests must still match another ALLOW.
                    if p.action != pb::authorization_policy::Action::Deny as i32 {
                        compiled.push(Policy {
                            name: name.clone(),
                            action: Action::Allow,
                            rules: Vec::new(),
                        });
                    }
                    rejected.push(RejectedPolicy {
                        denial: format!("{name} (rejected: does not compile)"),
                        name,
                        reason: e.reason,
                        ports: governed_ports(p),
                    });
                }
            }
        }
        // Deterministic order: the first matching DENY is the one reported.
        compiled.sort_by(|a, b| a.name.cmp(&b.name));
        rejected.sort_by(|a, b| a.name.cmp(&b.name));
        Authorizer {
            policies: compiled,
            rejected,
        }
    }

    /// The policies that did not compile, and why.
    pub fn rejected(&self) -> &[RejectedPolicy] {
        &self.rejected
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.rejected.is_empty()
    }

    /// Rejected policies first (they deny on their ports), then DENY policies; then,
    /// if any ALLOW policy selects the workload, the request must match one of them.
    pub fn decide(&self, req: &RequestInfo<'_>) -> Decision {
        if let Some(r) = self.rejected.iter().find(|r| r.governs(req.port)) {
            return Decision::Deny {
                policy: r.denial.clone(),
            };
        }
        for p in self.policies.iter().filter(|p| p.action == Action::Deny) {
            if p.rules.iter().any(|r| r.matches(req, Action::Deny)) {
                return Decision::Deny {
                    policy: p.name.clone(),
                };
            }
        }
        let mut allows = self
            .policies
            .iter()
            .filter(|p| p.action == Action::Allow)
            .peekable();
        if allows.peek().is_none() {
            return Decision::Allow;
        }
        let mut names = Vec::new();
        for p in allows {
            if p.rules.iter().any(|r| r.matches(req, Action::Allow)) {
                return Decision::Allow;
            }
            names.push(p.name.as_str());
        }
        Decision::Deny {
            policy: format!("no ALLOW policy matched ({})", names.join(", ")),
        }
    }
}

/// How a port takes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MtlsMode {
    /// mTLS only; plaintext is refused.
    Strict,
    /// mTLS from meshed callers and plaintext from others, told apart by the first bytes.
    Permissive,
    /// Plaintext; nothing is terminated.
    Disable,
}

/// The effective PeerAuthentication of this workload.
#[derive(Debug, Clone)]
pub struct PeerAuth {
    default: MtlsMode,
    ports: Vec<(u16, MtlsMode)>,
}

impl Default for PeerAuth {
    /// Secure by default: STRICT.
    fn default() -> Self {
        PeerAuth {
            default: MtlsMode::Strict,
            ports: Vec::new(),
        }
    }
}

fn mode(m: i32) -> Option<MtlsMode> {
    match pb::peer_authentication::Mode::try_from(m) {
        Ok(pb::peer_authentication::Mode::Strict) => Some(MtlsMode::Strict),
        Ok(pb::peer_authentication::Mode::Permissive) => Some(MtlsMode::Permissive),
        Ok(pb::peer_authentication::Mode::Disable) => Some(MtlsMode::Disable),
        _ => None,
    }
}

impl PeerAuth {
    pub fn compile(p: &pb::PeerAuthentication) -> Self {
        PeerAuth {
            default: mode(p.mode).unwrap_or(MtlsMode::Strict),
            ports: p
                .port_modes
                .iter()
                .filter_map(|(port, m)| Some((u16::try_from(*port).ok()?, mode(*m)?)))
                .collect(),
        }
    }

    pub fn mode(&self, port: u16) -> MtlsMode {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, m)| *m)
            .unwrap_or(self.default)
    }
}

/// Shared by the inbound side: swapped whole when discovery changes them.
#[derive(Debug, Default, Clone)]
pub struct InboundPolicy {
    pub authorizer: Arc<Authorizer>,
    pub peer_auth: PeerAuth,
    /// Whether discovery has answered both AuthorizationPolicy and PeerAuthentication
    /// with a response the proxy accepted. Until then the inbound listener refuses
    /// every connection: no policy yet means deny, not allow.
    pub accepted: bool,
}

#[cfg(test)]
mod tests;
