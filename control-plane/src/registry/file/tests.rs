#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::model::{AppProtocol, Endpoint, ServiceKey, TargetPort};
use trellis_identity::SpiffeId;

const TD: &str = "cluster.local";

pub(super) fn write_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn load(files: &[(&str, &str)]) -> Result<MeshSnapshot, Vec<RegistryError>> {
    let dir = write_dir(files);
    load_dir(dir.path(), TD)
}

/// The errors, as (file name, line, reason).
fn errors(files: &[(&str, &str)]) -> Vec<(String, Option<usize>, String)> {
    let errors = load(files).expect_err("the folder should be rejected");
    errors
        .into_iter()
        .map(|e| {
            let name = e.file.file_name().unwrap().to_string_lossy().into_owned();
            (name, e.line, e.reason)
        })
        .collect()
}

fn one_error(files: &[(&str, &str)]) -> (String, Option<usize>, String) {
    let mut errors = errors(files);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.remove(0)
}

fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

const SERVICES: &str = "\
---
# the echo service
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: demo
  uid: 0b5c7d3e
  resourceVersion: \"42\"
  annotations: {owner: me}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  sessionAffinity: None
  ports:
  - name: http-web
    port: 80
    targetPort: web
  - name: grpc
    port: 9090
    targetPort: 19090
    appProtocol: kubernetes.io/h2c
  selector:
    app: echo
status:
  loadBalancer: {}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: None
  ports:
  - port: 5432
    protocol: TCP
    appProtocol: opaque
---
# nothing but a comment
---
apiVersion: v1
kind: Service
metadata: {name: legacy}
spec:
  clusterIPs: [10.96.0.20, \"fd00::20\"]
  ports:
  - {name: tcp-x, port: 7000}
";

const WORKLOADS: &str = "\
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: echo-1, namespace: demo, labels: {app: echo}}
spec:
  address: 10.0.0.1
  serviceAccount: echo
  ports: {web: 8080}
  weight: 3
  zone: z1
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: echo-2, namespace: demo}
spec:
  address: 127.0.0.1
  serviceAccount: echo
  labels: {app: echo}
  ports: {web: 8081}
  sidecarPort: 15106
  locality: eu/z2
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: echo-3, namespace: demo, labels: {app: echo, extra: x}}
spec: {address: 10.0.0.3, serviceAccount: echo}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: db-0, namespace: demo, labels: {app: db}}
spec: {address: 10.0.0.5, serviceAccount: db}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: legacy-0}
spec: {address: 10.0.0.9, serviceAccount: legacy, sidecarPort: 15006}
";

const SLICES: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-abc
  namespace: demo
  labels: {kubernetes.io/service-name: db}
  generateName: db-
addressType: IPv4
endpoints:
- addresses: [10.0.0.5]
  conditions: {ready: false, serving: true, terminating: false}
  nodeName: node-1
ports:
- {name: \"\", port: 5432, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-1
  labels: {kubernetes.io/service-name: legacy}
addressType: IPv4
endpoints:
- addresses: [10.0.0.9]
  targetRef: {kind: Pod, name: legacy-0, uid: abc}
  zone: zone-b
ports:
- {name: tcp-x, port: 7001, appProtocol: tcp}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-extra
  namespace: demo
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false}
  targetRef: {kind: WorkloadEntry, name: echo-1}
ports:
- {name: http-web, port: 8080}
";

const TOKENS: &str = "\
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {name: echo, namespace: demo}
spec: {serviceAccount: echo, token: s3cret, workload: echo-1}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {name: db, namespace: demo}
spec:
  serviceAccount: db
  # sha256(\"other\")
  tokenSha256: D9298A10D1B0735837DC4BD85DAC641B0F3CEF27A47E5D53A54F2F3F5B2FCFFA
";

fn good() -> Vec<(&'static str, &'static str)> {
    vec![
        ("services.yaml", SERVICES),
        ("workloads.yml", WORKLOADS),
        ("slices.yaml", SLICES),
        ("tokens.yaml", TOKENS),
        ("README.md", "not: [yaml"),
        (".hidden.yaml", "not: [yaml"),
    ]
}

#[test]
fn loads_a_valid_folder() {
    let snap = load(&good()).unwrap();

    assert_eq!(snap.services.len(), 3);
    let echo = &snap.services[&key("demo", "echo")];
    assert_eq!(echo.vips, vec![ip("10.96.0.10")]);
    assert_eq!(echo.selector.get("app").map(String::as_str), Some("echo"));
    assert_eq!(echo.ports[0].name, "http-web");
    assert_eq!(echo.ports[0].target_port, TargetPort::Name("web".into()));
    assert_eq!(echo.ports[0].protocol, AppProtocol::Http);
    assert_eq!(echo.ports[1].target_port, TargetPort::Number(19090));
    assert_eq!(echo.ports[1].protocol, AppProtocol::Http2);
    let db = &snap.services[&key("demo", "db")];
    assert!(db.vips.is_empty(), "headless");
    assert_eq!(db.ports[0].name, "");
    assert_eq!(db.ports[0].target_port, TargetPort::Number(5432));
    assert_eq!(db.ports[0].protocol, AppProtocol::Opaque);
    let legacy = &snap.services[&key("default", "legacy")];
    assert_eq!(legacy.vips, vec![ip("10.96.0.20"), ip("fd00::20")]);
    assert_eq!(legacy.ports[0].protocol, AppProtocol::Tcp);

    assert_eq!(snap.workloads.len(), 5);
    let names: Vec<_> = snap.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["legacy-0", "db-0", "echo-1", "echo-2", "echo-3"]);
    let echo2 = &snap.workloads[3];
    assert_eq!(echo2.identity, id("demo", "echo"));
    assert_eq!(echo2.labels.get("app").map(String::as_str), Some("echo"));
    assert_eq!((echo2.weight, echo2.zone.as_str()), (1, "eu/z2"));
    assert_eq!(echo2.sidecar_port, Some(15106));

    let ep = |a: &str, port: u16, sa: &str, weight: u32, zone: &str, ready: bool| Endpoint {
        address: ip(a),
        port,
        identity: Some(id("demo", sa)),
        weight,
        zone: zone.into(),
        ready,
        mesh_address: None,
        sidecar: true,
    };
    let mesh = |mut e: Endpoint, port: u16| {
        e.mesh_address = Some(SocketAddr::new(e.address, port));
        e
    };
    // The slice's entry for 10.0.0.1:8080 (not ready) wins over the selector's.
    // echo-3 has no port named `web`, so it only backs the numbered target port.
    assert_eq!(
        snap.endpoints[&(key("demo", "echo"), 80)],
        vec![
            ep("10.0.0.1", 8080, "echo", 3, "z1", false),
            mesh(ep("127.0.0.1", 8081, "echo", 1, "eu/z2", true), 15106),
        ]
    );
    assert_eq!(
        snap.endpoints[&(key("demo", "echo"), 9090)],
        vec![
            ep("10.0.0.1", 19090, "echo", 3, "z1", true),
            ep("10.0.0.3", 19090, "echo", 1, "", true),
            mesh(ep("127.0.0.1", 19090, "echo", 1, "eu/z2", true), 15106),
        ]
    );
    assert_eq!(
        snap.endpoints[&(key("demo", "db"), 5432)],
        vec![ep("10.0.0.5", 5432, "db", 1, "", false)]
    );
    let legacy_ep = Endpoint {
        identity: Some(id("default", "legacy")),
        ..mesh(ep("10.0.0.9", 7001, "legacy", 1, "zone-b", true), 15006)
    };
    assert_eq!(
        snap.endpoints[&(key("default", "legacy"), 7000)],
        vec![legacy_ep]
    );
    assert_eq!(snap.endpoints.len(), 4);

    assert_eq!(snap.bootstrap_tokens.len(), 2);
    let proves = |token: &str| {
        snap.bootstrap_token(token)
            .map(|t| (t.identity.clone(), t.workload_name()))
    };
    let echo_1 = trellis_identity::WorkloadName::new("demo", "echo-1");
    assert_eq!(proves("s3cret"), Some((id("demo", "echo"), Some(echo_1))));
    assert_eq!(proves("other"), Some((id("demo", "db"), None)));
    assert_eq!(proves("s3cret "), None);
    assert_eq!(snap.bootstrap_tokens[0].name, "demo/db");

    // Same folder, same snapshot.
    assert_eq!(load(&good()).unwrap(), snap);
}

#[test]
fn empty_folder_is_an_empty_mesh() {
    assert_eq!(load(&[]).unwrap(), MeshSnapshot::default());
}

#[test]
fn app_protocols() {
    use super::build::app_protocol as p;
    assert_eq!(p(Some("http"), "grpc"), AppProtocol::Http);
    assert_eq!(p(Some("kubernetes.io/http"), ""), AppProtocol::Http);
    assert_eq!(p(Some("http2"), ""), AppProtocol::Http2);
    assert_eq!(p(Some("grpc"), ""), AppProtocol::Grpc);
    assert_eq!(p(Some("tcp"), ""), AppProtocol::Tcp);
    assert_eq!(p(Some("opaque"), ""), AppProtocol::Opaque);
    assert_eq!(
        p(Some("kubernetes.io/ws"), "http"),
        AppProtocol::Unspecified
    );
    assert_eq!(p(None, "http"), AppProtocol::Http);
    assert_eq!(p(None, "http-web"), AppProtocol::Http);
    assert_eq!(p(None, "http2-x"), AppProtocol::Http2);
    assert_eq!(p(None, "grpc-x"), AppProtocol::Grpc);
    assert_eq!(p(None, "tcp-x"), AppProtocol::Tcp);
    assert_eq!(p(None, "https-x"), AppProtocol::Unspecified);
    assert_eq!(p(None, "web"), AppProtocol::Unspecified);
    assert_eq!(p(None, ""), AppProtocol::Unspecified);
}

#[test]
fn splits_documents_keeping_lines() {
    let docs = split_documents("---\n# c\n\na: 1\n---\n---  \r\n\nb: 2\n---\n# only\n");
    let got: Vec<_> = docs.iter().map(|d| (d.text, d.offset, d.start)).collect();
    assert_eq!(got, [("# c\n\na: 1\n", 1, 4), ("\nb: 2\n", 6, 8)]);
}

#[test]
fn strips_positions() {
    assert_eq!(
        strip_positions("spec: unknown field `prots` at line 3 column 5"),
        "spec: unknown field `prots`"
    );
    assert_eq!(
        strip_positions("a at line 1 column 2, b at line 3 column 4"),
        "a, b"
    );
    assert_eq!(strip_positions("at line x"), "at line x");
}

#[test]
fn display_names_file_and_line() {
    let e = RegistryError {
        file: "examples/mesh/echo.yaml".into(),
        line: Some(12),
        reason: "unknown field `prots`".into(),
    };
    assert_eq!(
        e.to_string(),
        "examples/mesh/echo.yaml:12: unknown field `prots`"
    );
    let e = RegistryError { line: None, ..e };
    assert_eq!(
        e.to_string(),
        "examples/mesh/echo.yaml: unknown field `prots`"
    );
}

mod errors;

#[test]
fn dual_stack_workloads_are_found_at_every_address() {
    let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIPs: [10.96.0.30, fd00:10:96::30]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web4, namespace: demo}
spec:
  clusterIP: 10.96.0.31
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: demo}
spec:
  clusterIP: fd00:10:96::32
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-v6, namespace: demo, labels: {kubernetes.io/service-name: api}}
addressType: IPv6
endpoints:
- addresses: [fd00:10:244::8]
ports: [{port: 8080}]
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: web-0, namespace: demo, labels: {app: web}}
spec: {address: 10.244.0.7, addresses: [10.244.0.7, fd00:10:244::7], serviceAccount: web}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {name: api-0, namespace: demo}
spec: {addresses: [10.244.0.8, fd00:10:244::8], serviceAccount: api}
";
    let snap = load(&[("mesh.yaml", yaml)]).unwrap();
    let api = snap.workloads.iter().find(|w| w.name == "api-0").unwrap();
    assert_eq!(
        api.address,
        ip("10.244.0.8"),
        "the first of addresses is primary"
    );
    let web = snap.workloads.iter().find(|w| w.name == "web-0").unwrap();
    assert_eq!(
        web.all_addresses().collect::<Vec<_>>(),
        [ip("10.244.0.7"), ip("fd00:10:244::7")]
    );
    let addrs = |name: &str| -> Vec<(IpAddr, Option<SpiffeId>)> {
        snap.endpoints[&(key("demo", name), 80)]
            .iter()
            .map(|e| (e.address, e.identity.clone()))
            .collect()
    };
    // Dual-stack Service: both addresses carry the workload's identity.
    assert_eq!(
        addrs("web"),
        [
            (ip("10.244.0.7"), Some(id("demo", "web"))),
            (ip("fd00:10:244::7"), Some(id("demo", "web")))
        ]
    );
    // IPv4-only Service: the IPv4 address only.
    assert_eq!(addrs("web4"), [(ip("10.244.0.7"), Some(id("demo", "web")))]);
    // An IPv6 slice without targetRef finds its workload by the IPv6 address.
    assert_eq!(
        addrs("api"),
        [(ip("fd00:10:244::8"), Some(id("demo", "api")))]
    );
    let err = one_error(&[(
        "w.yaml",
        "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\nmetadata: {name: x, namespace: demo}\nspec: {serviceAccount: x}\n",
    )]);
    assert!(err.2.contains("address"), "{err:?}");
}
