//! Day 0 through the hub (`spec.day0`, CoreOS layering as in seed 004): two OpenShift spokes
//! whose Machine Config Operator ConfigMap names the same stand-in RHCOS image publish it
//! through the spoke agent (ClusterClaim `os-image.kmm.node.kubernetes.io`); the hub reads
//! the image's kernel from its `ostree.linux` label, builds the seed's Dockerfile once through
//! the build simulator (`FROM ${DTK_IMAGE}` then `FROM ${RHCOS_IMAGE}`) and ships both a
//! MachineConfig whose `osImageURL` is the layered image pinned by digest; a plain spoke gets
//! the Module only. One spoke moving to another RHCOS image (another kernel) gets one new
//! build and a new `osImageURL` while the other keeps its image; an RHCOS image without the
//! kernel label is reported (`OSImageKernelUnknown`) and changes nothing shipped. The hub
//! signs the module inside the layered image (`spec.day0.sign`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{ImageConfig, push_image, tar_files};
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace, eventually};
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde_json::json;
use shared_api::ManagedCluster;
use shared_api::day0::{BASE_OS_IMAGE_KEY, MCO_NAMESPACE, OS_IMAGE_CLAIM, OS_IMAGE_URL_CONFIGMAP};
use shared_api::labels::MCM_OWNER_LABEL;
use shared_api::mcm::Day0Status;

use crate::builds::{openssl_keypair, put_dockerfile, put_secret};
use crate::setup::{apply_mcm, condition, mcm_status, prepare, works};
use crate::spoke_agent::RunningAgent;
use crate::{BUILD_NS, HUB_NS, PULL_SECRET, SPOKE_NS};

const K1: &str = "5.14.0-427.13.1.el9_4.x86_64";
const K2: &str = "5.14.0-427.40.1.el9_4.x86_64";
const NAME: &str = "simple-kmod";
const MC_NAME: &str = "99-worker-kmm-day0-simple-kmod";
const MANAGER: &str = "e2e-mco";
const DEADLINE: Duration = Duration::from_secs(240);

/// The seed's Dockerfile (004, CoreOS layering with the driver-toolkit), as written there.
const LAYERING_DOCKERFILE: &str = r#"ARG DTK_IMAGE
ARG RHCOS_IMAGE

FROM ${DTK_IMAGE} as builder
ARG KERNEL_VERSION

WORKDIR /build/

RUN git clone https://github.com/openshift-psap/simple-kmod.git

WORKDIR /build/simple-kmod

RUN make all install KVER=${KERNEL_VERSION}


FROM ${RHCOS_IMAGE}
ARG KERNEL_VERSION

COPY --from=builder /etc/driver-toolkit-release.json /etc/
COPY --from=builder /lib/modules/${KERNEL_VERSION}/*.ko /usr/lib/modules/${KERNEL_VERSION}/

# This is needed in order to autoload the module at boot time.
RUN depmod -a "${KERNEL_VERSION}" && echo simple_kmod > /etc/modules-load.d/simple_kmod.conf
"#;

fn mc_api(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("machineconfiguration.openshift.io", "v1", kind),
        plural,
    );
    Api::all_with(client.clone(), &ar)
}

/// A stand-in RHCOS image: an rpm-ostree-like tree for `kernel`, labelled with it (or not).
async fn push_rhcos(fleet: &Fleet, tag: &str, kernel: Option<&str>) -> anyhow::Result<String> {
    let k = kernel.unwrap_or("unknown");
    let files: BTreeMap<String, Vec<u8>> = [
        (format!("/usr/lib/modules/{k}/vmlinuz"), b"kernel".to_vec()),
        (format!("/usr/lib/modules/{k}/modules.dep"), Vec::new()),
        ("/etc/os-release".to_string(), b"ID=rhcos\n".to_vec()),
    ]
    .into();
    let mut config = ImageConfig::default();
    if let Some(k) = kernel {
        config.labels.insert("ostree.linux".into(), k.into());
    }
    let reference = format!("{}/ocp/rhcos:{tag}", fleet.registry().host());
    let digest = push_image(
        &fleet.registry().access(),
        &reference,
        &[tar_files(&files)?],
        &config,
        &BTreeMap::new(),
    )
    .await?;
    Ok(format!("{}/ocp/rhcos@{digest}", fleet.registry().host()))
}

/// The MCO's ConfigMap on a spoke, naming its RHCOS image.
async fn set_os_image(spoke: &Client, image: &str) -> anyhow::Result<()> {
    ensure_namespace(spoke, MCO_NAMESPACE).await?;
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": OS_IMAGE_URL_CONFIGMAP, "namespace": MCO_NAMESPACE},
        "data": {BASE_OS_IMAGE_KEY: image, "releaseVersion": "4.17.0"}});
    Api::<ConfigMap>::namespaced(spoke.clone(), MCO_NAMESPACE)
        .patch(
            OS_IMAGE_URL_CONFIGMAP,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(cm),
        )
        .await?;
    Ok(())
}

/// The Day-0 MachineConfig each work carries: cluster → osImageURL.
async fn shipped_urls(hub: &Client) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    Ok(works(hub, NAME)
        .await?
        .into_iter()
        .map(|(c, w)| {
            let url = w
                .spec
                .workload
                .manifests
                .iter()
                .find(|m| m.0["kind"] == "MachineConfig")
                .and_then(|m| m.0["spec"]["osImageURL"].as_str().map(str::to_string));
            (c, url)
        })
        .collect())
}

/// The build Jobs of the MCM and their `--build-arg`s.
async fn build_jobs(hub: &Client) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let jobs = Api::<Job>::namespaced(hub.clone(), BUILD_NS)
        .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}={NAME}")))
        .await?;
    Ok(jobs
        .items
        .iter()
        .map(|j| {
            let args = j
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .map(|p| {
                    p.containers
                        .iter()
                        .flat_map(|c| c.args.clone().unwrap_or_default())
                        .filter(|a| a.starts_with("--build-arg="))
                        .collect()
                })
                .unwrap_or_default();
            (j.metadata.name.clone().unwrap_or_default(), args)
        })
        .collect())
}

async fn day0_status(hub: &Client) -> anyhow::Result<Day0Status> {
    Ok(mcm_status(hub, NAME)
        .await?
        .status
        .and_then(|s| s.day0)
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn day0_layered_image_built_once_and_shipped_as_os_image_url() -> anyhow::Result<()> {
    let binaries = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    Fleet::builder()
        .spokes(3)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), K1)])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet, &[&[K1], &[K1], &[K1]]).await?;
            let hub = fleet.hub().client().await;
            let host = fleet.registry().host();
            let access = fleet.registry().access();

            // The images: a Driver Toolkit stand-in, RHCOS A (K1), B (K2), C (no label).
            let dtk = format!("{host}/openshift/driver-toolkit:v1");
            let dtk_files: BTreeMap<String, Vec<u8>> = [(
                "/etc/driver-toolkit-release.json".to_string(),
                br#"{"KERNEL_VERSION": "any"}"#.to_vec(),
            )]
            .into();
            kmm_e2e::oci::push_files(&access, &dtk, &dtk_files, &BTreeMap::new()).await?;
            let rhcos_a = push_rhcos(fleet, "a", Some(K1)).await?;
            let rhcos_b = push_rhcos(fleet, "b", Some(K2)).await?;
            let rhcos_c = push_rhcos(fleet, "c", None).await?;

            // Spokes 1 and 2 are OpenShift: MachineConfig API, a worker pool, the vendor
            // label, the MCO's ConfigMap and the spoke agent publishing the RHCOS image.
            let mut agents = Vec::new();
            for i in [1, 2] {
                let spoke = fleet.spoke(i).client().await;
                kmm_e2e::cluster::install_machineconfig_crds(&spoke, &binaries, MANAGER).await?;
                let pool = json!({
                    "apiVersion": "machineconfiguration.openshift.io/v1",
                    "kind": "MachineConfigPool",
                    "metadata": {"name": "worker"},
                    "spec": {"machineConfigSelector": {"matchLabels": {
                        "machineconfiguration.openshift.io/role": "worker"}}},
                });
                mc_api(&spoke, "MachineConfigPool", "machineconfigpools")
                    .patch("worker", &PatchParams::apply(MANAGER).force(), &Patch::Apply(&pool))
                    .await
                    .context("creating the worker pool")?;
                Api::<ManagedCluster>::all(hub.clone())
                    .patch(
                        &spoke_name(i),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"vendor": "OpenShift"}}})),
                    )
                    .await?;
                set_os_image(&spoke, &rhcos_a).await?;
                agents.push(RunningAgent::start(spoke));
            }
            for i in [1, 2] {
                eventually("the RHCOS image claim on the hub", DEADLINE, || async {
                    let mc = Api::<ManagedCluster>::all(hub.clone())
                        .get(&spoke_name(i))
                        .await?;
                    let got = mc.status.and_then(|s| s.os_image());
                    Ok(if got.as_deref() == Some(rhcos_a.as_str()) {
                        Ok(())
                    } else {
                        Err(format!("{OS_IMAGE_CLAIM}: {got:?}"))
                    })
                })
                .await?;
            }

            put_dockerfile(&hub, "coreos-layering", LAYERING_DOCKERFILE).await?;
            // The hub signs simple-kmod.ko inside the layered image.
            let keys = tempfile::tempdir()?;
            let (key, cert, der) = openssl_keypair(keys.path(), "kmm-day0-signing")?;
            put_secret(&hub, "day0-key", "key", &key).await?;
            put_secret(&hub, "day0-cert", "cert", &cert).await?;
            let config = fleet.dir().join("hub-config.yaml");
            std::fs::write(
                &config,
                format!("jobGcDelay: 10m\ndriverToolkit:\n  - kernel: '.*'\n    image: {dtk}\n"),
            )?;
            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(4);
            o.config = Some(config);
            let hub_proc = HubProcess::start(o)?;
            let layered_repo = format!("{host}/os/rhcos-simple-kmod");
            let m = serde_json::from_value(json!({
                "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
                "metadata": {"name": NAME},
                "spec": {"spokeNamespace": SPOKE_NS, "selector": {},
                    "moduleSpec": {"selector": {"node-role.kubernetes.io/worker": ""},
                        "imageRepoSecret": {"name": PULL_SECRET},
                        "devicePlugin": {"container": {"image": "public.sim.kmm-fleet.io/simple-device-plugin:1"}}},
                    "day0": {"machineConfigPool": "worker", "containerImage": layered_repo,
                        "build": {"dockerfileConfigMap": {"name": "coreos-layering"}},
                        "sign": {"keySecret": {"name": "day0-key"}, "certSecret": {"name": "day0-cert"},
                            "filesToSign": ["/usr/lib/modules/${KERNEL_FULL_VERSION}/simple-kmod.ko"]}}}
            }))?;
            apply_mcm(&hub, &m).await?;

            // Both OpenShift works carry the layered image pinned; the plain one none.
            let short_a = &rhcos_a.rsplit_once("sha256:").map(|(_, h)| h[..12].to_string()).unwrap_or_default();
            let tag_a = format!("{layered_repo}:{K1}-{short_a}");
            let urls = eventually("both OpenShift works carry the MachineConfig", DEADLINE, || async {
                let urls = shipped_urls(&hub).await?;
                Ok(if urls.len() == 3 && urls.values().filter(|u| u.is_some()).count() == 2 {
                    Ok(urls)
                } else {
                    Err(format!("{urls:?}; status {:?}", day0_status(&hub).await?))
                })
            })
            .await?;
            let digest_a = kmm_e2e::oci::manifest_digest(&access, &tag_a).await?;
            let pinned_a = format!("{layered_repo}@{digest_a}");
            assert_eq!(urls[&spoke_name(1)].as_deref(), Some(pinned_a.as_str()));
            assert_eq!(urls[&spoke_name(2)].as_deref(), Some(pinned_a.as_str()));
            assert_eq!(urls[&spoke_name(3)], None, "the plain spoke gets no MachineConfig");

            // Built exactly once for the fleet, with the seed's arguments.
            let jobs = build_jobs(&hub).await?;
            ensure!(jobs.len() == 1, "one build for two clusters: {jobs:?}");
            let args = jobs.values().next().cloned().unwrap_or_default();
            for want in [
                format!("--build-arg=RHCOS_IMAGE={rhcos_a}"),
                format!("--build-arg=DTK_IMAGE={dtk}"),
                format!("--build-arg=DTK_AUTO={dtk}"),
                format!("--build-arg=KERNEL_VERSION={K1}"),
            ] {
                ensure!(args.contains(&want), "{want} in {args:?}");
            }
            ensure!(
                hub_proc.metric("kmm_hub_builds_total{outcome=\"created\"}").await? == 1.0,
                "one build created"
            );

            // The layered image: the RHCOS tree plus the module and its autoload.
            let built = kmm_e2e::oci::pull_files(&access, &pinned_a).await?;
            for f in [
                format!("/usr/lib/modules/{K1}/simple-kmod.ko"),
                format!("/usr/lib/modules/{K1}/simple-procfs-kmod.ko"),
                format!("/usr/lib/modules/{K1}/vmlinuz"),
                "/etc/modules-load.d/simple_kmod.conf".to_string(),
                "/etc/driver-toolkit-release.json".to_string(),
            ] {
                ensure!(built.files.contains_key(&f), "{f} in {:?}", built.files.keys());
            }
            ensure!(
                built.files["/etc/modules-load.d/simple_kmod.conf"] == b"simple_kmod\n",
                "autoload file"
            );
            // Signed by the hub with the MCM's key (the other module was not asked for).
            let ko = &built.files[&format!("/usr/lib/modules/{K1}/simple-kmod.ko")];
            let (body, sig) =
                kmm_e2e::kmod::split_signature(ko).context("simple-kmod.ko is signed")?;
            kmm_e2e::sim::loader::verify_signature(body, &sig.signature, std::slice::from_ref(&der))
                .map_err(anyhow::Error::msg)?;
            ensure!(
                kmm_e2e::kmod::split_signature(
                    &built.files[&format!("/usr/lib/modules/{K1}/simple-procfs-kmod.ko")]
                )
                .is_none(),
                "only the files asked for are signed"
            );

            // Applied by the work agent on the spoke.
            let spoke1 = fleet.spoke(1).client().await;
            let mcs = mc_api(&spoke1, "MachineConfig", "machineconfigs");
            let mc = eventually("the MachineConfig on spoke 1", DEADLINE, || async {
                Ok(match mcs.get_opt(MC_NAME).await? {
                    Some(mc) => Ok(serde_json::to_value(mc)?),
                    None => Err("not there".to_string()),
                })
            })
            .await?;
            ensure!(mc["spec"]["osImageURL"] == pinned_a.as_str(), "{mc}");
            ensure!(
                mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"] == "worker",
                "{}",
                mc["metadata"]
            );
            let s = eventually("status.day0", DEADLINE, || async {
                let d = day0_status(&hub).await?;
                Ok(if d.shipped == 2 && d.not_open_shift == 1 && d.waiting == 0 {
                    Ok(d)
                } else {
                    Err(format!("{d:?}"))
                })
            })
            .await?;
            let c1 = s.clusters.iter().find(|c| c.name == spoke_name(1)).context("spoke 1")?;
            assert_eq!(c1.os_image.as_deref(), Some(rhcos_a.as_str()));
            assert_eq!(c1.kernel.as_deref(), Some(K1));
            assert_eq!(c1.image.as_deref(), Some(pinned_a.as_str()));
            assert_eq!(c1.machine_config.as_deref(), Some(MC_NAME));

            // Spoke 2 upgrades to RHCOS B (kernel K2): one new build, its MachineConfig moves,
            // spoke 1 keeps its image.
            set_os_image(&fleet.spoke(2).client().await, &rhcos_b).await?;
            let short_b = rhcos_b.rsplit_once("sha256:").map(|(_, h)| h[..12].to_string()).unwrap_or_default();
            let tag_b = format!("{layered_repo}:{K2}-{short_b}");
            let urls = eventually("spoke 2 moves to the image of RHCOS B", DEADLINE, || async {
                let urls = shipped_urls(&hub).await?;
                let want = kmm_e2e::oci::manifest_digest(&access, &tag_b)
                    .await
                    .ok()
                    .map(|d| format!("{layered_repo}@{d}"));
                let moved = want.is_some() && urls.get(&spoke_name(2)).cloned().flatten() == want;
                Ok(if moved {
                    Ok(urls)
                } else {
                    Err(format!("{urls:?}; status {:?}", day0_status(&hub).await?))
                })
            })
            .await?;
            assert_eq!(urls[&spoke_name(1)].as_deref(), Some(pinned_a.as_str()));
            let jobs = build_jobs(&hub).await?;
            ensure!(jobs.len() == 2, "one more build: {jobs:?}");
            ensure!(
                jobs.values().any(|a| a.contains(&format!("--build-arg=KERNEL_VERSION={K2}"))
                    && a.contains(&format!("--build-arg=RHCOS_IMAGE={rhcos_b}"))),
                "{jobs:?}"
            );

            // Spoke 1 moves to an RHCOS image without the kernel label: reported, nothing
            // built for it, and it keeps what it was shipped.
            set_os_image(&spoke1, &rhcos_c).await?;
            let d = eventually("OSImageKernelUnknown in status.day0", DEADLINE, || async {
                let d = day0_status(&hub).await?;
                let c1 = d.clusters.iter().find(|c| c.name == spoke_name(1)).cloned();
                Ok(match c1 {
                    Some(c) if c.reason.as_deref() == Some("OSImageKernelUnknown") => Ok(c),
                    other => Err(format!("{other:?}")),
                })
            })
            .await?;
            ensure!(
                d.message.as_deref().is_some_and(|m| m.contains(&rhcos_c)),
                "{d:?}"
            );
            assert_eq!(d.image.as_deref(), Some(pinned_a.as_str()), "kept");
            let ready = condition(&mcm_status(&hub, NAME).await?, "Ready");
            ensure!(
                ready.as_ref().is_some_and(|(s, _, m)| s == "False" && m.contains("Day-0")),
                "{ready:?}"
            );
            let urls = shipped_urls(&hub).await?;
            assert_eq!(urls[&spoke_name(1)].as_deref(), Some(pinned_a.as_str()));
            ensure!(build_jobs(&hub).await?.len() == 2, "nothing built for C");

            for a in agents {
                a.stop().await;
            }
            hub_proc.stop().await;
            Ok(())
        })
        .await
}
