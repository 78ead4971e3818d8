//! The Helm charts under `deploy/helm/` against the kustomize base, with the real
//! `helm` (built from the pinned `helm.sh/helm/v4` module by `tests/k8s/build-helm.sh`)
//! and the real `kubectl kustomize` (built by `tests/k8s/build.sh`):
//!
//! - `trellis-crds/templates/` is `deploy/crds/` byte for byte (runs everywhere);
//! - `helm template` of both charts with default values renders the objects
//!   `kubectl kustomize deploy/kustomize` renders, field for field. Ignored: only the
//!   two labels Helm adds to each object's own metadata (`helm.sh/chart`,
//!   `app.kubernetes.io/managed-by`), and the Namespace, which `helm install` needs
//!   before it installs (rendered identically with `namespace.create=true`); numbers
//!   compare by value (the CRD files' `65535.0` is kustomize's `65535`);
//! - both charts carry the workspace version (runs everywhere too);
//! - `helm lint --strict` passes, values change what they should, and the values
//!   schema refuses bad values, naming the field.
//!
//! The helm tests need no root, only Go (or `TRELLIS_HELM_BIN` and
//! `TRELLIS_K8S_BIN_DIR`); without it they are reported as ignored with a `SKIPPED`
//! line saying why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::Value;
use trellis_tests::kube::{Helm, helm_skip_reason, kube_binaries, kube_skip_reason};

/// The namespace and release names the install docs use; object names do not depend
/// on the release name.
const NAMESPACE: &str = "trellis-system";
const RELEASE: &str = "trellis";
const CRDS_RELEASE: &str = "trellis-crds";
/// The labels Helm's convention adds to each object's metadata, and only there.
const HELM_LABELS: [&str; 2] = ["helm.sh/chart", "app.kubernetes.io/managed-by"];

type Test = (&'static str, fn() -> Result<()>);

fn main() {
    let always: &[Test] = &[
        ("crd_chart_is_deploy_crds", crd_chart_is_deploy_crds),
        (
            "charts_carry_the_workspace_version",
            charts_carry_the_workspace_version,
        ),
    ];
    let with_helm: &[Test] = &[
        (
            "defaults_render_the_kustomize_base",
            defaults_render_the_kustomize_base,
        ),
        (
            "lint_passes_and_values_take_effect",
            lint_passes_and_values_take_effect,
        ),
        (
            "the_schema_refuses_bad_values",
            the_schema_refuses_bad_values,
        ),
    ];
    let args = libtest_mimic::Arguments::from_args();
    let skip = helm_skip_reason().or_else(kube_skip_reason);
    if let (Some(reason), false) = (&skip, args.list) {
        println!("SKIPPED (reported as ignored): helm tests: {reason}");
    }
    let trial = |&(name, test): &Test, ignored: bool| {
        libtest_mimic::Trial::test(name, move || {
            test().map_err(|e| libtest_mimic::Failed::from(format!("{e:#}")))
        })
        .with_ignored_flag(ignored)
    };
    let trials = always
        .iter()
        .map(|t| trial(t, false))
        .chain(with_helm.iter().map(|t| trial(t, skip.is_some())))
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart(name: &str) -> PathBuf {
    repo().join("deploy/helm").join(name)
}

/// `*.yaml` file names in `dir`, sorted, but `kustomization.yaml`.
fn yaml_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn crd_chart_is_deploy_crds() -> Result<()> {
    let source = repo().join("deploy/crds");
    let copy = chart("trellis-crds").join("templates");
    let fix =
        "copy them again: cp deploy/crds/*.trellis.io.yaml deploy/helm/trellis-crds/templates/";
    let names = yaml_names(&source)?;
    ensure!(!names.is_empty(), "no CRDs under {}", source.display());
    let copied = yaml_names(&copy)?;
    ensure!(
        copied == names,
        "deploy/helm/trellis-crds/templates holds {copied:?}, deploy/crds {names:?}; {fix}"
    );
    for name in &names {
        let a = std::fs::read(source.join(name))?;
        let b = std::fs::read(copy.join(name))?;
        ensure!(
            a == b,
            "deploy/helm/trellis-crds/templates/{name} differs from deploy/crds/{name}; {fix}"
        );
    }
    Ok(())
}

/// Both charts are versioned as the workspace (`[workspace.package] version`), and
/// share one appVersion.
fn charts_carry_the_workspace_version() -> Result<()> {
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml"))?;
    let workspace = cargo
        .split("[workspace.package]")
        .nth(1)
        .and_then(|section| {
            section
                .lines()
                .find_map(|l| l.trim().strip_prefix("version = "))
        })
        .map(|v| v.trim_matches('"').to_owned())
        .context("no [workspace.package] version in Cargo.toml")?;
    let mut app_versions = Vec::new();
    for name in ["trellis-crds", "trellis"] {
        let text = std::fs::read_to_string(chart(name).join("Chart.yaml"))?;
        let meta: Value = serde_yaml_ng::from_str(&text)?;
        ensure!(
            meta["version"] == workspace.as_str(),
            "{name}/Chart.yaml version {} is not the workspace's {workspace}",
            meta["version"]
        );
        app_versions.push(meta["appVersion"].clone());
    }
    ensure!(
        app_versions[0] == app_versions[1],
        "the charts' appVersions differ: {app_versions:?}"
    );
    Ok(())
}

/// The documents of a YAML stream (empty ones dropped).
fn docs(yaml: &str, origin: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(doc).with_context(|| format!("{origin} document {i}"))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// `kind namespace/name` → object.
type Objects = BTreeMap<String, Value>;

fn key(obj: &Value) -> String {
    let meta = &obj["metadata"];
    format!(
        "{} {}/{}",
        obj["kind"].as_str().unwrap_or("?"),
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap_or("?")
    )
}

fn by_key(objects: Vec<Value>, origin: &str) -> Result<Objects> {
    let mut out = Objects::new();
    for obj in objects {
        let k = key(&obj);
        if out.insert(k.clone(), obj).is_some() {
            bail!("{origin} renders {k} twice");
        }
    }
    Ok(out)
}

/// Removes [`HELM_LABELS`] from the object's own labels, failing if one is missing:
/// they are the only difference the comparison forgives, so they must be Helm's.
fn strip_helm_labels(obj: &mut Value) -> Result<()> {
    let k = key(obj);
    let labels = obj["metadata"]["labels"]
        .as_object_mut()
        .with_context(|| format!("{k} has no labels"))?;
    for label in HELM_LABELS {
        ensure!(labels.remove(label).is_some(), "{k} lacks label {label}");
    }
    Ok(())
}

/// `helm template` of both charts, with `set` on the trellis chart.
fn helm_objects(helm: &Helm, set: &[&str]) -> Result<Objects> {
    let crds = helm.run_ok(&[
        "template",
        CRDS_RELEASE,
        path_str(&chart("trellis-crds"))?,
        "--namespace",
        NAMESPACE,
    ])?;
    let trellis = chart("trellis");
    let mut args = vec![
        "template",
        RELEASE,
        path_str(&trellis)?,
        "--namespace",
        NAMESPACE,
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    let main = helm.run_ok(&args)?;
    let mut objects = docs(&crds, "helm template trellis-crds")?;
    let mut rendered = docs(&main, "helm template trellis")?;
    for obj in &mut rendered {
        strip_helm_labels(obj)?;
    }
    objects.append(&mut rendered);
    by_key(objects, "helm template")
}

fn kustomize_objects() -> Result<Objects> {
    let kubectl = kube_binaries()?.path("kubectl");
    let out = std::process::Command::new(&kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy/kustomize"))
        .output()
        .with_context(|| format!("run {}", kubectl.display()))?;
    ensure!(
        out.status.success(),
        "kubectl kustomize deploy/kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout)?;
    by_key(docs(&yaml, "kubectl kustomize")?, "kubectl kustomize")
}

/// Every path at which `a` and `b` differ, with both values (numbers by value).
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                differences(
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    &format!("{path}.{k}"),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(p, q, &format!("{path}[{i}]"), out);
            }
        }
        // `maximum: 65535.0` (the CRD files) and kustomize's `65535` are one number.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a == b => {}
        _ => out.push(format!("{path}: helm {a} / kustomize {b}")),
    }
}

/// Fails, listing every difference, unless `helm` and `kustomize` hold the same
/// objects with the same content.
fn same_objects(helm: &Objects, kustomize: &Objects) -> Result<()> {
    let mut problems = Vec::new();
    for k in kustomize.keys().filter(|k| !helm.contains_key(*k)) {
        problems.push(format!("only kustomize renders {k}"));
    }
    for k in helm.keys().filter(|k| !kustomize.contains_key(*k)) {
        problems.push(format!("only helm renders {k}"));
    }
    for (k, h) in helm {
        if let Some(c) = kustomize.get(k) {
            let mut diffs = Vec::new();
            differences(h, c, "", &mut diffs);
            problems.extend(diffs.into_iter().map(|d| format!("{k}: {d}")));
        }
    }
    ensure!(
        problems.is_empty(),
        "the chart and deploy/kustomize differ:\n{}",
        problems.join("\n")
    );
    Ok(())
}

fn helm() -> Result<(tempfile::TempDir, Helm)> {
    let home = tempfile::tempdir()?;
    let helm = Helm::new(home.path())?;
    Ok((home, helm))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

fn defaults_render_the_kustomize_base() -> Result<()> {
    let (_home, helm) = helm()?;
    let mut kustomize = kustomize_objects()?;
    ensure!(
        kustomize.len() >= 13,
        "kustomize renders only {:?}",
        kustomize.keys()
    );

    // namespace.create=true: everything, the Namespace included.
    let with_namespace = helm_objects(&helm, &["namespace.create=true"])?;
    same_objects(&with_namespace, &kustomize)?;

    // Defaults: everything but the Namespace (helm install needs it beforehand).
    let defaults = helm_objects(&helm, &[])?;
    let namespace = format!("Namespace /{NAMESPACE}");
    ensure!(
        kustomize.remove(&namespace).is_some(),
        "kustomize renders no {namespace}"
    );
    same_objects(&defaults, &kustomize)
}

/// The object `kind name` of a rendered stream.
fn object<'a>(objects: &'a Objects, kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .values()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))
}

fn control_args(objects: &Objects) -> Result<Vec<String>> {
    let deployment = object(objects, "Deployment", "trellis-control")?;
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("no args")?;
    Ok(args
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect())
}

fn lint_passes_and_values_take_effect() -> Result<()> {
    let (_home, helm) = helm()?;
    for name in ["trellis-crds", "trellis"] {
        helm.run_ok(&["lint", "--strict", path_str(&chart(name))?])
            .with_context(|| format!("helm lint {name}"))?;
    }

    let objects = helm_objects(
        &helm,
        &[
            "webhook.failurePolicy=Ignore",
            "webhook.timeoutSeconds=5",
            "controlPlane.replicas=3",
            "controlPlane.image.tag=v9.9.9",
            "proxy.image.repository=registry.example/mesh/trellis-proxy",
            "proxyInit.image.tag=v9.9.9",
            "identity.trustDomain=mesh.example",
            "clusterDomain=corp.internal",
            "controlPlane.logLevel=debug",
            "controlPlane.nodeSelector.pool=system",
            "controlPlane.tolerations[0].key=dedicated",
            "controlPlane.tolerations[0].operator=Exists",
            "controlPlane.podDisruptionBudget.minAvailable=2",
            "tracing.otlpEndpoint=http://otel-collector.observability:4317",
            "tracing.samplingPercent=2",
            "controlPlane.discoverySelectors[0]=trellis.io/discovery=enabled",
        ],
    )?;
    let webhook = object(&objects, "MutatingWebhookConfiguration", "trellis-injector")?;
    ensure!(
        webhook["webhooks"][0]["failurePolicy"] == "Ignore",
        "{webhook}"
    );
    ensure!(webhook["webhooks"][0]["timeoutSeconds"] == 5, "{webhook}");
    let deployment = object(&objects, "Deployment", "trellis-control")?;
    let pod = &deployment["spec"]["template"]["spec"];
    ensure!(deployment["spec"]["replicas"] == 3, "{deployment}");
    ensure!(
        pod["containers"][0]["image"] == "ghcr.io/trellis-mesh/trellis-control:v9.9.9",
        "{pod}"
    );
    ensure!(
        pod["containers"][0]["env"][0] == serde_json::json!({"name": "RUST_LOG", "value": "debug"}),
        "{pod}"
    );
    ensure!(pod["nodeSelector"]["pool"] == "system", "{pod}");
    ensure!(pod["tolerations"][0]["key"] == "dedicated", "{pod}");
    let args = control_args(&objects)?;
    for want in [
        "--injector-failure-policy=ignore",
        "--proxy-image=registry.example/mesh/trellis-proxy:latest",
        "--init-image=ghcr.io/trellis-mesh/trellis-proxy-init:v9.9.9",
        "--trust-domain=mesh.example",
        "--server-names=trellis-control,trellis-control.trellis-system,\
         trellis-control.trellis-system.svc,trellis-control.trellis-system.svc.corp.internal",
        "--otlp-endpoint=http://otel-collector.observability:4317",
        "--trace-sampling=2",
        "--discovery-selector=trellis.io/discovery=enabled",
    ] {
        ensure!(args.iter().any(|a| a == want), "no {want} in {args:?}");
    }
    let pdb = object(&objects, "PodDisruptionBudget", "trellis-control")?;
    ensure!(pdb["spec"]["minAvailable"] == 2, "{pdb}");

    // The release namespace is the control plane's, everywhere it is named.
    let elsewhere = helm.run_ok(&[
        "template",
        RELEASE,
        path_str(&chart("trellis"))?,
        "--namespace",
        "mesh",
        "--set",
        "controlPlane.podDisruptionBudget.enabled=false",
    ])?;
    ensure!(
        !elsewhere.contains("trellis-system") && !elsewhere.contains("PodDisruptionBudget"),
        "a release in namespace mesh still names trellis-system or has a PDB:\n{elsewhere}"
    );
    ensure!(
        elsewhere.contains("--injector-control-addr=trellis-control.mesh.svc:15010"),
        "{elsewhere}"
    );
    Ok(())
}

/// `helm template --set set` must fail, and its error must contain `field`.
fn refused(helm: &Helm, set: &str, field: &str) -> Result<()> {
    let out = helm.output(&[
        "template",
        RELEASE,
        path_str(&chart("trellis"))?,
        "--namespace",
        NAMESPACE,
        "--set",
        set,
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "--set {set} was accepted");
    ensure!(
        stderr.contains(field),
        "--set {set} was refused without naming {field}: {stderr}"
    );
    Ok(())
}

fn the_schema_refuses_bad_values() -> Result<()> {
    let (_home, helm) = helm()?;
    // The field as the schema error names it: a JSON pointer, or the unknown key.
    for (set, field) in [
        (
            "webhook.failurePolicy=Sometimes",
            "'/webhook/failurePolicy'",
        ),
        ("webhook.failurePolicy=fail", "'/webhook/failurePolicy'"),
        ("webhook.timeoutSeconds=60", "'/webhook/timeoutSeconds'"),
        ("controlPlane.replicas=0", "'/controlPlane/replicas'"),
        ("controlPlane.replicas=two", "'/controlPlane/replicas'"),
        ("controlPlane.replica=2", "'replica' not allowed"),
        ("controlPlane.image.tag=a:b", "'/controlPlane/image/tag'"),
        (
            "controlPlane.image.pullPolicy=Sometimes",
            "'/controlPlane/image/pullPolicy'",
        ),
        (
            "controlPlane.resources.limits.memroy=1Gi",
            "'memroy' not allowed",
        ),
        (
            "controlPlane.resources.limits.cpu=lots",
            "'/controlPlane/resources/limits/cpu'",
        ),
        ("controlPlane.tolerations=x", "'/controlPlane/tolerations'"),
        (
            "identity.trustDomain=Not_A_Domain",
            "'/identity/trustDomain'",
        ),
        ("clusterDomain=", "'/clusterDomain'"),
        ("namespace.create=yes please", "'/namespace/create'"),
        (
            "controlPlane.podDisruptionBudget.minAvailable=-1",
            "'/controlPlane/podDisruptionBudget/minAvailable'",
        ),
        (
            "tracing.otlpEndpoint=collector:4317",
            "'/tracing/otlpEndpoint'",
        ),
        ("tracing.samplingPercent=150", "'/tracing/samplingPercent'"),
        (
            "controlPlane.discoverySelectors[0]=",
            "'/controlPlane/discoverySelectors/0'",
        ),
    ] {
        refused(&helm, set, field)?;
    }
    Ok(())
}
