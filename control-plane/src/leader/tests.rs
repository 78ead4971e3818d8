//! The Lease lock against a scripted API server answering with recorded objects.

use http::Method;
use serde_json::Value;

use super::*;
use crate::registry::kube::fake_api::{FakeApi, Seen, fixture_json};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-control";
const ME: &str = "trellis-control-7d9f8c6b5-q2w3e";
/// The holder in `lease-held.json`.
const OTHER: &str = "trellis-control-5f7c9d8b6-k2x4p";

/// `lease-held.json`'s renewTime, plus `seconds`.
fn after_renewal(seconds: i64) -> Timestamp {
    let renewed: Timestamp = "2025-05-01T09:20:00.123456Z".parse().unwrap();
    renewed
        .checked_add(SignedDuration::from_secs(seconds))
        .unwrap()
}

fn held_by(holder: &str) -> Value {
    let mut lease = fixture_json("lease-held.json");
    lease["spec"]["holderIdentity"] = holder.into();
    lease
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
    let (lock, seen) = lock(api);

    let now = after_renewal(0);
    assert_eq!(
        lock.try_acquire_or_renew(now).await.unwrap(),
        Round::Leading
    );
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
}

#[tokio::test]
async fn leaves_a_lease_held_by_another_replica_alone_until_it_expires() {
    let mut api = FakeApi::new();
    api.reply(Method::GET, LEASE, 200, fixture_json("lease-held.json"));
    let (lock, seen) = lock(api);

    // 10 s into a 15 s lease: still theirs, and nothing is written.
    let round = lock.try_acquire_or_renew(after_renewal(10)).await.unwrap();
    assert_eq!(round, Round::HeldBy(OTHER.to_owned()));
    assert_eq!(seen.requests(), [format!("GET {LEASE}?")]);
}

#[tokio::test]
async fn takes_over_an_expired_lease_at_the_version_it_read() {
    let mut api = FakeApi::new();
    api.reply(Method::GET, LEASE, 200, fixture_json("lease-held.json"));
    api.reply(Method::PUT, LEASE, 200, held_by(ME));
    let (lock, seen) = lock(api);

    let now = after_renewal(16);
    assert_eq!(
        lock.try_acquire_or_renew(now).await.unwrap(),
        Round::Leading
    );
    assert_eq!(seen.requests()[1], format!("PUT {LEASE}?"));
    let put = &seen.bodies()[0];
    // The compare-and-swap: a concurrent writer makes this 409.
    assert_eq!(put["metadata"]["resourceVersion"], "48213");
    assert_eq!(put["spec"]["holderIdentity"], ME);
    assert_eq!(put["spec"]["leaseTransitions"], 4);
    assert_eq!(put["spec"]["renewTime"], put["spec"]["acquireTime"]);
    let renewed: Timestamp = put["spec"]["renewTime"].as_str().unwrap().parse().unwrap();
    assert_eq!(renewed, now);
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
    let (lock, seen) = lock(api);

    // Well within what would be the lease: nobody holds it, so it is taken.
    let round = lock.try_acquire_or_renew(after_renewal(1)).await.unwrap();
    assert_eq!(round, Round::Leading);
    assert_eq!(seen.bodies()[0]["spec"]["holderIdentity"], ME);
}

#[tokio::test]
async fn renews_its_own_lease_keeping_the_acquire_time() {
    let mut api = FakeApi::new();
    api.reply(Method::GET, LEASE, 200, held_by(ME));
    api.reply(Method::PUT, LEASE, 200, held_by(ME));
    let (lock, seen) = lock(api);

    let now = after_renewal(2);
    assert_eq!(
        lock.try_acquire_or_renew(now).await.unwrap(),
        Round::Leading
    );
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
    let (lock, _seen) = lock(api);

    let now = after_renewal(2);
    assert_eq!(
        lock.try_acquire_or_renew(now).await.unwrap(),
        Round::LostRace
    );
    assert_eq!(
        lock.try_acquire_or_renew(now).await.unwrap(),
        Round::LostRace
    );
}

#[tokio::test]
async fn other_api_errors_are_reported() {
    let mut forbidden = fixture_json("lease-conflict.json");
    forbidden["reason"] = "Forbidden".into();
    forbidden["code"] = 403.into();
    let mut api = FakeApi::new();
    api.reply(Method::GET, LEASE, 403, forbidden);
    let (lock, _seen) = lock(api);
    let err = lock
        .try_acquire_or_renew(after_renewal(0))
        .await
        .unwrap_err();
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
