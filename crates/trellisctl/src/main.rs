//! trellisctl: the Trellis command line.

mod demo;
mod inject;
mod install;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "The Trellis command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a local mesh on loopback: control plane, two services with sidecars, traffic.
    Demo(demo::DemoArgs),
    /// Add the sidecar to the Pods and Pod templates of a manifest (offline webhook).
    Inject(inject::InjectArgs),
    /// Print the install manifests (CRDs, RBAC, control plane, webhook): `| kubectl apply -f -`.
    Install(install::InstallArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        // Logs on stderr: stdout is the YAML piped into kubectl.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args).await,
        Command::Inject(args) => inject::run(args),
        Command::Install(args) => install::run(args),
    }
}
