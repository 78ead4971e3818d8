//! The Lease lock against a scripted API server answering with recorded objects.
//! Time is tokio's paused clock where expiry matters: exact, not timing-dependent.

use http::Method;
use serde_json::Value;

use super::*;
use crate::registry::kube::fake_api::{FakeApi, Seen, fixture_json};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-control";
const ME: &str = "trellis-control-7d9f8c6b5-q2w3e";
/// The holder in `lease-held.json`.
const OTHER: &str = "trellis-control-5f7c9d8b6-k2x4p";

fn held_by(holder: &str) -> Value {
    let mut lease = fixture_json("lease-held.json");
    lease["spec"]["holderIdentity"] = holder.into();
    lease
}

fn renew_time(body: &Value) -> Timestamp {
    body["spec"]["renewTime"].as_str().unwrap().parse().unwrap()
}

/// Now, cut to the MicroTime precision a Lease is written with: a renewTime
/// written in the same microsecond is not earlier.
fn now_to_the_microsecond() -> Timestamp {
    Timestamp::from_microsecond(Timestamp::now().as_microsecond()).unwrap()
}

fn lock(api: FakeApi) -> (LeaseLock, Seen) {
    let (client, seen) = api.start();
    (
        LeaseLock::new(client, LeaseSettings::new("trellis-system", ME)),
        seen,
    )
}

#[tokio::test]
async fn creates_and_holds_a_lease_nobody_has() {
    let mut api = FakeApi::new();
    api.reply(
        Method::GET,
        LEASE,
        404,
        fixture_json("lease-not-found.json"),
    );
    api.reply(Method::POST, LEASES, 201, held_by(ME));
    let (mut lock, seen) = lock(api);

    let before = now_to_the_microsecond();
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), Round::Leading);
    assert_eq!(
        seen.requests(),
        [format!("GET {LEASE}?"), format!("POST {LEASES}?")]
    );
    let created = &seen.bodies()[0];
    assert_eq!(created["metadata"]["name"], "trellis-control");
    assert_eq!(created["spec"]["holderIdentity"], ME);
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);
    assert_eq!(created["spec"]["renewTime"], created["spec"]["acquireTime"]);
    assert!(renew_time(created) >= before);
}

/// Expiry by this replica's own clock: the holder's record must go unchanged for
/// the lease duration (15 s) from when this replica first saw it, however old its
/// renewTime looks; a renewal starts the count again.
#[tokio::test(start_paused = true)]
async fn takes_over_a_lease_only_once_it_went_unrenewed_for_its_duration() {
    let held = fixture_json("lease-held.json");
    let mut renewed = held.clone();
    renewed["spec"]["renewTime"] = "2025-05-01T09:20:10.000000Z".into();
    renewed["metadata"]["resourceVersion"] = "48290".into();
    let mut api = FakeApi::new();
    for answer in [&held, &held, &renewed, &renewed, &renewed] {
        api.reply(Method::GET, LEASE, 200, answer.clone());
    }
    api.reply(Method::PUT, LEASE, 200, held_by(ME));
    let (mut lock, seen) = lock(api);
    let theirs = Round::HeldBy(OTHER.to_owned());

    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), theirs);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), theirs);
    // Renewed by its holder meanwhile: 10 s after that is not expired.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), theirs);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), theirs);
    assert_eq!(seen.count("PUT"), 0, "a held lease is not written");

    // 15 s unrenewed: expired, and taken over at the version read.
    tokio::time::advance(Duration::from_secs(5)).await;
    let before = now_to_the_microsecond();
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), Round::Leading);
    let put = &seen.bodies()[0];
    // The compare-and-swap: had anyone written since, this would be a 409.
    assert_eq!(put["metadata"]["resourceVersion"], "48290");
    assert_eq!(put["spec"]["holderIdentity"], ME);
    assert_eq!(put["spec"]["leaseTransitions"], 4);
    assert_eq!(put["spec"]["renewTime"], put["spec"]["acquireTime"]);
    assert!(renew_time(put) >= before);
}

#[tokio::test]
async fn a_lease_without_a_holder_is_free() {
    let mut lease = fixture_json("lease-held.json");
    lease["spec"]
        .as_object_mut()
        .unwrap()
        .remove("holderIdentity");
    let mut api = FakeApi::new();
    api.reply(Method::GET, LEASE, 200, lease);
    api.reply(Method::PUT, LEASE, 200, held_by(ME));
    let (mut lock, seen) = lock(api);

    // Released by its last holder: taken at once, no waiting.
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), Round::Leading);
    assert_eq!(seen.bodies()[0]["spec"]["holderIdentity"], ME);
}

#[tokio::test]
async fn renews_its_own_lease_keeping_the_acquire_time() {
    let mut api = FakeApi::new();
    api.reply(Method::GET, LEASE, 200, held_by(ME));
    api.reply(Method::PUT, LEASE, 200, held_by(ME));
    let (mut lock, seen) = lock(api);

    let before = now_to_the_microsecond();
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), Round::Leading);
    let put = &seen.bodies()[0];
    assert_eq!(put["spec"]["holderIdentity"], ME);
    assert_eq!(
        put["spec"]["leaseTransitions"], 3,
        "a renewal is no transition"
    );
    let acquired: Timestamp = put["spec"]["acquireTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(acquired, "2025-05-01T09:00:00Z".parse().unwrap());
    assert!(renew_time(put) >= before);
    assert_eq!(put["metadata"]["resourceVersion"], "48213");
}

#[tokio::test]
async fn losing_the_race_is_not_an_error() {
    let mut api = FakeApi::new();
    // Create: another replica created it between our GET and POST.
    api.reply(
        Method::GET,
        LEASE,
        404,
        fixture_json("lease-not-found.json"),
    );
    api.reply(
        Method::POST,
        LEASES,
        409,
        fixture_json("lease-already-exists.json"),
    );
    // Renew: another replica wrote it since we read it.
    api.reply(Method::GET, LEASE, 200, held_by(ME));
    api.reply(Method::PUT, LEASE, 409, fixture_json("lease-conflict.json"));
    let (mut lock, _seen) = lock(api);

    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), Round::LostRace);
    assert_eq!(lock.try_acquire_or_renew().await.unwrap(), Round::LostRace);
}

#[tokio::test]
async fn other_api_errors_are_reported() {
    let mut forbidden = fixture_json("lease-conflict.json");
    forbidden["reason"] = "Forbidden".into();
    forbidden["code"] = 403.into();
    let mut api = FakeApi::new();
    api.reply(Method::GET, LEASE, 403, forbidden);
    let (mut lock, _seen) = lock(api);
    let err = lock.try_acquire_or_renew().await.unwrap_err();
    assert!(matches!(err, LeaderError::Read { .. }), "{err}");
    assert!(err.to_string().contains("trellis-system/trellis-control"));
}

/// The election loop: leads after creating the Lease, steps down when the next
/// renewal is refused (409), and says so on the channel.
#[tokio::test(start_paused = true)]
async fn steps_down_when_a_renewal_fails() {
    let mut api = FakeApi::new();
    api.reply(
        Method::GET,
        LEASE,
        404,
        fixture_json("lease-not-found.json"),
    );
    api.reply(Method::POST, LEASES, 201, held_by(ME));
    api.reply(Method::GET, LEASE, 200, held_by(ME));
    api.reply(Method::PUT, LEASE, 409, fixture_json("lease-conflict.json"));
    // Later rounds' reads go unanswered: the loop must still stop.
    let (lock, seen) = lock(api);
    let election = LeaderElection::spawn(lock);
    let mut leading = election.subscribe();

    leading.wait_for(|l| *l).await.unwrap();
    leading.wait_for(|l| !*l).await.unwrap();
    election.stop().await;
    // Not the holder: nothing released.
    assert_eq!(seen.count(&format!("PUT {LEASE}")), 1);
}

/// An API server that stops answering: the holder steps down at the renew
/// deadline (10 s), before anyone else could take over (15 s).
#[tokio::test(start_paused = true)]
async fn steps_down_when_the_api_server_does_not_answer() {
    let mut api = FakeApi::new();
    api.reply(
        Method::GET,
        LEASE,
        404,
        fixture_json("lease-not-found.json"),
    );
    api.reply(Method::POST, LEASES, 201, held_by(ME));
    // The renewal's read is never answered.
    let (lock, seen) = lock(api);
    let election = LeaderElection::spawn(lock);
    let mut leading = election.subscribe();

    leading.wait_for(|l| *l).await.unwrap();
    let led_at = tokio::time::Instant::now();
    leading.wait_for(|l| !*l).await.unwrap();
    // The next round starts at the 2 s tick and is given up 10 s later.
    assert_eq!(led_at.elapsed(), Duration::from_secs(12));
    assert_eq!(seen.count("PUT"), 0);
    election.stop().await;
}

#[tokio::test(start_paused = true)]
async fn releases_the_lease_on_shutdown() {
    let mut api = FakeApi::new();
    api.reply(
        Method::GET,
        LEASE,
        404,
        fixture_json("lease-not-found.json"),
    );
    api.reply(Method::POST, LEASES, 201, held_by(ME));
    // The release reads the Lease (still ours) and clears the holder.
    api.reply(Method::GET, LEASE, 200, held_by(ME));
    let mut released = held_by(ME);
    released["spec"]
        .as_object_mut()
        .unwrap()
        .remove("holderIdentity");
    api.reply(Method::PUT, LEASE, 200, released);
    let (lock, seen) = lock(api);
    let election = LeaderElection::spawn(lock);
    let mut leading = election.subscribe();
    leading.wait_for(|l| *l).await.unwrap();

    election.stop().await;
    assert!(!*leading.borrow());
    let put = seen.bodies().pop().unwrap();
    assert_eq!(put["metadata"]["resourceVersion"], "48213");
    assert!(put["spec"].get("holderIdentity").is_none(), "{put}");
    assert!(put["spec"].get("renewTime").is_none(), "{put}");
    assert_eq!(put["spec"]["leaseTransitions"], 3);
}
