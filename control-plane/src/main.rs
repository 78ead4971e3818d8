use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use trellis_control::{ControlConfig, start};

/// The Trellis control plane: registry, CA and discovery.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Folder of YAML (Services, EndpointSlices, WorkloadEntries, BootstrapTokens).
    #[arg(long, env = "TRELLIS_REGISTRY_DIR")]
    registry_dir: PathBuf,
    /// Where the CA keeps its root certificate and key.
    #[arg(long, env = "TRELLIS_STATE_DIR", default_value = "/var/lib/trellis")]
    state_dir: PathBuf,
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Discovery and CA (gRPC over TLS).
    #[arg(long, default_value = "127.0.0.1:15010")]
    grpc_addr: SocketAddr,
    /// Health, metrics and status.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// Lifetime of workload certificates.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Names and addresses in the control plane's serving certificate.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "trellis-control,trellis-control.trellis-system.svc,localhost,127.0.0.1"
    )]
    server_names: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let control = start(ControlConfig {
        registry_dir: args.registry_dir,
        state_dir: args.state_dir,
        trust_domain: args.trust_domain,
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        cert_ttl: args.cert_ttl,
        server_names: args.server_names,
    })
    .await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    control.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
