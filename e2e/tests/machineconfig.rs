//! `kmm-hub machineconfig` against the real MachineConfig and MachineConfigPool CRDs of
//! OpenShift's API module (provisioned by `e2e/provision/provision.sh`): the CRDs are installed
//! on a test-world API server, and every printed object is applied with a server-side dry run
//! and strict field validation. A broken object must be refused, so the check can fail.
//!
//! The load and pull scripts run on a real-kernel node in `e2e/tests/kernel/day1.rs`.

use anyhow::{Context as _, bail, ensure};
use clap::Parser as _;
use kmm_e2e::fleet::Fleet;
use kmm_hub::cli::{Cli, Command};
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde::Deserialize as _;
use serde_json::{Value, json};

const GROUP: &str = "machineconfiguration.openshift.io";
const MANAGER: &str = "kmm-e2e-machineconfig";

fn resource(kind: &str) -> anyhow::Result<ApiResource> {
    let plural = match kind {
        "MachineConfig" => "machineconfigs",
        "MachineConfigPool" => "machineconfigpools",
        other => bail!("unexpected kind {other}"),
    };
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1", kind),
        plural,
    ))
}

/// What `kmm-hub machineconfig ARGS` prints, read back as objects.
fn printed(args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["kmm-hub", "machineconfig"];
    all.extend_from_slice(args);
    let Command::Machineconfig(a) = Cli::try_parse_from(&all)?.command else {
        bail!("{all:?} is not the machineconfig command");
    };
    let mut out = Vec::new();
    kmm_hub::commands::machineconfig::run(&a, &mut out)?;
    let text = String::from_utf8(out)?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).with_context(|| text.clone()))
        .collect()
}

/// How an object is sent; both with `dryRun=All`, so the API server runs the CRD's schema
/// (and pruning) and stores nothing.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Server-side apply with strict field validation (unknown fields refused).
    Apply,
    /// A plain create: schema errors come back as 422 Invalid with field paths (server-side
    /// apply reports type mismatches as a 500 from building its typed patch instead).
    Create,
}

async fn dry_run(client: &Client, object: &Value, via: Via) -> Result<(), kube::Error> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let ar = resource(kind).map_err(|e| kube::Error::Service(e.into()))?;
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let back = match via {
        Via::Apply => {
            let pp = PatchParams::apply(MANAGER).dry_run().validation_strict();
            api.patch(name, &pp, &Patch::Apply(object)).await?
        }
        Via::Create => {
            let typed: DynamicObject =
                serde_json::from_value(object.clone()).map_err(kube::Error::SerdeError)?;
            let pp = PostParams {
                dry_run: true,
                field_manager: Some(MANAGER.into()),
            };
            api.create(&pp, &typed).await?
        }
    };
    // Nothing pruned: what the server would store is what we printed.
    let stored = serde_json::to_value(&back).map_err(kube::Error::SerdeError)?;
    if stored["spec"] != object["spec"] {
        return Err(kube::Error::Service(
            format!(
                "{kind}/{name}: the server would store another spec:\n{}\nprinted:\n{}",
                stored["spec"], object["spec"]
            )
            .into(),
        ));
    }
    Ok(())
}

async fn install_machineconfig_crds(
    client: &Client,
    binaries: &kmm_e2e::provision::Binaries,
) -> anyhow::Result<()> {
    kmm_e2e::cluster::install_machineconfig_crds(client, binaries, MANAGER).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machineconfig_output_passes_the_real_crds_and_broken_objects_do_not() -> anyhow::Result<()>
{
    let binaries = kmm_e2e::provision::ensure_provisioned()?;
    Fleet::builder()
        .spokes(0)
        .hub_build_node(false)
        .simulators(false)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.hub().client().await;
            install_machineconfig_crds(&client, &binaries).await?;

            let image = "registry.example:5000/kmods/sfc:5.14.0-427.13.1.el9_4.x86_64";
            let cases: [(&str, Vec<&str>, &[&str]); 4] = [
                (
                    "module",
                    vec![
                        "--name",
                        "99-sfc-day1",
                        "--pool",
                        "sfc",
                        "--image",
                        image,
                        "--module",
                        "sfc",
                    ],
                    &["MachineConfig"],
                ),
                (
                    "in-tree module",
                    vec![
                        "--name",
                        "99-sfc-day1-intree",
                        "--pool",
                        "worker",
                        "--image",
                        image,
                        "--module",
                        "sfc",
                        "--in-tree-module",
                        "sfc_legacy",
                    ],
                    &["MachineConfig"],
                ),
                (
                    "with pool",
                    vec![
                        "--name",
                        "99-sfc-day1-pool",
                        "--pool",
                        "sfc",
                        "--image",
                        image,
                        "--module",
                        "sfc",
                        "--with-pool",
                    ],
                    &["MachineConfigPool", "MachineConfig"],
                ),
                (
                    "firmware",
                    vec![
                        "--name",
                        "99-worker-firmware",
                        "--pool",
                        "worker",
                        "--firmware-path",
                        "/var/lib/firmware",
                    ],
                    &["MachineConfig"],
                ),
            ];
            let mut printed_mc = None;
            for (case, args, kinds) in cases {
                let objects = printed(&args).with_context(|| format!("{case}: {args:?}"))?;
                let got: Vec<&str> = objects
                    .iter()
                    .map(|o| o["kind"].as_str().unwrap_or_default())
                    .collect();
                ensure!(
                    got == kinds,
                    "{case}: printed kinds {got:?}, want {kinds:?}"
                );
                for o in &objects {
                    for via in [Via::Apply, Via::Create] {
                        dry_run(&client, o, via).await.with_context(|| {
                            format!(
                                "{case}: the API server refused {} {} ({via:?}):\n{}",
                                o["kind"],
                                o["metadata"]["name"],
                                serde_yaml::to_string(o).unwrap_or_default()
                            )
                        })?;
                    }
                    eprintln!(
                        "{case}: {} {} accepted (dry run)",
                        o["kind"], o["metadata"]["name"]
                    );
                }
                if case == "module" {
                    printed_mc = objects.into_iter().next();
                }
            }
            // A dry run stores nothing.
            for kind in ["MachineConfig", "MachineConfigPool"] {
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource(kind)?);
                let left = api.list(&Default::default()).await?;
                ensure!(left.items.is_empty(), "{kind}: {} stored", left.items.len());
            }

            // Broken objects are refused: the schema's types, required fields and strict
            // validation of unknown fields all apply.
            let mc = printed_mc.context("no module MachineConfig")?;
            let mut broken = Vec::new();
            let mut wrong_type = mc.clone();
            wrong_type["spec"]["kernelArguments"] = json!("firmware_class.path=/var/lib/firmware");
            broken.push(("kernelArguments as a string", wrong_type, Via::Create));
            let mut config_not_object = mc.clone();
            config_not_object["spec"]["config"] = json!("ignition 3.2.0");
            broken.push(("spec.config as a string", config_not_object, Via::Create));
            let mut unknown = mc.clone();
            unknown["spec"]["kernelArgs"] = json!(["quiet"]);
            broken.push(("kernelArgs (an unknown field)", unknown, Via::Apply));
            let mut pool = printed(&[
                "--name",
                "x",
                "--pool",
                "sfc",
                "--firmware-path",
                "/f",
                "--with-pool",
            ])?
            .into_iter()
            .next()
            .context("no pool")?;
            pool["spec"]["machineConfigSelector"]["matchExpressions"][0]
                .as_object_mut()
                .context("matchExpressions[0]")?
                .remove("operator");
            broken.push(("operator missing from the pool's selector", pool, Via::Create));
            // Server-side apply answers a field its typed schema lacks with a 500 "failed to
            // create typed patch object"; a create answers schema errors with 422. Either way
            // the refusal must name the field.
            for (what, o, via) in &broken {
                let field = what.split(' ').next().unwrap_or_default().trim_start_matches("spec.");
                match dry_run(&client, o, *via).await {
                    Err(kube::Error::Api(s))
                        if matches!((via, s.code), (Via::Create, 422) | (Via::Apply, 400 | 422 | 500))
                            && s.message.contains(field) =>
                    {
                        eprintln!("{what}: refused ({}): {}", s.code, s.message);
                    }
                    other => bail!(
                        "{what}: want the API server to refuse it ({via:?}) naming {field:?}, got {other:?}"
                    ),
                }
            }

            // The CRD keeps `spec.config` opaque (x-kubernetes-preserve-unknown-fields): the API
            // server does not check Ignition itself, e.g. a numeric Ignition version passes.
            // The MCO checks it on the cluster; here the unit tests of the renderer do.
            let mut numeric_version = mc.clone();
            numeric_version["spec"]["config"]["ignition"]["version"] = json!(3.2);
            ensure!(
                dry_run(&client, &numeric_version, Via::Create)
                    .await
                    .is_ok(),
                "the MachineConfig CRD now validates spec.config: make this test expect a refusal"
            );
            Ok(())
        })
        .await
}
