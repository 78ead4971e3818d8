//! `PeerAuthentication` (trellis.io/v1alpha1), in Istio's shape: which mTLS the
//! inbound side of the selected workloads accepts.
//!
//! ```yaml
//! apiVersion: trellis.io/v1alpha1
//! kind: PeerAuthentication
//! metadata: {name: legacy, namespace: demo}
//! spec:
//!   selector: {matchLabels: {app: legacy}}
//!   mtls: {mode: STRICT}
//!   portLevelMtls:
//!     9100: {mode: PERMISSIVE}
//! ```
//!
//! Precedence, most specific first: a port of a workload policy, a workload policy
//! (with a selector), the namespace's policy (no selector), the mesh's policy (no
//! selector, namespace `trellis-system`). `UNSET` inherits from the next one; the
//! default is `STRICT`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{Errors, FieldError, PolicyStatus, WorkloadSelector, check_selector, name_of};
use crate::model;

/// The object. See the module docs of [`super`] for why it is written by hand.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PeerAuthenticationSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PolicyStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Unset or empty: the whole namespace (the mesh in `trellis-system`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Unset: `UNSET` (inherit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Per workload (target) port, overriding `mtls`; needs a selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u16, Mtls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the less specific policy.
    Unset,
    /// Only mTLS from mesh identities.
    Strict,
    /// mTLS or plain text.
    Permissive,
    /// Plain text only.
    Disable,
}

impl PeerAuthentication {
    pub fn new(name: &str, spec: PeerAuthenticationSpec) -> Self {
        PeerAuthentication {
            api_version: super::TRELLIS_API_VERSION.to_owned(),
            kind: "PeerAuthentication".to_owned(),
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }

    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        self.to_model().map(|_| ())
    }

    pub fn to_model(&self) -> Result<model::PeerAuthentication, Vec<FieldError>> {
        let mut errors = Errors::default();
        let name = name_of(&self.metadata, &mut errors).to_owned();
        let spec = &self.spec;
        let selector = spec.selector.clone().unwrap_or_default();
        check_selector("spec.selector", &selector, &mut errors);
        if selector.match_labels.is_empty() && !spec.port_level_mtls.is_empty() {
            errors.push(
                "spec.portLevelMtls",
                "needs a selector: ports are a workload's, so a namespace-wide policy has none",
            );
        }
        let mode = |m: Option<&Mtls>| match m.and_then(|m| m.mode) {
            None | Some(MtlsMode::Unset) => model::MtlsMode::Unset,
            Some(MtlsMode::Strict) => model::MtlsMode::Strict,
            Some(MtlsMode::Permissive) => model::MtlsMode::Permissive,
            Some(MtlsMode::Disable) => model::MtlsMode::Disable,
        };
        let mut port_modes = BTreeMap::new();
        for (port, mtls) in &spec.port_level_mtls {
            if *port == 0 {
                errors.push("spec.portLevelMtls", "0 is not a port (1-65535)");
            }
            port_modes.insert(*port, mode(Some(mtls)));
        }
        errors.into_result(model::PeerAuthentication {
            namespace: super::namespace_of(&self.metadata).to_owned(),
            name,
            selector: selector.match_labels,
            mode: mode(spec.mtls.as_ref()),
            port_modes,
        })
    }
}
