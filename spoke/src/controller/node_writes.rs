//! One write per node for everything the agent keeps on it: the kernel label and every
//! Module's labels and annotations (ready, device-plugin, worker and schedule labels, the
//! reboot fence). The Module reconciles and the kernel-facts loop only say what they want on
//! a node ([`NodeWrites::module`], [`NodeWrites::kernel`]); a node's wants are gathered for
//! a short window (`--node-write-delay`, and at least `--node-write-interval` after the node's
//! last write) and written together as one JSON merge patch of the keys that differ, so a node
//! reboot with ten Modules costs two node writes instead of one per Module and change.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kmm_runtime::queue::{Action, WorkQueue};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::{Map, Value, json};
use shared_api::labels::{
    KERNEL_LABEL, MODULE_NAME_LABEL, ROLE_LABEL, ROLE_LOADER, SPOKE_NODE_MANAGER,
    TARGET_KERNEL_LABEL, kernel_label_value, module_ready_label, ready_boot_annotation,
    recorded_boot_id,
};

use super::labels::{current_node_annotations, current_node_labels};
use super::{Context, ModuleKey};
use crate::cache::CachedPod;
use crate::error::ReconcileError;
use crate::render::nodes::{node_boot_id, node_kernel, pod_node, pod_ready};

/// How long the node a write returned is kept for a cache that has not caught up.
const WRITTEN_KEPT: Duration = Duration::from_secs(30);

/// How long a write that brings ready labels back after a reboot may wait for the node's
/// other Modules whose loaders of the node's kernel are starting there
/// ([`waits_for_siblings`]), so that a reboot's labels come back in one write.
pub const REBOOT_GATHER: Duration = Duration::from_secs(10);

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
    /// Nodes whose labels back after a reboot wait for their siblings ([`REBOOT_GATHER`]),
    /// and until when.
    gathering: Mutex<HashMap<String, Instant>>,
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
            gathering: Mutex::default(),
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

    /// Put back a want taken for a write that was not made, under anything wanted since.
    fn put_back(&self, node: &str, want: NodeWant) {
        self.lock_pending()
            .entry(node.to_string())
            .or_default()
            .restore(want);
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeWant>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_written(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Arc<Node>)>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How much longer a write of `patch` to `node` waits for its siblings
    /// ([`waits_for_siblings`]); `None`: write now. The wait starts with the first write that
    /// waits and ends [`REBOOT_GATHER`] later at the latest.
    fn gather(
        &self,
        node: &Node,
        want: &NodeWant,
        patch: &Value,
        ctx: &Context,
    ) -> Option<Duration> {
        let name = node.name_any();
        let mut gathering = self.gathering.lock().unwrap_or_else(|e| e.into_inner());
        let modules: Vec<ModuleKey> = ctx
            .stores
            .modules
            .state()
            .iter()
            .map(|m| (m.namespace().unwrap_or_default(), m.name_any()))
            .collect();
        // Every cached pod is looked at only when a write does bring labels back after a
        // reboot, not for every node write.
        let on_node = || {
            let mut pods = ctx.stores.pods.state();
            pods.retain(|p| pod_node(p) == Some(name.as_str()));
            pods
        };
        let now = Instant::now();
        if !waits_for_siblings(node, want, patch, &modules, on_node) {
            gathering.remove(&name);
            return None;
        }
        let until = *gathering.entry(name.clone()).or_insert(now + REBOOT_GATHER);
        let left = until.saturating_duration_since(now);
        if left.is_zero() {
            gathering.remove(&name);
            return None;
        }
        Some(left)
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

/// Whether a write of `patch` to `node` should wait for the node's other Modules: after a
/// reboot, it only brings ready labels back (it removes no label and leaves the kernel label
/// alone), and some other Module (of `modules`) whose ready label the reboot took is not back
/// with it while its loader of the node's kernel is on the node, starting (not Ready, not
/// terminating). Waiting (at most [`REBOOT_GATHER`]) makes the reboot's labels come back in
/// one write instead of one per loader that gets Ready in another write window.
fn waits_for_siblings<P: Borrow<CachedPod>>(
    node: &Node,
    want: &NodeWant,
    patch: &Value,
    modules: &[ModuleKey],
    pods_on_node: impl FnOnce() -> Vec<P>,
) -> bool {
    let Some(boot) = node_boot_id(node) else {
        return false;
    };
    let labels = patch["metadata"]["labels"].as_object();
    if labels.is_some_and(|l| l.contains_key(KERNEL_LABEL) || l.values().any(Value::is_null)) {
        return false;
    }
    fn recorded_boot(v: Option<&String>) -> Option<&str> {
        v.and_then(|v| recorded_boot_id(v))
    }
    let back = |(ns, name): &ModuleKey| {
        let key = ready_boot_annotation(ns, name);
        let before = recorded_boot(node.annotations().get(&key));
        let after = want.modules.get(&(ns.clone(), name.clone())).and_then(|w| {
            w.labels
                .as_ref()
                .map(|_| recorded_boot(w.annotations.get(&key)))
        });
        before != Some(boot) && after.is_some_and(|a| a == Some(boot))
    };
    if !modules.iter().any(back) {
        return false;
    }
    let kernel = node_kernel(node).map(kernel_label_value);
    let pods_on_node = pods_on_node();
    let starting = |(ns, name): &ModuleKey| {
        pods_on_node
            .iter()
            .map(Borrow::borrow)
            .any(|p: &CachedPod| {
                p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && p.labels().get(MODULE_NAME_LABEL) == Some(name)
                    && p.labels().get(ROLE_LABEL).map(String::as_str) == Some(ROLE_LOADER)
                    && kernel.is_some()
                    && p.labels().get(TARGET_KERNEL_LABEL) == kernel.as_ref()
                    && p.metadata.deletion_timestamp.is_none()
                    && !pod_ready(p)
            })
    };
    modules.iter().any(|m| {
        let (ns, name) = m;
        let taken = recorded_boot(node.annotations().get(&ready_boot_annotation(ns, name)))
            .is_some_and(|b| b != boot)
            && !node.labels().contains_key(&module_ready_label(ns, name));
        taken && !back(m) && starting(m)
    })
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
    if let Some(left) = writes.gather(&node, &want, &patch, ctx) {
        tracing::debug!(node = %name, ?left, "ready labels back after a reboot wait for the node's other loaders");
        writes.put_back(&name, want);
        return Ok(Action::Requeue(left));
    }
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
            writes.put_back(&name, want);
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

    /// After a reboot, labels coming back wait for the other Modules whose loaders of the
    /// node's kernel are starting there; removals, the kernel label, and siblings with no
    /// loader starting never wait.
    #[test]
    fn labels_back_after_a_reboot_wait_for_starting_siblings() {
        let a: ModuleKey = (NS.into(), NAME.into());
        let b: ModuleKey = (NS.into(), "other".into());
        let modules = [a.clone(), b.clone()];
        let (ready_a, ready_b) = (
            module_ready_label(NS, NAME),
            module_ready_label(NS, "other"),
        );
        let (fence_a, fence_b) = (
            ready_boot_annotation(NS, NAME),
            ready_boot_annotation(NS, "other"),
        );
        // Rebooted into b2: both labels were taken, both records name b1.
        let mut n = node("n1");
        if let Some(i) = n.status.as_mut().and_then(|s| s.node_info.as_mut()) {
            i.boot_id = "b2".into();
        }
        n.annotations_mut().insert(fence_a.clone(), "b1 p/0".into());
        n.annotations_mut().insert(fence_b.clone(), "b1 q/0".into());
        // a's loader is Ready again: its label and record in b2.
        let a_back = want(
            None,
            vec![(
                a.clone(),
                ModuleWant {
                    labels: Some(labels(&[(&ready_a, "")])),
                    annotations: labels(&[(&fence_a, "b2 p/1")]),
                    remove: vec![],
                },
            )],
        );
        let patch = node_patch(&n, &a_back).expect("a patch");
        let mut b_loader = loader_pod("n1");
        b_loader.set_label(MODULE_NAME_LABEL, "other");
        let b_ready = b_loader.clone().ready();
        let waits = |w: &NodeWant, p: &Value, pods: &[&CachedPod]| {
            waits_for_siblings(&n, w, p, &modules, || pods.to_vec())
        };
        // b's loader is starting: wait for it.
        assert!(waits(&a_back, &patch, &[&b_loader]));
        // b's loader is Ready (its want comes on its own), or there is none, or it is of
        // another kernel, or terminating: no wait.
        assert!(!waits(&a_back, &patch, &[&b_ready]));
        assert!(!waits(&a_back, &patch, &[]));
        let mut other_kernel = b_loader.clone();
        other_kernel.set_label(TARGET_KERNEL_LABEL, "5.14.0");
        assert!(!waits(&a_back, &patch, &[&other_kernel]));
        assert!(!waits(&a_back, &patch, &[&b_loader.clone().deleting()]));
        // Both back in one want: nothing left to wait for.
        let mut both = a_back.clone();
        both.modules.insert(
            b.clone(),
            ModuleWant {
                labels: Some(labels(&[(&ready_b, "")])),
                annotations: labels(&[(&fence_b, "b2 q/1")]),
                remove: vec![],
            },
        );
        let both_patch = node_patch(&n, &both).expect("a patch");
        assert!(!waits(&both, &both_patch, &[&b_loader]));
        // A write that also removes a label or sets the kernel goes at once.
        let mut with_kernel = a_back.clone();
        with_kernel.kernel = Some("6.12.0".into());
        let kp = node_patch(&n, &with_kernel).expect("a patch");
        assert!(!waits(&with_kernel, &kp, &[&b_loader]));
        let n_with_b = n.clone().label(&ready_b, "");
        let mut drops_b = a_back.clone();
        drops_b.modules.insert(
            b.clone(),
            ModuleWant {
                labels: Some(BTreeMap::new()),
                annotations: labels(&[(&fence_b, "b1 q/0")]),
                remove: vec![],
            },
        );
        let dp = node_patch(&n_with_b, &drops_b).expect("a patch");
        assert!(!waits_for_siblings(
            &n_with_b,
            &drops_b,
            &dp,
            &modules,
            || vec![&b_loader]
        ));
        // Not after a reboot (the record already names this boot): no wait.
        let mut same_boot = n.clone();
        same_boot
            .annotations_mut()
            .insert(fence_a.clone(), "b2 p/0".into());
        let sp = node_patch(&same_boot, &a_back).expect("a patch");
        assert!(!waits_for_siblings(
            &same_boot,
            &a_back,
            &sp,
            &modules,
            || vec![&b_loader]
        ));
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
