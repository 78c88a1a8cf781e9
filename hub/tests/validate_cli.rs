//! `kmm-hub validate` end to end: every problem with its path, non-zero exit; the seeds pass.

#![allow(clippy::unwrap_used)] // test fixtures

use std::process::Command;

const BROKEN: &str = r#"
apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
kind: ManagedClusterModule
metadata: {name: bad-regexp}
spec:
  spokeNamespace: labsv2
  selector: {name: spoke-1}
  moduleSpec:
    selector: {}
    moduleLoader:
      container:
        modprobe: {moduleName: kmm-ci-a}
        kernelMappings:
          - regexp: '^5\.14(.*$'
            containerImage: reg.example/kmm:${KERNEL_FULL_VERSION}
---
apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
kind: ManagedClusterModule
metadata: {name: both-literal-and-regexp}
spec:
  spokeNamespace: labsv2
  selector: {}
  moduleSpec:
    selector: {}
    moduleLoader:
      container:
        modprobe: {moduleName: kmm-ci-a}
        kernelMappings:
          - literal: 5.14.0-1
            regexp: '^.*$'
            containerImage: reg.example/kmm:1
---
apiVersion: hub.kmm.sigs.x-k8s.io/v1beta1
kind: ManagedClusterModule
metadata: {name: sign-outside-dir}
spec:
  spokeNamespace: labsv2
  selector: {}
  moduleSpec:
    selector: {}
    moduleLoader:
      container:
        modprobe: {moduleName: kmm_ci_a, dirName: /opt}
        kernelMappings:
          - regexp: '.*'
            containerImage: reg.example/kmm:${KERNEL_FULL_VERSION}
            buildd: {}
            build: {dockerfileConfigMap: {name: df}}
            sign:
              keySecret: {name: key}
              certSecret: {name: cert}
              filesToSign: [/lib/modules/kmm_ci_a.ko]
"#;

fn kmm_hub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kmm-hub"))
}

#[test]
fn three_broken_mcms_report_every_problem_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, BROKEN).unwrap();
    let out = kmm_hub().arg("validate").arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "must exit non-zero:\n{stdout}");
    let f = file.display().to_string();
    for expected in [
        format!(
            "{f}: ManagedClusterModule/bad-regexp: spec.moduleSpec.moduleLoader.container.kernelMappings[0].regexp: "
        ),
        format!(
            "{f}: ManagedClusterModule/both-literal-and-regexp: spec.moduleSpec.moduleLoader.container.kernelMappings[0]: exactly one of literal and regexp"
        ),
        format!(
            "{f}: ManagedClusterModule/sign-outside-dir: spec.moduleSpec.moduleLoader.container.kernelMappings[0].sign.filesToSign[0]: \"/lib/modules/kmm_ci_a.ko\" must be under the module directory"
        ),
        format!(
            "{f}: ManagedClusterModule/sign-outside-dir: spec.moduleSpec.moduleLoader.container.kernelMappings[0].buildd: unknown field"
        ),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing line starting {expected:?} in:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.lines().count(),
        4,
        "exactly the four problems:\n{stdout}"
    );
}

#[test]
fn seeds_examples_pass() {
    let seeds =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared-api/tests/fixtures/seeds");
    let labs: Vec<_> = std::fs::read_dir(&seeds)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("lab_"))
        .collect();
    assert_eq!(labs.len(), 7);
    let out = kmm_hub().arg("validate").args(&labs).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("7 object(s) valid"), "{stdout}");
}

#[test]
fn unreadable_and_non_yaml_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: [unclosed").unwrap();
    let out = kmm_hub()
        .arg("validate")
        .arg(&bad)
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("not valid YAML"), "{stdout}");
    assert!(stdout.contains("cannot read"), "{stdout}");
}
