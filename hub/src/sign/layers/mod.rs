//! The file side of image signing, without a registry: merge an image's layer tars into one file
//! tree (honouring whiteouts), match `filesToSign` patterns against it, sign the matches and
//! write the one extra layer that holds them.
//!
//! Layers are read as streams (from the files the registry side downloaded them to). Only the
//! contents of files that a pattern matches are kept in memory; everything else is tracked by
//! metadata alone. The image's [`SignLimits`] bound the uncompressed size of every layer, the
//! number of tar entries and the bytes of matched files.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use glob::{MatchOptions, Pattern};
use sha2::{Digest, Sha256};

mod signing_layer;

pub use signing_layer::{SigningLayer, build_signing_layer};

use super::limits::{Limit, SignLimits};
use super::{HashAlgorithm, SignError, Signer, module_sig};

/// A layer blob (gzip or plain tar) that can be read from the start: a file the blob was
/// streamed to, or bytes in memory.
pub trait LayerSource: Sync {
    fn open(&self) -> std::io::Result<Box<dyn Read + '_>>;
}

impl LayerSource for [u8] {
    fn open(&self) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self))
    }
}

impl LayerSource for Vec<u8> {
    fn open(&self) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.as_slice()))
    }
}

impl LayerSource for Path {
    fn open(&self) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(std::fs::File::open(self)?))
    }
}

impl LayerSource for PathBuf {
    fn open(&self) -> std::io::Result<Box<dyn Read + '_>> {
        self.as_path().open()
    }
}

/// Which image is being unpacked (for errors) and the limits that apply.
#[derive(Debug, Clone)]
pub struct Unpack {
    pub image: String,
    pub limits: SignLimits,
}

impl Default for Unpack {
    fn default() -> Self {
        Unpack {
            image: "image".into(),
            limits: SignLimits::default(),
        }
    }
}

/// Running totals of one pass over the layers.
struct Budget<'a> {
    unpack: &'a Unpack,
    entries: u64,
    retained: u64,
}

/// Counts the bytes read through it; past `max` it fails and records the count in `hit`.
struct Counted<R> {
    inner: R,
    read: u64,
    max: u64,
    hit: Rc<Cell<Option<u64>>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.max {
            self.hit.set(Some(self.read));
            return Err(std::io::Error::other(
                "layer exceeds the unpacked size limit",
            ));
        }
        Ok(n)
    }
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Shell-like matching: `*` and `?` stay within one path component and do not match a leading
/// dot, as in the `for f in /opt<pattern>` loop of upstream's sign Dockerfile.
const MATCH_OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: true,
};

/// The validated `filesToSign` patterns.
#[derive(Debug, Clone)]
pub struct FilePatterns {
    patterns: Vec<(String, Pattern)>,
}

impl FilePatterns {
    /// Every pattern must be an absolute path; `*`, `?` and `[...]` are allowed.
    pub fn new(patterns: &[String]) -> Result<Self, SignError> {
        if patterns.is_empty() {
            return Err(SignError::Pattern {
                pattern: String::new(),
                reason: "filesToSign is empty".into(),
            });
        }
        let patterns = patterns
            .iter()
            .map(|raw| {
                let bad = |reason: String| SignError::Pattern {
                    pattern: raw.clone(),
                    reason,
                };
                if !raw.starts_with('/') {
                    return Err(bad("must be an absolute path inside the image".into()));
                }
                if raw.ends_with('/') {
                    return Err(bad("names a directory, not files".into()));
                }
                let compiled = Pattern::new(raw).map_err(|e| bad(e.msg.to_string()))?;
                Ok((raw.clone(), compiled))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FilePatterns { patterns })
    }

    /// Whether any pattern matches the absolute path.
    pub fn matches(&self, path: &str) -> bool {
        self.patterns
            .iter()
            .any(|(_, p)| p.matches_with(path, MATCH_OPTIONS))
    }

    /// The first pattern (as written) that matches none of `files`.
    pub fn first_unmatched(&self, files: &[&str]) -> Option<&str> {
        self.patterns
            .iter()
            .find(|(_, p)| !files.iter().any(|f| p.matches_with(f, MATCH_OPTIONS)))
            .map(|(raw, _)| raw.as_str())
    }
}

/// Ownership and permissions of a tree entry, carried over to the signed copy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    uname: Option<Vec<u8>>,
    gname: Option<Vec<u8>>,
}

impl Meta {
    fn from_header(h: &tar::Header) -> Self {
        Meta {
            mode: h.mode().unwrap_or(0o644),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            mtime: h.mtime().unwrap_or(0),
            uname: h.username_bytes().map(<[u8]>::to_vec),
            gname: h.groupname_bytes().map(<[u8]>::to_vec),
        }
    }

    fn default_dir() -> Self {
        Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            uname: None,
            gname: None,
        }
    }

    fn header(&self, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(self.mode);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h.set_mtime(self.mtime);
        h.set_size(size);
        // Names that do not fit are dropped: uid/gid are authoritative.
        if let Some(u) = &self.uname {
            let _ = h.set_username(&String::from_utf8_lossy(u));
        }
        if let Some(g) = &self.gname {
            let _ = h.set_groupname(&String::from_utf8_lossy(g));
        }
        h
    }
}

#[derive(Debug, Clone)]
enum Kind {
    /// A regular file; the contents only when retained.
    File(Option<Vec<u8>>),
    Dir,
    /// Symlinks, devices, FIFOs: never signed.
    Other,
}

#[derive(Debug, Clone)]
struct Node {
    meta: Meta,
    kind: Kind,
}

/// The merged file tree of an image, keyed by normalised absolute path.
#[derive(Debug, Default)]
pub struct MergedTree {
    nodes: BTreeMap<String, Node>,
}

/// `./a/b/`, `a//b`, `/a/./b` → `/a/b`; `None` for the root itself.
fn normalise(path: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    (!parts.is_empty()).then(|| format!("/{}", parts.join("/")))
}

fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn base_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A layer blob as a tar stream: gzip is detected by its magic bytes, zstd is refused.
fn layer_reader<'a>(raw: Box<dyn Read + 'a>) -> Result<Box<dyn Read + 'a>, String> {
    let mut raw = BufReader::with_capacity(64 * 1024, raw);
    let head = raw
        .fill_buf()
        .map_err(|e| format!("reading the layer: {e}"))?;
    match head {
        [0x1f, 0x8b, ..] => Ok(Box::new(GzDecoder::new(raw))),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Err("zstd-compressed layers are not supported".into()),
        _ => Ok(Box::new(raw)),
    }
}

/// One layer's entries before they are applied.
enum Change {
    Whiteout(String),
    Opaque(String),
    Put(String, Node),
    HardLink(String, String),
}

impl MergedTree {
    /// Apply layer blobs (bottom first). Regular files for which `retain` says yes keep their
    /// contents; `link_targets` collects hard-link targets whose contents a retained link needed
    /// but that were not retained themselves.
    fn apply_layers(
        blobs: &[&dyn LayerSource],
        retain: &dyn Fn(&str) -> bool,
        link_targets: &mut BTreeSet<String>,
        unpack: &Unpack,
    ) -> Result<Self, SignError> {
        let mut tree = MergedTree::default();
        let mut budget = Budget {
            unpack,
            entries: 0,
            retained: 0,
        };
        for (index, blob) in blobs.iter().enumerate() {
            let bad = |reason: String| SignError::Image {
                image: format!("{} layer {index}", unpack.image),
                reason,
            };
            let changes = read_layer(*blob, index, retain, &mut budget)?;
            // Whiteouts hide lower layers only, so they go first whatever their tar order.
            for change in &changes {
                match change {
                    Change::Whiteout(path) => tree.remove_subtree(path, true),
                    Change::Opaque(dir) => tree.remove_subtree(dir, false),
                    _ => {}
                }
            }
            for change in changes {
                match change {
                    Change::Put(path, node) => tree.put(path, node),
                    Change::HardLink(path, target) => {
                        let Some(node) = tree.nodes.get(&target).cloned() else {
                            return Err(bad(format!(
                                "hard link {path} points to missing {target}"
                            )));
                        };
                        if matches!(node.kind, Kind::File(None)) && retain(&path) {
                            link_targets.insert(target);
                        }
                        tree.put(path, node);
                    }
                    Change::Whiteout(_) | Change::Opaque(_) => {}
                }
            }
        }
        Ok(tree)
    }

    /// Merge layer blobs (bottom first), keeping the contents of files `patterns` match.
    pub fn from_layers(
        blobs: &[&dyn LayerSource],
        patterns: &FilePatterns,
        unpack: &Unpack,
    ) -> Result<Self, SignError> {
        let mut targets = BTreeSet::new();
        let tree = Self::apply_layers(blobs, &|p| patterns.matches(p), &mut targets, unpack)?;
        if targets.is_empty() {
            return Ok(tree);
        }
        // A matched hard link whose target was not retained: merge again keeping the targets.
        drop(tree);
        let mut again = BTreeSet::new();
        Self::apply_layers(
            blobs,
            &|p| patterns.matches(p) || targets.contains(p),
            &mut again,
            unpack,
        )
    }

    /// The regular files `patterns` match, with their contents, in path order. Each pattern
    /// must match at least one file.
    pub fn matched_files(&self, patterns: &FilePatterns) -> Result<Vec<(&str, &[u8])>, SignError> {
        let matched: Vec<&str> = self.files().filter(|p| patterns.matches(p)).collect();
        if let Some(pattern) = patterns.first_unmatched(&matched) {
            return Err(SignError::NoMatch {
                pattern: pattern.to_string(),
            });
        }
        matched
            .into_iter()
            .map(|file| match self.nodes.get(file) {
                Some(Node {
                    kind: Kind::File(Some(data)),
                    ..
                }) => Ok((file, data.as_slice())),
                _ => Err(SignError::Image {
                    image: "layers".into(),
                    reason: format!("contents of {file} were not retained"),
                }),
            })
            .collect()
    }

    fn remove_subtree(&mut self, path: &str, including_self: bool) {
        if including_self {
            self.nodes.remove(path);
        }
        let prefix = format!("{path}/");
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    fn put(&mut self, path: String, node: Node) {
        // A non-directory replaces whatever was below the same path.
        if !matches!(node.kind, Kind::Dir) {
            self.remove_subtree(&path, false);
        }
        self.nodes.insert(path, node);
    }

    /// Regular files, in path order.
    pub fn files(&self) -> impl Iterator<Item = &str> + Clone {
        self.nodes
            .iter()
            .filter(|(_, n)| matches!(n.kind, Kind::File(_)))
            .map(|(p, _)| p.as_str())
    }
}

fn read_layer(
    blob: &dyn LayerSource,
    index: usize,
    retain: &dyn Fn(&str) -> bool,
    budget: &mut Budget<'_>,
) -> Result<Vec<Change>, SignError> {
    let unpack = budget.unpack;
    let image = unpack.image.as_str();
    let layer = format!("layer {index}");
    let bad = |reason: String| SignError::Image {
        image: format!("{image} {layer}"),
        reason,
    };
    let hit = Rc::new(Cell::new(None));
    // A read error after the unpacked-size limit tripped is that limit, not a broken tar.
    let over = |hit: &Rc<Cell<Option<u64>>>, e: String| match hit.get() {
        Some(read) => unpack
            .limits
            .check(Limit::UnpackedBytes, read, image, &layer)
            .err()
            .unwrap_or_else(|| bad(e)),
        None => bad(e),
    };
    let raw = blob
        .open()
        .map_err(|e| bad(format!("opening the layer: {e}")))?;
    let counted = Counted {
        inner: layer_reader(raw).map_err(bad)?,
        read: 0,
        max: unpack.limits.max_unpacked_bytes,
        hit: hit.clone(),
    };
    let mut archive = tar::Archive::new(counted);
    let mut changes = Vec::new();
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return Err(over(&hit, format!("not a tar: {e}"))),
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return Err(over(&hit, format!("bad tar entry: {e}"))),
        };
        budget.entries += 1;
        unpack
            .limits
            .check(Limit::Entries, budget.entries, image, &layer)?;
        let raw_path = entry
            .path()
            .map_err(|e| bad(format!("bad tar path: {e}")))?
            .into_owned();
        let Some(path) = normalise(&raw_path) else {
            continue;
        };
        let base = base_of(&path);
        if base == OPAQUE_WHITEOUT {
            changes.push(Change::Opaque(parent_of(&path).to_string()));
            continue;
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            let dir = parent_of(&path);
            let target = if dir == "/" {
                format!("/{hidden}")
            } else {
                format!("{dir}/{hidden}")
            };
            changes.push(Change::Whiteout(target));
            continue;
        }
        let header = entry.header();
        let meta = Meta::from_header(header);
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if retain(&path) {
                    let size = header.size().unwrap_or(0);
                    budget.retained = budget.retained.saturating_add(size);
                    unpack
                        .limits
                        .check(Limit::SignedBytes, budget.retained, image, &path)?;
                    let mut data = Vec::with_capacity(size as usize);
                    if let Err(e) = entry.read_to_end(&mut data) {
                        return Err(over(&hit, format!("reading {path}: {e}")));
                    }
                    Kind::File(Some(data))
                } else {
                    Kind::File(None)
                }
            }
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad link name of {path}: {e}")))?
                    .and_then(|t| normalise(&t))
                    .ok_or_else(|| bad(format!("hard link {path} without a target")))?;
                changes.push(Change::HardLink(path, target));
                continue;
            }
            tar::EntryType::XGlobalHeader => continue,
            _ => Kind::Other,
        };
        changes.push(Change::Put(path, Node { meta, kind }));
    }
    Ok(changes)
}

#[cfg(test)]
pub(crate) mod tests;
