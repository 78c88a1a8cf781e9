//! Running scenarios: one sandbox per test, every scenario run, every failure reported.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::ensure;
use kmm_e2e::sandbox::progress::Progress;
use kmm_e2e::sandbox::{Sandbox, SandboxOptions};

/// Runs scenarios one after the other, keeps going after a failure, and reports them all.
#[derive(Default)]
pub(crate) struct Runner {
    results: Vec<(String, Duration, Result<(), String>)>,
}

impl Runner {
    pub(crate) async fn run(
        &mut self,
        name: &str,
        scenario: impl Future<Output = anyhow::Result<()>>,
    ) {
        let t = Instant::now();
        eprintln!("scenario {name}: running");
        let r = scenario.await.map_err(|e| format!("{e:#}"));
        let took = t.elapsed();
        match &r {
            Ok(()) => eprintln!("scenario {name}: ok ({took:.1?})"),
            Err(e) => eprintln!("scenario {name}: FAILED ({took:.1?}): {e}"),
        }
        self.results.push((name.to_string(), took, r));
    }

    pub(crate) fn finish(self) -> anyhow::Result<()> {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter_map(|(n, _, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
            .collect();
        eprintln!("scenario summary:");
        for (n, t, r) in &self.results {
            eprintln!(
                "  {:<6} {n} ({t:.1?})",
                if r.is_ok() { "ok" } else { "FAILED" }
            );
        }
        ensure!(
            failed.is_empty(),
            "{} scenario(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
        Ok(())
    }
}

/// Start a sandbox, run `body`, print what the fleet looks like when it fails, stop.
pub(crate) async fn with_sandbox(
    opts: SandboxOptions,
    body: impl AsyncFnOnce(&mut Sandbox, &Progress) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "error,kube_client=off".into()),
        )
        .try_init();
    let progress = Progress::plain(8);
    let t = Instant::now();
    let mut sb = Sandbox::start(opts, &progress).await?;
    eprintln!("sandbox started in {:.1?}", t.elapsed());
    let outcome = body(&mut sb, &progress).await;
    if let Err(e) = &outcome {
        eprintln!("sandbox test failed: {e:#}\n{}", sb.dump().await);
    }
    sb.stop().await;
    outcome
}
