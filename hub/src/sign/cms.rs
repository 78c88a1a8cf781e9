//! The CMS (PKCS#7) SignedData that `scripts/sign-file` appends to a module.
//!
//! `sign-file` calls OpenSSL's `CMS_sign(NULL, NULL, NULL, NULL, NOCERTS|PARTIAL|BINARY|DETACHED|
//! STREAM)`, `CMS_add1_signer(cms, cert, key, md, NOCERTS|BINARY|NOSMIMECAP|NOATTR)` and
//! `CMS_final`. For an RSA key that yields, field for field:
//!
//! ```text
//! ContentInfo { id-signedData, [0] SignedData {
//!   version 1, digestAlgorithms { {sha-N} }            -- parameters absent
//!   encapContentInfo { id-data }                        -- detached: no content
//!   -- no certificates, no crls
//!   signerInfos { { version 1,
//!     sid issuerAndSerialNumber (from the certificate),
//!     digestAlgorithm {sha-N},                          -- parameters absent
//!     -- no signed attributes: the signature is over the content digest itself
//!     signatureAlgorithm {rsaEncryption, NULL},         -- ECDSA: {ecdsa-with-SHA-N}, absent
//!     signature OCTET STRING } } } }
//! ```
//!
//! RSA PKCS#1 v1.5 is deterministic, so the DER is byte-identical to OpenSSL's. The RSA
//! private-key operation uses `ring` when it accepts the key and the `rsa` crate otherwise. ECDSA here is
//! deterministic too (RFC 6979) while OpenSSL's is randomised: only the signature value differs.

use ::cms::cert::IssuerAndSerialNumber;
use ::cms::content_info::{CmsVersion, ContentInfo};
use ::cms::signed_data::{
    EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use der::asn1::{ObjectIdentifier, OctetString, SetOfVec};
use der::{Any, Decode, Encode};
use rsa::Pkcs1v15Sign;
use rsa::rand_core::OsRng;
use signature::hazmat::PrehashSigner;
use spki::AlgorithmIdentifierOwned;

use super::keys::{PrivateKey, RsaKey, common_name};
use super::{HashAlgorithm, SignError, Signer};

const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_WITH_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");

/// What a module signature says about itself (for status, `modinfo`-like output and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInfo {
    /// Common name of the issuer in the signer identifier (what `modinfo` prints as `signer`).
    pub signer: Option<String>,
    /// The issuer in the signer identifier, RFC 4514.
    pub issuer: String,
    /// The certificate serial number, upper-case hex (`modinfo` prints it as `sig_key`).
    pub serial_hex: String,
    /// Digest algorithm.
    pub hash: HashAlgorithm,
    /// `rsaEncryption`, `ecdsa-with-SHA256`, … or the dotted OID.
    pub signature_algorithm: String,
    /// Length of the CMS DER.
    pub cms_len: usize,
}

/// Detached CMS SignedData over `content`, as `sign-file` produces it (see the module docs).
pub fn sign_detached(
    signer: &Signer,
    hash: HashAlgorithm,
    content: &[u8],
) -> Result<Vec<u8>, SignError> {
    let (signature_algorithm, signature) = match signer.key() {
        PrivateKey::Rsa(key) => {
            let alg = AlgorithmIdentifierOwned {
                oid: RSA_ENCRYPTION,
                parameters: Some(Any::null()),
            };
            (alg, rsa_sign(key, hash, content)?)
        }
        PrivateKey::P256(key) => {
            let sig: p256::ecdsa::Signature = key
                .sign_prehash(&hash.digest(content))
                .map_err(|_| SignError::Key("ECDSA signing failed".into()))?;
            (ecdsa_algorithm(hash), sig.to_der().as_bytes().to_vec())
        }
        PrivateKey::P384(key) => {
            let sig: p384::ecdsa::Signature = key
                .sign_prehash(&hash.digest(content))
                .map_err(|_| SignError::Key("ECDSA signing failed".into()))?;
            (ecdsa_algorithm(hash), sig.to_der().as_bytes().to_vec())
        }
    };

    let tbs = &signer.cert().parsed().tbs_certificate;
    let digest_algorithm = AlgorithmIdentifierOwned {
        oid: hash.oid(),
        parameters: None,
    };
    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: tbs.issuer.clone(),
            serial_number: tbs.serial_number.clone(),
        }),
        digest_alg: digest_algorithm.clone(),
        signed_attrs: None,
        signature_algorithm,
        signature: OctetString::new(signature)?,
        unsigned_attrs: None,
    };
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![digest_algorithm])?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: None,
        },
        certificates: None,
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer_info])?),
    };
    let content_info = ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: Any::encode_from(&signed_data)?,
    };
    Ok(content_info.to_der()?)
}

/// RSASSA-PKCS1-v1_5 over `content` (deterministic: any correct implementation gives the same
/// bytes).
fn rsa_sign(key: &RsaKey, hash: HashAlgorithm, content: &[u8]) -> Result<Vec<u8>, SignError> {
    let failed = || SignError::Key("RSA signing failed".into());
    if let Some(fast) = &key.fast {
        let padding: &'static dyn ring::signature::RsaEncoding = match hash {
            HashAlgorithm::Sha256 => &ring::signature::RSA_PKCS1_SHA256,
            HashAlgorithm::Sha384 => &ring::signature::RSA_PKCS1_SHA384,
            HashAlgorithm::Sha512 => &ring::signature::RSA_PKCS1_SHA512,
        };
        let mut sig = vec![0u8; fast.public().modulus_len()];
        fast.sign(padding, &ring::rand::SystemRandom::new(), content, &mut sig)
            .map_err(|_| failed())?;
        return Ok(sig);
    }
    rsa_sign_portable(key, hash, content)
}

/// The `rsa` crate path, for keys `ring` does not take (under 2048 bits, small exponents).
pub(crate) fn rsa_sign_portable(
    key: &RsaKey,
    hash: HashAlgorithm,
    content: &[u8],
) -> Result<Vec<u8>, SignError> {
    let padding = match hash {
        HashAlgorithm::Sha256 => Pkcs1v15Sign::new::<sha2::Sha256>(),
        HashAlgorithm::Sha384 => Pkcs1v15Sign::new::<sha2::Sha384>(),
        HashAlgorithm::Sha512 => Pkcs1v15Sign::new::<sha2::Sha512>(),
    };
    // The RNG only blinds the private-key operation; the signature is deterministic.
    key.key
        .sign_with_rng(&mut OsRng, padding, &hash.digest(content))
        .map_err(|_| SignError::Key("RSA signing failed".into()))
}

fn ecdsa_algorithm(hash: HashAlgorithm) -> AlgorithmIdentifierOwned {
    let oid = match hash {
        HashAlgorithm::Sha256 => ECDSA_WITH_SHA256,
        HashAlgorithm::Sha384 => ECDSA_WITH_SHA384,
        HashAlgorithm::Sha512 => ECDSA_WITH_SHA512,
    };
    AlgorithmIdentifierOwned {
        oid,
        parameters: None,
    }
}

/// Read the signer, serial and digest from a CMS SignedData as appended to a module.
pub fn parse_signature(der: &[u8]) -> Result<SignatureInfo, SignError> {
    let bad = |reason: String| SignError::Module {
        what: "signature".into(),
        reason,
    };
    let content_info =
        ContentInfo::from_der(der).map_err(|e| bad(format!("not a CMS ContentInfo: {e}")))?;
    if content_info.content_type != ID_SIGNED_DATA {
        return Err(bad(format!(
            "CMS content type {} is not signedData",
            content_info.content_type
        )));
    }
    let signed_data: SignedData = content_info
        .content
        .decode_as()
        .map_err(|e| bad(format!("not a CMS SignedData: {e}")))?;
    let signer_info = signed_data
        .signer_infos
        .0
        .iter()
        .next()
        .ok_or_else(|| bad("no signer".into()))?;
    let SignerIdentifier::IssuerAndSerialNumber(sid) = &signer_info.sid else {
        return Err(bad(
            "signer identified by subject key id, not issuer and serial".into(),
        ));
    };
    let hash = HashAlgorithm::from_oid(&signer_info.digest_alg.oid).ok_or_else(|| {
        bad(format!(
            "unsupported digest algorithm {}",
            signer_info.digest_alg.oid
        ))
    })?;
    let oid = signer_info.signature_algorithm.oid;
    let signature_algorithm = match oid {
        o if o == RSA_ENCRYPTION => "rsaEncryption".to_string(),
        o if o == ECDSA_WITH_SHA256 => "ecdsa-with-SHA256".to_string(),
        o if o == ECDSA_WITH_SHA384 => "ecdsa-with-SHA384".to_string(),
        o if o == ECDSA_WITH_SHA512 => "ecdsa-with-SHA512".to_string(),
        o => o.to_string(),
    };
    Ok(SignatureInfo {
        signer: common_name(&sid.issuer),
        issuer: sid.issuer.to_string(),
        serial_hex: hex::encode_upper(sid.serial_number.as_bytes()),
        hash,
        signature_algorithm,
        cms_len: der.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::layers::tests::test_signer;

    #[test]
    fn ring_and_portable_rsa_paths_agree() {
        let signer = test_signer("rsa paths");
        let PrivateKey::Rsa(key) = signer.key() else {
            panic!("test signer is not RSA");
        };
        assert!(key.fast.is_some(), "ring refused a 2048-bit key");
        let content = b"module bytes".repeat(1000);
        for hash in [
            HashAlgorithm::Sha256,
            HashAlgorithm::Sha384,
            HashAlgorithm::Sha512,
        ] {
            let fast = rsa_sign(key, hash, &content).expect("ring");
            let portable = rsa_sign_portable(key, hash, &content).expect("rsa");
            assert_eq!(fast, portable, "{hash}");
        }
    }

    #[test]
    fn signed_data_reads_back() {
        let signer = test_signer("read back");
        let der = sign_detached(&signer, HashAlgorithm::Sha384, b"content").expect("sign");
        let info = parse_signature(&der).expect("parse");
        assert_eq!(info.signer.as_deref(), Some("read back"));
        assert_eq!(info.hash, HashAlgorithm::Sha384);
        assert_eq!(info.serial_hex, signer.cert().serial_hex());
        assert_eq!(info.signature_algorithm, "rsaEncryption");
        assert_eq!(info.cms_len, der.len());
        assert!(parse_signature(&der[..der.len() - 1]).is_err());
    }
}
