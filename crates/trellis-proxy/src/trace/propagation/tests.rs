use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn span_of(parent: &Parent) -> (String, String, bool, bool) {
    match parent {
        Parent::Span { context, w3c } => (
            context.trace_id().to_string(),
            context.span_id().to_string(),
            context.is_sampled(),
            *w3c,
        ),
        other => panic!("no parent span: {other:?}"),
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

#[test]
fn reads_traceparent() {
    let h = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
    let incoming = Incoming::read(&h);
    assert_eq!(
        span_of(&incoming.parent),
        (TRACE.into(), SPAN.into(), true, true)
    );
    assert!(!incoming.b3_single && !incoming.b3_multi);
    let unsampled = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
    assert!(!span_of(&Incoming::read(&unsampled).parent).2);
}

#[test]
fn refuses_malformed_traceparent_and_falls_back_to_b3() {
    for bad in [
        format!("00-{}-{SPAN}-01", "0".repeat(32)),
        format!("00-{TRACE}-{}-01", "0".repeat(16)),
        format!("zz-{TRACE}-{SPAN}-01"),
        "garbage".to_owned(),
    ] {
        let h = headers(&[("traceparent", &bad)]);
        assert_eq!(Incoming::read(&h).parent, Parent::None, "{bad}");
        let h = headers(&[("traceparent", &bad), ("b3", &format!("{TRACE}-{SPAN}-1"))]);
        assert_eq!(
            span_of(&Incoming::read(&h).parent),
            (TRACE.into(), SPAN.into(), true, false),
            "{bad}"
        );
    }
}

#[test]
fn reads_b3_single() {
    let h = headers(&[("b3", &format!("{TRACE}-{SPAN}-0-05e3ac9a4f6e3b90"))]);
    let incoming = Incoming::read(&h);
    assert_eq!(
        span_of(&incoming.parent),
        (TRACE.into(), SPAN.into(), false, false)
    );
    assert!(incoming.b3_single);
    // A 64-bit trace id is left-padded.
    let h = headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}-d"))]);
    assert_eq!(
        span_of(&Incoming::read(&h).parent).0,
        "0000000000000000a3ce929d0e0e4736"
    );
    // A decision alone.
    let h = headers(&[("b3", "0")]);
    assert_eq!(
        Incoming::read(&h).parent,
        Parent::Decision { sampled: false }
    );
    for bad in ["x", &format!("{TRACE}-abc-1"), &format!("{TRACE}-{SPAN}-7")] {
        assert_eq!(
            Incoming::read(&headers(&[("b3", bad)])).parent,
            Parent::None
        );
    }
}

#[test]
fn reads_b3_multi() {
    let h = headers(&[
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", SPAN),
        ("x-b3-sampled", "1"),
    ]);
    let incoming = Incoming::read(&h);
    assert_eq!(
        span_of(&incoming.parent),
        (TRACE.into(), SPAN.into(), true, false)
    );
    assert!(incoming.b3_multi && !incoming.b3_single);
    let h = headers(&[
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", SPAN),
        ("x-b3-sampled", "0"),
        ("x-b3-flags", "1"),
    ]);
    assert!(span_of(&Incoming::read(&h).parent).2, "debug samples");
    let h = headers(&[("x-b3-sampled", "0")]);
    assert_eq!(
        Incoming::read(&h).parent,
        Parent::Decision { sampled: false }
    );
}

#[test]
fn writes_every_form_the_caller_used() {
    let mut h = headers(&[
        ("b3", &format!("{TRACE}-{SPAN}-1")),
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", SPAN),
        ("x-b3-sampled", "1"),
        ("tracestate", "vendor=1"),
    ]);
    let incoming = Incoming::read(&h);
    let child = SpanContext::new(
        TraceId::from_hex(TRACE).unwrap(),
        SpanId::from_hex("1111111111111111").unwrap(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    write(&mut h, &incoming, &child);
    assert_eq!(
        h["traceparent"],
        format!("00-{TRACE}-1111111111111111-01").as_str()
    );
    assert_eq!(h["b3"], format!("{TRACE}-1111111111111111-1").as_str());
    assert_eq!(h["x-b3-traceid"], TRACE);
    assert_eq!(h["x-b3-spanid"], "1111111111111111");
    assert_eq!(h["x-b3-parentspanid"], SPAN);
    assert_eq!(h["x-b3-sampled"], "1");
    // The tracestate came without a traceparent: not this trace's.
    assert!(h.get("tracestate").is_none());
}

#[test]
fn keeps_tracestate_with_traceparent_and_adds_no_b3() {
    let mut h = headers(&[
        ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
        ("tracestate", "vendor=1,other=2"),
    ]);
    let incoming = Incoming::read(&h);
    let child = SpanContext::new(
        TraceId::from_hex(TRACE).unwrap(),
        SpanId::from_hex("2222222222222222").unwrap(),
        TraceFlags::default(),
        false,
        TraceState::default(),
    );
    write(&mut h, &incoming, &child);
    assert_eq!(
        h["traceparent"],
        format!("00-{TRACE}-2222222222222222-00").as_str()
    );
    assert_eq!(h["tracestate"], "vendor=1,other=2");
    let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["traceparent", "tracestate"]);
}
