//! The build-Job state machine: from the cached Job (if any) and the hash of the build
//! wanted now, what to do with the Job. The I/O (create, delete, read the failed pod's
//! message, events) is `pipeline::build`'s.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::facts::JobEntry;

/// First retry of a failed build after this long, doubling per attempt up to [`BUILD_RETRY_MAX`].
pub const BUILD_RETRY_BASE: Duration = Duration::from_secs(30);
pub const BUILD_RETRY_MAX: Duration = Duration::from_secs(30 * 60);

pub fn build_retry_delay(attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    BUILD_RETRY_BASE.saturating_mul(factor).min(BUILD_RETRY_MAX)
}

/// The attempt number of the Job to render: the existing Job's, else the one remembered
/// across its re-creations, else the first.
pub fn attempt(existing: Option<&JobEntry>, remembered: Option<u32>) -> u32 {
    existing.map(|j| j.attempt).or(remembered).unwrap_or(1)
}

/// What to do with the build Job of a missing image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStep {
    /// No Job yet: create it.
    Create,
    /// The Job is being deleted: wait until it is gone.
    Replacing,
    /// A finished Job built other inputs (Dockerfile, arguments): delete it and start over
    /// now, not after the backoff.
    Restart,
    /// The Job runs.
    Running { attempt: u32 },
    /// The Job finished without the image (it failed, or succeeded while the image is not in
    /// the registry) and its backoff is over: delete it; the next Job is `next_attempt`.
    Retry { failed: bool, next_attempt: u32 },
    /// The Job finished without the image; retry after `left`.
    BackOff {
        failed: bool,
        attempt: u32,
        left: Duration,
    },
}

/// The step for the build Job, given the cached Job, the hash of the build wanted now and
/// the time.
pub fn build_step(existing: Option<&JobEntry>, desired_hash: &str, now: Timestamp) -> BuildStep {
    let Some(j) = existing else {
        return BuildStep::Create;
    };
    if j.deleting {
        return BuildStep::Replacing;
    }
    if j.build_hash != desired_hash && !j.active {
        return BuildStep::Restart;
    }
    if j.active {
        return BuildStep::Running { attempt: j.attempt };
    }
    let wait = build_retry_delay(j.attempt);
    let since = j
        .finished_at
        .map_or(wait, |t| now.duration_since(t).unsigned_abs());
    if since >= wait {
        BuildStep::Retry {
            failed: j.failed,
            next_attempt: j.attempt + 1,
        }
    } else {
        BuildStep::BackOff {
            failed: j.failed,
            attempt: j.attempt,
            left: wait - since,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "h1";

    fn now() -> Timestamp {
        "2026-01-01T12:00:00Z".parse().unwrap()
    }

    fn job(active: bool, succeeded: bool, failed: bool) -> JobEntry {
        JobEntry {
            name: "m-build-x".into(),
            uid: "u1".into(),
            mcm: "m".into(),
            image: "reg/m:1".into(),
            build_hash: HASH.into(),
            attempt: 1,
            active,
            succeeded,
            failed,
            finished_at: None,
            deleting: false,
        }
    }

    fn finished_ago(mut j: JobEntry, secs: i64) -> JobEntry {
        j.finished_at = Some(now() - k8s_openapi::jiff::SignedDuration::from_secs(secs));
        j
    }

    #[test]
    fn build_retry_backs_off_with_a_cap() {
        assert_eq!(build_retry_delay(1), Duration::from_secs(30));
        assert_eq!(build_retry_delay(2), Duration::from_secs(60));
        assert_eq!(build_retry_delay(30), BUILD_RETRY_MAX);
    }

    #[test]
    fn no_job_creates_one_and_a_running_job_is_waited_for() {
        assert_eq!(build_step(None, HASH, now()), BuildStep::Create);
        let running = job(true, false, false);
        assert_eq!(
            build_step(Some(&running), HASH, now()),
            BuildStep::Running { attempt: 1 }
        );
        // Changed inputs do not interrupt a running build.
        assert_eq!(
            build_step(Some(&running), "h2", now()),
            BuildStep::Running { attempt: 1 }
        );
        let mut going = running;
        going.deleting = true;
        assert_eq!(build_step(Some(&going), HASH, now()), BuildStep::Replacing);
    }

    #[test]
    fn build_failed_backs_off_then_retries_with_the_next_attempt() {
        let failed = finished_ago(job(false, false, true), 10);
        assert_eq!(
            build_step(Some(&failed), HASH, now()),
            BuildStep::BackOff {
                failed: true,
                attempt: 1,
                left: Duration::from_secs(20)
            }
        );
        let due = finished_ago(job(false, false, true), 30);
        assert_eq!(
            build_step(Some(&due), HASH, now()),
            BuildStep::Retry {
                failed: true,
                next_attempt: 2
            }
        );
        // The second attempt waits twice as long.
        let mut second = finished_ago(job(false, false, true), 45);
        second.attempt = 2;
        assert!(matches!(
            build_step(Some(&second), HASH, now()),
            BuildStep::BackOff { attempt: 2, left, .. } if left == Duration::from_secs(15)
        ));
        // No finish time known: the backoff counts as over.
        assert!(matches!(
            build_step(Some(&job(false, false, true)), HASH, now()),
            BuildStep::Retry { .. }
        ));
    }

    #[test]
    fn succeeded_without_the_image_is_a_failed_attempt_and_changed_inputs_restart() {
        let lost = finished_ago(job(false, true, false), 5);
        assert!(matches!(
            build_step(Some(&lost), HASH, now()),
            BuildStep::BackOff { failed: false, .. }
        ));
        let failed = finished_ago(job(false, false, true), 5);
        assert_eq!(build_step(Some(&failed), "h2", now()), BuildStep::Restart);
    }

    #[test]
    fn attempts_carry_across_recreations() {
        let mut j = job(true, false, false);
        j.attempt = 3;
        assert_eq!(attempt(Some(&j), Some(5)), 3);
        assert_eq!(attempt(None, Some(5)), 5);
        assert_eq!(attempt(None, None), 1);
    }
}
