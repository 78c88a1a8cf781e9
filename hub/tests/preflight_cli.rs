//! `kmm-hub preflight`: every MCM against a coming kernel, offline (digest list, the hub's
//! ConfigMaps and Secrets from a file), one line per MCM and kernel, exit 0 only when all
//! would work.
#![allow(clippy::unwrap_used)] // test fixtures

use std::path::Path;
use std::process::{Command, Output};

const KERNEL: &str = "5.14.0-570.el9.x86_64";
const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// Three MCMs: one prebuilt (its image exists for the kernel), one built in the cluster
/// (its Dockerfile ConfigMap is `df`), one whose mappings stop at 5.14.0-284.
const MCMS: &str = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
    kind: ManagedClusterModule
    metadata: {name: prebuilt}
    spec:
      spokeNamespace: labs
      selector: {}
      moduleSpec:
        selector: {}
        moduleLoader:
          container:
            modprobe: {moduleName: a}
            kernelMappings:
              - regexp: '^.*$'
                containerImage: reg.example/a:${KERNEL_FULL_VERSION}
  - apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
    kind: ManagedClusterModule
    metadata: {name: built}
    spec:
      spokeNamespace: labs
      selector: {}
      moduleSpec:
        selector: {}
        moduleLoader:
          container:
            modprobe: {moduleName: b}
            kernelMappings:
              - regexp: '^.*$'
                containerImage: reg.example/$MOD_NAMESPACE/b:${KERNEL_FULL_VERSION}
                build: {dockerfileConfigMap: {name: df}}
  - apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
    kind: ManagedClusterModule
    metadata: {name: pinned-kernel}
    spec:
      spokeNamespace: labs
      selector: {}
      moduleSpec:
        selector: {}
        moduleLoader:
          container:
            modprobe: {moduleName: c}
            kernelMappings:
              - literal: 5.14.0-284.36.1.el9_2.x86_64
                containerImage: reg.example/c:v1
"#;

fn preflight(dir: &Path, mcms: &str, extra: &[&str]) -> Output {
    std::fs::write(dir.join("mcms.yaml"), mcms).unwrap();
    std::fs::write(
        dir.join("digests.yaml"),
        format!("reg.example/a:{KERNEL}: {DIGEST}\n"),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_kmm-hub"))
        .args(["preflight", "--kernel", KERNEL, "--mcm"])
        .arg(dir.join("mcms.yaml"))
        .arg("--digests")
        .arg(dir.join("digests.yaml"))
        .args(extra)
        .output()
        .unwrap()
}

/// `mcm → (status, reason)` from the output lines.
fn verdicts(out: &Output) -> Vec<(String, String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 4, "{l}");
            assert_eq!(f[1], KERNEL, "{l}");
            let reason = f[3].split(':').next().unwrap().to_string();
            (f[0].to_string(), f[2].to_string(), reason)
        })
        .collect()
}

fn v(mcm: &str, status: &str, reason: &str) -> (String, String, String) {
    (mcm.into(), status.into(), reason.into())
}

#[test]
fn one_line_per_mcm_and_failure_when_one_would_not_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = preflight(dir.path(), MCMS, &[]);
    assert_eq!(
        verdicts(&out),
        vec![
            v("built", "Success", "WouldBuild"),
            v("pinned-kernel", "Failure", "NoMapping"),
            v("prebuilt", "Success", "ImageExists"),
        ],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("reg.example/labs/b:{KERNEL} does not exist yet")),
        "the image names the spoke namespace: {stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without --inputs"),
        "says what it did not check"
    );
    assert_eq!(out.status.code(), Some(1), "one MCM would not work");

    // Only the two that map the kernel: exit 0.
    let two = MCMS
        .split("  - apiVersion")
        .take(3)
        .collect::<Vec<_>>()
        .join("  - apiVersion");
    let out = preflight(dir.path(), &two, &[]);
    assert_eq!(verdicts(&out).len(), 2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// With the hub's ConfigMaps and Secrets, a build whose Dockerfile ConfigMap is missing is
/// a failure that names it; with the ConfigMap (no DTK_AUTO) it would build; with DTK_AUTO
/// and no Driver Toolkit row it would not.
#[test]
fn build_inputs_are_checked_from_the_hubs_objects() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs.yaml");
    let only_built = MCMS
        .split("  - apiVersion")
        .take(3)
        .collect::<Vec<_>>()
        .join("  - apiVersion");
    std::fs::write(&inputs, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    let out = preflight(
        dir.path(),
        &only_built,
        &["--inputs", inputs.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        verdicts(&out).contains(&v("built", "Failure", "DockerfileMissing")),
        "{stdout}"
    );
    assert!(
        stdout.contains("Dockerfile ConfigMap kmm-hub/df does not exist"),
        "{stdout}"
    );
    assert!(!out.status.success());

    std::fs::write(
        &inputs,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: df, namespace: kmm-hub}\ndata: {dockerfile: \"FROM scratch\\n\"}\n",
    )
    .unwrap();
    let out = preflight(
        dir.path(),
        &only_built,
        &["--inputs", inputs.to_str().unwrap()],
    );
    assert!(verdicts(&out).contains(&v("built", "Success", "WouldBuild")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    std::fs::write(
        &inputs,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: df, namespace: kmm-hub}\ndata: {dockerfile: \"ARG DTK_AUTO\\nFROM ${DTK_AUTO}\\n\"}\n",
    )
    .unwrap();
    let out = preflight(
        dir.path(),
        &only_built,
        &["--inputs", inputs.to_str().unwrap()],
    );
    assert!(verdicts(&out).contains(&v("built", "Failure", "DriverToolkitMissing")));
    let config = dir.path().join("hub-config.yaml");
    std::fs::write(
        &config,
        "driverToolkit:\n  - {kernel: '^5\\.14', image: 'dtk:5.14'}\n",
    )
    .unwrap();
    let out = preflight(
        dir.path(),
        &only_built,
        &[
            "--inputs",
            inputs.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert!(verdicts(&out).contains(&v("built", "Success", "WouldBuild")));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mcms.yaml"), MCMS).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kmm-hub"))
        .args(["preflight", "--kernel", "6.1", "--mcm"])
        .arg(dir.path().join("mcms.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 3 parts"), "{stderr}");
    let bad = MCMS.replace("'^.*$'", "'('");
    let out = preflight(dir.path(), &bad, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("InvalidSpec") && stdout.contains("kernelMappings[0].regexp"),
        "{stdout}"
    );
    assert!(!out.status.success());
}

/// Without `--digests` the registries are asked; one that does not answer is "in progress"
/// (not known yet), not a failure of the MCM — and not a success either: exit 1.
#[test]
fn an_unreachable_registry_is_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    // A loopback port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let one = MCMS
        .split("  - apiVersion")
        .take(2)
        .collect::<Vec<_>>()
        .join("  - apiVersion")
        .replace("reg.example/a:", &format!("127.0.0.1:{port}/a:"));
    std::fs::write(dir.path().join("mcms.yaml"), one).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kmm-hub"))
        .args(["preflight", "--kernel", KERNEL, "--mcm"])
        .arg(dir.path().join("mcms.yaml"))
        .output()
        .unwrap();
    assert_eq!(
        verdicts(&out),
        vec![v("prebuilt", "InProgress", "RegistryUnavailable")],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1));
}
