//! `trellis-test-kubelet`: the test cluster's kubelet and kube-proxy (see
//! `trellis_tests::kubelet`), and the `container-exec` step every container starts with.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use trellis_tests::kubelet::{self, KubeletConfig};

#[derive(Parser)]
#[command(
    name = "trellis-test-kubelet",
    about = "A netns kubelet for Trellis tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Registers the Node and runs its Pods (inside the node network namespace).
    Run(KubeletConfig),
    /// Internal: mounts a container's volumes and becomes its program.
    ContainerExec { plan: PathBuf },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(cfg) => run(cfg),
        Cmd::ContainerExec { plan } => kubelet::container_exec(&plan).map(|never| match never {}),
    };
    if let Err(e) = result {
        eprintln!("trellis-test-kubelet: {e:#}");
        std::process::exit(1);
    }
}

fn run(cfg: KubeletConfig) -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    tracing_subscriber::fmt()
        .with_ansi(false)
        .finish()
        .with(trellis_identity::log_filter(
            tracing::level_filters::LevelFilter::INFO,
        ))
        .init();
    // One thread: every container is spawned from it, so their parent-death signal
    // fires only when the kubelet itself exits.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(kubelet::run(cfg))
}
