//! The spoke prerequisites an MCM asks for (`spec.spokePrerequisites`), as manifests of its
//! ManifestWork: the Namespace with the Pod Security label loaders need, the loader,
//! device-plugin and DRA-driver ServiceAccounts, and a copy of the pull secret. Pure.
//!
//! They come before the Module in the work (the OCM work agent applies manifests in order, so
//! the namespace exists when its objects are applied), are server-side applied (an existing
//! namespace or ServiceAccount only gains what we set), and the Namespace and ServiceAccounts
//! are orphaned when the work is deleted (`deleteOption: SelectivelyOrphan`): they may hold or
//! serve other workloads, and several MCMs may share them. The pull-secret copy is deleted
//! with the work (with the last one, when several works carry it: OCM only drops its owner).

use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::{ByteString, Resource as _};
use kube::api::ObjectMeta;
use serde_json::{Value, json};
use shared_api::ManagedClusterModule;
use shared_api::ocm::{
    DeleteOption, ManifestConfigOption, OrphaningRule, ResourceIdentifier, SelectivelyOrphan,
    UpdateStrategy,
};

/// The Pod Security Admission label set on a namespace the hub creates.
pub const POD_SECURITY_ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";
/// Its value: loader pods need `SYS_MODULE` (privileged with firmware), device plugins are
/// privileged.
pub const POD_SECURITY_LEVEL: &str = "privileged";

/// The key and type of a registry pull secret.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";

/// The pull secret to copy to the spokes, as read on the hub for this reconcile.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum PullSecretSource {
    /// No copy: not asked for (`spokePrerequisites.pullSecret` false) or no `imageRepoSecret`.
    #[default]
    None,
    /// The hub's Secret `name`, its `.dockerconfigjson` content.
    Copy {
        name: String,
        dockerconfigjson: Vec<u8>,
    },
    /// Asked for but not readable on the hub: why (names the Secret, never its content).
    Unavailable(String),
}

/// Names only: never the content of the Secret.
impl std::fmt::Debug for PullSecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Copy { name, .. } => f.debug_struct("Copy").field("name", name).finish(),
            Self::Unavailable(why) => f.debug_tuple("Unavailable").field(why).finish(),
        }
    }
}

/// One extra manifest of the work.
pub struct Prerequisite {
    pub id: ResourceIdentifier,
    pub manifest: Value,
    /// Left on the spoke when the work is deleted.
    pub orphan: bool,
}

fn id(resource: &str, namespace: &str, name: &str) -> ResourceIdentifier {
    ResourceIdentifier {
        group: String::new(),
        resource: resource.into(),
        name: name.into(),
        namespace: namespace.into(),
    }
}

fn typed<K: k8s_openapi::Resource + serde::Serialize>(obj: &K) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("apiVersion".into(), json!(K::API_VERSION));
        o.insert("kind".into(), json!(K::KIND));
    }
    v
}

/// The ServiceAccounts the MCM's pods run as, when named (sorted, distinct). Unnamed means
/// the namespace's `default`, which Kubernetes creates with the namespace.
pub fn named_service_accounts(mcm: &ManagedClusterModule) -> Vec<String> {
    let spec = &mcm.spec.module_spec;
    let mut names: Vec<String> = [
        spec.module_loader
            .as_ref()
            .and_then(|l| l.service_account_name.clone()),
        spec.device_plugin
            .as_ref()
            .and_then(|d| d.service_account_name.clone()),
        spec.dra
            .as_ref()
            .and_then(|d| d.service_account_name.clone()),
    ]
    .into_iter()
    .flatten()
    .filter(|n| !n.is_empty())
    .collect();
    names.sort();
    names.dedup();
    names
}

/// The prerequisites of `mcm`, in the order they are applied. `pull` must not be
/// [`PullSecretSource::Unavailable`] (the caller ships nothing new then).
pub fn prerequisites(mcm: &ManagedClusterModule, pull: &PullSecretSource) -> Vec<Prerequisite> {
    let wanted = mcm.spec.prerequisites();
    let ns = mcm.spec.spoke_namespace.as_str();
    let mut out = Vec::new();
    if wanted.namespace {
        let obj = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.into()),
                labels: Some(
                    [(
                        POD_SECURITY_ENFORCE_LABEL.to_string(),
                        POD_SECURITY_LEVEL.to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        out.push(Prerequisite {
            id: id(Namespace::URL_PATH_SEGMENT, "", ns),
            manifest: typed(&obj),
            orphan: true,
        });
    }
    if wanted.service_accounts {
        for name in named_service_accounts(mcm) {
            let obj = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            out.push(Prerequisite {
                id: id(ServiceAccount::URL_PATH_SEGMENT, ns, &name),
                manifest: typed(&obj),
                orphan: true,
            });
        }
    }
    if wanted.pull_secret
        && let PullSecretSource::Copy {
            name,
            dockerconfigjson,
        } = pull
    {
        let obj = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            type_: Some(DOCKER_CONFIG_JSON_TYPE.into()),
            data: Some(
                [(
                    DOCKER_CONFIG_JSON_KEY.to_string(),
                    ByteString(dockerconfigjson.clone()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        out.push(Prerequisite {
            id: id(Secret::URL_PATH_SEGMENT, ns, name),
            manifest: typed(&obj),
            orphan: false,
        });
    }
    out
}

/// Server-side apply for a prerequisite (no feedback).
pub fn config_of(p: &Prerequisite) -> ManifestConfigOption {
    ManifestConfigOption {
        resource_identifier: p.id.clone(),
        feedback_rules: Vec::new(),
        update_strategy: Some(UpdateStrategy {
            type_: "ServerSideApply".into(),
        }),
    }
}

/// `SelectivelyOrphan` for the orphaned prerequisites; `None` (OCM's default, `Foreground`:
/// everything goes with the work) when there are none.
pub fn delete_option(ps: &[Prerequisite]) -> Option<DeleteOption> {
    let rules: Vec<OrphaningRule> = ps
        .iter()
        .filter(|p| p.orphan)
        .map(|p| OrphaningRule {
            group: p.id.group.clone(),
            resource: p.id.resource.clone(),
            namespace: p.id.namespace.clone(),
            name: p.id.name.clone(),
        })
        .collect();
    (!rules.is_empty()).then(|| DeleteOption {
        propagation_policy: "SelectivelyOrphan".into(),
        selectively_orphans: Some(SelectivelyOrphan {
            orphaning_rules: rules,
        }),
    })
}
