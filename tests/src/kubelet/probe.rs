//! Probes, run as the kubelet runs them: from the node namespace to the pod's IP.
//! httpGet (HTTP, or HTTPS without verifying the certificate), tcpSocket and grpc
//! (`grpc.health.v1`) honour `timeoutSeconds`; the caller applies `periodSeconds`,
//! thresholds and delays. `exec` probes run through the container's own wrapper.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::TcpStream;

/// The probe's settings with the kubelet's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Timing {
    pub fn of(probe: &Probe) -> Self {
        let secs = |v: Option<i32>, default: u64| {
            Duration::from_secs(v.map_or(default, |s| s.max(0) as u64))
        };
        Self {
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: probe.success_threshold.map_or(1, |s| s.max(1) as u32),
            failure_threshold: probe.failure_threshold.map_or(3, |s| s.max(1) as u32),
        }
    }
}

/// What kind of network check a probe makes (`exec` is handled by the caller).
pub enum Check {
    Network(NetworkCheck),
    Exec(Vec<String>),
}

pub enum NetworkCheck {
    Http {
        addr: SocketAddr,
        https: bool,
        host: String,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp(SocketAddr),
    Grpc {
        addr: SocketAddr,
        service: String,
    },
}

impl Check {
    /// Reads the probe's handler; named ports are looked up in the container's ports.
    pub fn of(probe: &Probe, container: &Container, pod_ip: Ipv4Addr) -> Result<Self> {
        if let Some(h) = &probe.http_get {
            let host: Ipv4Addr = match h.host.as_deref() {
                Some(h) if !h.is_empty() => h.parse().with_context(|| format!("probe host {h}"))?,
                _ => pod_ip,
            };
            let port = resolve_port(&h.port, container)?;
            let https = h
                .scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
            let headers: Vec<(String, String)> = h
                .http_headers
                .iter()
                .flatten()
                .map(|hh| (hh.name.clone(), hh.value.clone()))
                .collect();
            let host_header = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("host"))
                .map_or_else(|| format!("{host}:{port}"), |(_, v)| v.clone());
            let mut path = h.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
            return Ok(Check::Network(NetworkCheck::Http {
                addr: SocketAddr::from((host, port)),
                https,
                host: host_header,
                path,
                headers,
            }));
        }
        if let Some(t) = &probe.tcp_socket {
            let host: Ipv4Addr = match t.host.as_deref() {
                Some(h) if !h.is_empty() => h.parse().with_context(|| format!("probe host {h}"))?,
                _ => pod_ip,
            };
            return Ok(Check::Network(NetworkCheck::Tcp(SocketAddr::from((
                host,
                resolve_port(&t.port, container)?,
            )))));
        }
        if let Some(g) = &probe.grpc {
            let port = u16::try_from(g.port).map_err(|_| anyhow!("bad grpc port {}", g.port))?;
            return Ok(Check::Network(NetworkCheck::Grpc {
                addr: SocketAddr::from((pod_ip, port)),
                service: g.service.clone().unwrap_or_default(),
            }));
        }
        if let Some(e) = &probe.exec {
            return Ok(Check::Exec(e.command.clone().unwrap_or_default()));
        }
        bail!("probe has no handler")
    }
}

fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| anyhow!("bad port {p}")),
        IntOrString::String(name) => {
            if let Ok(p) = name.parse::<u16>() {
                return Ok(p);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| anyhow!("named port `{name}` not in the container's ports"))
        }
    }
}

/// Runs a network check once within `timeout`; `Err` says why it failed.
pub async fn run_network(check: &NetworkCheck, timeout: Duration) -> Result<()> {
    tokio::time::timeout(timeout, run_inner(check))
        .await
        .map_err(|_| anyhow!("timed out after {timeout:?}"))?
}

async fn run_inner(check: &NetworkCheck) -> Result<()> {
    match check {
        NetworkCheck::Tcp(addr) => {
            TcpStream::connect(addr).await?;
            Ok(())
        }
        NetworkCheck::Http {
            addr,
            https,
            host,
            path,
            headers,
        } => {
            let stream = TcpStream::connect(addr).await?;
            let status = if *https {
                let tls = tokio_rustls::TlsConnector::from(insecure_tls_config()?);
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let stream = tls.connect(name, stream).await.context("TLS handshake")?;
                http_get(stream, host, path, headers).await?
            } else {
                http_get(stream, host, path, headers).await?
            };
            if (200..400).contains(&status) {
                Ok(())
            } else {
                bail!("HTTP {status}")
            }
        }
        NetworkCheck::Grpc { addr, service } => {
            use tonic_health::pb::{
                HealthCheckRequest, health_check_response::ServingStatus,
                health_client::HealthClient,
            };
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await?;
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.clone(),
                })
                .await?;
            let status = answer.into_inner().status;
            if status == ServingStatus::Serving as i32 {
                Ok(())
            } else {
                bail!("grpc health status {status}")
            }
        }
    }
}

async fn http_get<S>(stream: S, host: &str, path: &str, headers: &[(String, String)]) -> Result<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::get(path)
        .header("host", host)
        .header("user-agent", "kube-probe/1.36")
        .header("accept", "*/*");
    for (name, value) in headers {
        if !name.eq_ignore_ascii_case("host") {
            req = req.header(name.as_str(), value.as_str());
        }
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    Ok(resp.status().as_u16())
}

/// The kubelet does not verify an HTTPS probe's certificate; neither does this.
fn insecure_tls_config() -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(2);

    async fn listener() -> Result<(TcpListener, SocketAddr)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        Ok((l, addr))
    }

    /// An HTTP/1 server answering `status` to everything, over TLS when `tls` is given.
    async fn http_server(
        status: u16,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<SocketAddr> {
        let (l, addr) = listener().await?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = l.accept().await {
                let svc =
                    hyper::service::service_fn(move |_req: hyper::Request<Incoming>| async move {
                        let mut resp = hyper::Response::new(Full::new(Bytes::from_static(b"x")));
                        *resp.status_mut() =
                            hyper::StatusCode::from_u16(status).unwrap_or_default();
                        Ok::<_, Infallible>(resp)
                    });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    fn http(addr: SocketAddr, https: bool) -> NetworkCheck {
        NetworkCheck::Http {
            addr,
            https,
            host: addr.to_string(),
            path: "/ready".into(),
            headers: vec![],
        }
    }

    fn self_signed_acceptor() -> Result<tokio_rustls::TlsAcceptor> {
        let cert = rcgen::generate_simple_self_signed(vec!["app.local".into()])?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    #[tokio::test]
    async fn tcp_probe_needs_a_listener() -> Result<()> {
        let (l, addr) = listener().await?;
        run_network(&NetworkCheck::Tcp(addr), T).await?;
        drop(l);
        assert!(run_network(&NetworkCheck::Tcp(addr), T).await.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn http_probe_judges_the_status() -> Result<()> {
        run_network(&http(http_server(200, None).await?, false), T).await?;
        run_network(&http(http_server(302, None).await?, false), T).await?;
        let err = run_network(&http(http_server(503, None).await?, false), T).await;
        assert!(format!("{:#}", err.err().context("503 passed")?).contains("503"));
        Ok(())
    }

    #[tokio::test]
    async fn https_probe_speaks_tls_without_verifying() -> Result<()> {
        let addr = http_server(200, Some(self_signed_acceptor()?)).await?;
        run_network(&http(addr, true), T).await?;
        // Plain HTTP to a TLS port fails, as the kubelet's would.
        assert!(run_network(&http(addr, false), T).await.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() -> Result<()> {
        // Accepts, never answers.
        let (l, addr) = listener().await?;
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let err = run_network(&http(addr, false), Duration::from_millis(300)).await;
        assert!(format!("{:#}", err.err().context("silent server passed")?).contains("timed out"));
        Ok(())
    }

    #[tokio::test]
    async fn grpc_probe_asks_the_health_service() -> Result<()> {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("ready", tonic_health::ServingStatus::NotServing)
            .await;
        let (l, addr) = listener().await?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let check = |service: &str| NetworkCheck::Grpc {
            addr,
            service: service.into(),
        };
        run_network(&check(""), T).await?;
        assert!(run_network(&check("ready"), T).await.is_err());
        reporter
            .set_service_status("ready", tonic_health::ServingStatus::Serving)
            .await;
        run_network(&check("ready"), T).await?;
        Ok(())
    }

    #[test]
    fn named_ports_and_defaults() -> Result<()> {
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "app",
            "ports": [{ "name": "http", "containerPort": 8080 }],
        }))?;
        let probe: Probe = serde_json::from_value(serde_json::json!({
            "httpGet": { "port": "http", "path": "healthz", "scheme": "HTTPS" },
        }))?;
        let ip = Ipv4Addr::new(10, 244, 128, 7);
        let Check::Network(NetworkCheck::Http {
            addr, https, path, ..
        }) = Check::of(&probe, &container, ip)?
        else {
            bail!("not an HTTP check");
        };
        assert_eq!(
            (addr, https, path.as_str()),
            (SocketAddr::from((ip, 8080)), true, "/healthz")
        );
        let t = Timing::of(&probe);
        assert_eq!(
            (t.period, t.timeout, t.failure_threshold),
            (Duration::from_secs(10), Duration::from_secs(1), 3)
        );
        let bad: Probe =
            serde_json::from_value(serde_json::json!({ "tcpSocket": { "port": "nope" } }))?;
        assert!(Check::of(&bad, &container, ip).is_err());
        Ok(())
    }
}
