//! What the last reconcile of each MCM decided, per cluster and kernel, kept for the
//! dashboard (which answers from memory, never from the API server).

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde::Serialize;
use shared_api::mcm::{ClusterProblem, ImageState, ImageStatus};

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
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McmView {
    pub name: String,
    pub clusters: Vec<ClusterView>,
    pub images: Vec<ImageStatus>,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
pub struct Views(RwLock<BTreeMap<String, McmView>>);

impl Views {
    /// Store the view; returns whether it differs from the previous one.
    pub fn put(&self, v: McmView) -> bool {
        match self.0.write() {
            Ok(mut m) => m.insert(v.name.clone(), v.clone()).as_ref() != Some(&v),
            Err(_) => false,
        }
    }

    pub fn remove(&self, name: &str) {
        if let Ok(mut m) = self.0.write() {
            m.remove(name);
        }
    }

    pub fn get(&self, name: &str) -> Option<McmView> {
        self.0.read().ok()?.get(name).cloned()
    }
}
