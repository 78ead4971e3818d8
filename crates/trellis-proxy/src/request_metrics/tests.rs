use super::*;
use crate::http::errors::{ProxyError, full};

fn families() -> (Registry, Arc<Families>) {
    let mut registry = Registry::with_prefix("trellis");
    let families = Families::register(&mut registry, AccessLog::off());
    (registry, families)
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}

fn peers(families: &Arc<Families>) -> Arc<LabelledPeers> {
    LabelledPeers::new(
        families.clone(),
        Peers {
            reporter: Reporter::Source,
            source: Arc::new(Workload::of(
                &"spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            )),
            destination: Arc::new(Workload::unknown()),
            destination_service: "echo.default".to_owned(),
            destination_port: 8080,
            route_name: "canary".to_owned(),
        },
    )
}

fn exchange(peers: &Arc<LabelledPeers>, protocol: RequestProtocol, size: u64) -> Exchange {
    Exchange {
        peers: peers.clone(),
        protocol,
        started: Instant::now(),
        request_size: RequestSize::Known(size),
        log: None,
        span: None,
        in_flight: None,
    }
}

#[tokio::test]
async fn a_response_body_is_counted_as_it_streams_and_recorded_at_its_end() {
    let (registry, families) = families();
    let peers = peers(&families);
    let response = exchange(&peers, RequestProtocol::Http, 3)
        .respond(Response::new(full(Bytes::from_static(b"hello"))));
    // Nothing is recorded before the body has been sent.
    assert!(!encode(&registry).contains("trellis_requests_total{"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.as_ref(), b"hello");
    let text = encode(&registry);
    let series = "reporter=\"source\",source_workload=\"web\",source_workload_namespace=\"shop\",\
source_principal=\"spiffe://cluster.local/ns/shop/sa/web\",destination_workload=\"unknown\",\
destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",\
destination_service=\"echo.default\",route_name=\"canary\",destination_port=\"8080\",\
request_protocol=\"http\",response_flags=\"-\",response_code=\"200\",grpc_response_status=\"\"";
    assert!(
        text.contains(&format!("trellis_requests_total{{{series}}} 1")),
        "{text}"
    );
    // 5 bytes: in the 10 bucket, not the 1 bucket.
    assert!(text.contains(&format!(
        "trellis_response_bytes_bucket{{le=\"1.0\",{series}}} 0"
    )));
    assert!(text.contains(&format!(
        "trellis_response_bytes_bucket{{le=\"10.0\",{series}}} 1"
    )));
    assert!(text.contains(&format!("trellis_response_bytes_sum{{{series}}} 5.0")));
    assert!(text.contains(&format!("trellis_request_bytes_sum{{{series}}} 3.0")));
}

#[tokio::test]
async fn a_dropped_body_still_counts_and_proxy_errors_carry_their_flag() {
    let (registry, families) = families();
    let peers = peers(&families);
    let response = exchange(&peers, RequestProtocol::Http, 0)
        .respond(ProxyError::NoEndpoints.response(false, None));
    drop(response);
    let grpc = exchange(&peers, RequestProtocol::Grpc, 0)
        .respond(ProxyError::Timeout.response(true, None));
    drop(grpc);
    let text = encode(&registry);
    assert!(
        text.contains(
            "response_flags=\"no_endpoints\",response_code=\"503\",grpc_response_status=\"\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("request_protocol=\"grpc\",response_flags=\"timeout\",response_code=\"200\",grpc_response_status=\"4\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn grpc_status_comes_from_trailers() {
    let (registry, families) = families();
    let peers = peers(&families);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
    let body = http_body_util::StreamBody::new(futures::stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
        Ok(Frame::trailers(trailers)),
    ]))
    .boxed();
    let response = exchange(&peers, RequestProtocol::Grpc, 5).respond(Response::new(body));
    response.into_body().collect().await.unwrap();
    let text = encode(&registry);
    assert!(
        text.contains("response_code=\"200\",grpc_response_status=\"5\"} 1"),
        "{text}"
    );
}

#[test]
fn the_success_series_is_fetched_once() {
    let (_registry, families) = families();
    let peers = peers(&families);
    let a = peers.handles(RequestProtocol::Http, 200, None, NO_FLAGS);
    let b = peers.handles(RequestProtocol::Http, 200, None, NO_FLAGS);
    assert!(Arc::ptr_eq(&a, &b));
    let c = peers.handles(RequestProtocol::Http, 503, None, "no_endpoints");
    assert!(!Arc::ptr_eq(&a, &c));
    let d = peers.handles(RequestProtocol::Http, 503, None, "no_endpoints");
    assert!(Arc::ptr_eq(&c, &d), "other outcomes are kept too");
}

#[tokio::test]
async fn streamed_request_bodies_are_counted() {
    let body = http_body_util::StreamBody::new(futures::stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"abc"))),
        Ok(Frame::data(Bytes::from_static(b"defg"))),
    ]));
    let (body, size) = measure_request(body);
    assert!(matches!(size, RequestSize::Counted(_)));
    body.collect().await.unwrap();
    assert_eq!(size.bytes(), 7);
    let (_, known) = measure_request(full(Bytes::from_static(b"xy")));
    assert!(matches!(known, RequestSize::Known(2)));
}

#[test]
fn every_proxy_error_maps_back_from_its_header() {
    for e in ProxyError::ALL {
        let response = e.response(false, None);
        assert_eq!(response_flags(response.headers()), e.flag());
    }
    assert_eq!(response_flags(&HeaderMap::new()), NO_FLAGS);
}
