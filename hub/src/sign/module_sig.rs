//! The appended module signature: `module || CMS || struct module_signature || magic`.
//!
//! ```c
//! struct module_signature {
//!     u8 algo;        /* 0 for PKCS#7 */
//!     u8 hash;        /* 0 for PKCS#7 */
//!     u8 id_type;     /* PKEY_ID_PKCS7 = 2 */
//!     u8 signer_len;  /* 0 */
//!     u8 key_id_len;  /* 0 */
//!     u8 __pad[3];
//!     __be32 sig_len; /* length of the CMS DER */
//! };
//! #define MODULE_SIG_STRING "~Module signature appended~\n"
//! ```

use super::cms::{SignatureInfo, parse_signature, sign_detached};
use super::{HashAlgorithm, SignError, Signer};

/// The marker at the very end of a signed module.
pub const MAGIC: &[u8] = b"~Module signature appended~\n";
/// `sizeof(struct module_signature)`.
const SIG_STRUCT_LEN: usize = 12;
/// `PKEY_ID_PKCS7`.
const PKEY_ID_PKCS7: u8 = 2;

fn malformed(reason: impl Into<String>) -> SignError {
    SignError::Module {
        what: "signature trailer".into(),
        reason: reason.into(),
    }
}

/// One appended signature, taken apart.
pub(crate) struct Trailer<'a> {
    /// Everything before the signature.
    pub(crate) unsigned: &'a [u8],
    pub(crate) cms: &'a [u8],
    pub(crate) id_type: u8,
}

/// The outermost appended signature, if any (what the kernel checks).
pub(crate) fn split_signature(module: &[u8]) -> Result<Option<Trailer<'_>>, SignError> {
    split_one(module)
}

/// The outermost appended signature, if any.
fn split_one(module: &[u8]) -> Result<Option<Trailer<'_>>, SignError> {
    let Some(rest) = module.strip_suffix(MAGIC) else {
        return Ok(None);
    };
    let Some(struct_at) = rest.len().checked_sub(SIG_STRUCT_LEN) else {
        return Err(malformed("too short for struct module_signature"));
    };
    let ms = &rest[struct_at..];
    let id_type = ms[2];
    let sig_len = u32::from_be_bytes([ms[8], ms[9], ms[10], ms[11]]) as usize;
    let Some(cms_at) = struct_at.checked_sub(sig_len) else {
        return Err(malformed(format!(
            "signature length {sig_len} exceeds the module size"
        )));
    };
    Ok(Some(Trailer {
        unsigned: &rest[..cms_at],
        cms: &rest[cms_at..struct_at],
        id_type,
    }))
}

/// The module without its appended signature(s); the input itself when unsigned. Repeated
/// signatures (as `sign-file` leaves when run twice) are all removed.
pub fn strip_signature(module: &[u8]) -> Result<&[u8], SignError> {
    let mut current = module;
    while let Some(trailer) = split_one(current)? {
        current = trailer.unsigned;
    }
    Ok(current)
}

/// Whether the module ends with a signature marker.
pub fn is_signed(module: &[u8]) -> bool {
    module.ends_with(MAGIC)
}

/// What the outermost appended signature says (signer, serial, hash), or `None` if unsigned.
pub fn signature_info(module: &[u8]) -> Result<Option<SignatureInfo>, SignError> {
    match split_one(module)? {
        None => Ok(None),
        Some(t) if t.id_type != PKEY_ID_PKCS7 => Err(malformed(format!(
            "signature id type {} is not PKCS#7",
            t.id_type
        ))),
        Some(t) => parse_signature(t.cms).map(Some),
    }
}

/// `unsigned || cms || struct module_signature || magic`.
pub fn append_signature(unsigned: &[u8], cms: &[u8]) -> Result<Vec<u8>, SignError> {
    let sig_len = u32::try_from(cms.len()).map_err(|_| malformed("signature too large"))?;
    let mut out = Vec::with_capacity(unsigned.len() + cms.len() + SIG_STRUCT_LEN + MAGIC.len());
    out.extend_from_slice(unsigned);
    out.extend_from_slice(cms);
    out.extend_from_slice(&[0, 0, PKEY_ID_PKCS7, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&sig_len.to_be_bytes());
    out.extend_from_slice(MAGIC);
    Ok(out)
}

/// The detached CMS for a module (any existing signature stripped first), as `sign-file -d`
/// writes to `<module>.p7s`.
pub fn module_cms(
    module: &[u8],
    signer: &Signer,
    hash: HashAlgorithm,
) -> Result<Vec<u8>, SignError> {
    sign_detached(signer, hash, strip_signature(module)?)
}

/// Sign a module as `sign-file <hash> <key> <cert> <module>` does, except that an existing
/// signature is stripped first (so re-signing equals signing the unsigned module).
pub fn sign_module(
    module: &[u8],
    signer: &Signer,
    hash: HashAlgorithm,
) -> Result<Vec<u8>, SignError> {
    let unsigned = strip_signature(module)?;
    let cms = sign_detached(signer, hash, unsigned)?;
    append_signature(unsigned, &cms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_runtime::ErrorCategory as _;

    #[test]
    fn unsigned_module_is_left_alone() -> Result<(), SignError> {
        let module = b"\x7fELF not really a module";
        assert_eq!(strip_signature(module)?, module);
        assert!(!is_signed(module));
        assert_eq!(signature_info(module)?, None);
        Ok(())
    }

    #[test]
    fn append_then_strip_round_trips() -> Result<(), SignError> {
        let module = b"\x7fELF body";
        let signed = append_signature(module, b"CMSBYTES")?;
        assert!(is_signed(&signed));
        let tail = &signed[module.len()..];
        assert_eq!(&tail[..8], b"CMSBYTES");
        assert_eq!(&tail[8..20], &[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
        assert_eq!(&tail[20..], MAGIC);
        assert_eq!(strip_signature(&signed)?, module);
        // Signed twice (sign-file does not strip): both signatures go.
        let twice = append_signature(&signed, b"MORE")?;
        assert_eq!(strip_signature(&twice)?, module);
        Ok(())
    }

    #[test]
    fn truncated_trailers_are_errors() {
        let mut short = b"abc".to_vec();
        short.extend_from_slice(MAGIC);
        assert_eq!(
            strip_signature(&short).err().map(|e| e.category()),
            Some("module")
        );

        let mut huge = vec![0u8; 4];
        huge.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        huge.extend_from_slice(MAGIC);
        let err = strip_signature(&huge).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("exceeds")),
            "{err:?}"
        );
    }

    #[test]
    fn non_pkcs7_signature_is_reported() {
        let mut m = b"body".to_vec();
        m.extend_from_slice(&[1, 2, 3]);
        m.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
        m.extend_from_slice(MAGIC);
        assert!(signature_info(&m).is_err());
    }
}
