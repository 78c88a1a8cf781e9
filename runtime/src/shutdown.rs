//! Graceful shutdown: the first SIGTERM or SIGINT cancels a [`CancellationToken`] so that
//! servers and controllers drain; a second signal aborts the process at once.

use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

/// The exit code used when a second signal aborts the process.
pub const ABORT_EXIT_CODE: i32 = 130;

/// Listen for SIGTERM/SIGINT in a background task. The returned token is cancelled on the
/// first signal; on the second the process exits with [`ABORT_EXIT_CODE`].
/// Must be called inside a tokio runtime.
pub fn install() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if wait_for_signal().await.is_err() {
            tracing::warn!("cannot listen for signals; shutdown only by stopping the process");
            return;
        }
        tracing::info!("shutdown signal received: draining (send another to abort)");
        t.cancel();
        if wait_for_signal().await.is_ok() {
            tracing::warn!("second shutdown signal: aborting");
            std::process::exit(ABORT_EXIT_CODE);
        }
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}

/// Wait for `task` to finish, at most `grace`; returns whether it finished in time.
pub async fn drain<F: std::future::Future>(task: F, grace: Duration) -> bool {
    tokio::time::timeout(grace, task).await.is_ok()
}
