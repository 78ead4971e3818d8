//! Low-level helpers: running `ip`, creating and deleting network namespaces, the
//! `/etc/netns/<ns>/` files, and sweeping namespaces left by dead test processes.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Every namespace the test bed makes is named `trellis-<prefix>-<pid>-<counter>[-<pod>]`,
/// with `<prefix>` holding no `-`, so the owning pid can be read back.
pub const NAME_PREFIX: &str = "trellis";

/// Runs a command to completion; a non-zero exit is an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{program} {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `ip args...`, failing on a non-zero exit.
pub fn ip(args: &[&str]) -> Result<Output> {
    run("ip", args)
}

/// Creates a network namespace.
pub fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name]).map(|_| ())
}

/// Deletes a network namespace and its `/etc/netns/<name>` folder; absent is fine.
pub fn delete(name: &str) {
    if list().is_ok_and(|l| l.iter().any(|n| n == name))
        && let Err(e) = ip(&["netns", "del", name])
    {
        tracing::warn!(netns = name, error = %e, "could not delete network namespace");
    }
    let dir = etc_dir(name);
    if dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&dir)
    {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove netns etc dir");
    }
}

/// The namespaces `ip netns list` knows, names only.
pub fn list() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// `/etc/netns/<name>`: files here are bind-mounted over `/etc` by `ip netns exec`.
pub fn etc_dir(name: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(name)
}

/// Writes `/etc/netns/<name>/hosts` in place (same inode, so processes already running
/// in the namespace see the new content through their bind mount).
pub fn write_hosts(name: &str, content: &str) -> Result<()> {
    let dir = etc_dir(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("hosts");
    std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))
}

/// The pid encoded in a test-bed namespace name, if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.split('-');
    if parts.next()? != NAME_PREFIX {
        return None;
    }
    let _prefix = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let _counter: u64 = parts.next()?.parse().ok()?;
    Some(pid)
}

/// Deletes test-bed namespaces (and their `/etc/netns` folders) whose owning process is
/// gone, e.g. after a test run was killed. Returns the names deleted.
pub fn sweep_stale() -> Vec<String> {
    let me = std::process::id();
    let mut names = list().unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if let Some(n) = e.file_name().to_str()
                && !names.iter().any(|x| x == n)
            {
                names.push(n.to_string());
            }
        }
    }
    let mut deleted = Vec::new();
    for name in names {
        match owner_pid(&name) {
            Some(pid) if pid != me && !PathBuf::from(format!("/proc/{pid}")).exists() => {
                delete(&name);
                deleted.push(name);
            }
            _ => {}
        }
    }
    if !deleted.is_empty() {
        tracing::info!(?deleted, "removed stale test namespaces");
    }
    deleted
}

/// Keeps `[a-z0-9]`, at most 16 characters, so names stay parseable.
pub fn sanitize(prefix: &str) -> String {
    let s: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(16)
        .collect();
    if s.is_empty() { "bed".to_string() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(owner_pid("trellis-e2e-1234-7-node"), Some(1234));
        assert_eq!(owner_pid("trellis-e2e-1234-7-my-pod"), Some(1234));
        assert_eq!(owner_pid("trellis-init-99-0"), Some(99));
        assert_eq!(owner_pid("trellis-e2e-x-7-node"), None);
        assert_eq!(owner_pid("other-e2e-1-2"), None);
        assert_eq!(sanitize("E2E-http_1"), "e2ehttp1");
        assert_eq!(sanitize("--"), "bed");
    }
}
