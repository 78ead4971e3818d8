//! Kube mode: the CA root lives in one Secret, shared by every control-plane
//! replica, so all of them sign with the same root and proxies trust one bundle.
//!
//! The first replica to start makes the root and creates the Secret; creation is
//! create-only (POST), so when two start together the API server accepts one and
//! answers the other 409 Conflict, and the loser reads the winner's root. The
//! Secret is `kubernetes.io/tls` (`tls.crt`, `tls.key`), so an operator can also
//! provide their own root with `kubectl create secret tls`. The key goes from the
//! Secret to memory and nowhere else: not to disk, not to logs.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::{CaError, CertificateAuthority};

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
    if let Some(secret) = api.get_opt(name).await.map_err(kube_err)? {
        let ca = from_secret(&secret, namespace, name, trust_domain, default_ttl)?;
        tracing::info!(secret = %format!("{namespace}/{name}"), "loaded the mesh root CA");
        return Ok(ca);
    }
    let ca = CertificateAuthority::new_root(trust_domain, default_ttl)?;
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
        data: Some(
            [(CERT_KEY, ca.root_pem.clone()), (KEY_KEY, ca.key_pem())]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
                .collect(),
        ),
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

fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    default_ttl: Duration,
) -> Result<CertificateAuthority, CaError> {
    let bad = |reason: String| CaError::RootSecret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let field = |key: &str| -> Result<&str, CaError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| bad(format!("no {key}")))?;
        std::str::from_utf8(&bytes.0).map_err(|_| bad(format!("{key} is not PEM text")))
    };
    let cert_pem = field(CERT_KEY)?;
    let key_pem = field(KEY_KEY)?;
    CertificateAuthority::from_pem(cert_pem, key_pem, trust_domain, default_ttl)
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests;
