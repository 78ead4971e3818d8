use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trellis_control::ControlConfig;
use trellis_control::injector::{FailurePolicy, InjectorSettings, MeshTracing};
use trellis_control::server::{
    DEFAULT_DEBUG_PORT, KubeOptions, ServeOptions, WebhookOptions, start_kube_with, start_with,
};

/// The Trellis control plane: registry, CA and discovery.
#[derive(Parser, Debug)]
#[command(version, about, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Folder of YAML (Services, EndpointSlices, WorkloadEntries, BootstrapTokens).
    #[arg(long, env = "TRELLIS_REGISTRY_DIR", required_unless_present = "kube")]
    registry_dir: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster or kubeconfig) instead of a folder;
    /// service-account tokens are then checked with TokenReview.
    #[arg(long, env = "TRELLIS_KUBE", conflicts_with = "registry_dir")]
    kube: bool,
    /// The injector's admission webhook (kube mode only).
    #[arg(long, env = "TRELLIS_INJECTOR", requires = "kube")]
    injector: bool,
    #[arg(long, default_value = "0.0.0.0:15017")]
    injector_addr: SocketAddr,
    /// The proxy image the injector adds to Pods (the sidecar).
    #[arg(
        long,
        env = "TRELLIS_PROXY_IMAGE",
        default_value = trellis_control::injector::DEFAULT_PROXY_IMAGE
    )]
    proxy_image: String,
    /// The image of the injected iptables init container (`trellis-proxy init`;
    /// it needs iptables, which the distroless proxy image lacks).
    #[arg(
        long,
        env = "TRELLIS_INIT_IMAGE",
        default_value = trellis_control::injector::DEFAULT_INIT_IMAGE
    )]
    init_image: String,
    /// The control plane's address as injected proxies dial it.
    #[arg(long, default_value = "trellis-control.trellis-system.svc:15010")]
    injector_control_addr: String,
    /// The OTLP/gRPC collector (`http://host:4317`) every injected proxy sends its
    /// spans to; empty, the default: tracing off.
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT", default_value = "")]
    otlp_endpoint: String,
    /// Percent of new traces the injected proxies record.
    #[arg(long, env = "TRELLIS_TRACE_SAMPLING", default_value_t = 1.0, value_parser = parse_percent)]
    trace_sampling: f64,
    /// What the webhook answers when it cannot inject a Pod it should.
    #[arg(long, value_enum, default_value = "fail")]
    injector_failure_policy: FailurePolicy,
    /// The MutatingWebhookConfiguration whose caBundle is kept equal to the CA root.
    #[arg(long, default_value = "trellis-injector")]
    webhook_configuration: String,
    /// Where the CA keeps its root certificate and key (file mode; in kube mode the
    /// root is in the Secret `trellis-ca-root`). Holding Istio's plug-in CA files
    /// (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`), in either
    /// mode, the CA signs with that intermediate instead.
    #[arg(long, env = "TRELLIS_STATE_DIR", default_value = "/var/lib/trellis")]
    state_dir: PathBuf,
    /// The control plane's namespace (kube mode): the CA root Secret and the leader
    /// Lease live there. Default: the service account's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// The mesh root namespace (kube mode): policies there without a selector apply
    /// to the whole mesh. Default: the control plane's namespace (above). A file
    /// registry's root namespace is `trellis-system`.
    #[arg(long, env = "TRELLIS_ROOT_NAMESPACE", requires = "kube")]
    root_namespace: Option<String>,
    /// Discovery selectors (kube mode), as Istio's `discoverySelectors`: a label
    /// selector on Namespaces in kubectl's syntax (`trellis.io/discovery=enabled`,
    /// `env in (prod,staging)`); repeat it to OR several (in the variable, separate
    /// them with `;`). Only the selected namespaces and the root namespace
    /// contribute Services, routes and policies. Default: every namespace.
    #[arg(
        long = "discovery-selector",
        env = "TRELLIS_DISCOVERY_SELECTORS",
        value_delimiter = ';',
        requires = "kube"
    )]
    discovery_selectors: Vec<String>,
    /// This replica's name as the leader Lease's holder (kube mode). Default: the
    /// host name, which in a Pod is the Pod's name.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = trellis_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Discovery and CA (gRPC over TLS).
    #[arg(long, default_value = "127.0.0.1:15010")]
    grpc_addr: SocketAddr,
    /// Health and metrics.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// Debug views (/registry, /proxies): loopback only.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_DEBUG_PORT)))]
    debug_addr: SocketAddr,
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the Trellis CustomResourceDefinitions, generated from the Rust types,
    /// as one YAML stream (or write one file per CRD with --out).
    Crds {
        /// Write `<plural>.trellis.io.yaml` files into this folder (e.g. deploy/crds).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `trellis-control crds`.
fn print_crds(out: Option<PathBuf>) -> anyhow::Result<()> {
    let files = trellis_control::api::crd_files().context("rendering the CRDs")?;
    match out {
        Some(dir) => {
            for (name, text) in files {
                let path = dir.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
        None => {
            let docs: Vec<String> = files.into_iter().map(|(_, text)| text).collect();
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}

/// A percentage, 0 to 100 (as the proxy's `--trace-sampling` takes it).
fn parse_percent(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{value:?} is not a percentage from 0 to 100")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use tracing_subscriber::prelude::*;
    tracing_subscriber::fmt()
        // Colour only for a person at a terminal: container logs keep plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .finish()
        .with(trellis_identity::log_filter(
            tracing::level_filters::LevelFilter::INFO,
        ))
        .init();
    let args = Args::parse();
    if let Some(Command::Crds { out }) = args.command {
        return print_crds(out);
    }
    let config = ControlConfig {
        registry_dir: args.registry_dir.clone().unwrap_or_default(),
        state_dir: args.state_dir,
        trust_domain: args.trust_domain.clone(),
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        cert_ttl: args.cert_ttl,
        server_names: args.server_names.clone(),
    };
    let serve_options = ServeOptions {
        debug_addr: args.debug_addr,
        ..ServeOptions::default()
    };
    let control = if args.kube {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let webhook = args.injector.then(|| WebhookOptions {
            addr: args.injector_addr,
            settings: InjectorSettings {
                proxy_image: args.proxy_image,
                init_image: args.init_image,
                trust_domain: args.trust_domain,
                control_server_name: args
                    .injector_control_addr
                    .rsplit_once(':')
                    .map_or(args.injector_control_addr.as_str(), |(host, _)| host)
                    .to_owned(),
                control_addr: args.injector_control_addr,
                failure_policy: args.injector_failure_policy,
                tracing: (!args.otlp_endpoint.trim().is_empty()).then(|| MeshTracing {
                    otlp_endpoint: args.otlp_endpoint.trim().to_owned(),
                    sampling_percent: args.trace_sampling,
                }),
                ..InjectorSettings::default()
            },
            dns_names: args.server_names,
            configuration: Some(args.webhook_configuration),
        });
        let namespace = args
            .namespace
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let identity = match args.pod_name {
            Some(name) => name,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .context("no --pod-name (POD_NAME) and no host name to elect a leader by")?,
        };
        let root_namespace = args.root_namespace.unwrap_or_else(|| namespace.clone());
        tracing::info!(namespace, root_namespace, "kube mode");
        let discovery_scope =
            trellis_control::registry::kube::NamespaceScope::parse(&args.discovery_selectors)?;
        if !discovery_scope.selects_all() {
            tracing::info!(selectors = ?args.discovery_selectors, "discovery limited to selected namespaces");
        }
        let options = KubeOptions {
            client,
            root_namespace,
            discovery_scope,
            namespace,
            identity,
            webhook,
        };
        start_kube_with(config, options, serve_options).await?
    } else {
        start_with(config, serve_options).await?
    };
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
