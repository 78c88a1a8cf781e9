//! The one extra layer of a signed image: the signed files and their parent directories.

use super::*;

/// The extra layer: the signed files and their parent directories.
#[derive(Clone)]
pub struct SigningLayer {
    /// The gzip-compressed tar (the blob to push).
    pub blob: Vec<u8>,
    /// `sha256:<hex>` of `blob`.
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Absolute paths of the signed files, sorted.
    pub files: Vec<String>,
}

impl std::fmt::Debug for SigningLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningLayer")
            .field("digest", &self.digest)
            .field("diff_id", &self.diff_id)
            .field("size", &self.blob.len())
            .field("files", &self.files)
            .finish()
    }
}

pub(super) fn sha256_id(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Sign every regular file of the merged layers that a pattern matches (an existing signature
/// is stripped first) and build the layer holding the signed copies. Each pattern must match
/// at least one file.
pub fn build_signing_layer(
    blobs: &[&dyn LayerSource],
    patterns: &FilePatterns,
    signer: &Signer,
    hash: HashAlgorithm,
    unpack: &Unpack,
) -> Result<SigningLayer, SignError> {
    let tree = MergedTree::from_layers(blobs, patterns, unpack)?;
    let matched_files = tree.matched_files(patterns)?;
    let matched: Vec<&str> = matched_files.iter().map(|(p, _)| *p).collect();

    let mut dirs = BTreeSet::new();
    for file in &matched {
        let mut dir = parent_of(file);
        while dir != "/" && dirs.insert(dir) {
            dir = parent_of(dir);
        }
    }

    let mut builder = tar::Builder::new(Vec::new());
    let io = |e: std::io::Error| SignError::Encoding(format!("writing the signing layer: {e}"));
    for dir in &dirs {
        let meta = match tree.nodes.get(*dir) {
            Some(Node {
                meta,
                kind: Kind::Dir,
            }) => meta.clone(),
            _ => Meta::default_dir(),
        };
        let mut header = meta.header(tar::EntryType::Directory, 0);
        builder
            .append_data(&mut header, format!("{}/", &dir[1..]), std::io::empty())
            .map_err(io)?;
    }
    for (file, data) in &matched_files {
        let meta = tree
            .nodes
            .get(*file)
            .map(|n| n.meta.clone())
            .unwrap_or_else(Meta::default_dir);
        let signed = module_sig::sign_module(data, signer, hash).map_err(|e| e.in_file(file))?;
        let mut header = meta.header(tar::EntryType::Regular, signed.len() as u64);
        builder
            .append_data(&mut header, &file[1..], signed.as_slice())
            .map_err(io)?;
        tracing::debug!(file, size = signed.len(), "signed file");
    }
    let tar = builder.into_inner().map_err(io)?;
    let diff_id = sha256_id(&tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&tar).map_err(io)?;
    let blob = gz.finish().map_err(io)?;
    Ok(SigningLayer {
        digest: sha256_id(&blob),
        diff_id,
        blob,
        files: matched.iter().map(|s| s.to_string()).collect(),
    })
}
