//! `kmm-hub render`: the ManifestWorks the controller would write, with no cluster.
//! Same plan and render code as the reconciler.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use shared_api::ManagedCluster;
use shared_api::parse::{Object, parse_documents};
use shared_api::validate::validate_mcm;

use crate::decide::cluster::decide_cluster;
use crate::decide::day0::{BaseImage, os_images_to_look_up, plan_day0};
use crate::decide::image::ImageOutcome;
use crate::decide::plan::{ClusterFacts, plan};
use crate::metrics::Metrics;
use crate::registry::{DockerConfig, Resolver};
use crate::render::{DEFAULT_WORK_EXECUTOR, parse_executor};

#[derive(clap::Args, Debug, Clone)]
pub struct RenderArgs {
    /// The ManagedClusterModule YAML.
    #[arg(long, env = "KMM_RENDER_MCM")]
    pub mcm: PathBuf,
    /// ManagedCluster objects (YAML, multi-document or a List), with status.clusterClaims.
    #[arg(long, env = "KMM_RENDER_CLUSTERS")]
    pub clusters: PathBuf,
    /// A YAML map from image reference to `sha256:…`; without it the registries are asked.
    #[arg(long, env = "KMM_RENDER_DIGESTS")]
    pub digests: Option<PathBuf>,
    /// A `.dockerconfigjson` file with registry credentials (when asking registries).
    #[arg(long, env = "KMM_RENDER_PULL_SECRET")]
    pub pull_secret: Option<PathBuf>,
    /// `spec.day0`: a YAML map from RHCOS image to its kernel (the image's `ostree.linux`
    /// label); needed with `--digests`, which then also holds the RHCOS images' digests
    /// (unless pinned) and the layered images'. Without `--digests` the registries are asked.
    #[arg(long, env = "KMM_RENDER_OS_IMAGE_KERNELS")]
    pub os_image_kernels: Option<PathBuf>,
}

/// A YAML map of strings from a file.
fn read_map(path: &PathBuf, what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{}: expected {what}", path.display()))
}

/// Print the works as YAML on `out` and every cluster left without one on stderr.
/// Returns false when any selected cluster gets no work.
pub async fn run(args: RenderArgs, out: &mut impl Write) -> anyhow::Result<bool> {
    let mcm_text = std::fs::read_to_string(&args.mcm)
        .with_context(|| format!("reading {}", args.mcm.display()))?;
    let docs = parse_documents(&mcm_text).with_context(|| args.mcm.display().to_string())?;
    let mcm = docs
        .into_iter()
        .find_map(|d| match d.object {
            Object::ManagedClusterModule(m) => Some(*m),
            _ => None,
        })
        .with_context(|| {
            format!(
                "{}: no ManagedClusterModule in the file",
                args.mcm.display()
            )
        })?;
    let violations = validate_mcm(&mcm);
    if !violations.is_empty() {
        let lines: Vec<String> = violations.iter().map(|v| format!("  {v}")).collect();
        bail!(
            "{}: the ManagedClusterModule is invalid:\n{}",
            args.mcm.display(),
            lines.join("\n")
        );
    }
    let clusters = read_clusters(&args.clusters)?;
    let mut p = plan(&mcm, clusters.iter())?;

    let offline: Option<BTreeMap<String, String>> = match &args.digests {
        Some(path) => Some(read_map(path, "a map of image to sha256:… digest")?),
        None => None,
    };
    let creds = match &args.pull_secret {
        Some(p) => DockerConfig::parse(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => DockerConfig::default(),
    };
    let resolver = Resolver::new(Duration::from_secs(60), Metrics::default());

    // spec.day0: the clusters' RHCOS images, their digests and kernels, then the layered
    // images, as the reconciler plans them.
    if mcm.spec.day0.is_some() {
        let kernels = match &args.os_image_kernels {
            Some(path) => read_map(path, "a map of RHCOS image to kernel")?,
            None => BTreeMap::new(),
        };
        let mut bases = BTreeMap::new();
        for image in os_images_to_look_up(&mcm, &p, &clusters) {
            let found = match &offline {
                Some(d) => match crate::registry::pinned_digest(&image)
                    .map(str::to_string)
                    .or_else(|| d.get(&image).cloned())
                {
                    Some(digest) => Ok(BaseImage {
                        digest,
                        kernel: kernels.get(&image).cloned(),
                    }),
                    None => Err(format!(
                        "no digest for the RHCOS image {image} in --digests"
                    )),
                },
                None => resolver
                    .os_image(&image, Default::default(), &creds)
                    .await
                    .map(|(digest, kernel)| BaseImage {
                        digest,
                        kernel: kernels.get(&image).cloned().or(kernel),
                    })
                    .map_err(|e| e.to_string()),
            };
            bases.insert(image, found);
        }
        plan_day0(&mcm, &mut p, &clusters, &bases);
    }

    let digests: BTreeMap<String, String> = match offline {
        Some(d) => d,
        None => {
            let mut d = BTreeMap::new();
            for need in p.images.values() {
                match resolver
                    .digest(&need.image, need.registry_tls, &creds)
                    .await
                {
                    Ok(digest) => {
                        d.insert(need.image.clone(), digest);
                    }
                    Err(e) => eprintln!("image {}: {e}", need.image),
                }
            }
            d
        }
    };
    for (image, digest) in &digests {
        if !digest.starts_with("sha256:") || digest.len() != 71 {
            bail!("digest of {image} is {digest:?}, not sha256:<64 hex digits>");
        }
    }

    // The same per-cluster decision as the reconciler, with nothing shipped yet: a known
    // digest (or a reference the user pinned by digest) is a ready image.
    let outcomes: BTreeMap<String, ImageOutcome> = p
        .images
        .keys()
        .map(|image| {
            let digest =
                crate::registry::pinned_digest(image).or(digests.get(image).map(String::as_str));
            let outcome = match digest {
                Some(d) => ImageOutcome::ready(d.to_string()),
                None => ImageOutcome::missing(format!("no digest for image {image}")),
            };
            (image.clone(), outcome)
        })
        .collect();
    let executor = parse_executor(DEFAULT_WORK_EXECUTOR).ok().flatten();
    // A credential is never printed: the copy the controller would add is left out.
    let pull = crate::render::prerequisites::PullSecretSource::None;
    if mcm.spec.prerequisites().pull_secret && mcm.spec.module_spec.image_repo_secret.is_some() {
        eprintln!(
            "note: the pull-secret copy (spec.spokePrerequisites.pullSecret) is not rendered"
        );
    }
    let mut all = true;
    for cp in &p.clusters {
        if let Some(problem) = &cp.problem {
            eprintln!(
                "cluster {}: {}: {}",
                cp.cluster, problem.reason, problem.message
            );
            all = false;
            continue;
        }
        let d = decide_cluster(
            &mcm,
            cp,
            &outcomes,
            Default::default(),
            executor.as_ref(),
            &pull,
        );
        if let Some((reason, message)) = d.day0.as_ref().and_then(|w| w.waiting.as_ref()) {
            eprintln!("cluster {}: day0: {reason}: {message}", cp.cluster);
            all = false;
        }
        for k in d.view.kernels.iter().filter(|k| k.pinned.is_none()) {
            eprintln!(
                "cluster {}: kernel {}: no digest for image {}",
                cp.cluster, k.kernel, k.image
            );
            all = false;
        }
        match (d.desired, d.render_error) {
            (Some(w), _) => write!(out, "---\n{}", serde_yaml::to_string(&w)?)?,
            (None, Some(e)) => {
                eprintln!("cluster {}: {}: {e}", cp.cluster, e.reason());
                all = false;
            }
            (None, None) => all = false,
        }
    }
    Ok(all)
}

fn read_clusters(path: &PathBuf) -> anyhow::Result<Vec<ClusterFacts>> {
    use serde::Deserialize;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let v = serde_json::Value::deserialize(de)
            .with_context(|| format!("{}: document {}", path.display(), i + 1))?;
        let items = match v.get("kind").and_then(|k| k.as_str()) {
            Some("List") | Some("ManagedClusterList") => v
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default(),
            Some("ManagedCluster") => vec![v],
            None if v.is_null() => vec![],
            other => bail!(
                "{}: document {}: expected ManagedCluster objects, found {other:?}",
                path.display(),
                i + 1
            ),
        };
        for item in items {
            let c: ManagedCluster = serde_json::from_value(item).with_context(|| {
                format!(
                    "{}: document {}: not a ManagedCluster",
                    path.display(),
                    i + 1
                )
            })?;
            out.push(ClusterFacts::from_cluster(&c));
        }
    }
    Ok(out)
}
