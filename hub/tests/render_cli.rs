//! `kmm-hub render`: the ManifestWorks the controller would write, offline.
#![allow(clippy::unwrap_used)] // test fixtures

use std::process::Command;

const MCM: &str = r#"
apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
kind: ManagedClusterModule
metadata: {name: mod-example}
spec:
  spokeNamespace: kmm-labs
  selector: {env: prod}
  moduleSpec:
    selector: {node-role.kubernetes.io/worker: ""}
    moduleLoader:
      container:
        modprobe: {moduleName: kmm_ci_a}
        kernelMappings:
          - regexp: '^5\.14.*$'
            containerImage: reg.example/kmm/$MOD_NAMESPACE/kmm-ci-a:${KERNEL_FULL_VERSION}
            build: {dockerfileConfigMap: {name: df}}
"#;

const CLUSTERS: &str = r#"
apiVersion: cluster.open-cluster-management.io/v1
kind: ManagedCluster
metadata: {name: c1, labels: {env: prod}}
spec: {hubAcceptsClient: true}
status:
  clusterClaims:
    - {name: kernel-versions.kmm.node.kubernetes.io, value: "5.14.0-1\n5.15.0-2"}
---
apiVersion: cluster.open-cluster-management.io/v1
kind: ManagedCluster
metadata: {name: c2, labels: {env: prod}}
spec: {hubAcceptsClient: true}
---
apiVersion: cluster.open-cluster-management.io/v1
kind: ManagedCluster
metadata: {name: c3, labels: {env: dev}}
spec: {hubAcceptsClient: true}
"#;

const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn render(dir: &std::path::Path, mcm: &str, digests: &str) -> std::process::Output {
    std::fs::write(dir.join("mcm.yaml"), mcm).unwrap();
    std::fs::write(dir.join("clusters.yaml"), CLUSTERS).unwrap();
    std::fs::write(dir.join("digests.yaml"), digests).unwrap();
    Command::new(env!("CARGO_BIN_EXE_kmm-hub"))
        .args(["render", "--mcm"])
        .arg(dir.join("mcm.yaml"))
        .arg("--clusters")
        .arg(dir.join("clusters.yaml"))
        .arg("--digests")
        .arg(dir.join("digests.yaml"))
        .output()
        .unwrap()
}

#[test]
fn renders_one_pinned_work_per_ready_cluster_and_reports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let out = render(
        dir.path(),
        MCM,
        &format!("reg.example/kmm/kmm-labs/kmm-ci-a:5.14.0-1: {DIGEST}\n"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let works: Vec<serde_json::Value> = stdout
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    assert_eq!(works.len(), 1, "{stdout}");
    assert_eq!(works[0]["metadata"]["namespace"], "c1");
    // The Module is the last manifest, after the spoke namespace (spokePrerequisites).
    let module = works[0]["spec"]["workload"]["manifests"]
        .as_array()
        .and_then(|m| m.last())
        .unwrap();
    assert_eq!(module["kind"], "Module");
    let mappings = &module["spec"]["moduleLoader"]["container"]["kernelMappings"];
    assert_eq!(mappings[0]["literal"], "5.14.0-1");
    assert_eq!(
        mappings[0]["containerImage"],
        format!("reg.example/kmm/kmm-labs/kmm-ci-a@{DIGEST}")
    );
    assert!(mappings[0].get("build").is_none());
    assert!(stderr.contains("cluster c2: NoKernelClaim"), "{stderr}");
    assert!(!stderr.contains("c3"), "c3 is not selected: {stderr}");
    assert!(
        !out.status.success(),
        "c2 has no work, so the preview says not everything renders"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let invalid = MCM.replace("'^5\\.14.*$'", "'('");
    let out = render(dir.path(), &invalid, "{}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("kernelMappings[0].regexp"), "{stderr}");
    let out = render(
        dir.path(),
        MCM,
        "reg.example/kmm/kmm-labs/kmm-ci-a:5.14.0-1: not-a-digest\n",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not sha256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `containerImage` pinned by the user (`repo@sha256:…`) passes through unchanged,
/// without an entry in `--digests` (and, without `--digests`, without a registry).
#[test]
fn a_digest_pinned_image_passes_through() {
    let pinned = format!("reg.example/kmm/kmm-ci-a@{DIGEST}");
    let mcm = MCM
        .replace(
            "reg.example/kmm/$MOD_NAMESPACE/kmm-ci-a:${KERNEL_FULL_VERSION}",
            &pinned,
        )
        .replace("            build: {dockerfileConfigMap: {name: df}}\n", "");
    let dir = tempfile::tempdir().unwrap();
    for with_digests in [true, false] {
        std::fs::write(dir.path().join("mcm.yaml"), &mcm).unwrap();
        std::fs::write(dir.path().join("clusters.yaml"), CLUSTERS).unwrap();
        std::fs::write(dir.path().join("digests.yaml"), "{}\n").unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kmm-hub"));
        cmd.args(["render", "--mcm"])
            .arg(dir.path().join("mcm.yaml"))
            .arg("--clusters")
            .arg(dir.path().join("clusters.yaml"));
        if with_digests {
            cmd.arg("--digests").arg(dir.path().join("digests.yaml"));
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("no digest"), "{stderr}");
        let work: serde_json::Value = serde_yaml::from_str(
            stdout
                .split("---\n")
                .find(|d| !d.trim().is_empty())
                .unwrap(),
        )
        .unwrap();
        let module = work["spec"]["workload"]["manifests"]
            .as_array()
            .and_then(|m| m.last())
            .unwrap();
        let mappings = &module["spec"]["moduleLoader"]["container"]["kernelMappings"];
        assert_eq!(mappings[0]["containerImage"], pinned.as_str(), "{stdout}");
    }
}

/// `spec.day0`: with the RHCOS images' kernels and the digests given, an OpenShift cluster's
/// work carries the MachineConfig with the pinned layered image; a plain cluster's does not;
/// without the kernel the cluster is reported.
#[test]
fn day0_renders_the_os_image_url_for_openshift_clusters() {
    const RHCOS: &str =
        "quay.io/ocp/rhcos@sha256:1276700000000000000000000000000000000000000000000000000000000000";
    let mcm = r#"
apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
kind: ManagedClusterModule
metadata: {name: simple-kmod}
spec:
  spokeNamespace: kmm-labs
  selector: {}
  moduleSpec:
    selector: {}
    devicePlugin: {container: {image: 'reg.example/dp:1'}}
  day0:
    machineConfigPool: worker
    containerImage: reg.example/os/rhcos-kmod
    build: {dockerfileConfigMap: {name: layering}}
"#;
    let clusters = format!(
        r#"
apiVersion: cluster.open-cluster-management.io/v1
kind: ManagedCluster
metadata: {{name: ocp, labels: {{vendor: OpenShift}}}}
spec: {{hubAcceptsClient: true}}
status:
  clusterClaims:
    - {{name: os-image.kmm.node.kubernetes.io, value: "{RHCOS}"}}
---
apiVersion: cluster.open-cluster-management.io/v1
kind: ManagedCluster
metadata: {{name: k8s}}
spec: {{hubAcceptsClient: true}}
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mcm.yaml"), mcm).unwrap();
    std::fs::write(d.join("clusters.yaml"), clusters).unwrap();
    let layered = "reg.example/os/rhcos-kmod:5.14.0-427.13.1.el9_4.x86_64-127670000000";
    std::fs::write(d.join("digests.yaml"), format!("{layered}: {DIGEST}\n")).unwrap();
    std::fs::write(
        d.join("kernels.yaml"),
        format!("'{RHCOS}': 5.14.0-427.13.1.el9_4.x86_64\n"),
    )
    .unwrap();
    let run = |kernels: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kmm-hub"));
        c.args(["render", "--mcm"])
            .arg(d.join("mcm.yaml"))
            .arg("--clusters")
            .arg(d.join("clusters.yaml"))
            .arg("--digests")
            .arg(d.join("digests.yaml"));
        if kernels {
            c.arg("--os-image-kernels").arg(d.join("kernels.yaml"));
        }
        c.output().unwrap()
    };
    let out = run(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let works: Vec<serde_json::Value> = stdout
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    let mc_of = |cluster: &str| {
        works
            .iter()
            .find(|w| w["metadata"]["namespace"] == cluster)
            .unwrap()["spec"]["workload"]["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["kind"] == "MachineConfig")
            .cloned()
    };
    let mc = mc_of("ocp").expect("a MachineConfig for the OpenShift cluster");
    assert_eq!(
        mc["spec"]["osImageURL"],
        format!("reg.example/os/rhcos-kmod@{DIGEST}")
    );
    assert_eq!(mc["metadata"]["name"], "99-worker-kmm-day0-simple-kmod");
    assert!(mc_of("k8s").is_none());

    let out = run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cluster ocp: day0: OSImageKernelUnknown"),
        "{stderr}"
    );
}
