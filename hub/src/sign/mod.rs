//! Native kernel module signing (DESIGN decision 4): the hub signs modules itself, producing
//! exactly what the kernel's `scripts/sign-file` appends, and signs images by adding one layer
//! with the signed files. No sign pods, no key material outside the hub process.
//!
//! - [`keys`]: the signing Secret's `key` and `cert` (PEM or DER; RSA or ECDSA P-256/P-384).
//! - [`cms`]: the CMS SignedData `sign-file` emits.
//! - [`module_sig`]: appending, stripping and reading module signatures.
//! - [`image`]: pulling an image, signing the files matched by `filesToSign`, pushing it.
//! - [`verify`]: checking module signatures against a certificate, per module and per image.
//! - [`limits`]: size/count limits, the work directory and the CPU semaphore of image signing.
//! - [`cli`]: `kmm-hub sign-file` (the kernel tool's command line), `sign-image`, `verify-image`.

pub mod cli;
pub mod cms;
mod error;
pub mod gate;
pub mod hash;
pub mod image;
pub mod keys;
mod layers;
pub mod limits;
pub mod module_sig;
pub mod verify;

pub use cms::SignatureInfo;
pub use error::{SIGN_LIMIT_EXCEEDED, SIGNATURE_INVALID, SignError};
pub use gate::status_reason_of;
pub use hash::HashAlgorithm;
pub use keys::{KeyAlgorithm, Signer, SigningCert};
pub use limits::{SignArgs, SignLimits, SignRuntime};
pub use module_sig::{sign_module, signature_info, strip_signature};
