//! Leader election among control-plane replicas with a `coordination.k8s.io/v1`
//! Lease, as client-go's leaderelection does it: the holder renews the Lease every
//! [`LeaseSettings::renew_interval`]; anyone may take it once it has seen the same
//! record, unrenewed, for `leaseDurationSeconds` by its own monotonic clock (so
//! clocks need not agree across nodes; `renewTime` is informational). Every write
//! carries the `resourceVersion` it read (a create has none), so of two replicas
//! racing for the same Lease the API server lets exactly one through and answers the
//! other 409 Conflict.
//!
//! Leadership is published as a `watch::Receiver<bool>`. A replica that fails to
//! renew, or does not hear back within [`LeaseSettings::renew_deadline`], steps down
//! at once (publishes `false`) rather than riding out the lease: being briefly
//! leaderless is safe, two leaders are not. On shutdown the holder clears
//! `holderIdentity`, so a peer takes over on its next round instead of after the
//! lease duration.
//!
//! Written here rather than taken from `kube-lease-manager` (which does support kube
//! 5): that crate renews and takes over with unconditional patches (no
//! `resourceVersion` precondition) and in two writes, while this is one
//! compare-and-swap per round, and small enough to test request by request.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// The Lease the control-plane replicas share.
pub const LEASE_NAME: &str = "trellis-control";

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The Lease's namespace (the control plane's own).
    pub namespace: String,
    pub name: String,
    /// Who this replica is (`holderIdentity`): the Pod name.
    pub identity: String,
    /// How long a renewal holds the Lease for everyone else.
    pub lease_duration: Duration,
    /// How often the holder renews, and others look again.
    pub renew_interval: Duration,
    /// How long one round may take before the holder steps down; well under
    /// `lease_duration`, so it stops leading before anyone may take over.
    pub renew_deadline: Duration,
}

impl LeaseSettings {
    /// The Lease [`LEASE_NAME`] in `namespace`, 15 s long, renewed every 2 s, a
    /// round abandoned after 10 s.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            namespace: namespace.into(),
            name: LEASE_NAME.to_owned(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading Lease {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("writing Lease {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
}

/// What one round found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Round {
    /// This replica holds the Lease (created, renewed or taken over).
    Leading,
    /// Someone else holds it and it has not expired.
    HeldBy(String),
    /// Another replica wrote the Lease first (409): it won this round.
    LostRace,
}

/// Acquires, renews and releases one Lease for one identity.
pub struct LeaseLock {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The other holder's record as last read, and since when it has not changed.
    observed: Option<(LeaseSpec, Instant)>,
}

impl LeaseLock {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        LeaseLock {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// One round: create the Lease if absent, renew it if ours, take it over if
    /// free or expired, else leave it alone.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Round, LeaderError> {
        let now = Timestamp::now();
        let me = self.settings.identity.clone();
        let read = self.api.get_opt(&self.settings.name).await;
        let Some(current) = read.map_err(|e| self.read_error(e))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(now, now, 0)),
            };
            let created = self.api.create(&PostParams::default(), &lease).await;
            return self.outcome(created.map(drop), "created");
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let (next, what) = match holder {
            Some(h) if h == me => {
                let acquired = spec.acquire_time.clone().map_or(now, |t| t.0);
                (self.held_spec(acquired, now, transitions), "renewed")
            }
            Some(h) if !self.expired(&spec) => return Ok(Round::HeldBy(h.to_owned())),
            _ => (
                self.held_spec(now, now, transitions.saturating_add(1)),
                "acquired",
            ),
        };
        self.outcome(self.write(current, next).await, what)
    }

    /// Clears `holderIdentity` if this replica holds the Lease, so a peer need not
    /// wait for it to expire. Returns whether it released anything.
    pub async fn release(&self) -> Result<bool, LeaderError> {
        let read = self.api.get_opt(&self.settings.name).await;
        let Some(current) = read.map_err(|e| self.read_error(e))? else {
            return Ok(false);
        };
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(false);
        }
        let released = LeaseSpec {
            holder_identity: None,
            acquire_time: None,
            renew_time: None,
            // Kept, so the next holder's count goes on from it.
            lease_transitions: spec.lease_transitions,
            lease_duration_seconds: spec.lease_duration_seconds,
            ..LeaseSpec::default()
        };
        match self.write(current, released).await {
            Ok(()) => Ok(true),
            // Someone took it meanwhile: nothing of ours to release.
            Err(source) if is_conflict(&source) => Ok(false),
            Err(source) => Err(self.write_error(source)),
        }
    }

    /// Whether another holder's `spec` has gone unrenewed for its lease duration,
    /// as seen from here: the clock starts when this replica first sees a record.
    fn expired(&mut self, spec: &LeaseSpec) -> bool {
        let now = Instant::now();
        let since = match &self.observed {
            Some((seen, since)) if seen == spec => *since,
            _ => {
                self.observed = Some((spec.clone(), now));
                now
            }
        };
        let seconds = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.lease_duration, Duration::from_secs);
        now.duration_since(since) >= seconds
    }

    fn held_spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(
                i32::try_from(self.settings.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Replaces the Lease, carrying the `resourceVersion` it was read at.
    async fn write(&self, mut lease: Lease, spec: LeaseSpec) -> Result<(), kube::Error> {
        lease.spec = Some(spec);
        lease.metadata.managed_fields = None;
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
            .map(drop)
    }

    fn outcome(
        &self,
        written: Result<(), kube::Error>,
        what: &'static str,
    ) -> Result<Round, LeaderError> {
        match written {
            Ok(()) => {
                tracing::debug!(lease = %self.settings.name, identity = %self.settings.identity, what, "lease held");
                Ok(Round::Leading)
            }
            Err(source) if is_conflict(&source) => Ok(Round::LostRace),
            Err(source) => Err(self.write_error(source)),
        }
    }

    fn read_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Read {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            source,
        }
    }

    fn write_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Write {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            source,
        }
    }
}

/// Another writer got there first: a stale `resourceVersion` (Conflict) or a create
/// that lost (AlreadyExists); both are 409.
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

/// A running election: the leadership channel, and a way to stop and release.
pub struct LeaderElection {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LeaderElection {
    /// Starts electing: one round now, then one per `renew_interval`.
    pub fn spawn(lock: LeaseLock) -> Self {
        let (leading_tx, leading) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(lock, leading_tx, stopped));
        LeaderElection {
            leading,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `true` while this replica holds the Lease.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops renewing and releases the Lease if held.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaderElection {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn run(mut lock: LeaseLock, leading: watch::Sender<bool>, mut stop: oneshot::Receiver<()>) {
    let mut ticker = tokio::time::interval(lock.settings.renew_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut stop => break,
        }
        let deadline = lock.settings.renew_deadline;
        let round = tokio::select! {
            round = tokio::time::timeout(deadline, lock.try_acquire_or_renew()) => round,
            _ = &mut stop => break,
        };
        // A round the API server did not answer in time counts as a failed one.
        let round = round.unwrap_or_else(|_| Err(LeaderError::Timeout(deadline)));
        let now_leading = matches!(round, Ok(Round::Leading));
        let was_leading = *leading.borrow();
        match (&round, was_leading) {
            (Ok(Round::Leading), true) => {}
            (Ok(Round::Leading), false) => {
                tracing::info!(lease = %lock.settings.name, identity = %lock.settings.identity, "became the leader");
            }
            (Ok(_), true) => {
                tracing::warn!(lease = %lock.settings.name, ?round, "lost the lease; stepping down");
            }
            (Err(e), true) => {
                tracing::warn!(lease = %lock.settings.name, error = %e, "renewing the lease failed; stepping down");
            }
            (Err(e), false) => {
                tracing::debug!(lease = %lock.settings.name, error = %e, "lease round failed");
            }
            (Ok(_), false) => {}
        }
        leading.send_if_modified(|l| std::mem::replace(l, now_leading) != now_leading);
    }
    let was_leading = leading.send_replace(false);
    if was_leading {
        // Bounded: shutdown must not wait on an API server that does not answer.
        let deadline = lock.settings.renew_deadline;
        let released = tokio::time::timeout(deadline, lock.release()).await;
        match released.unwrap_or(Err(LeaderError::Timeout(deadline))) {
            Ok(released) => {
                tracing::info!(lease = %lock.settings.name, released, "stepped down on shutdown")
            }
            Err(e) => {
                tracing::warn!(error = %e, "releasing the lease failed; it expires by itself")
            }
        }
    }
}

#[cfg(test)]
mod tests;
