//! The command-line arguments of `trellis-proxy init`.

use crate::{
    Backend, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_PORTS, DEFAULT_PROXY_UID,
    InitConfig, InitError, Ipv4Cidr, cidr::parse_port,
};

/// Arguments for `trellis-proxy init`; flatten into the CLI with `#[command(flatten)]`
/// or use as a subcommand's `Args`. List flags take comma-separated values.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// UID of the proxy; its traffic is not redirected.
    #[arg(long, env = "TRELLIS_PROXY_UID", default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// GID of the proxy; its traffic is not redirected either.
    #[arg(long, env = "TRELLIS_PROXY_GID")]
    pub proxy_gid: Option<u32>,
    /// Port the outgoing connections are redirected to.
    #[arg(long, default_value_t = DEFAULT_OUTBOUND_PORT, value_parser = parse_port)]
    pub outbound_port: u16,
    /// Port the incoming connections are redirected to.
    #[arg(long, default_value_t = DEFAULT_INBOUND_PORT, value_parser = parse_port)]
    pub inbound_port: u16,
    /// The proxy's own ports, never redirected inbound.
    #[arg(long, value_delimiter = ',', value_parser = parse_port,
          default_values_t = DEFAULT_PROXY_PORTS)]
    pub proxy_ports: Vec<u16>,
    /// Destination ports whose outgoing connections bypass the proxy.
    #[arg(long, value_delimiter = ',', value_parser = parse_port)]
    pub exclude_outbound_ports: Vec<u16>,
    /// Local ports whose incoming connections bypass the proxy.
    #[arg(long, value_delimiter = ',', value_parser = parse_port)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination IPv4 networks (a.b.c.d/len) whose connections bypass the proxy.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<Ipv4Cidr>,
    /// iptables backend: auto, nft or legacy.
    #[arg(long, env = "TRELLIS_IPTABLES_BACKEND", default_value = "auto")]
    pub backend: Backend,
    /// Print the rules instead of writing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules instead of writing them.
    #[arg(long, conflicts_with = "dry_run")]
    pub cleanup: bool,
}

impl InitArgs {
    /// The configuration these arguments describe.
    pub fn config(&self) -> InitConfig {
        InitConfig {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_ports: self.proxy_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            backend: self.backend,
        }
    }

    /// Does what the flags say in the current network namespace: with `--dry-run`
    /// returns the rules as text; with `--cleanup` removes them; otherwise applies them.
    /// Returns the text to print (empty unless `--dry-run`).
    pub fn execute(&self) -> Result<String, InitError> {
        let cfg = self.config();
        if self.dry_run {
            cfg.validate()?;
            return Ok(crate::dry_run_text(&cfg));
        }
        if self.cleanup {
            crate::cleanup(cfg.backend)?;
        } else {
            crate::apply(&cfg)?;
        }
        Ok(String::new())
    }
}
