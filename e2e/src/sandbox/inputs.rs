//! What the labs need besides their MCMs: secrets, Dockerfiles, namespaces, ServiceAccounts
//! and prebuilt images.

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use serde_json::{Value, json};

use super::Sandbox;
use super::install::{self, HUB_NAMESPACE, MANAGER};
use crate::labs::{self, LAB_SERVICE_ACCOUNT, PULL_SECRET};
use crate::oci::{KmodImage, SignWith, push_kmod_image};

impl Sandbox {
    /// The labs' inputs on the hub and in the registry. Nothing on the spokes: the labs' MCMs
    /// ask for their namespace, ServiceAccount and pull secret (`spokePrerequisites`).
    pub async fn prepare_lab_inputs(&self) -> anyhow::Result<usize> {
        let hub = self.hub_client().await;
        let reg = self.fleet.registry();
        let pp = PatchParams::apply(MANAGER).force();
        let mut n = 0;
        Api::<Secret>::namespaced(hub.clone(), HUB_NAMESPACE)
            .patch(
                PULL_SECRET,
                &pp,
                &Patch::Apply(with_kind(
                    reg.dockerconfigjson_secret(PULL_SECRET, HUB_NAMESPACE),
                )),
            )
            .await?;
        for cm in labs::DOCKERFILE_CONFIGMAPS {
            install::apply(
                &hub,
                &json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": cm, "namespace": HUB_NAMESPACE},
                    "data": {"dockerfile": labs::LAB_DOCKERFILE}}),
            )
            .await?;
        }
        for ((name, key), value) in [
            (labs::SIGNING_KEY_SECRET, &self.keys.key_pem),
            (labs::SIGNING_CERT_SECRET, &self.keys.cert_pem),
        ] {
            use base64::Engine as _;
            install::apply(
                &hub,
                &json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": HUB_NAMESPACE},
                    "data": {key: base64::engine::general_purpose::STANDARD.encode(value)}}),
            )
            .await?;
        }
        n += 2 + labs::DOCKERFILE_CONFIGMAPS.len();
        n += self.push_lab_images().await?;
        Ok(n)
    }

    /// On one spoke: `namespace`, the labs' ServiceAccount and pull secret in it (for tests
    /// whose MCMs turn `spokePrerequisites` off or use another namespace).
    pub async fn prepare_spoke_namespace(
        &self,
        spoke: &Client,
        namespace: &str,
    ) -> anyhow::Result<()> {
        let pp = PatchParams::apply(MANAGER).force();
        install::apply(
            spoke,
            // Loaders and device plugins are privileged pods: this is the one namespace that
            // needs Pod Security's `privileged` level (docs/install.md).
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace,
                "labels": {"pod-security.kubernetes.io/enforce": "privileged"}}}),
        )
        .await?;
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(LAB_SERVICE_ACCOUNT.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(spoke.clone(), namespace)
            .patch(LAB_SERVICE_ACCOUNT, &pp, &Patch::Apply(with_kind(sa)))
            .await?;
        Api::<Secret>::namespaced(spoke.clone(), namespace)
            .patch(
                PULL_SECRET,
                &pp,
                &Patch::Apply(with_kind(
                    self.fleet
                        .registry()
                        .dockerconfigjson_secret(PULL_SECRET, namespace),
                )),
            )
            .await?;
        Ok(())
    }

    /// Push the prebuilt kmod images (signed with the sandbox key) and the device plugin.
    pub async fn push_lab_images(&self) -> anyhow::Result<usize> {
        let reg = self.fleet.registry();
        let access = reg.access();
        let host = reg.host();
        let mut n = 0;
        for img in labs::prebuilt_images() {
            let kernels: Vec<&str> = img.kernels.iter().map(String::as_str).collect();
            let mut k = KmodImage::new(&kernels, &img.modules);
            if img.signed {
                k.sign = Some(SignWith {
                    key: self.keys.key_pem_path.clone(),
                    cert: self.keys.cert_pem_path.clone(),
                });
            }
            push_kmod_image(&access, &format!("{host}/{}", img.path), &k)
                .await
                .with_context(|| format!("pushing {}", img.path))?;
            n += 1;
        }
        labs::push_device_plugin_image(&access, &format!("{host}/{}", labs::DEVICE_PLUGIN_IMAGE))
            .await
            .context("pushing the device plugin image")?;
        Ok(n + 1)
    }
}

/// A typed object as JSON with its apiVersion and kind (for server-side apply).
fn with_kind<K: kube::Resource<DynamicType = ()> + serde::Serialize>(obj: K) -> Value {
    let mut v = serde_json::to_value(&obj).unwrap_or(Value::Null);
    v["apiVersion"] = json!(K::api_version(&()));
    v["kind"] = json!(K::kind(&()));
    v
}
