//! What the last reconcile of each MCM decided, per cluster and kernel, kept for the
//! dashboard (which answers from memory, never from the API server).

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde::Serialize;
use shared_api::mcm::{ClusterProblem, ImageState, ImageStatus};
use shared_api::rollout::{RolloutPhase, RolloutStatus};

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KernelView {
    pub kernel: String,
    /// The image before pinning.
    pub image: String,
    /// What the cluster's ManifestWork carries (or will), pinned by digest.
    pub pinned: Option<String>,
    pub state: ImageState,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    pub kernels: Vec<KernelView>,
    pub unmapped_kernels: Vec<String>,
    pub problem: Option<ClusterProblem>,
    /// In a progressive rollout: `Updated`, `InProgress`, `Failed` or `Pending`.
    pub rollout: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McmView {
    pub name: String,
    pub clusters: Vec<ClusterView>,
    pub images: Vec<ImageStatus>,
    /// `status.rollout` as last decided (progressive rollouts only).
    pub rollout: Option<RolloutStatus>,
    pub last_error: Option<String>,
}

/// The progressive rollouts of every MCM, summed for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutTotals {
    pub updated: i64,
    pub in_progress: i64,
    pub failed: i64,
    pub pending: i64,
    pub progressing: i64,
    pub halted: i64,
    pub complete: i64,
}

#[derive(Debug, Default)]
pub struct Views(RwLock<BTreeMap<String, McmView>>);

impl Views {
    /// Store the view; returns whether it differs from the previous one. Never copied: a
    /// fleet's view is one entry per cluster.
    pub fn put(&self, v: McmView) -> bool {
        match self.0.write() {
            Ok(mut m) => {
                let changed = m.get(&v.name) != Some(&v);
                if changed {
                    m.insert(v.name.clone(), v);
                }
                changed
            }
            Err(_) => false,
        }
    }

    pub fn remove(&self, name: &str) {
        if let Ok(mut m) = self.0.write() {
            m.remove(name);
        }
    }

    /// The rollouts of every MCM, summed.
    pub fn rollouts(&self) -> RolloutTotals {
        let mut t = RolloutTotals::default();
        let Ok(m) = self.0.read() else {
            return t;
        };
        for r in m.values().filter_map(|v| v.rollout.as_ref()) {
            t.updated += i64::from(r.updated);
            t.in_progress += i64::from(r.in_progress);
            t.failed += i64::from(r.failed);
            t.pending += i64::from(r.pending);
            match r.phase {
                RolloutPhase::Progressing => t.progressing += 1,
                RolloutPhase::Halted => t.halted += 1,
                RolloutPhase::Complete => t.complete += 1,
            }
        }
        t
    }

    pub fn get(&self, name: &str) -> Option<McmView> {
        self.0.read().ok()?.get(name).cloned()
    }
}
