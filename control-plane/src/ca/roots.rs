//! The mesh's roots and where a rotation stands, as Linkerd's trust-anchor rotation:
//!
//! - **single**: one root, which signs and is the whole trust bundle;
//! - **added** (`add`): a second root joins the bundle; the first still signs, so
//!   proxies learn the new root before any leaf needs it;
//! - **activated** (`activate`): the new root signs; the old one stays in the bundle,
//!   without its key, until the last leaf it signed has expired;
//! - **retired** (`retire`): the old root leaves the bundle; single again.
//!
//! A root set is a handful of named PEM entries, the same names as files in the
//! state dir (file mode) and as keys of the root Secret (kube mode, where the active
//! root keeps the Secret's `tls.crt`/`tls.key`). A set with only the active root is
//! exactly what a single-root install already has, so old state reads as "single".

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

use super::{CaError, io_err, root_params};

/// The root that signs: certificate and key.
pub const ACTIVE_CERT: &str = "root-cert.pem";
pub const ACTIVE_KEY: &str = "root-key.pem";
/// A root added to the bundle that does not sign yet.
pub const NEXT_CERT: &str = "next-root-cert.pem";
pub const NEXT_KEY: &str = "next-root-key.pem";
/// The root that signed before the last activation: trusted, never used to sign.
pub const PREVIOUS_CERT: &str = "previous-root-cert.pem";
/// Unix seconds after which no leaf signed by the previous root can still be valid.
pub const PREVIOUS_RETIRE_AFTER: &str = "previous-root-retire-after";
/// Every root of the bundle, concatenated: what a file-mode proxy's `--ca-root`
/// should hold. Written for operators; never read back.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

const ENTRIES: [&str; 6] = [
    ACTIVE_CERT,
    ACTIVE_KEY,
    NEXT_CERT,
    NEXT_KEY,
    PREVIOUS_CERT,
    PREVIOUS_RETIRE_AFTER,
];

/// A root with its key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyedRoot {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for KeyedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("KeyedRoot")
            .field("fingerprint", &fingerprint(&self.cert_pem))
            .finish_non_exhaustive()
    }
}

/// The root that signed before the last activation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousRoot {
    pub cert_pem: String,
    pub retire_after_unix: u64,
}

/// Where a rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationPhase {
    Single,
    Added,
    Activated,
}

impl std::fmt::Display for RotationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RotationPhase::Single => "single",
            RotationPhase::Added => "added",
            RotationPhase::Activated => "activated",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotationError {
    #[error(
        "a rotation is already under way (phase {0}); finish it (activate, then retire) before adding another root"
    )]
    InProgress(RotationPhase),
    #[error("there is no added root to activate; run `add` first (phase {0})")]
    NothingToActivate(RotationPhase),
    #[error("there is no previous root to retire (phase {0})")]
    NothingToRetire(RotationPhase),
    #[error(
        "retiring the previous root now would break leaves it signed that are still valid: it becomes safe at {safe_at} (unix {safe_at_unix}, in {wait_seconds} s); use --force to retire anyway"
    )]
    TooEarly {
        safe_at: String,
        safe_at_unix: u64,
        wait_seconds: u64,
    },
}

/// The roots of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootSet {
    pub active: KeyedRoot,
    pub next: Option<KeyedRoot>,
    pub previous: Option<PreviousRoot>,
}

impl RootSet {
    /// A fresh self-signed root, alone.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        Ok(RootSet {
            active: generate_root(trust_domain)?,
            next: None,
            previous: None,
        })
    }

    pub fn phase(&self) -> RotationPhase {
        match (&self.next, &self.previous) {
            (Some(_), _) => RotationPhase::Added,
            (None, Some(_)) => RotationPhase::Activated,
            (None, None) => RotationPhase::Single,
        }
    }

    /// Every root proxies must trust: the signing one first.
    pub fn bundle_pem(&self) -> Vec<String> {
        let mut bundle = vec![self.active.cert_pem.clone()];
        bundle.extend(self.next.iter().map(|r| r.cert_pem.clone()));
        bundle.extend(self.previous.iter().map(|r| r.cert_pem.clone()));
        bundle
    }

    /// Phase (a): a new root joins the bundle; the active one keeps signing.
    pub fn add(&mut self, trust_domain: &str) -> Result<(), CaError> {
        let phase = self.phase();
        if phase != RotationPhase::Single {
            return Err(CaError::Rotation(RotationError::InProgress(phase)));
        }
        self.next = Some(generate_root(trust_domain)?);
        Ok(())
    }

    /// Phase (b): the added root signs from now on. The old root stays trusted until
    /// `now + max_leaf_ttl`, when the last leaf it signed has expired; its key is
    /// dropped, as nothing will be signed with it again.
    pub fn activate(&mut self, now: SystemTime, max_leaf_ttl: Duration) -> Result<(), CaError> {
        let Some(next) = self.next.take() else {
            return Err(CaError::Rotation(RotationError::NothingToActivate(
                self.phase(),
            )));
        };
        let old = std::mem::replace(&mut self.active, next);
        self.previous = Some(PreviousRoot {
            cert_pem: old.cert_pem,
            retire_after_unix: unix(now).saturating_add(max_leaf_ttl.as_secs()),
        });
        Ok(())
    }

    /// Pushes the previous root's retirement to at least `until_unix`: a control
    /// plane that may have signed with the old root until it started (one that had
    /// not yet seen the activation) calls this with its start time plus its leaf TTL.
    /// Returns whether anything changed.
    pub fn keep_previous_until(&mut self, until_unix: u64) -> bool {
        match &mut self.previous {
            Some(previous) if previous.retire_after_unix < until_unix => {
                previous.retire_after_unix = until_unix;
                true
            }
            _ => false,
        }
    }

    /// Phase (c): the old root leaves the bundle, once no leaf it signed is valid
    /// (or at once with `force`).
    pub fn retire(&mut self, now: SystemTime, force: bool) -> Result<(), CaError> {
        let Some(previous) = &self.previous else {
            return Err(CaError::Rotation(RotationError::NothingToRetire(
                self.phase(),
            )));
        };
        let now_unix = unix(now);
        if !force && now_unix < previous.retire_after_unix {
            return Err(CaError::Rotation(RotationError::TooEarly {
                safe_at: rfc3339(previous.retire_after_unix),
                safe_at_unix: previous.retire_after_unix,
                wait_seconds: previous.retire_after_unix - now_unix,
            }));
        }
        self.previous = None;
        Ok(())
    }

    /// Reads a set from named entries (see the constants); `None` when there is no
    /// active root yet. A certificate and key that do not belong together, or half a
    /// pair, is an error rather than a guess.
    pub fn from_entries(entries: &BTreeMap<String, String>) -> Result<Option<Self>, CaError> {
        let get = |name: &str| entries.get(name).cloned();
        let pair = |cert: &str, key: &str| -> Result<Option<KeyedRoot>, CaError> {
            match (get(cert), get(key)) {
                (None, None) => Ok(None),
                (Some(cert_pem), Some(key_pem)) => {
                    super::check_key_matches(&cert_pem, &key_pem)?;
                    Ok(Some(KeyedRoot { cert_pem, key_pem }))
                }
                _ => Err(CaError::RootSet(format!(
                    "{cert} and {key} must both be present or both absent"
                ))),
            }
        };
        let Some(active) = pair(ACTIVE_CERT, ACTIVE_KEY)? else {
            if entries.keys().any(|k| ENTRIES.contains(&k.as_str())) {
                return Err(CaError::RootSet(format!(
                    "no active root ({ACTIVE_CERT}, {ACTIVE_KEY}) but other rotation entries are present"
                )));
            }
            return Ok(None);
        };
        let next = pair(NEXT_CERT, NEXT_KEY)?;
        let previous = match (get(PREVIOUS_CERT), get(PREVIOUS_RETIRE_AFTER)) {
            (None, None) => None,
            (Some(cert_pem), Some(after)) => Some(PreviousRoot {
                cert_pem,
                retire_after_unix: after.trim().parse().map_err(|_| {
                    CaError::RootSet(format!("{PREVIOUS_RETIRE_AFTER} is not unix seconds"))
                })?,
            }),
            _ => {
                return Err(CaError::RootSet(format!(
                    "{PREVIOUS_CERT} and {PREVIOUS_RETIRE_AFTER} must both be present or both absent"
                )));
            }
        };
        if next.is_some() && previous.is_some() {
            return Err(CaError::RootSet(
                "both an added and a previous root: at most one rotation step at a time".into(),
            ));
        }
        Ok(Some(RootSet {
            active,
            next,
            previous,
        }))
    }

    /// The named entries of this set; absent names are to be removed.
    pub fn to_entries(&self) -> BTreeMap<String, String> {
        let mut entries = BTreeMap::new();
        entries.insert(ACTIVE_CERT.to_owned(), self.active.cert_pem.clone());
        entries.insert(ACTIVE_KEY.to_owned(), self.active.key_pem.clone());
        if let Some(next) = &self.next {
            entries.insert(NEXT_CERT.to_owned(), next.cert_pem.clone());
            entries.insert(NEXT_KEY.to_owned(), next.key_pem.clone());
        }
        if let Some(previous) = &self.previous {
            entries.insert(PREVIOUS_CERT.to_owned(), previous.cert_pem.clone());
            entries.insert(
                PREVIOUS_RETIRE_AFTER.to_owned(),
                previous.retire_after_unix.to_string(),
            );
        }
        entries
    }

    /// Reads the set kept in `state_dir`, if any.
    pub fn load_dir(state_dir: &Path) -> Result<Option<Self>, CaError> {
        let mut entries = BTreeMap::new();
        for name in ENTRIES {
            let path = state_dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    entries.insert(name.to_owned(), text);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(io_err(&path, source)),
            }
        }
        Self::from_entries(&entries)
    }

    /// Writes the set to `state_dir`, keys with mode 0600, each file replaced
    /// atomically (the signing root last, then removals). A crash between two files
    /// can leave a set [`Self::load_dir`] refuses with the files named (half a pair,
    /// a key that is not its certificate's, an added and a previous root at once),
    /// never one that loads as something else.
    pub fn save_dir(&self, state_dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(state_dir).map_err(|source| io_err(state_dir, source))?;
        let entries = self.to_entries();
        let write = |name: &str| -> Result<(), CaError> {
            match entries.get(name) {
                Some(text) => {
                    let private = name == ACTIVE_KEY || name == NEXT_KEY;
                    write_atomic(&state_dir.join(name), text, private)
                }
                None => Ok(()),
            }
        };
        write(PREVIOUS_RETIRE_AFTER)?;
        write(PREVIOUS_CERT)?;
        write(NEXT_KEY)?;
        write(NEXT_CERT)?;
        write(ACTIVE_KEY)?;
        write(ACTIVE_CERT)?;
        for name in [NEXT_CERT, NEXT_KEY, PREVIOUS_CERT, PREVIOUS_RETIRE_AFTER] {
            if !entries.contains_key(name) {
                let path = state_dir.join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(io_err(&path, source)),
                }
            }
        }
        write_atomic(
            &state_dir.join(TRUST_BUNDLE_FILE),
            &self.bundle_pem().concat(),
            false,
        )
    }
}

/// A short name for a root: the first 8 bytes of the SHA-256 of its DER, in hex.
/// Empty when the PEM is unreadable.
pub fn fingerprint(cert_pem: &str) -> String {
    match pem::parse(cert_pem) {
        Ok(der) => trellis_identity::root_fingerprint(der.contents()),
        Err(_) => String::new(),
    }
}

fn generate_root(trust_domain: &str) -> Result<KeyedRoot, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::BadRoot)?;
    let cert = root_params(trust_domain)
        .self_signed(&key)
        .map_err(CaError::BadRoot)?;
    Ok(KeyedRoot {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

pub(super) fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn rfc3339(unix: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn write_atomic(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|source| io_err(&tmp, source))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| io_err(&tmp, source))?;
    std::fs::rename(&tmp, path).map_err(|source| io_err(path, source))
}

#[cfg(test)]
mod tests;
