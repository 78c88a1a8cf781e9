//! Reading a cluster into a [`Bundle`]: lists of any kind (by group, version, kind and
//! plural, so a missing CRD is one line in `errors.txt`), pod logs with the previous
//! container's and the termination messages, events as a table, Secrets as names.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, LogParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::{Bundle, object_path, safe, since_seconds};

/// A kind to list: `group` is empty for the core group.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

impl Kind {
    pub const fn new(
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        plural: &'static str,
    ) -> Self {
        Self {
            group,
            version,
            kind,
            plural,
        }
    }

    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

pub const POD: Kind = Kind::new("", "v1", "Pod", "pods");
pub const NODE: Kind = Kind::new("", "v1", "Node", "nodes");
pub const CONFIG_MAP: Kind = Kind::new("", "v1", "ConfigMap", "configmaps");
pub const DEPLOYMENT: Kind = Kind::new("apps", "v1", "Deployment", "deployments");
pub const DAEMON_SET: Kind = Kind::new("apps", "v1", "DaemonSet", "daemonsets");
pub const CLUSTER_CLAIM: Kind = Kind::new(
    "cluster.open-cluster-management.io",
    "v1alpha1",
    "ClusterClaim",
    "clusterclaims",
);
pub const JOB: Kind = Kind::new("batch", "v1", "Job", "jobs");

/// Where to list: the whole cluster (also for cluster-scoped kinds) or one namespace.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    All,
    Namespace(&'a str),
}

/// A cluster being read into a bundle.
pub struct Gatherer {
    client: Client,
    pub bundle: Bundle,
    since: Option<std::time::Duration>,
}

impl Gatherer {
    pub fn new(client: Client, bundle: Bundle, since: Option<std::time::Duration>) -> Self {
        Self {
            client,
            bundle,
            since,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// List `kind` in `scope` (optionally by label selector), write each object, reshaped by
    /// `shape`, without its managed fields, and return them. A failed list is recorded.
    pub async fn objects(
        &mut self,
        kind: Kind,
        scope: Scope<'_>,
        labels: Option<&str>,
        shape: fn(Value) -> Value,
    ) -> Vec<DynamicObject> {
        self.objects_where(kind, scope, labels, |_| true, shape)
            .await
    }

    /// As [`Gatherer::objects`], keeping only the objects `keep` accepts.
    pub async fn objects_where(
        &mut self,
        kind: Kind,
        scope: Scope<'_>,
        labels: Option<&str>,
        keep: fn(&DynamicObject) -> bool,
        shape: fn(Value) -> Value,
    ) -> Vec<DynamicObject> {
        let ar = kind.resource();
        let api: Api<DynamicObject> = match scope {
            Scope::All => Api::all_with(self.client.clone(), &ar),
            Scope::Namespace(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
        };
        let mut lp = ListParams::default();
        if let Some(l) = labels {
            lp = lp.labels(l);
        }
        let list: Vec<DynamicObject> = match api.list(&lp).await {
            Ok(l) => l.items.into_iter().filter(keep).collect(),
            Err(e) => {
                self.bundle
                    .error(&format!("listing {}", describe(kind, scope, labels)), e);
                return Vec::new();
            }
        };
        for o in &list {
            let mut value = match serde_json::to_value(o) {
                Ok(v) => v,
                Err(e) => {
                    self.bundle.error(&format!("encoding {}", o.name_any()), e);
                    continue;
                }
            };
            if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("managedFields");
            }
            if let Some(obj) = value.as_object_mut() {
                obj.insert("apiVersion".into(), json!(ar.api_version));
                obj.insert("kind".into(), json!(ar.kind));
            }
            let rel = object_path(kind.kind, o.namespace().as_deref(), &o.name_any());
            self.bundle.write_yaml(&rel, &shape(value));
        }
        self.bundle
            .note(format!("{}: {}", describe(kind, scope, labels), list.len()));
        list
    }

    /// Pods in `scope` (by label selector), their logs (all containers, the previous
    /// container's too after a restart) and a `termination.txt` line per stopped container.
    pub async fn pods_with_logs(&mut self, scope: Scope<'_>, labels: Option<&str>) -> usize {
        let objs = self.objects(POD, scope, labels, keep).await;
        let pods: Vec<Pod> = objs
            .into_iter()
            .filter_map(|o| serde_json::to_value(o).ok())
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let mut terminations = String::new();
        for pod in &pods {
            let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let statuses = pod.status.iter().flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            });
            for cs in statuses {
                for (state, term) in [
                    (
                        "current",
                        cs.state.as_ref().and_then(|s| s.terminated.as_ref()),
                    ),
                    (
                        "previous",
                        cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()),
                    ),
                ] {
                    if let Some(t) = term {
                        terminations.push_str(&format!(
                            "{ns}/{name} container {} ({state}): exit {} reason {} message {}\n",
                            cs.name,
                            t.exit_code,
                            t.reason.as_deref().unwrap_or("-"),
                            t.message.as_deref().unwrap_or("-").trim()
                        ));
                    }
                }
                if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
                    terminations.push_str(&format!(
                        "{ns}/{name} container {} waiting: reason {} message {}\n",
                        cs.name,
                        w.reason.as_deref().unwrap_or("-"),
                        w.message.as_deref().unwrap_or("-").trim()
                    ));
                }
                let mut runs = vec![false];
                if cs.restart_count > 0
                    || cs
                        .last_state
                        .as_ref()
                        .is_some_and(|s| s.terminated.is_some())
                {
                    runs.push(true);
                }
                for previous in runs {
                    let lp = LogParams {
                        container: Some(cs.name.clone()),
                        previous,
                        since_seconds: since_seconds(self.since),
                        timestamps: true,
                        ..Default::default()
                    };
                    let rel = format!(
                        "logs/{}/{}/{}{}.log",
                        safe(&ns),
                        safe(&name),
                        safe(&cs.name),
                        if previous { ".previous" } else { "" }
                    );
                    match api.logs(&name, &lp).await {
                        Ok(text) => self.bundle.write_text(&rel, &text),
                        Err(e) => self.bundle.error(&format!("log {rel}"), e),
                    }
                }
            }
        }
        if !terminations.is_empty() {
            let rel = match scope {
                Scope::Namespace(ns) => format!("pods/{}/termination.txt", safe(ns)),
                Scope::All => "pods/termination.txt".to_string(),
            };
            self.bundle.write_text(&rel, &terminations);
        }
        pods.len()
    }

    /// Events of `namespace` (optionally by field selector) as a table, oldest first, in
    /// `events/<namespace>[-<file>].txt`.
    pub async fn events(&mut self, namespace: &str, fields: Option<&str>, file: Option<&str>) {
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let mut lp = ListParams::default();
        if let Some(f) = fields {
            lp = lp.fields(f);
        }
        let what = format!(
            "events in {namespace}{}",
            fields.map(|f| format!(" ({f})")).unwrap_or_default()
        );
        let mut events = match api.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                self.bundle.error(&format!("listing {what}"), e);
                return;
            }
        };
        events.sort_by_key(event_time);
        let mut table = String::from("LAST SEEN\tTYPE\tREASON\tOBJECT\tCOUNT\tFROM\tMESSAGE\n");
        for e in &events {
            let o = &e.involved_object;
            table.push_str(&format!(
                "{}\t{}\t{}\t{}/{}\t{}\t{}\t{}\n",
                event_time(e),
                e.type_.as_deref().unwrap_or("-"),
                e.reason.as_deref().unwrap_or("-"),
                o.kind.as_deref().unwrap_or("-"),
                o.name.as_deref().unwrap_or("-"),
                e.count.unwrap_or(1),
                e.reporting_component
                    .as_deref()
                    .or(e.source.as_ref().and_then(|s| s.component.as_deref()))
                    .unwrap_or("-"),
                e.message.as_deref().unwrap_or("").replace('\n', " "),
            ));
        }
        let rel = match file {
            Some(f) => format!("events/{}-{}.txt", safe(namespace), safe(f)),
            None => format!("events/{}.txt", safe(namespace)),
        };
        self.bundle.write_text(&rel, &table);
        self.bundle.note(format!("{what}: {}", events.len()));
    }

    /// Secrets of `namespace` reduced to name, type and key names (`secrets/<ns>.yaml`); their
    /// values are dropped as soon as they are read and never written.
    pub async fn secret_names(&mut self, namespace: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                self.bundle
                    .error(&format!("listing Secrets in {namespace}"), e);
                return;
            }
        };
        let reduced: Vec<Value> = list.into_iter().map(reduce_secret).collect();
        self.bundle.note(format!(
            "Secrets in {namespace} (names only): {}",
            reduced.len()
        ));
        self.bundle
            .write_yaml(&format!("secrets/{}.yaml", safe(namespace)), &reduced);
    }
}

/// A Secret as name, namespace, type and the names of its keys.
pub fn reduce_secret(s: Secret) -> Value {
    let keys: BTreeSet<String> = s
        .data
        .iter()
        .flat_map(|d| d.keys().cloned())
        .chain(s.string_data.iter().flat_map(|d| d.keys().cloned()))
        .collect();
    json!({
        "name": s.metadata.name,
        "namespace": s.metadata.namespace,
        "type": s.type_,
        "keys": keys,
    })
}

/// The object as read.
pub fn keep(v: Value) -> Value {
    v
}

fn event_time(e: &Event) -> String {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0.to_string()))
        .unwrap_or_default()
}

fn describe(kind: Kind, scope: Scope<'_>, labels: Option<&str>) -> String {
    let mut s = kind.kind.to_string();
    if let Scope::Namespace(ns) = scope {
        s.push_str(&format!(" in {ns}"));
    }
    if let Some(l) = labels {
        s.push_str(&format!(" ({l})"));
    }
    s
}
