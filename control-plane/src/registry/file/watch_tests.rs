#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::tests::write_dir;
use super::*;

const TD: &str = "cluster.local";
const POLL: Duration = Duration::from_millis(20);
const DEADLINE: Duration = Duration::from_secs(2);

const SVC: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
";

fn workload(name: &str, address: &str) -> String {
    format!(
        "apiVersion: trellis.io/v1alpha1\nkind: WorkloadEntry\n\
         metadata: {{name: {name}, namespace: demo, labels: {{app: echo}}}}\n\
         spec: {{address: {address}, serviceAccount: echo}}\n"
    )
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn publishes_changes_and_keeps_the_last_good_snapshot() {
    let dir = write_dir(&[("svc.yaml", SVC), ("wl.yaml", &workload("e1", "10.0.0.1"))]);
    let path = dir.path().to_owned();
    let first = Arc::new(initial(&path, TD).unwrap());
    let (snap_tx, mut snap_rx) = watch::channel(first.clone());
    let (status_tx, mut status_rx) = watch::channel(RegistryStatus::default());
    let task = tokio::spawn(watch_dir(path.clone(), TD.into(), POLL, snap_tx, status_tx));

    // The folder is what `initial` read: counts are filled in, nothing is published.
    within("status", status_rx.wait_for(|s| s.services == 1))
        .await
        .unwrap();
    assert_eq!(status_rx.borrow().workloads, 1);
    assert_eq!(status_rx.borrow().generation, 0);
    assert!(Arc::ptr_eq(&snap_rx.borrow_and_update(), &first));

    // A second workload: a new snapshot.
    let two = format!(
        "{}---\n{}",
        workload("e1", "10.0.0.1"),
        workload("e2", "10.0.0.2")
    );
    std::fs::write(path.join("wl.yaml"), &two).unwrap();
    let snap = within(
        "a new snapshot",
        snap_rx.wait_for(|s| s.workloads.len() == 2),
    )
    .await
    .unwrap()
    .clone();
    let key = (
        crate::model::ServiceKey {
            namespace: "demo".into(),
            name: "echo".into(),
        },
        80,
    );
    assert_eq!(snap.endpoints[&key].len(), 2);
    within(
        "status",
        status_rx.wait_for(|s| s.generation == 1 && s.workloads == 2),
    )
    .await
    .unwrap();

    // A malformed file: the snapshot stays, the status names file and line.
    let broken = SVC.replace("  selector:", "  selectr:");
    std::fs::write(path.join("svc.yaml"), &broken).unwrap();
    let status = within("errors", status_rx.wait_for(|s| !s.last_error.is_empty()))
        .await
        .unwrap()
        .clone();
    assert_eq!(status.last_error.len(), 1, "{status:#?}");
    let e = &status.last_error[0];
    assert!(e.file.ends_with("svc.yaml"), "{e:?}");
    assert_eq!(e.line, Some(5));
    assert!(e.reason.contains("unknown field `selectr`"), "{e:?}");
    assert_eq!(
        (status.generation, status.services, status.workloads),
        (1, 1, 2)
    );
    assert!(Arc::ptr_eq(&snap_rx.borrow(), &snap));
    assert!(!snap_rx.has_changed().unwrap());

    // Fixed again, to the same content: errors clear, no new snapshot.
    std::fs::write(path.join("svc.yaml"), SVC).unwrap();
    within(
        "errors to clear",
        status_rx.wait_for(|s| s.last_error.is_empty()),
    )
    .await
    .unwrap();
    assert!(!snap_rx.has_changed().unwrap());
    assert_eq!(status_rx.borrow().generation, 1);

    // A removed file is a change too.
    std::fs::remove_file(path.join("wl.yaml")).unwrap();
    let snap = within(
        "a new snapshot",
        snap_rx.wait_for(|s| s.workloads.is_empty()),
    )
    .await
    .unwrap()
    .clone();
    assert!(snap.endpoints[&key].is_empty());
    within("status", status_rx.wait_for(|s| s.generation == 2))
        .await
        .unwrap();

    task.abort();
}

#[tokio::test]
async fn a_folder_bad_from_the_start_is_reported() {
    let dir = write_dir(&[("svc.yaml", "apiVersion: v1\nkind: Servce\n")]);
    let path = dir.path().to_owned();
    let (snap_tx, snap_rx) = watch::channel(Arc::new(MeshSnapshot::default()));
    let (status_tx, mut status_rx) = watch::channel(RegistryStatus::default());
    let task = tokio::spawn(watch_dir(path.clone(), TD.into(), POLL, snap_tx, status_tx));
    let status = within("errors", status_rx.wait_for(|s| !s.last_error.is_empty()))
        .await
        .unwrap()
        .clone();
    assert_eq!(status.last_error[0].line, Some(1));
    assert_eq!(status.last_error[0].reason, "unknown kind v1/Servce");
    assert!(!snap_rx.has_changed().unwrap());

    std::fs::write(path.join("svc.yaml"), SVC).unwrap();
    within(
        "errors to clear",
        status_rx.wait_for(|s| s.last_error.is_empty() && s.services == 1),
    )
    .await
    .unwrap();
    assert_eq!(snap_rx.borrow().services.len(), 1);
    task.abort();
}

#[test]
fn a_missing_folder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let errors = load_dir(&missing, TD).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0].file.as_path(), errors[0].line),
        (missing.as_path(), None)
    );
    assert!(
        errors[0]
            .reason
            .starts_with("cannot read the registry folder"),
        "{errors:?}"
    );
}
