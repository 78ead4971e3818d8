//! trellisctl: the Trellis command line.

mod admin_client;
mod check;
mod control_api;
mod demo;
mod inject;
mod install;
mod output;
mod proxy_config;
mod proxy_status;
mod root;
mod top;
mod uninject;
mod uninstall;
mod version;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// Check a Kubernetes install (`--pre`: before installing) or, with
    /// --control-addr, a control plane's mesh. Exits non-zero when a check fails.
    Check(check::CheckArgs),
    /// Every proxy connected to the control plane: identity, workload, config, sync.
    ProxyStatus(proxy_status::ProxyStatusArgs),
    /// What one proxy holds (listeners, routes, endpoints, policies, certs).
    ProxyConfig(proxy_config::ProxyConfigArgs),
    /// Rotate the mesh root: status, add, activate, retire (state dir or Secret).
    Root(root::RootArgs),
    /// The busiest paths (source → destination): rps, success rate, p50/p99, from
    /// the proxies' metrics; refreshed every second on a terminal.
    Top(top::TopArgs),
    /// Per destination service, all callers together: rps, success rate, p50/p99, as
    /// the service's own sidecars report them.
    Stat(top::TopArgs),
    /// The client's version and, when it answers, the control plane's.
    Version(version::VersionArgs),
    /// Add the sidecar to the Pods and Pod templates of a manifest (offline webhook).
    Inject(inject::InjectArgs),
    /// Remove what `inject` added, restoring the manifest exactly.
    Uninject(uninject::UninjectArgs),
    /// Print the install manifests (CRDs, RBAC, control plane, webhook): `| kubectl apply -f -`.
    ///
    /// Uninstall: `trellisctl install | kubectl delete -f -` removes what it printed;
    /// then `kubectl delete configmap -A -l app.kubernetes.io/managed-by=trellis-control`
    /// removes the mesh root ConfigMaps (`trellis-ca-root`) the control plane wrote
    /// into each namespace (after the control plane is gone, or it writes them again).
    Install(install::InstallArgs),
    /// Remove what `install` created, webhook first and CRDs last: `| kubectl delete -f -`, or --apply.
    Uninstall(uninstall::UninstallArgs),
    /// Print a shell completion script: `source <(trellisctl completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    use tracing_subscriber::prelude::*;
    tracing_subscriber::fmt()
        // Logs on stderr: stdout is the YAML piped into kubectl.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(trellis_identity::log_filter(
            tracing::level_filters::LevelFilter::WARN,
        ))
        .init();
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args).await?,
        Command::Check(args) => {
            if !check::run(args).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::ProxyStatus(args) => proxy_status::run(args).await?,
        Command::ProxyConfig(args) => proxy_config::run(args).await?,
        Command::Root(args) => root::run(args).await?,
        Command::Top(args) => top::run(args, top::Grouping::Path).await?,
        Command::Stat(args) => top::run(args, top::Grouping::Destination).await?,
        Command::Version(args) => version::run(args).await?,
        Command::Inject(args) => inject::run(args)?,
        Command::Uninject(args) => uninject::run(args)?,
        Command::Install(args) => install::run(args)?,
        Command::Uninstall(args) => uninstall::run(args).await?,
        Command::Completion { shell } => {
            // Into a buffer: writing to a closed pipe (`| head`) is an error, not a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "trellisctl", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
