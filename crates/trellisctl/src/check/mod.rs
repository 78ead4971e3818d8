//! `trellisctl check`: one line per check, ✔ or ✖ with a hint, and a non-zero exit
//! when any fails. With `--control-addr` it checks a control plane's mesh (the
//! file-registry demo, or a port-forwarded one); otherwise the Kubernetes install
//! (`--pre`: whether the cluster can take one).

mod kube;
mod mesh;
mod webhook_tls;

use std::time::Duration;

use crate::output::Marks;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Check the cluster before `trellisctl install`: API server, version, rights.
    #[arg(long, conflicts_with = "control_addr")]
    pre: bool,
    /// Check the mesh of the control plane whose debug port is here (e.g.
    /// 127.0.0.1:15016, the demo's) instead of a Kubernetes install.
    #[arg(long)]
    control_addr: Option<String>,
    /// A certificate that expires sooner than this fails the check.
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    min_cert_validity: Duration,
    /// The control plane's namespace (Kubernetes).
    #[arg(long, default_value = "trellis-system")]
    namespace: String,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub ok: bool,
    pub message: String,
    /// What to do about a failure.
    pub hint: Option<String>,
}

impl Check {
    pub fn passed(message: impl Into<String>) -> Self {
        Check {
            ok: true,
            message: message.into(),
            hint: None,
        }
    }

    pub fn failed(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Check {
            ok: false,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

/// Runs the checks and prints them; `Ok(false)` when any failed.
pub async fn run(args: CheckArgs) -> anyhow::Result<bool> {
    let checks = match &args.control_addr {
        Some(addr) => mesh::checks(addr, args.min_cert_validity).await,
        None if args.pre => kube::pre_checks().await,
        None => kube::checks(&args.namespace).await,
    };
    print!("{}", render(&checks, &Marks::for_stdout()));
    Ok(checks.iter().all(|c| c.ok))
}

pub fn render(checks: &[Check], marks: &Marks) -> String {
    let mut out = String::new();
    for c in checks {
        let mark = if c.ok { marks.ok() } else { marks.failed() };
        out.push_str(&format!("{mark} {}\n", c.message));
        if let Some(hint) = &c.hint {
            out.push_str(&format!("    hint: {hint}\n"));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        out.push_str(&format!(
            "\n{} all {} checks passed\n",
            marks.ok(),
            checks.len()
        ));
    } else {
        out.push_str(&format!(
            "\n{} {failed} of {} checks failed\n",
            marks.failed(),
            checks.len()
        ));
    }
    out
}
