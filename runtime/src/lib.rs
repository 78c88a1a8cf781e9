//! kmm-runtime: the small controller runtime shared by `kmm-hub` and `kmm-spoke`.
//!
//! - [`alloc`]: the allocator settings both binaries start with.
//! - [`runtime`]: the [`Runtime`] builder both binaries start with: admin server, readiness
//!   gates, lease, shutdown and TLS servers.
//! - [`admin`]: the admin HTTP server (`/livez`, `/readyz`, `/metrics`) and the readiness gates
//!   that keep `/readyz` unready until caches are synced (and the lease is held).
//! - [`lease`]: leader election on a `coordination.k8s.io/v1` Lease.
//! - [`tls`]: TLS servers whose certificates are reloaded when their files change.
//! - [`backoff`]: per-key exponential retry backoff with a cap.
//! - [`queue`]: a de-duplicating work queue with delayed requeues (one reconcile per key at a time).
//! - [`shutdown`]: graceful shutdown (first SIGTERM/SIGINT drains, the second aborts).
//! - [`telemetry`]: tracing initialisation.
//! - [`metrics`]: the shared per-controller reconcile metrics.
//! - [`error`]: [`ErrorCategory`], the short static category every error type names.
//! - [`cli`]: the run arguments both binaries flatten, one duration parser, one log format.
//! - [`upstream_config`]: upstream KMM's `controller_config.yaml`, mapped onto those arguments.
//! - [`gather`]: the support bundle both `must-gather` subcommands write (redacted objects,
//!   logs, events, a summary and the errors met on the way).
//!
//! Everything is generic over the resource kind and takes its dependencies (client, registry,
//! cancellation token) as arguments: no globals.

pub mod admin;
pub mod alloc;
pub mod backoff;
pub mod cli;
pub mod error;
pub mod gather;
pub mod lease;
pub mod metrics;
pub mod queue;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod upstream_config;

pub use error::ErrorCategory;
pub use runtime::{Runtime, RuntimeError};
