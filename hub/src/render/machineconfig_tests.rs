#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use serde_json::Value;

use super::*;

fn day1(in_tree: Option<&str>) -> Day1 {
    Day1 {
        name: "99-sfc-kmm-day1".into(),
        pool: "sfc".into(),
        images: Day1Images::One("quay.io/example/sfc-kmod:5.14.0-427.el9.x86_64".into()),
        module: "sfc".into(),
        in_tree_module: in_tree.map(str::to_string),
    }
}

fn unit<'a>(mc: &'a Value, name: &str) -> &'a str {
    mc["spec"]["config"]["systemd"]["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no unit {name} in {mc}"))["contents"]
        .as_str()
        .unwrap()
}

fn file_text(mc: &Value, path: &str) -> (u64, String) {
    let f = mc["spec"]["config"]["storage"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("no file {path} in {mc}"));
    let source = f["contents"]["source"].as_str().unwrap();
    let data = source
        .strip_prefix("data:text/plain;charset=utf-8;base64,")
        .unwrap();
    let text = base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap();
    (
        f["mode"].as_u64().unwrap(),
        String::from_utf8(text).unwrap(),
    )
}

fn line_of<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in\n{unit}"))
}

#[test]
fn day1_machine_config_carries_both_scripts_and_units_for_the_pool() {
    let mc = day1_machine_config(&day1(None)).unwrap();
    assert_eq!(mc["apiVersion"], "machineconfiguration.openshift.io/v1");
    assert_eq!(mc["kind"], "MachineConfig");
    assert_eq!(mc["metadata"]["name"], "99-sfc-kmm-day1");
    assert_eq!(mc["metadata"]["labels"][ROLE_LABEL], "sfc");
    // Ignition's version is a string "3.x.y" (the MCO refuses anything else).
    assert_eq!(mc["spec"]["config"]["ignition"]["version"], "3.2.0");
    assert_eq!(
        file_text(&mc, LOAD_SCRIPT_PATH),
        (0o755, LOAD_SCRIPT.to_string())
    );
    assert_eq!(
        file_text(&mc, PULL_SCRIPT_PATH),
        (0o755, PULL_SCRIPT.to_string())
    );
    let units = mc["spec"]["config"]["systemd"]["units"].as_array().unwrap();
    assert_eq!(units.len(), 2);
    assert!(units.iter().all(|u| u["enabled"] == true), "{units:?}");
}

#[test]
fn load_runs_before_the_network_and_pull_after_network_manager() {
    let mc = day1_machine_config(&day1(None)).unwrap();
    let load = unit(&mc, "kmm-day1-load-sfc.service");
    let pull = unit(&mc, "kmm-day1-pull-sfc.service");

    let before = line_of(load, "Before");
    for want in [
        "network-pre.target",
        "NetworkManager.service",
        "kmm-day1-pull-sfc.service",
    ] {
        assert!(before.split(' ').any(|u| u == want), "Before={before}");
    }
    assert_eq!(line_of(load, "Wants"), "network-pre.target");
    // Without this, systemd orders the unit after basic.target, which is too late.
    assert_eq!(line_of(load, "DefaultDependencies"), "no");
    assert_eq!(line_of(load, "Type"), "oneshot");

    let after = line_of(pull, "After");
    for want in [
        "NetworkManager.service",
        "network-online.target",
        "kmm-day1-load-sfc.service",
    ] {
        assert!(after.split(' ').any(|u| u == want), "After={after}");
    }
    assert!(!pull.contains("DefaultDependencies"), "{pull}");
    assert_eq!(line_of(pull, "WantedBy"), "multi-user.target");
    assert_eq!(line_of(load, "WantedBy"), "multi-user.target");
}

#[test]
fn the_units_call_the_scripts_with_image_module_and_in_tree_module() {
    let image = "quay.io/example/sfc-kmod:5.14.0-427.el9.x86_64";
    // Without --in-tree-module the module replaces its in-tree namesake.
    let mc = day1_machine_config(&day1(None)).unwrap();
    assert_eq!(
        line_of(unit(&mc, "kmm-day1-load-sfc.service"), "ExecStart"),
        format!("{LOAD_SCRIPT_PATH} {image} sfc sfc")
    );
    assert_eq!(
        line_of(unit(&mc, "kmm-day1-pull-sfc.service"), "ExecStart"),
        format!("{PULL_SCRIPT_PATH} {image} sfc")
    );
    let mc = day1_machine_config(&day1(Some("sfc_old"))).unwrap();
    assert_eq!(
        line_of(unit(&mc, "kmm-day1-load-sfc.service"), "ExecStart"),
        format!("{LOAD_SCRIPT_PATH} {image} sfc sfc_old")
    );
}

#[test]
fn the_scripts_are_valid_bash_and_do_what_the_units_expect() {
    for (name, script) in [("load", LOAD_SCRIPT), ("pull", PULL_SCRIPT)] {
        assert!(script.starts_with("#!/bin/bash\n"), "{name}");
        let out = std::process::Command::new("bash")
            .args(["-n", "-c", script])
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The load script takes the modules of the running kernel from the image's /opt, removes
    // the in-tree module first and loads from its own module root.
    for want in [
        "/opt/lib/modules/$kernel",
        "modprobe -r \"$in_tree\"",
        "modprobe -d \"$work\" \"$module\"",
        "podman image exists",
    ] {
        assert!(LOAD_SCRIPT.contains(want), "load script lacks {want}");
    }
    let unload = LOAD_SCRIPT.find("modprobe -r").unwrap();
    let load = LOAD_SCRIPT.find("modprobe -d").unwrap();
    assert!(
        unload < load,
        "the in-tree module is removed before loading"
    );
    // The pull script reboots only after a pull, and at most once per image.
    let exists = PULL_SCRIPT.find("podman image exists").unwrap();
    let pull = PULL_SCRIPT.find("podman pull").unwrap();
    let reboot = PULL_SCRIPT.find("systemctl reboot").unwrap();
    assert!(exists < pull && pull < reboot);
    assert!(PULL_SCRIPT.contains("rebooted-for"));
}

#[test]
fn firmware_machine_config_adds_the_search_path_kernel_argument() {
    let mc = firmware_machine_config(&FirmwarePath {
        name: "99-worker-kmm-firmware".into(),
        pool: "worker".into(),
        path: "/var/lib/firmware".into(),
    })
    .unwrap();
    assert_eq!(mc["kind"], "MachineConfig");
    assert_eq!(mc["metadata"]["labels"][ROLE_LABEL], "worker");
    assert_eq!(
        mc["spec"]["kernelArguments"],
        serde_json::json!(["firmware_class.path=/var/lib/firmware"])
    );
    assert_eq!(
        mc["spec"]["config"]["ignition"]["version"],
        IGNITION_VERSION
    );
    assert!(mc["spec"]["config"].get("systemd").is_none());
}

#[test]
fn the_pool_selects_worker_and_its_own_configs_and_its_nodes() {
    let p = machine_config_pool("sfc").unwrap();
    assert_eq!(p["kind"], "MachineConfigPool");
    assert_eq!(p["metadata"]["name"], "sfc");
    assert_eq!(
        p["spec"]["machineConfigSelector"]["matchExpressions"],
        serde_json::json!([{"key": ROLE_LABEL, "operator": "In", "values": ["worker", "sfc"]}])
    );
    assert_eq!(
        p["spec"]["nodeSelector"]["matchLabels"],
        serde_json::json!({"node-role.kubernetes.io/sfc": ""})
    );
    assert_eq!(p["spec"]["maxUnavailable"], 1);
    assert_eq!(p["spec"]["paused"], false);
    for builtin in ["worker", "master"] {
        assert_eq!(
            machine_config_pool(builtin),
            Err(MachineConfigError::BuiltInPool(builtin.into()))
        );
    }
}

#[test]
fn values_that_would_break_the_units_or_the_api_are_refused() {
    let field_of = |d: Day1| match day1_machine_config(&d) {
        Err(MachineConfigError::Invalid { field, .. }) => field,
        other => panic!("{d:?} gave {other:?}"),
    };
    let with = |f: &dyn Fn(&mut Day1)| {
        let mut d = day1(None);
        f(&mut d);
        d
    };
    assert_eq!(field_of(with(&|d| d.name = "Bad_Name".into())), "name");
    assert_eq!(field_of(with(&|d| d.name = "a..b".into())), "name");
    assert_eq!(field_of(with(&|d| d.pool = "sfc.pool".into())), "pool");
    assert_eq!(field_of(with(&|d| d.pool = "x".repeat(64))), "pool");
    for image in [
        "quay.io/x y",
        "quay.io/x;reboot",
        "quay.io/%n",
        "$IMAGE",
        "",
    ] {
        assert_eq!(
            field_of(with(&|d| d.images = Day1Images::One(image.into()))),
            "image",
            "{image}"
        );
    }
    assert_eq!(field_of(with(&|d| d.module = "../sfc".into())), "module");
    assert_eq!(field_of(with(&|d| d.module = "m".repeat(56))), "module");
    assert_eq!(
        field_of(with(&|d| d.in_tree_module = Some("a b".into()))),
        "in-tree module"
    );
    // Digest references and registry ports are fine.
    let mut ok = day1(None);
    ok.images = Day1Images::One(format!(
        "registry.local:5000/kmod@sha256:{}",
        "a".repeat(64)
    ));
    assert!(day1_machine_config(&ok).is_ok());

    for path in ["var/lib/firmware", "/var/lib/firmware,/opt", "/a b", ""] {
        let got = firmware_machine_config(&FirmwarePath {
            name: "fw".into(),
            pool: "worker".into(),
            path: path.into(),
        });
        assert!(
            matches!(
                got,
                Err(MachineConfigError::Invalid {
                    field: "firmware path",
                    ..
                })
            ),
            "{path}: {got:?}"
        );
    }
}

#[test]
fn yaml_output_is_one_document_per_object_and_reads_back() {
    use serde::Deserialize as _;
    let objects = vec![
        day1_machine_config(&day1(None)).unwrap(),
        machine_config_pool("sfc").unwrap(),
    ];
    let text = to_yaml(&objects).unwrap();
    assert!(text.starts_with("---\n"));
    let back: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    assert_eq!(back, objects);
    // The Ignition version stays a YAML string, not a number.
    assert!(text.contains("version: 3.2.0"), "{text}");
}

#[test]
fn an_image_per_kernel_is_listed_in_a_file_the_units_name() {
    let a = format!("registry.local:5000/kmod@sha256:{}", "a".repeat(64));
    let b = format!("registry.local:5000/kmod@sha256:{}", "b".repeat(64));
    let mut d = day1(Some("sfc_old"));
    d.images = Day1Images::PerKernel(BTreeMap::from([
        ("5.14.0-427.el9.x86_64".to_string(), a.clone()),
        ("5.14.0-503.el9.x86_64".to_string(), b.clone()),
    ]));
    let mc = day1_machine_config(&d).unwrap();
    let (mode, text) = file_text(&mc, "/etc/kmm-day1/sfc.images");
    assert_eq!(mode, 0o644);
    assert_eq!(
        text,
        format!("5.14.0-427.el9.x86_64 {a}\n5.14.0-503.el9.x86_64 {b}\n")
    );
    assert!(unit(&mc, "kmm-day1-load-sfc.service").contains(&format!(
        "ExecStart={LOAD_SCRIPT_PATH} @/etc/kmm-day1/sfc.images sfc sfc_old\n"
    )));
    assert!(unit(&mc, "kmm-day1-pull-sfc.service").contains(&format!(
        "ExecStart={PULL_SCRIPT_PATH} @/etc/kmm-day1/sfc.images sfc\n"
    )));
    // Both scripts resolve `@FILE` by the running kernel.
    for script in [LOAD_SCRIPT, PULL_SCRIPT] {
        assert!(script.contains("image_for_kernel"), "{script}");
    }
    // A kernel that would break the file's lines is refused; so is an empty list.
    d.images = Day1Images::PerKernel(BTreeMap::from([("5.14 x".to_string(), a)]));
    assert!(day1_machine_config(&d).is_err());
    d.images = Day1Images::PerKernel(BTreeMap::new());
    assert!(day1_machine_config(&d).is_err());
}
