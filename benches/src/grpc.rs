//! gRPC unary echo over HTTP/2 without a gRPC library: the wire format is small enough
//! to write by hand, and doing so keeps the client's per-call cost to one pre-built
//! request body and a trailer check, the same for every scenario.
//!
//! The call is `POST /trellis.bench.v1.Echo/Echo` with `content-type: application/grpc`
//! and `te: trailers`; the request message is the protobuf encoding of
//! `message EchoMessage { bytes payload = 1; }` in one uncompressed length-prefixed
//! frame. The server answers with the same message and the trailer `grpc-status: 0`.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::{BenchError, Result};

/// The method every call goes to.
pub const ECHO_PATH: &str = "/trellis.bench.v1.Echo/Echo";
/// `content-type` of gRPC requests and responses.
pub const CONTENT_TYPE: &str = "application/grpc";
/// Length of a frame's prefix: compressed flag and big-endian message length.
pub const PREFIX_LEN: usize = 5;

/// gRPC status codes the benchmark server sends.
pub const STATUS_OK: u32 = 0;
pub const STATUS_INVALID_ARGUMENT: u32 = 3;
pub const STATUS_UNIMPLEMENTED: u32 = 12;

/// Whether a request's `content-type` is gRPC (`application/grpc`, `application/grpc+proto`...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(CONTENT_TYPE.as_bytes()))
}

/// One framed `EchoMessage` whose payload is `payload_len` bytes.
pub fn echo_frame(payload_len: usize) -> Result<Bytes> {
    let mut varint = [0u8; 10];
    let varint_len = encode_varint(payload_len as u64, &mut varint);
    // Field 1, wire type 2 (length-delimited): tag byte 0x0a.
    let message_len = 1 + varint_len + payload_len;
    let prefix_len = u32::try_from(message_len)
        .map_err(|_| BenchError::Config(format!("gRPC message of {message_len} bytes")))?;
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + message_len);
    buf.put_u8(0);
    buf.put_u32(prefix_len);
    buf.put_u8(0x0a);
    buf.put_slice(&varint[..varint_len]);
    buf.put_bytes(b'g', payload_len);
    Ok(buf.freeze())
}

/// Protobuf base-128 varint of `v` into `out`; returns its length.
fn encode_varint(mut v: u64, out: &mut [u8; 10]) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

/// Why a request body is not one uncompressed gRPC frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{0} bytes is shorter than the 5-byte frame prefix")]
    Short(usize),
    #[error("compressed messages are not supported")]
    Compressed,
    #[error("frame prefix says {declared} bytes, body carries {actual}")]
    Length { declared: usize, actual: usize },
}

/// Checks that `body` is exactly one uncompressed frame; returns the message.
pub fn parse_frame(body: &[u8]) -> Result<&[u8], FrameError> {
    let Some((prefix, message)) = body.split_first_chunk::<PREFIX_LEN>() else {
        return Err(FrameError::Short(body.len()));
    };
    if prefix[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let declared = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if declared != message.len() {
        return Err(FrameError::Length {
            declared,
            actual: message.len(),
        });
    }
    Ok(message)
}

/// `Ok` for `grpc-status: 0`; the status and message otherwise.
fn check_status(headers: &HeaderMap) -> Result<()> {
    let code = headers
        .get("grpc-status")
        .ok_or(BenchError::GrpcNoStatus)?
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    match code {
        Some(STATUS_OK) => Ok(()),
        other => Err(BenchError::GrpcStatus {
            code: other.map_or_else(|| "unparsable".to_string(), |c| c.to_string()),
            message: headers
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                .unwrap_or_default(),
        }),
    }
}

/// The request of one call; `frame` is sent as is (cloning [`Bytes`] copies nothing).
pub fn echo_request(uri: &http::Uri, frame: Bytes) -> Result<Request<Full<Bytes>>> {
    Ok(Request::post(uri.clone())
        .header(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))
        .header(header::TE, HeaderValue::from_static("trailers"))
        .body(Full::new(frame))?)
}

/// Reads a call's response: HTTP 200, then either a trailers-only answer or data
/// followed by trailers; `grpc-status` must be 0 and the data `expected_len` bytes. A
/// response without `grpc-status` is an error.
pub async fn read_echo_response<B>(resp: Response<B>, expected_len: usize) -> Result<()>
where
    B: Body + Unpin,
    BenchError: From<B::Error>,
{
    if resp.status() != StatusCode::OK {
        return Err(BenchError::Status(resp.status().as_u16()));
    }
    let (parts, mut body) = resp.into_parts();
    // Trailers-only: the status comes with the headers (how errors are usually sent).
    let mut status = parts
        .headers
        .contains_key("grpc-status")
        .then(|| check_status(&parts.headers));
    let mut got = 0;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => got += bytes::Buf::remaining(&data),
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    status = Some(check_status(&trailers));
                }
            }
        }
    }
    status.unwrap_or(Err(BenchError::GrpcNoStatus))?;
    if got != expected_len {
        return Err(BenchError::ShortResponse {
            expected: expected_len,
            got,
        });
    }
    Ok(())
}

/// One echo call on a new connection (readiness probes).
pub async fn echo_once(addr: SocketAddr, authority: &str, payload_len: usize) -> Result<()> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let uri: http::Uri = format!("http://{authority}{ECHO_PATH}")
        .parse()
        .map_err(|e| BenchError::Config(format!("gRPC URI for {authority:?}: {e}")))?;
    let frame = echo_frame(payload_len)?;
    let expected = frame.len();
    let result = async {
        sender.ready().await?;
        let resp = sender.send_request(echo_request(&uri, frame)?).await?;
        read_echo_response(resp, expected).await
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::combinators::UnsyncBoxBody;

    use super::*;

    type TestBody = UnsyncBoxBody<Bytes, Infallible>;

    fn response(
        data: Bytes,
        headers: &[(&str, &str)],
        trailers: Option<&[(&str, &str)]>,
    ) -> Response<TestBody> {
        let map = |kv: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in kv {
                m.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        let body = match trailers {
            None => Full::new(data).boxed_unsync(),
            Some(t) => Full::new(data)
                .with_trailers(std::future::ready(Some(Ok(map(t)))))
                .boxed_unsync(),
        };
        let mut resp = Response::new(body);
        *resp.headers_mut() = map(headers);
        resp
    }

    #[test]
    fn frames_round_trip() {
        let f = echo_frame(1024).unwrap();
        // Tag, two-byte varint of 1024 (0x80 0x08), payload.
        assert_eq!(f.len(), PREFIX_LEN + 1 + 2 + 1024);
        assert_eq!(&f[..8], &[0, 0, 0, 4, 3, 0x0a, 0x80, 0x08]);
        let m = parse_frame(&f).unwrap();
        assert_eq!(m.len(), 1027);
        assert_eq!(echo_frame(0).unwrap().as_ref(), &[0, 0, 0, 0, 2, 0x0a, 0]);
        let mut v = [0u8; 10];
        assert_eq!(encode_varint(300, &mut v), 2);
        assert_eq!(&v[..2], &[0xac, 0x02]);
    }

    #[test]
    fn bad_frames_say_why() {
        assert_eq!(parse_frame(&[0, 0, 0]), Err(FrameError::Short(3)));
        assert_eq!(parse_frame(&[1, 0, 0, 0, 0]), Err(FrameError::Compressed));
        assert_eq!(
            parse_frame(&[0, 0, 0, 0, 2, 9]),
            Err(FrameError::Length {
                declared: 2,
                actual: 1
            })
        );
        assert_eq!(parse_frame(&[0, 0, 0, 0, 0]), Ok(&[][..]));
    }

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }

    #[tokio::test]
    async fn responses_are_checked() {
        let data = Bytes::from_static(b"0123456789");
        let ok = [("grpc-status", "0")];
        read_echo_response(response(data.clone(), &[], Some(&ok)), 10)
            .await
            .unwrap();
        // No trailers at all.
        assert!(matches!(
            read_echo_response(response(data.clone(), &[], None), 10).await,
            Err(BenchError::GrpcNoStatus)
        ));
        // Trailers without grpc-status.
        assert!(matches!(
            read_echo_response(response(data.clone(), &[], Some(&[("x", "y")])), 10).await,
            Err(BenchError::GrpcNoStatus)
        ));
        // A non-zero status in the trailers.
        let unavailable = [("grpc-status", "14"), ("grpc-message", "down")];
        match read_echo_response(response(data.clone(), &[], Some(&unavailable)), 10).await {
            Err(BenchError::GrpcStatus { code, message }) => {
                assert_eq!((code.as_str(), message.as_str()), ("14", "down"));
            }
            other => panic!("{other:?}"),
        }
        // Trailers-only error.
        let denied = [("grpc-status", "7")];
        assert!(matches!(
            read_echo_response(response(Bytes::new(), &denied, None), 10).await,
            Err(BenchError::GrpcStatus { .. })
        ));
        // Wrong length, and a non-200.
        assert!(matches!(
            read_echo_response(response(data.clone(), &[], Some(&ok)), 11).await,
            Err(BenchError::ShortResponse {
                expected: 11,
                got: 10
            })
        ));
        let mut teapot = response(data, &[], Some(&ok));
        *teapot.status_mut() = StatusCode::IM_A_TEAPOT;
        assert!(matches!(
            read_echo_response(teapot, 10).await,
            Err(BenchError::Status(418))
        ));
    }
}
