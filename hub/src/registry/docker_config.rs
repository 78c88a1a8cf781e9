//! Registry credentials from a `kubernetes.io/dockerconfigjson` Secret.

use std::collections::BTreeMap;

use base64::Engine;
use oci_client::secrets::RegistryAuth;

/// Registry credentials from a `kubernetes.io/dockerconfigjson` Secret.
#[derive(Clone, Default)]
pub struct DockerConfig {
    auths: BTreeMap<String, (String, String)>,
    /// The Secret it was read from, so that its clients go when it changes.
    pub(super) secret: Option<String>,
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerConfig")
            .field("registries", &self.auths.keys().collect::<Vec<_>>())
            .field("secret", &self.secret)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DockerConfigError(String);

impl DockerConfig {
    /// Parse the `.dockerconfigjson` bytes (the `auths` map, `auth` or `username`/`password`).
    pub fn parse(bytes: &[u8]) -> Result<Self, DockerConfigError> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| DockerConfigError(format!(".dockerconfigjson is not JSON: {e}")))?;
        let auths = v
            .get("auths")
            .and_then(|a| a.as_object())
            .ok_or_else(|| DockerConfigError(".dockerconfigjson has no \"auths\" object".into()))?;
        let mut out = BTreeMap::new();
        for (host, entry) in auths {
            let pair = if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .map_err(|_| DockerConfigError(format!("auths[{host}].auth is not base64")))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| DockerConfigError(format!("auths[{host}].auth is not UTF-8")))?;
                let (u, p) = text.split_once(':').ok_or_else(|| {
                    DockerConfigError(format!("auths[{host}].auth is not user:password"))
                })?;
                (u.to_string(), p.to_string())
            } else {
                let s = |k: &str| {
                    entry
                        .get(k)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                (s("username"), s("password"))
            };
            out.insert(normalize_host(host), pair);
        }
        Ok(Self {
            auths: out,
            secret: None,
        })
    }

    /// Name the Secret this configuration was read from.
    pub fn from_secret(mut self, name: &str) -> Self {
        self.secret = Some(name.to_string());
        self
    }

    /// Credentials for a registry host, if the config has them.
    pub fn auth_for(&self, registry: &str) -> RegistryAuth {
        let key = normalize_host(registry);
        match self.auths.get(&key).or_else(|| {
            // docker.io is stored under its legacy index URL.
            (key == "docker.io" || key == "index.docker.io")
                .then(|| {
                    self.auths
                        .get("index.docker.io")
                        .or_else(|| self.auths.get("docker.io"))
                })
                .flatten()
        }) {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `127.0.0.1:5000` stays.
fn normalize_host(h: &str) -> String {
    let h = h
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    h.split('/').next().unwrap_or(h).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auth_and_docker_hub_alias() {
        let auth = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        let json = format!(
            r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"u","password":"p"}}}}}}"#
        );
        let c = DockerConfig::parse(json.as_bytes()).unwrap();
        assert!(
            matches!(c.auth_for("127.0.0.1:5000"), RegistryAuth::Basic(u, p) if u == "user" && p == "pa:ss")
        );
        assert!(matches!(c.auth_for("docker.io"), RegistryAuth::Basic(u, _) if u == "u"));
        assert!(matches!(c.auth_for("quay.io"), RegistryAuth::Anonymous));
        assert!(
            !format!("{c:?}").contains("pa:ss"),
            "Debug must not show secrets"
        );
        assert!(DockerConfig::parse(b"{}").is_err());
    }
}
