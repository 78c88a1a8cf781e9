//! Fake kernel modules for the test world, and parsers for what the simulated kernel
//! checks: the `.modinfo` fields (vermagic) and the appended module signature.
//!
//! [`fake_module`] writes a minimal ELF64 x86-64 relocatable object whose `.modinfo`
//! section kmod's `modinfo` reads and which the kernel's `scripts/sign-file` signs.

use std::path::{Path, PathBuf};

use object::read::elf::ElfFile64;
use object::write::Object;
use object::{
    Architecture, BinaryFormat, Endianness, Object as _, ObjectSection as _, SectionKind,
};

/// The marker the kernel looks for at the end of a signed module.
pub const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `id_type` of a PKCS#7 (CMS) signature in `struct module_signature`.
pub const PKEY_ID_PKCS7: u8 = 2;
/// Where Debian's `linux-kbuild` puts the kernel's signing tool.
pub const SIGN_FILE_GLOB: &str = "/usr/lib/linux-kbuild-*/scripts/sign-file";

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("not an ELF64 object: {0}")]
    NotElf(String),
    #[error("no .modinfo section")]
    NoModinfo,
    #[error("malformed module signature: {0}")]
    BadSignature(&'static str),
    #[error("sign-file: {0}")]
    SignFile(String),
    #[error("building a real module: {0}")]
    Build(String),
}

impl KmodError {
    pub fn category(&self) -> &'static str {
        match self {
            KmodError::NotElf(_) => "not-elf",
            KmodError::NoModinfo => "no-modinfo",
            KmodError::BadSignature(_) => "bad-signature",
            KmodError::SignFile(_) => "sign-file",
            KmodError::Build(_) => "build",
        }
    }
}

/// The `vermagic` string a module built for `kernel` carries (as the kernel's own build writes it).
pub fn vermagic_for(kernel: &str) -> String {
    format!("{kernel} SMP preempt mod_unload modversions ")
}

/// A minimal loadable-looking kernel module: an ELF64 x86-64 relocatable object with a
/// `.modinfo` section (`name`, `vermagic`, `license`, …), a `.gnu.linkonce.this_module`
/// section and a tiny `.text`. `name` is written as the kernel would (`-` as `_`).
pub fn fake_module(name: &str, vermagic_kernel: &str) -> Vec<u8> {
    let kname = name.replace('-', "_");
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let text = obj.add_section(Vec::new(), b".text".to_vec(), SectionKind::Text);
    // `xor eax, eax; ret`: an init function that returns 0.
    obj.append_section_data(text, &[0x31, 0xc0, 0xc3], 16);
    let fields = [
        ("license", "GPL".to_string()),
        ("description", format!("kmm-fleet test module {kname}")),
        ("author", "kmm-fleet test world".to_string()),
        ("srcversion", srcversion(&kname, vermagic_kernel)),
        ("depends", String::new()),
        ("retpoline", "Y".to_string()),
        ("name", kname.clone()),
        ("vermagic", vermagic_for(vermagic_kernel)),
    ];
    let mut modinfo = Vec::new();
    for (k, v) in fields {
        modinfo.extend_from_slice(k.as_bytes());
        modinfo.push(b'=');
        modinfo.extend_from_slice(v.as_bytes());
        modinfo.push(0);
    }
    let info = obj.add_section(
        Vec::new(),
        b".modinfo".to_vec(),
        SectionKind::ReadOnlyString,
    );
    obj.append_section_data(info, &modinfo, 1);
    // struct module: only its name matters to anyone reading the file.
    let mut this_module = vec![0u8; 0x380];
    let n = kname.len().min(55);
    this_module[0x18..0x18 + n].copy_from_slice(&kname.as_bytes()[..n]);
    let this = obj.add_section(
        Vec::new(),
        b".gnu.linkonce.this_module".to_vec(),
        SectionKind::Data,
    );
    obj.append_section_data(this, &this_module, 64);
    // Writing an object built from valid in-memory parts cannot fail for ELF.
    obj.write().unwrap_or_default()
}

fn srcversion(name: &str, kernel: &str) -> String {
    let h = shared_api::labels::short_hash(&format!("{name}@{kernel}"), 24);
    h.to_ascii_uppercase()
}

/// The `.modinfo` fields of a module, in file order (`("vermagic", "6.1.0 SMP …")`, …).
/// A signature appended to the file does not disturb parsing.
pub fn modinfo(module: &[u8]) -> Result<Vec<(String, String)>, KmodError> {
    let content = split_signature(module).map(|(c, _)| c).unwrap_or(module);
    let elf =
        ElfFile64::<Endianness>::parse(content).map_err(|e| KmodError::NotElf(e.to_string()))?;
    let section = elf
        .section_by_name(".modinfo")
        .ok_or(KmodError::NoModinfo)?;
    let data = section
        .data()
        .map_err(|e| KmodError::NotElf(e.to_string()))?;
    Ok(data
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

/// The kernel a module was built for: the first word of its `vermagic`.
pub fn vermagic_kernel(module: &[u8]) -> Result<Option<String>, KmodError> {
    Ok(modinfo(module)?
        .into_iter()
        .find(|(k, _)| k == "vermagic")
        .and_then(|(_, v)| v.split_whitespace().next().map(str::to_string)))
}

/// `struct module_signature` from `include/linux/module_signature.h`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSignature {
    pub algo: u8,
    pub hash: u8,
    pub id_type: u8,
    pub signer_len: u8,
    pub key_id_len: u8,
    /// The signature blob (a DER CMS `SignedData` for `id_type` PKCS#7).
    pub signature: Vec<u8>,
}

/// Split a signed module into (content that was signed, signature). `None` when the file
/// does not end with the signature marker; an error when the marker is there but the
/// trailer is inconsistent.
pub fn split_signature(module: &[u8]) -> Option<(&[u8], ModuleSignature)> {
    parse_signature(module).ok().flatten()
}

/// Like [`split_signature`], but tells a malformed trailer apart from an unsigned module.
pub fn parse_signature(module: &[u8]) -> Result<Option<(&[u8], ModuleSignature)>, KmodError> {
    let Some(rest) = module.strip_suffix(SIGNATURE_MAGIC) else {
        return Ok(None);
    };
    const INFO_LEN: usize = 12;
    if rest.len() < INFO_LEN {
        return Err(KmodError::BadSignature(
            "trailer shorter than struct module_signature",
        ));
    }
    let (body, info) = rest.split_at(rest.len() - INFO_LEN);
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    if body.len() < sig_len {
        return Err(KmodError::BadSignature("sig_len larger than the file"));
    }
    let (content, sig) = body.split_at(body.len() - sig_len);
    Ok(Some((
        content,
        ModuleSignature {
            algo: info[0],
            hash: info[1],
            id_type: info[2],
            signer_len: info[3],
            key_id_len: info[4],
            signature: sig.to_vec(),
        },
    )))
}

/// The kernel's `sign-file` tool on this machine (Debian `linux-kbuild-*`).
pub fn sign_file_path() -> Result<PathBuf, KmodError> {
    if let Ok(p) = std::env::var("KMM_SIGN_FILE") {
        return Ok(PathBuf::from(p));
    }
    glob::glob(SIGN_FILE_GLOB)
        .map_err(|e| KmodError::SignFile(e.to_string()))?
        .filter_map(Result::ok)
        .max()
        .ok_or_else(|| {
            KmodError::SignFile(format!(
                "not found at {SIGN_FILE_GLOB} (install linux-kbuild)"
            ))
        })
}

/// Sign a module with the kernel's `sign-file` (`sha256`, PEM key, PEM or DER cert),
/// returning the signed bytes. For test fixtures; the product signs natively.
pub fn sign_with_sign_file(module: &[u8], key: &Path, cert: &Path) -> Result<Vec<u8>, KmodError> {
    let tool = sign_file_path()?;
    let dir = tempfile::tempdir().map_err(|e| KmodError::SignFile(e.to_string()))?;
    let file = dir.path().join("module.ko");
    std::fs::write(&file, module).map_err(|e| KmodError::SignFile(e.to_string()))?;
    let out = std::process::Command::new(&tool)
        .arg("sha256")
        .arg(key)
        .arg(cert)
        .arg(&file)
        .output()
        .map_err(|e| KmodError::SignFile(format!("{}: {e}", tool.display())))?;
    if !out.status.success() {
        return Err(KmodError::SignFile(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    std::fs::read(&file).map_err(|e| KmodError::SignFile(e.to_string()))
}

/// The file name a module has on disk (`kmm-ci-a` → `kmm_ci_a.ko`), as the build writes it.
pub fn module_file_name(name: &str) -> String {
    format!("{}.ko", name.replace('-', "_"))
}

/// Whether two module names are the same to modprobe (`-` and `_` alike).
pub fn same_module(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| norm(x) == norm(y))
}

fn norm(b: u8) -> u8 {
    if b == b'-' { b'_' } else { b }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_of_fake_module() {
        let m = fake_module("kmm-ci-a", "6.1.0-18-amd64");
        let info = modinfo(&m).unwrap();
        assert!(
            info.contains(&("name".into(), "kmm_ci_a".into())),
            "{info:?}"
        );
        assert_eq!(
            vermagic_kernel(&m).unwrap().as_deref(),
            Some("6.1.0-18-amd64")
        );
        assert!(split_signature(&m).is_none());
    }

    #[test]
    fn signature_trailer_is_split() {
        let mut m = fake_module("a", "k");
        let content_len = m.len();
        let sig = vec![0x30u8; 300];
        m.extend_from_slice(&sig);
        m.extend_from_slice(&[0, 0, PKEY_ID_PKCS7, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        m.extend_from_slice(SIGNATURE_MAGIC);
        let (content, s) = split_signature(&m).unwrap();
        assert_eq!(content.len(), content_len);
        assert_eq!(s.id_type, PKEY_ID_PKCS7);
        assert_eq!(s.signature, sig);
        assert_eq!(vermagic_kernel(&m).unwrap().as_deref(), Some("k"));
        let mut bad = b"xx".to_vec();
        bad.extend_from_slice(SIGNATURE_MAGIC);
        assert!(parse_signature(&bad).is_err());
    }

    #[test]
    fn names() {
        assert!(same_module("kmm-ci-a", "kmm_ci_a"));
        assert!(!same_module("kmm-ci-a", "kmm_ci_b"));
        assert_eq!(module_file_name("kmm-ci-a"), "kmm_ci_a.ko");
    }
}
