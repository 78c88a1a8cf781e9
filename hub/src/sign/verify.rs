//! Verifying module signatures the way the kernel does, against one certificate: the hub ships
//! a signed image only when it produced the digest itself or every module `filesToSign` matches
//! in that digest carries a valid signature by the MCM's certificate. A manifest annotation
//! alone proves nothing (anyone who can push to the repository can write it).
//!
//! A module verifies when its outermost appended signature (`~Module signature appended~`) is a
//! PKCS#7/CMS SignedData with a signer identified by the certificate's issuer and serial number,
//! whose signature — over the module bytes before the signature, or over the signed attributes
//! when present (their message digest then must match the module) — verifies with the
//! certificate's public key (RSA PKCS#1 v1.5, ECDSA P-256/P-384; sha256/384/512).

use ::cms::content_info::ContentInfo;
use ::cms::signed_data::{SignedData, SignerIdentifier, SignerInfo};
use der::asn1::{ObjectIdentifier, OctetString};
use der::{Decode, Encode};
use oci_client::Client;
use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use pkcs8::DecodePublicKey;
use rsa::Pkcs1v15Sign;
use signature::hazmat::PrehashVerifier;

use super::image::{FilePatterns, LayerSource, MergedTree, Unpack, blocking, fetch_image};
use super::limits::SignRuntime;
use super::module_sig::split_signature;
use super::{HashAlgorithm, SignError, SigningCert};

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_WITH_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const PKEY_ID_PKCS7: u8 = 2;

/// Check that `module` carries a valid signature by `cert`. The error says why not, in words
/// for a status message.
pub fn verify_module(module: &[u8], cert: &SigningCert) -> Result<(), String> {
    let Some(trailer) = split_signature(module).map_err(|e| e.to_string())? else {
        return Err("not signed (no \"~Module signature appended~\" trailer)".into());
    };
    if trailer.id_type != PKEY_ID_PKCS7 {
        return Err(format!(
            "signature id type {} is not PKCS#7",
            trailer.id_type
        ));
    }
    let content_info = ContentInfo::from_der(trailer.cms)
        .map_err(|e| format!("signature is not a CMS ContentInfo: {e}"))?;
    if content_info.content_type != ID_SIGNED_DATA {
        return Err("signature is not a CMS SignedData".into());
    }
    let signed_data: SignedData = content_info
        .content
        .decode_as()
        .map_err(|e| format!("signature is not a CMS SignedData: {e}"))?;
    let tbs = &cert.parsed().tbs_certificate;
    let ours = |si: &&SignerInfo| match &si.sid {
        SignerIdentifier::IssuerAndSerialNumber(sid) => {
            sid.issuer == tbs.issuer && sid.serial_number == tbs.serial_number
        }
        SignerIdentifier::SubjectKeyIdentifier(_) => false,
    };
    let Some(signer_info) = signed_data.signer_infos.0.iter().find(ours) else {
        let by = super::cms::parse_signature(trailer.cms)
            .map(|i| format!("{} serial {}", i.issuer, i.serial_hex))
            .unwrap_or_else(|_| "an unknown signer".into());
        return Err(format!(
            "signed by {by}, not by the certificate {} serial {}",
            cert.issuer(),
            cert.serial_hex()
        ));
    };
    let hash = HashAlgorithm::from_oid(&signer_info.digest_alg.oid).ok_or_else(|| {
        format!(
            "unsupported digest algorithm {}",
            signer_info.digest_alg.oid
        )
    })?;
    let content_digest = hash.digest(trailer.unsigned);
    // With signed attributes the signature covers their DER (as a SET), and their message
    // digest must be the module's.
    let signed_digest = match &signer_info.signed_attrs {
        None => content_digest,
        Some(attrs) => {
            let md = attrs
                .iter()
                .find(|a| a.oid == ID_MESSAGE_DIGEST)
                .and_then(|a| a.values.iter().next())
                .and_then(|v| v.decode_as::<OctetString>().ok())
                .ok_or("signed attributes without a message digest")?;
            if md.as_bytes() != content_digest.as_slice() {
                return Err("the message digest does not match the module contents".into());
            }
            let der = attrs
                .to_der()
                .map_err(|e| format!("signed attributes: {e}"))?;
            hash.digest(&der)
        }
    };
    let signature = signer_info.signature.as_bytes();
    let spki = tbs
        .subject_public_key_info
        .to_der()
        .map_err(|e| format!("certificate public key: {e}"))?;
    let alg = signer_info.signature_algorithm.oid;
    let bad = || "the signature does not verify with the certificate's public key".to_string();
    if [
        RSA_ENCRYPTION,
        SHA256_WITH_RSA,
        SHA384_WITH_RSA,
        SHA512_WITH_RSA,
    ]
    .contains(&alg)
    {
        {
            let key = rsa::RsaPublicKey::from_public_key_der(&spki)
                .map_err(|_| "RSA signature, but the certificate holds no RSA key".to_string())?;
            let padding = match hash {
                HashAlgorithm::Sha256 => Pkcs1v15Sign::new::<sha2::Sha256>(),
                HashAlgorithm::Sha384 => Pkcs1v15Sign::new::<sha2::Sha384>(),
                HashAlgorithm::Sha512 => Pkcs1v15Sign::new::<sha2::Sha512>(),
            };
            key.verify(padding, &signed_digest, signature)
                .map_err(|_| bad())
        }
    } else if [ECDSA_WITH_SHA256, ECDSA_WITH_SHA384, ECDSA_WITH_SHA512].contains(&alg) {
        {
            if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_der(&spki) {
                let sig = p256::ecdsa::Signature::from_der(signature).map_err(|_| bad())?;
                key.verify_prehash(&signed_digest, &sig).map_err(|_| bad())
            } else if let Ok(key) = p384::ecdsa::VerifyingKey::from_public_key_der(&spki) {
                let sig = p384::ecdsa::Signature::from_der(signature).map_err(|_| bad())?;
                key.verify_prehash(&signed_digest, &sig).map_err(|_| bad())
            } else {
                Err("ECDSA signature, but the certificate holds no P-256/P-384 key".into())
            }
        }
    } else {
        Err(format!("unsupported signature algorithm {alg}"))
    }
}

/// Verify every file of `blobs` (merged) that `patterns` matches; returns the verified paths.
pub fn verify_layers(
    blobs: &[&dyn LayerSource],
    patterns: &FilePatterns,
    cert: &SigningCert,
    unpack: &Unpack,
) -> Result<Vec<String>, SignError> {
    let tree = MergedTree::from_layers(blobs, patterns, unpack)?;
    let files = tree.matched_files(patterns)?;
    for (file, data) in &files {
        verify_module(data, cert).map_err(|reason| SignError::SignatureInvalid {
            image: unpack.image.clone(),
            file: file.to_string(),
            reason,
        })?;
    }
    Ok(files.into_iter().map(|(f, _)| f.to_string()).collect())
}

/// Pull `image` at `digest` and verify its modules against `cert` (see [`verify_layers`]).
/// Returns the verified files.
pub async fn verify_image(
    client: &Client,
    rt: &SignRuntime,
    image: &Reference,
    digest: &str,
    auth: &RegistryAuth,
    files_to_sign: &[String],
    cert: &SigningCert,
) -> Result<Vec<String>, SignError> {
    let patterns = FilePatterns::new(files_to_sign)?;
    let pinned = image.clone_with_digest(digest.to_string());
    let dir = rt.temp_dir()?;
    let fetched = fetch_image(client, rt, &pinned, auth, dir.path()).await?;
    if fetched.digest != digest {
        return Err(SignError::Image {
            image: pinned.whole(),
            reason: format!("the registry returned manifest {}", fetched.digest),
        });
    }
    let unpack = Unpack {
        image: pinned.whole(),
        limits: rt.limits,
    };
    let cert = cert.clone();
    let layers = fetched.layers;
    let files = blocking(rt, &unpack.image.clone(), move || {
        let sources: Vec<&dyn LayerSource> = layers.iter().map(|p| p as &dyn LayerSource).collect();
        verify_layers(&sources, &patterns, &cert, &unpack)
    })
    .await?;
    drop(dir);
    Ok(files)
}

/// The hub's gate before shipping a signed image: `Ok` when `digest` of `image` was produced by
/// this process or its modules verify against `cert` (remembered per digest, certificate and
/// patterns, both ways: an image is pulled once per hub process, a rejected digest too). The error's
/// [`status_reason`](SignError::status_reason) is `SignatureInvalid` when a module does not
/// verify.
pub async fn ensure_verified(
    client: &Client,
    rt: &SignRuntime,
    image: &Reference,
    digest: &str,
    auth: &RegistryAuth,
    files_to_sign: &[String],
    cert: &SigningCert,
) -> Result<(), SignError> {
    let key = SignRuntime::verification_key(cert, files_to_sign);
    if rt.is_verified(digest, &key) {
        return Ok(());
    }
    if let Some((image, file, reason)) = rt.rejection(digest, &key) {
        return Err(SignError::SignatureInvalid {
            image,
            file,
            reason,
        });
    }
    let files = match verify_image(client, rt, image, digest, auth, files_to_sign, cert).await {
        Ok(files) => files,
        Err(SignError::SignatureInvalid {
            image,
            file,
            reason,
        }) => {
            rt.mark_rejected(digest, &key, (image.clone(), file.clone(), reason.clone()));
            return Err(SignError::SignatureInvalid {
                image,
                file,
                reason,
            });
        }
        Err(e) => return Err(e),
    };
    tracing::info!(image = %image.whole(), digest, files = files.len(), "module signatures verified");
    rt.mark_verified(digest, &key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::layers::tests::{E, tar_of, test_signer};
    use crate::sign::module_sig::append_signature;
    use crate::sign::sign_module;

    #[test]
    fn modules_signed_by_the_certificate_verify_others_do_not() {
        let signer = test_signer("verify me");
        let other = test_signer("verify me");
        let module = b"\x7fELF a module body".repeat(100);
        for hash in [
            HashAlgorithm::Sha256,
            HashAlgorithm::Sha384,
            HashAlgorithm::Sha512,
        ] {
            let signed = sign_module(&module, &signer, hash).expect("sign");
            assert_eq!(verify_module(&signed, signer.cert()), Ok(()), "{hash}");
        }
        let signed = sign_module(&module, &signer, HashAlgorithm::Sha256).expect("sign");

        // Unsigned, signed by another key, tampered content, tampered signature.
        let err = verify_module(&module, signer.cert()).expect_err("unsigned");
        assert!(err.contains("not signed"), "{err}");
        let by_other = sign_module(&module, &other, HashAlgorithm::Sha256).expect("sign");
        let err = verify_module(&by_other, signer.cert()).expect_err("other");
        assert!(err.contains("not by the certificate"), "{err}");
        let mut tampered = signed.clone();
        tampered[10] ^= 1;
        let err = verify_module(&tampered, signer.cert()).expect_err("tampered");
        assert!(err.contains("does not verify"), "{err}");
        let unsigned = crate::sign::strip_signature(&signed).expect("strip");
        let cms = &signed[unsigned.len()..signed.len() - 12 - crate::sign::module_sig::MAGIC.len()];
        let mut bad_sig = cms.to_vec();
        let last = bad_sig.len() - 1;
        bad_sig[last] ^= 0x55;
        let forged = append_signature(unsigned, &bad_sig).expect("append");
        assert!(verify_module(&forged, signer.cert()).is_err());
        // The trailer alone (an empty or garbage CMS) is not a signature.
        let junk = append_signature(unsigned, b"not a cms").expect("append");
        assert!(verify_module(&junk, signer.cert()).is_err());
    }

    #[test]
    fn images_verify_only_when_every_matched_module_does() {
        let signer = test_signer("image verify");
        let good = sign_module(b"module a", &signer, HashAlgorithm::Sha256).expect("sign");
        let p = FilePatterns::new(&["/opt/*.ko".to_string()]).expect("patterns");
        let signed = tar_of(
            &[
                E::File("opt/a.ko", &good, 0o644),
                E::File("opt/b.ko", &good, 0o644),
            ],
            true,
        );
        let files =
            verify_layers(&[&signed], &p, signer.cert(), &Unpack::default()).expect("verifies");
        assert_eq!(files, ["/opt/a.ko", "/opt/b.ko"]);

        // A later layer replacing one module with an unsigned one.
        let swap = tar_of(&[E::File("opt/b.ko", b"evil module", 0o644)], false);
        let err = verify_layers(&[&signed, &swap], &p, signer.cert(), &Unpack::default())
            .expect_err("unsigned b.ko");
        assert_eq!(err.status_reason(), Some("SignatureInvalid"));
        assert!(err.to_string().contains("/opt/b.ko"), "{err}");
    }
}
