//! Signing: bounded memory on large images, and signatures verified before shipping.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use kmm_e2e::fleet::Fleet;
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{HubOptions, HubProcess, eventually};
use serde_json::json;
use sha2::Digest as _;

use crate::HUB_NS;
use crate::builds::{openssl_keypair, put_secret, shipped};
use crate::setup::{apply_mcm, condition, mcm, mcm_status, prepare, works};

/// Incompressible bytes (xorshift64*), fast to make.
fn filler(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs `kmm-hub <args>` under `/usr/bin/time` and returns its stdout and peak RSS in bytes
/// (the child's `ru_maxrss`).
fn run_measured(hub: &std::path::Path, args: &[String]) -> anyhow::Result<(String, u64)> {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "KMM_PEAK_RSS_KB=%M"])
        .arg(hub)
        .args(args)
        .output()
        .context("running /usr/bin/time (Debian package `time`)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "kmm-hub {args:?} failed: {stderr}");
    let kb: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("KMM_PEAK_RSS_KB="))
        .context("no peak RSS from /usr/bin/time")?
        .trim()
        .parse()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        kb * 1024,
    ))
}

/// Signing an image far larger than the hub's memory keeps the hub's memory flat: the layers
/// go to disk and back, and only the modules are held. A 320 MiB incompressible layer plus a
/// module layer, on one real registry, signed into a second one (so the big layer is pulled
/// AND pushed), by `kmm-hub sign-image` in a child process whose peak RSS is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_an_image_larger_than_memory_keeps_peak_rss_bounded() -> anyhow::Result<()> {
    const FILLER: usize = 320 << 20;
    let binaries = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    let dir = tempfile::tempdir()?;
    let (hub_bin, _) =
        kmm_e2e::sandbox::agents::locate_binaries(None, None, &dir.path().join("build.log"))
            .await?;
    let mut src_reg =
        kmm_e2e::registry::Registry::run(&binaries, &dir.path().join("src"), false).await?;
    let mut dst_reg =
        kmm_e2e::registry::Registry::run(&binaries, &dir.path().join("dst"), false).await?;
    let kernel = "6.1.0-13-amd64";
    let source = format!("{}/kmm/big:1", src_reg.host());
    let dest = format!("{}/kmm/big-signed:1", dst_reg.host());

    let big = {
        let mut files = BTreeMap::new();
        files.insert("/opt/filler.bin".to_string(), filler(FILLER));
        kmm_e2e::oci::tar_files(&files)?
    };
    let module = kmm_e2e::kmod::fake_module("kmm_ci_a", kernel);
    let ko = format!("/opt/lib/modules/{kernel}/kmm_ci_a.ko");
    let mods = kmm_e2e::oci::tar_files(&BTreeMap::from([(ko.clone(), module.clone())]))?;
    let image_bytes = (big.len() + mods.len()) as u64;
    kmm_e2e::oci::push_image(
        &src_reg.access(),
        &source,
        &[big, mods],
        &Default::default(),
        &BTreeMap::new(),
    )
    .await?;

    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys)?;
    let (_, _, der) = openssl_keypair(&keys, "big-signer")?;
    let work = dir.path().join("work");
    // KMM_FLEET_SIGN_IMAGE_BIN measures another implementation taking the same arguments
    // (how the figure for the in-memory signer before streaming was taken).
    let (program, subcommand) = match std::env::var_os("KMM_FLEET_SIGN_IMAGE_BIN") {
        Some(p) => (std::path::PathBuf::from(p), vec![]),
        None => (hub_bin.clone(), vec!["sign-image".to_string()]),
    };
    let (digest, peak) = run_measured(
        &program,
        &[
            subcommand,
            vec![
                format!("--source={source}"),
                format!("--dest={dest}"),
                "--file=/opt/lib/modules/*/*.ko".into(),
                format!("--key={}", keys.join("big-signer.key").display()),
                format!("--cert={}", keys.join("big-signer.crt").display()),
                format!("--work-dir={}", work.display()),
            ],
        ]
        .concat(),
    )?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "FIGURES sign-image: image {:.0} MiB (uncompressed layers), peak RSS {:.1} MiB",
        mib(image_bytes),
        mib(peak)
    );
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(
        peak < image_bytes / 4 && peak < 128 << 20,
        "peak RSS {:.1} MiB for a {:.0} MiB image",
        mib(peak),
        mib(image_bytes)
    );
    // Nothing is left in the work directory.
    assert_eq!(
        std::fs::read_dir(&work)?.count(),
        0,
        "work directory not cleaned"
    );

    // The hub's verifier accepts the result, within the same bound.
    let (verified, vpeak) = run_measured(
        &hub_bin,
        &[
            "verify-image".into(),
            format!("--image={dest}"),
            "--file=/opt/lib/modules/*/*.ko".into(),
            format!("--cert={}", keys.join("big-signer.crt").display()),
            format!("--work-dir={}", work.display()),
        ],
    )?;
    eprintln!("FIGURES verify-image: peak RSS {:.1} MiB", mib(vpeak));
    assert_eq!(verified, digest);
    assert!(
        vpeak < image_bytes / 4 && vpeak < 128 << 20,
        "verify peak {:.1} MiB",
        mib(vpeak)
    );

    // The pushed image is whole: the filler arrived intact and the module verifies with openssl.
    let pulled = kmm_e2e::oci::pull_files(&dst_reg.access(), &dest).await?;
    assert_eq!(pulled.digest, digest);
    assert_eq!(pulled.files["/opt/filler.bin"].len(), FILLER);
    assert!(pulled.files["/opt/filler.bin"] == filler(FILLER));
    let (body, sig) =
        kmm_e2e::kmod::split_signature(&pulled.files[&ko]).context("the module is signed")?;
    assert_eq!(body, module.as_slice());
    kmm_e2e::sim::loader::verify_signature(body, &sig.signature, &[der])
        .map_err(anyhow::Error::msg)?;

    // A limit below the layer size is a clear error naming the flag.
    let out = std::process::Command::new(&hub_bin)
        .args([
            "sign-image",
            &format!("--source={source}"),
            &format!("--dest={dest}"),
        ])
        .args([
            "--file=/opt/lib/modules/*/*.ko",
            "--sign-max-layer-bytes=64Mi",
        ])
        .arg(format!("--key={}", keys.join("big-signer.key").display()))
        .arg(format!("--cert={}", keys.join("big-signer.crt").display()))
        .arg(format!("--work-dir={}", work.display()))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--sign-max-layer-bytes") && stderr.contains("64 MiB"),
        "{stderr}"
    );
    src_reg.stop().await;
    dst_reg.stop().await;
    Ok(())
}

/// "Signed" is not taken from the annotation: an image that claims the MCM's certificate but
/// whose module is unsigned (someone with push rights overwrote `containerImage`) is not
/// shipped, nor re-signed by the hub (Degraded, reason SignatureInvalid); once the tag
/// holds modules really signed with that certificate (by the kernel's sign-file, not by the
/// hub), the hub verifies and ships that digest. An image over a signing limit is reported
/// with the limit (reason SignLimitExceeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_annotation_without_valid_signatures_is_not_shipped() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(1)
        .run(async |fleet: &mut Fleet| {
            let kernel = "6.1.0-13-amd64";
            prepare(fleet, &[&[kernel]]).await?;
            let hub = fleet.hub().client().await;
            let keys = tempfile::tempdir()?;
            let (key, cert, der) = openssl_keypair(keys.path(), "kmm-verify")?;
            put_secret(&hub, "vkey", "key", &key).await?;
            put_secret(&hub, "vcert", "cert", &cert).await?;
            let claim = BTreeMap::from([(
                shared_api::labels::SIGNED_BY_ANNOTATION.to_string(),
                hex::encode(sha2::Sha256::digest(&der)),
            )]);
            let host = fleet.registry().host();
            let reference = format!("{host}/kmm/forged:{kernel}");
            let mut forged = KmodImage::new(&[kernel], &["kmm_ci_a"]);
            forged.annotations = claim.clone();
            let forged_digest =
                push_kmod_image(&fleet.registry().access(), &reference, &forged).await?;

            let mut o = HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS);
            o.resync = Duration::from_secs(4);
            // Small enough for the image of the second MCM below, large for the others.
            o.sign.sign_max_entries = 40;
            let _hub_proc = HubProcess::start(o)?;
            let mut m = mcm(fleet, "forged", json!({}))?;
            let mapping = json!([{"regexp": "^.*$",
                "containerImage": format!("{host}/kmm/forged:${{KERNEL_FULL_VERSION}}"),
                "sign": {"keySecret": {"name": "vkey"}, "certSecret": {"name": "vcert"},
                    "unsignedImage": format!("{host}/kmm/unsigned:${{KERNEL_FULL_VERSION}}"),
                    "filesToSign": ["/opt/lib/modules/*/kmm_ci_a.ko"]}}]);
            let mut value = serde_json::to_value(&m)?;
            value["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"] = mapping;
            m = serde_json::from_value(value)?;
            apply_mcm(&hub, &m).await?;

            let (_, _, message) = eventually(
                "Degraded with reason SignatureInvalid",
                Duration::from_secs(90),
                || async {
                    let s = mcm_status(&hub, "forged").await?;
                    Ok(match condition(&s, "Degraded") {
                        Some((st, reason, msg)) if st == "True" && reason == "SignatureInvalid" => {
                            Ok((st, reason, msg))
                        }
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            assert!(
                message.contains("kmm_ci_a.ko") && message.contains("not signed"),
                "{message}"
            );
            assert!(message.contains(&forged_digest), "{message}");
            assert!(
                works(&hub, "forged").await?.is_empty(),
                "a forged image was shipped"
            );

            // Modules really signed with the certificate (by the kernel's sign-file) ship.
            let pem_key = keys.path().join("kmm-verify.key");
            let pem_cert = keys.path().join("kmm-verify.crt");
            let mut good = KmodImage::new(&[kernel], &["kmm_ci_a"]);
            good.annotations = claim;
            good.sign = Some(kmm_e2e::oci::SignWith {
                key: pem_key,
                cert: pem_cert,
            });
            let good_digest =
                push_kmod_image(&fleet.registry().access(), &reference, &good).await?;
            eventually(
                "the verified digest is shipped",
                Duration::from_secs(90),
                || async {
                    let s = shipped(&hub, "forged").await?;
                    Ok(if s.values().flatten().any(|i| i.ends_with(&good_digest)) {
                        Ok(())
                    } else {
                        Err(format!("{s:?}"))
                    })
                },
            )
            .await?;
            let s = mcm_status(&hub, "forged").await?;
            assert_eq!(
                condition(&s, "Degraded").map(|c| c.0),
                Some("False".to_string())
            );

            // An image over a signing limit: the MCM says which limit, and nothing ships.
            let mut big = KmodImage::new(&[kernel], &["kmm_ci_a"]);
            big.firmware = (0..60)
                .map(|i| (format!("/firmware/f{i}.bin"), vec![i as u8; 16]))
                .collect();
            push_kmod_image(
                &fleet.registry().access(),
                &format!("{host}/kmm/many-src:{kernel}"),
                &big,
            )
            .await?;
            let mut value = serde_json::to_value(mcm(fleet, "many", json!({}))?)?;
            value["spec"]["moduleSpec"]["moduleLoader"]["container"]["kernelMappings"] = json!([{
                "regexp": "^.*$",
                "containerImage": format!("{host}/kmm/many:${{KERNEL_FULL_VERSION}}"),
                "sign": {"keySecret": {"name": "vkey"}, "certSecret": {"name": "vcert"},
                    "unsignedImage": format!("{host}/kmm/many-src:${{KERNEL_FULL_VERSION}}"),
                    "filesToSign": ["/opt/lib/modules/*/kmm_ci_a.ko"]}}]);
            apply_mcm(&hub, &serde_json::from_value(value)?).await?;
            let (_, _, message) = eventually(
                "Degraded with reason SignLimitExceeded",
                Duration::from_secs(90),
                || async {
                    let s = mcm_status(&hub, "many").await?;
                    Ok(match condition(&s, "Degraded") {
                        Some((st, reason, msg))
                            if st == "True" && reason == "SignLimitExceeded" =>
                        {
                            Ok((st, reason, msg))
                        }
                        other => Err(format!("{other:?}")),
                    })
                },
            )
            .await?;
            assert!(
                message.contains("--sign-max-entries = 40") && message.contains("many-src"),
                "{message}"
            );
            assert!(works(&hub, "many").await?.is_empty());
            Ok(())
        })
        .await
}
