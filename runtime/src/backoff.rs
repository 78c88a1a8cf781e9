//! Per-key exponential retry backoff with a cap: about 1 s doubling to 5 min by default,
//! cleared on success. Deterministic (no jitter) so tests can assert on it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

/// The default first delay.
pub const DEFAULT_INITIAL: Duration = Duration::from_secs(1);
/// The default cap.
pub const DEFAULT_MAX: Duration = Duration::from_secs(300);

/// Failure counts per key; `next` gives the delay before the next attempt.
#[derive(Debug)]
pub struct KeyedBackoff<K> {
    initial: Duration,
    max: Duration,
    failures: Mutex<HashMap<K, u32>>,
}

impl<K: Hash + Eq + Clone> Default for KeyedBackoff<K> {
    fn default() -> Self {
        Self::new(DEFAULT_INITIAL, DEFAULT_MAX)
    }
}

impl<K: Hash + Eq + Clone> KeyedBackoff<K> {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Record a failure of `key` and return how long to wait before retrying it:
    /// `initial`, `2×initial`, `4×initial`, … capped at `max`.
    pub fn next(&self, key: &K) -> Duration {
        let mut map = self.lock();
        let n = map.entry(key.clone()).or_insert(0);
        let delay = delay_for(self.initial, self.max, *n);
        *n = n.saturating_add(1);
        delay
    }

    /// Forget the failures of `key` (call on success).
    pub fn reset(&self, key: &K) {
        self.lock().remove(key);
    }

    /// How many failures in a row `key` has had.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// Keys currently backing off.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The delay after `failures` previous failures.
pub fn delay_for(initial: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
    initial.checked_mul(factor).unwrap_or(max).min(max)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let b = KeyedBackoff::<&str>::default();
        let seq: Vec<u64> = (0..12).map(|_| b.next(&"a").as_secs()).collect();
        assert_eq!(seq, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.next(&"b"), Duration::from_secs(1), "keys are independent");
        assert_eq!(b.failures(&"a"), 12);
        b.reset(&"a");
        assert_eq!(b.failures(&"a"), 0);
        assert_eq!(b.next(&"a"), Duration::from_secs(1));
        for _ in 0..100 {
            b.next(&"c");
        }
        assert_eq!(b.next(&"c"), DEFAULT_MAX, "no overflow after many failures");
    }
}
