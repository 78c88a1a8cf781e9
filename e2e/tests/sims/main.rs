//! The simulators against a real fleet (hub + one spoke, registry with htpasswd auth):
//! nodes and DaemonSets, the module-loader contract, the OCM agents, the kaniko executor.
//! One fleet for the binary; each scenario has its own namespace and runs in turn, and
//! every failure is reported. Plus checks of the kmod fixtures with the real tools.

mod kaniko;
mod kubelet;
mod loader_contract;
mod ocm;
mod offline;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kmm_e2e::fleet::{Fleet, worker_node};
use kmm_e2e::sim::SimNode;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::kaniko::kaniko_builds;
use crate::kubelet::daemonset_on_matching_nodes;
use crate::loader_contract::loader_contract;
use crate::ocm::ocm_agents;

const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";

const K2: &str = "6.1.0-18-amd64";

const DEADLINE: Duration = Duration::from_secs(90);

/// Poll `check` until it returns `Ok(Ok(_))`, or fail after [`DEADLINE`].
async fn eventually<T>(
    what: &str,
    check: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    kmm_e2e::testkit::eventually_every(what, DEADLINE, Duration::from_millis(200), check).await
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
