//! One write per node for everything the agent keeps on it: the kernel label and every
//! Module's labels and annotations (ready, device-plugin, worker and schedule labels, the
//! reboot fence). The Module reconciles and the kernel-facts loop only say what they want on
//! a node ([`NodeWrites::module`], [`NodeWrites::kernel`]); a node's wants are gathered for
//! a short window (`--node-write-delay`, and at least `--node-write-interval` after the node's
//! last write) and written together as one JSON merge patch of the keys that differ, so a node
//! reboot with ten Modules costs two node writes instead of one per Module and change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kmm_runtime::queue::{Action, WorkQueue};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::{Map, Value, json};
use shared_api::labels::{KERNEL_LABEL, SPOKE_NODE_MANAGER};

use super::labels::{current_node_annotations, current_node_labels};
use super::{Context, ModuleKey};
use crate::error::ReconcileError;

/// How long the node a write returned is kept for a cache that has not caught up.
const WRITTEN_KEPT: Duration = Duration::from_secs(30);

/// What one Module wants on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleWant {
    /// The Module's complete set of labels on the node (an empty set drops them all);
    /// `None` leaves its labels and annotations as they are.
    pub labels: Option<BTreeMap<String, String>>,
    /// The Module's complete set of annotations on the node, with `labels`.
    pub annotations: BTreeMap<String, String>,
    /// Other label keys to remove (the deprecated `<name>.ready`).
    pub remove: Vec<String>,
}

/// Everything wanted on one node, not yet written.
#[derive(Debug, Clone, Default)]
struct NodeWant {
    kernel: Option<String>,
    modules: BTreeMap<ModuleKey, ModuleWant>,
}

impl NodeWant {
    /// Put back what a failed write took, under anything wanted since.
    fn restore(&mut self, older: NodeWant) {
        if self.kernel.is_none() {
            self.kernel = older.kernel;
        }
        for (k, w) in older.modules {
            self.modules.entry(k).or_insert(w);
        }
    }
}

/// The node writes waiting for their window, and the newest node each write returned (the
/// cache may not have seen it yet).
pub struct NodeWrites {
    queue: Arc<WorkQueue<String>>,
    delay: Duration,
    interval: Duration,
    pending: Mutex<HashMap<String, NodeWant>>,
    /// The node each write returned, and when, until the cache has caught up (at most
    /// [`WRITTEN_KEPT`]).
    written: Mutex<HashMap<String, (Instant, Arc<Node>)>>,
    /// When each node was last written (entries older than `interval` are dropped).
    last_write: Mutex<HashMap<String, Instant>>,
}

impl NodeWrites {
    /// Wants wait `delay` from the first one; a node written less than `interval` ago waits
    /// until `interval` has passed.
    pub fn new(delay: Duration, interval: Duration) -> Self {
        Self {
            queue: Arc::new(WorkQueue::new()),
            delay,
            interval,
            pending: Mutex::default(),
            written: Mutex::default(),
            last_write: Mutex::default(),
        }
    }

    /// How long a want for `node` waits from `now`.
    fn wait(&self, node: &str, now: Instant) -> Duration {
        let last = self
            .last_write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied();
        let until_interval = last.map_or(Duration::ZERO, |t| {
            self.interval
                .saturating_sub(now.saturating_duration_since(t))
        });
        self.delay.max(until_interval)
    }

    fn wrote(&self, node: &str, now: Instant) {
        let mut last = self.last_write.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= 256 {
            let interval = self.interval;
            last.retain(|_, t| now.saturating_duration_since(*t) < interval);
        }
        last.insert(node.to_string(), now);
    }

    /// The queue of node names the writer works through.
    pub fn queue(&self) -> Arc<WorkQueue<String>> {
        self.queue.clone()
    }

    /// The Module `key` wants `want` on `node` (its newest want replaces an older one).
    pub fn module(&self, node: &str, key: &ModuleKey, want: ModuleWant) {
        self.with(node, |w| {
            w.modules.insert(key.clone(), want);
        });
    }

    /// `node` should carry the kernel label `value`.
    pub fn kernel(&self, node: &str, value: &str) {
        self.with(node, |w| w.kernel = Some(value.to_string()));
    }

    /// Whether some node write for the Module has not been made yet.
    pub fn pending_for(&self, key: &ModuleKey) -> bool {
        self.lock_pending()
            .values()
            .any(|w| w.modules.contains_key(key))
    }

    fn with(&self, node: &str, f: impl FnOnce(&mut NodeWant)) {
        f(self.lock_pending().entry(node.to_string()).or_default());
        let wait = self.wait(node, Instant::now());
        self.queue.add_after(node.to_string(), wait);
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeWant>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_written(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Arc<Node>)>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newer of the cached node and the one our last write returned; the returned one is
    /// forgotten once the cache has caught up.
    fn freshest(&self, name: &str, cached: Arc<Node>) -> Arc<Node> {
        let mut written = self.lock_written();
        let Some((_, ours)) = written.get(name) else {
            return cached;
        };
        let rv = |n: &Node| {
            n.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        };
        let same_node = ours.metadata.uid == cached.metadata.uid;
        match (rv(ours), rv(&cached)) {
            (Some(o), Some(c)) if same_node && o > c => ours.clone(),
            _ => {
                written.remove(name);
                cached
            }
        }
    }
}

/// The merge patch that brings `node` to `want`: `metadata.labels` and `metadata.annotations`
/// with the keys to set and `null` for those to remove, and the node's uid (a write to a
/// node replaced under the same name fails). `None` when the node already carries it all.
fn node_patch(node: &Node, want: &NodeWant) -> Option<Value> {
    let mut labels = Map::new();
    let mut annotations = Map::new();
    if let Some(k) = &want.kernel
        && node.labels().get(KERNEL_LABEL) != Some(k)
    {
        labels.insert(KERNEL_LABEL.to_string(), json!(k));
    }
    for ((namespace, name), m) in &want.modules {
        if let Some(desired) = &m.labels {
            diff_into(
                &mut labels,
                &current_node_labels(node, namespace, name),
                desired,
            );
            diff_into(
                &mut annotations,
                &current_node_annotations(node, namespace, name),
                &m.annotations,
            );
        }
        for key in &m.remove {
            if node.labels().contains_key(key) {
                labels.entry(key.clone()).or_insert(Value::Null);
            }
        }
    }
    if labels.is_empty() && annotations.is_empty() {
        return None;
    }
    let mut meta = Map::new();
    if let Some(uid) = node.uid() {
        meta.insert("uid".into(), json!(uid));
    }
    if !labels.is_empty() {
        meta.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        meta.insert("annotations".into(), Value::Object(annotations));
    }
    Some(json!({ "metadata": meta }))
}

/// Set what `desired` has and `current` lacks or holds otherwise; `null` what only `current`
/// has. A key another Module of the same write already sets is left to it.
fn diff_into(
    out: &mut Map<String, Value>,
    current: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) {
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            out.insert(k.clone(), json!(v));
        }
    }
    for k in current.keys() {
        if !desired.contains_key(k) {
            out.entry(k.clone()).or_insert(Value::Null);
        }
    }
}

/// Write what is wanted on node `name` (the node writer's reconcile).
#[tracing::instrument(name = "write_node", skip(ctx))]
pub async fn reconcile(name: String, ctx: &Context) -> Result<Action, ReconcileError> {
    let writes = &ctx.node_writes;
    let Some(want) = writes.lock_pending().remove(&name) else {
        return Ok(Action::AwaitChange);
    };
    let Some(cached) = ctx.stores.nodes.get(&ObjectRef::new(&name)) else {
        // Gone: nothing to write; a node back under this name brings its own wants.
        return Ok(Action::AwaitChange);
    };
    if cached.metadata.deletion_timestamp.is_some() {
        return Ok(Action::AwaitChange);
    }
    let node = writes.freshest(&name, cached);
    let Some(patch) = node_patch(&node, &want) else {
        return Ok(Action::AwaitChange);
    };
    let api: Api<Node> = Api::all(ctx.client.clone());
    match api
        .patch(
            &name,
            &PatchParams::apply(SPOKE_NODE_MANAGER),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(mut written) => {
            // Kept only until the cache catches up, and only what the cache keeps of a node.
            crate::cache::strip_node(&mut written);
            writes.wrote(&name, Instant::now());
            ctx.metrics.write("node-labels");
            tracing::debug!(node = %name, patch = %patch["metadata"], "node written");
            let now = Instant::now();
            let mut kept = writes.lock_written();
            kept.retain(|_, (at, _)| now.saturating_duration_since(*at) < WRITTEN_KEPT);
            kept.insert(name, (now, Arc::new(written)));
            Ok(Action::AwaitChange)
        }
        // Gone, or replaced under the same name (the uid no longer matches): the wants of
        // the node that is there come from the next reconciles.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 || s.code == 422 => {
            tracing::debug!(node = %name, code = s.code, "node gone or replaced: write dropped");
            Ok(Action::AwaitChange)
        }
        Err(source) => {
            writes
                .lock_pending()
                .entry(name.clone())
                .or_default()
                .restore(want);
            Err(ReconcileError::NodeLabels { node: name, source })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::testkit::*;
    use shared_api::labels::{
        module_ready_label, ready_boot_annotation, schedule_version_label, worker_version_label,
    };

    fn want(kernel: Option<&str>, modules: Vec<(ModuleKey, ModuleWant)>) -> NodeWant {
        NodeWant {
            kernel: kernel.map(str::to_string),
            modules: modules.into_iter().collect(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_patch_holds_every_module_and_the_kernel() {
        let a: ModuleKey = (NS.into(), NAME.into());
        let b: ModuleKey = (NS.into(), "other".into());
        let (ready_a, worker_a) = (module_ready_label(NS, NAME), worker_version_label(NS, NAME));
        let ready_b = module_ready_label(NS, "other");
        let sched_b = schedule_version_label(NS, "other");
        let fence = ready_boot_annotation(NS, NAME);
        let n = node("n1")
            .label(&ready_a, "")
            .label(&worker_a, "")
            .label(&sched_b, "")
            .label(KERNEL_LABEL, "old");
        let patch = node_patch(
            &n,
            &want(
                Some("new"),
                vec![
                    (
                        a.clone(),
                        ModuleWant {
                            // The ready label goes (a reboot), the worker label stays.
                            labels: Some(labels(&[(&worker_a, "")])),
                            annotations: labels(&[(&fence, "b2 p/1")]),
                            remove: vec![],
                        },
                    ),
                    (
                        b,
                        ModuleWant {
                            labels: Some(labels(&[(&ready_b, "")])),
                            annotations: BTreeMap::new(),
                            remove: vec!["never-there".into()],
                        },
                    ),
                ],
            ),
        )
        .expect("a patch");
        let meta = &patch["metadata"];
        assert_eq!(meta["labels"][KERNEL_LABEL], json!("new"));
        assert_eq!(meta["labels"][&ready_a], Value::Null);
        assert_eq!(meta["labels"][&ready_b], json!(""));
        assert_eq!(meta["labels"][&sched_b], Value::Null);
        assert!(
            meta["labels"].get(&worker_a).is_none(),
            "unchanged: not sent"
        );
        assert!(meta["labels"].get("never-there").is_none());
        assert_eq!(meta["annotations"][&fence], json!("b2 p/1"));
        assert_eq!(meta["uid"], json!("uid-n1"));

        // Nothing differs: no write.
        let done = node("n1")
            .label(&worker_a, "")
            .label(&ready_b, "")
            .label(KERNEL_LABEL, "new");
        let mut done = done;
        done.annotations_mut()
            .insert(fence.clone(), "b2 p/1".into());
        let w = want(
            Some("new"),
            vec![(
                a,
                ModuleWant {
                    labels: Some(labels(&[(&worker_a, "")])),
                    annotations: labels(&[(&fence, "b2 p/1")]),
                    remove: vec![],
                },
            )],
        );
        assert_eq!(node_patch(&done, &w), None);
        // A Module that leaves its labels alone touches nothing.
        let idle = want(
            None,
            vec![(("x".into(), "y".into()), ModuleWant::default())],
        );
        assert_eq!(node_patch(&n, &idle), None);
    }

    #[test]
    fn a_failed_write_is_put_back_under_newer_wants() {
        let a: ModuleKey = (NS.into(), NAME.into());
        let older = want(
            Some("k1"),
            vec![(
                a.clone(),
                ModuleWant {
                    labels: Some(labels(&[("x", "")])),
                    ..Default::default()
                },
            )],
        );
        let mut newer = want(
            None,
            vec![(
                a.clone(),
                ModuleWant {
                    labels: Some(BTreeMap::new()),
                    ..Default::default()
                },
            )],
        );
        newer.restore(older);
        assert_eq!(newer.kernel.as_deref(), Some("k1"));
        assert_eq!(newer.modules[&a].labels, Some(BTreeMap::new()));
    }

    #[test]
    fn a_node_written_lately_waits_for_the_interval() {
        let w = NodeWrites::new(Duration::from_millis(500), Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!(w.wait("n1", t0), Duration::from_millis(500));
        w.wrote("n1", t0);
        assert_eq!(
            w.wait("n1", t0 + Duration::from_millis(500)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            w.wait("n1", t0 + Duration::from_secs(5)),
            Duration::from_millis(500)
        );
        assert_eq!(w.wait("n2", t0), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn wants_wait_for_the_window_and_are_gathered_per_node() {
        let w = NodeWrites::new(Duration::from_millis(50), Duration::from_millis(50));
        let a: ModuleKey = (NS.into(), NAME.into());
        w.module("n1", &a, ModuleWant::default());
        w.kernel("n1", "k");
        w.kernel("n2", "k");
        assert!(w.pending_for(&a));
        assert_eq!(w.queue().delayed_len(), 2);
        let q = w.queue();
        let first = tokio::time::timeout(Duration::from_secs(2), q.next())
            .await
            .expect("due after the window");
        assert!(first.is_some());
    }
}
