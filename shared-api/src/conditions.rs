//! Condition types and a helper that keeps `lastTransitionTime` honest.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// On spoke Modules: whether the spec passed validation.
pub const VALID: &str = "Valid";

/// Set a condition; `lastTransitionTime` changes only when the status does.
/// Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status_str = if status { "True" } else { "False" };
    let message: String = message.chars().take(1024).collect();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let same = c.status == status_str
            && c.reason == reason
            && c.message == message
            && c.observed_generation == observed_generation;
        if same {
            return false;
        }
        if c.status != status_str {
            c.last_transition_time = Time(now);
        }
        c.status = status_str.into();
        c.reason = reason.into();
        c.message = message;
        c.observed_generation = observed_generation;
        return true;
    }
    conditions.push(Condition {
        type_: type_.into(),
        status: status_str.into(),
        reason: reason.into(),
        message,
        observed_generation,
        last_transition_time: Time(now),
    });
    true
}

/// The status string (`True`/`False`/`Unknown`) of a condition type, if present.
pub fn condition_status<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_status() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs, READY, false, "Pending", "x", None, t0
        ));
        assert!(!set_condition(
            &mut cs, READY, false, "Pending", "x", None, t1
        ));
        assert!(set_condition(&mut cs, READY, false, "Other", "y", None, t1));
        assert_eq!(cs[0].last_transition_time.0, t0);
        assert!(set_condition(&mut cs, READY, true, "Ready", "", None, t1));
        assert_eq!(cs[0].last_transition_time.0, t1);
        assert_eq!(condition_status(&cs, READY), Some("True"));
    }
}
