//! The simulators against a real fleet (hub + one spoke, registry with htpasswd auth):
//! nodes and DaemonSets, the module-loader contract, the OCM agents, the kaniko executor.
//! One fleet for the binary; each scenario has its own namespace and runs in turn, and
//! every failure is reported. Plus checks of the kmod fixtures with the real tools.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::kmod;
use kmm_e2e::labs::LAB_DOCKERFILE;
use kmm_e2e::oci::{self, KmodImage, SignWith};
use kmm_e2e::sim::loader;
use kmm_e2e::sim::{SimNode, read_loaded_modules};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shared_api::labels;
use shared_api::ocm::{ClusterClaim, ManagedCluster, ManifestWork};

const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";
const K2: &str = "6.1.0-18-amd64";
const DEADLINE: Duration = Duration::from_secs(90);

/// Poll `check` until it yields a value; on timeout, fail with the last thing it saw.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<T, String>>>,
{
    let start = Instant::now();
    loop {
        let seen = match check().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(s)) => s,
            Err(e) => format!("error: {e:#}"),
        };
        if start.elapsed() > DEADLINE {
            bail!("timed out waiting for {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Keys {
    _dir: tempfile::TempDir,
    key_a: PathBuf,
    cert_a: PathBuf,
    der_a: Vec<u8>,
    key_b: PathBuf,
    cert_b: PathBuf,
    der_b: Vec<u8>,
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn make_key(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PathBuf, Vec<u8>)> {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    let der = dir.join(format!("{name}.der"));
    let (k, c, d) = (
        key.to_string_lossy(),
        cert.to_string_lossy(),
        der.to_string_lossy(),
    );
    let subj = format!("/CN=kmm-fleet sim signing key {name}");
    openssl(&[
        "req", "-x509", "-new", "-nodes", "-utf8", "-sha256", "-days", "3650", "-batch", "-newkey",
        "rsa:2048", "-keyout", &k, "-out", &c, "-subj", &subj,
    ])?;
    openssl(&["x509", "-in", &c, "-outform", "DER", "-out", &d])?;
    Ok((key, cert.clone(), std::fs::read(&der)?))
}

fn keys() -> anyhow::Result<Keys> {
    let dir = tempfile::tempdir()?;
    let (key_a, cert_a, der_a) = make_key(dir.path(), "a")?;
    let (key_b, cert_b, der_b) = make_key(dir.path(), "b")?;
    Ok(Keys {
        _dir: dir,
        key_a,
        cert_a,
        der_a,
        key_b,
        cert_b,
        der_b,
    })
}

// ---------------------------------------------------------------------------------------
// kmod fixtures checked by the real tools (no cluster)

#[test]
fn kmod_modinfo_reads_vermagic_of_fake_module() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kmm_ci_a.ko");
    std::fs::write(&path, kmod::fake_module("kmm-ci-a", K1))?;
    let out = Command::new("modinfo")
        .arg("-F")
        .arg("vermagic")
        .arg(&path)
        .output()?;
    ensure!(
        out.status.success(),
        "modinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vermagic = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        vermagic.split_whitespace().next() == Some(K1),
        "vermagic {vermagic:?}"
    );
    let out = Command::new("modinfo")
        .arg("-F")
        .arg("name")
        .arg(&path)
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "kmm_ci_a",
        "name {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn sign_file_signs_fake_module_and_openssl_verifies_with_the_right_cert_only() -> anyhow::Result<()>
{
    let k = keys()?;
    let module = kmod::fake_module("kmm_ci_a", K1);
    let signed = kmod::sign_with_sign_file(&module, &k.key_a, &k.cert_a)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kmm_ci_a.ko");
    std::fs::write(&path, &signed)?;
    let out = Command::new("modinfo").arg(&path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.lines()
            .any(|l| l.starts_with("sig_id:") && l.contains("PKCS#7")),
        "modinfo:\n{text}"
    );
    ensure!(
        text.contains("sim signing key a"),
        "signer missing:\n{text}"
    );
    let (content, sig) = kmod::split_signature(&signed).context("no signature found")?;
    ensure!(
        content == module.as_slice(),
        "content differs from the unsigned module"
    );
    ensure!(sig.id_type == kmod::PKEY_ID_PKCS7);
    loader::verify_signature(content, &sig.signature, std::slice::from_ref(&k.der_a))
        .map_err(|e| anyhow::anyhow!("right cert rejected: {e}"))?;
    ensure!(
        loader::verify_signature(content, &sig.signature, std::slice::from_ref(&k.der_b)).is_err(),
        "wrong cert accepted"
    );
    let mut tampered = content.to_vec();
    tampered[100] ^= 1;
    ensure!(
        loader::verify_signature(&tampered, &sig.signature, std::slice::from_ref(&k.der_a))
            .is_err(),
        "tampered module accepted"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// the fleet

fn spoke_nodes(k: &Keys) -> Vec<SimNode> {
    let mut a = worker_node("node-a", K1);
    a.labels.insert("sim-test".into(), "ds".into());
    a.in_tree_modules = vec!["dummy".into()];
    let mut b = worker_node("node-b", K1);
    b.secure_boot = true;
    b.enrolled_certs = vec![k.der_a.clone()];
    let mut c = worker_node("node-c", K2);
    c.labels.insert("sim-test".into(), "ds".into());
    vec![a, b, c]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulators_on_a_real_fleet() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let k = keys()?;
    let nodes = spoke_nodes(&k);
    Fleet::builder()
        .spokes(1)
        .registry_auth(true)
        .spoke_nodes(1, nodes)
        .run(async |fleet| {
            eprintln!("fleet ready in {:.2?}", t0.elapsed());
            let mut failures = Vec::new();
            macro_rules! scenario {
                ($name:literal, $f:expr) => {{
                    let t = Instant::now();
                    let r = $f.await;
                    eprintln!(
                        "scenario {}: {} in {:.2?}",
                        $name,
                        if r.is_ok() { "ok" } else { "FAILED" },
                        t.elapsed()
                    );
                    if let Err(e) = r {
                        failures.push(format!("{}: {e:#}", $name));
                    }
                }};
            }
            scenario!("daemonset", daemonset_on_matching_nodes(fleet));
            scenario!("loader", loader_contract(fleet, &k));
            scenario!("ocm", ocm_agents(fleet));
            scenario!("kaniko", kaniko_builds(fleet));
            eprintln!("all scenarios in {:.2?}", t0.elapsed());
            if !failures.is_empty() {
                bail!(
                    "{} scenario(s) failed:\n{}",
                    failures.len(),
                    failures.join("\n")
                );
            }
            Ok(())
        })
        .await
}

async fn namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply("sims-test"), &Patch::Apply(&ns))
        .await?;
    Ok(())
}

async fn pull_secret(fleet: &Fleet, client: &Client, ns: &str) -> anyhow::Result<()> {
    let s = fleet.registry().dockerconfigjson_secret("pull", ns);
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await?;
    Ok(())
}

fn container_state(pod: &Pod) -> String {
    let st = pod.status.clone().unwrap_or_default();
    let cs: Vec<String> = st
        .container_statuses
        .iter()
        .flatten()
        .map(|c| format!("{}: state {:?} last {:?}", c.name, c.state, c.last_state))
        .collect();
    format!(
        "phase {:?} node {:?} {}",
        st.phase,
        pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        cs.join("; ")
    )
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The message of a failed container: the terminated state's, or the last state's.
fn failure_message(pod: &Pod) -> Option<String> {
    let cs = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .clone();
    let from = |s: Option<k8s_openapi::api::core::v1::ContainerState>| {
        s.and_then(|s| s.terminated).and_then(|t| t.message)
    };
    from(cs.state).or_else(|| from(cs.last_state))
}

fn waiting(pod: &Pod) -> Option<(String, String)> {
    let cs = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .clone();
    let w = cs.state?.waiting?;
    Some((w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
}

/// (a) The real DaemonSet controller plus the node simulator: Running, Ready pods on
/// exactly the matching nodes; a pod whose image is missing shows ErrImagePull.
async fn daemonset_on_matching_nodes(fleet: &Fleet) -> anyhow::Result<()> {
    let client = fleet.spoke(1).client().await;
    let ns = "sim-ds";
    namespace(&client, ns).await?;
    pull_secret(fleet, &client, ns).await?;
    let host = fleet.registry().host();
    let image = format!("{host}/sims/plain:1");
    oci::push_files(
        &fleet.registry().access(),
        &image,
        &BTreeMap::from([("/bin/app".to_string(), b"x".to_vec())]),
        &BTreeMap::new(),
    )
    .await?;
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "plain", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "plain"}},
            "template": {
                "metadata": {"labels": {"app": "plain"}},
                "spec": {
                    "nodeSelector": {"sim-test": "ds"},
                    "imagePullSecrets": [{"name": "pull"}],
                    "containers": [{"name": "app", "image": image}],
                },
            },
        },
    }))?;
    Api::<DaemonSet>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ds)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(
        "DaemonSet pods Running and Ready on node-a and node-c",
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=plain"))
                .await?;
            let mut on: Vec<String> = list
                .items
                .iter()
                .filter(|p| {
                    pod_ready(p)
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect();
            on.sort();
            if on == ["node-a", "node-c"] && list.items.len() == 2 {
                Ok(Ok(()))
            } else {
                Ok(Err(list
                    .items
                    .iter()
                    .map(container_state)
                    .collect::<Vec<_>>()
                    .join(" | ")))
            }
        },
    )
    .await?;
    let dsa: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    eventually("DaemonSet status numberReady 2 of desired 2", || async {
        let st = dsa.get("plain").await?.status.unwrap_or_default();
        Ok(
            if st.desired_number_scheduled == 2 && st.number_ready == 2 {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            },
        )
    })
    .await?;

    // A missing image, and an existing one without the pull secret.
    for (name, img, secret, want) in [
        (
            "missing",
            format!("{host}/sims/missing:1"),
            true,
            "not found",
        ),
        ("no-secret", image.clone(), false, "authoriz"),
    ] {
        let mut spec = json!({
            "nodeSelector": {"kubernetes.io/hostname": "node-a"},
            "containers": [{"name": "app", "image": img}],
        });
        if secret {
            spec["imagePullSecrets"] = json!([{"name": "pull"}]);
        }
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        )?;
        pods.create(&PostParams::default(), &pod).await?;
        eventually(
            &format!("pod {name}: ErrImagePull/ImagePullBackOff ({want})"),
            || async {
                let p = pods.get(name).await?;
                Ok(match waiting(&p) {
                    Some((r, m)) if r == "ErrImagePull" && m.contains(want) => Ok(()),
                    _ => Err(container_state(&p)),
                })
            },
        )
        .await?;
        eventually(&format!("pod {name}: ImagePullBackOff later"), || async {
            let p = pods.get(name).await?;
            Ok(match waiting(&p) {
                Some((r, _)) if r == "ImagePullBackOff" => Ok(()),
                _ => Err(container_state(&p)),
            })
        })
        .await?;
    }
    // Deleting the DaemonSet removes its pods (graceful delete, completed by the kubelet).
    dsa.delete("plain", &DeleteParams::foreground()).await?;
    eventually("DaemonSet pods gone", || async {
        let n = pods
            .list(&ListParams::default().labels("app=plain"))
            .await?
            .items
            .len();
        Ok(if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} pods left"))
        })
    })
    .await?;
    Ok(())
}

struct LoaderSpec<'a> {
    name: &'a str,
    node: &'a str,
    image: String,
    module: &'a str,
    order: &'a [&'a str],
    in_tree: &'a [&'a str],
    firmware: Option<&'a str>,
}

const LOADER_SCRIPT: &str =
    "# the spoke's loader script; its behaviour is emulated by the node simulator";

fn loader_pod(ns: &str, s: &LoaderSpec) -> anyhow::Result<Pod> {
    let mut env = vec![
        json!({"name": "KMM_MODULE_NAME", "value": s.module}),
        json!({"name": "KMM_DIR_NAME", "value": "/opt"}),
        json!({"name": "KMM_LOADING_ORDER", "value": s.order.join("\n")}),
        json!({"name": "KMM_IN_TREE_REMOVE", "value": s.in_tree.join("\n")}),
    ];
    if let Some(fw) = s.firmware {
        env.push(json!({"name": "KMM_FIRMWARE_PATH", "value": fw}));
    }
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": s.name, "namespace": ns,
            "labels": {
                labels::MODULE_NAME_LABEL: s.name,
                labels::ROLE_LABEL: labels::ROLE_LOADER,
                labels::TARGET_KERNEL_LABEL: labels::kernel_label_value(K1),
            },
            "annotations": {labels::MODULE_ANNOTATION: format!("{ns}/{}", s.name)},
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": s.node},
            "imagePullSecrets": [{"name": "pull"}],
            "containers": [{
                "name": "module-loader",
                "image": s.image,
                "command": ["/bin/sh", "-c"],
                "args": [LOADER_SCRIPT],
                "env": env,
                "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", LOADER_SCRIPT, "loader", "unload"]}}},
                "readinessProbe": {"exec": {"command": ["cat", "/tmp/kmm-loaded"]}},
            }],
        },
    }))?)
}

/// (b) The loader contract: signature checks on a Secure Boot node, vermagic, soft
/// dependencies, in-tree removal, firmware, unload on deletion.
async fn loader_contract(fleet: &Fleet, k: &Keys) -> anyhow::Result<()> {
    let client = fleet.spoke(1).client().await;
    let sim = fleet.node_sim("spoke-1");
    let ns = "sim-loader";
    namespace(&client, ns).await?;
    pull_secret(fleet, &client, ns).await?;
    let access = fleet.registry().access();
    let host = fleet.registry().host();
    let sign_a = SignWith {
        key: k.key_a.clone(),
        cert: k.cert_a.clone(),
    };
    let sign_b = SignWith {
        key: k.key_b.clone(),
        cert: k.cert_b.clone(),
    };
    let mut signed = KmodImage::new(&[K1, K2], &["kmm_ci_a", "kmm_ci_b"]);
    signed.sign = Some(sign_a);
    signed
        .firmware
        .insert("/firmware/kmm/fw.bin".into(), b"firmware".to_vec());
    let img_signed = format!("{host}/sims/kmm-ci:signed-a");
    oci::push_kmod_image(&access, &img_signed, &signed).await?;
    let img_unsigned = format!("{host}/sims/kmm-ci:unsigned");
    oci::push_kmod_image(
        &access,
        &img_unsigned,
        &KmodImage::new(&[K1], &["kmm_ci_a", "unsigned_mod"]),
    )
    .await?;
    let mut other = KmodImage::new(&[K1], &["otherkey_mod"]);
    other.sign = Some(sign_b);
    let img_other = format!("{host}/sims/kmm-ci:signed-b");
    oci::push_kmod_image(&access, &img_other, &other).await?;
    // A module built for K2 placed where modprobe looks for K1's.
    let img_mismatch = format!("{host}/sims/kmm-ci:mismatch");
    let files = BTreeMap::from([(
        format!("/opt/lib/modules/{K1}/mismatch_mod.ko"),
        kmod::fake_module("mismatch_mod", K2),
    )]);
    oci::push_files(&access, &img_mismatch, &files, &BTreeMap::new()).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let specs = [
        LoaderSpec {
            name: "signed",
            node: "node-b",
            image: img_signed.clone(),
            module: "kmm-ci-a",
            order: &["kmm-ci-a", "kmm-ci-b"],
            in_tree: &[],
            firmware: Some("/firmware"),
        },
        LoaderSpec {
            name: "unsigned",
            node: "node-b",
            image: img_unsigned.clone(),
            module: "unsigned_mod",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
        LoaderSpec {
            name: "other-key",
            node: "node-b",
            image: img_other,
            module: "otherkey_mod",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
        LoaderSpec {
            name: "mismatch",
            node: "node-a",
            image: img_mismatch,
            module: "mismatch_mod",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
        LoaderSpec {
            name: "in-tree",
            node: "node-a",
            image: img_unsigned,
            module: "kmm_ci_a",
            order: &[],
            in_tree: &["dummy"],
            firmware: None,
        },
        LoaderSpec {
            name: "not-found",
            node: "node-c",
            image: img_signed.clone(),
            module: "kmm_ci_c",
            order: &[],
            in_tree: &[],
            firmware: None,
        },
    ];
    for s in &specs {
        pods.create(&PostParams::default(), &loader_pod(ns, s)?)
            .await?;
    }
    eventually(
        "signed module and its soft dependency loaded on the Secure Boot node",
        || async {
            let p = pods.get("signed").await?;
            let loaded = sim.loaded_modules("node-b");
            Ok(if pod_ready(&p) && loaded == ["kmm_ci_b", "kmm_ci_a"] {
                Ok(())
            } else {
                Err(format!("loaded {loaded:?}; {}", container_state(&p)))
            })
        },
    )
    .await?;
    let failures = [
        (
            "unsigned",
            "modprobe: ERROR: could not insert 'unsigned_mod': Key was rejected by service"
                .to_string(),
        ),
        (
            "other-key",
            "modprobe: ERROR: could not insert 'otherkey_mod': Key was rejected by service"
                .to_string(),
        ),
        (
            "mismatch",
            "modprobe: ERROR: could not insert 'mismatch_mod': Exec format error".to_string(),
        ),
        (
            "not-found",
            format!(
                "modprobe: FATAL: Module kmm_ci_c not found in directory /opt/lib/modules/{K2}"
            ),
        ),
    ];
    for (name, want) in &failures {
        eventually(&format!("loader {name} fails with {want:?}"), || async {
            let p = pods.get(name).await?;
            let msg = failure_message(&p);
            Ok(if msg.as_deref() == Some(want.as_str()) && !pod_ready(&p) {
                Ok(())
            } else {
                Err(container_state(&p))
            })
        })
        .await?;
    }
    eventually("a failing loader goes into CrashLoopBackOff", || async {
        let p = pods.get("unsigned").await?;
        Ok(match waiting(&p) {
            Some((r, _)) if r == "CrashLoopBackOff" => Ok(()),
            _ => Err(container_state(&p)),
        })
    })
    .await?;
    eventually(
        "in-tree dummy removed and kmm_ci_a loaded on node-a",
        || async {
            let p = pods.get("in-tree").await?;
            let loaded = sim.loaded_modules("node-a");
            Ok(if pod_ready(&p) && loaded == ["kmm_ci_a"] {
                Ok(())
            } else {
                Err(format!("loaded {loaded:?}; {}", container_state(&p)))
            })
        },
    )
    .await?;
    eventually(
        "node annotations mirror loaded modules and firmware",
        || async {
            let loaded = read_loaded_modules(&client, "node-b").await?;
            let node = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
                .get("node-b")
                .await?;
            let fw = node
                .annotations()
                .get(kmm_e2e::sim::FIRMWARE_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            Ok(
                if loaded == ["kmm_ci_b", "kmm_ci_a"] && fw == "/var/lib/firmware/kmm/fw.bin" {
                    Ok(())
                } else {
                    Err(format!("annotation {loaded:?}, firmware {fw:?}"))
                },
            )
        },
    )
    .await?;
    // Deleting the loader pod runs the preStop: unload in stop order, firmware removed.
    pods.delete("signed", &DeleteParams::default()).await?;
    eventually(
        "signed loader pod gone and its modules unloaded",
        || async {
            let gone = pods.get_opt("signed").await?.is_none();
            let loaded = sim.loaded_modules("node-b");
            let fw = sim.firmware("node-b");
            Ok(if gone && loaded.is_empty() && fw.is_empty() {
                Ok(())
            } else {
                Err(format!("gone {gone} loaded {loaded:?} firmware {fw:?}"))
            })
        },
    )
    .await?;
    // A kernel upgrade reboots the node: a new bootID and only in-tree modules again.
    let before = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get("node-a")
        .await?;
    sim.set_kernel("node-a", K2).await?;
    let after = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get("node-a")
        .await?;
    let info = |n: &k8s_openapi::api::core::v1::Node| {
        n.status
            .as_ref()
            .and_then(|s| s.node_info.clone())
            .unwrap_or_default()
    };
    ensure!(
        info(&after).kernel_version == K2,
        "kernel after upgrade {:?}",
        info(&after).kernel_version
    );
    ensure!(
        info(&after).boot_id != info(&before).boot_id,
        "bootID unchanged"
    );
    // The restarted in-tree loader removes dummy again and fails for lack of a K2 module.
    eventually(
        "after the reboot the loader on node-a fails for the new kernel",
        || async {
            let p = pods.get("in-tree").await?;
            let msg = failure_message(&p).unwrap_or_default();
            let loaded = sim.loaded_modules("node-a");
            Ok(
                if msg.contains(&format!("not found in directory /opt/lib/modules/{K2}"))
                    && loaded.is_empty()
                {
                    Ok(())
                } else {
                    Err(format!("loaded {loaded:?}; {}", container_state(&p)))
                },
            )
        },
    )
    .await?;
    Ok(())
}

/// (c) The OCM agents: a ManifestWork is applied to its spoke with conditions and
/// feedback; removals and deletion clean up; spoke ClusterClaims reach the hub.
async fn ocm_agents(fleet: &Fleet) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    let spoke = fleet.spoke(1).client().await;
    namespace(&spoke, "sim-ocm").await?;
    let works: Api<ManifestWork> = Api::namespaced(hub.clone(), "spoke-1");
    let module = json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "sim-mod", "namespace": "sim-ocm"},
        "spec": {"selector": {}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "sim_mod"},
            "kernelMappings": [{"literal": K1, "containerImage": "127.0.0.1:1/sim:1"}],
        }}},
    });
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "sim-cm", "namespace": "sim-ocm"}, "data": {"k": "v1"}});
    let feedback = |name: &str, resource: &str, group: &str, paths: &[(&str, &str)]| {
        json!({"resourceIdentifier": {"group": group, "resource": resource, "name": name, "namespace": "sim-ocm"},
               "feedbackRules": [{"type": "JSONPaths", "jsonPaths": paths.iter().map(|(n, p)| json!({"name": n, "path": p})).collect::<Vec<_>>()}]})
    };
    let work: ManifestWork = serde_json::from_value(json!({
        "apiVersion": "work.open-cluster-management.io/v1", "kind": "ManifestWork",
        "metadata": {"name": "sim-work", "namespace": "spoke-1"},
        "spec": {
            "workload": {"manifests": [module, cm]},
            "manifestConfigs": [
                feedback("sim-mod", "modules", "kmm.sigs.x-k8s.io", &[("moduleLoader.availableNumber", ".status.moduleLoader.availableNumber")]),
                feedback("sim-cm", "configmaps", "", &[("k", ".data.k")]),
            ],
        },
    }))?;
    works.create(&PostParams::default(), &work).await?;
    let modules: Api<shared_api::Module> = Api::namespaced(spoke.clone(), "sim-ocm");
    let cms: Api<ConfigMap> = Api::namespaced(spoke.clone(), "sim-ocm");
    eventually(
        "work applied and available, objects on the spoke, string feedback",
        || async {
            let w = works.get("sim-work").await?;
            let st = w.status.clone().unwrap_or_default();
            let cm_value = st.resource_status.as_ref().and_then(|r| {
                r.manifests.iter().find_map(|m| {
                    m.status_feedback
                        .as_ref()?
                        .values
                        .iter()
                        .find(|v| v.name == "k")?
                        .field_value
                        .string
                        .clone()
                })
            });
            let on_spoke = modules.get_opt("sim-mod").await?.is_some()
                && cms.get_opt("sim-cm").await?.is_some();
            let fin = w
                .finalizers()
                .iter()
                .any(|f| f == kmm_e2e::ocm::WORK_FINALIZER);
            Ok(
                if st.condition_true("Applied")
                    && st.condition_true("Available")
                    && on_spoke
                    && fin
                    && cm_value.as_deref() == Some("v1")
                {
                    Ok(())
                } else {
                    Err(format!(
                        "on spoke {on_spoke}, finalizer {fin}, status {st:?}"
                    ))
                },
            )
        },
    )
    .await?;
    let managed = cms
        .get("sim-cm")
        .await?
        .metadata
        .managed_fields
        .unwrap_or_default();
    ensure!(
        managed
            .iter()
            .any(|m| m.manager.as_deref() == Some("work-agent")),
        "no work-agent field manager: {managed:?}"
    );
    // Integer feedback follows the live object's status.
    modules
        .patch_status(
            "sim-mod",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"moduleLoader": {"nodesMatchingSelectorNumber": 3, "desiredNumber": 3, "availableNumber": 2}}})),
        )
        .await?;
    eventually("integer feedback from the Module status", || async {
        let st = works.get("sim-work").await?.status.unwrap_or_default();
        Ok(
            if st.feedback_integer("moduleLoader.availableNumber") == Some(2) {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            },
        )
    })
    .await?;
    // OCM's own webhook refuses a work whose manifests exceed 512,000 bytes, exactly the
    // limit the hub renders against (kmm_hub::render::MAX_MANIFESTS_BYTES).
    let limit = kmm_hub::render::MAX_MANIFESTS_BYTES;
    let sized = |name: &str, size: usize| -> anyhow::Result<ManifestWork> {
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "sim-ocm"}, "data": {"k": ""}});
        let base = serde_json::to_vec(&cm)?.len();
        cm["data"]["k"] = json!("x".repeat(size - base));
        ensure!(serde_json::to_vec(&cm)?.len() == size);
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "spoke-1"},
            "spec": {"workload": {"manifests": [cm]}},
        }))?)
    };
    // OCM counts a manifest's protobuf size (the JSON plus a tag and a 3-byte length here):
    // 511,996 JSON bytes count exactly 512,000; one more is refused.
    let at_limit = limit - 4;
    ensure!(kmm_hub::render::ocm_manifest_size(at_limit) == limit);
    match works
        .create(&PostParams::default(), &sized("sim-too-big", at_limit + 1)?)
        .await
    {
        Err(kube::Error::Api(e))
            if e.message
                .contains("manifestworkvalidators.admission.work.open-cluster-management.io")
                && e.message.contains(&format!(
                    "{} bytes which exceeds the {limit} limit",
                    limit + 1
                )) => {}
        other => bail!(
            "a work of {} JSON bytes: want OCM's webhook to refuse it, got {other:?}",
            at_limit + 1
        ),
    }
    works
        .create(&PostParams::default(), &sized("sim-at-limit", at_limit)?)
        .await
        .context("a work that counts exactly the limit must be admitted")?;
    works
        .delete("sim-at-limit", &DeleteParams::default())
        .await?;

    // A manifest into a namespace that does not exist: Applied=False on the work, and the
    // API server's reason on the manifest's own condition (the real agent keeps the work-level
    // message generic: "Failed to apply manifest work").
    let bad: ManifestWork = serde_json::from_value(json!({
        "metadata": {"name": "sim-bad", "namespace": "spoke-1"},
        "spec": {"workload": {"manifests": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "sim-nowhere"}}]}},
    }))?;
    works.create(&PostParams::default(), &bad).await?;
    eventually("Applied=False for a missing namespace", || async {
        let st = works.get("sim-bad").await?.status.unwrap_or_default();
        let applied = st.conditions.iter().find(|c| c.type_ == "Applied");
        let manifest_applied = st
            .resource_status
            .as_ref()
            .and_then(|r| r.manifests.first())
            .and_then(|m| m.conditions.iter().find(|c| c.type_ == "Applied"));
        Ok(match (applied, manifest_applied) {
            (Some(c), Some(m))
                if c.status == "False"
                    && c.reason == "AppliedManifestWorkFailed"
                    && m.status == "False"
                    && m.message.contains("namespaces \"sim-nowhere\" not found") =>
            {
                Ok(())
            }
            _ => Err(format!("{st:?}")),
        })
    })
    .await?;
    works.delete("sim-bad", &DeleteParams::default()).await?;
    // Removing a manifest from the work deletes its object from the spoke.
    let patch =
        json!({"spec": {"workload": {"manifests": [work.spec.workload.manifests[0].0.clone()]}}});
    works
        .patch("sim-work", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    eventually(
        "ConfigMap removed from the work is deleted on the spoke",
        || async {
            Ok(if cms.get_opt("sim-cm").await?.is_none() {
                Ok(())
            } else {
                Err("still there".to_string())
            })
        },
    )
    .await?;
    ensure!(
        modules.get_opt("sim-mod").await?.is_some(),
        "the Module must stay"
    );
    // Deleting the work deletes the Module, then the work goes (finalizer removed).
    works.delete("sim-work", &DeleteParams::default()).await?;
    eventually("work and its Module gone", || async {
        let w = works.get_opt("sim-work").await?.is_none();
        let m = modules.get_opt("sim-mod").await?.is_none();
        let bad = works.get_opt("sim-bad").await?.is_none();
        Ok(if w && m && bad {
            Ok(())
        } else {
            Err(format!(
                "work gone {w}, module gone {m}, bad work gone {bad}"
            ))
        })
    })
    .await?;
    // ClusterClaims, including the numbered overflow, reach the ManagedCluster status.
    let claims: Api<ClusterClaim> = Api::all(spoke.clone());
    let main = shared_api::ocm::KERNEL_VERSIONS_CLAIM;
    for (name, value) in [
        (main.to_string(), format!("{K1}\n{K2}")),
        (format!("{main}.1"), "7.0.0-1".to_string()),
    ] {
        let c = ClusterClaim::new(&name, shared_api::ocm::ClusterClaimSpec { value });
        claims.create(&PostParams::default(), &c).await?;
    }
    let mcs: Api<ManagedCluster> = Api::all(hub.clone());
    eventually("claims in ManagedCluster spoke-1 status", || async {
        let st = mcs.get("spoke-1").await?.status.unwrap_or_default();
        let kernels = st.kernel_versions().unwrap_or_default();
        Ok(if kernels == [K1, K2, "7.0.0-1"] {
            Ok(())
        } else {
            Err(format!("{:?}", st.cluster_claims))
        })
    })
    .await?;
    claims
        .patch(
            main,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"value": K1}})),
        )
        .await?;
    eventually("claim change reaches the hub", || async {
        let st = mcs.get("spoke-1").await?.status.unwrap_or_default();
        let kernels = st.kernel_versions().unwrap_or_default();
        Ok(if kernels == [K1, "7.0.0-1"] {
            Ok(())
        } else {
            Err(format!("{:?}", st.cluster_claims))
        })
    })
    .await?;
    Ok(())
}

fn kaniko_job(
    ns: &str,
    name: &str,
    destination: &str,
    build_args: &[(&str, &str)],
) -> anyhow::Result<Job> {
    let mut args = vec![
        "--dockerfile".to_string(),
        "/workspace/Dockerfile".to_string(),
        format!("--destination={destination}"),
    ];
    for (k, v) in build_args {
        args.push("--build-arg".into());
        args.push(format!("{k}={v}"));
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "kaniko",
                    "image": "gcr.io/kaniko-project/executor:latest",
                    "args": args,
                    "volumeMounts": [
                        {"name": "dockerfile", "mountPath": "/workspace"},
                        {"name": "push", "mountPath": "/kaniko/.docker"},
                    ],
                }],
                "volumes": [
                    {"name": "dockerfile", "configMap": {"name": "lab-dockerfile", "items": [{"key": "dockerfile", "path": "Dockerfile"}]}},
                    {"name": "push", "secret": {"secretName": "pull", "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}},
                ],
            }},
        },
    }))?)
}

/// (d) A kaniko Job on the hub builds the lab's Dockerfile and pushes the kmod image; a
/// broken build fails the pod with its reason.
async fn kaniko_builds(fleet: &Fleet) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    let ns = "sim-build";
    namespace(&hub, ns).await?;
    pull_secret(fleet, &hub, ns).await?;
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "lab-dockerfile", "namespace": ns}, "data": {"dockerfile": LAB_DOCKERFILE}}),
    )?;
    Api::<ConfigMap>::namespaced(hub.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await?;
    let host = fleet.registry().host();
    let dest = format!("{host}/sim-build/kmm-ci:{K1}");
    let jobs: Api<Job> = Api::namespaced(hub.clone(), ns);
    jobs.create(
        &PostParams::default(),
        &kaniko_job(
            ns,
            "build-ok",
            &dest,
            &[
                ("KERNEL_VERSION", K1),
                ("DTK_AUTO", "quay.io/openshift/dtk:x"),
            ],
        )?,
    )
    .await?;
    jobs.create(
        &PostParams::default(),
        &kaniko_job(
            ns,
            "build-no-dtk",
            &format!("{host}/sim-build/broken:1"),
            &[("KERNEL_VERSION", K1)],
        )?,
    )
    .await?;
    jobs.create(
        &PostParams::default(),
        &kaniko_job(
            ns,
            "build-fail",
            &format!("{host}/sim-build/broken:2"),
            &[
                ("KERNEL_VERSION", K1),
                ("DTK_AUTO", "d"),
                ("KMM_SIM_FAIL", "out of disk"),
            ],
        )?,
    )
    .await?;
    eventually("build Job succeeded", || async {
        let st = jobs.get("build-ok").await?.status.unwrap_or_default();
        Ok(if st.succeeded == Some(1) {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        })
    })
    .await?;
    let image = oci::pull_files(&fleet.registry().access(), &dest).await?;
    for m in ["kmm_ci_a", "kmm_ci_b"] {
        let path = format!("/opt/lib/modules/{K1}/{m}.ko");
        let ko = image.files.get(&path).with_context(|| {
            format!(
                "{path} missing from {:?}",
                image.files.keys().collect::<Vec<_>>()
            )
        })?;
        ensure!(
            kmod::vermagic_kernel(ko)?.as_deref() == Some(K1),
            "{m}: wrong vermagic"
        );
    }
    // The simulated public base image stands for the base userspace: its layer, then one
    // layer with what the build made.
    let mut base = std::collections::BTreeMap::new();
    oci::apply_layer(&mut base, kmm_e2e::userspace::layer()?, false)?;
    let built: Vec<&String> = image
        .files
        .keys()
        .filter(|p| !base.contains_key(*p))
        .collect();
    ensure!(
        built.len() == 2 && image.layers == 2,
        "unexpected files {built:?} in {} layer(s)",
        image.layers
    );
    let pods: Api<Pod> = Api::namespaced(hub.clone(), ns);
    for (job, want) in [
        ("build-no-dtk", "FROM requires an image"),
        ("build-fail", "out of disk"),
    ] {
        eventually(&format!("{job}: pod Failed with {want:?}"), || async {
            let list = pods
                .list(&ListParams::default().labels(&format!("job-name={job}")))
                .await?;
            let failed = list.items.iter().find(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
                    && failure_message(p).is_some_and(|m| m.contains(want))
            });
            Ok(if failed.is_some() {
                Ok(())
            } else {
                Err(list
                    .items
                    .iter()
                    .map(container_state)
                    .collect::<Vec<_>>()
                    .join(" | "))
            })
        })
        .await?;
        eventually(&format!("{job}: Job failed"), || async {
            let st = jobs.get(job).await?.status.unwrap_or_default();
            Ok(if st.failed == Some(1) {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            })
        })
        .await?;
    }
    Ok(())
}
