//! `trellisctl proxy-status`: every proxy connected to the control plane, with its
//! identity, workload, config version and whether it holds what it was sent.

use crate::control_api::{self, DEFAULT_CONTROL_DEBUG, ProxyStatus};
use crate::output::{self, OutputFormat, Table, or_dash};

#[derive(clap::Args, Debug)]
pub struct ProxyStatusArgs {
    /// The control plane's debug address.
    #[arg(long, default_value = DEFAULT_CONTROL_DEBUG)]
    control_addr: String,
    #[arg(short, long, value_enum, default_value_t)]
    output: OutputFormat,
}

pub async fn run(args: ProxyStatusArgs) -> anyhow::Result<()> {
    let mut proxies = control_api::proxies(&args.control_addr).await?;
    proxies.sort_by(|a, b| (&a.identity, &a.workload).cmp(&(&b.identity, &b.workload)));
    output::print(args.output, &proxies, || table(&proxies))
}

pub fn table(proxies: &[ProxyStatus]) -> Table {
    let mut table = Table::new(&[
        "IDENTITY",
        "WORKLOAD",
        "STATUS",
        "CONFIG",
        "TYPES",
        "VERSION",
        "LEAF ROOT",
        "LAST NACK",
    ]);
    for p in proxies {
        let synced = p
            .types
            .values()
            .filter(|t| t.state == control_api::SyncState::Synced)
            .count();
        table.row(vec![
            p.identity.clone(),
            or_dash(p.workload.as_deref()),
            p.sync.as_str().to_owned(),
            p.config_version.clone(),
            format!("{synced}/{}", p.types.len()),
            or_dash(p.proxy_version.as_deref()),
            // Which root signed the proxy's leaf: during a root rotation, who still
            // holds a leaf of the old one.
            or_dash(
                p.certificate
                    .as_ref()
                    .map(|c| c.signing_root.as_str())
                    .filter(|r| !r.is_empty()),
            ),
            or_dash(p.last_nack.as_deref()),
        ]);
    }
    table
}
