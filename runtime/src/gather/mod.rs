//! The support bundle of `kmm-hub must-gather` and `kmm-spoke must-gather`: a directory (and,
//! with `--tar`, `DIR.tar.gz`) of objects as YAML under `<kind>/<namespace>/<name>.yaml`
//! (`<kind>/_cluster/<name>.yaml` for cluster-scoped ones), pod logs under
//! `logs/<namespace>/<pod>/<container>[.previous].log`, events under `events/<namespace>.txt`,
//! a `summary.txt` (what was gathered, how many values were redacted, an index of the files)
//! and `errors.txt` (what could not be read: a missing CRD or a forbidden list does not stop
//! the gather).
//!
//! Every text is passed through [`redact`] before it is written; Secrets are reduced to name,
//! type and key names by the collectors ([`collect`]) and their values are never written.

pub mod collect;
pub mod redact;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

pub use collect::Gatherer;
pub use redact::redact;

/// Errors that end a gather (everything else goes to `errors.txt`).
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error("cannot write the bundle at {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to the cluster: {0}")]
    Connect(String),
}

impl crate::ErrorCategory for GatherError {
    fn category(&self) -> &'static str {
        match self {
            GatherError::Write { .. } => "write",
            GatherError::Connect(_) => "connect",
        }
    }
}

/// The flags both `must-gather` subcommands take.
#[derive(Args, Debug, Clone)]
pub struct GatherArgs {
    /// Kubeconfig file; without it $KUBECONFIG, ~/.kube/config or the in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory to write [default: /must-gather in a container, else ./must-gather].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also write the directory as `DIR.tar.gz` next to it.
    #[arg(long, default_value_t = false)]
    pub tar: bool,
    /// Only logs newer than this (e.g. 30m, 2h); all the kubelet keeps by default.
    #[arg(long, value_parser = crate::cli::parse_duration)]
    pub since: Option<Duration>,
    /// The operator's namespace [default: as installed from manifests/].
    #[arg(long)]
    pub namespace: Option<String>,
}

impl GatherArgs {
    /// `--output`, else `/must-gather` inside a container (the `oc adm must-gather`
    /// convention) and `./must-gather` elsewhere.
    pub fn output_dir(&self) -> PathBuf {
        self.output.clone().unwrap_or_else(|| {
            let in_container = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
                || Path::new("/run/.containerenv").exists()
                || Path::new("/.dockerenv").exists();
            PathBuf::from(if in_container {
                "/must-gather"
            } else {
                "./must-gather"
            })
        })
    }
}

/// What a finished gather wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub dir: PathBuf,
    pub tarball: Option<PathBuf>,
    pub files: usize,
    pub errors: usize,
    pub redactions: usize,
}

/// The bundle directory being written.
#[derive(Debug)]
pub struct Bundle {
    root: PathBuf,
    title: String,
    files: Vec<String>,
    notes: Vec<String>,
    errors: Vec<String>,
    redactions: usize,
}

/// `<kind>/<namespace>/<name>.yaml`, or `<kind>/_cluster/<name>.yaml` without a namespace;
/// path separators and dots-only names cannot escape the bundle.
pub fn object_path(kind: &str, namespace: Option<&str>, name: &str) -> String {
    format!(
        "{}/{}/{}.yaml",
        safe(&kind.to_lowercase()),
        safe(namespace.unwrap_or("_cluster")),
        safe(name)
    )
}

/// A path component that stays one component.
pub fn safe(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c == '\0' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("_{s}")
    } else {
        s
    }
}

impl Bundle {
    /// Start a bundle in `root` (created; what is there already is kept).
    pub fn create(root: &Path, title: &str) -> Result<Self, GatherError> {
        std::fs::create_dir_all(root).map_err(|source| GatherError::Write {
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
            title: title.into(),
            files: Vec::new(),
            notes: Vec::new(),
            errors: Vec::new(),
            redactions: 0,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Write `text`, redacted, at `rel` (a relative path with `/`). A failure is recorded.
    pub fn write_text(&mut self, rel: &str, text: &str) {
        let (clean, n) = redact(text);
        self.redactions += n;
        let path = self.root.join(rel);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, clean));
        match written {
            Ok(()) => self.files.push(rel.to_string()),
            Err(e) => self.error(&format!("writing {rel}"), e),
        }
    }

    /// Write a value as YAML at `rel`.
    pub fn write_yaml<T: serde::Serialize>(&mut self, rel: &str, value: &T) {
        match serde_yaml::to_string(value) {
            Ok(y) => self.write_text(rel, &y),
            Err(e) => self.error(&format!("encoding {rel}"), e),
        }
    }

    /// Record something that could not be gathered; the gather goes on.
    pub fn error(&mut self, what: &str, e: impl Display) {
        let line = format!("{what}: {e}").replace('\n', " ");
        let (line, n) = redact(&line);
        self.redactions += n;
        self.errors.push(line);
    }

    /// A line for the summary's overview.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Write `summary.txt` and `errors.txt`, and with `tar` also `<root>.tar.gz`.
    pub fn finish(mut self, tar: bool) -> Result<Written, GatherError> {
        let errors = if self.errors.is_empty() {
            "(none)\n".to_string()
        } else {
            self.errors.join("\n") + "\n"
        };
        self.write_text("errors.txt", &errors);
        let mut files = self.files.clone();
        files.sort();
        let mut s = format!(
            "{}\ngathered: {}\nfiles: {}\nerrors: {} (see errors.txt)\nredacted values: {} \
             (private keys and registry credentials replaced by {}; Secrets reduced to \
             name, type and key names)\n\n",
            self.title,
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            files.len() + 1,
            self.errors.len(),
            self.redactions,
            redact::REDACTED,
        );
        for n in &self.notes {
            s.push_str(n);
            s.push('\n');
        }
        s.push_str("\nindex:\n");
        for f in &files {
            s.push_str("  ");
            s.push_str(f);
            s.push('\n');
        }
        // The summary itself is not redacted again: it holds only counts and names.
        let summary = self.root.join("summary.txt");
        std::fs::write(&summary, s).map_err(|source| GatherError::Write {
            path: summary,
            source,
        })?;
        let tarball = tar.then(|| write_tarball(&self.root)).transpose()?;
        Ok(Written {
            dir: self.root.clone(),
            tarball,
            files: files.len() + 1,
            errors: self.errors.len(),
            redactions: self.redactions,
        })
    }
}

/// `<dir>.tar.gz` holding `dir` under its own name.
fn write_tarball(dir: &Path) -> Result<PathBuf, GatherError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "must-gather".into());
    let path = dir.with_file_name(format!("{name}.tar.gz"));
    let io = |source| GatherError::Write {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::create(&path).map_err(io)?;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::default(),
    ));
    builder.append_dir_all(&name, dir).map_err(io)?;
    builder
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(io)?;
    Ok(path)
}

/// A client from `--kubeconfig`, else the usual places (`$KUBECONFIG`, `~/.kube/config`, the
/// in-cluster configuration).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, GatherError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| GatherError::Connect(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| GatherError::Connect(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| GatherError::Connect(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| GatherError::Connect(e.to_string()))
}

/// The command line of a binary, with `oc adm must-gather`'s convention: started as
/// `gather` (the image's `/usr/bin/gather` is a link to the binary), it runs `must-gather`
/// with the arguments given; started under its own name, the arguments are unchanged.
pub fn argv(
    binary: &str,
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let as_gather = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "gather");
    if as_gather {
        args.splice(0..1, [binary.into(), "must-gather".into()]);
    }
    args
}

/// For the duration of a gather: the since-seconds of log requests.
pub fn since_seconds(since: Option<Duration>) -> Option<i64> {
    since.map(|d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
