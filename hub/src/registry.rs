//! Image existence and digests from the registry API (oci-client), with the module's
//! pull secret and TLS options, and a cache that expires, can be dropped per image
//! and never turns a failed lookup into anything but an error.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use shared_api::module::TlsOptions;

use crate::metrics::Metrics;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("image {0} does not exist in its registry")]
    NotFound(String),
    #[error("the registry refused the credentials for {0}")]
    Unauthorized(String),
    #[error("the registry of {image} cannot be reached: {reason}")]
    Unavailable { image: String, reason: String },
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
}

impl LookupError {
    /// A short static category for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            LookupError::NotFound(_) => "not_found",
            LookupError::Unauthorized(_) => "unauthorized",
            LookupError::Unavailable { .. } => "unavailable",
            LookupError::Invalid { .. } => "invalid",
        }
    }

    /// Whether the image is known not to exist (as opposed to not knowing).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LookupError::NotFound(_))
    }
}

/// Registry credentials from a `kubernetes.io/dockerconfigjson` Secret.
#[derive(Clone, Default)]
pub struct DockerConfig {
    auths: BTreeMap<String, (String, String)>,
}

impl std::fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerConfig")
            .field("registries", &self.auths.keys().collect::<Vec<_>>())
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
        Ok(Self { auths: out })
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

/// Loopback registries are plain HTTP by default, as for container runtimes.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

type AnnotatedDigest = (String, BTreeMap<String, String>);

#[derive(Clone)]
struct CacheEntry {
    digest: String,
    at: Instant,
}

/// Resolves image references to manifest digests, once per image per TTL.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    https: Client,
    https_skip_verify: Client,
    http: Client,
    ttl: Duration,
    cache: Mutex<HashMap<String, CacheEntry>>,
    /// Image → (digest, manifest annotations).
    annotations: Mutex<HashMap<String, AnnotatedDigest>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

fn client(protocol: ClientProtocol, skip_verify: bool) -> Client {
    Client::new(ClientConfig {
        protocol,
        accept_invalid_certificates: skip_verify,
        connect_timeout: Some(Duration::from_secs(5)),
        read_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    })
}

/// Install ring as the process-wide rustls provider (oci-client is built without one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Resolver {
    pub fn new(ttl: Duration, metrics: Metrics) -> Self {
        install_crypto_provider();
        Self {
            inner: Arc::new(Inner {
                https: client(ClientProtocol::Https, false),
                https_skip_verify: client(ClientProtocol::Https, true),
                http: client(ClientProtocol::Http, false),
                ttl,
                cache: Mutex::new(HashMap::new()),
                annotations: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }

    /// The oci-client to use for a registry with these TLS options.
    pub fn client_for(&self, registry: &str, tls: TlsOptions) -> &Client {
        if tls.insecure || is_loopback_registry(registry) {
            &self.inner.http
        } else if tls.insecure_skip_tls_verify {
            &self.inner.https_skip_verify
        } else {
            &self.inner.https
        }
    }

    /// The manifest digest of `image`, from the cache when fresh.
    pub async fn digest(
        &self,
        image: &str,
        tls: TlsOptions,
        creds: &DockerConfig,
    ) -> Result<String, LookupError> {
        if let Some(d) = self.cached(image) {
            self.inner.metrics.registry_cache_hits.inc();
            return Ok(d);
        }
        let reference = parse_reference(image)?;
        let registry = reference.resolve_registry().to_string();
        let auth = creds.auth_for(&registry);
        self.inner.metrics.registry_lookups.inc();
        let result = self
            .client_for(&registry, tls)
            .fetch_manifest_digest(&reference, &auth)
            .await;
        match result {
            Ok(digest) => {
                self.store(image, &digest);
                Ok(digest)
            }
            Err(e) => {
                let err = classify(image, e);
                self.inner
                    .metrics
                    .registry_errors
                    .get_or_create(&crate::metrics::CategoryLabel::new(err.category()))
                    .inc();
                Err(err)
            }
        }
    }

    /// The manifest digest and annotations of `image` (to tell who signed it). Fetched when
    /// the cached digest is unknown or differs from the cached annotations' digest.
    pub async fn annotations(
        &self,
        image: &str,
        tls: TlsOptions,
        creds: &DockerConfig,
    ) -> Result<(String, BTreeMap<String, String>), LookupError> {
        let digest = self.digest(image, tls, creds).await?;
        if let Some((d, a)) = self
            .inner
            .annotations
            .lock()
            .ok()
            .and_then(|c| c.get(image).cloned())
            && d == digest
        {
            return Ok((d, a));
        }
        let reference = parse_reference(image)?;
        let registry = reference.resolve_registry().to_string();
        let auth = creds.auth_for(&registry);
        self.inner.metrics.registry_lookups.inc();
        let (manifest, digest) = self
            .client_for(&registry, tls)
            .pull_manifest(&reference, &auth)
            .await
            .map_err(|e| classify(image, e))?;
        let annotations = match manifest {
            oci_client::manifest::OciManifest::Image(m) => m.annotations.unwrap_or_default(),
            oci_client::manifest::OciManifest::ImageIndex(i) => i.annotations.unwrap_or_default(),
        };
        if let Ok(mut c) = self.inner.annotations.lock() {
            c.insert(image.to_string(), (digest.clone(), annotations.clone()));
        }
        self.store(image, &digest);
        Ok((digest, annotations))
    }

    fn cached(&self, image: &str) -> Option<String> {
        let cache = self.inner.cache.lock().ok()?;
        cache
            .get(image)
            .filter(|e| e.at.elapsed() < self.inner.ttl)
            .map(|e| e.digest.clone())
    }

    /// Record a digest we know (e.g. after our own push).
    pub fn store(&self, image: &str, digest: &str) {
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.insert(
                image.to_string(),
                CacheEntry {
                    digest: digest.to_string(),
                    at: Instant::now(),
                },
            );
        }
    }

    /// Forget these images (rebuild trigger, our own pushes).
    pub fn invalidate<'a>(&self, images: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut cache) = self.inner.cache.lock() {
            for i in images {
                cache.remove(i);
            }
        }
    }

    /// Entries older than the TTL are dropped, so the next lookup re-pins moved tags.
    pub fn expire(&self) {
        if let Ok(mut cache) = self.inner.cache.lock() {
            let ttl = self.inner.ttl;
            cache.retain(|_, e| e.at.elapsed() < ttl);
        }
    }
}

pub fn parse_reference(image: &str) -> Result<Reference, LookupError> {
    Reference::try_from(image).map_err(|e| LookupError::Invalid {
        image: image.to_string(),
        reason: format!("not an image reference: {e}"),
    })
}

fn classify(image: &str, e: OciDistributionError) -> LookupError {
    let image = image.to_string();
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => LookupError::NotFound(image),
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => LookupError::Unauthorized(image),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                LookupError::NotFound(image)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                LookupError::Unauthorized(image)
            } else {
                LookupError::Unavailable {
                    image,
                    reason: envelope.to_string(),
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => LookupError::NotFound(image),
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => LookupError::Unauthorized(image),
        OciDistributionError::ServerError { code, message, .. } => LookupError::Unavailable {
            image,
            reason: format!("HTTP {code}: {message}"),
        },
        OciDistributionError::RequestError(r) => LookupError::Unavailable {
            image,
            reason: short_reqwest(&r),
        },
        other => LookupError::Unavailable {
            image,
            reason: other.to_string(),
        },
    }
}

fn short_reqwest(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused or unreachable".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.to_string()
    }
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

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_registry("127.0.0.1:5000"));
        assert!(is_loopback_registry("localhost"));
        assert!(!is_loopback_registry("myrepo.xyz"));
        assert!(!is_loopback_registry("10.0.0.1:5000"));
    }
}
