//! What the image pipeline reads from the hub's namespace, read once per reconcile before the
//! per-image fan-out: the pull secret, the signing keys (from the Secret store, parsed once
//! per key pair) and the Dockerfile ConfigMaps (from the API, at most once each, and only when
//! a build needs one).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use shared_api::ManagedClusterModule;
use shared_api::module::{LocalObjectReference, Sign};
use tokio::sync::OnceCell;

use crate::decide::plan::Plan;
use crate::registry::{DockerConfig, DockerConfigError};
use crate::render::prerequisites::{DOCKER_CONFIG_JSON_KEY, PullSecretSource};
use crate::sign::{SignError, Signer};

/// A missing or unusable input of the hub's namespace. Messages name objects, never content.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InputError {
    #[error("pull secret {namespace}/{name} (spec.moduleSpec.imageRepoSecret) does not exist")]
    PullSecretMissing { namespace: String, name: String },
    #[error("pull secret {namespace}/{name} has no .dockerconfigjson key")]
    PullSecretNoKey { namespace: String, name: String },
    #[error("pull secret {namespace}/{name}: {source}")]
    PullSecretInvalid {
        namespace: String,
        name: String,
        source: DockerConfigError,
    },
    #[error("signing secret {namespace}/{name} does not exist")]
    SigningSecretMissing { namespace: String, name: String },
    #[error("secret {namespace}/{name} has no '{key}' entry")]
    SigningSecretNoEntry {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("signing key/certificate: {0}")]
    SigningMaterial(Arc<SignError>),
    #[error("Dockerfile ConfigMap {namespace}/{name} does not exist")]
    ConfigMapMissing { namespace: String, name: String },
    #[error("ConfigMap {namespace}/{name} has no 'dockerfile' key")]
    ConfigMapNoKey { namespace: String, name: String },
    #[error("cannot read ConfigMap {namespace}/{name}: {source}")]
    ConfigMapRead {
        namespace: String,
        name: String,
        source: Arc<kube::Error>,
    },
}

impl kmm_runtime::ErrorCategory for InputError {
    /// A short static category for metrics and logs.
    fn category(&self) -> &'static str {
        match self {
            InputError::PullSecretMissing { .. }
            | InputError::PullSecretNoKey { .. }
            | InputError::PullSecretInvalid { .. } => "pull_secret",
            InputError::SigningSecretMissing { .. }
            | InputError::SigningSecretNoEntry { .. }
            | InputError::SigningMaterial(_) => "signing_secret",
            InputError::ConfigMapMissing { .. } | InputError::ConfigMapNoKey { .. } => {
                "dockerfile_configmap"
            }
            InputError::ConfigMapRead { .. } => "kube_api",
        }
    }
}

/// The registry credentials of an MCM, from its `imageRepoSecret` in the Secret store.
pub fn docker_config(
    mcm: &ManagedClusterModule,
    namespace: &str,
    secret: impl Fn(&str) -> Option<Arc<Secret>>,
) -> Result<DockerConfig, InputError> {
    let Some(r) = &mcm.spec.module_spec.image_repo_secret else {
        return Ok(DockerConfig::default());
    };
    let name = &r.name;
    let ids = || (namespace.to_string(), name.clone());
    let s = secret(name).ok_or_else(|| {
        let (namespace, name) = ids();
        InputError::PullSecretMissing { namespace, name }
    })?;
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
        .ok_or_else(|| {
            let (namespace, name) = ids();
            InputError::PullSecretNoKey { namespace, name }
        })?;
    DockerConfig::parse(&bytes.0)
        .map(|c| c.from_secret(name))
        .map_err(|source| {
            let (namespace, name) = ids();
            InputError::PullSecretInvalid {
                namespace,
                name,
                source,
            }
        })
}

/// The pull secret to copy to the spokes (`spec.spokePrerequisites.pullSecret`): the
/// `.dockerconfigjson` of `imageRepoSecret` in the Secret store, checked as [`docker_config`]
/// checks it. Unavailable says why by name, never by content.
pub fn pull_secret_source(
    mcm: &ManagedClusterModule,
    namespace: &str,
    secret: impl Fn(&str) -> Option<Arc<Secret>>,
) -> PullSecretSource {
    let Some(r) = &mcm.spec.module_spec.image_repo_secret else {
        return PullSecretSource::None;
    };
    if !mcm.spec.prerequisites().pull_secret {
        return PullSecretSource::None;
    }
    if let Err(e) = docker_config(mcm, namespace, &secret) {
        return PullSecretSource::Unavailable(e.to_string());
    }
    match secret(&r.name)
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get(DOCKER_CONFIG_JSON_KEY).cloned())
    {
        Some(bytes) => PullSecretSource::Copy {
            name: r.name.clone(),
            dockerconfigjson: bytes.0,
        },
        None => PullSecretSource::Unavailable(format!(
            "pull secret {namespace}/{} has no {DOCKER_CONFIG_JSON_KEY} key",
            r.name
        )),
    }
}

type KeyPair = (String, String);

/// The Secrets and ConfigMaps one reconcile's images need, read once.
pub struct McmInputs {
    namespace: String,
    /// The Secrets the MCM names (pull secret, build secrets), as the store had them.
    secrets: BTreeMap<String, Arc<Secret>>,
    /// Signers by (key secret, certificate secret).
    signers: BTreeMap<KeyPair, Result<Arc<Signer>, InputError>>,
    /// Dockerfiles by ConfigMap name, read on first need.
    dockerfiles: BTreeMap<String, OnceCell<Result<String, InputError>>>,
}

/// Names only: never the content of a Secret or a key.
impl std::fmt::Debug for McmInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McmInputs")
            .field("namespace", &self.namespace)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("signers", &self.signers.keys().collect::<Vec<_>>())
            .field("dockerfiles", &self.dockerfiles.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn key_pair(sign: &Sign) -> KeyPair {
    let name = |r: Option<&LocalObjectReference>| r.map(|s| s.name.clone()).unwrap_or_default();
    (
        name(sign.key_secret.as_ref()),
        name(sign.cert_secret.as_ref()),
    )
}

impl McmInputs {
    /// Take from the Secret store everything the plan's images may need.
    pub fn read(
        mcm: &ManagedClusterModule,
        plan: &Plan,
        namespace: &str,
        secret: impl Fn(&str) -> Option<Arc<Secret>>,
    ) -> Self {
        let mut names: BTreeSet<String> = BTreeSet::new();
        if let Some(r) = &mcm.spec.module_spec.image_repo_secret {
            names.insert(r.name.clone());
        }
        let mut dockerfiles = BTreeMap::new();
        let mut signers = BTreeMap::new();
        for need in plan.images.values() {
            if let Some(b) = &need.build {
                names.extend(b.secrets.iter().map(|s| s.name.clone()));
                let cm = b.dockerfile_config_map.as_ref().map(|c| c.name.clone());
                dockerfiles.entry(cm.unwrap_or_default()).or_default();
            }
            if let Some(sign) = &need.sign {
                let pair = key_pair(sign);
                signers
                    .entry(pair)
                    .or_insert_with_key(|pair| read_signer(namespace, pair, &secret));
            }
        }
        let secrets = names
            .into_iter()
            .filter_map(|n| secret(&n).map(|s| (n, s)))
            .collect();
        Self {
            namespace: namespace.to_string(),
            secrets,
            signers,
            dockerfiles,
        }
    }

    /// A Secret the MCM names, as read for this reconcile.
    pub fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets.get(name).cloned()
    }

    /// The signer of a `sign` section.
    pub fn signer(&self, sign: &Sign) -> Result<Arc<Signer>, InputError> {
        let pair = key_pair(sign);
        match self.signers.get(&pair) {
            Some(s) => s.clone(),
            None => Err(InputError::SigningSecretMissing {
                namespace: self.namespace.clone(),
                name: pair.0,
            }),
        }
    }

    /// The Dockerfile of a ConfigMap of the hub's namespace, read once per reconcile.
    pub async fn dockerfile(
        &self,
        client: &kube::Client,
        name: &str,
    ) -> Result<String, InputError> {
        let read = || read_dockerfile(client, &self.namespace, name);
        match self.dockerfiles.get(name) {
            Some(cell) => cell.get_or_init(read).await.clone(),
            None => read().await,
        }
    }
}

async fn read_dockerfile(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<String, InputError> {
    let ids = || (namespace.to_string(), name.to_string());
    match Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
    {
        Ok(Some(cm)) => cm
            .data
            .and_then(|d| d.get("dockerfile").cloned())
            .ok_or_else(|| {
                let (namespace, name) = ids();
                InputError::ConfigMapNoKey { namespace, name }
            }),
        Ok(None) => {
            let (namespace, name) = ids();
            Err(InputError::ConfigMapMissing { namespace, name })
        }
        Err(e) => {
            let (namespace, name) = ids();
            Err(InputError::ConfigMapRead {
                namespace,
                name,
                source: Arc::new(e),
            })
        }
    }
}

/// The signing key and certificate (`key` and `cert` entries).
fn read_signer(
    namespace: &str,
    (key_secret, cert_secret): &KeyPair,
    secret: impl Fn(&str) -> Option<Arc<Secret>>,
) -> Result<Arc<Signer>, InputError> {
    let entry = |name: &str, key: &'static str| match secret(name) {
        Some(s) => s
            .data
            .as_ref()
            .and_then(|d| d.get(key).map(|b| b.0.clone()))
            .ok_or_else(|| InputError::SigningSecretNoEntry {
                namespace: namespace.to_string(),
                name: name.to_string(),
                key,
            }),
        None => Err(InputError::SigningSecretMissing {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
    };
    let key = entry(key_secret, "key")?;
    let cert = entry(cert_secret, "cert")?;
    Signer::from_pem_or_der(&key, &cert)
        .map(Arc::new)
        .map_err(|e| InputError::SigningMaterial(Arc::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::plan::plan;
    use crate::decide::plan::tests::{cluster, mcm};
    use k8s_openapi::ByteString;
    use kmm_runtime::ErrorCategory as _;

    fn store(secrets: &[(&str, &str, &[u8])]) -> impl Fn(&str) -> Option<Arc<Secret>> + use<> {
        let map: BTreeMap<String, Arc<Secret>> = secrets
            .iter()
            .map(|(name, key, value)| {
                let mut s = Secret::default();
                s.metadata.name = Some(name.to_string());
                s.data = Some([(key.to_string(), ByteString(value.to_vec()))].into());
                (name.to_string(), Arc::new(s))
            })
            .collect();
        move |n: &str| map.get(n).cloned()
    }

    const SIGNED: &str = r#"
spokeNamespace: ns
selector: {}
moduleSpec:
  selector: {}
  imageRepoSecret: {name: pull}
  moduleLoader:
    container:
      modprobe: {moduleName: m}
      kernelMappings:
        - regexp: '^5.*$'
          containerImage: reg/m:${KERNEL_FULL_VERSION}
          sign:
            keySecret: {name: key}
            certSecret: {name: cert}
            filesToSign: [/m.ko]
"#;

    #[test]
    fn pull_secret_errors_name_the_secret() {
        let m = mcm(SIGNED);
        let e = docker_config(&m, "hub", store(&[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pull secret hub/pull (spec.moduleSpec.imageRepoSecret) does not exist"
        );
        let e = docker_config(&m, "hub", store(&[("pull", "other", &b"{}"[..])])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pull secret hub/pull has no .dockerconfigjson key"
        );
        assert_eq!(e.category(), "pull_secret");
        let ok = store(&[("pull", ".dockerconfigjson", &br#"{"auths":{}}"#[..])]);
        assert!(docker_config(&m, "hub", ok).is_ok());
    }

    #[test]
    fn the_pull_secret_is_copied_only_when_asked_and_readable() {
        let ok = br#"{"auths":{}}"#;
        let m = mcm(SIGNED);
        let store_ok = store(&[("pull", ".dockerconfigjson", &ok[..])]);
        assert_eq!(
            pull_secret_source(&m, "hub", &store_ok),
            PullSecretSource::None
        );
        let asked = mcm(&format!(
            "{SIGNED}spokePrerequisites: {{pullSecret: true}}\n"
        ));
        assert_eq!(
            pull_secret_source(&asked, "hub", &store_ok),
            PullSecretSource::Copy {
                name: "pull".into(),
                dockerconfigjson: ok.to_vec()
            }
        );
        assert_eq!(
            pull_secret_source(&asked, "hub", store(&[])),
            PullSecretSource::Unavailable(
                "pull secret hub/pull (spec.moduleSpec.imageRepoSecret) does not exist".into()
            )
        );
        let bad = store(&[("pull", ".dockerconfigjson", &b"not json"[..])]);
        assert!(matches!(
            pull_secret_source(&asked, "hub", bad),
            PullSecretSource::Unavailable(_)
        ));
    }

    #[test]
    fn signing_keys_are_read_once_per_key_pair() {
        let m = mcm(SIGNED);
        let clusters = [cluster("a", &[], Some(&["5.1", "5.2"]))];
        let p = plan(&m, &clusters).unwrap();
        assert_eq!(p.images.len(), 2);
        let calls = std::cell::Cell::new(0);
        let lookup = |_: &str| {
            calls.set(calls.get() + 1);
            None
        };
        let inputs = McmInputs::read(&m, &p, "hub", lookup);
        // Key (missing: the certificate is not asked for) and the pull secret.
        assert_eq!(calls.get(), 2, "one read per Secret, not per image");
        let sign = p.images.values().next().unwrap().sign.clone().unwrap();
        let e = inputs.signer(&sign).unwrap_err();
        assert_eq!(e.to_string(), "signing secret hub/key does not exist");
        assert_eq!(e.category(), "signing_secret");
    }

    #[test]
    fn debug_shows_names_never_content() {
        let m = mcm(SIGNED);
        let p = plan(&m, &[cluster("a", &[], Some(&["5.1"]))]).unwrap();
        let secret = b"{\"auths\":{\"r\":{\"auth\":\"c2VjcmV0OnB3\"}}}";
        let inputs = McmInputs::read(
            &m,
            &p,
            "hub",
            store(&[("pull", ".dockerconfigjson", &secret[..])]),
        );
        let shown = format!("{inputs:?}");
        assert!(shown.contains("pull"), "{shown}");
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains("auths"),
            "{shown}"
        );
    }
}
