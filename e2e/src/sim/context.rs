//! What the node simulator's tasks share: the nodes with their kernels and VMs, the log, and
//! the hold rules. Its own module so that the node simulator ([`super::node`]) and the
//! kubelet tasks ([`super::pod`]) both depend on it and not on each other.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kube::Client;
use tokio::sync::{Notify, watch};

use super::SimNode;
use super::loader::NodeKernel;
use super::vmrun::{VmSlot, VmState};
use crate::vm::Vm;

/// What a kubelet task needs of its node.
pub(crate) type NodeHandles = (Arc<Mutex<NodeKernel>>, watch::Receiver<u64>, Option<VmSlot>);
const MAX_LOG_LINES: usize = 20_000;

pub(crate) struct NodeEntry {
    pub spec: SimNode,
    pub boot_id: String,
    pub kernel: Arc<Mutex<NodeKernel>>,
    pub reboot: watch::Sender<u64>,
    /// Real-kernel nodes: the VM (being booted, booted, or failed) and its directory.
    pub vm: Option<(watch::Sender<VmState>, Arc<tempfile::TempDir>)>,
}

/// State shared by the simulator's tasks.
pub(crate) struct Ctx {
    pub cluster: String,
    pub client: Client,
    pub nodes: Mutex<BTreeMap<String, NodeEntry>>,
    logs: Mutex<VecDeque<String>>,
    pub annotations_dirty: Notify,
    next_ip: AtomicU32,
    /// Pods carrying label `.0`=`.1` hold module `.2` on their node while they run.
    pub hold_rules: Mutex<Vec<(String, String, String)>>,
}

impl Ctx {
    pub fn new(cluster: &str, client: Client) -> Self {
        Self {
            cluster: cluster.to_string(),
            client,
            nodes: Mutex::new(BTreeMap::new()),
            logs: Mutex::new(VecDeque::new()),
            annotations_dirty: Notify::new(),
            next_ip: AtomicU32::new(0),
            hold_rules: Mutex::new(Vec::new()),
        }
    }

    pub fn log(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(cluster = %self.cluster, "{line}");
        let stamped = format!(
            "{} [{}] {line}",
            chrono::Utc::now().format("%H:%M:%S%.3f"),
            self.cluster
        );
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if logs.len() >= MAX_LOG_LINES {
            logs.pop_front();
        }
        logs.push_back(stamped);
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn pod_ip(&self) -> String {
        let n = self.next_ip.fetch_add(1, Ordering::Relaxed) + 2;
        format!("127.244.{}.{}", (n / 250) % 250, n % 250 + 1)
    }

    pub fn node_kernel(&self, node: &str) -> Option<NodeHandles> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.get(node).map(|n| {
            (
                n.kernel.clone(),
                n.reboot.subscribe(),
                n.vm.as_ref().map(|(tx, _)| tx.subscribe()),
            )
        })
    }

    /// The VMs of this simulator's real-kernel nodes that have booted.
    pub fn vms(&self) -> Vec<(String, Arc<Vm>)> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes
            .iter()
            .filter_map(|(name, n)| {
                let (tx, _) = n.vm.as_ref()?;
                let vm = tx.borrow().as_ref()?.as_ref().ok()?.clone();
                Some((name.clone(), vm))
            })
            .collect()
    }

    pub fn has_node(&self, node: &str) -> bool {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(node)
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}
