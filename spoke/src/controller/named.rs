//! Following one object by name: the Driver Toolkit ImageStream (`dtk.rs`) and the Machine
//! Config Operator's RHCOS image ConfigMap (`os_image.rs`) are both read this way.

use std::fmt::Debug;
use std::sync::RwLock;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kmm_runtime::queue::WorkQueue;
use kmm_runtime::shutdown::CancellationToken;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

/// Keep `slot` equal to `extract` of the object `name` of `api` (`None` while it does not
/// exist), waking `facts` on every change, until `token` is cancelled. With `relist`, the
/// watch is started afresh that often. `what` names the object in the log.
#[allow(clippy::too_many_arguments)]
pub async fn follow<K, V>(
    api: Api<K>,
    name: &str,
    what: &str,
    extract: impl Fn(&K) -> Option<V>,
    slot: &RwLock<Option<V>>,
    facts: &WorkQueue<()>,
    relist: Option<Duration>,
    token: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
    V: PartialEq + Debug,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let start = || {
        watcher::watcher(api.clone(), cfg.clone())
            .default_backoff()
            .boxed()
    };
    let mut stream = start();
    let mut relist =
        relist.map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    let mut listed: Option<V> = None;
    let set = |value: Option<V>| {
        let changed = slot
            .write()
            .map(|mut t| {
                let changed = *t != value;
                *t = value;
                changed
            })
            .unwrap_or(false);
        if changed {
            facts.add(());
        }
    };
    loop {
        let ev = tokio::select! {
            _ = token.cancelled() => return,
            _ = async { relist.as_mut()?.tick().await; Some(()) }, if relist.is_some() => {
                stream = start();
                continue;
            }
            ev = stream.try_next() => ev,
        };
        match ev {
            Ok(Some(Event::Init)) => listed = None,
            Ok(Some(Event::InitApply(o))) => listed = extract(&o),
            Ok(Some(Event::InitDone)) => set(listed.take()),
            Ok(Some(Event::Apply(o))) => {
                let v = extract(&o);
                tracing::info!(value = ?v, "{what} changed");
                set(v);
            }
            Ok(Some(Event::Delete(_))) => {
                tracing::info!("{what} deleted");
                set(None);
            }
            Ok(None) => return,
            // The watcher backs off by itself (capped); say it once per failure.
            Err(e) => tracing::warn!(error = %e, "{what} watch error"),
        }
    }
}
