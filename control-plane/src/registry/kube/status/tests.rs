//! Conditions: what changes, what is kept, when nothing is written.

use super::*;

fn at(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
}

fn accepted(status: bool, reason: &'static str, message: &str) -> JudgedCondition {
    JudgedCondition {
        type_: ACCEPTED,
        status,
        reason,
        message: message.to_owned(),
    }
}

fn condition(type_: &str, status: &str, reason: &str, generation: i64, time: i64) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: String::new(),
        observed_generation: Some(generation),
        last_transition_time: at(time),
    }
}

#[test]
fn a_first_status_is_written_now() {
    let next = next_conditions(&[], &[accepted(true, "Accepted", "")], Some(3), &at(100));
    assert_eq!(
        next,
        Some(vec![condition(ACCEPTED, "True", "Accepted", 3, 100)])
    );
}

#[test]
fn the_same_status_is_not_written_again() {
    let current = [
        condition(ACCEPTED, "True", "Accepted", 3, 100),
        condition("Ready", "True", "SomeoneElse", 1, 50),
    ];
    assert_eq!(
        next_conditions(
            &current,
            &[accepted(true, "Accepted", "")],
            Some(3),
            &at(200)
        ),
        None
    );
}

#[test]
fn the_transition_time_moves_only_with_the_status() {
    let current = [
        condition(ACCEPTED, "False", "Invalid", 3, 100),
        condition("Ready", "True", "SomeoneElse", 1, 50),
    ];
    // A new generation, still invalid but for another reason: the time stays.
    let judged = [accepted(false, "Invalid", "spec.timeouts.request: bad")];
    let next = next_conditions(&current, &judged, Some(4), &at(200)).unwrap();
    assert_eq!(next[0].last_transition_time, at(100));
    assert_eq!(next[0].observed_generation, Some(4));
    assert_eq!(next[0].message, "spec.timeouts.request: bad");
    // Others' conditions are kept as they were.
    assert_eq!(next[1], current[1]);
    // Fixed: the status changes, so does the time.
    let next = next_conditions(
        &current,
        &[accepted(true, "Accepted", "")],
        Some(5),
        &at(300),
    );
    assert_eq!(
        next.unwrap()[0],
        condition(ACCEPTED, "True", "Accepted", 5, 300)
    );
}

#[test]
fn a_condition_no_longer_judged_is_removed() {
    let current = [
        condition(ACCEPTED, "True", "Accepted", 2, 100),
        condition(L7_RULES_ON_OPAQUE_PORT, "True", "OpaquePort", 2, 100),
    ];
    let next = next_conditions(
        &current,
        &[accepted(true, "Accepted", "")],
        Some(2),
        &at(200),
    );
    assert_eq!(next, Some(vec![current[0].clone()]));
}

#[test]
fn long_messages_are_cut_to_what_kubernetes_takes() {
    let errors = vec!["é".repeat(20_000); 2];
    let message = joined(&errors);
    assert!(message.len() <= MAX_MESSAGE);
    assert!(message.ends_with("..."));
}
