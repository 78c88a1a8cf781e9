//! `kmm-spoke render` on the lab files, through the real binary.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use shared_api::fixtures::Lab;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn render(module: &str, nodes: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kmm-spoke"))
        .args(["render", "--module", module, "--nodes", nodes])
        .env_remove("KMM_SPOKE_FIRMWARE_HOST_PATH")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn renders_the_device_plugin_lab() {
    let (ok, stdout, stderr) = render(&Lab::DevicePlugin.path(), &fixture("nodes.yaml"));
    assert!(ok, "{stderr}");
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("summary"))
        .collect();
    // One kernel among the schedulable workers (worker-arm's kernel is mapped too: ^.*), plus the plugin.
    assert_eq!(
        kinds,
        vec!["DaemonSet", "DaemonSet", "DaemonSet", "summary"],
        "{stdout}"
    );
    let summary = docs.last().unwrap();
    let labels = &summary["nodeLabels"];
    assert_eq!(
        labels["worker-0"]["kmm.node.kubernetes.io/kernel-version.full"],
        "5.14.0-284.36.1.el9_2.x86_64"
    );
    assert_eq!(
        labels["control-plane-0"]["kmm.node.kubernetes.io/kernel-version.full"],
        "5.14.0-284.36.1.el9_2.x86_64"
    );
    let scheduled = summary["scheduledOn"].as_object().unwrap();
    let on: Vec<Vec<&str>> = scheduled
        .values()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect()
        })
        .collect();
    assert!(on.contains(&vec!["worker-0", "worker-1"]), "{scheduled:?}");
    assert!(on.contains(&vec!["worker-arm"]), "{scheduled:?}");
    assert!(
        !stdout.contains("worker-tainted\n"),
        "the tainted worker is not targeted"
    );
    assert!(scheduled.contains_key("kmm-ci-a-device-plugin"));
}

#[test]
fn reports_every_violation_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(Lab::LoadDependencies.path())
        .unwrap()
        .replace(
            "- kmm-ci-a\n          - kmm-ci-b",
            "- kmm-ci-b\n          - kmm-ci-b",
        )
        .replace(
            "containerImage: quay.io/myrepo/kmmo-lab:kmm-kmod-${KERNEL_FULL_VERSION}",
            "containerImage: quay.io/myrepo/kmmo-lab",
        )
        .replace("regexp: '^.*\\.x86_64$'", "regexp: '(['");
    std::fs::write(&bad, text).unwrap();
    let (ok, stdout, stderr) = render(bad.to_str().unwrap(), &fixture("nodes.yaml"));
    assert!(!ok);
    assert!(stdout.is_empty(), "{stdout}");
    for path in [
        "spec.moduleLoader.container.modprobe.modulesLoadingOrder[0]",
        "spec.moduleLoader.container.modprobe.modulesLoadingOrder[1]",
        "spec.moduleLoader.container.kernelMappings[0].regexp",
        "spec.moduleLoader.container.kernelMappings[0].containerImage",
    ] {
        assert!(stderr.contains(path), "{path} missing in:\n{stderr}");
    }
}
