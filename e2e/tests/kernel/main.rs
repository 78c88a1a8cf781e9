//! Real kernels under the nodes: Debian's packaged kernel in qemu VMs (software emulation),
//! the project's real modules compiled against its headers, the real loader script with
//! kmod's `modprobe`, and Secure Boot through OVMF, shim and the MOK list.
//!
//! One fleet (or VM pair) per test, one test at a time: each VM takes a core while it boots.
#![allow(clippy::unwrap_used)]

#[path = "../common/spoke_agent.rs"]
mod spoke_agent;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{Node, Secret};
use kmm_e2e::fleet::Fleet;
use kmm_e2e::oci::{KmodImage, SignWith, push_kmod_image};
use kmm_e2e::sim::SimNode;
use kmm_e2e::vm::{Vm, VmSpec};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::Module;

use spoke_agent::RunningAgent;

const NS: &str = "labsv2";
const SPOKE: &str = "spoke-1";
const NODE: &str = "real-1";
const MANAGER: &str = "e2e-kernel";
const DEADLINE: Duration = Duration::from_secs(240);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "kmm_spoke=info,kmm_e2e=info".into()),
        )
        .try_init();
}

/// Poll `f` every half second until it returns `Ok(Ok(_))`, or fail after [`DEADLINE`].
async fn eventually<T>(
    what: &str,
    f: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    kmm_e2e::testkit::eventually_every(what, DEADLINE, Duration::from_millis(500), f).await
}

/// A key and self-signed certificate made with openssl, as a fleet admin makes one.
fn signing_pair(dir: &std::path::Path, cn: &str) -> (SignWith, Vec<u8>) {
    let key = dir.join(format!("{cn}.key"));
    let cert = dir.join(format!("{cn}.pem"));
    let der = dir.join(format!("{cn}.der"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = std::process::Command::new("openssl")
        .args(["x509", "-outform", "DER"])
        .arg("-in")
        .arg(&cert)
        .arg("-out")
        .arg(&der)
        .output()
        .unwrap();
    assert!(ok.status.success());
    (SignWith { key, cert }, std::fs::read(der).unwrap())
}

/// The VMs alone: a plain VM loads any module built for its kernel; a Secure Boot VM loads
/// only modules signed with the certificate enrolled in its MOK list, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_boot_vm_loads_only_what_its_mok_list_trusts() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    init_tracing();
    let bins = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    let release = bins.kernel.release.clone();
    let tmp = tempfile::tempdir()?;
    let (trusted, trusted_der) = signing_pair(tmp.path(), "kmm-fleet test signing key");
    let (foreign, _) = signing_pair(tmp.path(), "someone else");
    let plain_dir = tmp.path().join("plain");
    let sb_dir = tmp.path().join("sb");
    let plain_spec = VmSpec {
        name: "plain".into(),
        secure_boot: None,
    };
    let sb_spec = VmSpec {
        name: "secure".into(),
        secure_boot: Some(vec![trusted_der.clone()]),
    };
    let (plain, sb) = tokio::join!(
        Vm::boot(&bins, &plain_spec, &plain_dir),
        Vm::boot(&bins, &sb_spec, &sb_dir),
    );
    let (plain, sb) = (plain?, sb?);
    eprintln!(
        "booted: plain {:.1}s, Secure Boot {:.1}s; qemu RSS {} / {} MiB",
        plain.boot_time().as_secs_f32(),
        sb.boot_time().as_secs_f32(),
        plain.rss_bytes().unwrap_or(0) >> 20,
        sb.rss_bytes().unwrap_or(0) >> 20
    );
    assert_eq!(plain.release(), release);
    assert_eq!(sb.release(), release);

    let ko = kmm_e2e::kbuild::compile(&release, &["kmm_ci_a"], "1.0")?["kmm_ci_a"].clone();
    let signed = kmm_e2e::kmod::sign_with_sign_file(&ko, &trusted.key, &trusted.cert)?;
    let foreign_signed = kmm_e2e::kmod::sign_with_sign_file(&ko, &foreign.key, &foreign.cert)?;
    // What the hub ships: signed in-process by its own CMS code (RustCrypto), not sign-file.
    let hub_signer = kmm_hub::sign::Signer::from_pem_or_der(
        &std::fs::read(&trusted.key)?,
        &std::fs::read(&trusted.cert)?,
    )?;
    let mut hub_signed = Vec::new();
    for hash in [
        kmm_hub::sign::HashAlgorithm::Sha256,
        kmm_hub::sign::HashAlgorithm::Sha512,
    ] {
        hub_signed.push((
            format!("hub-{}.ko", hash.name()),
            kmm_hub::sign::module_sig::sign_module(&ko, &hub_signer, hash)?,
        ));
    }
    for vm in [&plain, &sb] {
        let d = vm.shared_dir();
        std::fs::write(d.join("unsigned.ko"), &ko)?;
        std::fs::write(d.join("signed.ko"), &signed)?;
        std::fs::write(d.join("foreign.ko"), &foreign_signed)?;
        for (f, data) in &hub_signed {
            std::fs::write(d.join(f), data)?;
        }
    }
    let try_load =
        |f: &str| format!("insmod /shared/{f} 2>&1; s=$?; rmmod kmm_ci_a 2>/dev/null; exit $s");
    // No Secure Boot: the kernel takes any module built for it (and taints itself).
    let out = plain.exec(&try_load("unsigned.ko")).await?;
    ensure!(
        out.status == 0,
        "plain VM refused an unsigned module: {}",
        out.output
    );
    let lockdown = sb.exec("cat /sys/kernel/security/lockdown").await?;
    ensure!(
        lockdown.output.contains("[integrity]") || lockdown.output.contains("[confidentiality]"),
        "the Secure Boot VM is not locked down: {}",
        lockdown.output
    );
    let out = sb.exec(&try_load("signed.ko")).await?;
    ensure!(
        out.status == 0,
        "the enrolled key's module was refused: {}",
        out.output
    );
    for (f, _) in &hub_signed {
        let out = sb.exec(&try_load(f)).await?;
        ensure!(
            out.status == 0,
            "the hub's signature ({f}) was refused: {}",
            out.output
        );
    }
    for f in ["unsigned.ko", "foreign.ko"] {
        let out = sb.exec(&try_load(f)).await?;
        ensure!(
            out.status != 0 && out.output.contains("Key was rejected by service"),
            "{f} on the Secure Boot VM: status {}, {}",
            out.status,
            out.output
        );
    }
    plain.shutdown().await;
    sb.shutdown().await;
    Ok(())
}

fn worker_labels(secure_boot: bool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (kmm_e2e::labs::WORKER_LABEL.to_string(), String::new()),
        (
            kmm_e2e::labs::SECURE_BOOT_LABEL.to_string(),
            secure_boot.to_string(),
        ),
    ])
}

/// Namespace, the labs' service account and the pull secret.
async fn prepare_namespace(fleet: &Fleet, client: &Client) -> anyhow::Result<()> {
    kmm_e2e::testkit::prepare_lab_namespace(client, fleet.registry(), MANAGER).await
}

/// A Module named `name` with `spec` (a ModuleSpec as JSON), applied server-side.
async fn apply_module(client: &Client, name: &str, spec: &serde_json::Value) -> anyhow::Result<()> {
    let body = json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1",
        "kind": "Module",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    });
    Api::<Module>::namespaced(client.clone(), NS)
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .with_context(|| format!("applying Module {name}"))?;
    Ok(())
}

/// Deletes a Module and waits until it is gone (its finalizer released).
async fn delete_module(client: &Client, name: &str) -> anyhow::Result<()> {
    let api = Api::<Module>::namespaced(client.clone(), NS);
    api.delete(name, &DeleteParams::default()).await?;
    eventually(&format!("Module {name} gone"), async || {
        Ok(match api.get_opt(name).await? {
            None => Ok(()),
            Some(m) => Err(format!("status {:?}", m.status)),
        })
    })
    .await
}

/// Waits until `pred` holds for the VM's loaded modules.
async fn wait_modules(
    vm: &Vm,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) -> anyhow::Result<Vec<String>> {
    eventually(what, async || {
        let m = vm.modules().await?;
        Ok(if pred(&m) {
            Ok(m)
        } else {
            Err(format!("{m:?}"))
        })
    })
    .await
}

/// The lines of the VM's kernel log that mention `word`.
async fn dmesg(vm: &Vm, word: &str) -> anyhow::Result<Vec<String>> {
    let out = vm.exec("dmesg").await?;
    Ok(out
        .output
        .lines()
        .filter(|l| l.contains(word))
        .map(str::to_string)
        .collect())
}

/// Whether the node carries a label of Module `name` that says it is loaded/ready.
async fn module_labels(client: &Client, node: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let n = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(n.labels()
        .keys()
        .filter(|k| shared_api::labels::is_module_node_label(k, NS, name))
        .cloned()
        .collect())
}

/// One fleet with one spoke whose nodes are `nodes`, the agent running, the labs' inputs
/// pushed, and the VMs booted.
async fn with_real_spoke(
    nodes: Vec<SimNode>,
    f: impl AsyncFnOnce(&Fleet, &Client, &[(String, std::sync::Arc<Vm>)]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    init_tracing();
    Fleet::builder()
        .spoke_nodes(1, nodes)
        .run(async |fleet: &mut Fleet| {
            let client = fleet.spoke(1).client().await;
            prepare_namespace(fleet, &client).await?;
            let t0 = Instant::now();
            let vms = fleet.node_sim(SPOKE).vms_booted().await?;
            for (n, vm) in &vms {
                eprintln!(
                    "node {n}: VM {} booted in {:.1}s (ready {:.1}s after the fleet); qemu RSS {} MiB",
                    vm.release(),
                    vm.boot_time().as_secs_f32(),
                    t0.elapsed().as_secs_f32(),
                    vm.rss_bytes().unwrap_or(0) >> 20
                );
            }
            let agent = RunningAgent::start(client.clone());
            let r = f(fleet, &client, &vms).await;
            if r.is_err() {
                for l in fleet.node_sim(SPOKE).logs().iter().rev().take(80).rev() {
                    eprintln!("  {l}");
                }
            }
            agent.stop().await;
            r
        })
        .await
}

fn real_kernel() -> String {
    kmm_e2e::testkit::real_kernel()
        .expect("the real-kernel nodes' kernel (provisioning unpacks it)")
}

/// The labs' prebuilt images and the device plugin, pushed for the real kernel.
async fn push_lab_images(fleet: &Fleet, sign: Option<SignWith>) -> anyhow::Result<()> {
    let access = fleet.registry().access();
    let host = fleet.registry().host();
    for img in kmm_e2e::labs::prebuilt_images() {
        let kernels: Vec<&str> = img.kernels.iter().map(String::as_str).collect();
        let mut k = KmodImage::new(&kernels, &img.modules);
        k.sign = sign.clone();
        push_kmod_image(&access, &format!("{host}/{}", img.path), &k).await?;
    }
    kmm_e2e::labs::push_device_plugin_image(
        &access,
        &format!("{host}/{}", kmm_e2e::labs::DEVICE_PLUGIN_IMAGE),
    )
    .await?;
    Ok(())
}

/// A lab's ModuleSpec for the spoke, with its `^.*\.x86_64$` mappings (el9 kernels) widened
/// to the real node's Debian kernel.
fn lab_spec(registry: &str, name: &str) -> serde_json::Value {
    let lab = kmm_e2e::labs::lab(registry, name).unwrap();
    let text = lab.mcm["spec"]["moduleSpec"]
        .to_string()
        .replace(r"^.*\\.x86_64$", "^.*$");
    serde_json::from_str(&text).unwrap()
}

/// The labs that use prebuilt images, one after the other on one real node (they all load
/// `kmm_ci_a`, and a real kernel has one of it): each loads with the real loader script and
/// kmod's modprobe, and unloads when its Module is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labs_load_and_unload_on_a_real_kernel() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut node = SimNode::real(NODE, worker_labels(false));
    node.in_tree_modules = vec!["joydev".into()];
    with_real_spoke(vec![node], async |fleet, client, vms| {
        let vm = &vms[0].1;
        let kernel = real_kernel();
        push_lab_images(fleet, None).await?;
        let registry = fleet.registry().host();
        ensure!(
            vm.modules().await? == vec!["joydev".to_string()],
            "joydev is loaded in-tree at boot"
        );
        let node = Api::<Node>::all(client.clone()).get(NODE).await?;
        assert_eq!(
            node.status.and_then(|s| s.node_info).map(|i| i.kernel_version),
            Some(kernel.clone()),
            "the Node reports the VM's uname -r"
        );

        // In-tree removal: joydev goes before kmm_ci_a loads.
        apply_module(client, "kmm-ci-a-in-tree", &lab_spec(&registry, "kmm-ci-a-in-tree")).await?;
        let m = wait_modules(vm, "kmm_ci_a loaded, joydev removed", |m| {
            m.iter().any(|x| x == "kmm_ci_a") && !m.iter().any(|x| x == "joydev")
        })
        .await?;
        eprintln!("in-tree lab: {m:?}");
        let version = vm.exec("cat /sys/module/kmm_ci_a/version").await?;
        ensure!(version.output.trim() == "1.0", "{}", version.output);
        delete_module(client, "kmm-ci-a-in-tree").await?;
        wait_modules(vm, "kmm_ci_a unloaded", |m| !m.iter().any(|x| x == "kmm_ci_a")).await?;

        // Load an existing image.
        apply_module(client, "kmm-ci-a-load", &lab_spec(&registry, "kmm-ci-a-load")).await?;
        wait_modules(vm, "kmm_ci_a loaded", |m| m.iter().any(|x| x == "kmm_ci_a")).await?;
        eventually("the node's ready label", async || {
            let l = module_labels(client, NODE, "kmm-ci-a-load").await?;
            Ok(if l.is_empty() { Err("none".into()) } else { Ok(()) })
        })
        .await?;
        delete_module(client, "kmm-ci-a-load").await?;
        wait_modules(vm, "kmm_ci_a unloaded", |m| !m.iter().any(|x| x == "kmm_ci_a")).await?;
        ensure!(
            module_labels(client, NODE, "kmm-ci-a-load").await?.is_empty(),
            "labels left after the unload"
        );

        // Soft dependencies: kmm_ci_b loads first and unloads last.
        apply_module(client, "kmm-ci-a-softdep", &lab_spec(&registry, "kmm-ci-a-softdep")).await?;
        wait_modules(vm, "kmm_ci_a and kmm_ci_b loaded", |m| {
            m.iter().any(|x| x == "kmm_ci_a") && m.iter().any(|x| x == "kmm_ci_b")
        })
        .await?;
        delete_module(client, "kmm-ci-a-softdep").await?;
        wait_modules(vm, "both unloaded", |m| {
            !m.iter().any(|x| x == "kmm_ci_a" || x == "kmm_ci_b")
        })
        .await?;
        let log = dmesg(vm, "World").await?;
        let pos = |needle: &str| log.iter().rposition(|l| l.contains(needle));
        let (b_in, a_in, a_out, b_out) = (
            pos("kmm_ci_b: Hello"),
            pos("kmm_ci_a: Hello"),
            pos("kmm_ci_a: Goodbye"),
            pos("kmm_ci_b: Goodbye"),
        );
        ensure!(
            b_in.is_some() && b_in < a_in && a_in < a_out && a_out < b_out,
            "order of the soft dependency in the kernel log: {log:#?}"
        );

        // Device plugin: runs next to the loader (and holds the module's device).
        apply_module(
            client,
            "kmm-ci-a-device-plugin",
            &lab_spec(&registry, "kmm-ci-a-device-plugin"),
        )
        .await?;
        wait_modules(vm, "kmm_ci_a loaded", |m| m.iter().any(|x| x == "kmm_ci_a")).await?;
        eventually("the device plugin holds /dev/kmm_ci_a", async || {
            let out = vm.exec("cat /sys/module/kmm_ci_a/refcnt").await?;
            Ok(if out.output.trim() == "1" { Ok(()) } else { Err(out.output) })
        })
        .await?;
        delete_module(client, "kmm-ci-a-device-plugin").await?;
        // The module may only be reported gone when the kernel has it no more.
        let m = vm.modules().await?;
        let labels = module_labels(client, NODE, "kmm-ci-a-device-plugin").await?;
        ensure!(
            !m.iter().any(|x| x == "kmm_ci_a"),
            "the Module is deleted and its node labels are {labels:?}, yet the kernel still has kmm_ci_a: {m:?}"
        );
        Ok(())
    })
    .await
}

/// An image on the base userspace holding `files` (with depmod's indexes for the real
/// kernel's module directory under `/opt`); returns its reference.
async fn push_real_image(
    fleet: &Fleet,
    repo_tag: &str,
    mut files: BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<String> {
    let kernel = real_kernel();
    files.extend(kmm_e2e::kbuild::depmod(&files, "/opt", &kernel)?);
    let reference = format!("{}/{repo_tag}", fleet.registry().host());
    kmm_e2e::oci::push_image(
        &fleet.registry().access(),
        &reference,
        &[
            kmm_e2e::userspace::layer()?.to_vec(),
            kmm_e2e::oci::tar_files(&files)?,
        ],
        &kmm_e2e::oci::ImageConfig::default(),
        &BTreeMap::new(),
    )
    .await?;
    Ok(reference)
}

/// `kmm_ci_a` compiled for the real kernel with `MODULE_VERSION(version)`, optionally signed.
fn real_module(name: &str, version: &str, sign: Option<&SignWith>) -> anyhow::Result<Vec<u8>> {
    let ko = kmm_e2e::kbuild::compile(&real_kernel(), &[name], version)?
        .remove(name)
        .context("compiled")?;
    Ok(match sign {
        Some(s) => kmm_e2e::kmod::sign_with_sign_file(&ko, &s.key, &s.cert)?,
        None => ko,
    })
}

fn module_path(name: &str) -> String {
    format!("/opt/lib/modules/{}/{name}.ko", real_kernel())
}

/// A plain Module loading `name` from `image` on the workers.
fn simple_spec(name: &str, image: &str) -> serde_json::Value {
    json!({
        "moduleLoader": {
            "serviceAccountName": kmm_e2e::labs::LAB_SERVICE_ACCOUNT,
            "container": {
                "modprobe": {"moduleName": name},
                "kernelMappings": [{"regexp": "^.*$", "containerImage": image}],
            },
        },
        "imageRepoSecret": {"name": kmm_e2e::labs::PULL_SECRET},
        "selector": {kmm_e2e::labs::WORKER_LABEL: ""},
    })
}

/// The Module's Degraded condition message, once it mentions `words`.
async fn degraded_with(client: &Client, module: &str, words: &str) -> anyhow::Result<String> {
    eventually(
        &format!("Module {module} Degraded with {words:?}"),
        async || {
            let m = Api::<Module>::namespaced(client.clone(), NS)
                .get(module)
                .await?;
            let conds = m.status.map(|s| s.conditions).unwrap_or_default();
            let msg = conds
                .iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            Ok(if msg.contains(words) {
                Ok(msg)
            } else {
                Err(format!("{conds:?}"))
            })
        },
    )
    .await
}

/// The Secure Boot node trusts the sandbox's certificate through its MOK list, as a fleet
/// node does: the signed module loads; the unsigned one and one signed by another key are
/// refused with the kernel's own words, which reach the Module's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_boot_node_refuses_what_it_does_not_trust_in_the_kernels_words() -> anyhow::Result<()>
{
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir()?;
    let (ours, ours_der) = signing_pair(tmp.path(), "kmm-fleet sandbox signing key");
    let (theirs, _) = signing_pair(tmp.path(), "someone else");
    let mut node = SimNode::real("secure-1", worker_labels(true));
    node.secure_boot = true;
    node.enrolled_certs = vec![ours_der];
    with_real_spoke(vec![node], async |fleet, client, vms| {
        let vm = &vms[0].1;
        let image = |sign: Option<&SignWith>| -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
            Ok(BTreeMap::from([(
                module_path("kmm_ci_a"),
                real_module("kmm_ci_a", "1.0", sign)?,
            )]))
        };
        let unsigned = push_real_image(fleet, "sb/kmm-ci-a:unsigned", image(None)?).await?;
        let foreign = push_real_image(fleet, "sb/kmm-ci-a:foreign", image(Some(&theirs))?).await?;
        let signed = push_real_image(fleet, "sb/kmm-ci-a:signed", image(Some(&ours))?).await?;

        for (what, img) in [("unsigned", &unsigned), ("foreign-signed", &foreign)] {
            apply_module(client, "kmm-ci-a", &simple_spec("kmm_ci_a", img)).await?;
            let msg = degraded_with(client, "kmm-ci-a", "Key was rejected by service").await?;
            eprintln!("{what}: {msg}");
            ensure!(vm.modules().await?.is_empty(), "nothing loaded");
        }
        apply_module(client, "kmm-ci-a", &simple_spec("kmm_ci_a", &signed)).await?;
        wait_modules(vm, "the signed kmm_ci_a loaded", |m| {
            m.iter().any(|x| x == "kmm_ci_a")
        })
        .await?;
        let taint = vm.exec("cat /proc/sys/kernel/tainted").await?;
        eprintln!("tainted after the signed load: {}", taint.output.trim());
        delete_module(client, "kmm-ci-a").await?;
        wait_modules(vm, "unloaded", |m| m.is_empty()).await?;
        Ok(())
    })
    .await
}

/// Firmware: the loader copies the image's firmware to the host path, points the kernel at
/// it, and the module's `request_firmware` finds it; deletion unloads and removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_is_copied_and_found_by_the_kernel() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    with_real_spoke(
        vec![SimNode::real(NODE, worker_labels(false))],
        async |fleet, client, vms| {
            let vm = &vms[0].1;
            let blob: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
            let files = BTreeMap::from([
                (
                    module_path("kmm_ci_fw"),
                    real_module("kmm_ci_fw", "1.0", None)?,
                ),
                ("/firmware/kmm_ci_fw.bin".to_string(), blob.clone()),
            ]);
            let image = push_real_image(fleet, "fw/kmm-ci-fw:1.0", files).await?;
            let mut spec = simple_spec("kmm_ci_fw", &image);
            spec["moduleLoader"]["container"]["modprobe"]["firmwarePath"] = json!("/firmware");
            apply_module(client, "kmm-ci-fw", &spec).await?;
            wait_modules(vm, "kmm_ci_fw loaded", |m| {
                m.iter().any(|x| x == "kmm_ci_fw")
            })
            .await?;
            let size = vm
                .exec("cat /sys/module/kmm_ci_fw/parameters/firmware_size")
                .await?;
            ensure!(
                size.output.trim() == blob.len().to_string(),
                "the kernel loaded a firmware of {} bytes",
                size.output.trim()
            );
            let copied = vm.exec("ls /var/lib/firmware").await?;
            ensure!(copied.output.contains("kmm_ci_fw.bin"), "{}", copied.output);
            delete_module(client, "kmm-ci-fw").await?;
            wait_modules(vm, "kmm_ci_fw unloaded", |m| {
                !m.iter().any(|x| x == "kmm_ci_fw")
            })
            .await?;
            let left = vm.exec("ls /var/lib/firmware").await?;
            ensure!(
                !left.output.contains("kmm_ci_fw.bin"),
                "firmware left: {}",
                left.output
            );
            Ok(())
        },
    )
    .await
}

/// A module built for another kernel: the kernel refuses it (`Exec format error`, and
/// "version magic … should be …" in its log), and the Module's status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vermagic_mismatch_is_reported_in_the_kernels_words() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    with_real_spoke(
        vec![SimNode::real(NODE, worker_labels(false))],
        async |fleet, client, vms| {
            let vm = &vms[0].1;
            let kernel = real_kernel();
            // The same module with the vermagic of another kernel build: another release and
            // preemption model (with modversions the kernel forgives a different release alone,
            // as symbol CRCs decide then; the build flags must match exactly).
            let other: String = kernel
                .chars()
                .map(|c| {
                    if c.is_ascii_digit() {
                        if c == '9' { '8' } else { '9' }
                    } else {
                        c
                    }
                })
                .collect();
            let mut ko = real_module("kmm_ci_a", "1.0", None)?;
            let from = format!("vermagic={kernel} SMP preempt ");
            let to = format!("vermagic={other} SMP PREEMPT ");
            let at = ko
                .windows(from.len())
                .position(|w| w == from.as_bytes())
                .context("vermagic in .modinfo")?;
            ko[at..at + from.len()].copy_from_slice(to.as_bytes());
            let image = push_real_image(
                fleet,
                "bad/kmm-ci-a:other-kernel",
                BTreeMap::from([(module_path("kmm_ci_a"), ko)]),
            )
            .await?;
            apply_module(client, "kmm-ci-a", &simple_spec("kmm_ci_a", &image)).await?;
            let msg = degraded_with(client, "kmm-ci-a", "Exec format error").await?;
            eprintln!("{msg}");
            let log = dmesg(vm, "version magic").await?;
            ensure!(
                log.iter()
                    .any(|l| l.contains(&other) && l.contains(&kernel)),
                "the kernel's log: {log:?}"
            );
            ensure!(vm.modules().await?.is_empty());
            delete_module(client, "kmm-ci-a").await?;
            Ok(())
        },
    )
    .await
}

/// An ordered upgrade with the node relabelled directly from one version to the next ends
/// with the new module in the kernel (its `/sys/module/<name>/version`), not the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_upgrade_relabelled_directly_ends_with_the_new_version_loaded() -> anyhow::Result<()>
{
    let _one = ONE_AT_A_TIME.lock().await;
    with_real_spoke(
        vec![SimNode::real(NODE, worker_labels(false))],
        async |fleet, client, vms| {
            let vm = &vms[0].1;
            let image = |v: &str| -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
                Ok(BTreeMap::from([(
                    module_path("kmm_ci_a"),
                    real_module("kmm_ci_a", v, None)?,
                )]))
            };
            let v1 = push_real_image(fleet, "up/kmm-ci-a:1.0", image("1.0")?).await?;
            let v2 = push_real_image(fleet, "up/kmm-ci-a:2.0", image("2.0")?).await?;
            let label = shared_api::labels::version_module_label(NS, "kmm-ci-a");
            let set_label = async |v: &str| -> anyhow::Result<()> {
                Api::<Node>::all(client.clone())
                    .patch(
                        NODE,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {label.clone(): v}}})),
                    )
                    .await?;
                Ok(())
            };
            let versioned = |image: &str, v: &str| {
                let mut s = simple_spec("kmm_ci_a", image);
                s["moduleLoader"]["container"]["version"] = json!(v);
                s
            };
            let loaded_version = async || -> anyhow::Result<String> {
                Ok(vm
                    .exec("cat /sys/module/kmm_ci_a/version 2>/dev/null")
                    .await?
                    .output
                    .trim()
                    .to_string())
            };
            set_label("1.0").await?;
            apply_module(client, "kmm-ci-a", &versioned(&v1, "1.0")).await?;
            eventually("1.0 in the kernel", async || {
                let v = loaded_version().await?;
                Ok(if v == "1.0" { Ok(()) } else { Err(v) })
            })
            .await?;
            // The upgrade: the Module and the node's label move to 2.0 directly.
            apply_module(client, "kmm-ci-a", &versioned(&v2, "2.0")).await?;
            set_label("2.0").await?;
            let ready = shared_api::labels::module_version_ready_label(NS, "kmm-ci-a");
            eventually("2.0 in the kernel and on the node's label", async || {
                let v = loaded_version().await?;
                let n = Api::<Node>::all(client.clone()).get(NODE).await?;
                let l = n.labels().get(&ready).cloned().unwrap_or_default();
                Ok(if v == "2.0" && l == "2.0" {
                    Ok(())
                } else {
                    Err(format!("kernel has {v:?}, node label says {l:?}"))
                })
            })
            .await?;
            // And it stays so: nothing unloads the new module behind the label's back.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let v = loaded_version().await?;
            ensure!(v == "2.0", "after settling the kernel has {v:?}");
            delete_module(client, "kmm-ci-a").await?;
            wait_modules(vm, "unloaded", |m| m.is_empty()).await?;
            Ok(())
        },
    )
    .await
}

/// The two labs the hub builds, for Debian's kernel, through the whole fleet: the in-cluster
/// build (`make` compiles the lab's module against the kernel's headers, `depmod` indexes it)
/// on the plain real node, and build-and-sign — the hub signs in-process with the key the
/// Secure Boot node has in its MOK list — on both. Each loads on the real kernels and unloads
/// when its MCM is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_built_and_hub_signed_labs_load_on_real_kernels() -> anyhow::Result<()> {
    use kmm_e2e::labs::{DOCKERFILE_CONFIGMAPS, LAB_DOCKERFILE, PULL_SECRET};
    use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace};
    use shared_api::ManagedClusterModule;
    const HUB_NS: &str = "kmm-hub";
    const BUILD_NS: &str = "kmm-hub-builds";
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir()?;
    let (ours, ours_der) = signing_pair(tmp.path(), "kmm-fleet hub signing key");
    let mut secure = SimNode::real("secure-1", worker_labels(true));
    secure.secure_boot = true;
    secure.enrolled_certs = vec![ours_der];
    let nodes = vec![SimNode::real(NODE, worker_labels(false)), secure];
    with_real_spoke(nodes, async |fleet, _client, vms| {
        let hub = fleet.hub().client().await;
        ensure_namespace(&hub, HUB_NS).await?;
        ensure_namespace(&hub, BUILD_NS).await?;
        let pp = PatchParams::apply(MANAGER).force();
        Api::<Secret>::namespaced(hub.clone(), HUB_NS)
            .patch(
                PULL_SECRET,
                &pp,
                &Patch::Apply(fleet.registry().dockerconfigjson_secret(PULL_SECRET, HUB_NS)),
            )
            .await?;
        for cm in DOCKERFILE_CONFIGMAPS {
            let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": cm, "namespace": HUB_NS},
                "data": {"dockerfile": LAB_DOCKERFILE}});
            Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(hub.clone(), HUB_NS)
                .patch(cm, &pp, &Patch::Apply(&body))
                .await?;
        }
        for ((name, key), file) in [
            (kmm_e2e::labs::SIGNING_KEY_SECRET, &ours.key),
            (kmm_e2e::labs::SIGNING_CERT_SECRET, &ours.cert),
        ] {
            use base64::Engine as _;
            let body = json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": HUB_NS},
                "data": {key: base64::engine::general_purpose::STANDARD.encode(std::fs::read(file)?)}});
            Api::<Secret>::namespaced(hub.clone(), HUB_NS)
                .patch(name, &pp, &Patch::Apply(&body))
                .await?;
        }
        let config = fleet.dir().join("hub-config.yaml");
        std::fs::write(
            &config,
            "driverToolkit:\n  - kernel: '.*'\n    image: public.sim.kmm-fleet.io/driver-toolkit:latest\n",
        )?;
        let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
        o.resync = Duration::from_secs(10);
        o.config = Some(config);
        let hub_process = HubProcess::start(o)?;
        let registry = fleet.registry().host();
        let result = async {
            let mcms = Api::<ManagedClusterModule>::all(hub.clone());
            for name in ["kmm-ci-a", "labs-signed-module"] {
                let lab = kmm_e2e::labs::lab(&registry, name).context("lab")?;
                // Debian's kernel for the el9-only mapping of the build-and-sign lab.
                let text = lab.mcm.to_string().replace(r"^.*\\.x86_64$", "^.*$");
                let mut mcm: serde_json::Value = serde_json::from_str(&text)?;
                mcm["spec"]["spokeNamespace"] = json!(NS);
                mcms.patch(name, &pp, &Patch::Apply(&mcm)).await?;
            }
            let (plain, secure) = (&vms[0].1, &vms[1].1);
            for (vm, what) in [(plain, "plain"), (secure, "Secure Boot")] {
                wait_modules(vm, &format!("kmm_ci_a on the {what} node"), |m| {
                    m.iter().any(|x| x == "kmm_ci_a")
                })
                .await?;
            }
            let spoke = fleet.spoke(1).client().await;
            eventually("labs-signed-module ready on the Secure Boot node", async || {
                let l = module_labels(&spoke, "secure-1", "labs-signed-module").await?;
                Ok(if l.is_empty() { Err("no label".into()) } else { Ok(()) })
            })
            .await?;
            ensure!(
                module_labels(&spoke, "secure-1", "kmm-ci-a").await?.is_empty(),
                "the unsigned build lab selects secure-boot=false nodes only"
            );
            let modinfo = secure
                .exec("cat /sys/module/kmm_ci_a/version; cat /proc/sys/kernel/tainted")
                .await?;
            eprintln!("Secure Boot node: kmm_ci_a version, taint: {:?}", modinfo.output);
            for name in ["kmm-ci-a", "labs-signed-module"] {
                mcms.delete(name, &DeleteParams::default()).await?;
            }
            for (vm, what) in [(plain, "plain"), (secure, "Secure Boot")] {
                wait_modules(vm, &format!("kmm_ci_a unloaded on the {what} node"), |m| {
                    !m.iter().any(|x| x == "kmm_ci_a")
                })
                .await?;
            }
            anyhow::Ok(())
        }
        .await;
        hub_process.stop().await;
        result
    })
    .await
}

mod day1;
mod reboot;
