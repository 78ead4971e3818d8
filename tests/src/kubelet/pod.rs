//! One pod's life: network, volumes, init containers in order (native sidecars started
//! and kept), app containers under the pod's restart policy, probes, status, and a
//! graceful end (apps first, then sidecars in reverse order).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::config::KubeletConfig;
use super::container;
use super::env::{PodAddresses, container_env};
use super::network::{IpPool, PodNetwork};
use super::probe::{Check, Timing, run_network};
use super::services::ServiceProxy;
use super::status::{ContainerRecord, Phase, PodState, now};
use super::volumes::{self, PodVolumes};

/// Longest wait between two restarts of a crashing container.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What every pod worker shares.
pub struct KubeletShared {
    pub client: Client,
    pub cfg: Arc<KubeletConfig>,
    pub proxy: ServiceProxy,
    pub pool: Mutex<IpPool>,
    pub next_index: std::sync::atomic::AtomicU32,
    /// This binary, for the `container-exec` wrapper.
    pub exe: PathBuf,
}

/// The newest Pod object, and whether the pod must end.
#[derive(Debug, Clone)]
pub struct PodSignal {
    pub pod: Arc<Pod>,
    /// The object is gone from the API server: stop at once, delete nothing.
    pub gone: bool,
    /// The kubelet is shutting down: stop at once, leave the object.
    pub shutdown: bool,
}

impl PodSignal {
    fn must_end(&self) -> bool {
        self.gone || self.shutdown || self.pod.metadata.deletion_timestamp.is_some()
    }
}

/// Which container a supervisor runs.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Init(usize),
    App(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    Always,
    OnFailure,
    Never,
}

impl Restart {
    fn of_pod(pod: &Pod) -> Self {
        match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
            Some("Never") => Restart::Never,
            Some("OnFailure") => Restart::OnFailure,
            _ => Restart::Always,
        }
    }
}

/// One running pod.
struct PodRun {
    shared: Arc<KubeletShared>,
    pod: Arc<Pod>,
    name: String,
    namespace: String,
    network: PodNetwork,
    volumes: OnceLock<PodVolumes>,
    /// Logs, exec plans, scratch folders.
    dir: PathBuf,
    state: Mutex<PodState>,
    /// Bumped on every change of `state`.
    changed: watch::Sender<u64>,
}

impl PodRun {
    fn addrs(&self) -> PodAddresses {
        PodAddresses {
            pod_ip: self.network.ip,
            host_ip: self.shared.cfg.node_ip,
        }
    }

    fn update<R>(&self, f: impl FnOnce(&mut PodState) -> R) -> Option<R> {
        let r = self.state.lock().ok().map(|mut s| f(&mut s));
        self.changed.send_modify(|v| *v += 1);
        r
    }

    fn update_container(&self, slot: Slot, f: impl FnOnce(&mut ContainerRecord)) {
        self.update(|s| {
            let rec = match slot {
                Slot::Init(i) => s.inits.get_mut(i),
                Slot::App(i) => s.apps.get_mut(i),
            };
            if let Some(rec) = rec {
                f(rec);
            }
        });
    }

    fn container_started(&self, slot: Slot) -> bool {
        self.state.lock().is_ok_and(|s| match slot {
            Slot::Init(i) => s.inits.get(i).is_some_and(|c| c.started),
            Slot::App(i) => s.apps.get(i).is_some_and(|c| c.started),
        })
    }

    fn log_path(&self, container: &str) -> PathBuf {
        self.dir.join(format!("{container}.log"))
    }

    /// Starts the container's process (or, with `command`, an exec probe in it).
    async fn start(&self, c: &Container, command: Option<&[String]>, tag: &str) -> Result<Child> {
        let volumes = self
            .volumes
            .get()
            .ok_or_else(|| anyhow!("volumes not ready"))?;
        let cfg = &self.shared.cfg;
        let env = container_env(
            &self.shared.client,
            &self.pod,
            c,
            self.addrs(),
            (cfg.kubernetes_service_host, cfg.kubernetes_service_port),
        )
        .await?;
        let scratch = self.dir.join(format!("scratch-{}-{tag}", c.name));
        let plan = container::plan(&self.pod, c, &cfg.images, volumes, &env, scratch, command)?;
        let plan_path = self.dir.join(format!("{}-{tag}.plan.json", c.name));
        let log = self.log_path(&c.name);
        container::spawn(
            &self.shared.exe,
            &self.network.netns,
            &plan,
            &plan_path,
            &env,
            &log,
        )
    }
}

/// A container's supervising task and the way to stop it.
struct Supervisor {
    stop: watch::Sender<Option<Instant>>,
    task: JoinHandle<Option<i32>>,
    result: Option<Option<i32>>,
}

impl Supervisor {
    /// Its last exit code once it gave up or was stopped (`None`: never exited).
    async fn join(&mut self) -> Option<i32> {
        if let Some(r) = self.result {
            return r;
        }
        let r = (&mut self.task).await.unwrap_or(None);
        self.result = Some(r);
        r
    }

    fn request_stop(&self, deadline: Instant) {
        self.stop.send_replace(Some(deadline));
    }
}

#[derive(Default)]
struct Supervisors {
    inits: Vec<Supervisor>,
    sidecars: Vec<Supervisor>,
    apps: Vec<Supervisor>,
    helpers: Vec<JoinHandle<()>>,
}

/// Runs a pod from its network to its deletion.
pub async fn run_pod(shared: Arc<KubeletShared>, signals: watch::Receiver<PodSignal>) {
    let pod = signals.borrow().pod.clone();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let span = tracing::info_span!("pod", pod = %format!("{namespace}/{name}"));
    run_pod_inner(shared, signals, pod).instrument(span).await;
}

async fn run_pod_inner(
    shared: Arc<KubeletShared>,
    mut signals: watch::Receiver<PodSignal>,
    pod: Arc<Pod>,
) {
    let run = match prepare(&shared, &pod).await {
        Ok(run) => Arc::new(run),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "pod network setup failed");
            return;
        }
    };
    tracing::info!(ip = %run.network.ip, netns = %run.network.netns, "pod network ready");
    let mut sups = Supervisors::default();
    sups.helpers.push(tokio::spawn(status_writer(run.clone())));

    let ended = tokio::select! {
        phase = lifecycle(&run, &mut sups) => Some(phase),
        _ = signals.wait_for(PodSignal::must_end) => None,
    };
    if let Some(phase) = ended {
        // Finished (a Job's pod): stop sidecars, release the network, keep the object.
        tracing::info!(phase = phase.as_str(), "pod finished");
        let wait = grace(&run, &signals.borrow().clone());
        stop_all(&run, &mut sups, Instant::now() + wait).await;
        run.update(|s| s.phase = phase);
        write_status(&run).await;
        teardown(&run, &mut sups);
        let _ = signals.wait_for(PodSignal::must_end).await;
    } else {
        let signal = signals.borrow().clone();
        let deadline = if signal.gone || signal.shutdown {
            Instant::now() + Duration::from_secs(1)
        } else {
            Instant::now() + grace(&run, &signal)
        };
        tracing::info!("stopping pod");
        stop_all(&run, &mut sups, deadline).await;
        teardown(&run, &mut sups);
    }
    let signal = signals.borrow().clone();
    if !signal.gone && !signal.shutdown {
        delete_object(&run).await;
    }
    // Volumes hold tokens; the logs stay for the test.
    let _ = std::fs::remove_dir_all(run.dir.join("volumes"));
}

async fn prepare(shared: &Arc<KubeletShared>, pod: &Arc<Pod>) -> Result<PodRun> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let ip = shared
        .pool
        .lock()
        .map_err(|_| anyhow!("ip pool lock"))?
        .allocate()?;
    let index = shared
        .next_index
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let hosts = shared.proxy.hosts_for(ip, &name);
    let network = match PodNetwork::create(&shared.cfg, index, ip, &hosts) {
        Ok(n) => n,
        Err(e) => {
            if let Ok(mut pool) = shared.pool.lock() {
                pool.release(ip);
            }
            return Err(e);
        }
    };
    shared.proxy.register(&network.netns, ip, &name).await?;
    let dir = shared
        .cfg
        .state_dir
        .join("pods")
        .join(format!("{namespace}_{name}_{uid}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let record = |c: &Container, sidecar: bool| {
        ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or_default(), sidecar)
    };
    let state = PodState {
        phase: Phase::Pending,
        reason: None,
        message: None,
        network_ready: true,
        initialized: false,
        inits: spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| record(c, is_sidecar(c)))
            .collect(),
        apps: spec.containers.iter().map(|c| record(c, false)).collect(),
        start_time: now(),
    };
    Ok(PodRun {
        shared: shared.clone(),
        pod: pod.clone(),
        name,
        namespace,
        network,
        volumes: OnceLock::new(),
        dir,
        state: Mutex::new(state),
        changed: watch::channel(0).0,
    })
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// Volumes, init containers, sidecars, apps; returns only when the pod has finished
/// (every app container done under restartPolicy Never/OnFailure, or an init failed).
async fn lifecycle(run: &Arc<PodRun>, sups: &mut Supervisors) -> Phase {
    let mut attempt = 0u32;
    let written = loop {
        match volumes::write_all(
            &run.shared.client,
            &run.pod,
            run.addrs(),
            &run.dir.join("volumes"),
        )
        .await
        {
            Ok(w) => break w,
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, "volumes not ready");
                run.update(|s| s.message = Some(msg));
                tokio::time::sleep(backoff(&mut attempt)).await;
            }
        }
    };
    let _ = run.volumes.set(written.volumes);
    if let Some(after) = written.refresh_after {
        sups.helpers
            .push(tokio::spawn(refresh_tokens(run.clone(), after)));
    }
    run.update(|s| s.message = None);

    let spec = run.pod.spec.clone().unwrap_or_default();
    let policy = Restart::of_pod(&run.pod);
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let slot = Slot::Init(i);
        if is_sidecar(c) {
            sups.sidecars
                .push(supervise(run, slot, c.clone(), Restart::Always));
            // The next init container starts once this one has started (startup probe).
            let mut changes = run.changed.subscribe();
            while !run.container_started(slot) {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        } else {
            let restart = if policy == Restart::Never {
                Restart::Never
            } else {
                Restart::OnFailure
            };
            let mut sup = supervise(run, slot, c.clone(), restart);
            let code = sup.join().await;
            sups.inits.push(sup);
            if code != Some(0) {
                run.update(|s| {
                    s.reason = Some("InitContainerFailed".into());
                    s.message = Some(format!("init container {} exited with {code:?}", c.name));
                });
                return Phase::Failed;
            }
        }
    }
    run.update(|s| s.initialized = true);
    for (i, c) in spec.containers.iter().enumerate() {
        sups.apps
            .push(supervise(run, Slot::App(i), c.clone(), policy));
    }
    run.update(|s| s.phase = Phase::Running);
    let mut all_ok = true;
    for sup in &mut sups.apps {
        all_ok &= sup.join().await == Some(0);
    }
    if all_ok {
        Phase::Succeeded
    } else {
        Phase::Failed
    }
}

/// Rewrites the volumes (new tokens) at 80% of the shortest token life.
async fn refresh_tokens(run: Arc<PodRun>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = volumes::write_all(
            &run.shared.client,
            &run.pod,
            run.addrs(),
            &run.dir.join("volumes"),
        )
        .await
        {
            tracing::warn!(error = format!("{e:#}"), "token refresh failed");
        }
    }
}

fn backoff(attempt: &mut u32) -> Duration {
    let d = Duration::from_secs(1 << (*attempt).min(4)).min(MAX_BACKOFF);
    *attempt += 1;
    d
}

fn grace(run: &PodRun, signal: &PodSignal) -> Duration {
    let secs = signal
        .pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            run.pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30)
        .max(0) as u64;
    Duration::from_secs(secs.min(run.shared.cfg.max_grace_seconds))
}

/// Apps first, then sidecars in reverse order, then anything still initializing.
async fn stop_all(run: &PodRun, sups: &mut Supervisors, deadline: Instant) {
    for sup in &sups.apps {
        sup.request_stop(deadline);
    }
    for sup in &mut sups.apps {
        sup.join().await;
    }
    // Sidecars get what is left of the grace period, and at least a moment.
    let sidecar_deadline = deadline.max(Instant::now() + Duration::from_secs(1));
    for sup in sups.sidecars.iter_mut().rev() {
        sup.request_stop(sidecar_deadline);
        sup.join().await;
    }
    for sup in &mut sups.inits {
        sup.request_stop(Instant::now());
        sup.join().await;
    }
    tracing::debug!(pod = %run.name, "containers stopped");
}

fn teardown(run: &PodRun, sups: &mut Supervisors) {
    for h in sups.helpers.drain(..) {
        h.abort();
    }
    run.shared.proxy.unregister(&run.network.netns);
    run.network.remove();
    if let Ok(mut pool) = run.shared.pool.lock() {
        pool.release(run.network.ip);
    }
    tracing::info!(netns = %run.network.netns, "pod network removed");
}

async fn delete_object(run: &PodRun) {
    let api: Api<Pod> = Api::namespaced(run.shared.client.clone(), &run.namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: run.pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&run.name, &params).await {
        Ok(_) => tracing::info!("pod object deleted"),
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => tracing::warn!(error = %e, "could not delete pod object"),
    }
}

/// Writes the status whenever it changes (bursts are merged).
async fn status_writer(run: Arc<PodRun>) {
    let mut changes = run.changed.subscribe();
    changes.mark_changed();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        changes.mark_unchanged();
        write_status(&run).await;
    }
}

async fn write_status(run: &PodRun) {
    let Some(status) = run
        .state
        .lock()
        .ok()
        .map(|s| s.to_status(Some(run.network.ip), run.shared.cfg.node_ip))
    else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(run.shared.client.clone(), &run.namespace);
    let patch = Patch::Merge(serde_json::json!({ "status": status }));
    if let Err(e) = api
        .patch_status(&run.name, &PatchParams::default(), &patch)
        .await
    {
        match e {
            kube::Error::Api(s) if s.is_not_found() => {}
            e => tracing::warn!(error = %e, "pod status write failed"),
        }
    }
}

/// Starts a task that runs one container under `restart`, with its probes.
fn supervise(run: &Arc<PodRun>, slot: Slot, c: Container, restart: Restart) -> Supervisor {
    let (stop, stop_rx) = watch::channel(None);
    let task = tokio::spawn(supervise_loop(run.clone(), slot, c, restart, stop_rx));
    Supervisor {
        stop,
        task,
        result: None,
    }
}

enum Outcome {
    Exited(i32),
    ProbeKill(String),
    Stop,
}

async fn supervise_loop(
    run: Arc<PodRun>,
    slot: Slot,
    c: Container,
    restart: Restart,
    mut stop: watch::Receiver<Option<Instant>>,
) -> Option<i32> {
    let mut last = None;
    let mut attempt = 0u32;
    loop {
        if stop.borrow().is_some() {
            return last;
        }
        let mut child = match run.start(&c, None, "run").await {
            Ok(child) => child,
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(container = %c.name, error = %msg, "container did not start");
                run.update_container(slot, |r| r.set_waiting("CreateContainerError", Some(msg)));
                if wait_or_stop(&mut stop, backoff(&mut attempt)).await {
                    return last;
                }
                continue;
            }
        };
        let pid = child.id();
        tracing::info!(container = %c.name, pid, "container started");
        let has_startup = c.startup_probe.is_some();
        let has_readiness = c.readiness_probe.is_some();
        run.update_container(slot, |r| {
            r.set_running(pid);
            r.started = !has_startup;
            r.ready = !has_startup && !has_readiness;
        });
        let ran_since = Instant::now();
        let outcome = tokio::select! {
            status = child.wait() => Outcome::Exited(exit_code(status)),
            why = probes(&run, slot, &c) => Outcome::ProbeKill(why),
            _ = stop.wait_for(Option::is_some) => Outcome::Stop,
        };
        let code = match outcome {
            Outcome::Exited(code) => code,
            Outcome::ProbeKill(why) => {
                tracing::info!(container = %c.name, %why, "killing container");
                let deadline =
                    Instant::now() + Duration::from_secs(run.shared.cfg.max_grace_seconds);
                terminate(&mut child, deadline).await
            }
            Outcome::Stop => {
                let deadline = stop.borrow().unwrap_or_else(Instant::now);
                let code = terminate(&mut child, deadline).await;
                run.update_container(slot, |r| r.set_terminated(code));
                tracing::info!(container = %c.name, code, "container stopped");
                return Some(code);
            }
        };
        tracing::info!(container = %c.name, code, "container exited");
        run.update_container(slot, |r| r.set_terminated(code));
        last = Some(code);
        let again = match restart {
            Restart::Always => true,
            Restart::OnFailure => code != 0,
            Restart::Never => false,
        };
        if !again {
            return last;
        }
        if ran_since.elapsed() > Duration::from_secs(30) {
            attempt = 0;
        }
        let delay = backoff(&mut attempt);
        run.update_container(slot, |r| {
            r.restart_count += 1;
            r.set_waiting("CrashLoopBackOff", Some(format!("restarting in {delay:?}")));
        });
        if wait_or_stop(&mut stop, delay).await {
            return last;
        }
    }
}

/// Sleeps `d`; true if a stop came first.
async fn wait_or_stop(stop: &mut watch::Receiver<Option<Instant>>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(Option::is_some) => true,
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => 255,
    }
}

/// SIGTERM to the container's process group, SIGKILL at `deadline`.
async fn terminate(child: &mut Child, deadline: Instant) -> i32 {
    if let Some(pid) = child.id() {
        container::signal_group(pid, "TERM").await;
        if let Ok(status) = tokio::time::timeout_at(deadline, child.wait()).await {
            return exit_code(status);
        }
        container::signal_group(pid, "KILL").await;
    }
    let _ = child.start_kill();
    exit_code(child.wait().await)
}

/// Runs the startup probe, then readiness and liveness; returns only when the container
/// must be killed (startup or liveness failed `failureThreshold` times in a row).
async fn probes(run: &PodRun, slot: Slot, c: &Container) -> String {
    if let Some(p) = &c.startup_probe {
        let t = Timing::of(p);
        tokio::time::sleep(t.initial_delay).await;
        let mut failures = 0;
        loop {
            match probe_once(run, p, c, t).await {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    tracing::debug!(container = %c.name, error = format!("{e:#}"), failures, "startup probe failed");
                    if failures >= t.failure_threshold {
                        return format!("startup probe failed: {e:#}");
                    }
                }
            }
            tokio::time::sleep(t.period).await;
        }
        let ready_now = c.readiness_probe.is_none();
        run.update_container(slot, |r| {
            r.started = true;
            r.ready = ready_now;
        });
    }
    let readiness = async {
        let Some(p) = &c.readiness_probe else {
            return std::future::pending::<()>().await;
        };
        let t = Timing::of(p);
        tokio::time::sleep(t.initial_delay).await;
        let (mut ok_run, mut fail_run, mut ready) = (0u32, 0u32, false);
        loop {
            match probe_once(run, p, c, t).await {
                Ok(()) => {
                    ok_run += 1;
                    fail_run = 0;
                    if !ready && ok_run >= t.success_threshold {
                        ready = true;
                        run.update_container(slot, |r| r.ready = true);
                    }
                }
                Err(e) => {
                    fail_run += 1;
                    ok_run = 0;
                    tracing::debug!(container = %c.name, error = format!("{e:#}"), "readiness probe failed");
                    if ready && fail_run >= t.failure_threshold {
                        ready = false;
                        run.update_container(slot, |r| r.ready = false);
                    }
                }
            }
            tokio::time::sleep(t.period).await;
        }
    };
    let liveness = async {
        let Some(p) = &c.liveness_probe else {
            return std::future::pending::<String>().await;
        };
        let t = Timing::of(p);
        tokio::time::sleep(t.initial_delay).await;
        let mut failures = 0;
        loop {
            match probe_once(run, p, c, t).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures >= t.failure_threshold {
                        return format!("liveness probe failed: {e:#}");
                    }
                }
            }
            tokio::time::sleep(t.period).await;
        }
    };
    tokio::select! {
        () = readiness => String::new(),
        why = liveness => why,
    }
}

async fn probe_once(
    run: &PodRun,
    p: &k8s_openapi::api::core::v1::Probe,
    c: &Container,
    t: Timing,
) -> Result<()> {
    match Check::of(p, c, run.network.ip)? {
        Check::Network(check) => run_network(&check, t.timeout).await,
        Check::Exec(command) => {
            let mut child = run.start(c, Some(&command), "probe").await?;
            match tokio::time::timeout(t.timeout, child.wait()).await {
                Ok(status) => match exit_code(status) {
                    0 => Ok(()),
                    code => Err(anyhow!("exec probe exited with {code}")),
                },
                Err(_) => {
                    let _ = terminate(&mut child, Instant::now()).await;
                    Err(anyhow!("exec probe timed out after {:?}", t.timeout))
                }
            }
        }
    }
}
