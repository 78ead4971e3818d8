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
    /// Where inbound traffic goes: the app, on the original destination port, or on
    /// `app_port` when the connection was not redirected.
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
    /// Admin (15000), 127.0.0.1 by default.
    pub admin_addr: SocketAddr,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// How long to wait for a client's first bytes before treating the connection
    /// as opaque TCP (server-first protocols send nothing first).
    pub detect_timeout: Duration,
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
            admin_addr: SocketAddr::from(([127, 0, 0, 1], crate::ports::ADMIN)),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            detect_timeout: Duration::from_secs(1),
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
}
