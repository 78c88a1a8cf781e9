//! The reconciler's errors: typed, keeping their sources, each with a short static category
//! (metrics label `category` of `kmm_hub_reconcile_errors_total`).

use std::time::Duration;

/// A failed write of one ManifestWork (apply, delete or release).
#[derive(Debug, thiserror::Error)]
pub enum WorkWriteError {
    #[error("{cluster}/{name}: {source}")]
    Apply {
        cluster: String,
        name: String,
        source: kube::Error,
    },
    #[error("{cluster}/{name}: {source}")]
    Delete {
        cluster: String,
        name: String,
        source: kube::Error,
    },
    #[error("{cluster}/{name}: {source}")]
    ReleasePatch {
        cluster: String,
        name: String,
        source: serde_json::Error,
    },
    #[error("releasing {cluster}/{name}: {source}")]
    Release {
        cluster: String,
        name: String,
        source: kube::Error,
    },
}

impl kmm_runtime::ErrorCategory for WorkWriteError {
    fn category(&self) -> &'static str {
        match self {
            WorkWriteError::Apply { .. } => "manifestwork_apply",
            WorkWriteError::Delete { .. } => "manifestwork_delete",
            WorkWriteError::ReleasePatch { .. } | WorkWriteError::Release { .. } => {
                "manifestwork_release"
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("finalizer: waiting for {0} ManifestWork(s) to be deleted")]
    WorksRemaining(usize),
    #[error("{count} ManifestWork write(s) failed; first: {first}")]
    Writes {
        count: usize,
        #[source]
        first: WorkWriteError,
    },
    /// Images missing, failed or unreachable (not those being built or signed: waiting for
    /// those is a state, see `decide::status::Next`).
    #[error("images not ready: {}", .0.join(", "))]
    ImagesPending(Vec<String>),
    #[error(
        "waiting for {works} ManifestWork(s) to be deleted ({held} held until their Module is recorded)"
    )]
    DeletionHeld {
        works: usize,
        held: usize,
        /// When to look again (the release deadline, at most 30 s away).
        retry: Duration,
    },
}

impl Error {
    /// The first of several failed writes.
    pub fn writes(mut errors: Vec<WorkWriteError>) -> Option<Self> {
        let count = errors.len();
        (count > 0).then(|| Error::Writes {
            count,
            first: errors.swap_remove(0),
        })
    }
}

impl kmm_runtime::ErrorCategory for Error {
    /// A short static category for metrics and events.
    fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(_) | Error::WorksRemaining(_) => "finalizer",
            Error::Writes { .. } => "manifestwork_write",
            Error::ImagesPending(_) => "images_pending",
            Error::DeletionHeld { .. } => "deletion_held",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_runtime::ErrorCategory as _;

    #[test]
    fn messages_and_categories_stay_as_documented() {
        let e = Error::ImagesPending(vec!["a".into(), "b".into()]);
        assert_eq!(e.to_string(), "images not ready: a, b");
        assert_eq!(e.category(), "images_pending");
        assert_eq!(
            Error::WorksRemaining(2).to_string(),
            "finalizer: waiting for 2 ManifestWork(s) to be deleted"
        );
        let patch = serde_json::from_str::<json_patch::Patch>("{").unwrap_err();
        let w = WorkWriteError::ReleasePatch {
            cluster: "c1".into(),
            name: "m".into(),
            source: patch,
        };
        assert!(w.to_string().starts_with("c1/m: "), "{w}");
        let e = Error::writes(vec![w]).unwrap();
        assert!(
            e.to_string()
                .starts_with("1 ManifestWork write(s) failed; first: c1/m: "),
            "{e}"
        );
        assert_eq!(e.category(), "manifestwork_write");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the source is kept"
        );
        assert!(Error::writes(vec![]).is_none());
    }
}
