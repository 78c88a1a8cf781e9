//! Signing material: the private key and certificate from a signing Secret (`key`, `cert`).
//!
//! Both entries may be PEM or DER. Keys may be RSA (PKCS#1 or PKCS#8) or ECDSA P-256/P-384
//! (SEC1 or PKCS#8). The key must belong to the certificate. Nothing here ever formats key
//! material: `Debug` is written by hand and decoder errors are reduced to a fixed text.

use std::fmt;

use der::asn1::ObjectIdentifier;
use der::{Decode, Encode};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use super::SignError;

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// The kind of signing key, for logs and status (never the key itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// RSA with the modulus size in bits.
    Rsa(usize),
    EcdsaP256,
    EcdsaP384,
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyAlgorithm::Rsa(bits) => write!(f, "RSA-{bits}"),
            KeyAlgorithm::EcdsaP256 => f.write_str("ECDSA-P256"),
            KeyAlgorithm::EcdsaP384 => f.write_str("ECDSA-P384"),
        }
    }
}

/// An RSA key: parsed and checked by `rsa`; the private-key operation runs in `ring` (constant
/// time and several times faster) whenever `ring` accepts the key (2048–8192 bits, e ≥ 65537).
pub(crate) struct RsaKey {
    pub(crate) key: rsa::RsaPrivateKey,
    pub(crate) fast: Option<ring::rsa::KeyPair>,
}

impl RsaKey {
    fn new(key: rsa::RsaPrivateKey) -> Self {
        let fast = key
            .to_pkcs1_der()
            .ok()
            .and_then(|der| ring::rsa::KeyPair::from_der(der.as_bytes()).ok());
        RsaKey { key, fast }
    }
}

/// A parsed private key. Deliberately not `Debug`.
pub(crate) enum PrivateKey {
    Rsa(Box<RsaKey>),
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

impl PrivateKey {
    fn algorithm(&self) -> KeyAlgorithm {
        match self {
            PrivateKey::Rsa(k) => KeyAlgorithm::Rsa(k.key.n().bits()),
            PrivateKey::P256(_) => KeyAlgorithm::EcdsaP256,
            PrivateKey::P384(_) => KeyAlgorithm::EcdsaP384,
        }
    }
}

/// The signing certificate: its DER bytes (as given) and the parsed form.
#[derive(Clone)]
pub struct SigningCert {
    der: Vec<u8>,
    parsed: Certificate,
}

impl SigningCert {
    /// Parse a certificate from PEM (the first `CERTIFICATE` block) or DER.
    pub fn from_pem_or_der(bytes: &[u8]) -> Result<Self, SignError> {
        let der = if looks_like_pem(bytes) {
            match CertificateDer::pem_slice_iter(bytes).next() {
                Some(Ok(c)) => c.as_ref().to_vec(),
                Some(Err(_)) => {
                    return Err(SignError::Certificate("malformed PEM".into()));
                }
                None => {
                    return Err(SignError::Certificate(
                        "no CERTIFICATE block in PEM input".into(),
                    ));
                }
            }
        } else {
            bytes.to_vec()
        };
        let parsed = Certificate::from_der(&der)
            .map_err(|e| SignError::Certificate(format!("not an X.509 certificate: {e}")))?;
        Ok(SigningCert { der, parsed })
    }

    /// The certificate's DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub(crate) fn parsed(&self) -> &Certificate {
        &self.parsed
    }

    /// Lower-case hex SHA-256 of the certificate DER: the value of the image annotation
    /// `io.kmm-fleet.signing-cert-sha256`.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.der))
    }

    /// The subject's common name, if any (what `modinfo` shows as `signer` for a self-signed
    /// certificate).
    pub fn subject_cn(&self) -> Option<String> {
        common_name(&self.parsed.tbs_certificate.subject)
    }

    /// The issuer as an RFC 4514 string.
    pub fn issuer(&self) -> String {
        self.parsed.tbs_certificate.issuer.to_string()
    }

    /// The serial number as upper-case hex.
    pub fn serial_hex(&self) -> String {
        hex::encode_upper(self.parsed.tbs_certificate.serial_number.as_bytes())
    }
}

impl fmt::Debug for SigningCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningCert")
            .field("subject", &self.parsed.tbs_certificate.subject.to_string())
            .field("serial", &self.serial_hex())
            .field("sha256", &self.sha256_hex())
            .finish()
    }
}

/// A private key with its certificate, checked to belong together. This is what signs.
/// Cloning shares the key (it is held once, behind an `Arc`), so a signing task can take its
/// own handle onto a blocking thread.
#[derive(Clone)]
pub struct Signer {
    key: std::sync::Arc<PrivateKey>,
    cert: SigningCert,
}

impl Signer {
    /// Load from the signing Secret's `key` and `cert` entries (PEM or DER each).
    pub fn from_pem_or_der(key: &[u8], cert: &[u8]) -> Result<Self, SignError> {
        let cert = SigningCert::from_pem_or_der(cert)?;
        let key = parse_private_key(key)?;
        check_pair(&key, &cert)?;
        Ok(Signer {
            key: std::sync::Arc::new(key),
            cert,
        })
    }

    /// The certificate.
    pub fn cert(&self) -> &SigningCert {
        &self.cert
    }

    /// The kind of key.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.key.algorithm()
    }

    pub(crate) fn key(&self) -> &PrivateKey {
        &self.key
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("algorithm", &self.algorithm())
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    // PEM files may carry explanatory text before the first block (`openssl x509 -text`).
    contains(bytes, b"-----BEGIN ")
}

fn parse_private_key(bytes: &[u8]) -> Result<PrivateKey, SignError> {
    if looks_like_pem(bytes) {
        if contains(bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY")
            || contains(bytes, b"Proc-Type: 4,ENCRYPTED")
        {
            return Err(SignError::Key(
                "encrypted private keys are not supported".into(),
            ));
        }
        return match PrivateKeyDer::from_pem_slice(bytes) {
            Ok(PrivateKeyDer::Pkcs8(k)) => from_pkcs8(k.secret_pkcs8_der()),
            Ok(PrivateKeyDer::Pkcs1(k)) => from_pkcs1(k.secret_pkcs1_der()),
            Ok(PrivateKeyDer::Sec1(k)) => from_sec1(k.secret_sec1_der()),
            Ok(_) => Err(SignError::Key("unsupported PEM key type".into())),
            Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(SignError::Key(
                "no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block in PEM input".into(),
            )),
            Err(_) => Err(SignError::Key("malformed PEM".into())),
        };
    }
    // DER: the structure says which kind it is; try the common ones in order.
    if pkcs8::PrivateKeyInfo::from_der(bytes).is_ok() {
        return from_pkcs8(bytes);
    }
    if pkcs1::RsaPrivateKey::from_der(bytes).is_ok() {
        return from_pkcs1(bytes);
    }
    if sec1::EcPrivateKey::from_der(bytes).is_ok() {
        return from_sec1(bytes);
    }
    Err(SignError::Key(
        "not a PEM or DER private key (PKCS#8, PKCS#1 RSA or SEC1 EC expected)".into(),
    ))
}

fn from_pkcs8(der: &[u8]) -> Result<PrivateKey, SignError> {
    let info = pkcs8::PrivateKeyInfo::from_der(der)
        .map_err(|_| SignError::Key("malformed PKCS#8 structure".into()))?;
    let alg = info.algorithm.oid;
    if alg == RSA_ENCRYPTION {
        let k = rsa::RsaPrivateKey::from_pkcs8_der(der)
            .map_err(|_| SignError::Key("invalid RSA key in PKCS#8".into()))?;
        return Ok(PrivateKey::Rsa(Box::new(RsaKey::new(k))));
    }
    if alg == ID_EC_PUBLIC_KEY {
        let curve = info
            .algorithm
            .parameters_oid()
            .map_err(|_| SignError::Key("EC key without a named curve".into()))?;
        return match curve {
            c if c == SECP256R1 => p256::SecretKey::from_pkcs8_der(der)
                .map(|k| PrivateKey::P256(k.into()))
                .map_err(|_| SignError::Key("invalid P-256 key in PKCS#8".into())),
            c if c == SECP384R1 => p384::SecretKey::from_pkcs8_der(der)
                .map(|k| PrivateKey::P384(k.into()))
                .map_err(|_| SignError::Key("invalid P-384 key in PKCS#8".into())),
            other => Err(SignError::Key(format!(
                "unsupported EC curve {other} (P-256 and P-384 are supported)"
            ))),
        };
    }
    Err(SignError::Key(format!(
        "unsupported key algorithm {alg} (RSA and ECDSA P-256/P-384 are supported)"
    )))
}

fn from_pkcs1(der: &[u8]) -> Result<PrivateKey, SignError> {
    rsa::RsaPrivateKey::from_pkcs1_der(der)
        .map(|k| PrivateKey::Rsa(Box::new(RsaKey::new(k))))
        .map_err(|_| SignError::Key("invalid PKCS#1 RSA key".into()))
}

fn from_sec1(der: &[u8]) -> Result<PrivateKey, SignError> {
    let parsed = sec1::EcPrivateKey::from_der(der)
        .map_err(|_| SignError::Key("malformed SEC1 EC key".into()))?;
    // Keys written without parameters: the scalar length tells the curve.
    let curve = match parsed.parameters.and_then(|p| p.named_curve()) {
        Some(c) => c,
        None if parsed.private_key.len() == 32 => SECP256R1,
        None if parsed.private_key.len() == 48 => SECP384R1,
        None => return Err(SignError::Key("EC key without a named curve".into())),
    };
    match curve {
        c if c == SECP256R1 => p256::SecretKey::from_sec1_der(der)
            .map(|k| PrivateKey::P256(k.into()))
            .map_err(|_| SignError::Key("invalid P-256 SEC1 key".into())),
        c if c == SECP384R1 => p384::SecretKey::from_sec1_der(der)
            .map(|k| PrivateKey::P384(k.into()))
            .map_err(|_| SignError::Key("invalid P-384 SEC1 key".into())),
        other => Err(SignError::Key(format!(
            "unsupported EC curve {other} (P-256 and P-384 are supported)"
        ))),
    }
}

/// The key must be the private half of the certificate's public key.
fn check_pair(key: &PrivateKey, cert: &SigningCert) -> Result<(), SignError> {
    let spki = &cert.parsed.tbs_certificate.subject_public_key_info;
    let spki_der = spki
        .to_der()
        .map_err(|e| SignError::Certificate(format!("public key: {e}")))?;
    let cert_alg = describe_spki(spki);
    let mismatch = |what: &str| {
        SignError::KeyCertMismatch(format!(
            "{what}: key is {}, certificate {} holds {cert_alg}",
            key.algorithm(),
            cert.parsed.tbs_certificate.subject
        ))
    };
    let same = match key {
        PrivateKey::Rsa(k) => {
            let public = rsa::RsaPublicKey::from_public_key_der(&spki_der)
                .map_err(|_| mismatch("different algorithm"))?;
            public.n() == k.key.n() && public.e() == k.key.e()
        }
        PrivateKey::P256(k) => {
            let public = p256::PublicKey::from_public_key_der(&spki_der)
                .map_err(|_| mismatch("different algorithm or curve"))?;
            public.to_encoded_point(false) == k.verifying_key().to_encoded_point(false)
        }
        PrivateKey::P384(k) => {
            let public = p384::PublicKey::from_public_key_der(&spki_der)
                .map_err(|_| mismatch("different algorithm or curve"))?;
            public.to_encoded_point(false) == k.verifying_key().to_encoded_point(false)
        }
    };
    if same {
        Ok(())
    } else {
        Err(mismatch("different public key"))
    }
}

fn describe_spki(spki: &spki::SubjectPublicKeyInfoOwned) -> String {
    let alg = spki.algorithm.oid;
    if alg == RSA_ENCRYPTION {
        return "an RSA key".into();
    }
    if alg == ID_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        return match curve {
            Some(c) if c == SECP256R1 => "an ECDSA P-256 key".into(),
            Some(c) if c == SECP384R1 => "an ECDSA P-384 key".into(),
            Some(c) => format!("an EC key on curve {c}"),
            None => "an EC key".into(),
        };
    }
    format!("a key of algorithm {alg}")
}

/// The first common name in a distinguished name, as text.
pub(crate) fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == COMMON_NAME)
        .map(|atv| String::from_utf8_lossy(atv.value.value()).into_owned())
}
