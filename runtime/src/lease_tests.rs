use super::*;
use crate::admin::Health;

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_campaign_opens_its_gate_while_leading_and_is_lost_once_the_lease_goes() {
    let (tx, rx) = watch::channel(false);
    let health = Health::new();
    let token = CancellationToken::new();
    let c = Campaign::follow(Leadership { rx }, Some(health.gate("lease")), token.clone());
    settle().await;
    assert!(!health.is_ready() && !c.is_lost(), "not leading yet");
    tx.send_replace(true);
    assert!(c.wait_to_lead(&token).await);
    settle().await;
    assert!(health.is_ready(), "leading: the gate is open");
    tx.send_replace(false);
    tokio::time::timeout(Duration::from_secs(5), c.lost())
        .await
        .unwrap();
    assert!(c.is_lost());
    settle().await;
    assert!(!health.is_ready(), "lost: the gate is closed");
    tx.send_replace(true);
    settle().await;
    assert!(c.is_lost(), "a lost campaign stays lost");
}

#[tokio::test]
async fn stepping_down_for_shutdown_is_not_a_loss() {
    let (tx, rx) = watch::channel(true);
    let token = CancellationToken::new();
    let c = Campaign::follow(Leadership { rx }, None, token.clone());
    settle().await;
    token.cancel();
    settle().await;
    tx.send_replace(false);
    settle().await;
    assert!(!c.is_lost(), "stepping down for shutdown is not a loss");
}
