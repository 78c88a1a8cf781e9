use super::*;
use shared_api::module::{BuildArg, KanikoParams, LocalObjectReference};

fn build() -> Build {
    Build {
        build_args: vec![BuildArg {
            name: "ARG_NAME".into(),
            value: "v".into(),
        }],
        dockerfile_config_map: Some(LocalObjectReference::new("build-module-labs")),
        secrets: vec![LocalObjectReference::new("git-token")],
        kaniko_params: Some(KanikoParams {
            tag: Some("debug".into()),
        }),
        selector: BTreeMap::from([("node-role.kubernetes.io/worker".to_string(), String::new())]),
        ..Default::default()
    }
}

fn res() -> &'static ResourceRequirements {
    static R: std::sync::OnceLock<ResourceRequirements> = std::sync::OnceLock::new();
    R.get_or_init(crate::config::default_build_resources)
}

fn inputs<'a>(b: &'a Build, dockerfile: &'a str) -> BuildInputs<'a> {
    BuildInputs {
        mcm: "kmm-ci-a",
        namespace: "kmm-hub",
        image: "127.0.0.1:5000/labs/kmm-ci-a:5.14.0-1.el9.x86_64",
        kernel: "5.14.0-1.el9.x86_64",
        mod_name: "kmm-ci-a",
        mod_namespace: "labsv2",
        build: b,
        dockerfile,
        registry_tls: TlsOptions::default(),
        registry_secret: true,
        kaniko_image: "registry.local:5000/kaniko/executor:v1",
        dtk_image: Some("registry.local/dtk:5.14"),
        attempt: 1,
        resources: res(),
        deadline: Duration::from_secs(1800),
        extra_args: Default::default(),
    }
}

/// A layered build (spec.day0): the hub's RHCOS and toolkit arguments win over the user's.
#[test]
fn layering_arguments_are_added_and_win() {
    let mut b = build();
    b.build_args.push(shared_api::module::BuildArg {
        name: "RHCOS_IMAGE".into(),
        value: "user-choice".into(),
    });
    let mut i = inputs(&b, "ARG RHCOS_IMAGE\nFROM ${RHCOS_IMAGE}\n");
    i.extra_args = [
        ("RHCOS_IMAGE".to_string(), "reg/rhcos@sha256:aa".to_string()),
        (
            "DTK_IMAGE".to_string(),
            "registry.local/dtk:5.14".to_string(),
        ),
    ]
    .into();
    let job = render_build_job(&i);
    let args = job.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    for want in [
        "--build-arg=RHCOS_IMAGE=reg/rhcos@sha256:aa",
        "--build-arg=DTK_IMAGE=registry.local/dtk:5.14",
        "--build-arg=DTK_AUTO=registry.local/dtk:5.14",
        "--build-arg=KERNEL_VERSION=5.14.0-1.el9.x86_64",
        "--build-arg=KERNEL_FULL_VERSION=5.14.0-1.el9.x86_64",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    assert!(!args.iter().any(|a| a.contains("user-choice")), "{args:?}");
}

#[test]
fn job_carries_everything_kaniko_needs() {
    let b = build();
    let job = render_build_job(&inputs(&b, "ARG DTK_AUTO\nFROM ${DTK_AUTO}\n"));
    assert_eq!(
        job.metadata.name.as_deref(),
        Some(
            job_name(
                "kmm-ci-a",
                "127.0.0.1:5000/labs/kmm-ci-a:5.14.0-1.el9.x86_64"
            )
            .as_str()
        )
    );
    let spec = job.spec.unwrap().template.spec.unwrap();
    let c = &spec.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.local:5000/kaniko/executor:debug"),
        "tag swapped, port kept"
    );
    let args = c.args.clone().unwrap();
    for expected in [
        "--destination=127.0.0.1:5000/labs/kmm-ci-a:5.14.0-1.el9.x86_64",
        "--insecure",
        "--build-arg=ARG_NAME=v",
        "--build-arg=KERNEL_VERSION=5.14.0-1.el9.x86_64",
        "--build-arg=KERNEL_FULL_VERSION=5.14.0-1.el9.x86_64",
        "--build-arg=MOD_NAME=kmm-ci-a",
        "--build-arg=MOD_NAMESPACE=labsv2",
        "--build-arg=DTK_AUTO=registry.local/dtk:5.14",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "missing {expected} in {args:?}"
        );
    }
    let mounts: Vec<&str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(
        mounts,
        vec!["/workspace", "/kaniko/.docker", "/run/secrets/git-token"]
    );
    assert_eq!(spec.node_selector.as_ref().unwrap().len(), 1);
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
}

#[test]
fn build_pods_mount_only_their_copies_and_are_contained() {
    let b = build();
    let job = render_build_job(&inputs(&b, "FROM x"));
    let name = job.metadata.name.clone().unwrap();
    let job_spec = job.spec.unwrap();
    assert_eq!(job_spec.active_deadline_seconds, Some(1800));
    let spec = job_spec.template.spec.unwrap();
    // Volumes name the per-Job copies only, never the MCM's own Secrets/ConfigMaps.
    let sources: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            v.secret
                .as_ref()
                .and_then(|s| s.secret_name.clone())
                .or_else(|| v.config_map.as_ref().map(|c| c.name.clone()))
        })
        .collect();
    assert_eq!(
        sources,
        vec![
            dockerfile_copy(&name),
            registry_copy(&name),
            secret_copy(&name, 0)
        ]
    );
    assert_eq!(
        spec.image_pull_secrets.unwrap()[0].name,
        registry_copy(&name)
    );
    let c = &spec.containers[0];
    assert_eq!(c.resources.as_ref(), Some(res()));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["NET_RAW".to_string()][..])
    );
    assert_eq!(
        spec.security_context
            .unwrap()
            .seccomp_profile
            .unwrap()
            .type_,
        "RuntimeDefault"
    );
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.enable_service_links, Some(false));
    assert!(
        spec.tolerations.is_none(),
        "no spoke tolerations on hub builds"
    );
    let mut without = inputs(&b, "FROM x");
    without.registry_secret = false;
    let spec = render_build_job(&without)
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert!(spec.image_pull_secrets.is_none());
}

#[test]
fn hash_follows_the_dockerfile_and_args() {
    let b = build();
    let a = render_build_job(&inputs(&b, "FROM x"));
    let same = render_build_job(&inputs(&b, "FROM x"));
    let other = render_build_job(&inputs(&b, "FROM y"));
    let h = |j: &Job| j.metadata.annotations.as_ref().unwrap()[BUILD_HASH_ANNOTATION].clone();
    assert_eq!(h(&a), h(&same));
    assert_ne!(h(&a), h(&other));
    let mut b2 = build();
    b2.build_args[0].value = "changed".into();
    assert_ne!(h(&a), h(&render_build_job(&inputs(&b2, "FROM x"))));
}

#[test]
fn dtk_detection_and_table() {
    assert!(wants_dtk_auto("ARG DTK_AUTO\nFROM ${DTK_AUTO} as builder"));
    assert!(wants_dtk_auto("arg DTK_AUTO=x"));
    assert!(!wants_dtk_auto("FROM ubi\nRUN echo DTK_AUTO"));
    let t = DtkTable::new(&[
        DtkEntry {
            kernel: r"^5\.14\.".into(),
            image: "dtk:414".into(),
        },
        DtkEntry {
            kernel: ".*".into(),
            image: "dtk:any".into(),
        },
    ])
    .unwrap();
    assert_eq!(t.image_for("5.14.0-1"), Some("dtk:414"));
    assert_eq!(t.image_for("6.1.0"), Some("dtk:any"));
    assert!(
        DtkTable::new(&[DtkEntry {
            kernel: "(".into(),
            image: "x".into()
        }])
        .is_err()
    );
}

#[test]
fn kaniko_tag_with_a_registry_port() {
    assert_eq!(
        with_tag("gcr.io/kaniko-project/executor:latest", "debug"),
        "gcr.io/kaniko-project/executor:debug"
    );
    assert_eq!(
        with_tag("reg:5000/kaniko/executor", "v1"),
        "reg:5000/kaniko/executor:v1"
    );
    assert_eq!(
        with_tag("reg:5000/kaniko/executor:v0@sha256:aa", "v1"),
        "reg:5000/kaniko/executor:v1"
    );
}
