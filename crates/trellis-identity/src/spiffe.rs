//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// The default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;

/// A workload's identity. Compared exactly, never by prefix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID starts with spiffe://")]
    Scheme,
    #[error("the trust domain {0:?} is empty, too long or has characters other than a-z 0-9 . - _")]
    TrustDomain(String),
    #[error("the path must be /ns/<namespace>/sa/<service-account>, got {0:?}")]
    Path(String),
    #[error(
        "path segment {0:?} is empty, '.' or '..', or has characters other than A-Z a-z 0-9 . - _"
    )]
    Segment(String),
    #[error("the ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        if id.to_string().len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN_LEN
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(td.to_owned()))
    }
}

fn validate_segment(segment: &str) -> Result<(), SpiffeIdError> {
    let ok = !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Segment(segment.to_owned()))
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(String::new()))?;
        validate_trust_domain(td)?;
        let mut segments = path.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeIdError::Path(format!("/{path}"))),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "echo");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/echo");
    }

    #[test]
    fn rejects_what_the_standard_rejects() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/./sa/b",
            "spiffe://cluster.local/ns/a%20b/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#f",
            "spiffe://cluster.local/ns/a/account/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn compares_exactly() {
        let a: SpiffeId = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
        let b: SpiffeId = "spiffe://cluster.local/ns/default/sa/Echo".parse().unwrap();
        let c: SpiffeId = "spiffe://cluster.local/ns/default/sa/echo2"
            .parse()
            .unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn limits_length() {
        let long = "a".repeat(MAX_ID_LEN);
        assert_eq!(
            format!("spiffe://td/ns/{long}/sa/b").parse::<SpiffeId>(),
            Err(SpiffeIdError::TooLong)
        );
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert!(SpiffeId::new(&td, "a", "b").is_err());
    }
}
