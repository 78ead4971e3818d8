#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use super::authorization_policy::AuthorizationPolicy;
use super::http_route::HttpRoute;
use super::peer_authentication::PeerAuthentication;
use super::traffic_policy::TrafficPolicy;
use super::*;
use crate::model::{self, AppProtocol, ServicePort, StringMatch, TargetPort};

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml_ng::from_str(text).unwrap()
}

/// The errors as `field: reason` strings.
fn errors<T>(result: Result<T, Vec<FieldError>>) -> Vec<String> {
    match result {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn services(list: &[(&str, &str, &[u16])]) -> BTreeMap<ServiceKey, Service> {
    list.iter()
        .map(|(ns, name, ports)| {
            let key = ServiceKey {
                namespace: (*ns).into(),
                name: (*name).into(),
            };
            let ports = ports
                .iter()
                .map(|&port| ServicePort {
                    name: format!("p{port}"),
                    port,
                    target_port: TargetPort::Number(port),
                    protocol: AppProtocol::Http,
                })
                .collect();
            let service = Service {
                key: key.clone(),
                vips: Vec::new(),
                ports,
                selector: BTreeMap::new(),
            };
            (key, service)
        })
        .collect()
}

const TRAFFIC: &str = "
apiVersion: trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: demo}
spec:
  targetRef: {group: '', kind: Service, name: echo}
  loadBalancer:
    algorithm: CONSISTENT_HASH
    consistentHash: {header: X-User}
  retries:
    attempts: 2
    retryOn: [gateway-error, retriable-status-codes]
    statusCodes: [429]
    grpcStatuses: [UNAVAILABLE]
    perTryTimeout: 500ms
    backoff: {baseInterval: 10ms, maxInterval: 1s}
    budget: {ratio: 0.2, minRetriesPerSecond: 5, ttl: 10s}
  timeouts: {connect: 1s, request: 1m30s, idle: 0s}
  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 1m, maxEjectionPercent: 20}
  connectionLimits: {maxConnections: 100}
";

#[test]
fn traffic_policy_to_model() {
    let policy: TrafficPolicy = yaml(TRAFFIC);
    let ms = Duration::from_millis;
    let model = policy
        .to_model(Some(&services(&[("demo", "echo", &[80])])))
        .unwrap();
    assert_eq!(
        model,
        model::TrafficPolicy {
            source: "demo/echo".into(),
            load_balancer: model::LoadBalancer::ConsistentHash(model::HashKey::Header(
                "x-user".into()
            )),
            retries: Some(model::RetryPolicy {
                attempts: 2,
                retry_on: vec![
                    model::RetryOn::GatewayError,
                    model::RetryOn::RetriableStatusCodes
                ],
                status_codes: vec![429],
                grpc_statuses: vec!["UNAVAILABLE".into()],
                per_try_timeout: Some(ms(500)),
                backoff: Some(model::Backoff {
                    base_interval: ms(10),
                    max_interval: ms(1000),
                }),
                budget: Some(model::RetryBudget {
                    ratio: model::Ratio::new(0.2).unwrap(),
                    min_retries_per_second: 5,
                    ttl: ms(10_000),
                }),
                retry_non_idempotent: false,
            }),
            timeouts: model::Timeouts {
                connect: Some(ms(1000)),
                request: Some(ms(90_000)),
                idle: None,
            },
            outlier_detection: Some(model::OutlierDetection {
                consecutive_failures: 3,
                base_ejection_time: ms(60_000),
                max_ejection_percent: 20,
            }),
            connection_limits: model::ConnectionLimits {
                max_connections: Some(100),
                max_pending_requests: None,
            },
        }
    );
    // The target must exist when references are checked, not otherwise.
    assert!(policy.validate().is_ok());
    assert_eq!(
        errors(policy.to_model(Some(&services(&[])))),
        ["spec.targetRef: Service echo.demo does not exist"]
    );
}

#[test]
fn traffic_policy_defaults() {
    let policy: TrafficPolicy = yaml(
        "metadata: {name: p}\nspec:\n  targetRef: {kind: Service, name: echo}\n  \
         retries: {attempts: 1, budget: {}}\n",
    );
    let model = policy.to_model(None).unwrap();
    assert_eq!(model.source, "default/p");
    assert_eq!(model.load_balancer, model::LoadBalancer::P2cEwma);
    let retries = model.retries.unwrap();
    assert_eq!(
        retries.retry_on,
        [
            model::RetryOn::ConnectFailure,
            model::RetryOn::Reset,
            model::RetryOn::GatewayError
        ]
    );
    let budget = retries.budget.unwrap();
    assert_eq!(budget.ratio.get(), 0.2);
    assert_eq!(budget.min_retries_per_second, 10);
    assert_eq!(budget.ttl, Duration::from_secs(10));
    assert_eq!(retries.backoff, None);
    assert_eq!(model.outlier_detection, None);
}

#[test]
fn traffic_policy_errors_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            "targetRef: {kind: Deployment, name: echo}",
            "spec.targetRef.kind: \"Deployment\" is not supported: only Service",
        ),
        (
            "targetRef: {group: apps, kind: Service, name: echo}",
            "spec.targetRef.group: must be \"\" or \"core\" (a Service)",
        ),
        (
            "loadBalancer: {algorithm: CONSISTENT_HASH}",
            "spec.loadBalancer.consistentHash: is required with algorithm CONSISTENT_HASH",
        ),
        (
            "loadBalancer: {algorithm: CONSISTENT_HASH, consistentHash: {header: a, cookie: b}}",
            "spec.loadBalancer.consistentHash: set exactly one of header and cookie",
        ),
        (
            "loadBalancer: {algorithm: ROUND_ROBIN, consistentHash: {header: a}}",
            "spec.loadBalancer.consistentHash: is only for algorithm CONSISTENT_HASH",
        ),
        (
            "retries: {attempts: 2, perTryTimeout: 5x}",
            "spec.retries.perTryTimeout: \"5x\" is not a duration (unknown unit); write it like \
             500ms, 10s or 1m30s",
        ),
        (
            "retries: {attempts: 2, perTryTimeout: 10us}",
            "spec.retries.perTryTimeout: \"10us\" is under 1ms",
        ),
        (
            "retries: {attempts: 2, retryOn: [retriable-status-codes]}",
            "spec.retries.statusCodes: is required with retryOn retriable-status-codes",
        ),
        (
            "retries: {attempts: 2, statusCodes: [503]}",
            "spec.retries.statusCodes: needs retriable-status-codes in retryOn",
        ),
        (
            "retries: {attempts: 2, retryOn: [retriable-status-codes], statusCodes: [503, 700]}",
            "spec.retries.statusCodes[1]: 700 is not an HTTP status (100-599)",
        ),
        (
            "retries: {attempts: 2, grpcStatuses: [unavailable]}",
            "spec.retries.grpcStatuses[0]: \"unavailable\" is not a gRPC status name (such as \
             UNAVAILABLE)",
        ),
        (
            "retries: {attempts: 2, backoff: {baseInterval: 1s, maxInterval: 100ms}}",
            "spec.retries.backoff.maxInterval: must not be less than baseInterval",
        ),
        (
            "retries: {attempts: 2, budget: {ratio: 1.5}}",
            "spec.retries.budget.ratio: 1.5 is not in (0, 1]",
        ),
        (
            "retries: {attempts: 2, budget: {ratio: 0}}",
            "spec.retries.budget.ratio: 0 is not in (0, 1]",
        ),
        (
            "retries: {attempts: 2, budget: {ttl: 2m}}",
            "spec.retries.budget.ttl: must be 1s to 60s",
        ),
        (
            "outlierDetection: {consecutiveFailures: 0}",
            "spec.outlierDetection.consecutiveFailures: must be at least 1",
        ),
        (
            "outlierDetection: {maxEjectionPercent: 101}",
            "spec.outlierDetection.maxEjectionPercent: must be 0 to 100",
        ),
        (
            "connectionLimits: {maxPendingRequests: 0}",
            "spec.connectionLimits.maxPendingRequests: must be at least 1",
        ),
        (
            "timeouts: {idle: '-1s'}",
            "spec.timeouts.idle: \"-1s\" is not a duration (a sign is not allowed); write it \
             like 500ms, 10s or 1m30s",
        ),
    ];
    for (spec, want) in cases {
        let spec = if spec.starts_with("targetRef") {
            (*spec).to_owned()
        } else {
            format!("targetRef: {{kind: Service, name: echo}}\n  {spec}")
        };
        let text = format!("metadata: {{name: p}}\nspec:\n  {spec}\n");
        let policy: TrafficPolicy = yaml(&text);
        assert_eq!(errors(policy.validate()), [*want], "{text}");
    }
}

#[test]
fn traffic_policy_shape_errors_come_from_serde() {
    let bad = "metadata: {name: p}\nspec:\n  targetRef: {kind: Service, name: e}\n  retries: \
               {attempts: 1, retryOn: [5xxx]}\n";
    let e = serde_yaml_ng::from_str::<TrafficPolicy>(bad).unwrap_err();
    assert!(e.to_string().contains("unknown variant `5xxx`"), "{e}");
    let bad = "metadata: {name: p}\nspec:\n  targetRef: {kind: Service, name: e}\n  retry: {}\n";
    let e = serde_yaml_ng::from_str::<TrafficPolicy>(bad).unwrap_err();
    assert!(e.to_string().contains("unknown field `retry`"), "{e}");
}

const AUTHZ: &str = "
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: readers, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from:
    - source: {principals: ['spiffe://cluster.local/ns/demo/sa/client', 'spiffe://cluster.local/ns/ops/*']}
    - source: {namespaces: [monitoring], principals: ['*/sa/prometheus']}
    to:
    - operation: {methods: [GET, HEAD], paths: [/api/*, /healthz]}
    - operation: {ports: [9090]}
    when:
    - {key: 'request.headers[X-Tenant]', values: [blue, 'gr.en-*', '*']}
    - {key: 'request.headers[x-region]', values: [eu]}
    - {key: 'request.headers[x-user]', values: ['*@example.com']}
  - {}
";

#[test]
fn authorization_policy_flattens_from_and_to() {
    let policy: AuthorizationPolicy = yaml(AUTHZ);
    let model = policy.to_model().unwrap();
    assert_eq!(
        (model.namespace.as_str(), model.name.as_str()),
        ("demo", "readers")
    );
    assert_eq!(model.action, model::AuthorizationAction::Allow);
    assert_eq!(
        model.selector,
        BTreeMap::from([("app".into(), "echo".into())])
    );
    // 2 sources × 2 operations, then the empty rule.
    assert_eq!(model.rules.len(), 5);
    let r = &model.rules[1];
    assert_eq!(r.principals.len(), 2);
    assert!(r.namespaces.is_empty());
    assert_eq!(r.ports, [9090]);
    assert!(r.methods.is_empty() && r.paths.is_empty());
    let r = &model.rules[2];
    assert_eq!(r.namespaces, ["monitoring"]);
    assert_eq!(r.principals, ["*/sa/prometheus"]);
    assert_eq!(r.methods, ["GET", "HEAD"]);
    assert_eq!(r.paths, ["/api/*", "/healthz"]);
    let values: Vec<_> = r.headers.iter().map(|h| (&*h.name, &h.value)).collect();
    assert_eq!(
        values,
        [
            (
                "x-tenant",
                &StringMatch::Regex(r"^(?:blue|gr\.en\-.*|.*)$".into())
            ),
            ("x-region", &StringMatch::Exact("eu".into())),
            (
                "x-user",
                &StringMatch::Regex(r"^(?:.*@example\.com)$".into())
            ),
        ]
    );
    assert_eq!(model.rules[4], model::AuthorizationRule::default());
}

#[test]
fn authorization_policy_errors_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (
            "from: [{source: {principals: [spiffe://cluster.local/ns/a/sa/b, 'spiffe://a*b']}}]",
            "spec.rules[0].from[0].source.principals[1]: \"spiffe://a*b\" is not an exact SPIFFE \
             ID or a prefix/suffix wildcard",
        ),
        (
            "from: [{source: {principals: ['*a*']}}]",
            "spec.rules[0].from[0].source.principals[0]: \"*a*\" is not an exact SPIFFE ID or a \
             prefix/suffix wildcard",
        ),
        (
            "from: [{source: {principals: ['cluster.local/*']}}]",
            "spec.rules[0].from[0].source.principals[0]: \"cluster.local/*\" is not an exact \
             SPIFFE ID or a prefix/suffix wildcard",
        ),
        (
            "from: [{source: {principals: ['spiffe://cluster.local/ns/a']}}]",
            "spec.rules[0].from[0].source.principals[0]: \"spiffe://cluster.local/ns/a\" is not \
             an exact SPIFFE ID or a prefix/suffix wildcard: the path must be \
             /ns/<namespace>/sa/<service-account>, got \"/ns/a\"",
        ),
        (
            "from: [{source: {namespaces: [Demo]}}]",
            "spec.rules[0].from[0].source.namespaces[0]: \"Demo\" is not a namespace name",
        ),
        (
            "to: [{operation: {methods: [get]}}]",
            "spec.rules[0].to[0].operation.methods[0]: \"get\" is not an upper-case HTTP method \
             (GET, POST, ...)",
        ),
        (
            "to: [{operation: {paths: [api/*]}}]",
            "spec.rules[0].to[0].operation.paths[0]: \"api/*\" must start with / and may only \
             end with a *",
        ),
        (
            "to: [{operation: {paths: ['/a*/b']}}]",
            "spec.rules[0].to[0].operation.paths[0]: \"/a*/b\" must start with / and may only \
             end with a *",
        ),
        (
            "to: [{operation: {ports: [0]}}]",
            "spec.rules[0].to[0].operation.ports[0]: 0 is not a port (1-65535)",
        ),
        (
            "when: [{key: source.ip, values: [10.0.0.1]}]",
            "spec.rules[0].when[0].key: \"source.ip\" is not supported: only \
             request.headers[<name>]",
        ),
        (
            "when: [{key: 'request.headers[a]', values: ['a*b']}]",
            "spec.rules[0].when[0].values[0]: \"a*b\" is not a header value, exact or with one \
             leading or trailing *",
        ),
        (
            "when: [{key: 'request.headers[a]', values: []}]",
            "spec.rules[0].when[0].values: give at least one value",
        ),
    ];
    for (rule, want) in cases {
        let text = format!("metadata: {{name: p}}\nspec:\n  rules:\n  - {rule}\n");
        let policy: AuthorizationPolicy = yaml(&text);
        assert_eq!(errors(policy.validate()), [*want], "{text}");
    }
    let text = "metadata: {name: p}\nspec:\n  action: AUDIT\n";
    let e = serde_yaml_ng::from_str::<AuthorizationPolicy>(text).unwrap_err();
    assert!(e.to_string().contains("unknown variant `AUDIT`"), "{e}");
}

#[test]
fn good_principals() {
    for p in [
        "*",
        "spiffe://cluster.local/ns/demo/sa/client",
        "spiffe://cluster.local/*",
        "spiffe://cluster.local/ns/demo/*",
        "*/sa/client",
    ] {
        let text = format!(
            "metadata: {{name: p}}\nspec:\n  rules: [{{from: [{{source: {{principals: ['{p}']}}}}]}}]\n"
        );
        let policy: AuthorizationPolicy = yaml(&text);
        assert_eq!(policy.validate(), Ok(()), "{p}");
    }
}

#[test]
fn peer_authentication_to_model() {
    let policy: PeerAuthentication = yaml(
        "
metadata: {name: legacy, namespace: demo}
spec:
  selector: {matchLabels: {app: legacy}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    9100: {mode: DISABLE}
    9200: {}
",
    );
    let model = policy.to_model().unwrap();
    assert_eq!(model.mode, model::MtlsMode::Permissive);
    assert_eq!(
        model.port_modes,
        BTreeMap::from([
            (9100, model::MtlsMode::Disable),
            (9200, model::MtlsMode::Unset)
        ])
    );
    let wide: PeerAuthentication =
        yaml("metadata: {name: ns}\nspec:\n  portLevelMtls: {9100: {mode: DISABLE}}\n");
    assert_eq!(
        errors(wide.validate()),
        [
            "spec.portLevelMtls: needs a selector: ports are a workload's, so a namespace-wide \
          policy has none"
        ]
    );
    let unset: PeerAuthentication = yaml("metadata: {name: ns}\nspec: {}\n");
    assert_eq!(unset.to_model().unwrap().mode, model::MtlsMode::Unset);
    let e = serde_yaml_ng::from_str::<PeerAuthentication>(
        "metadata: {name: x}\nspec: {mtls: {mode: ON}}\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown variant `ON`"), "{e}");
}

const ROUTE: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs:
  - {group: '', kind: Service, name: echo, port: 80}
  - {name: ingress, sectionName: http}
  hostnames: [echo.example.com]
  rules:
  - matches:
    - path: {type: Exact, value: /v2/health}
    - headers: [{name: X-Canary, value: '1'}, {type: RegularExpression, name: x-user, value: 'a.*'}]
      queryParams: [{name: debug, value: 'on'}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Route, value: canary}]
        add: [{name: x-trace, value: '1'}]
        remove: [X-Internal]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [server]}
    backendRefs:
    - {name: echo-v2, port: 8080, weight: 90}
    - {name: echo, port: 80}
    timeouts: {request: 10s, backendRequest: 2s}
  - {}
";

#[test]
fn http_route_to_model() {
    let route: HttpRoute = yaml(ROUTE);
    let known = services(&[("demo", "echo", &[80]), ("demo", "echo-v2", &[8080])]);
    let resolved = route.to_model(Some(&known)).unwrap();
    assert_eq!(
        resolved.ignored_parents,
        [FieldError {
            field: "spec.parentRefs[1]".into(),
            reason: "gateway.networking.k8s.io/Gateway ingress is not a Service: skipped".into(),
        }]
    );
    // Two matches of rule 0, the default match of rule 1.
    assert_eq!(resolved.rules.len(), 3);
    let echo = ServiceKey {
        namespace: "demo".into(),
        name: "echo".into(),
    };
    assert!(
        resolved
            .rules
            .iter()
            .all(|(k, r)| *k == echo && r.port == Some(80))
    );
    let (_, first) = &resolved.rules[0];
    assert_eq!(first.name(), "demo/echo/0");
    assert_eq!(
        first.request_match.path,
        model::PathMatch::Exact("/v2/health".into())
    );
    assert_eq!(first.request_timeout, Some(Duration::from_secs(10)));
    assert_eq!(first.backend_request_timeout, Some(Duration::from_secs(2)));
    assert_eq!(first.request_headers.set["x-route"], "canary");
    assert_eq!(first.request_headers.add["x-trace"], "1");
    assert_eq!(first.request_headers.remove, ["x-internal"]);
    assert_eq!(first.response_headers.remove, ["server"]);
    let weights: Vec<_> = first
        .backends
        .iter()
        .map(|b| (b.service.name.as_str(), b.port, b.weight))
        .collect();
    assert_eq!(weights, [("echo-v2", 8080, 90), ("echo", 80, 1)]);
    let (_, second) = &resolved.rules[1];
    assert_eq!(second.origin.match_index, 1);
    let m = &second.request_match;
    assert_eq!(m.path, model::PathMatch::Prefix("/".into()));
    assert_eq!(m.method.as_deref(), Some("GET"));
    assert_eq!(m.headers[0].name, "x-canary");
    assert_eq!(m.headers[1].value, StringMatch::Regex("a.*".into()));
    assert_eq!(m.query_params[0].name, "debug");
    let (_, third) = &resolved.rules[2];
    assert_eq!(third.name(), "demo/echo/1");
    assert!(third.backends.is_empty() && third.request_headers.is_empty());
}

#[test]
fn http_route_errors_name_the_field() {
    let known = services(&[("demo", "echo", &[80])]);
    let cases: &[(&str, &str)] = &[
        (
            "rules: [{matches: [{path: {type: RegularExpression, value: '/a(b'}}]}]",
            "spec.rules[0].matches[0].path.value: \"/a(b\" is not a valid regular expression: \
             error: unclosed group",
        ),
        (
            "rules: [{matches: [{path: {value: v1}}]}]",
            "spec.rules[0].matches[0].path.value: \"v1\" must start with /",
        ),
        (
            "rules: [{matches: [{headers: [{name: 'a b', value: x}]}]}]",
            "spec.rules[0].matches[0].headers[0].name: \"a b\" is not a header name",
        ),
        (
            "rules: [{matches: [{headers: [{name: a, value: x}, {name: A, value: y}]}]}]",
            "spec.rules[0].matches[0].headers[1].name: \"A\" is matched twice",
        ),
        (
            "rules: [{matches: [{queryParams: [{type: RegularExpression, name: q, value: '['}]}]}]",
            "spec.rules[0].matches[0].queryParams[0].value: \"[\" is not a valid regular \
             expression: error: unclosed character class",
        ),
        (
            "rules: [{backendRefs: [{name: nope, port: 80}]}]",
            "spec.rules[0].backendRefs[0]: backend Service nope.demo does not exist",
        ),
        (
            "rules: [{backendRefs: [{name: echo, port: 81}]}]",
            "spec.rules[0].backendRefs[0]: backend Service echo.demo has no port 81",
        ),
        (
            "rules: [{backendRefs: [{name: echo}]}]",
            "spec.rules[0].backendRefs[0].port: is required for a Service (1-65535)",
        ),
        (
            "rules: [{backendRefs: [{kind: Deployment, name: echo, port: 80}]}]",
            "spec.rules[0].backendRefs[0]: /Deployment is not supported: only Service backends",
        ),
        (
            "rules: [{backendRefs: [{name: echo, port: 80, weight: 0}]}]",
            "spec.rules[0].backendRefs: every weight is 0: nothing would be served",
        ),
        (
            "rules: [{timeouts: {request: 1s, backendRequest: 2s}}]",
            "spec.rules[0].timeouts.backendRequest: must not be more than timeouts.request",
        ),
        (
            "rules: [{filters: [{type: RequestHeaderModifier}]}]",
            "spec.rules[0].filters[0].requestHeaderModifier: is required with type \
             RequestHeaderModifier",
        ),
        (
            "rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: \
             [{name: a, value: x}, {name: A, value: y}]}}]}]",
            "spec.rules[0].filters[0].requestHeaderModifier.set[1].name: \"A\" is given twice",
        ),
    ];
    for (spec, want) in cases {
        let text = format!(
            "metadata: {{name: r, namespace: demo}}\nspec:\n  parentRefs: [{{group: '', kind: \
             Service, name: echo}}]\n  {spec}\n"
        );
        let route: HttpRoute = yaml(&text);
        assert_eq!(errors(route.to_model(Some(&known))), [*want], "{text}");
    }
    let text = "metadata: {name: r, namespace: demo}\nspec:\n  parentRefs: [{group: '', kind: \
                Service, name: echo, port: 8080}]\n";
    let route: HttpRoute = yaml(text);
    assert_eq!(
        errors(route.to_model(Some(&known))),
        ["spec.parentRefs[0]: parent Service echo.demo has no port 8080"]
    );
    assert_eq!(route.validate(), Ok(()));
    let text = "metadata: {name: r}\nspec:\n  rules: [{filters: [{type: URLRewrite}]}]\n";
    let e = serde_yaml_ng::from_str::<HttpRoute>(text).unwrap_err();
    assert!(
        e.to_string().contains("unknown variant `URLRewrite`"),
        "{e}"
    );
}

#[test]
fn objects_serialize_back_to_their_shape() {
    let route: HttpRoute = yaml(ROUTE);
    let json = serde_json::to_value(&route).unwrap();
    assert_eq!(json["spec"]["parentRefs"][0]["kind"], "Service");
    assert_eq!(json["spec"]["rules"][0]["backendRefs"][0]["weight"], 90);
    let again: HttpRoute = serde_json::from_value(json).unwrap();
    assert_eq!(again, route);
    let policy: TrafficPolicy = yaml(TRAFFIC);
    let json = serde_json::to_value(&policy).unwrap();
    assert_eq!(json["spec"]["retries"]["retryOn"][0], "gateway-error");
    assert_eq!(json["spec"]["loadBalancer"]["algorithm"], "CONSISTENT_HASH");
    let again: TrafficPolicy = serde_json::from_value(json).unwrap();
    assert_eq!(again, policy);
    let new = AuthorizationPolicy::new("x", AuthorizationPolicySpec::default());
    let json = serde_json::to_value(&new).unwrap();
    assert_eq!(json["apiVersion"], TRELLIS_API_VERSION);
    assert_eq!(json["kind"], "AuthorizationPolicy");
    assert_eq!(new.validate(), Ok(()));
}

#[test]
fn missing_name_is_an_error() {
    let policy: PeerAuthentication = yaml("metadata: {namespace: demo}\nspec: {}\n");
    assert_eq!(errors(policy.validate()), ["metadata.name: is required"]);
}

/// The schema's duration pattern admits exactly what `duration::parse` does
/// (overflow aside), so the API server and the control plane agree.
#[test]
fn duration_pattern_matches_the_parser() {
    let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
    for text in [
        "0",
        "0s",
        "500ms",
        "1s",
        "1.5s",
        ".5s",
        "1.s",
        "1m30s",
        "1h30m",
        "2h45m10.5s",
        "250us",
        "250µs",
        "250μs",
        "10ns",
        "",
        "5",
        "00",
        "10 s",
        "1h 30m",
        "5sec",
        "-1s",
        "+1s",
        "s",
        ".s",
        "1.5.5s",
        "1ss",
        "1S",
        "1d",
        "1s0",
        " 1s",
        "1s ",
    ] {
        assert_eq!(
            pattern.is_match(text),
            duration::parse(text).is_ok(),
            "{text:?}: pattern and parser disagree"
        );
    }
}

#[test]
fn name_and_header_patterns_match_the_checks() {
    let dns = regex::Regex::new(DNS_LABEL_PATTERN).unwrap();
    let header = regex::Regex::new(HEADER_NAME_PATTERN).unwrap();
    for text in [
        "a", "echo", "echo-v2", "9", "-a", "a-", "A", "a.b", "a_b", "", "x-user", "X-User!", "a b",
        "a:b", "a=b", "`~|^", "ä",
    ] {
        // Length is the schema's maxLength, not the pattern's.
        assert_eq!(
            dns.is_match(text),
            is_dns_label(text),
            "{text:?} as a DNS label"
        );
        assert_eq!(
            header.is_match(text),
            is_header_name(text),
            "{text:?} as a header name"
        );
    }
}
