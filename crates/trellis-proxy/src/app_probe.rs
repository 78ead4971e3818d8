//! The app's own probes, run by the proxy for the kubelet (which cannot speak mesh
//! mTLS, and whose TCP probe would otherwise be answered by the proxy itself). The
//! injector hands them over in `TRELLIS_APP_PROBES` (JSON: health path → the
//! original probe's handler and `timeoutSeconds`), and the proxy runs each over
//! loopback as the kubelet would have: `httpGet` (HTTP, or HTTPS without verifying
//! the certificate, as the kubelet does), `tcpSocket` (a connect), `grpc`
//! (`grpc.health.v1.Health/Check`, plaintext).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The kubelet's default `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One app probe as the injector passed it: exactly one handler is set.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    #[serde(default)]
    pub http_get: Option<HttpGet>,
    #[serde(default)]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default)]
    pub grpc: Option<Grpc>,
    /// The original probe's `timeoutSeconds` (the kubelet's default, 1, if absent).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: Option<String>,
    /// A number: the injector resolves named ports.
    pub port: u16,
    /// `HTTP` (default) or `HTTPS`.
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub http_headers: Vec<Header>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct TcpSocket {
    pub port: u16,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Grpc {
    pub port: u16,
    /// The service name asked about (`""`: the server as a whole).
    #[serde(default)]
    pub service: Option<String>,
}

/// Parses `TRELLIS_APP_PROBES`; a bad value is an error at start, not a silent gap.
pub fn parse_app_probes(json: &str) -> Result<HashMap<String, AppProbe>, serde_json::Error> {
    serde_json::from_str(json)
}

/// Runs the probe: `Ok` with what the app answered, or `Err` with why it failed.
pub async fn run(probe: &AppProbe) -> Result<String, String> {
    let timeout = probe
        .timeout_seconds
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let check = async {
        match (&probe.http_get, &probe.tcp_socket, &probe.grpc) {
            (Some(get), _, _) => http_get(get).await,
            (None, Some(tcp), _) => TcpStream::connect((LOOPBACK, tcp.port))
                .await
                .map(|_| format!("port {} accepted a connection", tcp.port))
                .map_err(|e| format!("connecting to port {}: {e}", tcp.port)),
            (None, None, Some(grpc)) => grpc_health(grpc).await,
            (None, None, None) => Err("the probe has no handler".to_owned()),
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// 2xx and 3xx pass, as with the kubelet.
async fn http_get(get: &HttpGet) -> Result<String, String> {
    let addr = SocketAddr::new(LOOPBACK, get.port);
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to port {}: {e}", get.port))?;
    let https = get
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("https"));
    let status = if https {
        let config = insecure_tls().map_err(|e| format!("TLS setup: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = connector
            .connect(ServerName::IpAddress(LOOPBACK.into()), tcp)
            .await
            .map_err(|e| format!("TLS handshake with port {}: {e}", get.port))?;
        send(tls, get, addr).await?
    } else {
        send(tcp, get, addr).await?
    };
    if status.is_success() || status.is_redirection() {
        Ok(format!("app answered {status}"))
    } else {
        Err(format!("app answered {status}"))
    }
}

async fn send<S>(stream: S, get: &HttpGet, addr: SocketAddr) -> Result<http::StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(connection);
    let path = get.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/");
    let mut request = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "kube-probe (trellis-proxy)");
    for h in &get.http_headers {
        request = request.header(h.name.as_str(), h.value.as_str());
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("probe request is invalid: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("probe request failed: {e}"))?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Ok(status)
}

async fn grpc_health(grpc: &Grpc) -> Result<String, String> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{LOOPBACK}:{}", grpc.port))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connecting to port {}: {e}", grpc.port))?;
    let request = HealthCheckRequest {
        service: grpc.service.clone().unwrap_or_default(),
    };
    let answer = HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|e| format!("health check failed: {}", e.code()))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok("SERVING".to_owned()),
        other => Err(format!("app is {}", other.as_str_name())),
    }
}

/// HTTPS probes verify nothing, as the kubelet's do: the app's certificate is the
/// app's business, the probe only asks whether it answers. (Built per probe: probes
/// come every few seconds at most.)
fn insecure_tls() -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = trellis_identity::crypto_provider();
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any certificate, but still checks the handshake's signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
