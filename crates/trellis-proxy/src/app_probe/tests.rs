//! Each probe kind against a real app on a loopback socket, passing and failing.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic_health::ServingStatus as ReportedStatus;

use super::*;

fn probe(json: &str) -> AppProbe {
    serde_json::from_str(json).unwrap()
}

/// Answers every request on `stream` with 200 and closes.
async fn answer_ok<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut buf = [0u8; 1024];
    let _ = stream.read(&mut buf).await;
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await;
    let _ = stream.shutdown().await;
}

/// An HTTPS app with a self-signed certificate nobody could verify.
async fn https_app() -> u16 {
    let cert = rcgen::generate_simple_self_signed(vec!["app.invalid".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(trellis_identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    answer_ok(tls).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn https_probes_speak_tls_without_verifying() {
    let port = https_app().await;
    let https = probe(&format!(
        r#"{{"httpGet": {{"path": "/ready", "port": {port}, "scheme": "HTTPS"}}, "timeoutSeconds": 5}}"#
    ));
    assert_eq!(run(&https).await, Ok("app answered 200 OK".to_owned()));
    // The same app probed in plain HTTP does not answer as an app should.
    let plain = probe(&format!(
        r#"{{"httpGet": {{"path": "/ready", "port": {port}, "scheme": "HTTP"}}, "timeoutSeconds": 5}}"#
    ));
    assert!(run(&plain).await.is_err());
}

#[tokio::test]
async fn tcp_probes_connect_to_the_app_itself() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tcp = probe(&format!(r#"{{"tcpSocket": {{"port": {port}}}}}"#));
    assert!(run(&tcp).await.is_ok());
    // The app is down: nothing listens on its port any more.
    drop(listener);
    let failed = run(&tcp).await.unwrap_err();
    assert!(failed.contains(&format!("port {port}")), "{failed}");
}

#[tokio::test]
async fn grpc_probes_ask_the_health_service() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Cart", ReportedStatus::Serving)
        .await;
    reporter
        .set_service_status("shop.Ledger", ReportedStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let grpc = |service: &str| {
        probe(&format!(
            r#"{{"grpc": {{"port": {port}, "service": "{service}"}}, "timeoutSeconds": 5}}"#
        ))
    };
    assert_eq!(run(&grpc("shop.Cart")).await, Ok("SERVING".to_owned()));
    // The server as a whole (service "") is SERVING by default in tonic-health.
    assert!(run(&grpc("")).await.is_ok());
    let not_serving = run(&grpc("shop.Ledger")).await.unwrap_err();
    assert!(not_serving.contains("NOT_SERVING"), "{not_serving}");
    let unknown = run(&grpc("shop.Unknown")).await.unwrap_err();
    assert!(unknown.contains("not found"), "{unknown}");
}

/// An app that accepts and never answers fails the probe within its timeout.
#[tokio::test]
async fn a_silent_app_fails_within_the_probe_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let silent = probe(&format!(
        r#"{{"httpGet": {{"path": "/", "port": {port}}}, "timeoutSeconds": 1}}"#
    ));
    let failed = run(&silent).await.unwrap_err();
    assert!(failed.contains("no answer within 1s"), "{failed}");
    held.abort();
}

#[test]
fn parses_what_the_injector_writes() {
    let probes = parse_app_probes(
        r#"{"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS", "httpHeaders": [{"name": "x", "value": "y"}]}, "timeoutSeconds": 3},
            "/app-health/web/livez": {"tcpSocket": {"port": 8080}},
            "/app-health/web/startupz": {"grpc": {"port": 9090}}}"#,
    )
    .unwrap();
    let ready = &probes["/app-health/web/readyz"];
    let get = ready.http_get.as_ref().unwrap();
    assert_eq!((get.port, get.scheme.as_deref()), (8080, Some("HTTPS")));
    assert_eq!(get.http_headers[0].name, "x");
    assert_eq!(ready.timeout_seconds, Some(3));
    assert_eq!(
        probes["/app-health/web/livez"]
            .tcp_socket
            .as_ref()
            .unwrap()
            .port,
        8080
    );
    assert_eq!(
        probes["/app-health/web/startupz"]
            .grpc
            .as_ref()
            .unwrap()
            .port,
        9090
    );
    assert!(parse_app_probes("not json").is_err());
    assert!(parse_app_probes(r#"{"/p": {"httpGet": {"port": "http"}}}"#).is_err());
}
