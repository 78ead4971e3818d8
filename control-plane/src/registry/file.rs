//! The `file` registry: a folder of Kubernetes-shaped YAML read into a [`MeshSnapshot`].
//!
//! Kinds read (top-level `*.yaml` / `*.yml` files, several documents per file split by
//! `---` lines): `v1/Service`, `discovery.k8s.io/v1/EndpointSlice`,
//! `trellis.io/v1alpha1/WorkloadEntry` and `trellis.io/v1alpha1/BootstrapToken`;
//! `trellis.io/v1alpha1` `TrafficPolicy`, `AuthorizationPolicy`, `PeerAuthentication`
//! and `gateway.networking.k8s.io/v1` (or `v1beta1`) `HTTPRoute` (see [`crate::api`]).
//! Anything else is an error, and every error is reported, not just the first.

mod build;
mod policy;
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::api;
use crate::model::MeshSnapshot;
use types::{
    BootstrapTokenObject, EndpointSliceObject, ServiceObject, TypeMeta, WorkloadEntryObject,
};

/// A problem with one file of the registry folder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {reason}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct RegistryError {
    pub file: PathBuf,
    /// 1-based; for errors about a whole object, the line where its document starts.
    pub line: Option<usize>,
    pub reason: String,
}

impl RegistryError {
    fn new(file: &Path, line: Option<usize>, reason: impl Into<String>) -> Self {
        RegistryError {
            file: file.to_owned(),
            line,
            reason: reason.into(),
        }
    }
}

/// A [`RegistryError`] as shown on the admin endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RegistryErrorView {
    pub file: String,
    pub line: Option<usize>,
    pub reason: String,
}

impl From<&RegistryError> for RegistryErrorView {
    fn from(e: &RegistryError) -> Self {
        RegistryErrorView {
            file: e.file.display().to_string(),
            line: e.line,
            reason: e.reason.clone(),
        }
    }
}

/// Status shown on the control plane's admin endpoint and in tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RegistryStatus {
    /// How many snapshots [`watch_dir`] has published (counting on from the value the
    /// status channel held when it started).
    pub generation: u64,
    /// Why the folder's current content is rejected; empty when it is good.
    pub last_error: Vec<RegistryErrorView>,
    /// Counts in the snapshot being served.
    pub services: usize,
    pub workloads: usize,
    /// Routes and policies in the snapshot being served, by kind: `namespace/name` of
    /// each accepted object. (In file mode an object is accepted with its folder.)
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub accepted: BTreeMap<&'static str, Vec<String>>,
    /// What is served but may not work as written (an AuthorizationPolicy's HTTP
    /// rules on an opaque port), per object.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<RegistryErrorView>,
}

/// `namespace/name` of the routes and policies in `snapshot`, by kind.
pub fn accepted_objects(snapshot: &MeshSnapshot) -> BTreeMap<&'static str, Vec<String>> {
    let mut accepted: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let routes: BTreeSet<String> = snapshot
        .routes
        .values()
        .flatten()
        .map(|r| format!("{}/{}", r.origin.namespace, r.origin.name))
        .collect();
    let traffic: BTreeSet<String> = snapshot
        .traffic_policies
        .values()
        .map(|p| p.source.clone())
        .collect();
    let authz = snapshot
        .authorization_policies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name));
    let peer = snapshot
        .peer_authentications
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name));
    for (kind, names) in [
        ("HTTPRoute", routes.into_iter().collect::<Vec<_>>()),
        ("TrafficPolicy", traffic.into_iter().collect()),
        ("AuthorizationPolicy", authz.collect()),
        ("PeerAuthentication", peer.collect()),
    ] {
        if !names.is_empty() {
            accepted.insert(kind, names);
        }
    }
    accepted
}

/// Reads `dir` once. The caller decides whether errors are fatal.
pub fn load_dir(dir: &Path, trust_domain: &str) -> Result<MeshSnapshot, Vec<RegistryError>> {
    load_dir_with_warnings(dir, trust_domain).map(|(snapshot, _)| snapshot)
}

/// [`load_dir`], with what is served but may not work as written.
pub fn load_dir_with_warnings(
    dir: &Path,
    trust_domain: &str,
) -> Result<(MeshSnapshot, Vec<RegistryError>), Vec<RegistryError>> {
    let (files, mut errors) = read_files(dir);
    match load_files(&files, trust_domain) {
        Ok(loaded) if errors.is_empty() => Ok(loaded),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// The snapshot to start with: [`load_dir`].
pub fn initial(dir: &Path, trust_domain: &str) -> Result<MeshSnapshot, Vec<RegistryError>> {
    load_dir(dir, trust_domain)
}

/// Polls `dir` every `interval` and publishes a new snapshot when the folder's content
/// changed (and then stayed the same for one more poll) and the snapshot it yields
/// differs from the current one.
///
/// A folder with errors is logged (once per change), reported in `status`, and
/// otherwise ignored: the last good snapshot stays. Runs until the task is dropped.
pub async fn watch_dir(
    dir: PathBuf,
    trust_domain: String,
    interval: Duration,
    snapshots: tokio::sync::watch::Sender<Arc<MeshSnapshot>>,
    status: tokio::sync::watch::Sender<RegistryStatus>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A change is loaded once the folder reads the same on two polls in a row, so a
    // file caught half-written is not served.
    let (mut loaded, mut pending): (Option<[u8; 32]>, Option<[u8; 32]>) = (None, None);
    loop {
        ticker.tick().await;
        let (d, td, stable) = (dir.clone(), trust_domain.clone(), pending);
        let poll = tokio::task::spawn_blocking(move || {
            let (files, read_errors) = read_files(&d);
            let fingerprint = fingerprint(&files, &read_errors);
            if stable != Some(fingerprint) {
                return (fingerprint, None);
            }
            let result = match load_files(&files, &td) {
                Ok(loaded) if read_errors.is_empty() => Ok(loaded),
                Ok(_) => Err(read_errors),
                Err(errors) => Err(read_errors.into_iter().chain(errors).collect()),
            };
            (fingerprint, Some(result))
        })
        .await;
        let (fingerprint, result) = match poll {
            Ok(poll) => poll,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "registry poll failed");
                continue;
            }
        };
        if loaded == Some(fingerprint) {
            pending = None;
            continue;
        }
        let Some(result) = result else {
            pending = Some(fingerprint);
            continue;
        };
        (loaded, pending) = (Some(fingerprint), None);
        match result {
            Ok((snapshot, warnings)) => publish(snapshot, &warnings, &snapshots, &status),
            Err(errors) => {
                for e in &errors {
                    tracing::warn!(
                        file = %e.file.display(),
                        line = e.line,
                        reason = %e.reason,
                        "registry file rejected"
                    );
                }
                status.send_modify(|s| s.last_error = errors.iter().map(Into::into).collect());
            }
        }
    }
}

fn publish(
    snapshot: MeshSnapshot,
    warnings: &[RegistryError],
    snapshots: &tokio::sync::watch::Sender<Arc<MeshSnapshot>>,
    status: &tokio::sync::watch::Sender<RegistryStatus>,
) {
    let (services, workloads) = (snapshot.services.len(), snapshot.workloads.len());
    let accepted = accepted_objects(&snapshot);
    let changed = **snapshots.borrow() != snapshot;
    if changed {
        snapshots.send_replace(Arc::new(snapshot));
    }
    status.send_modify(|s| {
        if changed {
            s.generation += 1;
            tracing::info!(
                generation = s.generation,
                services,
                workloads,
                "registry snapshot updated"
            );
        }
        if !s.last_error.is_empty() {
            tracing::info!("registry folder is good again");
        }
        s.last_error.clear();
        s.services = services;
        s.workloads = workloads;
        s.accepted = accepted;
        let warnings: Vec<RegistryErrorView> = warnings.iter().map(Into::into).collect();
        if s.warnings != warnings {
            for w in &warnings {
                tracing::warn!(file = %w.file, line = w.line, reason = %w.reason, "registry object served with a warning");
            }
            s.warnings = warnings;
        }
    });
}

/// One YAML file of the folder.
struct SourceFile {
    path: PathBuf,
    text: String,
}

/// The top-level `*.yaml` / `*.yml` files of `dir`, sorted by name. Hidden files
/// (Kubernetes ConfigMap volumes keep `..data` there) are skipped.
fn read_files(dir: &Path) -> (Vec<SourceFile>, Vec<RegistryError>) {
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            let reason = format!("cannot read the registry folder: {e}");
            return (Vec::new(), vec![RegistryError::new(dir, None, reason)]);
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => paths.push(entry.path()),
            Err(e) => errors.push(RegistryError::new(dir, None, e.to_string())),
        }
    }
    paths.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
        !name.starts_with('.')
            && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            && p.is_file()
    });
    paths.sort();
    let mut files = Vec::new();
    for path in paths {
        match std::fs::read(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => files.push(SourceFile { path, text }),
                Err(_) => errors.push(RegistryError::new(&path, None, "not UTF-8")),
            },
            Err(e) => errors.push(RegistryError::new(&path, None, e.to_string())),
        }
    }
    (files, errors)
}

fn fingerprint(files: &[SourceFile], errors: &[RegistryError]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        let path = f.path.as_os_str().as_encoded_bytes();
        h.update((path.len() as u64).to_le_bytes());
        h.update(path);
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    for e in errors {
        h.update(e.to_string().as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// The snapshot and its warnings, or every error.
fn load_files(
    files: &[SourceFile],
    trust_domain: &str,
) -> Result<(MeshSnapshot, Vec<RegistryError>), Vec<RegistryError>> {
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let mut objects = Vec::new();
    for file in files {
        for doc in split_documents(&file.text) {
            if let Some(object) = parse_document(&file.path, &doc, &mut errors) {
                objects.push(object);
            }
        }
    }
    let snapshot = build::build(objects, trust_domain, &mut errors, &mut warnings);
    if errors.is_empty() {
        Ok((snapshot, warnings))
    } else {
        Err(errors)
    }
}

/// One YAML document of a file.
struct Document<'a> {
    text: &'a str,
    /// Lines of the file before `text`.
    offset: usize,
    /// 1-based line of its first line that is neither blank nor a comment.
    start: usize,
}

/// Splits on lines that are exactly `---`, dropping documents with no content.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let (mut begin, mut begin_line, mut pos) = (0, 0, 0);
    let mut push = |begin: usize, end: usize, offset: usize| {
        let text = &text[begin..end];
        let first = text.lines().position(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if let Some(first) = first {
            let start = offset + first + 1;
            docs.push(Document {
                text,
                offset,
                start,
            });
        }
    };
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_end() == "---" {
            push(begin, pos, begin_line);
            begin = pos + line.len();
            begin_line = n + 1;
        }
        pos += line.len();
    }
    push(begin, text.len(), begin_line);
    docs
}

/// An object read from a document, with where it was declared.
struct Parsed {
    file: PathBuf,
    line: usize,
    object: Object,
}

enum Object {
    Service(ServiceObject),
    EndpointSlice(EndpointSliceObject),
    WorkloadEntry(WorkloadEntryObject),
    BootstrapToken(BootstrapTokenObject),
    HttpRoute(Box<api::HttpRoute>),
    TrafficPolicy(Box<api::TrafficPolicy>),
    AuthorizationPolicy(Box<api::AuthorizationPolicy>),
    PeerAuthentication(Box<api::PeerAuthentication>),
}

fn parse_document(
    file: &Path,
    doc: &Document<'_>,
    errors: &mut Vec<RegistryError>,
) -> Option<Parsed> {
    let yaml_error = |e: serde_yaml_ng::Error| {
        let line = e.location().map_or(doc.start, |l| l.line() + doc.offset);
        RegistryError::new(file, Some(line), strip_positions(&e.to_string()))
    };
    let fail = |errors: &mut Vec<RegistryError>, e| {
        errors.push(yaml_error(e));
        None
    };
    let meta: TypeMeta = match serde_yaml_ng::from_str(doc.text) {
        Ok(meta) => meta,
        Err(e) => return fail(errors, e),
    };
    let api_version = meta.api_version.unwrap_or_default();
    let kind = meta.kind.unwrap_or_default();
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => serde_yaml_ng::from_str(doc.text).map(Object::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            serde_yaml_ng::from_str(doc.text).map(Object::EndpointSlice)
        }
        ("trellis.io/v1alpha1", "WorkloadEntry") => {
            serde_yaml_ng::from_str(doc.text).map(Object::WorkloadEntry)
        }
        ("trellis.io/v1alpha1", "BootstrapToken") => {
            serde_yaml_ng::from_str(doc.text).map(Object::BootstrapToken)
        }
        // Through `Declared`, which rejects unknown top-level fields.
        ("trellis.io/v1alpha1", "TrafficPolicy") => {
            serde_yaml_ng::from_str(doc.text).map(|o: api::Declared<api::TrafficPolicySpec>| {
                Object::TrafficPolicy(Box::new(o.into()))
            })
        }
        ("trellis.io/v1alpha1", "AuthorizationPolicy") => serde_yaml_ng::from_str(doc.text).map(
            |o: api::Declared<api::AuthorizationPolicySpec>| {
                Object::AuthorizationPolicy(Box::new(o.into()))
            },
        ),
        ("trellis.io/v1alpha1", "PeerAuthentication") => serde_yaml_ng::from_str(doc.text).map(
            |o: api::Declared<api::PeerAuthenticationSpec>| {
                Object::PeerAuthentication(Box::new(o.into()))
            },
        ),
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            serde_yaml_ng::from_str(doc.text).map(|o| Object::HttpRoute(Box::new(o)))
        }
        ("", _) | (_, "") => {
            let reason = "missing apiVersion or kind";
            errors.push(RegistryError::new(file, Some(doc.start), reason));
            return None;
        }
        _ => {
            let reason = format!("unknown kind {api_version}/{kind}");
            errors.push(RegistryError::new(file, Some(doc.start), reason));
            return None;
        }
    };
    match object {
        Ok(object) => Some(Parsed {
            file: file.to_owned(),
            line: doc.start,
            object,
        }),
        Err(e) => fail(errors, e),
    }
}

/// Removes serde_yaml_ng's ` at line L column C` (relative to the document, and the
/// line is reported separately).
fn strip_positions(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let n = digits(after);
        match after[n..].strip_prefix(" column ") {
            Some(col) if n > 0 && digits(col) > 0 => rest = &col[digits(col)..],
            _ => {
                out.push_str(" at line ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod watch_tests;
