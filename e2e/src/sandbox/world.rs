//! The sandbox's machines: the node topology (two kernels, a Secure Boot node, an in-tree
//! `joydev`) and the module signing key made with openssl.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::labs;
use crate::sim::SimNode;

/// The sandbox's module signing key and certificate (made with openssl), enrolled on the
/// Secure Boot node and used for the build-and-sign lab and the prebuilt images.
#[derive(Debug, Clone)]
pub struct SigningKeys {
    pub key_pem_path: PathBuf,
    pub cert_pem_path: PathBuf,
    pub key_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub cert_der: Vec<u8>,
}

impl SigningKeys {
    /// `openssl req -x509 -sha256 -nodes -days 365 -newkey rsa:2048`, as the lab does.
    pub fn generate(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key = dir.join(format!("{name}.key"));
        let cert = dir.join(format!("{name}.crt"));
        let der = dir.join(format!("{name}.der"));
        let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<()> {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .context("running openssl")?;
            anyhow::ensure!(
                out.status.success(),
                "openssl failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let subj = format!("/CN={name}");
        run(&[
            "req".as_ref(),
            "-x509".as_ref(),
            "-sha256".as_ref(),
            "-nodes".as_ref(),
            "-days".as_ref(),
            "365".as_ref(),
            "-newkey".as_ref(),
            "rsa:2048".as_ref(),
            "-subj".as_ref(),
            subj.as_ref(),
            "-keyout".as_ref(),
            key.as_os_str(),
            "-out".as_ref(),
            cert.as_os_str(),
        ])?;
        run(&[
            "x509".as_ref(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-in".as_ref(),
            cert.as_os_str(),
            "-out".as_ref(),
            der.as_os_str(),
        ])?;
        Ok(Self {
            key_pem: std::fs::read(&key)?,
            cert_pem: std::fs::read(&cert)?,
            cert_der: std::fs::read(&der)?,
            key_pem_path: key,
            cert_pem_path: cert,
        })
    }
}

/// The sandbox's nodes, a mixed fleet. Simulated: spoke-1's workers on kernel A (el9; one
/// with Secure Boot, `cert_der` enrolled) and its control-plane node, spoke-2's workers on
/// kernels A and B. Real (Debian's kernel in a VM, see [`crate::vm`]): one worker per spoke,
/// and spoke-1's `spoke-1-worker-sb-real`, which boots through UEFI Secure Boot with
/// `cert_der` enrolled in its MOK list. `joydev` is loaded in-tree on some of them.
pub fn topology(cert_der: &[u8]) -> Vec<Vec<SimNode>> {
    let labels = |secure_boot: bool| {
        BTreeMap::from([
            (labs::WORKER_LABEL.to_string(), String::new()),
            (labs::SECURE_BOOT_LABEL.to_string(), secure_boot.to_string()),
        ])
    };
    let worker = |name: &str, kernel: &str, secure_boot: bool, in_tree: &[&str]| SimNode {
        name: name.into(),
        kernel: kernel.into(),
        labels: labels(secure_boot),
        secure_boot,
        enrolled_certs: if secure_boot {
            vec![cert_der.to_vec()]
        } else {
            vec![]
        },
        in_tree_modules: in_tree.iter().map(|s| s.to_string()).collect(),
        real_kernel: false,
        os_image: None,
    };
    let real = |name: &str, secure_boot: bool, in_tree: &[&str]| {
        let mut n = SimNode::real(name, labels(secure_boot));
        n.secure_boot = secure_boot;
        if secure_boot {
            n.enrolled_certs = vec![cert_der.to_vec()];
        }
        n.in_tree_modules = in_tree.iter().map(|s| s.to_string()).collect();
        n
    };
    let control_plane = SimNode {
        name: "spoke-1-control-plane".into(),
        kernel: labs::KERNEL_A.into(),
        labels: BTreeMap::from([
            (
                "node-role.kubernetes.io/control-plane".to_string(),
                String::new(),
            ),
            ("node-role.kubernetes.io/master".to_string(), String::new()),
        ]),
        ..Default::default()
    };
    vec![
        vec![
            worker("spoke-1-worker-1", labs::KERNEL_A, false, &["joydev"]),
            worker("spoke-1-worker-sb", labs::KERNEL_A, true, &["joydev"]),
            real("spoke-1-worker-real", false, &["joydev"]),
            real("spoke-1-worker-sb-real", true, &["joydev"]),
            control_plane,
        ],
        vec![
            worker("spoke-2-worker-1", labs::KERNEL_A, false, &["joydev"]),
            worker("spoke-2-worker-2", labs::KERNEL_B, false, &[]),
            real("spoke-2-worker-real", false, &[]),
        ],
    ]
}
