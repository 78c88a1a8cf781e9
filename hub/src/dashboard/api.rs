//! The read-only fleet API, answered from the controller's caches, its last decisions
//! (`Views`) and the MCM reflector store. No API-server call per request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use serde::Deserialize;
use shared_api::ManagedClusterModule;
use shared_api::mcm::ImageState;

use super::AppState;
use super::error::ApiError;
use super::model::{
    ClusterList, ClusterRollout, ClusterSummary, Counts, EventItem, EventList, Feedback,
    ImageCounts, KernelRollout, McmDetail, McmList, McmSummary, Phase, PodNumbers, Problem,
    RolloutState, WorkStatus,
};
use crate::cache::{RECENT_EVENTS, WorkEntry, Works};
use crate::decide::plan::{ClusterFacts, selects};
use crate::last_decisions::McmView;

pub async fn list_mcms(State(state): State<AppState>) -> Json<McmList> {
    let clusters = state.fleet.caches.cluster_facts();
    let mut items: Vec<McmSummary> = state
        .fleet
        .mcms
        .state()
        .iter()
        .map(|m| summary(m, &clusters))
        .collect();
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Json(McmList { items })
}

pub async fn get_mcm(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<McmDetail>, ApiError> {
    let Path(name) =
        name.map_err(|_| ApiError::BadRequest("the path parameter is not valid".into()))?;
    if !is_object_name(&name) {
        return Err(ApiError::BadRequest(format!(
            "{:?} is not a ManagedClusterModule name (lowercase DNS subdomain, at most 253 characters)",
            name.chars().take(64).collect::<String>()
        )));
    }
    let mcm = state
        .fleet
        .mcms
        .get(&ObjectRef::new(&name))
        .ok_or(ApiError::NotFound {
            kind: "ManagedClusterModule",
            name: name.clone(),
        })?;
    let clusters = state.fleet.caches.cluster_facts();
    let works = state.fleet.caches.works_of(&name);
    Ok(Json(detail(
        &mcm,
        state.fleet.views.get(&name),
        &works,
        &clusters,
    )))
}

pub async fn list_clusters(State(state): State<AppState>) -> Json<ClusterList> {
    let mcms = state.fleet.mcms.state();
    let items = state
        .fleet
        .caches
        .cluster_facts()
        .into_iter()
        .map(|c| {
            let mut selecting: Vec<String> = mcms
                .iter()
                .filter(|m| selects(&m.spec.selector, &c.labels))
                .map(|m| m.name_any())
                .collect();
            selecting.sort();
            ClusterSummary {
                kernel_claim: c.kernels.is_some(),
                kernels: c.kernels.clone().unwrap_or_default(),
                name: c.name.clone(),
                labels: c.labels.clone(),
                managed_cluster_modules: selecting,
            }
        })
        .collect();
    Json(ClusterList { items })
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// At most this many events (newest first).
    limit: Option<usize>,
    /// Only events about this object.
    name: Option<String>,
}

pub async fn list_events(
    State(state): State<AppState>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventList>, ApiError> {
    let Query(q) = q.map_err(|_| {
        ApiError::BadRequest("query parameters: `limit` (a number) and `name` are accepted".into())
    })?;
    let limit = q.limit.unwrap_or(RECENT_EVENTS);
    let items = state
        .fleet
        .caches
        .events
        .read()
        .map(|events| {
            events
                .iter()
                .rev()
                .filter(|e| q.name.as_ref().is_none_or(|n| &e.name == n))
                .take(limit)
                .map(|e| EventItem {
                    time: e.time.clone(),
                    kind: e.kind.clone(),
                    name: e.name.clone(),
                    type_: e.type_.clone(),
                    reason: e.reason.clone(),
                    message: e.message.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(EventList { items }))
}

/// A Kubernetes object name (DNS-1123 subdomain), checked before it is looked up or echoed.
fn is_object_name(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(ok_char)
        && alnum(name.chars().next())
        && alnum(name.chars().last())
}

/// One MCM's summary; `clusters` are all known clusters (for the selected count).
pub fn summary(mcm: &ManagedClusterModule, clusters: &[Arc<ClusterFacts>]) -> McmSummary {
    let status = mcm.status.clone().unwrap_or_default();
    let mut images = ImageCounts {
        total: (status.images.len() + usize::try_from(status.images_omitted).unwrap_or(0)) as u32,
        omitted: u32::try_from(status.images_omitted).unwrap_or(0),
        ..Default::default()
    };
    for i in &status.images {
        let n = match i.state {
            ImageState::Ready => &mut images.ready,
            ImageState::Pending => &mut images.pending,
            ImageState::Building => &mut images.building,
            ImageState::Signing => &mut images.signing,
            ImageState::Missing => &mut images.missing,
            ImageState::Failed => &mut images.failed,
        };
        *n += 1;
    }
    McmSummary {
        name: mcm.name_any(),
        generation: mcm.metadata.generation,
        observed_generation: status.observed_generation,
        deleting: mcm.metadata.deletion_timestamp.is_some(),
        spoke_namespace: mcm.spec.spoke_namespace.clone(),
        selector: mcm.spec.selector.clone(),
        counts: Counts {
            selected: clusters
                .iter()
                .filter(|c| selects(&mcm.spec.selector, &c.labels))
                .count() as u32,
            desired: status.number_desired,
            applied: status.number_applied,
            available: status.number_available,
            degraded: status.number_degraded,
        },
        conditions: status.conditions,
        images,
        rollout: status.rollout,
    }
}

/// One MCM in detail: every selected cluster (and every cluster that still has a work),
/// with the last reconcile's per-kernel decisions and the work's reported state.
pub fn detail(
    mcm: &ManagedClusterModule,
    view: Option<McmView>,
    works: &Works,
    clusters: &[Arc<ClusterFacts>],
) -> McmDetail {
    let selected: BTreeSet<&str> = clusters
        .iter()
        .filter(|c| selects(&mcm.spec.selector, &c.labels))
        .map(|c| c.name.as_str())
        .collect();
    let reconciled = view.is_some();
    let (views, image_plan, last_error) = match view {
        Some(v) => (
            v.clusters
                .into_iter()
                .map(|c| (c.name.clone(), c))
                .collect::<BTreeMap<_, _>>(),
            v.images,
            v.last_error,
        ),
        None => (BTreeMap::new(), Vec::new(), None),
    };
    let names: BTreeSet<&str> = selected
        .iter()
        .copied()
        .chain(views.keys().map(String::as_str))
        .chain(works.keys().map(String::as_str))
        .collect();
    let rollouts = names
        .into_iter()
        .map(|name| {
            let view = views.get(name);
            let work = works.get(name);
            let problem = view.and_then(|v| v.problem.as_ref()).map(|p| Problem {
                reason: p.reason.clone(),
                message: p.message.clone(),
            });
            let is_selected = selected.contains(name);
            let phase = match (work, view) {
                _ if !is_selected => Phase::Removing,
                (Some(w), _) if w.deleting => Phase::Removing,
                (Some(w), _) if w.degraded => Phase::Degraded,
                (Some(w), _) if w.module_available() => Phase::Available,
                _ if problem.is_some() => Phase::Waiting,
                (None, None) => Phase::Pending,
                _ => Phase::Progressing,
            };
            ClusterRollout {
                name: name.to_string(),
                selected: is_selected,
                phase,
                kernels: view
                    .map(|v| {
                        v.kernels
                            .iter()
                            .map(|k| KernelRollout {
                                kernel: k.kernel.clone(),
                                image: k.image.clone(),
                                digest: k
                                    .pinned
                                    .as_deref()
                                    .and_then(|p| p.rsplit_once('@'))
                                    .map(|(_, d)| d.to_string()),
                                pinned_image: k.pinned.clone(),
                                state: k.state,
                                reason: k.reason.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                unmapped_kernels: view.map(|v| v.unmapped_kernels.clone()).unwrap_or_default(),
                problem,
                rollout_state: view
                    .and_then(|v| v.rollout.as_deref())
                    .and_then(RolloutState::parse),
                work: work.map(|w| work_status(w)),
            }
        })
        .collect();
    McmDetail {
        summary: summary(mcm, clusters),
        reconciled,
        last_error,
        image_plan,
        clusters: rollouts,
    }
}

fn work_status(w: &WorkEntry) -> WorkStatus {
    let numbers = |prefix: &str| {
        let get = |field: &str| w.feedback.get(&format!("{prefix}.{field}")).copied();
        let n = PodNumbers {
            nodes_matching: get("nodesMatchingSelectorNumber"),
            desired: get("desiredNumber"),
            available: get("availableNumber"),
        };
        (n != PodNumbers::default()).then_some(n)
    };
    WorkStatus {
        applied: w.applied,
        available: w.available,
        degraded: w.degraded,
        module_available: w.module_available(),
        deleting: w.deleting,
        conditions: w.conditions.clone(),
        feedback: Feedback {
            module_loader: numbers("moduleLoader"),
            device_plugin: numbers("devicePlugin"),
            dra: numbers("dra"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::is_object_name;

    #[test]
    fn object_names() {
        for ok in ["a", "kmm-ci-a", "a.b-c", "0abc"] {
            assert!(is_object_name(ok), "{ok}");
        }
        let long = "a".repeat(254);
        for bad in ["", "A", "-a", "a-", "a_b", "a b", "ä", long.as_str()] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }
}
