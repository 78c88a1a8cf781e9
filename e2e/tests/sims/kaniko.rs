//! The kaniko simulator: the lab Dockerfile built and pushed, and failures on purpose.

use anyhow::{Context as _, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kmm_e2e::fleet::Fleet;
use kmm_e2e::kmod;
use kmm_e2e::labs::LAB_DOCKERFILE;
use kmm_e2e::oci::{self};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use kmm_e2e::testkit::ensure_namespace;

use crate::{K1, container_state, eventually, failure_message, pull_secret};

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
pub(crate) async fn kaniko_builds(fleet: &Fleet) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    let ns = "sim-build";
    ensure_namespace(&hub, ns).await?;
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
