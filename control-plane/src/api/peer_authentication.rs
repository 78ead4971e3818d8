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

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Errors, FieldError, PolicyStatus, WorkloadSelector, check_selector, name_of};
use crate::model;

/// Which mTLS the selected workloads accept inbound. (The derive makes the object
/// type, [`PeerAuthentication`].)
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, CustomResource, KubeSchema,
)]
// Each `printcolumn(...)` repeats `type_ = "string"`, which is no duplicate.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "trellis.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "pa",
    category = "trellis",
    doc = "The mTLS mode (STRICT, PERMISSIVE, DISABLE) the selected workloads accept inbound.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Accepted")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.portLevelMtls) || size(self.portLevelMtls) == 0 || \
     (has(self.selector) && has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0)"
).message("portLevelMtls needs a selector: ports are a workload's, so a namespace-wide policy has none"))]
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
    #[schemars(schema_with = "port_level_mtls_schema")]
    #[x_kube(validation = Rule::new("self.all(port, int(port) >= 1 && int(port) <= 65535)")
        .message("keys must be ports (1-65535)"))]
    pub port_level_mtls: BTreeMap<u16, Mtls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

/// At most this many `portLevelMtls` entries (bounds the CEL rule's cost).
pub const MAX_PORT_LEVEL_MTLS: usize = 64;

/// `portLevelMtls`: a map from port (a string key, as JSON has) to [`Mtls`]. The
/// derived schema would use `patternProperties`, which a CRD may not.
fn port_level_mtls_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": MAX_PORT_LEVEL_MTLS,
        "additionalProperties": generator.subschema_for::<Mtls>(),
    })
}

impl PeerAuthentication {
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        self.to_model().map(|_| ())
    }

    pub fn to_model(&self) -> Result<model::PeerAuthentication, Vec<FieldError>> {
        let mut errors = Errors::default();
        let name = name_of(&self.metadata, &mut errors).to_owned();
        let spec = &self.spec;
        let selector = spec.selector.clone().unwrap_or_default();
        check_selector("spec.selector", &selector, &mut errors);
        if spec.port_level_mtls.len() > MAX_PORT_LEVEL_MTLS {
            errors.push(
                "spec.portLevelMtls",
                format!("at most {MAX_PORT_LEVEL_MTLS} ports"),
            );
        }
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
