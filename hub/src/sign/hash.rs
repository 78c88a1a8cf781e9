//! The digest algorithms a module signature may use.

use std::fmt;
use std::str::FromStr;

use der::asn1::ObjectIdentifier;
use sha2::{Digest, Sha256, Sha384, Sha512};

use super::SignError;

/// id-sha256, id-sha384, id-sha512 (NIST, RFC 5754).
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");

/// Digest used for the module signature. `sha256` is what upstream KMM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HashAlgorithm {
    #[default]
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlgorithm {
    /// The name `sign-file` and `modinfo` use.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha384 => "sha384",
            HashAlgorithm::Sha512 => "sha512",
        }
    }

    pub(crate) fn oid(self) -> ObjectIdentifier {
        match self {
            HashAlgorithm::Sha256 => ID_SHA256,
            HashAlgorithm::Sha384 => ID_SHA384,
            HashAlgorithm::Sha512 => ID_SHA512,
        }
    }

    pub(crate) fn from_oid(oid: &ObjectIdentifier) -> Option<Self> {
        [
            HashAlgorithm::Sha256,
            HashAlgorithm::Sha384,
            HashAlgorithm::Sha512,
        ]
        .into_iter()
        .find(|h| h.oid() == *oid)
    }

    /// Digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlgorithm::Sha256 => Sha256::digest(data).to_vec(),
            HashAlgorithm::Sha384 => Sha384::digest(data).to_vec(),
            HashAlgorithm::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgorithm {
    type Err = SignError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sha256" => Ok(HashAlgorithm::Sha256),
            "sha384" => Ok(HashAlgorithm::Sha384),
            "sha512" => Ok(HashAlgorithm::Sha512),
            _ => Err(SignError::Hash(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmm_runtime::ErrorCategory as _;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!(
            "sha256".parse::<HashAlgorithm>().ok(),
            Some(HashAlgorithm::Sha256)
        );
        assert_eq!(
            "SHA512".parse::<HashAlgorithm>().ok(),
            Some(HashAlgorithm::Sha512)
        );
        let err = "md5".parse::<HashAlgorithm>().err();
        assert_eq!(err.map(|e| e.category()), Some("hash"));
    }

    #[test]
    fn oid_round_trips_and_digest_lengths() {
        for h in [
            HashAlgorithm::Sha256,
            HashAlgorithm::Sha384,
            HashAlgorithm::Sha512,
        ] {
            assert_eq!(HashAlgorithm::from_oid(&h.oid()), Some(h));
        }
        assert_eq!(HashAlgorithm::Sha256.digest(b"").len(), 32);
        assert_eq!(HashAlgorithm::Sha384.digest(b"").len(), 48);
        assert_eq!(HashAlgorithm::Sha512.digest(b"").len(), 64);
    }
}
