//! `trellis-test-kubelet container-exec PLAN`: the last step before a container's
//! program. It runs as root inside the pod's network namespace and a private mount
//! namespace of its own (`ip netns exec <ns> unshare -m --propagation private`), binds
//! the pod's volumes at the container's `volumeMounts`, then becomes the program via
//! `setpriv` (UID/GID from the securityContext, and a parent-death signal so nothing
//! outlives the kubelet).
//!
//! A mount path whose folders do not exist on the node is made on a tmpfs laid over its
//! nearest existing ancestor, into which that ancestor's entries are bound first: the
//! container sees the node's files plus its mounts, and nothing is made on the node.
//! When that ancestor is `/`, the container gets a root of its own the same way
//! (`pivot_root` to a tmpfs holding the node's top-level entries).

use std::convert::Infallible;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// What the wrapper does: written by the kubelet as JSON next to the container's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecPlan {
    /// Volume mounts, parents before children.
    pub mounts: Vec<MountPlan>,
    /// An empty folder the wrapper may mount scratch tmpfs file systems on.
    pub scratch: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub working_dir: Option<String>,
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// One bind mount: a volume folder (or a file or folder inside it, for `subPath`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountPlan {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Carries out `plan_path` and execs the program; returns only on failure.
pub fn container_exec(plan_path: &Path) -> Result<Infallible> {
    let text = std::fs::read_to_string(plan_path)
        .with_context(|| format!("read exec plan {}", plan_path.display()))?;
    let plan: ExecPlan = serde_json::from_str(&text).context("parse exec plan")?;
    let mut shadowed: Vec<PathBuf> = Vec::new();
    let own = needs_own_root(&plan.mounts);
    if own {
        own_root(&plan.scratch.join("own-root")).context("give the container a root of its own")?;
    }
    for (i, m) in plan.mounts.iter().enumerate() {
        let is_dir = m.source.is_dir();
        prepare_target(
            &m.target,
            is_dir,
            &plan.scratch.join(i.to_string()),
            &mut shadowed,
            own,
        )
        .with_context(|| format!("prepare mount point {}", m.target.display()))?;
        mount(&["--bind", path_str(&m.source)?, path_str(&m.target)?])?;
        if m.read_only {
            mount(&["-o", "remount,bind,ro", path_str(&m.target)?])?;
        }
    }
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.args(["--pdeathsig", "KILL"]);
    if plan.uid.is_some() || plan.gid.is_some() {
        let uid = plan.uid.unwrap_or(0).to_string();
        let gid = plan.gid.or(plan.uid).unwrap_or(0).to_string();
        cmd.args(["--reuid", &uid, "--regid", &gid, "--clear-groups"]);
    }
    cmd.arg("--").arg(&plan.program).args(&plan.args);
    if let Some(dir) = &plan.working_dir {
        cmd.current_dir(dir);
    }
    let err = cmd.exec();
    Err(anyhow!("exec {}: {err}", plan.program.display()))
}

/// Makes `target` exist (a folder, or an empty file when the source is a file) without
/// writing to the node's file system: see the module doc.
fn prepare_target(
    target: &Path,
    is_dir: bool,
    scratch: &Path,
    shadowed: &mut Vec<PathBuf>,
    own_root: bool,
) -> Result<()> {
    if !target.is_absolute() {
        bail!("mount path must be absolute");
    }
    if target.exists() {
        if target.is_dir() != is_dir {
            bail!(
                "exists, but is not a {}",
                if is_dir { "folder" } else { "file" }
            );
        }
        return Ok(());
    }
    let ancestor = target
        .ancestors()
        .skip(1)
        .find(|a| a.exists())
        .ok_or_else(|| anyhow!("no existing ancestor"))?;
    let real = std::fs::canonicalize(ancestor)?;
    if real == Path::new("/") {
        if !own_root {
            bail!("no root of its own to make a folder in");
        }
        // A root of our own is a tmpfs: what is made at its top is ours.
        if let Some(top) = target.components().nth(1) {
            shadowed.push(Path::new("/").join(top));
        }
    } else if !shadowed.iter().any(|s| real.starts_with(s)) {
        shadow(&real, scratch)?;
        shadowed.push(real);
    }
    if is_dir {
        std::fs::create_dir_all(target)?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::File::create(target)?;
    }
    Ok(())
}

/// Lays a tmpfs over `dir` that holds `dir`'s entries (bound in from the original).
fn shadow(dir: &Path, scratch: &Path) -> Result<()> {
    populate(dir, scratch)?;
    mount(&["--move", path_str(scratch)?, path_str(dir)?])
}

/// Mounts a tmpfs on `scratch` holding `dir`'s entries, each bound from the original.
fn populate(dir: &Path, scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(scratch)?;
    let mode = std::fs::metadata(dir)?.mode() & 0o7777;
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        &format!("mode={mode:o}"),
        "tmpfs",
        path_str(scratch)?,
    ])?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let from = entry.path();
        let to = scratch.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&from)?;
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
            continue;
        }
        if meta.is_dir() {
            std::fs::create_dir(&to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else {
            std::fs::File::create(&to)?;
        }
        if let Err(e) = mount(&["--rbind", path_str(&from)?, path_str(&to)?]) {
            // A socket or device that cannot be bound: the container goes without it.
            eprintln!("container-exec: {} left out: {e:#}", from.display());
        }
    }
    Ok(())
}

/// A mount point missing right under `/` cannot be made without writing to the node's
/// root: the container then gets a root of its own, a tmpfs holding the node's
/// top-level entries (bound), switched to with `pivot_root` (private mount namespace:
/// nothing else sees it).
fn needs_own_root(mounts: &[MountPlan]) -> bool {
    mounts.iter().any(|m| {
        !m.target.exists()
            && m.target
                .ancestors()
                .skip(1)
                .find(|a| a.exists())
                .and_then(|a| std::fs::canonicalize(a).ok())
                .is_some_and(|a| a == Path::new("/"))
    })
}

fn own_root(scratch: &Path) -> Result<()> {
    let root = scratch.join("root");
    populate(Path::new("/"), &root)?;
    let old = root.join(".node-root");
    std::fs::create_dir(&old)?;
    let out = Command::new("/usr/sbin/pivot_root")
        .arg(&root)
        .arg(&old)
        .output()
        .context("run pivot_root")?;
    if !out.status.success() {
        bail!(
            "pivot_root failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::env::set_current_dir("/")?;
    let out = Command::new("/usr/bin/umount")
        .args(["-l", "/.node-root"])
        .output()
        .context("run umount")?;
    if !out.status.success() {
        bail!(
            "umount of the old root failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::remove_dir("/.node-root")?;
    Ok(())
}

fn mount(args: &[&str]) -> Result<()> {
    let out = Command::new("/usr/bin/mount")
        .args(args)
        .output()
        .with_context(|| format!("run mount {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "mount {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))
}
