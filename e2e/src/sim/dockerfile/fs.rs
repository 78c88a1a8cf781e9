//! The in-memory file tree a build works on, and path resolution.

use std::collections::{BTreeMap, BTreeSet};

/// A file tree: regular files and directories, absolute paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fs {
    pub files: BTreeMap<String, Vec<u8>>,
    pub dirs: BTreeSet<String>,
}

impl Fs {
    pub fn from_files(files: BTreeMap<String, Vec<u8>>) -> Fs {
        let mut fs = Fs::default();
        for (p, d) in files {
            fs.write(&p, d);
        }
        fs
    }

    pub fn mkdir_p(&mut self, path: &str) {
        let mut acc = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            acc.push('/');
            acc.push_str(part);
            self.dirs.insert(acc.clone());
        }
    }

    pub fn write(&mut self, path: &str, data: Vec<u8>) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.mkdir_p(parent);
        }
        self.files.insert(path.to_string(), data);
    }

    pub fn is_dir(&self, path: &str) -> bool {
        path == "/" || self.dirs.contains(path)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.is_dir(path) || self.files.contains_key(path)
    }

    pub(crate) fn remove(&mut self, path: &str) {
        let sub = format!("{}/", path.trim_end_matches('/'));
        self.files.retain(|p, _| p != path && !p.starts_with(&sub));
        self.dirs.retain(|p| p != path && !p.starts_with(&sub));
    }

    /// Paths (files and dirs) matching a glob pattern or equal to a plain path.
    pub(crate) fn matches(&self, pattern: &str) -> Vec<String> {
        if !pattern.contains(['*', '?', '[']) {
            return if self.exists(pattern) {
                vec![pattern.to_string()]
            } else {
                Vec::new()
            };
        }
        let Ok(pat) = glob::Pattern::new(pattern) else {
            return Vec::new();
        };
        let opts = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        self.files
            .keys()
            .chain(self.dirs.iter())
            .filter(|p| pat.matches_with(p, opts))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Copy `src` (file or directory contents) of `from` to `dest` here.
    pub(crate) fn copy_from(&mut self, from: &Fs, src: &str, dest: &str, dest_is_dir: bool) {
        if from.is_dir(src) {
            self.mkdir_p(dest);
            let prefix = if src == "/" {
                "/".to_string()
            } else {
                format!("{src}/")
            };
            for d in from.dirs.iter().filter(|d| d.starts_with(&prefix)) {
                self.mkdir_p(&join(dest, &d[prefix.len()..]));
            }
            for (p, data) in from.files.iter().filter(|(p, _)| p.starts_with(&prefix)) {
                self.write(&join(dest, &p[prefix.len()..]), data.clone());
            }
        } else if let Some(data) = from.files.get(src) {
            let target = if dest_is_dir {
                join(dest, basename(src))
            } else {
                dest.to_string()
            };
            self.write(&target, data.clone());
        }
    }
}

pub(crate) fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

pub(crate) fn join(base: &str, rel: &str) -> String {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        return base.to_string();
    }
    if base.ends_with('/') {
        format!("{base}{rel}")
    } else {
        format!("{base}/{rel}")
    }
}

/// `path` resolved against `cwd`, normalised (`.`/`..` folded, no trailing `/`).
pub fn resolve(cwd: &str, path: &str) -> String {
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{cwd}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in full.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}
