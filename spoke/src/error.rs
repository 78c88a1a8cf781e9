//! The agent's errors. Each has a short static category ([`ErrorCategory`]) used as a metric
//! label and in logs.

use kmm_runtime::ErrorCategory;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("applying DaemonSet {namespace}/{name}: {source}")]
    ApplyDaemonSet {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("deleting DaemonSet {namespace}/{name}: {source}")]
    DeleteDaemonSet {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("writing labels of node {node}: {source}")]
    NodeLabels { node: String, source: kube::Error },
    #[error("replacing or releasing loader pod {namespace}/{name}: {source}")]
    Pod {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("writing the status of Module {namespace}/{name}: {source}")]
    Status {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("updating the finalizer of Module {namespace}/{name}: {source}")]
    Finalizer {
        namespace: String,
        name: String,
        source: Box<kube::runtime::finalizer::Error<ReconcileError>>,
    },
    /// Deletion waits for the Module's pods to go (loaders unload in their preStop): a state,
    /// not a failure. It keeps the finalizer, and the reconcile comes back on pod events or
    /// after [`crate::controller::module::UNLOAD_RECHECK`].
    #[error("deletion of Module {namespace}/{name} waits for its pods to go")]
    StillUnloading { namespace: String, name: String },
    #[error("DeviceClass {name}: {source}")]
    DeviceClass { name: String, source: kube::Error },
    #[error("labelling namespace {namespace}: {source}")]
    NamespaceLabel {
        namespace: String,
        source: kube::Error,
    },
    #[error("ClusterClaim {name}: {source}")]
    Claim { name: String, source: kube::Error },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
}

impl ErrorCategory for ReconcileError {
    /// A short, bounded label for metrics and events.
    fn category(&self) -> &'static str {
        match self {
            ReconcileError::ApplyDaemonSet { .. } => "apply-daemonset",
            ReconcileError::DeleteDaemonSet { .. } => "delete-daemonset",
            ReconcileError::NodeLabels { .. } => "node-labels",
            ReconcileError::Pod { .. } => "pod",
            ReconcileError::Status { .. } => "status",
            ReconcileError::Finalizer { .. } => "finalizer",
            ReconcileError::StillUnloading { .. } => "waiting",
            ReconcileError::DeviceClass { .. } => "device-class",
            ReconcileError::NamespaceLabel { .. } => "namespace-label",
            ReconcileError::Claim { .. } => "cluster-claim",
            ReconcileError::Encode { .. } => "encode",
        }
    }
}

impl ReconcileError {
    /// A state the reconcile waits in rather than a failure: not counted as one in the
    /// metrics, and retried after its own delay instead of the growing backoff.
    pub fn is_waiting(&self) -> bool {
        matches!(self, ReconcileError::StillUnloading { .. })
    }
}

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the API server version: {0}")]
    ServerVersion(kube::Error),
    #[error(transparent)]
    Admin(#[from] kmm_runtime::admin::AdminError),
    /// The lease was lost: another replica may lead now, so this one stops (and exits
    /// non-zero, to restart and campaign afresh).
    #[error("lost leadership: another replica may lead now")]
    LostLease,
}

impl ErrorCategory for AgentError {
    fn category(&self) -> &'static str {
        match self {
            AgentError::ServerVersion(_) => "server-version",
            AgentError::Admin(e) => e.category(),
            AgentError::LostLease => "lost-lease",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_for_pods_to_unload_is_a_state_not_a_failure() {
        let waiting = ReconcileError::StillUnloading {
            namespace: "ns".into(),
            name: "m".into(),
        };
        assert!(waiting.is_waiting());
        assert_eq!(waiting.category(), "waiting");
        let failed = ReconcileError::Claim {
            name: "c".into(),
            source: kube::Error::LinesCodecMaxLineLengthExceeded,
        };
        assert!(!failed.is_waiting());
    }
}
