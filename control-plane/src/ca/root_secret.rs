//! Kube mode: the CA root lives in one Secret, shared by every control-plane
//! replica, so all of them sign with the same root and proxies trust one bundle.
//!
//! The first replica to start makes the root and creates the Secret; creation is
//! create-only (POST), so when two start together the API server accepts one and
//! answers the other 409 Conflict, and the loser reads the winner's root. The
//! Secret is `kubernetes.io/tls` (`tls.crt`, `tls.key`: the root that signs), so an
//! operator can also provide their own root with `kubectl create secret tls`. During
//! a rotation (see [`super::roots`]) it also holds the other root under the state-dir
//! file names; a Secret without them is a single root, as before. The key goes from
//! the Secret to memory and nowhere else: not to disk, not to logs.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::roots::{ACTIVE_CERT, ACTIVE_KEY};
use super::{CaError, CertificateAuthority, RootSet};

/// The Secret holding the mesh root, in the control plane's namespace.
pub const ROOT_SECRET: &str = "trellis-ca-root";
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const SECRET_TYPE: &str = "kubernetes.io/tls";

/// Loads the root from the Secret `namespace/name`, or makes one and creates the
/// Secret; if another replica created it first, uses theirs.
pub async fn load_or_create_in_secret(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    default_ttl: Duration,
) -> Result<CertificateAuthority, CaError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let kube_err = |source| CaError::Kube {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    if let Some(mut secret) = api.get_opt(name).await.map_err(kube_err)? {
        let mut roots = roots_from_secret(&secret, namespace, name)?;
        // As in file mode: this replica may be the last to stop signing with a root
        // just replaced, so that root stays trusted one leaf TTL from now.
        let until =
            super::roots::unix(std::time::SystemTime::now()).saturating_add(default_ttl.as_secs());
        if roots.keep_previous_until(until) {
            secret.data = Some(secret_data(&roots));
            // Carries the resourceVersion read: a concurrent writer wins, and the
            // retirement time it wrote is as late (its replica started as late).
            if let Err(e) = api.replace(name, &PostParams::default(), &secret).await {
                tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "could not push back the previous root's retirement");
            }
        }
        let ca =
            CertificateAuthority::from_roots(&roots, trust_domain, default_ttl).map_err(|e| {
                CaError::RootSecret {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    reason: e.to_string(),
                }
            })?;
        tracing::info!(secret = %format!("{namespace}/{name}"), phase = %roots.phase(), signing = ca.signing_root(), "loaded the mesh root CA");
        return Ok(ca);
    }
    let roots = RootSet::generate(trust_domain)?;
    let ca = CertificateAuthority::from_roots(&roots, trust_domain, default_ttl)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                [("app.kubernetes.io/part-of", "trellis")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(secret_data(&roots)),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), trust_domain, "created a new mesh root CA");
            Ok(ca)
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            // Another replica won the race: its root is the mesh's.
            drop(ca);
            let secret =
                api.get_opt(name)
                    .await
                    .map_err(kube_err)?
                    .ok_or_else(|| CaError::RootSecret {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        reason: "it already existed when created, then was gone when read".into(),
                    })?;
            let ca = from_secret(&secret, namespace, name, trust_domain, default_ttl)?;
            tracing::info!(secret = %format!("{namespace}/{name}"), "another replica created the mesh root CA first; using it");
            Ok(ca)
        }
        Err(e) => Err(kube_err(e)),
    }
}

/// The Secret's data for `roots`: the signing root as `tls.crt`/`tls.key`, the rest
/// under the state-dir file names.
pub fn secret_data(roots: &RootSet) -> BTreeMap<String, ByteString> {
    roots
        .to_entries()
        .into_iter()
        .map(|(name, text)| {
            let key = match name.as_str() {
                ACTIVE_CERT => CERT_KEY.to_owned(),
                ACTIVE_KEY => KEY_KEY.to_owned(),
                _ => name,
            };
            (key, ByteString(text.into_bytes()))
        })
        .collect()
}

/// The root-set entries a Secret holds (see [`secret_data`]); keys that are not
/// PEM text are an error naming the key.
pub fn entries_from_secret(secret: &Secret) -> Result<BTreeMap<String, String>, String> {
    let mut entries = BTreeMap::new();
    for (key, bytes) in secret.data.iter().flatten() {
        let name = match key.as_str() {
            CERT_KEY => ACTIVE_CERT,
            KEY_KEY => ACTIVE_KEY,
            other => other,
        };
        let text = std::str::from_utf8(&bytes.0).map_err(|_| format!("{key} is not PEM text"))?;
        entries.insert(name.to_owned(), text.to_owned());
    }
    Ok(entries)
}

fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    default_ttl: Duration,
) -> Result<CertificateAuthority, CaError> {
    let roots = roots_from_secret(secret, namespace, name)?;
    CertificateAuthority::from_roots(&roots, trust_domain, default_ttl).map_err(|e| {
        CaError::RootSecret {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason: e.to_string(),
        }
    })
}

fn roots_from_secret(secret: &Secret, namespace: &str, name: &str) -> Result<RootSet, CaError> {
    let bad = |reason: String| CaError::RootSecret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let entries = entries_from_secret(secret).map_err(bad)?;
    for key in [CERT_KEY, KEY_KEY] {
        let present = secret.data.as_ref().is_some_and(|d| d.contains_key(key));
        if !present {
            return Err(bad(format!("no {key}")));
        }
    }
    RootSet::from_entries(&entries)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad(format!("no {CERT_KEY}")))
}

#[cfg(test)]
mod tests;
