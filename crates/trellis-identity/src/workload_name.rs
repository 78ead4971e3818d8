//! Which workload a certificate was issued to, as the CA proved it.
//!
//! A workload leaf's Subject is `O=<namespace>, CN=<workload name>`. The CA writes it
//! from the proof of identity (the pod a projected token is bound to, or the
//! WorkloadEntry a bootstrap token names), never from the CSR. The SPIFFE ID stays
//! the one URI SAN; the Subject only narrows which of the identity's workloads holds
//! the key, so the discovery server can give that workload its own policies. A leaf
//! with an empty Subject (older, or the proof named no workload) names none.

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{PeerIdentityError, SpiffeId};

/// A workload by namespace and name (a Pod or a WorkloadEntry).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct WorkloadName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl WorkloadName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        WorkloadName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The Subject the CA writes into the workload's leaf.
    pub fn distinguished_name(&self) -> rcgen::DistinguishedName {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, self.namespace.as_str());
        dn.push(rcgen::DnType::CommonName, self.name.as_str());
        dn
    }
}

/// The workload a (verified) workload certificate names: `None` when its Subject is
/// empty. A Subject that is not exactly one O and one CN, or whose namespace is not
/// `identity`'s, is an error: the CA never writes one.
pub fn workload_name_of(
    cert: &CertificateDer<'_>,
    identity: &SpiffeId,
) -> Result<Option<WorkloadName>, PeerIdentityError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| PeerIdentityError::Malformed(e.to_string()))?;
    let subject = parsed.subject();
    if subject.iter_attributes().next().is_none() {
        return Ok(None);
    }
    let single = |attrs: Vec<&x509_parser::x509::AttributeTypeAndValue<'_>>, what: &str| match attrs
        .as_slice()
    {
        [one] => one
            .as_str()
            .map(str::to_owned)
            .map_err(|e| PeerIdentityError::Malformed(format!("subject {what}: {e}"))),
        _ => Err(PeerIdentityError::Malformed(format!(
            "the subject has {} {what} attributes, a workload certificate has one",
            attrs.len()
        ))),
    };
    let count = subject.iter_attributes().count();
    if count != 2 {
        return Err(PeerIdentityError::Malformed(format!(
            "the subject has {count} attributes, a workload certificate has O and CN"
        )));
    }
    let namespace = single(subject.iter_organization().collect(), "O")?;
    let name = single(subject.iter_common_name().collect(), "CN")?;
    if namespace != identity.namespace() {
        return Err(PeerIdentityError::Malformed(format!(
            "the subject names namespace {namespace:?}, the identity is in {:?}",
            identity.namespace()
        )));
    }
    Ok(Some(WorkloadName { namespace, name }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn leaf(dn: rcgen::DistinguishedName) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = dn;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn id() -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", "shared").unwrap()
    }

    #[test]
    fn the_subject_round_trips() {
        let name = WorkloadName::new("shop", "payments-7d9c");
        let cert = leaf(name.distinguished_name());
        assert_eq!(workload_name_of(&cert, &id()).unwrap(), Some(name));
    }

    #[test]
    fn an_empty_subject_names_no_workload() {
        let cert = leaf(rcgen::DistinguishedName::new());
        assert_eq!(workload_name_of(&cert, &id()).unwrap(), None);
    }

    #[test]
    fn another_namespace_or_a_strange_subject_is_refused() {
        let other = leaf(WorkloadName::new("bank", "payments").distinguished_name());
        assert!(workload_name_of(&other, &id()).is_err());
        let mut extra = WorkloadName::new("shop", "web").distinguished_name();
        extra.push(rcgen::DnType::OrganizationalUnitName, "x");
        assert!(workload_name_of(&leaf(extra), &id()).is_err());
        let mut cn_only = rcgen::DistinguishedName::new();
        cn_only.push(rcgen::DnType::CommonName, "web");
        assert!(workload_name_of(&leaf(cn_only), &id()).is_err());
    }
}
