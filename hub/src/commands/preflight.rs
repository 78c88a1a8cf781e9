//! `kmm-hub preflight`: would every ManagedClusterModule work on a coming kernel? The same
//! checks as the preflight controller, offline: the registries are asked unless `--digests`
//! gives the images that exist; the hub's ConfigMaps and Secrets, and its configuration (the
//! Driver Toolkit table), are read from files when given.

use std::collections::BTreeMap;
use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt as _;
use serde::Deserialize;
use shared_api::ManagedClusterModule;
use shared_api::module::TlsOptions;
use shared_api::parse::{Object, parse_value};
use shared_api::preflight::kernel_version_problem;
use shared_api::validate::validate_mcm;

use crate::config::HubConfig;
use crate::decide::preflight::{Target, Verdict, target, verdict, verdict_without_image};
use crate::metrics::Metrics;
use crate::pipeline::{InputError, McmInputs};
use crate::preflight::check::{Sources, gather};
use crate::registry::{DockerConfig, LookupError, Resolver, pinned_digest};

#[derive(clap::Args, Debug, Clone)]
pub struct PreflightArgs {
    /// A kernel the fleet is moving to, as `uname -r` prints it (repeat for several).
    #[arg(long = "kernel", required = true)]
    pub kernels: Vec<String>,
    /// ManagedClusterModule YAML (multi-document, or a List as `kubectl get mcm -o yaml`
    /// prints it; repeat for several files). Without it, the YAML is read from stdin.
    #[arg(long = "mcm", env = "KMM_PREFLIGHT_MCM")]
    pub mcms: Vec<PathBuf>,
    /// A YAML map from image reference to `sha256:…`: the images that exist (nothing else
    /// does). Without it the registries are asked.
    #[arg(long, env = "KMM_PREFLIGHT_DIGESTS")]
    pub digests: Option<PathBuf>,
    /// A `.dockerconfigjson` file with registry credentials (when asking registries); without
    /// it, an MCM's `imageRepoSecret` from `--inputs`, else anonymous.
    /// Wins over the MCMs' own.
    #[arg(long, env = "KMM_PREFLIGHT_PULL_SECRET")]
    pub pull_secret: Option<PathBuf>,
    /// The hub namespace's ConfigMaps and Secrets (`kubectl -n kmm-hub get cm,secret -o
    /// yaml`): with them the Dockerfile ConfigMaps, build secrets, pull secret and signing
    /// keys are checked too.
    #[arg(long, env = "KMM_PREFLIGHT_INPUTS")]
    pub inputs: Option<PathBuf>,
    /// The hub's configuration file (its `driverToolkit` table, for `DTK_AUTO`).
    #[arg(long, env = "KMM_PREFLIGHT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The hub's namespace, as named in messages.
    #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "kmm-hub")]
    pub namespace: String,
}

/// The objects of YAML files: single documents, multi-document files and Lists.
fn objects(text: &str, what: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_json::Value::deserialize(de)
            .with_context(|| format!("{what}: document {}", i + 1))?;
        if v.is_null() {
            continue;
        }
        match v.get("items").and_then(|i| i.as_array()) {
            Some(items) if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) => {
                out.extend(items.iter().cloned());
            }
            _ => out.push(v),
        }
    }
    Ok(out)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The MCMs of the files (or stdin), each checked like `kmm-hub validate` does.
fn read_mcms(args: &PreflightArgs) -> anyhow::Result<Vec<ManagedClusterModule>> {
    let mut texts = Vec::new();
    if args.mcms.is_empty() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading ManagedClusterModules from stdin")?;
        texts.push(("stdin".to_string(), s));
    }
    for p in &args.mcms {
        texts.push((p.display().to_string(), read(p)?));
    }
    let mut out = Vec::new();
    for (what, text) in texts {
        for (i, v) in objects(&text, &what)?.into_iter().enumerate() {
            let doc = parse_value(i + 1, v).with_context(|| what.clone())?;
            if let Object::ManagedClusterModule(m) = doc.object {
                out.push(*m);
            }
        }
    }
    if out.is_empty() {
        bail!("no ManagedClusterModule in the input");
    }
    out.sort_by_key(|m| m.name_any());
    Ok(out)
}

/// Files as the source of facts.
struct FileSources {
    namespace: String,
    /// `None`: the hub's ConfigMaps and Secrets were not given.
    configmaps: Option<BTreeMap<String, ConfigMap>>,
    secrets: BTreeMap<String, Arc<Secret>>,
    /// `Some`: only these images exist; `None`: ask the registries.
    digests: Option<BTreeMap<String, String>>,
    resolver: Resolver,
    /// `--pull-secret`.
    creds: Option<DockerConfig>,
    config: HubConfig,
}

impl Sources for FileSources {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn inputs_known(&self) -> bool {
        self.configmaps.is_some()
    }
    fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets.get(name).cloned()
    }
    async fn dockerfile(&self, _: &McmInputs, name: &str) -> Result<String, InputError> {
        let ids = || (self.namespace.clone(), name.to_string());
        match self.configmaps.as_ref().and_then(|c| c.get(name)) {
            Some(cm) => cm
                .data
                .as_ref()
                .and_then(|d| d.get("dockerfile").cloned())
                .ok_or_else(|| {
                    let (namespace, name) = ids();
                    InputError::ConfigMapNoKey { namespace, name }
                }),
            None => {
                let (namespace, name) = ids();
                Err(InputError::ConfigMapMissing { namespace, name })
            }
        }
    }
    async fn lookup(
        &self,
        image: &str,
        tls: TlsOptions,
        creds: &DockerConfig,
        annotations: bool,
    ) -> Result<(String, BTreeMap<String, String>), LookupError> {
        if let Some(d) = pinned_digest(image) {
            return Ok((d.to_string(), BTreeMap::new()));
        }
        if let Some(known) = &self.digests {
            return match known.get(image) {
                Some(d) => Ok((d.clone(), BTreeMap::new())),
                None => Err(LookupError::NotFound(image.to_string())),
            };
        }
        // --pull-secret when given, else the MCM's own credential (from --inputs).
        let creds = self.creds.as_ref().unwrap_or(creds);
        if annotations {
            self.resolver.annotations(image, tls, creds).await
        } else {
            self.resolver
                .digest(image, tls, creds)
                .await
                .map(|d| (d, BTreeMap::new()))
        }
    }
    fn knows_annotations(&self) -> bool {
        self.digests.is_none() && self.configmaps.is_some()
    }
    fn dtk(&self, kernel: &str) -> Option<String> {
        // Offline there are no clusters' claims: the table of `--config` only.
        self.config.dtk.image_for(kernel).map(str::to_string)
    }
}

fn file_sources(args: &PreflightArgs) -> anyhow::Result<FileSources> {
    let digests: Option<BTreeMap<String, String>> = match &args.digests {
        Some(path) => {
            let map: BTreeMap<String, String> =
                serde_yaml::from_str(&read(path)?).with_context(|| {
                    format!(
                        "{}: expected a map of image to sha256:… digest",
                        path.display()
                    )
                })?;
            for (image, digest) in &map {
                if !digest.starts_with("sha256:") || digest.len() != 71 {
                    bail!("digest of {image} is {digest:?}, not sha256:<64 hex digits>");
                }
            }
            Some(map)
        }
        None => None,
    };
    let (mut configmaps, mut secrets) = (None, BTreeMap::new());
    if let Some(path) = &args.inputs {
        let mut cms = BTreeMap::new();
        for v in objects(&read(path)?, &path.display().to_string())? {
            match v["kind"].as_str() {
                Some("ConfigMap") => {
                    let cm: ConfigMap = serde_json::from_value(v)
                        .with_context(|| format!("{}: not a ConfigMap", path.display()))?;
                    cms.insert(cm.name_any(), cm);
                }
                Some("Secret") => {
                    let s: Secret = serde_json::from_value(v)
                        .with_context(|| format!("{}: not a Secret", path.display()))?;
                    secrets.insert(s.name_any(), Arc::new(s));
                }
                _ => {}
            }
        }
        configmaps = Some(cms);
    }
    let creds = match &args.pull_secret {
        Some(p) => Some(DockerConfig::parse(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    let config = match &args.config {
        Some(p) => HubConfig::load(p).map_err(anyhow::Error::msg)?,
        None => HubConfig::default(),
    };
    Ok(FileSources {
        namespace: args.namespace.clone(),
        configmaps,
        secrets,
        digests,
        resolver: Resolver::new(Duration::from_secs(60), Metrics::default()),
        creds,
        config,
    })
}

/// One MCM against one kernel, offline.
async fn check(src: &FileSources, mcm: &ManagedClusterModule, kernel: &str) -> Verdict {
    use shared_api::preflight::{VerificationStage, VerificationStatus};
    let violations = validate_mcm(mcm);
    if !violations.is_empty() {
        let msg: Vec<String> = violations.iter().map(ToString::to_string).collect();
        return Verdict::new(
            VerificationStatus::Failure,
            VerificationStage::Done,
            "InvalidSpec",
            format!("the MCM is invalid: {}", msg.join("; ")),
            None,
        );
    }
    match target(mcm, kernel) {
        Target::Image(need) => verdict(&need, &gather(src, mcm, &need).await.checks),
        other => verdict_without_image(&other, kernel).unwrap_or_else(|| {
            Verdict::new(
                VerificationStatus::Failure,
                VerificationStage::Done,
                "NoMapping",
                String::new(),
                None,
            )
        }),
    }
}

/// Print one line per MCM and kernel; true when every MCM would work on every kernel.
pub async fn run(args: PreflightArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    for k in &args.kernels {
        if let Some(p) = kernel_version_problem(k) {
            bail!("--kernel: {p}");
        }
    }
    let mcms = read_mcms(&args)?;
    let src = file_sources(&args)?;
    if !src.inputs_known() {
        eprintln!(
            "note: without --inputs the Dockerfile ConfigMaps, build and pull secrets and signing keys are not checked"
        );
    }
    let mut all = true;
    for m in &mcms {
        for k in &args.kernels {
            let v = check(&src, m, k).await;
            all &= v.is_success();
            writeln!(
                out,
                "{}\t{k}\t{}\t{}: {}",
                m.name_any(),
                v.status.as_str(),
                v.reason,
                v.message
            )?;
        }
    }
    Ok(all)
}
