//! Routes and policies into the snapshot, once its Services are known, through the
//! path both registries share ([`crate::registry::policies`]).
//!
//! An object's field errors become file errors at the line where its document
//! starts. References must resolve: a route's parent or backend Service, or a
//! TrafficPolicy's target, that does not exist is an error of the folder
//! (Kubernetes would instead mark the object not accepted), so a typo never silently
//! drops traffic rules. What is served but may not work as written (HTTP rules on an
//! opaque port) is a warning.

use super::{Object, Parsed, RegistryError};
use crate::model::MeshSnapshot;
use crate::registry::policies::{self, Declared, PolicyObject};

pub(super) fn add(
    objects: &[Parsed],
    snapshot: &mut MeshSnapshot,
    errors: &mut Vec<RegistryError>,
    warnings: &mut Vec<RegistryError>,
) {
    let declared = objects
        .iter()
        .filter_map(|p| {
            let object = match &p.object {
                Object::HttpRoute(o) => PolicyObject::HttpRoute(o),
                Object::TrafficPolicy(o) => PolicyObject::TrafficPolicy(o),
                Object::AuthorizationPolicy(o) => PolicyObject::AuthorizationPolicy(o),
                Object::PeerAuthentication(o) => PolicyObject::PeerAuthentication(o),
                Object::Service(_)
                | Object::EndpointSlice(_)
                | Object::WorkloadEntry(_)
                | Object::BootstrapToken(_) => return None,
            };
            Some(Declared {
                source: p,
                location: Some(format!("{}:{}", p.file.display(), p.line)),
                object,
            })
        })
        .collect();
    for verdict in policies::add(declared, snapshot) {
        let p = verdict.source;
        let at = |reason: String| RegistryError::new(&p.file, Some(p.line), reason);
        for note in &verdict.notes {
            tracing::info!(file = %p.file.display(), line = p.line, %note, "part of a route does not apply");
        }
        if let Some((_, field_errors)) = verdict.rejected {
            errors.extend(field_errors.iter().map(|e| at(e.to_string())));
        }
        warnings.extend(verdict.l7_on_opaque_ports.iter().map(|w| at(w.to_string())));
    }
}
