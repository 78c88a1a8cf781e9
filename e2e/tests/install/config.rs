//! Upstream KMM's operator configuration (`controller_config.yaml`) on both binaries.
//!
//! - The shipped ConfigMaps carry upstream's names and key, are mounted where the
//!   Deployments' `--upstream-config` points, and every key in them means something to its
//!   binary (none unknown, none ignored).
//! - The `kmm-spoke` binary, run with a file of upstream's keys against a real API server,
//!   serves its probes and metrics on the addresses from the file, takes its Lease name from
//!   it, renders loaders with its `worker.seLinuxType`, and names the unknown and ignored keys
//!   in its log while still starting.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::testkit::{ensure_namespace, eventually};
use kmm_runtime::upstream_config::{CONFIG_KEY, Loaded, Overlay};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use shared_api::Module;
use shared_api::labels::MODULE_NAME_LABEL;

use crate::manifests::{args, container, find, kustomize, s};
use crate::offline::volume_for;
use crate::spoke_agent::{http_status, spoke_binary};
use crate::{DEADLINE, K1, ONE_FLEET_AT_A_TIME};

/// The shipped file behind `--upstream-config=` of a Deployment, and its ConfigMap's name.
fn shipped(docs: &[Value], deployment: &str) -> anyhow::Result<(Vec<String>, String, String)> {
    let d = find(docs, "Deployment", deployment)?;
    let argv = args(container(d)?);
    let path = argv
        .iter()
        .find_map(|a| a.strip_prefix("--upstream-config="))
        .with_context(|| format!("{deployment}: no --upstream-config="))?;
    let (vol, key) = volume_for(d, path)?;
    let name = s(vol, "/configMap/name").to_string();
    let cm = find(docs, "ConfigMap", &name)?;
    let text = cm["data"][&key]
        .as_str()
        .with_context(|| format!("{name} has no key {key}"))?
        .to_string();
    ensure!(
        key == CONFIG_KEY,
        "{name}: key {key}, upstream reads {CONFIG_KEY}"
    );
    Ok((argv, name, text))
}

#[test]
fn shipped_upstream_configs_are_upstreams_shape_and_fully_used() -> anyhow::Result<()> {
    let hub = kustomize("hub")?;
    let (hub_args, name, text) = shipped(&hub, "kmm-hub")?;
    ensure!(
        name == "kmm-operator-hub-manager-config",
        "hub ConfigMap {name}"
    );
    let loaded = Loaded::parse(&name, &text)?;
    let cli = kmm_hub::cli::Cli::try_parse_from(std::iter::once("kmm-hub".into()).chain(hub_args))?;
    let kmm_hub::cli::Command::Run(mut run) = cli.command else {
        anyhow::bail!("the hub's args are not `run`")
    };
    let mut o = Overlay::new(&loaded, None);
    kmm_hub::cli::apply_loaded(&mut run, &loaded, &mut o)?;
    ensure!(o.not_applied().is_empty(), "hub: {:?}", o.not_applied());
    ensure!(run.common.leader_elect && run.common.lease_name == "kmm-hub.sigs.x-k8s.io");

    let spoke = kustomize("spoke")?;
    let (spoke_args, name, text) = shipped(&spoke, "kmm-spoke")?;
    ensure!(
        name == "kmm-operator-manager-config",
        "spoke ConfigMap {name}"
    );
    let loaded = Loaded::parse(&name, &text)?;
    let cli =
        kmm_spoke::cli::Cli::try_parse_from(std::iter::once("kmm-spoke".into()).chain(spoke_args))?;
    let kmm_spoke::cli::Command::Run(mut run) = cli.command else {
        anyhow::bail!("the spoke's args are not `run`")
    };
    let mut o = Overlay::new(&loaded, None);
    run.apply_loaded(&loaded, &mut o)?;
    ensure!(o.not_applied().is_empty(), "spoke: {:?}", o.not_applied());
    let settings = run.render.settings();
    ensure!(
        settings.loader_run_as_user == 0
            && settings.loader_selinux_type == "spc_t"
            && settings.firmware_host_path == "/var/lib/firmware",
        "the shipped worker settings are the defaults: {settings:?}"
    );
    Ok(())
}

const NS: &str = "kmm-config-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spoke_takes_its_settings_from_upstreams_config_file() -> anyhow::Result<()> {
    let bin = spoke_binary().await?;
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .spoke_nodes(1, vec![worker_node("n1", K1)])
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            ensure_namespace(&client, NS).await?;
            let probes = format!("127.0.0.1:{}", kmm_e2e::process::free_port()?);
            let metrics = format!("127.0.0.1:{}", kmm_e2e::process::free_port()?);
            let file = fleet.dir().join(CONFIG_KEY);
            std::fs::write(
                &file,
                format!(
                    "healthProbeBindAddress: {probes}\n\
                     metrics:\n  bindAddress: {metrics}\n  secureServing: true\n\
                     leaderElection:\n  enabled: true\n  resourceID: kmm-from-config\n\
                     worker:\n  seLinuxType: kmm_config_t\n\
                     notAnUpstreamKey: 1\n"
                ),
            )?;
            let log = fleet.dir().join("kmm-spoke-config.log");
            let out = std::fs::File::create(&log)?;
            let mut child = tokio::process::Command::new(&bin)
                .args(["run", "--config"])
                .arg(&file)
                .args(["--lease-namespace", NS, "--cluster-claims", "false"])
                .env_clear()
                .env("KUBECONFIG", fleet.spoke(1).kubeconfig_path())
                .env("POD_NAME", "kmm-spoke-config")
                .stdout(out.try_clone()?)
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let outcome = check(&client, &probes, &metrics).await;
            let _ = child.kill().await;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if outcome.is_err() {
                eprintln!("kmm-spoke log:\n{text}");
            }
            outcome?;
            for key in ["notAnUpstreamKey", "metrics.secureServing"] {
                ensure!(
                    text.lines().any(|l| l.contains("WARN") && l.contains(key)),
                    "no warning naming {key}:\n{text}"
                );
            }
            Ok(())
        })
        .await
}

async fn check(client: &kube::Client, probes: &str, metrics: &str) -> anyhow::Result<()> {
    // healthProbeBindAddress: the probes; metrics.bindAddress: the metrics.
    eventually(
        "ready on the probe address from the file",
        DEADLINE,
        async || {
            Ok(match http_status(probes, "/readyz").await {
                Ok(200) => Ok(()),
                Ok(code) => Err(format!("/readyz {code}")),
                Err(e) => Err(format!("{e:#}")),
            })
        },
    )
    .await?;
    let (code, body) = kmm_e2e::process::http_get(metrics, "/metrics").await?;
    ensure!(
        code == 200 && body.contains("kmm_spoke_"),
        "metrics on {metrics}: {code}\n{body}"
    );
    // leaderElection.resourceID: the Lease's name.
    let lease = Api::<Lease>::namespaced(client.clone(), NS)
        .get_opt("kmm-from-config")
        .await?;
    ensure!(lease.is_some(), "no Lease {NS}/kmm-from-config");
    // worker.seLinuxType: the loader containers.
    let module: Module = serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "cfg", "namespace": NS},
        "spec": {
            "selector": {"node-role.kubernetes.io/worker": ""},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{"regexp": "^.*$", "containerImage": "registry.invalid/kmm/cfg:1"}],
            }},
        },
    }))?;
    Api::<Module>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &module)
        .await?;
    let lp = ListParams::default().labels(&format!("{MODULE_NAME_LABEL}=cfg"));
    let types = eventually("a loader DaemonSet", Duration::from_secs(60), async || {
        let list = Api::<DaemonSet>::namespaced(client.clone(), NS)
            .list(&lp)
            .await?
            .items;
        let types: Vec<String> = list
            .iter()
            .filter_map(|d| d.spec.as_ref()?.template.spec.as_ref())
            .flat_map(|p| p.containers.iter())
            .filter_map(|c| {
                c.security_context
                    .as_ref()?
                    .se_linux_options
                    .as_ref()?
                    .type_
                    .clone()
            })
            .collect();
        Ok(if types.is_empty() {
            Err(format!("{} DaemonSets", list.len()))
        } else {
            Ok(types)
        })
    })
    .await?;
    ensure!(
        types.iter().all(|t| t == "kmm_config_t"),
        "loader SELinux types {types:?}"
    );
    Ok(())
}

const HUB_CONFIG_NS: &str = "kmm-hub-config-test";

/// The `kmm-hub` binary, run with a file of upstream's hub keys against a real hub API server:
/// probes and metrics on the addresses from the file, its Lease named by
/// `leaderElection.resourceID`, `job.gcDelay` taken (no warning), and the unknown key named
/// in its log while it still starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_takes_its_settings_from_upstreams_config_file() -> anyhow::Result<()> {
    let bin = crate::spoke_agent::hub_binary().await?;
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.hub().client().await;
            ensure_namespace(&client, HUB_CONFIG_NS).await?;
            let probes = format!("127.0.0.1:{}", kmm_e2e::process::free_port()?);
            let metrics = format!("127.0.0.1:{}", kmm_e2e::process::free_port()?);
            let file = fleet.dir().join(format!("hub-{CONFIG_KEY}"));
            std::fs::write(
                &file,
                format!(
                    "healthProbeBindAddress: {probes}\n\
                     metrics:\n  bindAddress: {metrics}\n\
                     leaderElection:\n  enabled: true\n  resourceID: kmm-hub-from-config\n\
                     job:\n  gcDelay: 1h\n\
                     notAHubKey: true\n"
                ),
            )?;
            let log = fleet.dir().join("kmm-hub-config.log");
            let out = std::fs::File::create(&log)?;
            let mut child = tokio::process::Command::new(&bin)
                .args(["run", "--upstream-config"])
                .arg(&file)
                .args(["--operator-namespace", HUB_CONFIG_NS])
                .env_clear()
                .env("KUBECONFIG", fleet.hub().kubeconfig_path())
                .stdout(out.try_clone()?)
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let outcome = check_hub(&client, &probes, &metrics).await;
            let _ = child.kill().await;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if outcome.is_err() {
                eprintln!("kmm-hub log:\n{text}");
            }
            outcome?;
            ensure!(
                text.lines()
                    .any(|l| l.contains("WARN") && l.contains("notAHubKey")),
                "no warning naming notAHubKey:\n{text}"
            );
            ensure!(
                !text
                    .lines()
                    .any(|l| l.contains("WARN") && l.contains("job.gcDelay")),
                "job.gcDelay is a hub key, yet warned about:\n{text}"
            );
            Ok(())
        })
        .await
}

async fn check_hub(client: &kube::Client, probes: &str, metrics: &str) -> anyhow::Result<()> {
    eventually(
        "the hub ready on the probe address from the file",
        DEADLINE,
        async || {
            Ok(match http_status(probes, "/readyz").await {
                Ok(200) => Ok(()),
                Ok(code) => Err(format!("/readyz {code}")),
                Err(e) => Err(format!("{e:#}")),
            })
        },
    )
    .await?;
    let (code, body) = kmm_e2e::process::http_get(metrics, "/metrics").await?;
    ensure!(
        code == 200 && body.contains("kmm_hub_"),
        "metrics on {metrics}: {code}\n{body}"
    );
    let lease = eventually("the Lease named in the file", DEADLINE, async || {
        Ok(
            match Api::<Lease>::namespaced(client.clone(), HUB_CONFIG_NS)
                .get_opt("kmm-hub-from-config")
                .await?
            {
                Some(l) => Ok(l),
                None => Err(format!("no Lease {HUB_CONFIG_NS}/kmm-hub-from-config")),
            },
        )
    })
    .await?;
    ensure!(
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .is_some_and(|h| !h.is_empty()),
        "the hub holds no Lease"
    );
    Ok(())
}
