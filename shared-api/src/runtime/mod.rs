//! The small controller runtime shared by `kmm-hub` and `kmm-spoke` (feature `runtime`).
//!
//! - [`admin`]: the admin HTTP server (`/livez`, `/readyz`, `/metrics`) and the readiness gates
//!   that keep `/readyz` unready until caches are synced (and the lease is held).
//! - [`lease`]: leader election on a `coordination.k8s.io/v1` Lease.
//! - [`backoff`]: per-key exponential retry backoff with a cap.
//! - [`queue`]: a de-duplicating work queue with delayed requeues (one reconcile per key at a time).
//! - [`shutdown`]: graceful shutdown (first SIGTERM/SIGINT drains, the second aborts).
//! - [`telemetry`]: tracing initialisation and per-controller reconcile metrics.
//!
//! Everything is generic over the resource kind and takes its dependencies (client, registry,
//! cancellation token) as arguments: no globals.

pub mod admin;
pub mod backoff;
pub mod lease;
pub mod queue;
pub mod shutdown;
pub mod telemetry;
