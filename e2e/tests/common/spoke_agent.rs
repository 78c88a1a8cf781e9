//! The spoke agent run in the test's process against a spoke (`spoke` and `kernel` binaries).
// Each test binary that includes this file uses a part of it.
#![allow(dead_code)]

use std::time::Duration;

use kmm_runtime::admin::Health;
use kmm_runtime::shutdown::CancellationToken;
use kmm_spoke::{Agent, AgentConfig};
use kube::Client;

/// The agent running in this process against the spoke.
pub struct RunningAgent {
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    pub health: Health,
}

impl RunningAgent {
    pub fn start(client: Client) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "kmm_spoke=info,shared_api=info".into()),
            )
            .try_init();
        let cfg = AgentConfig {
            resync: Duration::from_secs(60),
            identity: "kmm-spoke-e2e".into(),
            ..Default::default()
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let health = Health::new();
        let agent = Agent::new(client, cfg, &mut registry, &health);
        let token = CancellationToken::new();
        let t = token.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = agent.run(t).await {
                eprintln!("kmm-spoke agent failed: {e}");
            }
        });
        Self {
            token,
            task,
            health,
        }
    }

    pub async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
}
