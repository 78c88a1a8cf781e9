//! The agent's errors. Each has a short static category used as a metric label and in logs.

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

impl ReconcileError {
    /// A short, bounded label for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::ApplyDaemonSet { .. } => "apply-daemonset",
            ReconcileError::DeleteDaemonSet { .. } => "delete-daemonset",
            ReconcileError::NodeLabels { .. } => "node-labels",
            ReconcileError::Pod { .. } => "pod",
            ReconcileError::Status { .. } => "status",
            ReconcileError::Finalizer { .. } => "finalizer",
            ReconcileError::Claim { .. } => "cluster-claim",
            ReconcileError::Encode { .. } => "encode",
        }
    }
}

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the API server version: {0}")]
    ServerVersion(kube::Error),
    #[error(transparent)]
    Admin(#[from] shared_api::runtime::admin::AdminError),
}

impl AgentError {
    pub fn category(&self) -> &'static str {
        match self {
            AgentError::ServerVersion(_) => "server-version",
            AgentError::Admin(e) => e.category(),
        }
    }
}
