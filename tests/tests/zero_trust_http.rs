//! Zero trust at L7, tried as an attacker would (issue 11, items 1 and 4), on pods
//! that are network namespaces with real iptables:
//!
//! - `DENY paths ["/admin", "/admin/*"]` holds against every spelling a server
//!   normalizes back to `/admin/...` (the app here treats paths as nginx does), the
//!   app receives the normalized path, and ambiguous paths get 400;
//! - a forged `x-forwarded-client-cert` never reaches the app, over HTTP/1, HTTP/2,
//!   an Upgrade request or PERMISSIVE plaintext, while the real one (from the
//!   caller's certificate) does over mTLS.
//!
//! Needs root and network namespaces; elsewhere reported as ignored.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trellis_init::InitConfig;
use trellis_tests::{
    ChildHandle, NODE_IP, Pod, TestBed, run_root_tests, shared_dir, target_binary,
};

const APP: &str = env!("CARGO_BIN_EXE_trellis-testapp");
const READY: Duration = Duration::from_secs(15);
const WEB_VIP: &str = "10.96.0.20";
const WEB: &str = "web.default.svc.cluster.local";
const FORGED: &str =
    "By=spiffe://cluster.local/ns/default/sa/web;URI=spiffe://cluster.local/ns/default/sa/admin";
const REAL: &str =
    "By=spiffe://cluster.local/ns/default/sa/web;URI=spiffe://cluster.local/ns/default/sa/client";

fn main() {
    run_root_tests(&[
        (
            "path_bypasses_of_a_deny_policy_are_denied_or_refused",
            path_bypasses_of_a_deny_policy_are_denied_or_refused,
        ),
        (
            "forged_identity_headers_never_reach_the_app",
            forged_identity_headers_never_reach_the_app,
        ),
        (
            "a_real_nginx_behind_the_sidecar_is_not_bypassed",
            a_real_nginx_behind_the_sidecar_is_not_bypassed,
        ),
    ]);
}

/// `web` behind a sidecar (PERMISSIVE, so the unmeshed `plain` pod can call it in
/// plaintext) with the DENY policy; `client` meshed; `plain` without a sidecar.
struct Cluster {
    bed: TestBed,
    client: Pod,
    web: Pod,
    plain: Pod,
    _procs: Vec<ChildHandle>,
}

fn registry(client: &Pod, web: &Pod) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {WEB_VIP}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, appProtocol: http}}
  - {{name: http-nginx, port: 81, targetPort: 8081, appProtocol: http}}
  - {{name: undeclared, port: 8000, targetPort: 8080}}
---
apiVersion: trellis.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin", "/admin/*"]}}}}]
---
apiVersion: trellis.io/v1alpha1
kind: PeerAuthentication
metadata: {{name: web, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  mtls: {{mode: PERMISSIVE}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: web, namespace: default, labels: {{app: web}}}}
spec: {{address: {web_ip}, serviceAccount: web}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: web, namespace: default}}
spec: {{serviceAccount: web, token: web-token}}
---
apiVersion: trellis.io/v1alpha1
kind: WorkloadEntry
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{address: {client_ip}, serviceAccount: client}}
---
apiVersion: trellis.io/v1alpha1
kind: BootstrapToken
metadata: {{name: client, namespace: default}}
spec: {{serviceAccount: client, token: client-token}}
"#,
        web_ip = web.ip,
        client_ip = client.ip,
    )
}

/// nginx from Debian (`nginx-light`), if installed.
fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Serves `/admin/secret` and `/public/x` as files on 8081, with the path nginx
/// resolved and the raw one in response headers.
fn nginx_config(dir: &Path) -> Result<PathBuf> {
    let www = dir.join("www");
    for (file, text) in [
        ("admin/secret", "admin secret\n"),
        ("public/x", "public x\n"),
    ] {
        let path = www.join(file);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::write(path, text)?;
    }
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $request_uri $raw_path {{ "~^(?<p>[^?]*)" $p; }}
    server {{
        listen 8081;
        root {d}/www;
        default_type text/plain;
        add_header x-path $uri always;
        add_header x-raw-path $raw_path always;
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn cluster(name: &str) -> Result<Cluster> {
    let proxy = target_binary("trellis-proxy")?;
    let control = target_binary("trellis-control")?;
    let mut bed = TestBed::new(name)?;
    let client = bed.add_pod("client")?;
    let web = bed.add_pod("web")?;
    let plain = bed.add_pod("plain")?;
    bed.add_service("web", "default", WEB_VIP.parse()?)?;

    let files = shared_dir(bed.dir(), "files")?;
    let registry_dir = files.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    std::fs::write(registry_dir.join("mesh.yaml"), registry(&client, &web))?;
    for sa in ["web", "client"] {
        std::fs::write(files.join(format!("{sa}.token")), format!("{sa}-token"))?;
    }
    let state = files.join("state");
    let node = bed.node().clone();
    let grpc = format!("{NODE_IP}:15010");
    let mut procs = vec![bed.spawn(
        &node,
        None,
        control.to_str().context("path")?,
        &[
            "--registry-dir",
            registry_dir.to_str().context("path")?,
            "--state-dir",
            state.to_str().context("path")?,
            "--grpc-addr",
            &grpc,
            "--admin-addr",
            &format!("{NODE_IP}:15014"),
        ],
    )?];
    procs[0].wait_for_log("control plane started", READY)?;
    let root = state.join("root-cert.pem");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755))?;

    let app = bed.spawn(
        &web,
        None,
        APP,
        &["http-inspect", "--listen", "0.0.0.0:8080"],
    )?;
    app.wait_listening(READY)?;
    procs.push(app);
    if let Some(nginx) = nginx_binary() {
        let dir = bed.dir().join("nginx");
        std::fs::create_dir_all(&dir)?;
        let conf = nginx_config(&dir)?;
        let nginx = nginx.to_str().context("path")?;
        let conf = conf.to_str().context("path")?;
        procs.push(bed.spawn(&web, None, nginx, &["-e", "stderr", "-c", conf])?);
    }

    for pod in [&web, &client] {
        let sa = pod.name.as_str();
        bed.apply_init(pod, &InitConfig::default())?;
        let token = files.join(format!("{sa}.token"));
        procs.push(bed.spawn_env(
            pod,
            Some(1337),
            proxy.to_str().context("path")?,
            &[
                "run",
                "--namespace",
                "default",
                "--service-account",
                sa,
                "--control-addr",
                &grpc,
                "--ca-root",
                root.to_str().context("path")?,
                "--bootstrap-token-file",
                token.to_str().context("path")?,
                "--outbound-addr",
                "0.0.0.0:15001",
            ],
            &[("RUST_LOG", "info,trellis_proxy=debug")],
        )?);
    }
    let c = Cluster {
        bed,
        client,
        web,
        plain,
        _procs: procs,
    };
    for pod in [&c.client, &c.web] {
        c.eventually(&format!("the proxy in {} is ready", pod.name), || {
            let out = c.bed.exec(
                pod,
                APP,
                &["http-get", "http://127.0.0.1:15000/ready", "--timeout", "3"],
            )?;
            Ok(String::from_utf8_lossy(&out.stdout).contains("HTTP 200"))
        })?;
    }
    // Policy and PeerAuthentication have arrived once a meshed call to /admin is
    // denied and a plaintext one to a public path goes through.
    c.eventually("web's proxy enforces its policy", || {
        Ok(c.mesh(&c.client, "/admin/secret", &[])?.status == 403
            && c.plaintext("/public/x", &[])?.status == 200)
    })?;
    Ok(c)
}

/// What `trellis-testapp raw-http` printed.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// `name: value` lines, names lowercased.
    headers: Vec<String>,
    body: String,
}

impl Answer {
    fn parse(out: &str) -> Result<Answer> {
        let mut lines = out.lines();
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP "))
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("no status in {out:?}"))?;
        let mut headers = Vec::new();
        let mut body = String::new();
        for line in lines {
            match line.strip_prefix("< ") {
                Some(h) if body.is_empty() => headers.push(match h.split_once(':') {
                    Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
                    None => h.to_owned(),
                }),
                _ => {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// The values of one `key=value` line of the inspecting app's body.
    fn seen(&self, key: &str) -> Vec<&str> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find_map(|h| h.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    }
}

impl Cluster {
    fn eventually(&self, what: &str, check: impl FnMut() -> Result<bool>) -> Result<()> {
        self.bed.eventually(what, READY, check)
    }

    fn raw(&self, from: &Pod, args: &[&str]) -> Result<Answer> {
        let out = self.bed.exec(from, APP, &[&["raw-http"], args].concat())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        Answer::parse(&stdout).with_context(|| {
            format!(
                "raw-http {} from {}: {}",
                args.join(" "),
                from.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// An HTTP/1.1 request from a meshed pod to the web Service (over mTLS).
    fn mesh(&self, from: &Pod, target: &str, extra: &[&str]) -> Result<Answer> {
        self.raw(
            from,
            &[&[&format!("{WEB}:80") as &str, target], extra].concat(),
        )
    }

    /// An HTTP/1.1 request from a meshed pod to nginx through the web Service.
    fn mesh_nginx(&self, from: &Pod, target: &str) -> Result<Answer> {
        self.raw(from, &[&format!("{WEB}:81") as &str, target])
    }

    /// An HTTP/1.1 request from the unmeshed pod straight to web's pod IP, in
    /// plaintext (PERMISSIVE).
    fn plaintext(&self, target: &str, extra: &[&str]) -> Result<Answer> {
        let addr = format!("{}:8080", self.web.ip);
        self.raw(&self.plain, &[&[addr.as_str(), target], extra].concat())
    }
}

/// What each spelling must get: the status, and for 200 the path the app received.
const PATHS: &[(&str, u16, Option<&str>)] = &[
    ("/public/x", 200, Some("/public/x")),
    ("/public//x?a=%2F&b=/../c", 200, Some("/public/x")),
    ("/public/./y/../x", 200, Some("/public/x")),
    // Paths are case-sensitive, here and in nginx: /ADMIN is another resource.
    ("/ADMIN/secret", 200, Some("/ADMIN/secret")),
    ("/admin", 403, None),
    ("/admin/secret", 403, None),
    ("//admin/secret", 403, None),
    ("/admin//secret", 403, None),
    ("/%61dmin/secret", 403, None),
    ("/./admin/secret", 403, None),
    ("/x/../admin/secret", 403, None),
    ("/admin/./secret", 403, None),
    ("/x/%2e%2e/admin/secret", 403, None),
    ("/public/%2E%2E/admin/secret", 403, None),
    // Ambiguous: refused before policy is asked.
    ("/admin%2Fsecret", 400, None),
    ("/admin%2fsecret", 400, None),
    ("/admin%5Csecret", 400, None),
    ("/admin\\secret", 400, None),
    ("/%zz/admin", 400, None),
    ("/%4", 400, None),
    ("/../admin/secret", 400, None),
    ("/%2e%2e/admin/secret", 400, None),
];

fn path_bypasses_of_a_deny_policy_are_denied_or_refused() -> Result<()> {
    let c = cluster("ztpath")?;
    let mut wrong = Vec::new();
    for (how, ask) in [
        (
            "mTLS from client",
            &(|t: &str| c.mesh(&c.client, t, &[])) as &dyn Fn(&str) -> Result<Answer>,
        ),
        ("plaintext from plain", &|t: &str| c.plaintext(t, &[])),
    ] {
        for (target, status, app_path) in PATHS {
            let answer = ask(target)?;
            let ok = answer.status == *status
                && app_path.is_none_or(|p| answer.seen("raw") == [p] && answer.seen("path") == [p]);
            // The query goes to the app untouched.
            let query_ok = !target.contains('?')
                || answer.seen("query") == [target.split_once('?').map_or("", |(_, q)| q)];
            if !ok || !query_ok {
                wrong.push(format!(
                    "{how}: {target:?} -> {answer:?}, want {status} {app_path:?}"
                ));
            } else {
                println!("{how}: {target:?} -> {}", answer.status);
            }
        }
    }
    if !wrong.is_empty() {
        bail!("{}\n{}", wrong.join("\n"), c.bed.logs());
    }
    Ok(())
}

fn forged_identity_headers_never_reach_the_app() -> Result<()> {
    let c = cluster("ztxfcc")?;
    let forged_headers = [
        "--header",
        &format!("X-Forwarded-Client-Cert: {FORGED}"),
        "--header",
        &format!("x-forwarded-client-cert: {FORGED}"),
    ]
    .map(str::to_owned);
    let forged: Vec<&str> = forged_headers.iter().map(String::as_str).collect();
    let h2: Vec<&str> = [&forged[..2], &["--h2"]].concat();
    let upgrade: Vec<&str> = [&forged[..], &["--upgrade", "trellis-echo"]].concat();
    let web_ip = format!("{}:8080", c.web.ip);
    let mut wrong = Vec::new();
    let mut check = |how: &str, answer: Answer, want: &[&str]| {
        let seen: Vec<&str> = if answer.status == 101 {
            answer
                .header("x-seen-xfcc")
                .filter(|v| !v.is_empty())
                .map(|v| v.split(" | ").collect())
                .unwrap_or_default()
        } else {
            answer.seen("xfcc")
        };
        let status_ok = if how.contains("upgrade") {
            answer.status == 101 && answer.body.trim() == "echo: ping"
        } else {
            answer.status == 200
        };
        if !status_ok || seen != want {
            wrong.push(format!(
                "{how}: app saw xfcc {seen:?}, want {want:?}: {answer:?}"
            ));
        } else {
            println!("{how}: app saw xfcc {seen:?}");
        }
    };
    // Through the client's sidecar, over mTLS: exactly the identity the certificate proved.
    check(
        "HTTP/1.1 over mTLS",
        c.mesh(&c.client, "/public/x", &forged)?,
        &[REAL],
    );
    check(
        "HTTP/2 prior knowledge over mTLS",
        c.raw(
            &c.client,
            &[&[&format!("{WEB}:80") as &str, "/public/x"], &h2[..]].concat(),
        )?,
        &[REAL],
    );
    check(
        "upgrade over mTLS",
        c.mesh(&c.client, "/public/x", &upgrade)?,
        &[REAL],
    );
    // A caller that outlasts detection on an undeclared port, or starts with an empty
    // line, is carried to web's sidecar as an opaque mTLS stream; that sidecar still
    // finds the request in it.
    let delayed: Vec<&str> = [&forged[..], &["--delay-ms", "1500"]].concat();
    check(
        "late HTTP/1.1 over an opaque mTLS stream",
        c.raw(
            &c.client,
            &[&[&format!("{WEB}:8000") as &str, "/public/x"], &delayed[..]].concat(),
        )?,
        &[REAL],
    );
    let crlf: Vec<&str> = [&forged[..], &["--leading-crlf"]].concat();
    check(
        "HTTP/1.1 after an empty line over an opaque mTLS stream",
        c.raw(
            &c.client,
            &[&[&format!("{WEB}:8000") as &str, "/public/x"], &crlf[..]].concat(),
        )?,
        &[REAL],
    );
    // Plaintext into web's PERMISSIVE port: no identity at all.
    check(
        "HTTP/1.1 plaintext",
        c.plaintext("/public/x", &forged)?,
        &[],
    );
    check(
        "HTTP/2 prior knowledge plaintext",
        c.raw(
            &c.plain,
            &[&[web_ip.as_str(), "/public/x"], &h2[..]].concat(),
        )?,
        &[],
    );
    check(
        "upgrade plaintext",
        c.plaintext("/public/x", &upgrade)?,
        &[],
    );
    // An upgrade is a request like any other: policy judges its path.
    let denied = c.plaintext("//admin/secret", &upgrade)?;
    if denied.status != 403 {
        wrong.push(format!(
            "an upgrade to //admin/secret was not denied: {denied:?}"
        ));
    }
    if !wrong.is_empty() {
        bail!("{}\n{}", wrong.join("\n"), c.bed.logs());
    }
    Ok(())
}

/// The same attacks against nginx itself: what it would serve from `/admin` is never
/// served, and it receives the path policy judged.
fn a_real_nginx_behind_the_sidecar_is_not_bypassed() -> Result<()> {
    if nginx_binary().is_none() {
        println!("SKIPPED nginx case: nginx is not installed (apt-get install nginx-light)");
        return Ok(());
    }
    let c = cluster("ztnginx")?;
    c.eventually("nginx answers on 8081", || {
        Ok(c.mesh_nginx(&c.client, "/public/x")?.status == 200)
    })?;
    let nginx_ip = format!("{}:8081", c.web.ip);
    let mut wrong = Vec::new();
    for (target, status, app_path) in PATHS {
        // nginx's filesystem is case-sensitive: /ADMIN/secret does not exist there.
        let (status, app_path) = match *target {
            "/ADMIN/secret" => (404, None),
            _ => (*status, *app_path),
        };
        for (how, answer) in [
            ("mTLS from client", c.mesh_nginx(&c.client, target)?),
            (
                "plaintext from plain",
                c.raw(&c.plain, &[nginx_ip.as_str(), target])?,
            ),
        ] {
            let served_admin = answer.body.contains("admin secret");
            let ok = answer.status == status
                && !served_admin
                && app_path.is_none_or(|p| {
                    answer.header("x-raw-path") == Some(p)
                        && answer.header("x-path") == Some(p)
                        && answer.body == "public x\n"
                });
            if ok {
                println!("nginx, {how}: {target:?} -> {}", answer.status);
            } else {
                wrong.push(format!(
                    "nginx, {how}: {target:?} -> {answer:?}, want {status} {app_path:?}"
                ));
            }
        }
    }
    if !wrong.is_empty() {
        bail!("{}\n{}", wrong.join("\n"), c.bed.logs());
    }
    Ok(())
}
