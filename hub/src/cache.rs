//! Compact caches of ManagedClusters and our ManifestWorks, fed by watches.
//! Only what the reconciler and the dashboard need is kept, so 10,000 clusters stay small;
//! entries are shared (`Arc`), so a reconcile's view of them costs a pointer each.
//! A change that matters enqueues the affected ManagedClusterModules.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde::Serialize;
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::ocm::ManifestWork;
use shared_api::{ManagedCluster, ManagedClusterModule};
use tokio::sync::mpsc;

use crate::decide::placement::{DecisionEntry, DecisionGroup, PlacementHold, placement_clusters};
use crate::decide::plan::{ClusterFacts, selects};

pub use crate::decide::facts::{JobEntry, WorkEntry, Works};

/// One recent event for the dashboard.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentEvent {
    pub time: String,
    pub kind: String,
    pub name: String,
    pub type_: String,
    pub reason: String,
    pub message: String,
}

pub const RECENT_EVENTS: usize = 200;

#[derive(Debug, Default)]
pub struct Caches {
    /// Build Jobs in the operator namespace, by name.
    pub jobs: RwLock<BTreeMap<String, JobEntry>>,
    pub jobs_synced: AtomicBool,
    pub clusters: RwLock<BTreeMap<String, Arc<ClusterFacts>>>,
    pub works: RwLock<BTreeMap<(String, String), Arc<WorkEntry>>>,
    pub clusters_synced: AtomicBool,
    pub works_synced: AtomicBool,
    /// The Secrets of the hub namespace are listed (see [`watch_secrets`]).
    pub secrets_synced: AtomicBool,
    /// Placements of the hub namespace, by name (`spec.placementRef`).
    pub placements: RwLock<BTreeMap<String, String>>,
    pub placements_synced: AtomicBool,
    /// PlacementDecisions of the hub namespace, by name.
    pub decisions: RwLock<BTreeMap<String, DecisionEntry>>,
    pub decisions_synced: AtomicBool,
    pub events: RwLock<VecDeque<RecentEvent>>,
    /// Bumped on every change the dashboard's live stream should announce.
    pub changes: tokio::sync::watch::Sender<u64>,
}

impl Caches {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn synced(&self) -> bool {
        self.clusters_synced.load(Ordering::Acquire)
            && self.works_synced.load(Ordering::Acquire)
            && self.jobs_synced.load(Ordering::Acquire)
            && self.secrets_synced.load(Ordering::Acquire)
    }

    pub fn job(&self, name: &str) -> Option<JobEntry> {
        self.jobs.read().ok()?.get(name).cloned()
    }

    pub fn put_job(&self, j: &k8s_openapi::api::batch::v1::Job) {
        if let Some(e) = JobEntry::from_job(j)
            && let Ok(mut jobs) = self.jobs.write()
        {
            jobs.insert(e.name.clone(), e);
        }
    }

    /// Every cluster's facts (shared with the cache, not copied).
    pub fn cluster_facts(&self) -> Vec<Arc<ClusterFacts>> {
        self.clusters
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The Driver Toolkit image for a kernel: the hub's table, then the clusters' claims
    /// ([`crate::decide::dtk::dtk_image_for`], read under the lock, nothing copied).
    pub fn dtk_image(
        &self,
        kernel: &str,
        table: &crate::render::build_job::DtkTable,
    ) -> Result<crate::decide::dtk::DtkImage, String> {
        match self.clusters.read() {
            Ok(c) => crate::decide::dtk::dtk_image_for(kernel, table, c.values().map(|f| &**f)),
            Err(_) => crate::decide::dtk::dtk_image_for(kernel, table, []),
        }
    }

    /// The clusters (with decision groups) Placement `name` of the hub namespace decided, or
    /// why to wait ([`crate::decide::placement::placement_clusters`]).
    pub fn placement_clusters(
        &self,
        name: &str,
        namespace: &str,
    ) -> Result<BTreeMap<String, DecisionGroup>, PlacementHold> {
        let synced = self.placements_synced.load(Ordering::Acquire)
            && self.decisions_synced.load(Ordering::Acquire);
        let exists = self
            .placements
            .read()
            .map(|p| p.contains_key(name))
            .unwrap_or(false);
        let decisions = self
            .decisions
            .read()
            .map(|d| d.values().cloned().collect::<Vec<_>>());
        let decisions = decisions.unwrap_or_default();
        placement_clusters(name, namespace, synced, exists, &decisions)
    }

    /// The cached works of one MCM, by cluster (shared with the cache, not copied).
    pub fn works_of(&self, mcm: &str) -> Works {
        self.works
            .read()
            .map(|w| {
                w.values()
                    .filter(|e| e.mcm == mcm)
                    .map(|e| (e.cluster.clone(), e.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn put_work(&self, w: &ManifestWork) {
        if let Some(e) = WorkEntry::from_work(w)
            && let Ok(mut works) = self.works.write()
        {
            works.insert((e.cluster.clone(), w.name_any()), Arc::new(e));
        }
        self.bump();
    }

    pub fn remove_work(&self, cluster: &str, name: &str) {
        if let Ok(mut works) = self.works.write() {
            works.remove(&(cluster.to_string(), name.to_string()));
        }
        self.bump();
    }

    pub fn record_event(&self, ev: RecentEvent) {
        if let Ok(mut events) = self.events.write() {
            if events.len() >= RECENT_EVENTS {
                events.pop_front();
            }
            events.push_back(ev);
        }
        self.bump();
    }

    pub fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Where watch changes send the MCMs they affect.
pub type Trigger = mpsc::UnboundedSender<ObjectRef<ManagedClusterModule>>;

fn mcms_selecting(
    store: &Store<ManagedClusterModule>,
    labels: &[&BTreeMap<String, String>],
) -> Vec<ObjectRef<ManagedClusterModule>> {
    store
        .state()
        .iter()
        .filter(|m| labels.iter().any(|l| selects(&m.spec.selector, l)))
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// Mirror a watch into a compact map: `entry` projects an object (None: not ours),
/// `changed(old, new)` hears about every real change, `relisted` about every (re)list.
#[allow(clippy::too_many_arguments)]
async fn mirror<K, Key, V>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    map: &RwLock<BTreeMap<Key, V>>,
    synced: &AtomicBool,
    entry: impl Fn(&K) -> Option<(Key, V)>,
    key: impl Fn(&K) -> Key,
    changed: impl Fn(Option<&V>, Option<&V>),
    relisted: impl Fn(),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    Key: Ord + Clone,
    V: PartialEq,
{
    let mut buffer: BTreeMap<Key, V> = BTreeMap::new();
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    loop {
        let ev = match stream.try_next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, kind, "watch error");
                continue;
            }
        };
        match ev {
            Event::Init => buffer.clear(),
            Event::InitApply(obj) => {
                if let Some((k, v)) = entry(&obj) {
                    buffer.insert(k, v);
                }
            }
            Event::InitDone => {
                if let Ok(mut m) = map.write() {
                    *m = std::mem::take(&mut buffer);
                }
                synced.store(true, Ordering::Release);
                relisted();
            }
            Event::Apply(obj) => {
                let Some((k, v)) = entry(&obj) else {
                    // No longer of interest (e.g. being deleted): it leaves the cache.
                    let old = map.write().ok().and_then(|mut m| m.remove(&key(&obj)));
                    if old.is_some() {
                        changed(old.as_ref(), None);
                    }
                    continue;
                };
                let Ok(mut m) = map.write() else { continue };
                let old = m.insert(k.clone(), v);
                let new = m.get(&k);
                if old.as_ref() != new {
                    changed(old.as_ref(), new);
                }
            }
            Event::Delete(obj) => {
                let old = map.write().ok().and_then(|mut m| m.remove(&key(&obj)));
                if old.is_some() {
                    changed(old.as_ref(), None);
                }
            }
        }
    }
}

/// Watch ManagedClusters; enqueue the MCMs whose selector matches the old or the new labels
/// when labels or kernels change (upstream only looks at the new labels).
pub async fn watch_clusters(
    client: Client,
    caches: Arc<Caches>,
    mcms: Store<ManagedClusterModule>,
    trigger: Trigger,
) {
    let empty = BTreeMap::new();
    mirror(
        "ManagedCluster",
        Api::<ManagedCluster>::all(client),
        watcher::Config::default(),
        &caches.clusters,
        &caches.clusters_synced,
        |c| {
            // A ManagedCluster being deleted is leaving the fleet: OCM's registration
            // controller waits for its works to go before the cluster does, so the hub must
            // stop selecting it now (and delete its works), not when it is finally gone.
            if c.metadata.deletion_timestamp.is_some() {
                return None;
            }
            let f = ClusterFacts::from_cluster(c);
            Some((f.name.clone(), Arc::new(f)))
        },
        |c| c.name_any(),
        |old, new| {
            let labels: Vec<&BTreeMap<String, String>> = [
                old.map_or(&empty, |o| &o.labels),
                new.map_or(&empty, |n| &n.labels),
            ]
            .into();
            // Driver Toolkit images serve builds for every MCM, selecting this cluster or
            // not (a build for a kernel takes the image of any cluster running it): they
            // change rarely, so every MCM looks again.
            let old_dtk = old.map(|o| &o.dtk_images);
            let new_dtk = new.map(|n| &n.dtk_images);
            let dtk_changed = old_dtk != new_dtk
                && (old_dtk.is_some_and(|d| !d.is_empty())
                    || new_dtk.is_some_and(|d| !d.is_empty()));
            let targets = if dtk_changed {
                mcms.state()
                    .iter()
                    .map(|m| ObjectRef::from_obj(m.as_ref()))
                    .collect()
            } else {
                mcms_selecting(&mcms, &labels)
            };
            for r in targets {
                let _ = trigger.send(r);
            }
            caches.bump();
        },
        || {
            // After a (re)list anything may have changed: reconcile every MCM.
            for m in mcms.state() {
                let _ = trigger.send(ObjectRef::from_obj(m.as_ref()));
            }
            caches.bump();
        },
    )
    .await
}

/// MCMs whose `spec.placementRef` names one of `placements` (all with one when `None`).
fn mcms_placed_by(
    store: &Store<ManagedClusterModule>,
    placements: Option<&[&str]>,
) -> Vec<ObjectRef<ManagedClusterModule>> {
    store
        .state()
        .iter()
        .filter(|m| {
            m.spec
                .placement_ref
                .as_ref()
                .is_some_and(|p| placements.is_none_or(|names| names.contains(&p.name.as_str())))
        })
        .map(|m| ObjectRef::from_obj(m.as_ref()))
        .collect()
}

/// Watch the Placements of the hub namespace (names only); enqueue the MCMs naming one that
/// comes or goes.
pub async fn watch_placements(
    client: Client,
    namespace: String,
    caches: Arc<Caches>,
    mcms: Store<ManagedClusterModule>,
    trigger: Trigger,
) {
    use shared_api::ocm::Placement;
    mirror(
        "Placement",
        Api::<Placement>::namespaced(client, &namespace),
        watcher::Config::default(),
        &caches.placements,
        &caches.placements_synced,
        |p| Some((p.name_any(), p.name_any())),
        |p| p.name_any(),
        |old, new| {
            if let Some(name) = new.or(old) {
                let names = [name.as_str()];
                for r in mcms_placed_by(&mcms, Some(&names[..])) {
                    let _ = trigger.send(r);
                }
            }
            caches.bump();
        },
        || {
            for r in mcms_placed_by(&mcms, None) {
                let _ = trigger.send(r);
            }
        },
    )
    .await
}

/// Watch the PlacementDecisions of the hub namespace (by the placement label); enqueue the
/// MCMs of a Placement whose decisions change.
pub async fn watch_placement_decisions(
    client: Client,
    namespace: String,
    caches: Arc<Caches>,
    mcms: Store<ManagedClusterModule>,
    trigger: Trigger,
) {
    use shared_api::ocm::{PLACEMENT_LABEL, PlacementDecision};
    mirror(
        "PlacementDecision",
        Api::<PlacementDecision>::namespaced(client, &namespace),
        watcher::Config::default().labels(PLACEMENT_LABEL),
        &caches.decisions,
        &caches.decisions_synced,
        |d| DecisionEntry::from_decision(d).map(|e| (d.name_any(), e)),
        |d| d.name_any(),
        |old, new| {
            let names: Vec<&str> = [old, new]
                .into_iter()
                .flatten()
                .map(|e| e.placement.as_str())
                .collect();
            for r in mcms_placed_by(&mcms, Some(names.as_slice())) {
                let _ = trigger.send(r);
            }
            caches.bump();
        },
        || {
            for r in mcms_placed_by(&mcms, None) {
                let _ = trigger.send(r);
            }
        },
    )
    .await
}

/// Watch our ManifestWorks (by owner label, all namespaces); enqueue the owner MCM when
/// a work's status or spec changes.
pub async fn watch_works(client: Client, caches: Arc<Caches>, trigger: Trigger) {
    mirror(
        "ManifestWork",
        Api::<ManifestWork>::all(client),
        watcher::Config::default().labels(MCM_OWNER_LABEL),
        &caches.works,
        &caches.works_synced,
        |w| WorkEntry::from_work(w).map(|e| ((e.cluster.clone(), w.name_any()), Arc::new(e))),
        |w| (w.namespace().unwrap_or_default(), w.name_any()),
        |old, new| {
            if let Some(e) = new.or(old) {
                let _ = trigger.send(ObjectRef::new(&e.mcm));
            }
            caches.bump();
        },
        || caches.bump(),
    )
    .await
}

/// Watch our build Jobs in the operator namespace; enqueue the owner MCM on every change.
pub async fn watch_jobs(client: Client, namespace: String, caches: Arc<Caches>, trigger: Trigger) {
    use k8s_openapi::api::batch::v1::Job;
    mirror(
        "Job",
        Api::<Job>::namespaced(client, &namespace),
        watcher::Config::default().labels(MCM_OWNER_LABEL),
        &caches.jobs,
        &caches.jobs_synced,
        |j| JobEntry::from_job(j).map(|e| (e.name.clone(), e)),
        |j| j.name_any(),
        |old, new| {
            if let Some(e) = new.or(old) {
                let _ = trigger.send(ObjectRef::new(&e.mcm));
            }
            caches.bump();
        },
        || {},
    )
    .await
}

/// Whether an MCM's module spec (or `spec.day0`) names `secret` (pull secret, signing key or
/// certificate, build secret).
pub fn references_secret(mcm: &ManagedClusterModule, secret: &str) -> bool {
    fn walk(v: &serde_json::Value, secret: &str) -> bool {
        match v {
            serde_json::Value::Object(m) => m.iter().any(|(k, v)| {
                let named =
                    |x: &serde_json::Value| x.get("name").and_then(|n| n.as_str()) == Some(secret);
                match k.as_str() {
                    "imageRepoSecret" | "keySecret" | "certSecret" if named(v) => true,
                    "secrets" if v.as_array().is_some_and(|a| a.iter().any(named)) => true,
                    _ => walk(v, secret),
                }
            }),
            serde_json::Value::Array(a) => a.iter().any(|x| walk(x, secret)),
            _ => false,
        }
    }
    serde_json::to_value(&mcm.spec.module_spec).is_ok_and(|v| walk(&v, secret))
        || mcm
            .spec
            .day0
            .as_ref()
            .and_then(|d| serde_json::to_value(d).ok())
            .is_some_and(|v| walk(&v, secret))
}

/// A short fingerprint of a Secret's content (type and data), to tell real changes apart.
fn secret_fingerprint(s: &Secret) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(s.type_.as_deref().unwrap_or_default());
    for (k, v) in s.data.iter().flatten() {
        h.update(b"\0");
        h.update(k.as_bytes());
        h.update(b"\0");
        h.update(&v.0);
    }
    hex::encode(h.finalize())
}

/// Mirror the Secrets of the hub namespace into `writer` (the reconciler reads pull secrets
/// and signing keys from its store, never from the API server per reconcile). A Secret whose
/// content changes or that goes drops the registry clients holding its credential, and the
/// MCMs that name it are reconciled.
pub async fn watch_secrets(
    client: Client,
    namespace: String,
    caches: Arc<Caches>,
    mut writer: kube::runtime::reflector::store::Writer<Secret>,
    resolver: crate::registry::Resolver,
    mcms: Store<ManagedClusterModule>,
    trigger: Trigger,
) {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut relist: BTreeMap<String, String> = BTreeMap::new();
    let changed = |name: &str| {
        resolver.forget_secret(name);
        for m in mcms.state() {
            if references_secret(&m, name) {
                let _ = trigger.send(ObjectRef::from_obj(m.as_ref()));
            }
        }
    };
    let mut stream = watcher::watcher(
        Api::<Secret>::namespaced(client, &namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    loop {
        let ev = match stream.try_next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, kind = "Secret", "watch error");
                continue;
            }
        };
        writer.apply_watcher_event(&ev);
        match &ev {
            Event::Init => relist.clear(),
            Event::InitApply(s) => {
                relist.insert(s.name_any(), secret_fingerprint(s));
            }
            Event::InitDone => {
                let now = std::mem::take(&mut relist);
                for (name, fp) in &seen {
                    if now.get(name) != Some(fp) {
                        changed(name);
                    }
                }
                seen = now;
                caches.secrets_synced.store(true, Ordering::Release);
            }
            Event::Apply(s) => {
                let name = s.name_any();
                let fp = secret_fingerprint(s);
                // New (an MCM may wait for it) or changed: drop old clients, reconcile.
                if seen.insert(name.clone(), fp.clone()).as_ref() != Some(&fp) {
                    changed(&name);
                }
            }
            Event::Delete(s) => {
                let name = s.name_any();
                seen.remove(&name);
                changed(&name);
            }
        }
    }
}
