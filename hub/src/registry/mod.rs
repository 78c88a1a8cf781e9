//! Image existence and digests from the registry API (oci-client), with the module's
//! pull secret and TLS options, and a cache that expires, can be dropped per image
//! and never turns a failed lookup into anything but an error.

use kmm_runtime::ErrorCategory as _;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use shared_api::module::TlsOptions;

use crate::metrics::Metrics;

mod docker_config;
mod lookup_error;

pub use docker_config::{DockerConfig, DockerConfigError};
pub use lookup_error::LookupError;
use lookup_error::classify;

/// Loopback registries are plain HTTP by default, as for container runtimes.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// How a registry is reached: the TLS options decide the oci-client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Transport {
    Http,
    Https,
    HttpsSkipVerify,
}

impl Transport {
    fn of(registry: &str, tls: TlsOptions) -> Self {
        if tls.insecure || is_loopback_registry(registry) {
            Transport::Http
        } else if tls.insecure_skip_tls_verify {
            Transport::HttpsSkipVerify
        } else {
            Transport::Https
        }
    }

    fn client(self) -> Client {
        let (protocol, skip_verify) = match self {
            Transport::Http => (ClientProtocol::Http, false),
            Transport::Https => (ClientProtocol::Https, false),
            Transport::HttpsSkipVerify => (ClientProtocol::Https, true),
        };
        client(protocol, skip_verify)
    }
}

/// Who asks: a SHA-256 over the credential (never the credential itself), `None` when
/// anonymous. Clients, cached digests and annotations are kept apart per credential.
type CredentialId = Option<[u8; 32]>;

fn credential_id(auth: &RegistryAuth) -> CredentialId {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    match auth {
        RegistryAuth::Anonymous => return None,
        RegistryAuth::Basic(u, p) => {
            h.update(b"basic\0");
            h.update(u.as_bytes());
            h.update(b"\0");
            h.update(p.as_bytes());
        }
        RegistryAuth::Bearer(t) => {
            h.update(b"bearer\0");
            h.update(t.as_bytes());
        }
    }
    Some(h.finalize().into())
}

/// One oci-client per (registry, transport, credential): an oci-client keeps the first
/// credential it is given per registry host and its bearer tokens, so sharing one between
/// credentials would lend one MCM's access to another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    registry: String,
    transport: Transport,
    credential: CredentialId,
}

struct ClientSlot {
    client: Client,
    /// The Secrets whose credential this client holds (dropped when one of them changes).
    secrets: BTreeSet<String>,
    used: Instant,
}

/// Digests and annotations are cached per image, transport and credential: what one
/// credential may read says nothing about another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    image: String,
    transport: Transport,
    credential: CredentialId,
}

#[derive(Clone)]
struct CacheEntry {
    digest: String,
    /// Expiry, with jitter so that entries stored together do not all expire together.
    until: Instant,
}

#[derive(Clone)]
struct AnnotatedDigest {
    digest: String,
    annotations: BTreeMap<String, String>,
    until: Instant,
}

/// Registry requests per second (token bucket) and the burst allowed above it.
pub const REGISTRY_QPS: f64 = 20.0;
pub const REGISTRY_BURST: f64 = 40.0;

/// A token bucket shared by every registry request of the hub.
struct Limiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate: rate.max(0.001),
            burst: burst.max(1.0),
            state: Mutex::new((burst.max(1.0), Instant::now())),
        }
    }

    /// Take one token, waiting for it when the bucket is empty.
    async fn acquire(&self) {
        let wait = {
            let Ok(mut s) = self.state.lock() else { return };
            let now = Instant::now();
            let (tokens, last) = *s;
            let tokens =
                (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst) - 1.0;
            *s = (tokens, now);
            (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / self.rate))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

/// At most this many RHCOS image kernels are remembered.
const OS_IMAGE_CACHE_MAX: usize = 1024;

/// `ttl` scaled by a random factor in [0.9, 1.1).
pub fn jittered(ttl: Duration) -> Duration {
    use rand::Rng as _;
    ttl.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// Resolves image references to manifest digests, once per image, credential and TTL.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Mutex<HashMap<ClientKey, ClientSlot>>,
    last_prune: Mutex<Instant>,
    ttl: Duration,
    cache: Mutex<HashMap<CacheKey, CacheEntry>>,
    annotations: Mutex<HashMap<CacheKey, AnnotatedDigest>>,
    /// RHCOS image kernels (`ostree.linux`), by manifest digest: a digest's config never
    /// changes, so these never expire (bounded: cleared when full).
    os_image_kernels: Mutex<HashMap<String, Option<String>>>,
    /// Digests the hub pushed itself, by image (signing).
    produced: Mutex<HashMap<String, (String, Instant)>>,
    limiter: Limiter,
    metrics: Metrics,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("ttl", &self.inner.ttl)
            .field("clients", &self.clients())
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

/// The digest of a reference pinned as `repo@sha256:<64 hex>`, if it is.
pub fn pinned_digest(image: &str) -> Option<&str> {
    let (_, d) = image.rsplit_once('@')?;
    let hex = d.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(d)
}

impl Resolver {
    pub fn new(ttl: Duration, metrics: Metrics) -> Self {
        Self::with_rate(ttl, metrics, REGISTRY_QPS, REGISTRY_BURST)
    }

    pub fn with_rate(ttl: Duration, metrics: Metrics, qps: f64, burst: f64) -> Self {
        install_crypto_provider();
        Self {
            inner: Arc::new(Inner {
                clients: Mutex::new(HashMap::new()),
                last_prune: Mutex::new(Instant::now()),
                ttl,
                cache: Mutex::new(HashMap::new()),
                annotations: Mutex::new(HashMap::new()),
                os_image_kernels: Mutex::new(HashMap::new()),
                produced: Mutex::new(HashMap::new()),
                limiter: Limiter::new(qps, burst),
                metrics,
            }),
        }
    }

    /// How many registry clients are kept (one per registry, transport and credential).
    pub fn clients(&self) -> usize {
        self.inner.clients.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// The client, credential and cache key for `image` asked with `creds`.
    fn client_for(
        &self,
        reference: &Reference,
        image: &str,
        tls: TlsOptions,
        creds: &DockerConfig,
    ) -> (Client, RegistryAuth, CacheKey) {
        self.prune_now_and_then();
        let registry = reference.resolve_registry().to_string();
        let auth = creds.auth_for(&registry);
        let transport = Transport::of(&registry, tls);
        let credential = credential_id(&auth);
        let key = ClientKey {
            registry,
            transport,
            credential,
        };
        let client = match self.inner.clients.lock() {
            Ok(mut clients) => {
                let slot = clients.entry(key).or_insert_with(|| ClientSlot {
                    client: transport.client(),
                    secrets: BTreeSet::new(),
                    used: Instant::now(),
                });
                slot.used = Instant::now();
                if let Some(s) = &creds.secret
                    && credential.is_some()
                {
                    slot.secrets.insert(s.clone());
                }
                slot.client.clone()
            }
            Err(_) => transport.client(),
        };
        let cache_key = CacheKey {
            image: image.to_string(),
            transport,
            credential,
        };
        (client, auth, cache_key)
    }

    /// A client of its own for one signing run (it may talk to two registries with two
    /// credentials; nothing it learns is kept).
    pub fn fresh_client(&self, registry: &str, tls: TlsOptions) -> Client {
        Transport::of(registry, tls).client()
    }

    /// The manifest digest of `image`, from the cache when fresh. A reference already
    /// pinned by digest is its own answer: no registry is asked.
    pub async fn digest(
        &self,
        image: &str,
        tls: TlsOptions,
        creds: &DockerConfig,
    ) -> Result<String, LookupError> {
        if let Some(d) = pinned_digest(image) {
            return Ok(d.to_string());
        }
        let reference = parse_reference(image)?;
        let (client, auth, key) = self.client_for(&reference, image, tls, creds);
        if let Some(d) = self.cached(&key) {
            self.inner.metrics.registry_cache_hits.inc();
            return Ok(d);
        }
        self.inner.limiter.acquire().await;
        self.inner.metrics.registry_lookups.inc();
        match client.fetch_manifest_digest(&reference, &auth).await {
            Ok(digest) => {
                self.put(key, &digest);
                Ok(digest)
            }
            Err(e) => {
                let err = classify(image, e);
                self.count_error(&err);
                Err(err)
            }
        }
    }

    fn count_error(&self, err: &LookupError) {
        self.inner
            .metrics
            .registry_errors
            .get_or_create(&crate::metrics::CategoryLabel::new(err.category()))
            .inc();
    }

    /// The manifest digest and annotations of `image` (to tell who signed it). Fetched when
    /// the cached digest is unknown or differs from the cached annotations' digest.
    pub async fn annotations(
        &self,
        image: &str,
        tls: TlsOptions,
        creds: &DockerConfig,
    ) -> Result<(String, BTreeMap<String, String>), LookupError> {
        let reference = parse_reference(image)?;
        let digest = self.digest(image, tls, creds).await?;
        let (client, auth, key) = self.client_for(&reference, image, tls, creds);
        if let Some(a) = self
            .inner
            .annotations
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
            && a.digest == digest
            && a.until > Instant::now()
        {
            return Ok((a.digest, a.annotations));
        }
        self.inner.limiter.acquire().await;
        self.inner.metrics.registry_lookups.inc();
        let (manifest, digest) = client
            .pull_manifest(&reference, &auth)
            .await
            .map_err(|e| classify(image, e))
            .inspect_err(|e| self.count_error(e))?;
        let annotations = match manifest {
            oci_client::manifest::OciManifest::Image(m) => m.annotations.unwrap_or_default(),
            oci_client::manifest::OciManifest::ImageIndex(i) => i.annotations.unwrap_or_default(),
        };
        if let Ok(mut c) = self.inner.annotations.lock() {
            c.insert(
                key.clone(),
                AnnotatedDigest {
                    digest: digest.clone(),
                    annotations: annotations.clone(),
                    until: Instant::now() + jittered(self.inner.ttl),
                },
            );
        }
        if pinned_digest(image).is_none() {
            self.put(key, &digest);
        }
        Ok((digest, annotations))
    }

    /// The manifest digest of an RHCOS image and the kernel it boots (the `ostree.linux`
    /// label of its configuration; `None` without it). The digest is looked up as any
    /// image's; the configuration is read once per digest.
    pub async fn os_image(
        &self,
        image: &str,
        tls: TlsOptions,
        creds: &DockerConfig,
    ) -> Result<(String, Option<String>), LookupError> {
        let digest = self.digest(image, tls, creds).await?;
        if let Some(k) = self
            .inner
            .os_image_kernels
            .lock()
            .ok()
            .and_then(|c| c.get(&digest).cloned())
        {
            return Ok((digest, k));
        }
        let reference = parse_reference(image)?;
        let pinned = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            digest.clone(),
        );
        let (client, auth, _) = self.client_for(&pinned, image, tls, creds);
        self.inner.limiter.acquire().await;
        self.inner.metrics.registry_lookups.inc();
        let (_, _, config) = client
            .pull_manifest_and_config(&pinned, &auth)
            .await
            .map_err(|e| classify(image, e))
            .inspect_err(|e| self.count_error(e))?;
        let kernel = shared_api::day0::kernel_of_config(&config);
        if let Ok(mut c) = self.inner.os_image_kernels.lock() {
            if c.len() >= OS_IMAGE_CACHE_MAX {
                c.clear();
            }
            c.insert(digest.clone(), kernel.clone());
        }
        Ok((digest, kernel))
    }

    fn cached(&self, key: &CacheKey) -> Option<String> {
        let cache = self.inner.cache.lock().ok()?;
        cache
            .get(key)
            .filter(|e| e.until > Instant::now())
            .map(|e| e.digest.clone())
    }

    fn put(&self, key: CacheKey, digest: &str) {
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.insert(
                key,
                CacheEntry {
                    digest: digest.to_string(),
                    until: Instant::now() + jittered(self.inner.ttl),
                },
            );
        }
    }

    /// Record a digest the hub pushed itself (signing). Cached lookups of the image are
    /// dropped, so every credential asks the registry again.
    pub fn store(&self, image: &str, digest: &str) {
        self.invalidate([image]);
        if let Ok(mut p) = self.inner.produced.lock() {
            p.insert(image.to_string(), (digest.to_string(), Instant::now()));
        }
    }

    /// Whether the hub itself pushed `digest` as `image` (and still remembers it).
    pub fn produced(&self, image: &str, digest: &str) -> bool {
        self.inner
            .produced
            .lock()
            .ok()
            .and_then(|p| p.get(image).map(|(d, _)| d == digest))
            .unwrap_or(false)
    }

    /// Forget these images (rebuild trigger, our own pushes), for every credential.
    pub fn invalidate<'a>(&self, images: impl IntoIterator<Item = &'a str>) {
        let images: BTreeSet<&str> = images.into_iter().collect();
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.retain(|k, _| !images.contains(k.image.as_str()));
        }
        if let Ok(mut a) = self.inner.annotations.lock() {
            a.retain(|k, _| !images.contains(k.image.as_str()));
        }
    }

    /// A Secret changed or went: drop the clients holding its credential, with their
    /// tokens, and what they looked up.
    pub fn forget_secret(&self, secret: &str) {
        let dropped: BTreeSet<CredentialId> = match self.inner.clients.lock() {
            Ok(mut clients) => {
                let mut dropped = BTreeSet::new();
                clients.retain(|k, slot| {
                    let keep = !slot.secrets.contains(secret);
                    if !keep {
                        dropped.insert(k.credential);
                    }
                    keep
                });
                dropped
            }
            Err(_) => return,
        };
        if dropped.is_empty() {
            return;
        }
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.retain(|k, _| !dropped.contains(&k.credential));
        }
        if let Ok(mut a) = self.inner.annotations.lock() {
            a.retain(|k, _| !dropped.contains(&k.credential));
        }
    }

    /// Drop expired cache entries and clients unused for two TTLs (at most once a minute).
    fn prune_now_and_then(&self) {
        let due = self
            .inner
            .last_prune
            .lock()
            .map(|mut last| {
                let due = last.elapsed() >= Duration::from_secs(60);
                if due {
                    *last = Instant::now();
                }
                due
            })
            .unwrap_or(false);
        if due {
            self.expire();
        }
    }

    /// Entries past their (jittered) TTL are dropped, so the next lookup asks again; so
    /// are clients unused for two TTLs and forgotten pushes.
    pub fn expire(&self) {
        let now = Instant::now();
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.retain(|_, e| e.until > now);
        }
        if let Ok(mut a) = self.inner.annotations.lock() {
            a.retain(|_, e| e.until > now);
        }
        let idle = self
            .inner
            .ttl
            .saturating_mul(2)
            .max(Duration::from_secs(60));
        if let Ok(mut clients) = self.inner.clients.lock() {
            clients.retain(|_, s| s.used.elapsed() < idle);
        }
        if let Ok(mut p) = self.inner.produced.lock() {
            p.retain(|_, (_, at)| at.elapsed() < idle);
        }
    }
}

pub fn parse_reference(image: &str) -> Result<Reference, LookupError> {
    Reference::try_from(image).map_err(|e| LookupError::Invalid {
        image: image.to_string(),
        reason: format!("not an image reference: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_registry("127.0.0.1:5000"));
        assert!(is_loopback_registry("localhost"));
        assert!(!is_loopback_registry("myrepo.xyz"));
        assert!(!is_loopback_registry("10.0.0.1:5000"));
    }
}
