//! Every kind of error, with the file and line it is reported at.

use super::*;

const WL: &str = "\
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: w, namespace: demo, labels: {app: w}}
spec: {address: 10.0.0.1, serviceAccount: w}
";

fn e(file: &str, line: usize, reason: &str) -> (String, Option<usize>, String) {
    (file.into(), Some(line), reason.into())
}

#[test]
fn syntax_error_line_counts_earlier_documents() {
    let text = "\
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {}
---
apiVersion: v1
kind: Service
metadata:
  name: b: c
spec: {}
";
    let (file, line, reason) = one_error(&[("bad.yaml", text)]);
    assert_eq!((file.as_str(), line), ("bad.yaml", Some(9)));
    assert!(
        reason.contains("mapping values are not allowed"),
        "{reason}"
    );
    assert!(!reason.contains("at line"), "{reason}");
}

#[test]
fn unknown_field_is_rejected_but_not_in_metadata() {
    let text = "\
# echo
apiVersion: v1
kind: Service
metadata:
  name: echo
  creationTimestamp: null
  managedFields: [{manager: kubectl}]
spec:
  ports:
  - name: http
    port: 80
  prots: []
";
    let (file, line, reason) = one_error(&[("echo.yaml", text)]);
    assert_eq!((file.as_str(), line), ("echo.yaml", Some(12)));
    assert!(
        reason.starts_with("spec: unknown field `prots`, expected one of"),
        "{reason}"
    );
}

#[test]
fn unknown_kind() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {}\n---\n\n\
                apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
    assert_eq!(
        one_error(&[("k.yaml", text)]),
        e("k.yaml", 7, "unknown kind apps/v1/Deployment")
    );
    assert_eq!(
        one_error(&[("k.yaml", "metadata: {name: d}\n")]),
        e("k.yaml", 1, "missing apiVersion or kind")
    );
}

#[test]
fn bad_ip_points_at_the_value() {
    let text = WL.replace("10.0.0.1", "10.0.0.300");
    let (file, line, reason) = one_error(&[("w.yaml", &text)]);
    assert_eq!((file.as_str(), line), ("w.yaml", Some(4)));
    assert!(
        reason.contains("invalid IP address \"10.0.0.300\""),
        "{reason}"
    );

    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: vip\n";
    let (_, line, reason) = one_error(&[("s.yaml", text)]);
    assert_eq!(line, Some(5));
    assert!(reason.contains("invalid cluster IP \"vip\""), "{reason}");
}

#[test]
fn bad_spiffe_segment() {
    let text = WL.replace("serviceAccount: w", "serviceAccount: \"a/b\"");
    let (file, line, reason) = one_error(&[("w.yaml", &text)]);
    assert_eq!((file.as_str(), line), ("w.yaml", Some(1)));
    assert!(reason.contains("\"a/b\""), "{reason}");
}

const SVC: &str = "\
apiVersion: v1
kind: Service
metadata: {name: w, namespace: demo}
spec:
  ports: [{name: http, port: 80}]
";

#[test]
fn missing_workload_names_the_address() {
    let slice = "\
# slice
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, namespace: demo, labels: {kubernetes.io/service-name: w}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  targetRef: {kind: Pod, name: nope}
ports: [{name: http, port: 8080}]
";
    let (file, line, reason) = one_error(&[("a.yaml", SVC), ("b.yaml", WL), ("slice.yaml", slice)]);
    assert_eq!((file.as_str(), line), ("slice.yaml", Some(2)));
    assert!(reason.contains("10.0.0.2"), "{reason}");

    // Two workloads at one address and no targetRef: ambiguous.
    let wl2 = WL.replace("name: w,", "name: w2,");
    let errs = errors(&[
        ("a.yaml", SVC),
        ("b.yaml", WL),
        ("c.yaml", &wl2),
        ("slice.yaml", slice),
    ]);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].2.contains("10.0.0.1"), "{errs:#?}");
}

#[test]
fn slice_for_a_missing_service() {
    let slice = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, namespace: demo, labels: {kubernetes.io/service-name: ghost}}
addressType: IPv4
endpoints: null
ports: []
";
    let (file, line, reason) = one_error(&[("slice.yaml", slice)]);
    assert_eq!((file.as_str(), line), ("slice.yaml", Some(1)));
    assert!(reason.contains("demo/ghost"), "{reason}");
}

#[test]
fn duplicates_across_files() {
    let (file, line, reason) = one_error(&[("a.yaml", SVC), ("b.yaml", &format!("---\n{SVC}"))]);
    assert_eq!((file.as_str(), line), ("b.yaml", Some(2)));
    assert!(
        reason.starts_with("duplicate Service demo/w: first declared at "),
        "{reason}"
    );
    assert!(reason.ends_with("a.yaml:1"), "{reason}");
    // Same name, other kind: fine.
    load(&[("a.yaml", SVC), ("b.yaml", WL)]).unwrap();
}

#[test]
fn udp_port() {
    let text = format!("{SVC}  - {{name: dns, port: 53, protocol: UDP}}\n");
    let text = text.replace(
        "ports: [{name: http, port: 80}]",
        "ports:\n  - {name: http, port: 80}",
    );
    let (file, line, reason) = one_error(&[("udp.yaml", &text)]);
    assert_eq!((file.as_str(), line), ("udp.yaml", Some(7)));
    assert!(reason.contains("protocol UDP is not supported"), "{reason}");
}

#[test]
fn tokens() {
    let token = |spec: &str| {
        format!(
            "apiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\n\
             metadata: {{name: t}}\nspec: {{serviceAccount: sa, {spec}}}\n"
        )
    };
    let both = token(&format!("token: x, tokenSha256: {}", "a".repeat(64)));
    assert_eq!(
        one_error(&[("t.yaml", &both)]),
        e("t.yaml", 1, "set exactly one of token and tokenSha256")
    );
    let short = token("tokenSha256: abc");
    assert_eq!(
        one_error(&[("t.yaml", &short)]),
        e("t.yaml", 1, "tokenSha256 must be 64 hex digits")
    );
    let dup = format!(
        "{}---\n{}",
        token("token: x"),
        token("token: x").replace("name: t", "name: u")
    );
    let (_, line, reason) = one_error(&[("t.yaml", &dup)]);
    assert_eq!(line, Some(6));
    assert!(reason.contains("same token"), "{reason}");
}

#[test]
fn a_token_bound_to_a_workload_must_name_one_of_its_identity() {
    let entry = |name: &str, sa: &str| {
        format!(
            "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\n\
             metadata: {{name: {name}}}\nspec: {{address: 10.0.0.1, serviceAccount: {sa}}}\n"
        )
    };
    let token = |workload: &str| {
        format!(
            "apiVersion: trellis.io/v1alpha1\nkind: BootstrapToken\n\
             metadata: {{name: t}}\nspec: {{serviceAccount: sa, token: x, workload: {workload}}}\n"
        )
    };
    let (file, line, reason) = one_error(&[("t.yaml", &token("web-1"))]);
    assert_eq!((file.as_str(), line), ("t.yaml", Some(1)));
    assert!(reason.contains("does not exist"), "{reason}");
    let other_sa = format!("{}---\n{}", entry("web-1", "other"), token("web-1"));
    let (_, line, reason) = one_error(&[("t.yaml", &other_sa)]);
    assert_eq!(line, Some(6));
    assert!(
        reason.contains("runs as spiffe://cluster.local/ns/default/sa/other"),
        "{reason}"
    );
    let good = format!("{}---\n{}", entry("web-1", "sa"), token("web-1"));
    let snapshot = super::load(&[("t.yaml", &good)]).unwrap();
    assert_eq!(
        snapshot.bootstrap_tokens[0].workload.as_deref(),
        Some("web-1")
    );
}

#[test]
fn service_port_rules() {
    let svc = |ports: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  ports: {ports}\n")
    };
    let (_, line, reason) = one_error(&[("s.yaml", &svc("[{port: 80}, {name: b, port: 81}]"))]);
    assert_eq!(line, Some(1));
    assert!(reason.contains("needs a name"), "{reason}");
    let (_, _, reason) =
        one_error(&[("s.yaml", &svc("[{name: a, port: 80}, {name: a, port: 81}]"))]);
    assert!(reason.contains("declared twice"), "{reason}");
    let (_, line, _) = one_error(&[("s.yaml", &svc("[{name: a, port: 0}]"))]);
    assert_eq!(line, Some(5));
}

#[test]
fn all_errors_are_collected() {
    let errs = errors(&[
        (
            "a.yaml",
            "apiVersion: v1\nkind: Nope\n---\napiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {bad: 1}\n",
        ),
        ("b.yaml", "key: [unclosed\n"),
        ("c.yaml", &WL.replace("10.0.0.1", "nope")),
        ("d.yaml", "- not\n- an object\n"),
    ]);
    let at: Vec<_> = errs.iter().map(|(f, l, _)| (f.as_str(), *l)).collect();
    assert!(errs[3].2.contains("\"nope\""), "{errs:#?}");
    assert_eq!(
        at,
        [
            ("a.yaml", Some(1)),
            ("a.yaml", Some(7)),
            ("b.yaml", Some(2)),
            ("c.yaml", Some(4)),
            ("d.yaml", Some(1))
        ]
    );
}

#[test]
fn not_an_object() {
    let (_, line, reason) = one_error(&[("l.yaml", "# list\n- a\n")]);
    assert_eq!(line, Some(2));
    assert!(reason.contains("expected a Kubernetes object"), "{reason}");
}
