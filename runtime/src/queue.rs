//! A de-duplicating work queue of object keys, with delayed requeues, in the manner of
//! client-go's workqueue: a key is queued at most once, a key being reconciled is never
//! handed to a second worker (an `add` meanwhile re-queues it when `done` is called), and a
//! delayed add keeps the earliest deadline.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reconcile again after this long (periodic resync or retry).
    Requeue(Duration),
    /// Nothing until a watch event adds the key again.
    AwaitChange,
}

#[derive(Debug)]
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    notify: Notify,
}

#[derive(Debug)]
struct State<K> {
    ready: VecDeque<K>,
    queued: HashSet<K>,
    delayed: HashMap<K, Instant>,
    running: HashSet<K>,
    rerun: HashSet<K>,
    closed: bool,
}

impl<K: Hash + Eq + Clone> Default for WorkQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq + Clone> WorkQueue<K> {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                queued: HashSet::new(),
                delayed: HashMap::new(),
                running: HashSet::new(),
                rerun: HashSet::new(),
                closed: false,
            }),
            notify: Notify::new(),
        }
    }

    /// Queue `key` now.
    pub fn add(&self, key: K) {
        let mut s = self.lock();
        s.delayed.remove(&key);
        Self::push(&mut s, key);
        drop(s);
        self.notify.notify_one();
    }

    /// Queue `key` after `delay` (or earlier, if it is already due sooner).
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let mut s = self.lock();
        if s.queued.contains(&key) {
            return;
        }
        let at = Instant::now() + delay;
        let entry = s.delayed.entry(key).or_insert(at);
        if at < *entry {
            *entry = at;
        }
        drop(s);
        // Wake a waiting worker so that it sleeps until the new, possibly earlier, deadline.
        self.notify.notify_one();
    }

    /// The next key to reconcile; `None` once the queue is closed. The caller must call
    /// [`WorkQueue::done`] with the key when finished.
    pub async fn next(&self) -> Option<K> {
        loop {
            let notified = self.notify.notified();
            let deadline = {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                let now = Instant::now();
                let due: Vec<K> = s
                    .delayed
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in due {
                    s.delayed.remove(&k);
                    Self::push(&mut s, k);
                }
                if let Some(key) = s.ready.pop_front() {
                    s.queued.remove(&key);
                    s.running.insert(key.clone());
                    // Another worker may be able to take the next ready key.
                    if !s.ready.is_empty() {
                        self.notify.notify_one();
                    }
                    return Some(key);
                }
                s.delayed.values().min().copied()
            };
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Mark `key` finished; if it was added while running, it is queued again.
    pub fn done(&self, key: &K) {
        let mut s = self.lock();
        s.running.remove(key);
        if s.rerun.remove(key) {
            Self::push(&mut s, key.clone());
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Stop handing out keys: every pending and future `next` returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Keys ready now (not counting delayed ones).
    pub fn len(&self) -> usize {
        self.lock().ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys waiting for a delayed requeue.
    pub fn delayed_len(&self) -> usize {
        self.lock().delayed.len()
    }

    fn push(s: &mut State<K>, key: K) {
        if s.running.contains(&key) {
            s.rerun.insert(key);
        } else if s.queued.insert(key.clone()) {
            s.ready.push_back(key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deduplicates_and_serialises_a_key() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let first = q.next().await.unwrap();
        assert_eq!(first, "a");
        q.add("a"); // while running: re-run after done, not handed out twice
        assert_eq!(q.next().await.unwrap(), "b");
        assert_eq!(q.len(), 0);
        q.done(&"a");
        assert_eq!(q.next().await.unwrap(), "a");
        q.done(&"a");
        q.done(&"b");
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_keys_come_due_and_keep_the_earliest_deadline() {
        let q = WorkQueue::new();
        q.add_after("x", Duration::from_secs(60));
        q.add_after("x", Duration::from_secs(5));
        q.add_after("x", Duration::from_secs(30));
        let start = Instant::now();
        assert_eq!(q.next().await.unwrap(), "x");
        assert_eq!(start.elapsed().as_secs(), 5);
        q.done(&"x");
        q.add_after("y", Duration::from_secs(10));
        q.add("y"); // an immediate add supersedes the delay
        assert_eq!(q.delayed_len(), 0);
        assert_eq!(q.next().await.unwrap(), "y");
    }

    #[tokio::test]
    async fn close_releases_waiters() {
        let q = std::sync::Arc::new(WorkQueue::<u8>::new());
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.next().await });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
