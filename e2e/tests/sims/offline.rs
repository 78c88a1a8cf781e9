//! The kmod fixtures against the real tools (`modinfo`, `sign-file`, `openssl`); no cluster.

use std::process::Command;

use anyhow::{Context as _, ensure};
use kmm_e2e::kmod;
use kmm_e2e::sim::loader;

use crate::{K1, keys};

#[test]
fn kmod_modinfo_reads_vermagic_of_fake_module() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kmm_ci_a.ko");
    std::fs::write(&path, kmod::fake_module("kmm-ci-a", K1))?;
    let out = Command::new("modinfo")
        .arg("-F")
        .arg("vermagic")
        .arg(&path)
        .output()?;
    ensure!(
        out.status.success(),
        "modinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vermagic = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        vermagic.split_whitespace().next() == Some(K1),
        "vermagic {vermagic:?}"
    );
    let out = Command::new("modinfo")
        .arg("-F")
        .arg("name")
        .arg(&path)
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "kmm_ci_a",
        "name {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn sign_file_signs_fake_module_and_openssl_verifies_with_the_right_cert_only() -> anyhow::Result<()>
{
    let k = keys()?;
    let module = kmod::fake_module("kmm_ci_a", K1);
    let signed = kmod::sign_with_sign_file(&module, &k.key_a, &k.cert_a)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kmm_ci_a.ko");
    std::fs::write(&path, &signed)?;
    let out = Command::new("modinfo").arg(&path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.lines()
            .any(|l| l.starts_with("sig_id:") && l.contains("PKCS#7")),
        "modinfo:\n{text}"
    );
    ensure!(
        text.contains("sim signing key a"),
        "signer missing:\n{text}"
    );
    let (content, sig) = kmod::split_signature(&signed).context("no signature found")?;
    ensure!(
        content == module.as_slice(),
        "content differs from the unsigned module"
    );
    ensure!(sig.id_type == kmod::PKEY_ID_PKCS7);
    loader::verify_signature(content, &sig.signature, std::slice::from_ref(&k.der_a))
        .map_err(|e| anyhow::anyhow!("right cert rejected: {e}"))?;
    ensure!(
        loader::verify_signature(content, &sig.signature, std::slice::from_ref(&k.der_b)).is_err(),
        "wrong cert accepted"
    );
    let mut tampered = content.to_vec();
    tampered[100] ^= 1;
    ensure!(
        loader::verify_signature(&tampered, &sig.signature, std::slice::from_ref(&k.der_a))
            .is_err(),
        "tampered module accepted"
    );
    Ok(())
}
