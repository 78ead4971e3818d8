//! `trellisctl root`: rotate the mesh root, as Linkerd's trust-anchor rotation —
//! `add` a second root to the bundle, `activate` it (new leaves are signed with it),
//! `retire` the old one once no leaf it signed is still valid. It works where the
//! control plane keeps its roots: the state dir (file mode) or the Secret
//! `trellis-ca-root` (kube mode). A new key is made here, in memory, and written only
//! there; no key is ever printed. The control plane reads its roots when it starts:
//! restart it after each step.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use trellis_control::ca::roots::{RootSet, RotationPhase, TRUST_BUNDLE_FILE, fingerprint};
use trellis_control::ca::{ROOT_SECRET, entries_from_secret, secret_data};

#[derive(clap::Args, Debug)]
pub struct RootArgs {
    #[command(subcommand)]
    step: RootStep,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(clap::Args, Debug)]
struct StoreArgs {
    /// File mode: the control plane's --state-dir.
    #[arg(long, global = true, conflicts_with = "kube")]
    state_dir: Option<PathBuf>,
    /// Kube mode: the Secret holding the roots, in --namespace (kubeconfig from the
    /// environment).
    #[arg(long, global = true)]
    kube: bool,
    /// The control plane's namespace (kube mode).
    #[arg(long, global = true, default_value = "trellis-system")]
    namespace: String,
}

#[derive(clap::Subcommand, Debug)]
enum RootStep {
    /// Where the rotation stands: the phase, the root that signs, the bundle.
    Status,
    /// Step 1: make a new root and add it to the bundle; the current root keeps
    /// signing. Then restart the control plane and wait until every proxy holds
    /// the bundle (`trellisctl proxy-status`: all SYNCED).
    Add {
        /// The trust domain named in the new root's subject.
        #[arg(long, default_value = trellis_identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Step 2: sign new leaves with the added root. The old root stays in the
    /// bundle until its last leaf has expired. Then restart the control plane.
    Activate {
        /// The longest leaf the control plane signs (its --cert-ttl): the old root
        /// can be retired this long after activation at the earliest. A control
        /// plane that restarts on the activated roots pushes this further itself.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        max_leaf_ttl: Duration,
    },
    /// Step 3: remove the old root from the bundle. Refused while a leaf it signed
    /// may still be valid, unless --force. Then restart the control plane.
    Retire {
        /// Retire now even if leaves of the old root may still be valid: peers
        /// holding them will fail handshakes until they renew.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(args: RootArgs) -> anyhow::Result<()> {
    let store = match (&args.store.state_dir, args.store.kube) {
        (Some(dir), false) => Store::Dir(dir.clone()),
        (None, true) => Store::Secret(
            Box::new(Api::namespaced(
                kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API")?,
                &args.store.namespace,
            )),
            args.store.namespace.clone(),
        ),
        _ => anyhow::bail!("say where the roots are: --state-dir DIR (file mode) or --kube"),
    };
    let (mut roots, secret) = store.load().await?;
    let now = SystemTime::now();
    let changed = match &args.step {
        RootStep::Status => false,
        RootStep::Add { trust_domain } => {
            roots.add(trust_domain)?;
            true
        }
        RootStep::Activate { max_leaf_ttl } => {
            roots.activate(now, *max_leaf_ttl)?;
            true
        }
        RootStep::Retire { force } => {
            roots.retire(now, *force)?;
            true
        }
    };
    if changed {
        store.save(&roots, secret).await?;
    }
    print!("{}", describe(&roots, &store, changed, now));
    Ok(())
}

enum Store {
    Dir(PathBuf),
    Secret(Box<Api<Secret>>, String),
}

impl Store {
    async fn load(&self) -> anyhow::Result<(RootSet, Option<Secret>)> {
        match self {
            Store::Dir(dir) => {
                if trellis_control::ca::plugged::is_plugged(dir) {
                    anyhow::bail!(
                        "{} holds a plug-in CA (ca-cert.pem): its roots are rotated by replacing those files, not with trellisctl root",
                        dir.display()
                    );
                }
                let roots = RootSet::load_dir(dir)
                    .with_context(|| format!("reading the roots in {}", dir.display()))?
                    .with_context(|| {
                        format!(
                            "{} holds no root yet: start the control plane once first",
                            dir.display()
                        )
                    })?;
                Ok((roots, None))
            }
            Store::Secret(api, namespace) => {
                let secret = api
                    .get_opt(ROOT_SECRET)
                    .await
                    .with_context(|| format!("reading Secret {namespace}/{ROOT_SECRET}"))?
                    .with_context(|| {
                        format!(
                            "no Secret {namespace}/{ROOT_SECRET}: is the control plane installed?"
                        )
                    })?;
                let entries = entries_from_secret(&secret)
                    .map_err(|e| anyhow::anyhow!("Secret {namespace}/{ROOT_SECRET}: {e}"))?;
                let roots = RootSet::from_entries(&entries)
                    .with_context(|| format!("Secret {namespace}/{ROOT_SECRET}"))?
                    .with_context(|| format!("Secret {namespace}/{ROOT_SECRET} holds no root"))?;
                Ok((roots, Some(secret)))
            }
        }
    }

    async fn save(&self, roots: &RootSet, secret: Option<Secret>) -> anyhow::Result<()> {
        match self {
            Store::Dir(dir) => roots
                .save_dir(dir)
                .with_context(|| format!("writing the roots to {}", dir.display())),
            Store::Secret(api, namespace) => {
                let mut secret = secret.context("the Secret was not read")?;
                secret.data = Some(secret_data(roots));
                // A replace carries the resourceVersion read: a concurrent change
                // makes this fail rather than be overwritten.
                api.replace(ROOT_SECRET, &PostParams::default(), &secret)
                    .await
                    .with_context(|| format!("writing Secret {namespace}/{ROOT_SECRET}"))?;
                Ok(())
            }
        }
    }

    fn restart_hint(&self) -> String {
        match self {
            Store::Dir(dir) => format!(
                "restart trellis-control; new proxies' --ca-root: {}",
                dir.join(TRUST_BUNDLE_FILE).display()
            ),
            Store::Secret(_, namespace) => {
                format!("kubectl -n {namespace} rollout restart deployment/trellis-control")
            }
        }
    }
}

fn describe(roots: &RootSet, store: &Store, changed: bool, now: SystemTime) -> String {
    let signing = fingerprint(&roots.active.cert_pem);
    let bundle: Vec<String> = roots.bundle_pem().iter().map(|r| fingerprint(r)).collect();
    let mut out = format!(
        "phase     {}\nsigning   {signing}\nbundle    {}\n",
        roots.phase(),
        bundle.join(" ")
    );
    if let Some(previous) = &roots.previous {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(previous.retire_after_unix);
        let wait = Duration::from_secs(at.duration_since(now).unwrap_or_default().as_secs());
        out.push_str(&format!(
            "retiring  {} (safe after {}{})\n",
            fingerprint(&previous.cert_pem),
            humantime::format_rfc3339_seconds(at),
            if wait.is_zero() {
                ", now".to_owned()
            } else {
                format!(", in {}", humantime::format_duration(wait))
            }
        ));
    }
    if changed {
        out.push_str(&format!("then      {}\n", store.restart_hint()));
    }
    out.push_str(&format!("next      {}\n", next_step(roots.phase())));
    out
}

fn next_step(phase: RotationPhase) -> &'static str {
    match phase {
        RotationPhase::Single => "nothing under way; `trellisctl root add` starts a rotation",
        RotationPhase::Added => {
            "once every proxy holds the new bundle (trellisctl proxy-status: all SYNCED), `trellisctl root activate`"
        }
        RotationPhase::Activated => {
            "proxies renew at half their leaf's life (LEAF ROOT in trellisctl proxy-status); `trellisctl root retire` once safe"
        }
    }
}
