//! The Grafana dashboard and the Prometheus Operator rules under
//! `deploy/observability/` against the code: every PromQL expression parses (with
//! promql-parser, Prometheus' grammar), and every metric it names is one the proxy
//! (`trellis_proxy::metrics::Metrics`) or the control plane
//! (`trellis_control::metrics::ControlMetrics`) exports, read from their own
//! encoders rather than from a list that could drift; a recording rule's name is
//! defined in the rule file; anything else is a named outside metric (cAdvisor's).
//! A renamed or misspelt metric fails here instead of drawing an empty panel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Empty};

use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde::Deserialize;
use serde_json::Value;
use trellis_control::injector::sidecar::PROXY_CONTAINER;
use trellis_control::metrics::{ControlMetrics, RefusalReason, RegistryEventLabels};
use trellis_proxy::http::Body;
use trellis_proxy::metrics::{
    ConfigLabels, Metrics, PeerLabels, PolicyLabels, ReasonLabels, ServiceLabels,
};
use trellis_proxy::request_metrics::{
    Exchange, LabelledPeers, NO_FLAGS, Peers, Reporter, RequestProtocol, RequestSize, Workload,
};

/// Metrics the dashboard reads from outside Trellis: the kubelet's cAdvisor.
const OUTSIDE_METRICS: [&str; 2] = [
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The sample names of every family in an OpenMetrics text, from its `# TYPE`
/// line, which prometheus-client writes even for a family without samples yet.
fn sample_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            panic!("malformed TYPE line: {line}");
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "gauge" | "unknown" | "stateset" => &[""],
            "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            "info" => &["_info"],
            other => panic!("unknown metric type {other} in {line}"),
        };
        for suffix in suffixes {
            names.insert(format!("{family}{suffix}"));
        }
    }
    names
}

/// The proxy's metrics with a sample in every family: prometheus-client leaves a
/// labelled family out of the text until it has one.
fn proxy_metrics_with_samples() -> Metrics {
    let m = Metrics::new();
    let peer = PeerLabels {
        peer_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
    };
    let service = ServiceLabels {
        service: "web.shop".into(),
        peer_identity: peer.peer_identity.clone(),
    };
    let reason = ReasonLabels {
        reason: "connect_failed".into(),
    };
    m.inbound_connections.get_or_create(&peer).inc();
    m.inbound_bytes.get_or_create(&peer).inc();
    m.inbound_refused.get_or_create(&reason).inc();
    m.outbound_connections.get_or_create(&service).inc();
    m.outbound_bytes.get_or_create(&service).inc();
    m.outbound_failures.get_or_create(&reason).inc();
    m.http_proxy_errors.get_or_create(&reason).inc();
    m.config_updates
        .get_or_create(&ConfigLabels {
            type_url: "type.googleapis.com/trellis.v1.Service".into(),
            result: "ack".into(),
        })
        .inc();
    m.authz_denied
        .get_or_create(&PolicyLabels {
            policy: "shop/deny-all".into(),
            peer_identity: peer.peer_identity.clone(),
        })
        .inc();
    m.cert_renewals.inc();
    m.active_connections.set(1);
    // A TCP connection and an HTTP request, through the data path's own recorders.
    let peers = LabelledPeers::new(
        m.requests.clone(),
        Peers {
            reporter: Reporter::Destination,
            source: Arc::new(Workload::unknown()),
            destination: Arc::new(Workload::unknown()),
            destination_service: "web.shop".into(),
            destination_port: 80,
            route_name: NO_FLAGS.into(),
        },
    );
    peers.tcp_opened().closed(None, 1, 1);
    let exchange = Exchange {
        peers,
        protocol: RequestProtocol::Http,
        started: Instant::now(),
        request_size: RequestSize::Known(0),
        log: None,
        span: None,
        in_flight: None,
    };
    let empty: Body = Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed();
    drop(exchange.respond(Response::new(empty)));
    m
}

/// The control plane's metrics with a sample in every family.
fn control_metrics_with_samples() -> ControlMetrics {
    let m = ControlMetrics::new();
    let type_url = "type.googleapis.com/trellis.v1.Service";
    m.push_sent(type_url);
    m.push_answered(type_url, Duration::from_millis(3));
    m.nack(type_url, 3);
    m.certificate_refused(RefusalReason::NoProof);
    m.registry_events
        .get_or_create(&RegistryEventLabels {
            kind: "service",
            event: "add",
        })
        .inc();
    m.leader.set(1);
    m
}

/// How many families `sources` register (`registry.register(` calls): if the
/// encoded text has fewer, a family added since lacks a sample above.
fn registered_families(sources: &[&str]) -> usize {
    sources
        .iter()
        .map(|rel| read(rel).matches("registry.register(").count())
        .sum()
}

/// Everything both components export, checked three ways: each family the source
/// registers is in the text, each sample's name is one derived from a `# TYPE`
/// line, and names the dashboard depends on are there.
fn exported() -> BTreeSet<String> {
    let components = [
        (
            proxy_metrics_with_samples().encode(),
            registered_families(&[
                "crates/trellis-proxy/src/metrics.rs",
                "crates/trellis-proxy/src/request_metrics.rs",
            ]),
        ),
        (
            control_metrics_with_samples().encode(),
            registered_families(&["control-plane/src/metrics.rs"]),
        ),
    ];
    let mut names = BTreeSet::new();
    for (text, registered) in components {
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(
            families, registered,
            "the source registers {registered} families, the text has {families}: give the new one a sample\n{text}"
        );
        let from_types = sample_names(&text);
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                from_types.contains(name),
                "sample {name} is not derived from a TYPE line: {line}"
            );
        }
        names.extend(from_types);
    }
    for known in [
        "trellis_requests_total",
        "trellis_request_duration_milliseconds_bucket",
        "trellis_cert_expiry_timestamp_seconds",
        "trellis_control_nacks_total",
        "trellis_control_push_latency_seconds_bucket",
        "trellis_control_leader",
    ] {
        assert!(names.contains(known), "{known} not among {names:?}");
    }
    names
}

/// One PromQL expression and where it came from.
struct Query {
    origin: String,
    expr: String,
}

/// The metric names a PromQL expression selects, and its selectors' `container`
/// label values.
#[derive(Default)]
struct Selected {
    metrics: BTreeSet<String>,
    containers: BTreeSet<String>,
}

impl Selected {
    fn add(&mut self, vs: &VectorSelector) {
        if let Some(name) = &vs.name {
            self.metrics.insert(name.clone());
        }
        for m in vs
            .matchers
            .matchers
            .iter()
            .chain(vs.matchers.or_matchers.iter().flatten())
        {
            match m.name.as_str() {
                "__name__" => {
                    self.metrics.insert(m.value.clone());
                }
                "container" => {
                    self.containers.insert(m.value.clone());
                }
                _ => {}
            }
        }
    }
}

impl ExprVisitor for Selected {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(vs) => self.add(vs),
            Expr::MatrixSelector(ms) => self.add(&ms.vs),
            _ => {}
        }
        Ok(true)
    }
}

/// Grafana's interval macros become durations PromQL accepts; `$var` only appears
/// inside label-value strings, where it is text.
fn expand_grafana_macros(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/observability/grafana-dashboard.json"))
        .expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        out.push(panel);
    }
    out
}

fn dashboard_queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                origin: format!("dashboard panel {:?} {}", panel["title"], target["refId"]),
                expr: target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {:?}: a target without expr", panel["title"]))
                    .to_owned(),
            });
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap_or_else(|| panic!("variable {}: no query", var["name"]));
        // `label_values(SELECTOR, label)`: the selector is PromQL.
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.rsplit_once(','))
            .map(|(selector, _)| selector)
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: not label_values(selector, label)",
                    var["name"]
                )
            });
        out.push(Query {
            origin: format!("dashboard variable {}", var["name"]),
            expr: selector.to_owned(),
        });
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: Value,
    spec: RuleSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn rules() -> PrometheusRule {
    serde_yaml_ng::from_str(&read("deploy/observability/prometheus-rule.yaml"))
        .expect("prometheus-rule.yaml is a PrometheusRule (no unknown fields)")
}

fn rule_queries(rules: &PrometheusRule) -> Vec<Query> {
    rules
        .spec
        .groups
        .iter()
        .flat_map(|g| {
            g.rules.iter().map(move |r| Query {
                origin: format!(
                    "rule group {} {}",
                    g.name,
                    r.alert.as_deref().or(r.record.as_deref()).unwrap_or("?")
                ),
                expr: r.expr.clone(),
            })
        })
        .collect()
}

/// What is wrong with `queries`: unparsable PromQL, metrics nobody exports, or a
/// sidecar selector on a container the injector does not create.
fn problems(
    queries: &[Query],
    exported: &BTreeSet<String>,
    recorded: &BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for q in queries {
        let expr = match parser::parse(&expand_grafana_macros(&q.expr)) {
            Ok(expr) => expr,
            Err(e) => {
                out.push(format!("{}: does not parse: {e}\n  {}", q.origin, q.expr));
                continue;
            }
        };
        let mut selected = Selected::default();
        let Ok(_) = walk_expr(&mut selected, &expr);
        if selected.metrics.is_empty() {
            out.push(format!("{}: selects no metric: {}", q.origin, q.expr));
        }
        for name in &selected.metrics {
            let known = if name.contains(':') {
                recorded.contains(name)
            } else if name.starts_with("trellis_") {
                exported.contains(name)
            } else {
                OUTSIDE_METRICS.contains(&name.as_str())
            };
            if !known {
                out.push(format!("{}: {name} is not exported by Trellis", q.origin));
            }
        }
        for container in &selected.containers {
            if container != PROXY_CONTAINER {
                out.push(format!(
                    "{}: container {container:?}, but the injected sidecar is {PROXY_CONTAINER:?}",
                    q.origin
                ));
            }
        }
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let exported = exported();
    let rules = rules();
    let recorded: BTreeSet<String> = rules
        .spec
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .filter_map(|r| r.record.clone())
        .collect();
    let mut queries = dashboard_queries(&dashboard());
    let from_dashboard = queries.len();
    queries.extend(rule_queries(&rules));
    assert!(
        from_dashboard > 30,
        "only {from_dashboard} dashboard queries"
    );

    let errors = problems(&queries, &exported, &recorded);
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // The dashboard covers what it promises.
    let used: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| {
            let mut s = Selected::default();
            let expr = parser::parse(&expand_grafana_macros(&q.expr)).unwrap();
            let Ok(_) = walk_expr(&mut s, &expr);
            s.metrics
        })
        .collect();
    for needed in [
        "trellis_requests_total",
        "trellis_request_duration_milliseconds_bucket",
        "trellis_tcp_sent_bytes_total",
        "trellis_tcp_received_bytes_total",
        "trellis_tcp_connections_opened_total",
        "trellis_cert_expiry_timestamp_seconds",
        "trellis_control_connected_proxies",
        "trellis_control_pushes_total",
        "trellis_control_nacks_total",
        "trellis_control_leader",
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
    ] {
        assert!(used.contains(needed), "nothing charts {needed}");
    }
}

#[test]
fn a_misspelt_metric_or_broken_query_is_caught() {
    let exported = exported();
    let recorded = BTreeSet::from(["trellis:service_error_ratio:rate5m".to_owned()]);
    let query = |expr: &str| Query {
        origin: "inline".into(),
        expr: expr.into(),
    };
    let bad = [
        "sum(rate(trellis_request_total[$__rate_interval]))",
        "trellis:service_error_ratio:rate1h > 0.01",
        "rate(istio_requests_total[5m])",
        r#"rate(container_cpu_usage_seconds_total{container="proxy"}[5m])"#,
        "sum(rate(trellis_requests_total[5m])",
    ];
    for expr in bad {
        assert_eq!(
            problems(&[query(expr)], &exported, &recorded).len(),
            1,
            "not caught: {expr}"
        );
    }
    let good = [
        r#"histogram_quantile(0.99, sum by (le) (rate(trellis_request_duration_milliseconds_bucket{reporter="destination", destination_service=~"$service"}[$__rate_interval])))"#,
        "trellis:service_error_ratio:rate5m > 0.01",
        r#"rate(container_cpu_usage_seconds_total{container="trellis-proxy"}[5m])"#,
    ];
    for expr in good {
        let errors = problems(&[query(expr)], &exported, &recorded);
        assert!(errors.is_empty(), "{errors:?}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().unwrap_or_default() >= 39);
    assert!(!dashboard["uid"].as_str().unwrap_or_default().is_empty());
    let vars: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    for name in ["namespace", "service", "workload"] {
        let var = vars
            .get(name)
            .unwrap_or_else(|| panic!("no ${name} variable"));
        assert_eq!(var["datasource"]["uid"], "${datasource}", "${name}");
    }
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        assert!(
            ids.insert(panel["id"].as_u64()),
            "panel id {} twice",
            panel["id"]
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {:?}",
            panel["title"]
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
        }
    }
}

#[test]
fn every_alert_says_how_bad_what_and_where_to_look() {
    let rules = rules();
    assert_eq!(rules.api_version, "monitoring.coreos.com/v1");
    assert_eq!(rules.kind, "PrometheusRule");
    assert!(rules.metadata["name"].is_string());
    let mut alerts = BTreeSet::new();
    for rule in rules.spec.groups.iter().flat_map(|g| &g.rules) {
        match (&rule.alert, &rule.record) {
            (Some(alert), None) => {
                assert!(alerts.insert(alert.clone()), "{alert} twice");
                let severity = rule.labels.get("severity").map(String::as_str);
                assert!(
                    matches!(severity, Some("critical" | "warning" | "info")),
                    "{alert}: severity {severity:?}"
                );
                for key in ["summary", "description", "runbook"] {
                    assert!(
                        rule.annotations
                            .get(key)
                            .is_some_and(|v| !v.trim().is_empty()),
                        "{alert}: no {key}"
                    );
                }
                if let Some(duration) = &rule.for_ {
                    promql_parser::util::parse_duration(duration)
                        .unwrap_or_else(|e| panic!("{alert}: for {duration}: {e}"));
                }
            }
            (None, Some(record)) => {
                assert!(
                    record.starts_with("trellis:") && rule.labels.is_empty(),
                    "{record}: recorded names are trellis:..."
                );
            }
            _ => panic!("a rule is exactly one of alert or record: {}", rule.expr),
        }
    }
    for wanted in [
        "TrellisServiceErrorBudgetBurnFast",
        "TrellisServiceErrorBudgetBurnSlow",
        "TrellisWorkloadCertificateExpiringSoon",
        "TrellisProxyConfigRejected",
        "TrellisProxiesOutOfSync",
        "TrellisControlPlaneNoLeader",
        "TrellisControlPlaneDown",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}");
    }
}
