//! One fan-out size: a fresh hub fleet with N clusters; the API server's plain create rate
//! (before and after), a plain server-side-apply rate, the hub's fan-out of one MCM; then one
//! cluster's kernel change, and a restart with a short resync that must write nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt as _};
use shared_api::ManagedCluster;
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::module::TlsOptions;
use shared_api::ocm::ManifestWork;

use crate::results::{Cpu, FanOut, Memory, Rate, Resync, Steady};
use crate::world::{
    HubBin, HubWorld, MCM, Samples, apiserver_writes, claim_status, cluster_name, cpu_seconds,
    delta, kernels_of, memory_mib, rss_parts_mib,
};

/// A resync short enough to see two of them in a few seconds.
const SHORT_RESYNC: &str = "5s";
const FANOUT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// POST, as a plain client creates objects.
    Create,
    /// Server-side apply (PATCH application/apply-patch+yaml), as the hub writes.
    Apply,
}

pub struct Config<'a> {
    pub hub_bin: &'a Path,
    pub write_concurrency: usize,
    pub logs: &'a Path,
}

pub async fn run(n: usize, cfg: &Config<'_>) -> anyhow::Result<FanOut> {
    eprintln!("kmm-bench: fan-out over {n} clusters: starting a hub fleet");
    let world = HubWorld::start().await?;
    let result = measure(&world, n, cfg).await;
    world.stop().await;
    result
}

async fn measure(world: &HubWorld, n: usize, cfg: &Config<'_>) -> anyhow::Result<FanOut> {
    let client = world.client.clone();
    let setup = world.create_clusters(n).await?;
    eprintln!(
        "kmm-bench: {n} namespaces, ManagedClusters and claims in {:.1} s",
        setup.as_secs_f64()
    );

    let log = cfg.logs.join(format!("hub-{n}.log"));
    let (mut hub, hub_ready) = HubBin::start(
        cfg.hub_bin,
        &world.kubeconfig(),
        "10m",
        cfg.write_concurrency,
        &log,
    )
    .await?;
    let idle = memory_mib(hub.pid());

    // Bodies equal to what the hub will write (rendered by the hub's own function).
    let local_mcm = world.mcm()?;
    let render = |i: usize, name: &str| -> anyhow::Result<ManifestWork> {
        let mappings: Vec<kmm_hub::render::ReadyMapping> = kernels_of(i, &world.kernels)
            .into_iter()
            .map(|k| kmm_hub::render::ReadyMapping {
                pinned_image: kmm_hub::render::pin(&world.image(&k), &world.digests[&k]),
                kernel: k,
                registry_tls: TlsOptions::default(),
                in_tree_modules_to_remove: Vec::new(),
            })
            .collect();
        let mut w = kmm_hub::render::render_manifestwork(&local_mcm, &cluster_name(i), &mappings)
            .map_err(|e| anyhow::anyhow!("rendering: {e}"))?;
        w.metadata.name = Some(name.to_string());
        w.metadata.labels = Some(BTreeMap::from([(
            "kmm-bench/baseline".to_string(),
            name.to_string(),
        )]));
        Ok(w)
    };
    let bodies = |name: &str| -> anyhow::Result<Vec<ManifestWork>> {
        (0..n).map(|i| render(i, name)).collect()
    };

    // Warm both write paths of the ManifestWork type before timing anything.
    let warm: Vec<ManifestWork> = (0..cfg.write_concurrency)
        .map(|i| {
            let mut w = render(i % n, &format!("bench-warm-{i}"))?;
            w.metadata.namespace = Some(crate::world::HUB_NS.into());
            Ok(w)
        })
        .collect::<anyhow::Result<_>>()?;
    timed_writes(&client, warm.clone(), Mode::Create, cfg.write_concurrency).await?;
    let warm_apply: Vec<ManifestWork> = warm
        .into_iter()
        .map(|mut w| {
            w.metadata.name = Some(format!("{}-apply", w.name_any()));
            w
        })
        .collect();
    timed_writes(&client, warm_apply, Mode::Apply, cfg.write_concurrency).await?;

    let create_before = timed_writes(
        &client,
        bodies("bench-create-a")?,
        Mode::Create,
        cfg.write_concurrency,
    )
    .await?;
    eprintln!("kmm-bench: plain creates: {}", create_before.show());
    let apply_plain = timed_writes(
        &client,
        bodies("bench-apply")?,
        Mode::Apply,
        cfg.write_concurrency,
    )
    .await?;
    eprintln!(
        "kmm-bench: plain server-side applies: {}",
        apply_plain.show()
    );

    // The hub's fan-out: from applying the MCM until its N-th ManifestWork write.
    world.proxy.reset();
    let m0 = hub.metrics().await?;
    let api0 = apiserver_writes(&client).await?;
    let cpu0 = cpu_now(world, &hub);
    let started = Instant::now();
    world.apply_mcm().await?;
    let mut first: Option<Duration> = None;
    let mut peak_rss = 0.0f64;
    let done = loop {
        let m = hub.metrics().await?;
        let written = m.works_written() - m0.works_written();
        if written > 0.0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if written >= n as f64 {
            break started.elapsed();
        }
        peak_rss = peak_rss.max(memory_mib(hub.pid()).0);
        if hub.exited() {
            bail!("kmm-hub exited during the fan-out: {}", hub.log_tail());
        }
        if started.elapsed() > FANOUT_TIMEOUT {
            bail!("only {written} of {n} ManifestWorks written after {FANOUT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu1 = cpu_now(world, &hub);
    let first = first.unwrap_or(done);
    let hub_rate = Rate::of(n, done);
    eprintln!(
        "kmm-bench: hub fan-out: {} (first write after {:.2} s)",
        hub_rate.show(),
        first.as_secs_f64()
    );
    // Let the follow-up reconciles (status, own watch events) finish before counting.
    settle(&hub).await?;
    let m1 = hub.metrics().await?;
    let api1 = apiserver_writes(&client).await?;
    let registry_http = world.proxy.counts();

    // Every work is there, pinned, and byte-for-byte what the baselines wrote.
    let works = Api::<ManifestWork>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}={MCM}")))
        .await?;
    ensure!(
        works.items.len() == n,
        "{} ManifestWorks listed, expected {n}",
        works.items.len()
    );
    let sample = n / 2;
    let hub_work = works
        .items
        .iter()
        .find(|w| w.namespace().as_deref() == Some(cluster_name(sample).as_str()))
        .context("the sample cluster's work")?;
    let ours = render(sample, MCM)?;
    let hash = |w: &ManifestWork| {
        w.annotations()
            .get(shared_api::labels::SPEC_HASH_ANNOTATION)
            .cloned()
    };
    let identical_bodies = hash(hub_work) == hash(&ours) && hub_work.spec == ours.spec;

    let create_after = timed_writes(
        &client,
        bodies("bench-create-b")?,
        Mode::Create,
        cfg.write_concurrency,
    )
    .await?;
    eprintln!("kmm-bench: plain creates again: {}", create_after.show());
    let limit = create_before.per_second.max(create_after.per_second);

    let (rss, hwm) = memory_mib(hub.pid());
    let (anon, file) = rss_parts_mib(hub.pid());
    let steady = steady_state(world, &hub, n).await?;
    let fanout_memory = Memory {
        idle_mib: idle.0,
        peak_mib: hwm.max(peak_rss),
        after_mib: rss,
        after_anon_mib: anon,
        after_file_mib: file,
    };
    hub.stop().await;
    let resync = restart_and_resync(world, cfg, n).await?;

    let written = m1.works_written() - m0.works_written();
    let write_phase = Rate::of(n.saturating_sub(1), done.saturating_sub(first));
    Ok(FanOut {
        clusters: n,
        works: written as usize,
        setup_s: setup.as_secs_f64(),
        hub_ready_s: hub_ready.as_secs_f64(),
        hub: hub_rate.clone(),
        first_write_s: first.as_secs_f64(),
        write_phase,
        create_before,
        create_after,
        apply_plain: apply_plain.clone(),
        limit_per_second: limit,
        ratio: hub_rate.per_second / limit,
        ratio_vs_apply: hub_rate.per_second / apply_plain.per_second,
        registry_lookups: (m1.registry_lookups() - m0.registry_lookups()) as u64,
        registry_http_total: registry_http.values().sum(),
        registry_http,
        hub_writes: delta(&m0.writes_by_kind(), &m1.writes_by_kind()),
        apiserver_writes: delta(&api0, &api1),
        reconciles: (m1.ok_reconciles() - m0.ok_reconciles()) as u64,
        cpu: Cpu {
            hub_s: cpu1.0 - cpu0.0,
            apiserver_s: cpu1.1 - cpu0.1,
            etcd_s: cpu1.2 - cpu0.2,
        },
        identical_bodies,
        memory: fanout_memory,
        steady,
        resync,
    })
}

/// CPU seconds so far of (hub, kube-apiserver, etcd).
fn cpu_now(world: &HubWorld, hub: &HubBin) -> (f64, f64, f64) {
    (
        cpu_seconds(hub.pid()),
        world.apiserver_pid().map_or(0.0, cpu_seconds),
        world.etcd_pid().map_or(0.0, cpu_seconds),
    )
}

/// Wait until the hub has not reconciled for a second.
async fn settle(hub: &HubBin) -> anyhow::Result<()> {
    let total = |m: &Samples| {
        m.family("kmm_hub_reconcile_total")
            .values()
            .copied()
            .sum::<f64>()
    };
    let mut last = total(&hub.metrics().await?);
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = total(&hub.metrics().await?);
        if now == last || started.elapsed() > Duration::from_secs(60) {
            return Ok(());
        }
        last = now;
    }
}

/// N writes of the given bodies, `concurrency` in flight, as a plain client sends them.
pub async fn timed_writes(
    client: &Client,
    works: Vec<ManifestWork>,
    mode: Mode,
    concurrency: usize,
) -> anyhow::Result<Rate> {
    let n = works.len();
    let pp = PatchParams::apply("kmm-bench-baseline").force();
    let started = Instant::now();
    futures::stream::iter(works)
        .map(|w| {
            let pp = pp.clone();
            async move {
                let ns = w.namespace().unwrap_or_default();
                let api: Api<ManifestWork> = Api::namespaced(client.clone(), &ns);
                match mode {
                    Mode::Create => api.create(&PostParams::default(), &w).await.map(|_| ()),
                    Mode::Apply => api
                        .patch(&w.name_any(), &pp, &Patch::Apply(&w))
                        .await
                        .map(|_| ()),
                }
                .with_context(|| format!("writing {ns}/{}", w.name_any()))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(Rate::of(n, started.elapsed()))
}

/// One cluster's kernel claim changes: how long until its work is rewritten, and how many
/// writes that costs.
async fn steady_state(world: &HubWorld, hub: &HubBin, n: usize) -> anyhow::Result<Steady> {
    let client = &world.client;
    let i = n / 2;
    let cluster = cluster_name(i);
    let mut kernels = kernels_of(i, &world.kernels);
    // Replace the last kernel with one the cluster does not run (offset 1 is never used).
    let new_kernel = world.kernels[(i + 1) % world.kernels.len()].clone();
    kernels.pop();
    kernels.push(new_kernel.clone());
    kernels.sort();

    let works: Api<ManifestWork> = Api::namespaced(client.clone(), &cluster);
    let before_hash = works
        .get(MCM)
        .await?
        .annotations()
        .get(shared_api::labels::SPEC_HASH_ANNOTATION)
        .cloned();
    let mut stream = watcher::watcher(
        works.clone(),
        watcher::Config::default().fields(&format!("metadata.name={MCM}")),
    )
    .boxed();
    // Consume the initial listing first, so only the change is awaited below.
    loop {
        match stream.try_next().await? {
            Some(Event::InitDone) => break,
            Some(_) => {}
            None => bail!("watch ended"),
        }
    }
    settle(hub).await?;
    let m0 = hub.metrics().await?;
    let api0 = apiserver_writes(client).await?;
    let started = Instant::now();
    Api::<ManagedCluster>::all(client.clone())
        .patch_status(
            &cluster,
            &PatchParams::default(),
            &Patch::Merge(claim_status(&kernels)),
        )
        .await?;
    let latency = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(ev) = stream.try_next().await? {
            if let Event::Apply(w) = ev {
                let h = w
                    .annotations()
                    .get(shared_api::labels::SPEC_HASH_ANNOTATION)
                    .cloned();
                if h != before_hash {
                    let images = serde_json::to_string(&w.spec.workload)?;
                    ensure!(
                        images.contains(&new_kernel),
                        "the rewritten work lacks {new_kernel}"
                    );
                    return anyhow::Ok(started.elapsed());
                }
            }
        }
        bail!("watch ended")
    })
    .await
    .context("the work was not rewritten within 60 s")??;
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle(hub).await?;
    let m1 = hub.metrics().await?;
    let api1 = apiserver_writes(client).await?;
    let hub_writes = delta(&m0.writes_by_kind(), &m1.writes_by_kind());
    let mut api_writes = delta(&api0, &api1);
    // Ours (the claim) and the hub's lease renewals are not writes of the change.
    api_writes.remove("PATCH managedclusters/status");
    let lease_renewals = api_writes.remove("PUT leases").unwrap_or(0);
    eprintln!(
        "kmm-bench: kernel change on {cluster}: work rewritten after {:.0} ms, hub writes {hub_writes:?}",
        latency.as_secs_f64() * 1e3
    );
    Ok(Steady {
        cluster,
        latency_ms: latency.as_secs_f64() * 1e3,
        total_writes: hub_writes.values().sum(),
        hub_writes,
        apiserver_writes: api_writes,
        lease_renewals,
        reconciles: (m1.ok_reconciles() - m0.ok_reconciles()) as u64,
    })
}

/// A restarted hub with a short resync: what the restart writes, what resyncs write.
async fn restart_and_resync(
    world: &HubWorld,
    cfg: &Config<'_>,
    n: usize,
) -> anyhow::Result<Resync> {
    let log = cfg.logs.join(format!("hub-{n}-restart.log"));
    world.proxy.reset();
    let (hub, ready) = HubBin::start(
        cfg.hub_bin,
        &world.kubeconfig(),
        SHORT_RESYNC,
        cfg.write_concurrency,
        &log,
    )
    .await?;
    // The start-up reconcile.
    let started = Instant::now();
    loop {
        if hub.metrics().await?.ok_reconciles() >= 1.0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("no reconcile within 120 s of the restart");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&hub).await?;
    let m0 = hub.metrics().await?;
    let lookups0 = world.proxy.total();
    // Two resync periods and a half.
    tokio::time::sleep(Duration::from_millis(12_500)).await;
    let m1 = hub.metrics().await?;
    let resyncs = m1.ok_reconciles() - m0.ok_reconciles();
    let sum = |m: &Samples| m.get("kmm_hub_reconcile_duration_seconds_sum{controller=\"mcm\"}");
    let count = |m: &Samples| m.get("kmm_hub_reconcile_duration_seconds_count{controller=\"mcm\"}");
    let mean_ms = if count(&m1) > count(&m0) {
        (sum(&m1) - sum(&m0)) / (count(&m1) - count(&m0)) * 1e3
    } else {
        0.0
    };
    let (rss, hwm) = memory_mib(hub.pid());
    let (anon, file) = rss_parts_mib(hub.pid());
    let result = Resync {
        resync: SHORT_RESYNC.into(),
        restart_ready_s: ready.as_secs_f64(),
        restart_writes: m0.writes_by_kind().values().map(|v| *v as u64).sum(),
        resyncs: resyncs as u64,
        resync_writes: delta(&m0.writes_by_kind(), &m1.writes_by_kind())
            .values()
            .sum(),
        registry_lookups: (m1.registry_lookups() - m0.registry_lookups()) as u64,
        registry_http: world.proxy.total() - lookups0,
        noop_reconcile_ms: mean_ms,
        memory: Memory {
            idle_mib: 0.0,
            peak_mib: hwm,
            after_mib: rss,
            after_anon_mib: anon,
            after_file_mib: file,
        },
    };
    eprintln!(
        "kmm-bench: restart + {} resyncs of {SHORT_RESYNC}: {} writes at restart, {} during resyncs, {:.0} ms per no-op reconcile",
        result.resyncs, result.restart_writes, result.resync_writes, result.noop_reconcile_ms
    );
    hub.stop().await;
    Ok(result)
}
