//! Certificates for the test world, made with rcgen: one CA per fleet, and per cluster an
//! API server serving certificate, client certificates and a service-account key pair.
//!
//! All keys are ECDSA P-256: kube-apiserver 1.20 accepts EC keys for serving, for client
//! certificates and for service-account tokens (ES256; `keyutil` parses PKCS#8 EC keys),
//! and ring (rcgen's backend here) cannot generate RSA keys.

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A service-account token signing key pair (PKCS#8 private key, SPKI public key).
#[derive(Clone, Debug)]
pub struct ServiceAccountKey {
    pub private_pem: String,
    pub public_pem: String,
}

/// The fleet's certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// The CA's private key: kube-controller-manager signs CertificateSigningRequests (the
    /// OCM agents' hub client certificates) with it.
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    pub fn new(common_name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A TLS server certificate for `sans` (IP addresses or DNS names).
    pub fn serving_cert(&self, common_name: &str, sans: &[&str]) -> anyhow::Result<CertPair> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .context("serving certificate SANs")?;
        params.distinguished_name = dn(common_name, &[]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: Kubernetes reads the user from CN and the groups from O.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> anyhow::Result<CertPair> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(user, groups);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> anyhow::Result<CertPair> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generating key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing certificate")?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A fresh service-account signing key pair.
pub fn service_account_key() -> anyhow::Result<ServiceAccountKey> {
    let key = KeyPair::generate().context("generating service-account key")?;
    Ok(ServiceAccountKey {
        private_pem: key.serialize_pem(),
        public_pem: key.public_key_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_pem_material() -> anyhow::Result<()> {
        let ca = Ca::new("test-ca")?;
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let s = ca.serving_cert("kube-apiserver", &["127.0.0.1", "localhost"])?;
        assert!(s.key_pem.contains("PRIVATE KEY"));
        let c = ca.client_cert("admin", &["system:masters"])?;
        assert!(c.cert_pem.contains("CERTIFICATE"));
        let sa = service_account_key()?;
        assert!(sa.public_pem.contains("PUBLIC KEY"));
        Ok(())
    }
}
