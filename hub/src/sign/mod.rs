//! Native kernel module signing (DESIGN decision 4): the hub signs modules itself, producing
//! exactly what the kernel's `scripts/sign-file` appends, and signs images by adding one layer
//! with the signed files. No sign pods, no key material outside the hub process.
//!
//! - [`keys`]: the signing Secret's `key` and `cert` (PEM or DER; RSA or ECDSA P-256/P-384).
//! - [`cms`]: the CMS SignedData `sign-file` emits.
//! - [`module_sig`]: appending, stripping and reading module signatures.
//! - [`image`]: pulling an image, signing the files matched by `filesToSign`, pushing it.
//! - [`cli`]: `kmm-hub sign-file`, the kernel tool's command line.

pub mod cli;
pub mod cms;
mod error;
pub mod hash;
pub mod image;
pub mod keys;
mod layers;
pub mod module_sig;

pub use cms::SignatureInfo;
pub use error::SignError;
pub use hash::HashAlgorithm;
pub use keys::{KeyAlgorithm, Signer, SigningCert};
pub use module_sig::{sign_module, signature_info, strip_signature};
