//! The proxy's configuration: parsed once at start, shared as `Arc<ProxyConfig>`.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use trellis_identity::SpiffeId;

/// What to do with outbound connections to destinations the mesh does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Pass them through unchanged (Istio's ALLOW_ANY).
    #[value(name = "ALLOW_ANY")]
    AllowAny,
    /// Refuse them.
    #[value(name = "REGISTRY_ONLY")]
    RegistryOnly,
}

/// An explicit outbound listener, for environments without iptables:
/// `NAME.NAMESPACE:PORT=LISTEN_ADDR`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Upstream {
    /// `name.namespace`
    pub service: String,
    pub port: u16,
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "upstream {0:?} is not NAME.NAMESPACE:PORT=LISTEN_ADDR (e.g. echo.default:8080=127.0.0.1:18080)"
)]
pub struct UpstreamParseError(String);

impl FromStr for Upstream {
    type Err = UpstreamParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UpstreamParseError(s.to_owned());
        let (service, listen) = s.split_once('=').ok_or_else(err)?;
        let (service, port) = service.rsplit_once(':').ok_or_else(err)?;
        let (name, namespace) = service.split_once('.').ok_or_else(err)?;
        if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
            return Err(err());
        }
        Ok(Upstream {
            service: service.to_owned(),
            port: port.parse().map_err(|_| err())?,
            listen: listen.parse().map_err(|_| err())?,
        })
    }
}

/// Ports carried as opaque TCP without protocol detection unless a Service declares
/// otherwise: server-first and binary protocols, as in Linkerd's default (SMTP,
/// submission, MySQL, MySQL X / Galera, PostgreSQL, Redis, Elasticsearch transport,
/// memcached).
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// A comma-separated list of ports, e.g. `25,3306,8000-8010`; empty for none.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PortSet(std::collections::BTreeSet<u16>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("port list {list:?}: {entry:?} {reason}")]
pub struct PortSetParseError {
    list: String,
    entry: String,
    reason: &'static str,
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.contains(&port)
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().copied()
    }
}

impl PortSet {
    pub fn default_opaque() -> Self {
        DEFAULT_OPAQUE_PORTS.into_iter().collect()
    }
}

impl std::fmt::Display for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, port) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}

impl FromIterator<u16> for PortSet {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        PortSet(iter.into_iter().collect())
    }
}

impl FromStr for PortSet {
    type Err = PortSetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ports = std::collections::BTreeSet::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |reason| PortSetParseError {
                list: s.to_owned(),
                entry: entry.to_owned(),
                reason,
            };
            let port = |p: &str| match p.trim().parse::<u16>() {
                Ok(0) => Err(err("is not a port (0)")),
                Ok(p) => Ok(p),
                Err(_) => Err(err("is not a port number (1-65535)")),
            };
            match entry.split_once('-') {
                Some((low, high)) => {
                    let (low, high) = (port(low)?, port(high)?);
                    if low > high {
                        return Err(err("is an empty range"));
                    }
                    ports.extend(low..=high);
                }
                None => {
                    ports.insert(port(entry)?);
                }
            }
        }
        Ok(PortSet(ports))
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// This workload's identity; the CA decides whether it may have it.
    pub identity: SpiffeId,
    /// `host:port` of trellis-control's gRPC port.
    pub control_addr: String,
    /// The name in the control plane's serving certificate.
    pub control_server_name: String,
    /// Root(s) that sign the control plane's certificate (PEM).
    pub control_root_pem: String,
    /// Proof of identity for the CA (file registry).
    pub bootstrap_token: Option<String>,
    /// Projected service-account token (audience `trellis-ca`), the proof on
    /// Kubernetes when there is no bootstrap token. Read at every request: the
    /// kubelet rotates it.
    pub service_account_token_file: Option<std::path::PathBuf>,
    /// Requested certificate lifetime; the CA may shorten it.
    pub cert_ttl: Option<Duration>,
    /// mTLS listener for traffic to this workload (15006).
    pub inbound_addr: SocketAddr,
    /// Where inbound traffic goes when it was not redirected (on `app_port`), or
    /// with `inbound_to_localhost`; redirected traffic goes to its original
    /// destination (the pod address and port the caller dialed).
    pub app_host: std::net::IpAddr,
    pub app_port: Option<u16>,
    /// Transparent outbound listener (15001), when iptables redirects to it.
    pub outbound_addr: Option<SocketAddr>,
    pub upstreams: Vec<Upstream>,
    pub outbound_policy: OutboundPolicy,
    /// Health, metrics and app probes (15020, on the pod IP); off unless set.
    pub health_addr: Option<SocketAddr>,
    /// App probes the injector moved to the health port.
    pub app_probes: std::collections::HashMap<String, crate::health::AppProbe>,
    /// The app's own metrics endpoint, merged into the health port's `/metrics`.
    pub app_metrics: Option<crate::app_metrics::AppMetrics>,
    /// Admin (15000), 127.0.0.1 by default.
    pub admin_addr: SocketAddr,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long to wait for a client's first bytes before treating the connection
    /// as opaque TCP (server-first protocols send nothing first).
    pub detect_timeout: Duration,
    /// Outbound destination ports carried as opaque TCP without detection, unless
    /// the Service port declares a protocol.
    pub opaque_ports: PortSet,
    /// How inbound request paths are normalized before policy and the app see them.
    pub path_normalization: crate::http::normalize::PathNormalization,

    // Inbound destination and the limits of the proxy's own servers.
    /// Deliver redirected inbound traffic to the app on localhost instead of the pod
    /// address the caller dialed. Off by default, so a port the app bound to
    /// 127.0.0.1 only stays unreachable from the mesh (as in Istio 1.10+); the opt-in
    /// is for apps that listen only on localhost.
    pub inbound_to_localhost: bool,
    /// Header deadline and connection caps of the admin and health servers.
    pub http_server_limits: crate::http_server::ServerLimits,
    /// Access logs (one JSON line per request or TCP connection); off when `None`.
    pub access_log: Option<crate::access_log::AccessLogTarget>,
    /// Spans to an OTLP collector; off (no spans, headers untouched) when `None`.
    pub tracing: Option<crate::trace::TraceConfig>,
}

impl ProxyConfig {
    /// Defaults for everything but who the workload is and where the control plane is.
    pub fn new(identity: SpiffeId, control_addr: String, control_root_pem: String) -> Self {
        ProxyConfig {
            identity,
            control_addr,
            control_server_name: "trellis-control".to_owned(),
            control_root_pem,
            bootstrap_token: None,
            service_account_token_file: None,
            cert_ttl: None,
            inbound_addr: SocketAddr::from(([0, 0, 0, 0], crate::ports::INBOUND)),
            app_host: std::net::Ipv4Addr::LOCALHOST.into(),
            app_port: None,
            outbound_addr: None,
            upstreams: Vec::new(),
            outbound_policy: OutboundPolicy::AllowAny,
            health_addr: None,
            app_probes: Default::default(),
            app_metrics: None,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], crate::ports::ADMIN)),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            detect_timeout: Duration::from_secs(1),
            opaque_ports: PortSet::default_opaque(),
            path_normalization: Default::default(),
            inbound_to_localhost: false,
            http_server_limits: Default::default(),
            access_log: None,
            tracing: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstreams() {
        let u: Upstream = "echo.default:8080=127.0.0.1:18080".parse().unwrap();
        assert_eq!(u.service, "echo.default");
        assert_eq!(u.port, 8080);
        assert_eq!(u.listen, "127.0.0.1:18080".parse().unwrap());
        for bad in [
            "echo:8080=127.0.0.1:1",
            "echo.default=127.0.0.1:1",
            "echo.default:x=127.0.0.1:1",
            "echo.default:80",
            "echo.default:80=nowhere",
            ".default:80=127.0.0.1:1",
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_port_lists() {
        let set: PortSet = "25, 3306,8000-8002,25".parse().unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), [25, 3306, 8000, 8001, 8002]);
        assert!(set.contains(8001) && !set.contains(8003));
        assert_eq!("".parse::<PortSet>().unwrap(), PortSet::default());
        let default = PortSet::default_opaque();
        assert_eq!(default.to_string(), "25,587,3306,4444,5432,6379,9300,11211");
        assert_eq!(default.to_string().parse::<PortSet>().unwrap(), default);
        for (bad, reason) in [
            ("25,smtp", "\"smtp\" is not a port number"),
            ("70000", "\"70000\" is not a port number"),
            ("0", "\"0\" is not a port (0)"),
            ("9000-8000", "\"9000-8000\" is an empty range"),
            ("8000-", "\"8000-\" is not a port number"),
        ] {
            let e = bad.parse::<PortSet>().unwrap_err().to_string();
            assert!(e.contains(reason), "{bad}: {e}");
        }
    }
}
