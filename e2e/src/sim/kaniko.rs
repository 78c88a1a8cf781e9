//! The kaniko executor, simulated: a build pod's container reads its flags, the
//! Dockerfile and credentials from its mounted volumes (through the API, as a kubelet
//! would mount them), runs the Dockerfile interpreter and pushes the final stage to
//! `--destination` on the real registry.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::dockerfile::{self, BuildParams, Fs};
use super::images;
use crate::oci::{self, RegistryAccess};

/// Where kaniko reads registry credentials.
pub const DOCKER_CONFIG_PATH: &str = "/kaniko/.docker/config.json";

/// Whether a container is a kaniko executor (by name or image).
pub fn is_kaniko(c: &Container) -> bool {
    c.name == "kaniko"
        || c.image
            .as_deref()
            .is_some_and(|i| i.contains("kaniko-project/executor"))
}

/// Parsed executor flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KanikoArgs {
    pub dockerfile: String,
    pub context: String,
    pub destinations: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub no_push: bool,
    pub insecure: bool,
    pub skip_tls_verify: bool,
    pub insecure_pull: bool,
    pub skip_tls_verify_pull: bool,
    pub target: Option<String>,
    pub ignored: Vec<String>,
}

const VALUE_FLAGS: &[&str] = &[
    "dockerfile",
    "f",
    "context",
    "c",
    "destination",
    "d",
    "build-arg",
    "target",
    "tar-path",
    "cache-repo",
    "cache-dir",
    "digest-file",
    "image-name-with-digest-file",
    "image-name-tag-with-digest-file",
    "oci-layout-path",
    "verbosity",
    "v",
    "label",
    "registry-mirror",
    "kaniko-dir",
    "snapshot-mode",
    "custom-platform",
    "customPlatform",
    "ignore-path",
    "image-fs-extract-retry",
    "push-retry",
    "insecure-registry",
    "skip-tls-verify-registry",
    "registry-certificate",
    "log-format",
    "log-timestamp",
    "cache-ttl",
    "git",
];

impl KanikoArgs {
    /// Parse `args` (with `--flag=value` or `--flag value`).
    pub fn parse(args: &[String]) -> KanikoArgs {
        let mut out = KanikoArgs {
            dockerfile: "Dockerfile".into(),
            context: "/workspace".into(),
            ..Default::default()
        };
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            let Some(flag) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
                out.ignored.push(a.clone());
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            };
            let value = if VALUE_FLAGS.contains(&name.as_str()) {
                inline.or_else(|| it.next().cloned()).unwrap_or_default()
            } else {
                inline.unwrap_or_else(|| "true".into())
            };
            let truthy = value != "false";
            match name.as_str() {
                "dockerfile" | "f" => out.dockerfile = value,
                "context" | "c" => out.context = value,
                "destination" | "d" => out.destinations.push(value),
                "build-arg" => {
                    let (k, v) = value.split_once('=').unwrap_or((value.as_str(), ""));
                    out.build_args.insert(k.to_string(), v.to_string());
                }
                "no-push" => out.no_push = truthy,
                "insecure" => out.insecure = truthy,
                "skip-tls-verify" => out.skip_tls_verify = truthy,
                "insecure-pull" => out.insecure_pull = truthy,
                "skip-tls-verify-pull" => out.skip_tls_verify_pull = truthy,
                "target" => out.target = Some(value),
                _ => out.ignored.push(a.clone()),
            }
        }
        out
    }

    /// The context directory inside the container (`dir://` stripped).
    pub fn context_dir(&self) -> String {
        let c = self.context.trim_start_matches("dir://");
        if c.is_empty() {
            "/workspace".into()
        } else {
            c.trim_end_matches('/').to_string()
        }
    }

    pub fn dockerfile_path(&self) -> String {
        if self.dockerfile.starts_with('/') {
            self.dockerfile.clone()
        } else {
            dockerfile::resolve(&self.context_dir(), &self.dockerfile)
        }
    }
}

/// The executor's argument list: `args`, after `command` beyond the executor binary.
pub fn container_args(c: &Container) -> Vec<String> {
    let mut out: Vec<String> = c.command.iter().flatten().skip(1).cloned().collect();
    out.extend(c.args.iter().flatten().cloned());
    out
}

/// Run the build a kaniko container describes. Returns the log and, on failure, the
/// message kaniko would print last (the pod's termination message).
pub async fn run(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
) -> (Vec<String>, Result<Vec<String>, String>) {
    let mut log = Vec::new();
    let result = build_and_push(client, pod, c, &mut log).await;
    if let Err(e) = &result
        && log.last() != Some(e)
    {
        log.push(e.clone());
    }
    (log, result)
}

async fn build_and_push(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    log: &mut Vec<String>,
) -> Result<Vec<String>, String> {
    let args = KanikoArgs::parse(&container_args(c));
    log.push(format!(
        "dockerfile {} context {} destinations {:?} no-push {} build-args {:?}",
        args.dockerfile_path(),
        args.context_dir(),
        args.destinations,
        args.no_push,
        args.build_args.keys().collect::<Vec<_>>()
    ));
    if !args.ignored.is_empty() {
        log.push(format!(
            "kaniko: flags without effect here: {:?}",
            args.ignored
        ));
    }
    if args.destinations.is_empty() && !args.no_push {
        return Err("error: you must provide --destination, or use --no-push".to_string());
    }
    let df_path = args.dockerfile_path();
    let Some(text) = images::mounted_file(client, pod, c, &df_path).await else {
        return Err(format!(
            "error resolving dockerfile path: please provide a valid path to a Dockerfile within the build context with --dockerfile ({df_path} does not exist)"
        ));
    };
    let df = dockerfile::parse(&String::from_utf8_lossy(&text))
        .map_err(|e| format!("error building image: parsing dockerfile: {e}"))?;
    let docker_config = images::mounted_file(client, pod, c, DOCKER_CONFIG_PATH)
        .await
        .unwrap_or_default();
    let access_for = |reference: &str| {
        let host = oci::reference_host(reference);
        match oci::docker_config_credentials(&docker_config, &host)
            .into_iter()
            .next()
        {
            Some((u, p)) => RegistryAccess::basic(host, u, p),
            None => RegistryAccess::anonymous(host),
        }
    };
    let mut pulled = BTreeMap::new();
    let mut pulled_layers = BTreeMap::new();
    for image in dockerfile::registry_images(&df, &args.build_args) {
        log.push(format!("INFO Retrieving image manifest {image}"));
        match oci::pull_files(&access_for(&image), &image).await {
            Ok(contents) => {
                pulled_layers.insert(image.clone(), contents.raw_layers);
                pulled.insert(image, Fs::from_files(contents.files));
            }
            Err(e) => {
                return Err(format!(
                    "error building image: retrieving image {image}: {e}"
                ));
            }
        }
    }
    let ctx_dir = args.context_dir();
    let context: BTreeMap<String, Vec<u8>> = images::mounted_files(client, pod, c, &ctx_dir)
        .await
        .into_iter()
        .map(|(p, d)| (dockerfile::resolve("/", &p[ctx_dir.len()..]), d))
        .collect();
    let params = BuildParams {
        build_args: args.build_args.clone(),
        context: Fs::from_files(context),
    };
    // The build may compile real modules (seconds of CPU): off the runtime's workers.
    let built = {
        let (df, pulled) = (df.clone(), pulled.clone());
        tokio::task::spawn_blocking(move || dockerfile::build(&df, &params, &pulled))
            .await
            .map_err(|e| format!("error building image: the build task failed: {e}"))?
    };
    let out = match built {
        Ok(out) => out,
        Err(e) => {
            log.extend(e.log);
            return Err(e.message);
        }
    };
    log.extend(out.log);
    if args.no_push {
        log.push("INFO Skipping push to container registry due to --no-push flag".to_string());
        return Ok(Vec::new());
    }
    // The pushed image keeps its base image's layers and adds one with what the build changed.
    // The simulated public base images (ubi-minimal) stand for the test world's base
    // userspace, so that what the build makes runs on a real-kernel node.
    let mut tars = match &out.base {
        Some(dockerfile::BaseKind::Simulated) => match crate::userspace::layer() {
            Ok(l) => vec![l.to_vec()],
            Err(e) => return Err(format!("error building image: {e:#}")),
        },
        Some(dockerfile::BaseKind::Registry(r)) => {
            let mut v = Vec::new();
            for l in pulled_layers.get(r).into_iter().flatten() {
                v.push(oci::layer_tar(l).map_err(|e| format!("error building image: {r}: {e}"))?);
            }
            v
        }
        _ => Vec::new(),
    };
    let changed: BTreeMap<String, Vec<u8>> = out
        .fs
        .files
        .iter()
        .filter(|(p, d)| out.base_files.files.get(*p) != Some(*d))
        .map(|(p, d)| (p.clone(), d.clone()))
        .collect();
    tars.push(oci::tar_files(&changed).map_err(|e| format!("error building image: {e}"))?);
    let mut digests = Vec::new();
    for dest in &args.destinations {
        log.push(format!("INFO Pushing image to {dest}"));
        match oci::push_image(
            &access_for(dest),
            dest,
            &tars,
            &oci::ImageConfig::default(),
            &BTreeMap::new(),
        )
        .await
        {
            Ok(d) => {
                log.push(format!("INFO Pushed {dest}@{d}"));
                digests.push(d);
            }
            Err(e) => {
                return Err(format!(
                    "error pushing image: failed to push to destination {dest}: {e}"
                ));
            }
        }
    }
    Ok(digests)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn args_parse() {
        let a: Vec<String> = [
            "--dockerfile",
            "/workspace/Dockerfile",
            "--destination=127.0.0.1:5000/a:b",
            "--build-arg",
            "KERNEL_VERSION=6.1",
            "--build-arg=X=y=z",
            "--insecure",
            "--skip-tls-verify-pull",
            "--cache=true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let k = KanikoArgs::parse(&a);
        assert_eq!(k.destinations, vec!["127.0.0.1:5000/a:b"]);
        assert_eq!(k.build_args["KERNEL_VERSION"], "6.1");
        assert_eq!(k.build_args["X"], "y=z");
        assert!(k.insecure && k.skip_tls_verify_pull && !k.no_push);
        assert_eq!(k.dockerfile_path(), "/workspace/Dockerfile");
        let k = KanikoArgs::parse(&["--no-push".to_string(), "--context=dir:///ctx".to_string()]);
        assert!(k.no_push);
        assert_eq!(k.dockerfile_path(), "/ctx/Dockerfile");
    }
}
