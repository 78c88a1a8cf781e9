//! A real OCI registry (Debian's `docker-registry` 2.8) on a loopback port: plain HTTP,
//! storage in the fleet directory, optional htpasswd (bcrypt) authentication.
//!
//! `stop()` and `start()` keep the port and the storage, for "registry down and back"
//! scenarios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;

use crate::oci::RegistryAccess;
use crate::process::{ManagedProcess, free_port, http_get};
use crate::provision::Binaries;

/// The user name of an authenticated registry.
pub const REGISTRY_USER: &str = "kmm";

#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    port: u16,
    program: PathBuf,
    credentials: Option<(String, String)>,
    process: Option<ManagedProcess>,
}

impl Registry {
    /// Writes the configuration under `dir` (created) and starts the registry on a free
    /// port. With `auth`, pushes and pulls need [`REGISTRY_USER`] and a random password.
    pub async fn run(binaries: &Binaries, dir: &Path, auth: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("storage"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let port = free_port()?;
        let credentials = if auth {
            let password = random_password();
            let out = std::process::Command::new(&binaries.htpasswd)
                .args(["-Bbn", REGISTRY_USER, &password])
                .output()
                .context("running htpasswd")?;
            if !out.status.success() {
                bail!(
                    "htpasswd -Bbn failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::fs::write(dir.join("htpasswd"), &out.stdout).context("writing htpasswd file")?;
            Some((REGISTRY_USER.to_string(), password))
        } else {
            None
        };
        std::fs::write(dir.join("config.yml"), config_yaml(dir, port, auth))
            .context("writing registry config")?;
        let mut registry = Self {
            dir: dir.to_path_buf(),
            port,
            program: binaries.docker_registry.clone(),
            credentials,
            process: None,
        };
        registry.start().await?;
        Ok(registry)
    }

    /// Starts the registry again (same port, same storage, same credentials).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let args = vec![
            "serve".to_string(),
            self.dir.join("config.yml").display().to_string(),
        ];
        let mut process = ManagedProcess::spawn(
            "docker-registry",
            &self.program,
            &args,
            &self.dir.join("registry.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // 200 without auth, 401 with: either way it serves the API.
            if let Ok((200 | 401, _)) = http_get(&self.host(), "/v2/").await {
                break;
            }
            if let Some(status) = process.exited() {
                bail!(
                    "docker-registry exited ({status}); log tail:\n{}",
                    process.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry not answering on {} after 30 s; log tail:\n{}",
                    self.host(),
                    process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(process);
        Ok(())
    }

    /// Stops the registry; the storage and the port stay reserved for [`Registry::start`].
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(5)).await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// `(user, password)` when authentication is on.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// How clients reach the registry, with the credentials when auth is on.
    pub fn access(&self) -> RegistryAccess {
        RegistryAccess {
            host: self.host(),
            username: self.credentials.as_ref().map(|(u, _)| u.clone()),
            password: self.credentials.as_ref().map(|(_, p)| p.clone()),
        }
    }

    /// The same registry without credentials (for "unauthenticated pull" checks).
    pub fn anonymous_access(&self) -> RegistryAccess {
        RegistryAccess {
            host: self.host(),
            username: None,
            password: None,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// A `kubernetes.io/dockerconfigjson` Secret with this registry's credentials (an
    /// entry without credentials when auth is off), for `imageRepoSecret` and builds.
    pub fn dockerconfigjson_secret(&self, name: &str, namespace: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_string(),
                ByteString(self.dockerconfigjson().into_bytes()),
            )])),
            ..Default::default()
        }
    }

    /// The `.dockerconfigjson` document for this registry.
    pub fn dockerconfigjson(&self) -> String {
        use base64::Engine as _;
        let entry = match &self.credentials {
            Some((u, p)) => serde_json::json!({
                "username": u,
                "password": p,
                "auth": base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")),
            }),
            None => serde_json::json!({}),
        };
        serde_json::json!({ "auths": { self.host(): entry } }).to_string()
    }
}

fn config_yaml(dir: &Path, port: u16, auth: bool) -> String {
    let auth_section = if auth {
        format!(
            "auth:\n  htpasswd:\n    realm: kmm-fleet\n    path: {}\n",
            dir.join("htpasswd").display()
        )
    } else {
        String::new()
    };
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: {secret}\n\
         health:\n  storagedriver:\n    enabled: false\n\
         {auth_section}",
        storage = dir.join("storage").display(),
        secret = random_password(),
    )
}

fn random_password() -> String {
    use rand::Rng as _;
    let bytes: [u8; 12] = rand::rng().random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_auth_only_when_asked() {
        let with = config_yaml(Path::new("/r"), 5000, true);
        assert!(with.contains("htpasswd:") && with.contains("addr: 127.0.0.1:5000"));
        assert!(!config_yaml(Path::new("/r"), 5000, false).contains("auth:"));
    }
}
