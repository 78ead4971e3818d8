//! The Trellis CRDs: `deploy/crds/` is exactly what the Rust types generate, and
//! the generated schemas accept every policy the repository ships and reject, at
//! admission, the mistakes they can express (types, enums, required fields,
//! ranges, patterns, and CEL rules, evaluated here with kube-cel as the API server
//! would). Whatever a schema rejects, the Rust types reject too, so the file
//! registry and the API server agree.
//!
//! After changing a type in `control-plane/src/api`, regenerate the YAML with
//! `cargo run -p trellis-control -- crds --out deploy/crds` (or run this test with
//! `TRELLIS_UPDATE_CRDS=1`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_control::api::{
    self, AuthorizationPolicy, FieldError, PeerAuthentication, TRELLIS_API_VERSION, TrafficPolicy,
};

const KINDS: [&str; 3] = ["TrafficPolicy", "AuthorizationPolicy", "PeerAuthentication"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn deploy_crds_are_generated_from_the_rust_types() {
    let dir = repo().join("deploy/crds");
    let update = std::env::var_os("TRELLIS_UPDATE_CRDS").is_some_and(|v| v == "1");
    let files = api::crd_files().unwrap();
    let mut stale = Vec::new();
    for (name, text) in &files {
        let path = dir.join(name);
        if update {
            std::fs::write(&path, text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == *text => {}
            Ok(on_disk) => stale.push(format!(
                "{name} differs:\n{}",
                first_difference(&on_disk, text)
            )),
            Err(e) => stale.push(format!("{name}: {e}")),
        }
    }
    assert!(
        stale.is_empty(),
        "deploy/crds/ is not what control-plane/src/api generates. Regenerate it with\n  \
         cargo run -p trellis-control -- crds --out deploy/crds\n\
         (or TRELLIS_UPDATE_CRDS=1 cargo test -p trellis-control --test crds)\n\n{}",
        stale.join("\n")
    );

    // Nothing else is there, and the kustomization installs exactly these.
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut generated: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    generated.sort();
    assert_eq!(
        on_disk, generated,
        "files in deploy/crds/ that are not generated"
    );
    let kustomization: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(
        listed, generated,
        "deploy/crds/kustomization.yaml resources"
    );
}

/// `trellis-control crds` prints the same YAML, and `--out` writes the same files,
/// without the flags the server needs.
#[test]
fn the_crds_subcommand() {
    let bin = env!("CARGO_BIN_EXE_trellis-control");
    let files = api::crd_files().unwrap();
    let output = std::process::Command::new(bin)
        .arg("crds")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    let texts: Vec<&str> = files.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(printed, texts.join("---\n"));
    let docs: Vec<CustomResourceDefinition> = serde_yaml_ng::Deserializer::from_str(&printed)
        .map(|doc| CustomResourceDefinition::deserialize(doc).unwrap())
        .collect();
    assert_eq!(docs, api::crds());

    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(bin)
        .args(["crds", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (name, text) in &files {
        assert_eq!(
            &std::fs::read_to_string(dir.path().join(name)).unwrap(),
            text
        );
    }
    let output = std::process::Command::new(bin)
        .args(["crds", "--out", "/nonexistent/dir"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("writing /nonexistent/dir/"));
}

/// The first line where `a` and `b` differ, for the failure message.
fn first_difference(a: &str, b: &str) -> String {
    let mut a_lines = a.lines();
    let mut b_lines = b.lines();
    for n in 1.. {
        match (a_lines.next(), b_lines.next()) {
            (None, None) => break,
            (x, y) if x == y => {}
            (x, y) => {
                return format!(
                    "  line {n}: checked in {:?}, generated {:?}",
                    x.unwrap_or("<end>"),
                    y.unwrap_or("<end>")
                );
            }
        }
    }
    "  (same lines, different line endings)".to_owned()
}

#[test]
fn the_drift_check_sees_a_changed_file() {
    let (name, text) = &api::crd_files().unwrap()[0];
    let edited = text.replace("maxLength: 63", "maxLength: 64");
    assert_ne!(&edited, text, "{name} has a maxLength to edit");
    assert!(first_difference(&edited, text).contains("maxLength: 64"));
}

fn crd(kind: &str) -> CustomResourceDefinition {
    api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn schema_of(kind: &str) -> Value {
    let crd = crd(kind);
    let schema = crd.spec.versions[0]
        .schema
        .clone()
        .unwrap()
        .open_api_v3_schema;
    serde_json::to_value(schema.unwrap()).unwrap()
}

#[test]
fn the_crds() {
    for (kind, plural, short, columns) in [
        (
            "TrafficPolicy",
            "trafficpolicies",
            "tp",
            &["Target", "Algorithm", "Accepted", "Age"][..],
        ),
        (
            "AuthorizationPolicy",
            "authorizationpolicies",
            "authz",
            &["Action", "Accepted", "Age"],
        ),
        (
            "PeerAuthentication",
            "peerauthentications",
            "pa",
            &["Mode", "Accepted", "Age"],
        ),
    ] {
        let crd = crd(kind);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.trellis.io").as_str())
        );
        assert_eq!(
            crd.metadata.labels.unwrap()["app.kubernetes.io/part-of"],
            "trellis"
        );
        assert_eq!(crd.spec.group, "trellis.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(crd.spec.names.short_names, Some(vec![short.to_owned()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["trellis".to_owned()]));
        assert_eq!(crd.spec.versions.len(), 1);
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.served && v.storage);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let names: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, columns, "{kind}");
        // Every column's path is in the schema (a typo shows an empty column).
        let schema = schema_of(kind);
        for column in v.additional_printer_columns.iter().flatten() {
            let path = column.json_path.split('[').next().unwrap();
            if path.starts_with(".metadata") {
                continue;
            }
            let mut node = &schema;
            for part in path.trim_start_matches('.').split('.') {
                node = node["properties"]
                    .get(part)
                    .unwrap_or_else(|| panic!("{kind} column {}: no {part}", column.name));
                if node["type"] == "array" {
                    node = &node["items"];
                }
            }
        }
        let status = &schema["properties"]["status"]["properties"];
        assert_eq!(status["observedGeneration"]["type"], "integer");
        assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
        check_structural(&v.schema.clone().unwrap().open_api_v3_schema.unwrap(), kind);
    }
}

/// A structural schema (what apiextensions/v1 requires, and a little more): every
/// node has a type, no `$ref` or `patternProperties`, no `additionalProperties`
/// beside `properties`, enum values of the node's type.
fn check_structural(schema: &JSONSchemaProps, path: &str) {
    let json = serde_json::to_value(schema).unwrap();
    assert!(schema.ref_path.is_none(), "{path}: $ref is not allowed");
    assert!(
        json.get("patternProperties").is_none(),
        "{path}: patternProperties is not allowed"
    );
    assert!(
        schema.type_.is_some() || schema.x_kubernetes_int_or_string == Some(true),
        "{path}: no type"
    );
    assert!(
        !(schema.properties.is_some() && schema.additional_properties.is_some()),
        "{path}: properties and additionalProperties"
    );
    for value in schema.enum_.iter().flatten() {
        let ok = match schema.type_.as_deref() {
            Some("string") => value.0.is_string(),
            Some("integer") => value.0.is_i64() || value.0.is_u64(),
            _ => true,
        };
        assert!(
            ok,
            "{path}: enum value {} is not a {:?}",
            value.0, schema.type_
        );
    }
    for (k, s) in schema.properties.iter().flatten() {
        check_structural(s, &format!("{path}.{k}"));
    }
    for (key, sub) in [("items", "[]"), ("additionalProperties", "{}")] {
        if let Some(inner) = json.get(key).filter(|v| v.is_object()) {
            let inner: JSONSchemaProps = serde_json::from_value(inner.clone()).unwrap();
            check_structural(&inner, &format!("{path}{sub}"));
        }
    }
}

/// What the API server's OpenAPI validation would say about `value`: types,
/// enums, required fields, unknown fields (which it would prune), lengths, ranges
/// and patterns. `x-kubernetes-validations` (CEL) are [`cel_errors`]'.
fn schema_errors(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    let ty = schema["type"].as_str().unwrap_or_default();
    if value.is_null() {
        if schema["nullable"] != true {
            out.push(format!("{path}: must not be null"));
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!(
            "{path}: Unsupported value: {value}: supported values: {allowed:?}"
        ));
    }
    let number = |key: &str| schema[key].as_f64();
    match (ty, value) {
        ("object", Value::Object(map)) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                let key = required.as_str().unwrap();
                if !map.contains_key(key) {
                    out.push(format!("{path}.{key}: Required value"));
                }
            }
            if let Some(max) = number("maxProperties")
                && map.len() as f64 > max
            {
                out.push(format!(
                    "{path}: Too many: {} must have at most {max} items",
                    map.len()
                ));
            }
            for (k, v) in map {
                let p = format!("{path}.{k}");
                if let Some(s) = schema["properties"].get(k) {
                    schema_errors(v, s, &p, out);
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    schema_errors(v, s, &p, out);
                } else {
                    out.push(format!(
                        "{p}: unknown field (the API server would prune it)"
                    ));
                }
            }
        }
        ("array", Value::Array(items)) => {
            if let Some(min) = number("minItems")
                && (items.len() as f64) < min
            {
                out.push(format!(
                    "{path}: Invalid value: should have at least {min} items"
                ));
            }
            if let Some(max) = number("maxItems")
                && items.len() as f64 > max
            {
                out.push(format!("{path}: Too many: must have at most {max} items"));
            }
            for (i, v) in items.iter().enumerate() {
                schema_errors(v, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        ("string", Value::String(s)) => {
            let len = s.chars().count() as f64;
            if number("minLength").is_some_and(|min| len < min) {
                out.push(format!("{path}: Invalid value: {s:?}: too short"));
            }
            if number("maxLength").is_some_and(|max| len > max) {
                out.push(format!("{path}: Too long: {s:?}"));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && !regex::Regex::new(pattern).unwrap().is_match(s)
            {
                out.push(format!(
                    "{path}: Invalid value: {s:?}: should match '{pattern}'"
                ));
            }
        }
        ("integer", Value::Number(n)) | ("number", Value::Number(n)) => {
            if ty == "integer" && !(n.is_i64() || n.is_u64()) {
                out.push(format!("{path}: Invalid value: {n}: must be an integer"));
            }
            let n = n.as_f64().unwrap();
            if let Some(min) = number("minimum") {
                let exclusive = schema["exclusiveMinimum"] == true;
                if n < min || (exclusive && n == min) {
                    out.push(format!(
                        "{path}: Invalid value: {n}: should be greater than {}{min}",
                        if exclusive { "" } else { "or equal to " }
                    ));
                }
            }
            if let Some(max) = number("maximum")
                && n > max
            {
                out.push(format!(
                    "{path}: Invalid value: {n}: should be less than or equal to {max}"
                ));
            }
        }
        ("boolean", Value::Bool(_)) => {}
        (ty, v) => out.push(format!("{path}: Invalid value: {v}: must be of type {ty}")),
    }
}

/// The CEL rules' verdicts, as `path: message`.
fn cel_errors(schema: &Value, object: &Value) -> Vec<String> {
    match kube_cel::validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// Everything the API server would reject `object` (a whole policy) for.
fn admission_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap();
    let schema = schema_of(kind);
    let mut body = object.clone();
    // The API server checks these itself; the CRD schema leaves them out.
    for key in ["apiVersion", "kind", "metadata"] {
        body.as_object_mut().unwrap().remove(key);
    }
    let mut out = Vec::new();
    schema_errors(&body, &schema, "", &mut out);
    out.extend(cel_errors(&schema, &body));
    out
}

/// What the control plane says about `object`: a parse error, or `validate`'s.
fn rust_errors(object: &Value) -> Vec<String> {
    fn check<T: serde::de::DeserializeOwned>(
        object: &Value,
        validate: impl Fn(&T) -> Result<(), Vec<FieldError>>,
    ) -> Vec<String> {
        match serde_json::from_value::<T>(object.clone()) {
            Err(e) => vec![e.to_string()],
            Ok(policy) => match validate(&policy) {
                Ok(()) => Vec::new(),
                Err(errors) => errors.iter().map(ToString::to_string).collect(),
            },
        }
    }
    match object["kind"].as_str().unwrap() {
        "TrafficPolicy" => check(object, TrafficPolicy::validate),
        "AuthorizationPolicy" => check(object, AuthorizationPolicy::validate),
        "PeerAuthentication" => check(object, PeerAuthentication::validate),
        other => panic!("not a Trellis policy kind: {other}"),
    }
}

fn object(kind: &str, spec: Value) -> Value {
    json!({
        "apiVersion": TRELLIS_API_VERSION, "kind": kind,
        "metadata": {"name": "x", "namespace": "demo", "generation": 3},
        "spec": spec,
        "status": {
            "observedGeneration": 3,
            "conditions": [{
                "type": "Accepted", "status": "False", "reason": "Invalid", "message": "m",
                "observedGeneration": 3, "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]
        }
    })
}

/// Full samples: every field of each Rust spec set somewhere (the Rust types deny
/// unknown fields, so a sample that parses names only real fields); see
/// `full_samples_set_every_rust_field`. Each is a valid policy.
fn full_samples() -> Vec<(&'static str, Value)> {
    vec![
        (
            "TrafficPolicy",
            json!({
                "targetRef": {"group": "", "kind": "Service", "name": "echo"},
                "loadBalancer": {"algorithm": "CONSISTENT_HASH", "consistentHash": {"header": "x-user"}},
                "retries": {
                    "attempts": 2,
                    "retryOn": ["connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes"],
                    "statusCodes": [503],
                    "grpcStatuses": ["UNAVAILABLE"],
                    "perTryTimeout": "500ms",
                    "backoff": {"baseInterval": "25ms", "maxInterval": "250ms"},
                    "budget": {"ratio": 0.2, "minRetriesPerSecond": 10, "ttl": "10s"},
                    "retryNonIdempotent": false
                },
                "timeouts": {"connect": "1s", "request": "1m30s", "idle": "1h"},
                "outlierDetection": {"consecutiveFailures": 5, "baseEjectionTime": "30s", "maxEjectionPercent": 50},
                "connectionLimits": {"maxConnections": 1024, "maxPendingRequests": 128}
            }),
        ),
        (
            "TrafficPolicy",
            json!({
                "targetRef": {"group": "core", "kind": "Service", "name": "echo"},
                "loadBalancer": {"algorithm": "CONSISTENT_HASH", "consistentHash": {"cookie": "session"}},
                "retries": {"attempts": 0, "backoff": {"maxInterval": "1.5s"}, "budget": {"ttl": "60s"}},
                "timeouts": {"connect": "0", "request": "0s", "idle": "2.5s"}
            }),
        ),
        (
            "AuthorizationPolicy",
            json!({
                "selector": {"matchLabels": {"app": "echo"}},
                "action": "DENY",
                "rules": [{
                    "from": [{"source": {"principals": ["spiffe://cluster.local/ns/demo/sa/client"], "namespaces": ["demo"]}}],
                    "to": [{"operation": {"ports": [8080], "methods": ["GET", "POST"], "paths": ["/admin/*", "/health"]}}],
                    "when": [{"key": "request.headers[x-env]", "values": ["prod", "*-test"]}]
                }, {}]
            }),
        ),
        (
            "PeerAuthentication",
            json!({
                "selector": {"matchLabels": {"app": "legacy"}},
                "mtls": {"mode": "STRICT"},
                "portLevelMtls": {"9100": {"mode": "PERMISSIVE"}, "65535": {"mode": "DISABLE"}}
            }),
        ),
    ]
}

/// Every Trellis policy under `dir` (`*.yaml`, recursively, but `deploy/helm/`), with
/// its origin.
fn policies_under(dir: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join(dir)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            // deploy/helm: templates (rendered and checked by tests/tests/helm_chart.rs)
            // and a byte-for-byte copy of deploy/crds.
            if path.ends_with("deploy/helm") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
                let value = Value::deserialize(doc).unwrap();
                let kind = value["kind"].as_str().unwrap_or_default();
                if value["apiVersion"] == TRELLIS_API_VERSION && KINDS.contains(&kind) {
                    out.push((format!("{}#{i}", path.display()), value));
                }
            }
        }
    }
    out
}

#[test]
fn shipped_policies_pass_admission_and_validate() {
    let mut policies: Vec<(String, Value)> = full_samples()
        .into_iter()
        .enumerate()
        .map(|(i, (kind, spec))| (format!("full sample {i} ({kind})"), object(kind, spec)))
        .collect();
    for dir in ["examples", "deploy", "tests/kind"] {
        policies.extend(policies_under(dir));
    }
    let kinds: BTreeSet<&str> = policies
        .iter()
        .filter(|(origin, _)| !origin.starts_with("full sample"))
        .map(|(_, p)| p["kind"].as_str().unwrap())
        .collect();
    assert!(!kinds.is_empty(), "the repository ships policies");
    let mut errors = Vec::new();
    for (origin, policy) in &policies {
        for e in admission_errors(policy) {
            errors.push(format!("{origin}: schema: {e}"));
        }
        for e in rust_errors(policy) {
            errors.push(format!("{origin}: Rust: {e}"));
        }
        // What the Rust type writes back is admitted too (the kube registry's
        // status writes, a controller's apply).
        let again = match policy["kind"].as_str().unwrap() {
            "TrafficPolicy" => serde_json::to_value(
                serde_json::from_value::<TrafficPolicy>(policy.clone()).unwrap(),
            ),
            "AuthorizationPolicy" => serde_json::to_value(
                serde_json::from_value::<AuthorizationPolicy>(policy.clone()).unwrap(),
            ),
            _ => serde_json::to_value(
                serde_json::from_value::<PeerAuthentication>(policy.clone()).unwrap(),
            ),
        }
        .unwrap();
        for e in admission_errors(&again) {
            errors.push(format!("{origin} (written back): schema: {e}"));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Mistakes the API server rejects at admission, with (part of) its message; the
/// Rust types reject each of them too.
#[test]
fn the_schemas_reject_what_they_can() {
    let tp = |patch: Value| {
        let mut spec = json!({"targetRef": {"kind": "Service", "name": "echo"}});
        merge(&mut spec, patch);
        object("TrafficPolicy", spec)
    };
    let ap = |spec: Value| object("AuthorizationPolicy", spec);
    let pa = |spec: Value| object("PeerAuthentication", spec);
    let cases = [
        // Enums.
        (
            tp(json!({"loadBalancer": {"algorithm": "RANDOM"}})),
            ".spec.loadBalancer.algorithm: Unsupported value: \"RANDOM\"",
        ),
        (
            tp(json!({"targetRef": {"kind": "Deployment"}})),
            ".spec.targetRef.kind: Unsupported value",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "retryOn": ["sometimes"]}})),
            ".spec.retries.retryOn[0]: Unsupported value",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "grpcStatuses": ["unavailable"]}})),
            ".spec.retries.grpcStatuses[0]: Unsupported value",
        ),
        (
            ap(json!({"action": "AUDIT"})),
            ".spec.action: Unsupported value: \"AUDIT\"",
        ),
        (
            ap(json!({"rules": [{"to": [{"operation": {"methods": ["get"]}}]}]})),
            "methods[0]: Unsupported value",
        ),
        (
            pa(json!({"mtls": {"mode": "ON"}})),
            ".spec.mtls.mode: Unsupported value: \"ON\"",
        ),
        // Required fields.
        (
            object("TrafficPolicy", json!({})),
            ".spec.targetRef: Required value",
        ),
        (
            tp(json!({"retries": {"perTryTimeout": "1s"}})),
            ".spec.retries.attempts: Required value",
        ),
        (
            ap(json!({"rules": [{"when": [{"key": "request.headers[x]"}]}]})),
            ".values: Required value",
        ),
        // Patterns and lengths.
        (
            tp(json!({"targetRef": {"name": "Echo"}})),
            ".spec.targetRef.name: Invalid value: \"Echo\"",
        ),
        (
            tp(json!({"targetRef": {"group": "apps"}})),
            ".spec.targetRef.group: Invalid value",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "perTryTimeout": "5 sec"}})),
            ".spec.retries.perTryTimeout: Invalid value: \"5 sec\"",
        ),
        (
            tp(json!({"timeouts": {"request": "-1s"}})),
            ".spec.timeouts.request: Invalid value",
        ),
        (
            tp(json!({"timeouts": {"idle": "10"}})),
            ".spec.timeouts.idle: Invalid value",
        ),
        (
            tp(
                json!({"loadBalancer": {"algorithm": "CONSISTENT_HASH", "consistentHash": {"header": "x user"}}}),
            ),
            "consistentHash.header: Invalid value",
        ),
        (
            ap(json!({"rules": [{"to": [{"operation": {"paths": ["api/*"]}}]}]})),
            "paths[0]: Invalid value: \"api/*\"",
        ),
        (
            ap(json!({"rules": [{"to": [{"operation": {"paths": ["/a*b"]}}]}]})),
            "paths[0]: Invalid value",
        ),
        (
            ap(json!({"rules": [{"from": [{"source": {"namespaces": ["Demo"]}}]}]})),
            "namespaces[0]: Invalid value",
        ),
        (
            ap(json!({"rules": [{"when": [{"key": "source.ip", "values": ["x"]}]}]})),
            ".key: Invalid value: \"source.ip\"",
        ),
        (
            ap(json!({"rules": [{"when": [{"key": "request.headers[x]", "values": []}]}]})),
            ".values: Invalid value: should have at least",
        ),
        (
            tp(
                json!({"retries": {"attempts": 1, "retryOn": ["5xx", "5xx", "5xx", "5xx", "5xx", "5xx"]}}),
            ),
            ".spec.retries.retryOn: Too many",
        ),
        // Ranges.
        (
            tp(
                json!({"retries": {"attempts": 1, "retryOn": ["retriable-status-codes"], "statusCodes": [600]}}),
            ),
            "statusCodes[0]: Invalid value: 600",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "budget": {"ratio": 0}}})),
            ".spec.retries.budget.ratio: Invalid value: 0: should be greater than 0",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "budget": {"ratio": 1.5}}})),
            ".spec.retries.budget.ratio: Invalid value: 1.5",
        ),
        (
            tp(json!({"outlierDetection": {"maxEjectionPercent": 101}})),
            ".spec.outlierDetection.maxEjectionPercent: Invalid value: 101",
        ),
        (
            tp(json!({"outlierDetection": {"consecutiveFailures": 0}})),
            ".spec.outlierDetection.consecutiveFailures: Invalid value: 0",
        ),
        (
            tp(json!({"connectionLimits": {"maxConnections": 0}})),
            ".spec.connectionLimits.maxConnections: Invalid value: 0",
        ),
        (
            ap(json!({"rules": [{"to": [{"operation": {"ports": [0]}}]}]})),
            "ports[0]: Invalid value: 0",
        ),
        // Numbers serde could not read, which would stall the kube registry's watch.
        (
            tp(json!({"retries": {"attempts": 4_294_967_296_u64}})),
            ".spec.retries.attempts: Invalid value: 4294967296",
        ),
        (
            tp(json!({"connectionLimits": {"maxPendingRequests": 4_294_967_296_u64}})),
            ".spec.connectionLimits.maxPendingRequests: Invalid value",
        ),
        // CEL rules between fields.
        (
            tp(json!({"loadBalancer": {"algorithm": "CONSISTENT_HASH"}})),
            "consistentHash is required with algorithm CONSISTENT_HASH, and only then",
        ),
        (
            tp(json!({"loadBalancer": {"consistentHash": {"header": "x-user"}}})),
            "consistentHash is required with algorithm CONSISTENT_HASH, and only then",
        ),
        (
            tp(
                json!({"loadBalancer": {"algorithm": "CONSISTENT_HASH", "consistentHash": {"header": "a", "cookie": "b"}}}),
            ),
            "set exactly one of header and cookie",
        ),
        (
            tp(json!({"loadBalancer": {"algorithm": "CONSISTENT_HASH", "consistentHash": {}}})),
            "set exactly one of header and cookie",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "retryOn": ["retriable-status-codes"]}})),
            "statusCodes is required with retryOn retriable-status-codes",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "statusCodes": [503]}})),
            "statusCodes is required with retryOn retriable-status-codes",
        ),
        (
            tp(
                json!({"retries": {"attempts": 1, "backoff": {"baseInterval": "1s", "maxInterval": "500ms"}}}),
            ),
            "maxInterval must not be less than baseInterval",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "backoff": {"baseInterval": "1s"}}})),
            "maxInterval must not be less than baseInterval",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "backoff": {"baseInterval": "0s"}}})),
            "baseInterval must be more than 0",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "budget": {"ttl": "2m"}}})),
            "must be 1s to 60s",
        ),
        (
            tp(json!({"retries": {"attempts": 1, "budget": {"ttl": "500ms"}}})),
            "must be 1s to 60s",
        ),
        (
            pa(json!({"portLevelMtls": {"9100": {"mode": "STRICT"}}})),
            "portLevelMtls needs a selector",
        ),
        (
            pa(
                json!({"selector": {"matchLabels": {}}, "portLevelMtls": {"9100": {"mode": "STRICT"}}}),
            ),
            "portLevelMtls needs a selector",
        ),
        (
            pa(
                json!({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}}),
            ),
            "keys must be ports (1-65535)",
        ),
        (
            pa(
                json!({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"70000": {"mode": "STRICT"}}}),
            ),
            "keys must be ports (1-65535)",
        ),
    ];
    let mut failures = Vec::new();
    for (policy, want) in &cases {
        let spec = &policy["spec"];
        let admission = admission_errors(policy);
        if !admission.iter().any(|e| e.contains(want)) {
            failures.push(format!(
                "{spec}: want {want:?}, the API server would say {admission:?}"
            ));
        }
        if rust_errors(policy).is_empty() {
            failures.push(format!(
                "{spec}: the schema rejects it but the Rust types accept it"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Merges `patch` into `base` (objects key by key, anything else replaced).
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (k, v) in patch {
                merge(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (base, patch) => *base = patch,
    }
}

/// The schema validator itself: it must see what it is for, or the tests above
/// could pass by seeing nothing.
#[test]
fn the_schema_check_catches_mistakes() {
    let schema = schema_of("TrafficPolicy");
    let mut errors = Vec::new();
    let body = json!({"spec": {"targetRef": {"kind": "Service", "name": "a"}, "retries": {"attempts": "1", "jitter": "1s"}}});
    schema_errors(&body, &schema, "", &mut errors);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains(".spec.retries.attempts: Invalid value: \"1\": must be of type integer"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains(".spec.retries.jitter: unknown field"),
        "{errors:?}"
    );
    let ok = json!({"spec": {"targetRef": {"kind": "Service", "name": "a"}}});
    assert_eq!(
        admission_errors(&object("TrafficPolicy", ok["spec"].clone())),
        Vec::<String>::new()
    );
}

/// Keeps `full_samples` complete: each spec type is destructured without `..`, so
/// a field added in Rust stops this from compiling until a sample (and so the
/// admission check) covers it; every optional field must be set in some sample.
#[test]
fn full_samples_set_every_rust_field() {
    use trellis_control::api::WorkloadSelector;
    use trellis_control::api::authorization_policy::{
        AuthorizationPolicySpec, Condition, Operation, Rule, RuleFrom, RuleTo, Source,
    };
    use trellis_control::api::peer_authentication::{Mtls, PeerAuthenticationSpec};
    use trellis_control::api::traffic_policy::{
        BackoffSpec, ConnectionLimitsSpec, ConsistentHashSpec, LoadBalancerSpec,
        OutlierDetectionSpec, RetriesSpec, RetryBudgetSpec, TargetRef, TimeoutsSpec,
        TrafficPolicySpec,
    };

    let mut set = BTreeSet::new();
    let mut mark = |field: &'static str, is_set: bool| {
        if is_set {
            set.insert(field);
        }
    };
    for (kind, spec) in full_samples() {
        match kind {
            "TrafficPolicy" => {
                let TrafficPolicySpec {
                    target_ref,
                    load_balancer,
                    retries,
                    timeouts,
                    outlier_detection,
                    connection_limits,
                } = serde_json::from_value(spec).unwrap();
                let TargetRef {
                    group,
                    kind: _,
                    name: _,
                } = target_ref;
                mark("targetRef.group", group.is_some());
                if let Some(LoadBalancerSpec {
                    algorithm,
                    consistent_hash,
                }) = load_balancer
                {
                    mark("loadBalancer.algorithm", algorithm.is_some());
                    if let Some(ConsistentHashSpec { header, cookie }) = consistent_hash {
                        mark("consistentHash.header", header.is_some());
                        mark("consistentHash.cookie", cookie.is_some());
                    }
                }
                if let Some(RetriesSpec {
                    attempts: _,
                    retry_on,
                    status_codes,
                    grpc_statuses,
                    per_try_timeout,
                    backoff,
                    budget,
                    retry_non_idempotent: _,
                }) = retries
                {
                    mark("retries.retryOn", !retry_on.is_empty());
                    mark("retries.statusCodes", !status_codes.is_empty());
                    mark("retries.grpcStatuses", !grpc_statuses.is_empty());
                    mark("retries.perTryTimeout", per_try_timeout.is_some());
                    if let Some(BackoffSpec {
                        base_interval,
                        max_interval,
                    }) = backoff
                    {
                        mark("backoff.baseInterval", base_interval.is_some());
                        mark("backoff.maxInterval", max_interval.is_some());
                    }
                    if let Some(RetryBudgetSpec {
                        ratio,
                        min_retries_per_second,
                        ttl,
                    }) = budget
                    {
                        mark("budget.ratio", ratio.is_some());
                        mark(
                            "budget.minRetriesPerSecond",
                            min_retries_per_second.is_some(),
                        );
                        mark("budget.ttl", ttl.is_some());
                    }
                }
                if let Some(TimeoutsSpec {
                    connect,
                    request,
                    idle,
                }) = timeouts
                {
                    mark("timeouts.connect", connect.is_some());
                    mark("timeouts.request", request.is_some());
                    mark("timeouts.idle", idle.is_some());
                }
                if let Some(OutlierDetectionSpec {
                    consecutive_failures,
                    base_ejection_time,
                    max_ejection_percent,
                }) = outlier_detection
                {
                    mark(
                        "outlier.consecutiveFailures",
                        consecutive_failures.is_some(),
                    );
                    mark("outlier.baseEjectionTime", base_ejection_time.is_some());
                    mark("outlier.maxEjectionPercent", max_ejection_percent.is_some());
                }
                if let Some(ConnectionLimitsSpec {
                    max_connections,
                    max_pending_requests,
                }) = connection_limits
                {
                    mark("limits.maxConnections", max_connections.is_some());
                    mark("limits.maxPendingRequests", max_pending_requests.is_some());
                }
            }
            "AuthorizationPolicy" => {
                let AuthorizationPolicySpec {
                    selector,
                    action,
                    rules,
                } = serde_json::from_value(spec).unwrap();
                if let Some(WorkloadSelector { match_labels }) = selector {
                    mark("authz.selector", !match_labels.is_empty());
                }
                mark("authz.action", action.is_some());
                for Rule { from, to, when } in rules {
                    for RuleFrom { source } in from {
                        let Source {
                            principals,
                            namespaces,
                        } = source;
                        mark("source.principals", !principals.is_empty());
                        mark("source.namespaces", !namespaces.is_empty());
                    }
                    for RuleTo { operation } in to {
                        let Operation {
                            ports,
                            methods,
                            paths,
                        } = operation;
                        mark("operation.ports", !ports.is_empty());
                        mark("operation.methods", !methods.is_empty());
                        mark("operation.paths", !paths.is_empty());
                    }
                    for Condition { key: _, values } in when {
                        mark("when.values", !values.is_empty());
                    }
                }
            }
            "PeerAuthentication" => {
                let PeerAuthenticationSpec {
                    selector,
                    mtls,
                    port_level_mtls,
                } = serde_json::from_value(spec).unwrap();
                if let Some(WorkloadSelector { match_labels }) = selector {
                    mark("peer.selector", !match_labels.is_empty());
                }
                if let Some(Mtls { mode }) = mtls {
                    mark("peer.mtls.mode", mode.is_some());
                }
                for Mtls { mode } in port_level_mtls.into_values() {
                    mark("peer.portLevelMtls.mode", mode.is_some());
                }
            }
            other => panic!("no sample check for {other}"),
        }
    }
    let want = [
        "targetRef.group",
        "loadBalancer.algorithm",
        "consistentHash.header",
        "consistentHash.cookie",
        "retries.retryOn",
        "retries.statusCodes",
        "retries.grpcStatuses",
        "retries.perTryTimeout",
        "backoff.baseInterval",
        "backoff.maxInterval",
        "budget.ratio",
        "budget.minRetriesPerSecond",
        "budget.ttl",
        "timeouts.connect",
        "timeouts.request",
        "timeouts.idle",
        "outlier.consecutiveFailures",
        "outlier.baseEjectionTime",
        "outlier.maxEjectionPercent",
        "limits.maxConnections",
        "limits.maxPendingRequests",
        "authz.selector",
        "authz.action",
        "source.principals",
        "source.namespaces",
        "operation.ports",
        "operation.methods",
        "operation.paths",
        "when.values",
        "peer.selector",
        "peer.mtls.mode",
        "peer.portLevelMtls.mode",
    ];
    let missing: Vec<&str> = want.iter().copied().filter(|f| !set.contains(f)).collect();
    assert!(missing.is_empty(), "no full sample sets {missing:?}");
}
