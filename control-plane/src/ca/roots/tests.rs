use std::time::{Duration, SystemTime};

use trellis_identity::{SpiffeId, WorkloadKey};

use super::*;
use crate::ca::{CertificateAuthority, Proven};

const TD: &str = "cluster.local";
const TTL: Duration = Duration::from_secs(3600);

fn at(unix: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
}

/// Signs a leaf for `echo` with the CA the set makes and returns the fingerprint of
/// the root whose key signed it, checked by verifying the signature.
fn signing_root_of(roots: &RootSet) -> String {
    let ca = CertificateAuthority::from_roots(roots, TD, TTL).unwrap();
    let echo = SpiffeId::new(TD, "default", "echo").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let leaf = ca
        .sign_workload(
            &key.csr_pem(&echo).unwrap(),
            &Proven {
                identity: echo.clone(),
                workload: None,
            },
            None,
        )
        .unwrap();
    let bundle = trellis_identity::TrustBundle::from_pem(TD, &roots.bundle_pem()).unwrap();
    let chain = [pem::parse(&leaf).unwrap().into_contents().into()];
    let signers: Vec<String> = bundle
        .signer_of(&chain)
        .map(|r| trellis_identity::root_fingerprint(r))
        .into_iter()
        .collect();
    assert_eq!(signers.len(), 1, "a root of the bundle signed it");
    assert_eq!(signers[0], ca.signing_root());
    signers[0].clone()
}

#[test]
fn a_rotation_goes_single_added_activated_single() {
    let mut roots = RootSet::generate(TD).unwrap();
    let old = fingerprint(&roots.active.cert_pem);
    assert_eq!(roots.phase(), RotationPhase::Single);
    assert_eq!(signing_root_of(&roots), old);

    roots.add(TD).unwrap();
    assert_eq!(roots.phase(), RotationPhase::Added);
    let new = fingerprint(&roots.next.as_ref().unwrap().cert_pem);
    assert_ne!(old, new);
    let bundle: Vec<String> = roots.bundle_pem().iter().map(|r| fingerprint(r)).collect();
    assert_eq!(bundle, [old.clone(), new.clone()]);
    assert_eq!(signing_root_of(&roots), old, "added, not yet signing");

    roots.activate(at(1_000), TTL).unwrap();
    assert_eq!(roots.phase(), RotationPhase::Activated);
    let bundle: Vec<String> = roots.bundle_pem().iter().map(|r| fingerprint(r)).collect();
    assert_eq!(bundle, [new.clone(), old.clone()]);
    assert_eq!(signing_root_of(&roots), new);
    assert_eq!(
        roots.previous.as_ref().unwrap().retire_after_unix,
        1_000 + 3600
    );
    assert!(
        !roots
            .to_entries()
            .values()
            .any(|v| v.contains("PRIVATE KEY") && *v != roots.active.key_pem),
        "the old root's key is dropped at activation"
    );

    roots.retire(at(1_000 + 3600), false).unwrap();
    assert_eq!(roots.phase(), RotationPhase::Single);
    let bundle: Vec<String> = roots.bundle_pem().iter().map(|r| fingerprint(r)).collect();
    assert_eq!(bundle, std::slice::from_ref(&new));
    assert_eq!(signing_root_of(&roots), new);
}

#[test]
fn steps_out_of_order_are_refused() {
    let mut roots = RootSet::generate(TD).unwrap();
    assert!(matches!(
        roots.activate(at(0), TTL),
        Err(CaError::Rotation(RotationError::NothingToActivate(
            RotationPhase::Single
        )))
    ));
    assert!(matches!(
        roots.retire(at(0), true),
        Err(CaError::Rotation(RotationError::NothingToRetire(
            RotationPhase::Single
        )))
    ));
    roots.add(TD).unwrap();
    assert!(matches!(
        roots.add(TD),
        Err(CaError::Rotation(RotationError::InProgress(
            RotationPhase::Added
        )))
    ));
    assert!(matches!(
        roots.retire(at(0), true),
        Err(CaError::Rotation(RotationError::NothingToRetire(_)))
    ));
    roots.activate(at(0), TTL).unwrap();
    assert!(matches!(
        roots.add(TD),
        Err(CaError::Rotation(RotationError::InProgress(
            RotationPhase::Activated
        )))
    ));
}

#[test]
fn retiring_too_early_is_refused_with_when_it_becomes_safe_unless_forced() {
    let mut roots = RootSet::generate(TD).unwrap();
    roots.add(TD).unwrap();
    roots.activate(at(1_700_000_000), TTL).unwrap();
    let err = roots.retire(at(1_700_000_000 + 600), false).unwrap_err();
    match &err {
        CaError::Rotation(RotationError::TooEarly {
            safe_at,
            safe_at_unix,
            wait_seconds,
        }) => {
            assert_eq!(*safe_at_unix, 1_700_003_600);
            assert_eq!(*wait_seconds, 3000);
            assert_eq!(safe_at, "2023-11-14T23:13:20Z");
        }
        other => panic!("{other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("2023-11-14T23:13:20Z") && message.contains("--force"),
        "{message}"
    );
    assert_eq!(roots.phase(), RotationPhase::Activated, "nothing changed");
    roots.retire(at(1_700_000_000 + 600), true).unwrap();
    assert_eq!(roots.phase(), RotationPhase::Single);
}

#[test]
fn a_later_start_only_pushes_retirement_later() {
    let mut roots = RootSet::generate(TD).unwrap();
    assert!(
        !roots.keep_previous_until(5_000),
        "nothing to keep when single"
    );
    roots.add(TD).unwrap();
    roots.activate(at(1_000), TTL).unwrap();
    assert!(!roots.keep_previous_until(2_000));
    assert!(roots.keep_previous_until(9_000));
    assert_eq!(roots.previous.as_ref().unwrap().retire_after_unix, 9_000);
}

/// Every phase survives a restart: what is saved loads back equal, and a control
/// plane started on it signs with the same root and serves the same bundle.
#[test]
fn every_phase_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let first = CertificateAuthority::load_or_create(state, TD, TTL).unwrap();
    let mut roots = RootSet::load_dir(state).unwrap().unwrap();
    assert_eq!(roots.phase(), RotationPhase::Single);
    assert_eq!(first.trust_bundle_pem(), roots.bundle_pem());

    type Step = fn(&mut RootSet);
    let steps: [Step; 3] = [
        |r| r.add(TD).unwrap(),
        |r| r.activate(SystemTime::now(), TTL).unwrap(),
        |r| r.retire(SystemTime::now(), true).unwrap(),
    ];
    for (step, expected) in steps.into_iter().zip([
        RotationPhase::Added,
        RotationPhase::Activated,
        RotationPhase::Single,
    ]) {
        step(&mut roots);
        roots.save_dir(state).unwrap();
        let loaded = RootSet::load_dir(state).unwrap().unwrap();
        assert_eq!(loaded.phase(), expected);
        assert_eq!(loaded.bundle_pem(), roots.bundle_pem());
        let restarted = CertificateAuthority::load_or_create(state, TD, TTL).unwrap();
        assert_eq!(restarted.trust_bundle_pem(), roots.bundle_pem());
        assert_eq!(
            restarted.signing_root(),
            fingerprint(&roots.active.cert_pem)
        );
        assert_eq!(
            std::fs::read_to_string(state.join(TRUST_BUNDLE_FILE)).unwrap(),
            roots.bundle_pem().concat()
        );
        // What the restart may have pushed (the retirement) is what is kept now.
        roots = RootSet::load_dir(state).unwrap().unwrap();
    }
    for name in [NEXT_CERT, NEXT_KEY, PREVIOUS_CERT, PREVIOUS_RETIRE_AFTER] {
        assert!(!state.join(name).exists(), "{name} removed once single");
    }
}

#[test]
fn a_restart_after_activation_keeps_the_old_root_one_leaf_ttl_longer() {
    let dir = tempfile::tempdir().unwrap();
    let mut roots = RootSet::generate(TD).unwrap();
    roots.add(TD).unwrap();
    // Activated long ago, as far as the state says...
    roots.activate(at(1_000), TTL).unwrap();
    roots.save_dir(dir.path()).unwrap();
    // ...but this control plane may be the first to stop signing with the old root.
    let before = unix(SystemTime::now());
    CertificateAuthority::load_or_create(dir.path(), TD, TTL).unwrap();
    let loaded = RootSet::load_dir(dir.path()).unwrap().unwrap();
    let after = loaded.previous.unwrap().retire_after_unix;
    assert!(after >= before + 3600, "{after} < {before} + 3600");
}

#[test]
fn keys_are_private_and_old_single_root_dirs_still_load() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut roots = RootSet::generate(TD).unwrap();
    roots.add(TD).unwrap();
    roots.save_dir(dir.path()).unwrap();
    for key in [ACTIVE_KEY, NEXT_KEY] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // A state dir from before rotations: just the two files.
    let old = tempfile::tempdir().unwrap();
    std::fs::write(old.path().join(ACTIVE_CERT), &roots.active.cert_pem).unwrap();
    std::fs::write(old.path().join(ACTIVE_KEY), &roots.active.key_pem).unwrap();
    let loaded = RootSet::load_dir(old.path()).unwrap().unwrap();
    assert_eq!(loaded.phase(), RotationPhase::Single);
    assert_eq!(loaded.active, roots.active);
}

#[test]
fn inconsistent_sets_are_refused_not_guessed() {
    let mut roots = RootSet::generate(TD).unwrap();
    roots.add(TD).unwrap();
    let good = roots.to_entries();

    let mut half = good.clone();
    half.remove(NEXT_KEY);
    let err = RootSet::from_entries(&half).unwrap_err().to_string();
    assert!(err.contains(NEXT_CERT) && err.contains(NEXT_KEY), "{err}");

    let mut swapped = good.clone();
    swapped.insert(NEXT_KEY.to_owned(), good[ACTIVE_KEY].clone());
    assert!(matches!(
        RootSet::from_entries(&swapped),
        Err(CaError::KeyMismatch)
    ));

    let mut orphan = good.clone();
    orphan.remove(ACTIVE_CERT);
    orphan.remove(ACTIVE_KEY);
    assert!(RootSet::from_entries(&orphan).is_err());

    // An activation cut short after the previous root was written: refused, not
    // read as "added" (which would sign with the old root again).
    let mut cut = good.clone();
    cut.insert(PREVIOUS_CERT.to_owned(), good[ACTIVE_CERT].clone());
    cut.insert(PREVIOUS_RETIRE_AFTER.to_owned(), "1000".to_owned());
    let err = RootSet::from_entries(&cut).unwrap_err().to_string();
    assert!(err.contains("at most one rotation step"), "{err}");

    assert_eq!(RootSet::from_entries(&BTreeMap::new()).unwrap(), None);
}

#[test]
fn debug_never_shows_a_key() {
    let roots = RootSet::generate(TD).unwrap();
    let shown = format!("{roots:?}");
    assert!(!shown.contains("PRIVATE"), "{shown}");
    assert!(
        shown.contains(&fingerprint(&roots.active.cert_pem)),
        "{shown}"
    );
}
