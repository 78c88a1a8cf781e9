//! When a Module's status is written. A change of the spec (a new generation) is written at
//! once, and so is every change for [`SETTLE`] after it (the hub's rollout reads how the new
//! spec fares); a change the pods and DaemonSets make under a settled spec (counts dipping
//! while a node reboots, conditions following them) is written once it has lasted `delay`,
//! with the status as it is then. So a node's reboot, whose loaders are back within the delay, costs no
//! status write, and a longer one costs one or two instead of one per DaemonSet status update.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ModuleKey;

/// How long after a spec change every status change is written at once.
pub const SETTLE: Duration = Duration::from_secs(60);

/// What to do with a computed status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// It is what the Module has: nothing.
    Unchanged,
    /// Write it now.
    Now,
    /// Look again after this long (the change is younger than the delay).
    After(Duration),
}

/// Since when each Module's status has differed from what it holds.
pub struct StatusGate {
    delay: Duration,
    differs_since: Mutex<HashMap<ModuleKey, Instant>>,
    /// When each Module's last spec change was written.
    new_spec_at: Mutex<HashMap<ModuleKey, Instant>>,
}

impl StatusGate {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            differs_since: Mutex::default(),
            new_spec_at: Mutex::default(),
        }
    }

    /// `differs`: the computed status is not the one the Module holds; `new_spec`: the
    /// Module's generation is not the one its status observed.
    pub fn decide(
        &self,
        key: &ModuleKey,
        differs: bool,
        new_spec: bool,
        now: Instant,
    ) -> StatusWrite {
        let mut since = self.differs_since.lock().unwrap_or_else(|e| e.into_inner());
        if !differs {
            since.remove(key);
            return StatusWrite::Unchanged;
        }
        let mut spec_at = self.new_spec_at.lock().unwrap_or_else(|e| e.into_inner());
        if new_spec {
            spec_at.insert(key.clone(), now);
        }
        let settling = spec_at
            .get(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < SETTLE);
        if !settling {
            spec_at.remove(key);
        }
        let first = *since.entry(key.clone()).or_insert(now);
        let age = now.saturating_duration_since(first);
        if settling || age >= self.delay {
            since.remove(key);
            StatusWrite::Now
        } else {
            StatusWrite::After(self.delay - age)
        }
    }

    /// Forget a Module (deleted).
    pub fn forget(&self, key: &ModuleKey) {
        self.differs_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.new_spec_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_change_is_written_at_once_a_pod_change_once_it_lasted() {
        let gate = StatusGate::new(Duration::from_secs(2));
        let k: ModuleKey = ("ns".into(), "m".into());
        let t = Instant::now();
        assert_eq!(gate.decide(&k, false, false, t), StatusWrite::Unchanged);
        assert_eq!(gate.decide(&k, true, true, t), StatusWrite::Now);
        // While the new spec settles, every change goes at once (a rollout reads them).
        let settling = t + SETTLE / 2;
        assert_eq!(gate.decide(&k, true, false, settling), StatusWrite::Now);
        let t0 = t + SETTLE;
        // A dip: held back, looked at again when it is due.
        assert_eq!(
            gate.decide(&k, true, false, t0),
            StatusWrite::After(Duration::from_secs(2))
        );
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(
            gate.decide(&k, true, false, t1),
            StatusWrite::After(Duration::from_millis(500))
        );
        // Over before it was due: nothing written, and the clock starts afresh.
        assert_eq!(gate.decide(&k, false, false, t1), StatusWrite::Unchanged);
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            gate.decide(&k, true, false, t2),
            StatusWrite::After(Duration::from_secs(2))
        );
        // Still there when due: written.
        assert_eq!(
            gate.decide(&k, true, false, t2 + Duration::from_secs(2)),
            StatusWrite::Now
        );
        gate.forget(&k);
    }
}
