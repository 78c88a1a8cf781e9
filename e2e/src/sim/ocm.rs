//! The OCM agents of each spoke, simulated: the registration agent (spoke ClusterClaims →
//! hub `ManagedCluster.status.clusterClaims`) and the work agent (hub ManifestWorks in the
//! cluster's namespace → server-side apply on the spoke, conditions, JSONPath status
//! feedback, deletion of what a work no longer holds).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, Scope};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use shared_api::conditions::set_condition;
use shared_api::ocm::{
    ClusterClaim, FeedbackValue, FieldValue, ManagedCluster, ManagedClusterClaim,
    ManifestCondition, ManifestResourceMeta, ManifestResourceStatus, ManifestWork,
    ManifestWorkStatus, StatusFeedbackResult, work_conditions,
};

/// OCM's finalizer on ManifestWorks: the work agent removes it after cleaning up.
pub const WORK_FINALIZER: &str = "cluster.open-cluster-management.io/manifest-work-cleanup";
/// Field manager of the work agent's server-side apply.
pub const WORK_FIELD_MANAGER: &str = "work-agent";
/// How often the work agent re-reads applied objects (feedback, availability).
const RESYNC: Duration = Duration::from_secs(1);
/// How often it re-applies unchanged works (drift repair).
const REAPPLY: Duration = Duration::from_secs(30);
const MAX_LOG_LINES: usize = 20_000;

struct Logs(Mutex<VecDeque<String>>);

impl Logs {
    fn log(&self, cluster: &str, agent: &str, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(cluster, agent, "{line}");
        let mut l = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() >= MAX_LOG_LINES {
            l.pop_front();
        }
        l.push_back(format!(
            "{} [{cluster}/{agent}] {line}",
            chrono::Utc::now().format("%H:%M:%S%.3f")
        ));
    }
}

/// The OCM registration and work agents of a set of spokes.
pub struct OcmSim {
    logs: Arc<Logs>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for OcmSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OcmSim")
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl OcmSim {
    /// Start both agents for every `(cluster name, spoke client)`.
    pub async fn start(hub: Client, spokes: Vec<(String, Client)>) -> anyhow::Result<OcmSim> {
        let logs = Arc::new(Logs(Mutex::new(VecDeque::new())));
        let mut tasks = Vec::new();
        for (cluster, spoke) in spokes {
            logs.log(&cluster, "ocm", "starting registration and work agents");
            tasks.push(tokio::spawn(registration_agent(
                logs.clone(),
                hub.clone(),
                cluster.clone(),
                spoke.clone(),
            )));
            tasks.push(tokio::spawn(work_agent(
                logs.clone(),
                hub.clone(),
                cluster,
                spoke,
            )));
        }
        Ok(OcmSim { logs, tasks })
    }

    /// Every decision the agents made, oldest first.
    pub fn logs(&self) -> Vec<String> {
        self.logs
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn registration_agent(logs: Arc<Logs>, hub: Client, cluster: String, spoke: Client) {
    let log = |l: String| logs.log(&cluster, "registration", l);
    let (store, writer) = reflector::store::<ClusterClaim>();
    let claims = watcher::watcher(Api::<ClusterClaim>::all(spoke), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    futures::pin_mut!(claims);
    let clusters: Api<ManagedCluster> = Api::all(hub);
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    let mut ready = false;
    let mut said_missing = false;
    loop {
        tokio::select! {
            ev = claims.next() => match ev {
                None => break,
                Some(Err(e)) => { log(format!("claim watch: {e}")); continue; }
                Some(Ok(_)) => {}
            },
            _ = tick.tick() => {}
        }
        if !ready {
            if tokio::time::timeout(Duration::from_millis(1), store.wait_until_ready())
                .await
                .is_err()
            {
                continue;
            }
            ready = true;
        }
        let mut desired: Vec<ManagedClusterClaim> = store
            .state()
            .iter()
            .map(|c| ManagedClusterClaim {
                name: c.name_any(),
                value: c.spec.value.clone(),
            })
            .collect();
        desired.sort_by(|a, b| a.name.cmp(&b.name));
        let mc = match clusters.get_opt(&cluster).await {
            Ok(Some(mc)) => mc,
            Ok(None) => {
                if !said_missing {
                    log(format!(
                        "ManagedCluster {cluster} not on the hub yet; waiting"
                    ));
                    said_missing = true;
                }
                continue;
            }
            Err(e) => {
                log(format!("reading ManagedCluster: {e}"));
                continue;
            }
        };
        said_missing = false;
        let status = mc.status.clone().unwrap_or_default();
        let mut conditions = status.conditions.clone();
        let now = Timestamp::now();
        let mut changed = set_condition(
            &mut conditions,
            "ManagedClusterJoined",
            true,
            "ManagedClusterJoined",
            "Managed cluster joined (simulated)",
            None,
            now,
        );
        changed |= set_condition(
            &mut conditions,
            "ManagedClusterConditionAvailable",
            true,
            "ManagedClusterAvailable",
            "Managed cluster is available (simulated)",
            None,
            now,
        );
        if status.cluster_claims == desired && !changed {
            continue;
        }
        let patch = json!({"status": {"clusterClaims": desired, "conditions": conditions}});
        match clusters
            .patch_status(&cluster, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => log(format!(
                "ManagedCluster status: {} claim(s): {}",
                desired.len(),
                desired
                    .iter()
                    .map(|c| format!("{}={:?}", c.name, c.value))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Err(e) => log(format!("writing ManagedCluster status: {e}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct AppliedRef {
    ar: ApiResource,
    namespaced: bool,
    namespace: String,
    name: String,
}

impl AppliedRef {
    fn api(&self, client: &Client) -> Api<DynamicObject> {
        if self.namespaced {
            Api::namespaced_with(client.clone(), &self.namespace, &self.ar)
        } else {
            Api::all_with(client.clone(), &self.ar)
        }
    }

    fn same_object(&self, other: &AppliedRef) -> bool {
        self.ar.group == other.ar.group
            && self.ar.plural == other.ar.plural
            && self.namespace == other.namespace
            && self.name == other.name
    }

    fn show(&self) -> String {
        let g = if self.ar.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.ar.group)
        };
        if self.namespaced {
            format!("{}{g} {}/{}", self.ar.plural, self.namespace, self.name)
        } else {
            format!("{}{g} {}", self.ar.plural, self.name)
        }
    }
}

#[derive(Default)]
struct WorkState {
    applied: Vec<AppliedRef>,
    applied_generation: Option<i64>,
    applied_at: Option<Instant>,
}

struct WorkAgent {
    logs: Arc<Logs>,
    cluster: String,
    spoke: Client,
    works: Api<ManifestWork>,
    state: HashMap<String, WorkState>,
    discovered: HashMap<(String, String, String), (ApiResource, ApiCapabilities)>,
}

async fn work_agent(logs: Arc<Logs>, hub: Client, cluster: String, spoke: Client) {
    let works: Api<ManifestWork> = Api::namespaced(hub.clone(), &cluster);
    let (store, writer) = reflector::store::<ManifestWork>();
    let stream = watcher::watcher(works.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    futures::pin_mut!(stream);
    let mut agent = WorkAgent {
        logs,
        cluster,
        spoke,
        works,
        state: HashMap::new(),
        discovered: HashMap::new(),
    };
    let mut tick = tokio::time::interval(RESYNC);
    loop {
        let only: Option<String> = tokio::select! {
            ev = stream.next() => match ev {
                None => break,
                Some(Err(e)) => { agent.log(format!("work watch: {e}")); continue; }
                Some(Ok(w)) => Some(w.name_any()),
            },
            _ = tick.tick() => None,
        };
        if tokio::time::timeout(Duration::from_millis(1), store.wait_until_ready())
            .await
            .is_err()
        {
            continue;
        }
        let works: Vec<Arc<ManifestWork>> = store.state();
        let names: std::collections::HashSet<String> = works.iter().map(|w| w.name_any()).collect();
        agent.state.retain(|n, _| names.contains(n));
        for w in works {
            if only.as_ref().is_none_or(|n| *n == w.name_any()) {
                agent.reconcile(&w).await;
            }
        }
    }
}

fn manifest_condition(
    conds: &mut Vec<Condition>,
    t: &str,
    ok: bool,
    reason_ok: &str,
    reason_bad: &str,
    msg: &str,
    now: Timestamp,
) {
    set_condition(
        conds,
        t,
        ok,
        if ok { reason_ok } else { reason_bad },
        msg,
        None,
        now,
    );
}

impl WorkAgent {
    fn log(&self, line: impl Into<String>) {
        self.logs.log(&self.cluster, "work", line);
    }

    async fn resolve(
        &mut self,
        gvk: &GroupVersionKind,
    ) -> Result<(ApiResource, ApiCapabilities), String> {
        let key = (gvk.group.clone(), gvk.version.clone(), gvk.kind.clone());
        if let Some(v) = self.discovered.get(&key) {
            return Ok(v.clone());
        }
        match kube::discovery::pinned_kind(&self.spoke, gvk).await {
            Ok(v) => {
                self.discovered.insert(key, v.clone());
                Ok(v)
            }
            Err(e) => Err(format!(
                "the server does not serve {}/{} {}: {e}",
                gvk.group, gvk.version, gvk.kind
            )),
        }
    }

    async fn reconcile(&mut self, work: &ManifestWork) {
        let name = work.name_any();
        let has_finalizer = work.finalizers().iter().any(|f| f == WORK_FINALIZER);
        if work.metadata.deletion_timestamp.is_some() {
            if has_finalizer {
                self.clean_up(work).await;
            }
            return;
        }
        if !has_finalizer {
            let mut fins = work.finalizers().to_vec();
            fins.push(WORK_FINALIZER.to_string());
            let patch = json!({"metadata": {"finalizers": fins, "resourceVersion": work.resource_version()}});
            match self
                .works
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => self.log(format!("work {name}: finalizer added")),
                Err(e) => self.log(format!("work {name}: adding finalizer: {e}")),
            }
            // The update event brings the work back with the finalizer.
            return;
        }
        let generation = work.metadata.generation.unwrap_or(0);
        let st = self.state.remove(&name).unwrap_or_default();
        let reapply = st.applied_generation != Some(generation)
            || st.applied_at.is_none_or(|t| t.elapsed() > REAPPLY);
        let now = Timestamp::now();
        let old_status = work.status.clone().unwrap_or_default();
        let mut refs = Vec::new();
        let mut manifests_status = Vec::new();
        let (mut applied_ok, mut available_n, mut errors) = (0usize, 0usize, Vec::new());
        let total = work.spec.workload.manifests.len();
        for (i, m) in work.spec.workload.manifests.iter().enumerate() {
            let obj = &m.0;
            let api_version = obj
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = obj
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let oname = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let ons = obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let (group, version) = match api_version.split_once('/') {
                Some((g, v)) => (g.to_string(), v.to_string()),
                None => (String::new(), api_version.to_string()),
            };
            let mut meta = ManifestResourceMeta {
                ordinal: i as i32,
                group: group.clone(),
                version: version.clone(),
                kind: kind.clone(),
                resource: String::new(),
                name: oname.clone(),
                namespace: ons.clone(),
            };
            let old_conds = old_status
                .resource_status
                .as_ref()
                .and_then(|r| {
                    r.manifests
                        .iter()
                        .find(|mc| mc.resource_meta.ordinal == i as i32)
                })
                .map(|mc| mc.conditions.clone())
                .unwrap_or_default();
            let mut conds = old_conds;
            let gvk = GroupVersionKind::gvk(&group, &version, &kind);
            let resolved = if kind.is_empty() || oname.is_empty() {
                Err("manifest has no kind or metadata.name".to_string())
            } else {
                self.resolve(&gvk).await
            };
            let (ar, caps) = match resolved {
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("manifest {i}: {e}"));
                    manifest_condition(
                        &mut conds,
                        "Applied",
                        false,
                        "AppliedManifestComplete",
                        "AppliedManifestFailed",
                        &e,
                        now,
                    );
                    manifest_condition(
                        &mut conds,
                        "Available",
                        false,
                        "ResourceAvailable",
                        "ResourceNotAvailable",
                        "Resource is not available",
                        now,
                    );
                    manifests_status.push(ManifestCondition {
                        resource_meta: meta,
                        status_feedback: None,
                        conditions: conds,
                    });
                    continue;
                }
            };
            let namespaced = caps.scope == Scope::Namespaced;
            let namespace = if namespaced {
                if ons.is_empty() {
                    "default".to_string()
                } else {
                    ons.clone()
                }
            } else {
                String::new()
            };
            meta.resource = ar.plural.clone();
            meta.namespace = namespace.clone();
            let r = AppliedRef {
                ar,
                namespaced,
                namespace,
                name: oname.clone(),
            };
            let api = r.api(&self.spoke);
            let mut live = match api.get_opt(&oname).await {
                Ok(v) => v,
                Err(e) => {
                    self.log(format!("work {name}: reading {}: {e}", r.show()));
                    None
                }
            };
            let mut apply_error = None;
            if reapply || live.is_none() {
                match api
                    .patch(
                        &oname,
                        &PatchParams::apply(WORK_FIELD_MANAGER).force(),
                        &Patch::Apply(obj),
                    )
                    .await
                {
                    Ok(o) => {
                        if live.as_ref().map(|l| l.resource_version()) != Some(o.resource_version())
                        {
                            self.log(format!(
                                "work {name}: applied {} (generation {generation})",
                                r.show()
                            ));
                        }
                        live = Some(o);
                    }
                    Err(e) => {
                        let msg = match &e {
                            kube::Error::Api(ae) => ae.message.clone(),
                            e => e.to_string(),
                        };
                        self.log(format!("work {name}: applying {}: {msg}", r.show()));
                        apply_error = Some(msg);
                    }
                }
            } else if old_status.resource_status.is_none() {
                // Nothing recorded yet: count it as applied only if it exists.
            }
            let applied = apply_error.is_none() && (live.is_some() || !reapply);
            if applied {
                applied_ok += 1;
            } else if let Some(e) = &apply_error {
                errors.push(format!("manifest {i} ({}): {e}", r.show()));
            }
            let available = live.is_some();
            if available {
                available_n += 1;
            }
            manifest_condition(
                &mut conds,
                "Applied",
                applied,
                "AppliedManifestComplete",
                "AppliedManifestFailed",
                apply_error.as_deref().unwrap_or("Apply manifest complete"),
                now,
            );
            manifest_condition(
                &mut conds,
                "Available",
                available,
                "ResourceAvailable",
                "ResourceNotAvailable",
                if available {
                    "Resource is available"
                } else {
                    "Resource is not available"
                },
                now,
            );
            let rules = work.spec.manifest_configs.iter().find(|c| {
                let id = &c.resource_identifier;
                id.group == meta.group
                    && id.resource == meta.resource
                    && id.name == meta.name
                    && (id.namespace == meta.namespace || !namespaced)
            });
            let feedback = match (rules, &live) {
                (Some(cfg), Some(obj)) => {
                    let value = serde_json::to_value(obj).unwrap_or(Value::Null);
                    let mut values = Vec::new();
                    let mut missing = Vec::new();
                    for rule in cfg.feedback_rules.iter().filter(|r| r.type_ == "JSONPaths") {
                        for p in &rule.json_paths {
                            match json_path(&value, &p.path).and_then(field_value) {
                                Some(v) => values.push(FeedbackValue {
                                    name: p.name.clone(),
                                    field_value: v,
                                }),
                                None => missing.push(p.name.clone()),
                            }
                        }
                    }
                    let synced = missing.is_empty();
                    let msg = if synced {
                        String::new()
                    } else {
                        format!("Value of {} is not found", missing.join(", "))
                    };
                    set_condition(
                        &mut conds,
                        "StatusFeedbackSynced",
                        synced,
                        if synced {
                            "StatusFeedbackSynced"
                        } else {
                            "StatusFeedbackSyncFailed"
                        },
                        &msg,
                        None,
                        now,
                    );
                    Some(StatusFeedbackResult { values })
                }
                _ => None,
            };
            conds.retain(|c| c.type_ != "StatusFeedbackSynced" || feedback.is_some());
            manifests_status.push(ManifestCondition {
                resource_meta: meta,
                status_feedback: feedback,
                conditions: conds,
            });
            refs.push(r);
        }
        // Objects the work held before and no longer does.
        let mut previous = st.applied.clone();
        if previous.is_empty() {
            previous = self.refs_from_status(&old_status).await;
        }
        for old in previous
            .iter()
            .filter(|o| !refs.iter().any(|r| r.same_object(o)))
        {
            match old
                .api(&self.spoke)
                .delete(&old.name, &DeleteParams::background())
                .await
            {
                Ok(_) => self.log(format!(
                    "work {name}: deleted {} (no longer in the work)",
                    old.show()
                )),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => self.log(format!("work {name}: deleting {}: {e}", old.show())),
            }
        }
        let all_applied = errors.is_empty() && applied_ok == total;
        let mut conditions = old_status.conditions.clone();
        let g = Some(generation);
        if all_applied {
            set_condition(
                &mut conditions,
                work_conditions::APPLIED,
                true,
                "AppliedManifestWorkComplete",
                "Apply manifest work complete",
                g,
                now,
            );
        } else {
            let msg = format!("Failed to apply manifest work: {}", errors.join("; "));
            set_condition(
                &mut conditions,
                work_conditions::APPLIED,
                false,
                "AppliedManifestWorkFailed",
                &msg,
                g,
                now,
            );
        }
        if available_n == total {
            set_condition(
                &mut conditions,
                work_conditions::AVAILABLE,
                true,
                "ResourcesAvailable",
                "All resources are available",
                g,
                now,
            );
        } else {
            let msg = format!(
                "{} of {total} resources are not available",
                total - available_n
            );
            set_condition(
                &mut conditions,
                work_conditions::AVAILABLE,
                false,
                "ResourcesNotAvailable",
                &msg,
                g,
                now,
            );
        }
        set_condition(
            &mut conditions,
            work_conditions::DEGRADED,
            false,
            "ResourcesNotDegraded",
            "No status feedback reports degradation",
            g,
            now,
        );
        let status = ManifestWorkStatus {
            conditions,
            resource_status: Some(ManifestResourceStatus {
                manifests: manifests_status,
            }),
        };
        if status != old_status {
            let patch = json!({"status": status});
            match self
                .works
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => self.log(format!(
                    "work {name}: status Applied={} Available={} ({available_n}/{total})",
                    all_applied,
                    available_n == total
                )),
                Err(e) => self.log(format!("work {name}: writing status: {e}")),
            }
        }
        let applied_generation = if all_applied { Some(generation) } else { None };
        let applied_at = if reapply {
            Some(Instant::now())
        } else {
            st.applied_at
        };
        self.state.insert(
            name,
            WorkState {
                applied: refs,
                applied_generation,
                applied_at,
            },
        );
    }

    /// The objects a work's status says were applied (after a restart of the agent).
    async fn refs_from_status(&mut self, status: &ManifestWorkStatus) -> Vec<AppliedRef> {
        let mut out = Vec::new();
        for m in status
            .resource_status
            .iter()
            .flat_map(|r| r.manifests.iter())
        {
            let meta = &m.resource_meta;
            if meta.kind.is_empty() || meta.name.is_empty() {
                continue;
            }
            let gvk = GroupVersionKind::gvk(&meta.group, &meta.version, &meta.kind);
            if let Ok((ar, caps)) = self.resolve(&gvk).await {
                let namespaced = caps.scope == Scope::Namespaced;
                out.push(AppliedRef {
                    ar,
                    namespaced,
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone(),
                });
            }
        }
        out
    }

    async fn clean_up(&mut self, work: &ManifestWork) {
        let name = work.name_any();
        let mut refs = self
            .state
            .get(&name)
            .map(|s| s.applied.clone())
            .unwrap_or_default();
        for r in self
            .refs_from_status(&work.status.clone().unwrap_or_default())
            .await
        {
            if !refs.iter().any(|x| x.same_object(&r)) {
                refs.push(r);
            }
        }
        let mut remaining = Vec::new();
        for r in &refs {
            let api = r.api(&self.spoke);
            match api.get_opt(&r.name).await {
                Ok(None) => continue,
                Ok(Some(o)) => {
                    if o.metadata.deletion_timestamp.is_none() {
                        match api.delete(&r.name, &DeleteParams::foreground()).await {
                            Ok(_) => {
                                self.log(format!("work {name} deleted: deleting {}", r.show()))
                            }
                            Err(kube::Error::Api(e)) if e.code == 404 => continue,
                            Err(e) => {
                                self.log(format!("work {name} deleted: deleting {}: {e}", r.show()))
                            }
                        }
                    }
                    remaining.push(r.show());
                }
                Err(e) => {
                    self.log(format!("work {name} deleted: reading {}: {e}", r.show()));
                    remaining.push(r.show());
                }
            }
        }
        if !remaining.is_empty() {
            return;
        }
        let fins: Vec<&String> = work
            .finalizers()
            .iter()
            .filter(|f| *f != WORK_FINALIZER)
            .collect();
        let patch =
            json!({"metadata": {"finalizers": fins, "resourceVersion": work.resource_version()}});
        match self
            .works
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.log(format!(
                    "work {name} deleted: applied objects gone; finalizer removed"
                ));
                self.state.remove(&name);
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => self.log(format!("work {name}: removing finalizer: {e}")),
        }
    }
}

/// Evaluate a simple JSONPath (`.status.a.b`, `.spec.list[0].x`, optionally in `{}`).
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let p = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    let mut cur = obj;
    for seg in p.split('.').filter(|s| !s.is_empty()) {
        let (key, idx) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        if let Some(i) = idx {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

/// A JSON value as OCM reports it: Integer, String, Boolean, or JsonRaw for the rest.
pub fn field_value(v: &Value) -> Option<FieldValue> {
    let mut f = FieldValue::default();
    match v {
        Value::Null => return None,
        Value::Number(n) if n.is_i64() => {
            f.type_ = "Integer".into();
            f.integer = n.as_i64();
        }
        Value::String(s) => {
            f.type_ = "String".into();
            f.string = Some(s.clone());
        }
        Value::Bool(b) => {
            f.type_ = "Boolean".into();
            f.boolean = Some(*b);
        }
        other => {
            f.type_ = "JsonRaw".into();
            f.json_raw = Some(other.to_string());
        }
    }
    Some(f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_and_values() {
        let v = json!({"status": {"moduleLoader": {"availableNumber": 3}, "s": "x", "b": true, "l": [{"a": 1}], "o": {"k": 1}}});
        let get = |p: &str| json_path(&v, p).and_then(field_value);
        assert_eq!(
            get(".status.moduleLoader.availableNumber").unwrap().integer,
            Some(3)
        );
        assert_eq!(get("{.status.s}").unwrap().string.as_deref(), Some("x"));
        assert_eq!(get(".status.b").unwrap().boolean, Some(true));
        assert_eq!(get(".status.l[0].a").unwrap().integer, Some(1));
        assert_eq!(get(".status.o").unwrap().type_, "JsonRaw");
        assert!(get(".status.missing").is_none());
    }
}
