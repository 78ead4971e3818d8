//! `trellisctl version`: this client's version and, when it answers, the control
//! plane's (from its debug port's `/version`).

use serde::Serialize;

use crate::control_api::{self, DEFAULT_CONTROL_DEBUG};
use crate::output::{self, OutputFormat, Table};

#[derive(clap::Args, Debug)]
pub struct VersionArgs {
    /// The control plane's debug address (loopback; `kubectl port-forward` to 15016
    /// in a cluster).
    #[arg(long, default_value = DEFAULT_CONTROL_DEBUG)]
    control_addr: String,
    /// Only the client's version; do not ask the control plane.
    #[arg(long)]
    client: bool,
    #[arg(short, long, value_enum, default_value_t)]
    output: OutputFormat,
}

#[derive(Serialize)]
struct Versions {
    client: String,
    control_plane: Option<String>,
    /// Why the control plane's version is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    control_plane_error: Option<String>,
}

pub async fn run(args: VersionArgs) -> anyhow::Result<()> {
    let mut versions = Versions {
        client: env!("CARGO_PKG_VERSION").to_owned(),
        control_plane: None,
        control_plane_error: None,
    };
    if !args.client {
        match control_api::version(&args.control_addr).await {
            Ok(v) => versions.control_plane = Some(v.version),
            Err(e) => versions.control_plane_error = Some(format!("{e:#}")),
        }
    }
    output::print(args.output, &versions, || {
        let mut table = Table::new(&["COMPONENT", "VERSION"]);
        table.row(vec!["trellisctl".into(), versions.client.clone()]);
        if !args.client {
            let control = match (&versions.control_plane, &versions.control_plane_error) {
                (Some(v), _) => v.clone(),
                (None, Some(e)) => format!("unreachable ({e})"),
                (None, None) => "-".into(),
            };
            table.row(vec![
                format!("trellis-control ({})", args.control_addr),
                control,
            ]);
        }
        table
    })
}
