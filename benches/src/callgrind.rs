//! Instructions per request of each sidecar, from callgrind: repeatable on a shared
//! VM where time is not (the kernel's share is invisible to it; see RESULTS.md).
//!
//! The suite runs one scenario at a low rate (a sidecar under callgrind is ~15×
//! slower) with every Trellis sidecar started under `valgrind --tool=callgrind`; the
//! suite stops the sidecars gracefully so callgrind writes its totals, and each total
//! is divided by the requests the scenario sent (warm-up included). Start-up, key
//! generation and handshakes are counted too: a few per cent at the default length.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The `valgrind` command line that writes one file per process into `dir`.
pub fn wrapper(dir: &Path) -> Vec<String> {
    vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}/callgrind.%p.out", dir.display()),
    ]
}

/// A directory the sidecars (UID 1337) can write their profiles into.
pub fn profile_dir(out: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = out.join("callgrind");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
    Ok(dir)
}

/// One sidecar's total.
pub struct Instructions {
    pub pid: u32,
    /// `trellis-proxy run` arguments that say which sidecar it was.
    pub service_account: String,
    pub total: u64,
}

/// Reads every `callgrind.<pid>.out` in `dir`.
pub fn read_totals(dir: &Path) -> anyhow::Result<Vec<Instructions>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("callgrind."))
            .and_then(|n| n.strip_suffix(".out"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        found.push(parse(pid, &text).with_context(|| format!("in {}", path.display()))?);
    }
    if found.is_empty() {
        bail!(
            "no callgrind output in {} (is valgrind installed?)",
            dir.display()
        );
    }
    found.sort_by(|a, b| a.service_account.cmp(&b.service_account));
    Ok(found)
}

fn parse(pid: u32, text: &str) -> anyhow::Result<Instructions> {
    let mut total = None;
    let mut service_account = String::new();
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("summary:")
            .or(line.strip_prefix("totals:"))
        {
            total = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(cmd) = line.strip_prefix("cmd:") {
            let mut words = cmd.split_whitespace();
            while let Some(word) = words.next() {
                if word == "--service-account" {
                    service_account = words.next().unwrap_or_default().to_owned();
                }
            }
        }
    }
    Ok(Instructions {
        pid,
        service_account,
        total: total.context("no summary line (did the process exit cleanly?)")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_total_and_the_sidecar() {
        let text = "version: 1\ncmd:  /x/trellis-proxy run --namespace default --service-account client --x y\nevents: Ir\nsummary: 232830926\ntotals: 232831048\n";
        let parsed = parse(7, text).unwrap();
        assert_eq!(parsed.total, 232831048);
        assert_eq!(parsed.service_account, "client");
        assert!(parse(7, "cmd: x\n").is_err());
    }
}
