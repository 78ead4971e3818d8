//! The CustomResourceDefinitions of the Trellis kinds, as the derive makes them
//! from the Rust types, and the files `deploy/crds/` holds them in.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{AuthorizationPolicy, PeerAuthentication, TrafficPolicy};

/// The first lines of every generated CRD file.
pub const CRD_FILE_HEADER: &str = "\
# Generated from the Rust types in control-plane/src/api; do not edit. Regenerate with
#   cargo run -p trellis-control -- crds --out deploy/crds
";

/// The label every Trellis install object carries.
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "trellis");

/// The CRDs of `trellis.io/v1alpha1`, labelled as part of Trellis.
pub fn crds() -> Vec<CustomResourceDefinition> {
    // Labelled here, not with `#[kube(label)]`, which would also label every object
    // `new` makes.
    let mut crds = vec![
        TrafficPolicy::crd(),
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
    ];
    for crd in &mut crds {
        crd.metadata
            .labels
            .get_or_insert_default()
            .insert(PART_OF.0.to_owned(), PART_OF.1.to_owned());
    }
    crds
}

/// `(file name, contents)` of each CRD file: `<plural>.trellis.io.yaml`, the
/// header, then the YAML of the CRD.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}.{}.yaml", crd.spec.names.plural, crd.spec.group);
            let yaml = serde_yaml_ng::to_string(&crd)?;
            Ok((name, format!("{CRD_FILE_HEADER}{yaml}")))
        })
        .collect()
}
