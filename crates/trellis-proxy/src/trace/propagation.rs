//! Trace context in request headers: W3C `traceparent`/`tracestate` and Zipkin's B3,
//! as one `b3` header or as `x-b3-*` headers.
//!
//! A hop reads the caller's context (W3C first, then B3) and writes its own span's in
//! its place: always as `traceparent`, and in each B3 form the caller used, so apps
//! instrumented for either keep their traces. `tracestate` rides along untouched when
//! the parent came from `traceparent` (the W3C rule for a hop that changes only the
//! parent id) and is dropped otherwise, since it belongs to another trace.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// What a request said about its trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub parent: Parent,
    /// The caller sent a single `b3` header: it gets one back.
    pub b3_single: bool,
    /// The caller sent `x-b3-*` headers: they are rewritten.
    pub b3_multi: bool,
}

/// Where the hop's span hangs.
#[derive(Debug, Clone, PartialEq)]
pub enum Parent {
    /// No (valid) context: the hop starts a trace, sampled by ratio.
    None,
    /// A B3 sampling decision without ids (`b3: 0`): a new trace that keeps it.
    Decision { sampled: bool },
    /// A remote span, from `traceparent` (`w3c`) or B3.
    Span { context: SpanContext, w3c: bool },
}

impl Incoming {
    pub fn read(headers: &HeaderMap) -> Incoming {
        let b3_single = headers.contains_key(B3);
        let b3_multi = headers.contains_key(B3_TRACE_ID) || headers.contains_key(B3_SAMPLED);
        let parent = w3c(headers)
            .map(|context| Parent::Span { context, w3c: true })
            .or_else(|| b3_single.then(|| b3_single_header(headers)).flatten())
            .or_else(|| b3_multi.then(|| b3_multi_headers(headers)).flatten())
            .unwrap_or(Parent::None);
        Incoming {
            parent,
            b3_single,
            b3_multi,
        }
    }
}

/// The W3C parser of the OpenTelemetry SDK (versions, all-zero ids, flags).
fn w3c(headers: &HeaderMap) -> Option<SpanContext> {
    if !headers.contains_key(TRACEPARENT) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| context.clone())
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]` or `b3: {SamplingState}`.
fn b3_single_header(headers: &HeaderMap) -> Option<Parent> {
    let value = headers.get(B3)?.to_str().ok()?.trim();
    let mut fields = value.split('-');
    let first = fields.next()?;
    let Some(span_id) = fields.next() else {
        return b3_sampled(first).map(|sampled| Parent::Decision { sampled });
    };
    let trace_id = b3_trace_id(first)?;
    let span_id = b3_span_id(span_id)?;
    let sampled = match fields.next() {
        Some(state) => b3_sampled(state)?,
        // No decision: the caller defers; a sampled trace is what a B3 caller without
        // one usually expects once ids are there.
        None => true,
    };
    Some(remote(trace_id, span_id, sampled))
}

/// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled` (or `x-b3-flags: 1`, debug).
fn b3_multi_headers(headers: &HeaderMap) -> Option<Parent> {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let debug = text(&B3_FLAGS) == Some("1");
    let sampled = match text(&B3_SAMPLED) {
        Some(s) => Some(b3_sampled(s)?),
        None => None,
    };
    let sampled = debug || sampled.unwrap_or(true);
    match (text(&B3_TRACE_ID), text(&B3_SPAN_ID)) {
        (Some(trace_id), Some(span_id)) => Some(remote(
            b3_trace_id(trace_id.trim())?,
            b3_span_id(span_id.trim())?,
            sampled,
        )),
        _ => headers
            .contains_key(B3_SAMPLED)
            .then_some(Parent::Decision { sampled }),
    }
}

fn remote(trace_id: TraceId, span_id: SpanId, sampled: bool) -> Parent {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Parent::Span {
        context: SpanContext::new(trace_id, span_id, flags, true, TraceState::default()),
        w3c: false,
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// 128 bits, or 64 (left-padded with zeros, as B3 says).
fn b3_trace_id(s: &str) -> Option<TraceId> {
    if !(s.len() == 32 || s.len() == 16) || !is_hex(s) {
        return None;
    }
    TraceId::from_hex(s)
        .ok()
        .filter(|id| *id != TraceId::INVALID)
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 || !is_hex(s) {
        return None;
    }
    SpanId::from_hex(s).ok().filter(|id| *id != SpanId::INVALID)
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Writes the hop's span as the context the next hop (or the app) sees.
pub fn write(headers: &mut HeaderMap, incoming: &Incoming, span: &SpanContext) {
    let sampled = span.is_sampled();
    headers.insert(
        TRACEPARENT,
        header(&format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags()
        )),
    );
    let parent_span = match &incoming.parent {
        Parent::Span { w3c: true, context } => Some(context.span_id()),
        Parent::Span {
            w3c: false,
            context,
        } => {
            headers.remove(TRACESTATE);
            Some(context.span_id())
        }
        Parent::None | Parent::Decision { .. } => {
            headers.remove(TRACESTATE);
            None
        }
    };
    let flag = if sampled { "1" } else { "0" };
    if incoming.b3_single {
        headers.insert(
            B3,
            header(&format!("{}-{}-{flag}", span.trace_id(), span.span_id())),
        );
    }
    if incoming.b3_multi {
        headers.insert(B3_TRACE_ID, header(&span.trace_id().to_string()));
        headers.insert(B3_SPAN_ID, header(&span.span_id().to_string()));
        headers.insert(B3_SAMPLED, HeaderValue::from_static(flag));
        headers.remove(B3_FLAGS);
        match parent_span {
            Some(parent) => {
                headers.insert(B3_PARENT_SPAN_ID, header(&parent.to_string()));
            }
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
    }
}

/// Hex digits and dashes only: always a valid header value.
fn header(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests;
