//! `kmm-hub sign-file` against the kernel's own `scripts/sign-file`, `modinfo` and
//! `openssl cms -verify`, on a module compiled here from source.
//!
//! Needs the kernel headers (`linux-headers-<ver>-amd64`), `linux-kbuild-<ver>` (for
//! `sign-file`), `gcc`, `make`, `openssl` and `kmod`, as `e2e/provision/provision.sh` installs
//! them. A test that needs the module or `sign-file` FAILS when they are missing (it never
//! skips); the key-handling tests need only `openssl`.

use kmm_runtime::ErrorCategory as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail, ensure};
use der::{Decode, Encode};
use kmm_hub::sign::{HashAlgorithm, SignError, Signer, module_sig};

const KMM_HUB: &str = env!("CARGO_BIN_EXE_kmm-hub");

/// A module built once per test binary, plus key pairs of every supported kind.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    module: PathBuf,
    sign_file: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// `/usr/src/linux-headers-<ver>-amd64` (the directory with the module build Makefile).
/// `KMM_FLEET_KERNEL_SRC` replaces `/usr/src` (to check that a machine without headers fails).
fn headers_dir() -> Option<PathBuf> {
    let src = std::env::var_os("KMM_FLEET_KERNEL_SRC").unwrap_or_else(|| "/usr/src".into());
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(src)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-headers-") && !n.ends_with("-common"))
                && p.join("Makefile").is_file()
        })
        .collect();
    dirs.sort();
    dirs.pop()
}

/// `/usr/lib/linux-kbuild-<major.minor>/scripts/sign-file` matching the headers.
fn sign_file_tool(headers: &Path) -> Option<PathBuf> {
    let name = headers.file_name()?.to_str()?;
    let version = name.strip_prefix("linux-headers-")?;
    let mut parts = version.split(['.', '-']);
    let (major, minor) = (parts.next()?, parts.next()?);
    let tool = PathBuf::from(format!(
        "/usr/lib/linux-kbuild-{major}.{minor}/scripts/sign-file"
    ));
    tool.is_file().then_some(tool)
}

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    run(Command::new("openssl").args(args).current_dir(dir)).map(|_| ())
}

/// Key pair `<name>.key` (PKCS#8 PEM) and `<name>.pem`, plus derived encodings.
fn make_pair(dir: &Path, name: &str, newkey: &[&str], cn: &str) -> Result<()> {
    let key = format!("{name}.key");
    let pem = format!("{name}.pem");
    let der = format!("{name}.der");
    let key_der = format!("{name}.key.der");
    let subj = format!("/CN={cn}/O=kmm-fleet tests");
    let mut args = vec!["req", "-x509", "-nodes", "-days", "3650", "-subj", &subj];
    args.extend_from_slice(newkey);
    args.extend_from_slice(&["-keyout", &key, "-out", &pem]);
    openssl(&args, dir)?;
    openssl(&["x509", "-in", &pem, "-outform", "DER", "-out", &der], dir)?;
    openssl(
        &["pkey", "-in", &key, "-outform", "DER", "-out", &key_der],
        dir,
    )?;
    // Traditional encodings: PKCS#1 for RSA, SEC1 for EC.
    let trad = format!("{name}.trad.key");
    let trad_der = format!("{name}.trad.key.der");
    if newkey.iter().any(|a| a.starts_with("rsa")) {
        openssl(&["rsa", "-in", &key, "-traditional", "-out", &trad], dir)?;
        openssl(
            &[
                "rsa",
                "-in",
                &key,
                "-traditional",
                "-outform",
                "DER",
                "-out",
                &trad_der,
            ],
            dir,
        )?;
    } else {
        openssl(&["ec", "-in", &key, "-out", &trad], dir)?;
        openssl(
            &["ec", "-in", &key, "-outform", "DER", "-out", &trad_der],
            dir,
        )?;
    }
    Ok(())
}

/// What to install when the kernel side is missing.
const INSTALL_HINT: &str = "install linux-headers-amd64 (it pulls linux-kbuild-<ver>, which has \
     scripts/sign-file), gcc and make: run e2e/provision/provision.sh";

/// The full fixture: keys plus a module compiled against the installed kernel headers and the
/// kernel's sign-file. Missing headers or sign-file are an error, not a skip.
fn build_fixture() -> Result<Fixture> {
    let headers = headers_dir().with_context(|| {
        format!("no kernel headers (linux-headers-<ver>-amd64 under /usr/src): {INSTALL_HINT}")
    })?;
    let sign_file = sign_file_tool(&headers).with_context(|| {
        format!(
            "no scripts/sign-file of linux-kbuild for {}: {INSTALL_HINT}",
            headers.display()
        )
    })?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    let src = root.join("src");
    std::fs::create_dir(&src)?;
    std::fs::write(
        src.join("hello.c"),
        "#include <linux/module.h>\n#include <linux/init.h>\nMODULE_LICENSE(\"GPL\");\n\
         MODULE_DESCRIPTION(\"kmm-fleet signing test\");\n\
         static int __init hello_init(void) { return 0; }\n\
         static void __exit hello_exit(void) {}\n\
         module_init(hello_init);\nmodule_exit(hello_exit);\n",
    )?;
    std::fs::write(src.join("Makefile"), "obj-m := hello.o\n")?;
    let module = src.join("hello.ko");
    run(Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", src.display()))
        .arg("modules"))
    .with_context(|| format!("compiling a test module ({INSTALL_HINT})"))?;
    ensure!(module.is_file(), "make produced no hello.ko");
    make_keys(&root)?;
    Ok(Fixture {
        _dir: dir,
        root,
        module,
        sign_file,
    })
}

/// The keys-only fixture: every key pair, and a stand-in module file (the key tests fail before
/// a module is read). Its `sign_file` is empty: tests using it must not run the kernel tool.
fn build_keys_fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    make_keys(&root)?;
    let module = root.join("stand-in.ko");
    std::fs::write(&module, b"\x7fELF stand-in module")?;
    Ok(Fixture {
        _dir: dir,
        root,
        module,
        sign_file: PathBuf::new(),
    })
}

/// Key pairs of every supported kind, plus unsupported ones.
fn make_keys(root: &Path) -> Result<()> {
    make_pair(
        root,
        "rsa2048",
        &["-newkey", "rsa:2048"],
        "kmm rsa2048 signer",
    )?;
    make_pair(
        root,
        "rsa4096",
        &["-newkey", "rsa:4096"],
        "kmm rsa4096 signer",
    )?;
    // Below ring's 2048-bit floor: exercises the portable RSA path.
    make_pair(
        root,
        "rsa1024",
        &["-newkey", "rsa:1024"],
        "kmm rsa1024 signer",
    )?;
    make_pair(
        root,
        "p256",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "kmm p256 signer",
    )?;
    make_pair(
        root,
        "p384",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        "kmm p384 signer",
    )?;
    openssl(
        &["genpkey", "-algorithm", "ed25519", "-out", "ed25519.key"],
        root,
    )?;
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "rsa",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-aes-128-cbc",
            "-pass",
            "pass:secret",
            "-out",
            "encrypted.key",
        ],
        root,
    )?;
    Ok(())
}

static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
static KEYS: OnceLock<Result<Fixture, String>> = OnceLock::new();

/// Keys, a module and the kernel's sign-file; an error (failing the test) when the kernel side
/// is not installed.
fn fixture() -> Result<&'static Fixture> {
    match FIXTURE.get_or_init(|| build_fixture().map_err(|e| format!("{e:#}"))) {
        Ok(f) => Ok(f),
        Err(e) => bail!("fixture: {e}"),
    }
}

/// Keys only (openssl); no kernel headers needed.
fn keys_fixture() -> Result<&'static Fixture> {
    match KEYS.get_or_init(|| build_keys_fixture().map_err(|e| format!("{e:#}"))) {
        Ok(f) => Ok(f),
        Err(e) => bail!("key fixture: {e}"),
    }
}

/// Unique scratch file names for parallel tests.
fn scratch(f: &Fixture, name: &str) -> PathBuf {
    // modinfo insists on a .ko name.
    f.path(&format!("out-{name}.ko"))
}

/// The kernel tool on a copy of `module` (in place, as upstream's sign pod runs it).
fn kernel_sign(
    f: &Fixture,
    hash: &str,
    key: &str,
    cert: &str,
    module: &Path,
    out: &str,
) -> Result<Vec<u8>> {
    let target = scratch(f, out);
    std::fs::copy(module, &target)?;
    run(Command::new(&f.sign_file)
        .args([hash])
        .arg(f.path(key))
        .arg(f.path(cert))
        .arg(&target))?;
    Ok(std::fs::read(&target)?)
}

/// `kmm-hub sign-file <hash> <key> <cert> <module> <dest>`.
fn our_sign(
    f: &Fixture,
    hash: &str,
    key: &str,
    cert: &str,
    module: &Path,
    out: &str,
) -> Result<Vec<u8>> {
    let dest = scratch(f, out);
    run(Command::new(KMM_HUB)
        .args(["sign-file", hash])
        .arg(f.path(key))
        .arg(f.path(cert))
        .arg(module)
        .arg(&dest))?;
    Ok(std::fs::read(&dest)?)
}

/// The CMS DER of a signed module.
fn appended_cms(signed: &[u8]) -> Result<Vec<u8>> {
    let unsigned = module_sig::strip_signature(signed)?;
    let tail = &signed[unsigned.len()..];
    let cms_len = tail.len() - 12 - module_sig::MAGIC.len();
    Ok(tail[..cms_len].to_vec())
}

#[test]
fn rsa_signatures_are_byte_identical_to_sign_file() -> Result<()> {
    let f = fixture()?;
    let mut compared = 0;
    for hash in ["sha256", "sha384", "sha512"] {
        for cert in ["rsa2048.pem", "rsa2048.der"] {
            let tag = format!("rsa2048-{hash}-{cert}");
            let expected = kernel_sign(
                f,
                hash,
                "rsa2048.key",
                cert,
                &f.module,
                &format!("{tag}-kernel"),
            )?;
            // sign-file reads PEM keys only; we also take PKCS#1 and DER encodings of the same key.
            for key in [
                "rsa2048.key",
                "rsa2048.key.der",
                "rsa2048.trad.key",
                "rsa2048.trad.key.der",
            ] {
                let ours = our_sign(f, hash, key, cert, &f.module, &format!("{tag}-{key}-ours"))?;
                assert!(
                    ours == expected,
                    "{hash} {key} {cert}: output differs from sign-file ({} vs {} bytes)",
                    ours.len(),
                    expected.len()
                );
                compared += 1;
            }
        }
    }
    for hash in ["sha256", "sha512"] {
        let expected = kernel_sign(
            f,
            hash,
            "rsa4096.key",
            "rsa4096.der",
            &f.module,
            &format!("rsa4096-{hash}-kernel"),
        )?;
        let ours = our_sign(
            f,
            hash,
            "rsa4096.trad.key",
            "rsa4096.der",
            &f.module,
            &format!("rsa4096-{hash}-ours"),
        )?;
        assert!(
            ours == expected,
            "rsa4096 {hash}: output differs from sign-file"
        );
        compared += 1;
    }
    for hash in ["sha256", "sha384"] {
        let expected = kernel_sign(
            f,
            hash,
            "rsa1024.key",
            "rsa1024.pem",
            &f.module,
            &format!("rsa1024-{hash}-kernel"),
        )?;
        let ours = our_sign(
            f,
            hash,
            "rsa1024.trad.key.der",
            "rsa1024.pem",
            &f.module,
            &format!("rsa1024-{hash}-ours"),
        )?;
        assert!(
            ours == expected,
            "rsa1024 {hash}: output differs from sign-file"
        );
        compared += 1;
    }
    assert_eq!(compared, 28);
    Ok(())
}

#[test]
fn detached_and_in_place_modes_match_sign_file() -> Result<()> {
    let f = fixture()?;
    // -d: only <module>.p7s is written, the module stays as it was.
    let kernel_mod = scratch(f, "detached-kernel");
    let our_mod = scratch(f, "detached-ours");
    std::fs::copy(&f.module, &kernel_mod)?;
    std::fs::copy(&f.module, &our_mod)?;
    run(Command::new(&f.sign_file)
        .args(["-d", "sha256"])
        .arg(f.path("rsa2048.key"))
        .arg(f.path("rsa2048.pem"))
        .arg(&kernel_mod))?;
    run(Command::new(KMM_HUB)
        .args(["sign-file", "-d", "sha256"])
        .arg(f.path("rsa2048.key"))
        .arg(f.path("rsa2048.pem"))
        .arg(&our_mod))?;
    let p7s = |m: &Path| std::fs::read(format!("{}.p7s", m.display()));
    assert_eq!(p7s(&our_mod)?, p7s(&kernel_mod)?, "-d signatures differ");
    assert_eq!(
        std::fs::read(&our_mod)?,
        std::fs::read(&f.module)?,
        "-d modified the module"
    );

    // No destination: the module is signed in place.
    run(Command::new(KMM_HUB)
        .args(["sign-file", "sha256"])
        .arg(f.path("rsa2048.key"))
        .arg(f.path("rsa2048.pem"))
        .arg(&our_mod))?;
    run(Command::new(&f.sign_file)
        .args(["sha256"])
        .arg(f.path("rsa2048.key"))
        .arg(f.path("rsa2048.pem"))
        .arg(&kernel_mod))?;
    assert_eq!(std::fs::read(&our_mod)?, std::fs::read(&kernel_mod)?);
    assert!(!f.path("out-detached-ours.ko.~signed~").exists());
    Ok(())
}

/// The CMS with the signature value blanked, re-encoded: what must match for ECDSA.
fn cms_without_signature(der: &[u8]) -> Result<Vec<u8>> {
    let mut ci = cms::content_info::ContentInfo::from_der(der)?;
    let mut sd: cms::signed_data::SignedData = ci.content.decode_as()?;
    let mut infos: Vec<_> = sd.signer_infos.0.into_vec();
    ensure!(infos.len() == 1, "expected one signer, got {}", infos.len());
    infos[0].signature = der::asn1::OctetString::new(Vec::new())?;
    sd.signer_infos = cms::signed_data::SignerInfos(der::asn1::SetOfVec::try_from(infos)?);
    ci.content = der::Any::encode_from(&sd)?;
    Ok(ci.to_der()?)
}

#[test]
fn ecdsa_signatures_match_in_structure_and_verify_with_openssl() -> Result<()> {
    let f = fixture()?;
    for (curve, hashes) in [
        ("p256", ["sha256", "sha384"]),
        ("p384", ["sha384", "sha512"]),
    ] {
        for hash in hashes {
            for key in [format!("{curve}.key"), format!("{curve}.trad.key.der")] {
                let cert = format!("{curve}.pem");
                let tag = format!("{curve}-{hash}-{key}");
                let expected = kernel_sign(
                    f,
                    hash,
                    &format!("{curve}.key"),
                    &cert,
                    &f.module,
                    &format!("{tag}-kernel"),
                )?;
                let ours = our_sign(f, hash, &key, &cert, &f.module, &format!("{tag}-ours"))?;
                let (exp_cms, our_cms) = (appended_cms(&expected)?, appended_cms(&ours)?);
                assert_eq!(
                    cms_without_signature(&our_cms)?,
                    cms_without_signature(&exp_cms)?,
                    "{tag}: CMS structure differs"
                );
                // The unsigned part and the trailer layout are the same.
                assert_eq!(
                    module_sig::strip_signature(&ours)?,
                    std::fs::read(&f.module)?
                );
                assert_eq!(&ours[ours.len() - 28..], module_sig::MAGIC);
                assert_eq!(
                    ours[ours.len() - 40..ours.len() - 32],
                    [0, 0, 2, 0, 0, 0, 0, 0]
                );

                let sig = scratch(f, &format!("{tag}.p7s"));
                std::fs::write(&sig, &our_cms)?;
                let verify = |content: &Path| {
                    Command::new("openssl")
                        .args([
                            "cms",
                            "-verify",
                            "-binary",
                            "-inform",
                            "DER",
                            "-noverify",
                            "-in",
                        ])
                        .arg(&sig)
                        .arg("-content")
                        .arg(content)
                        .arg("-certfile")
                        .arg(f.path(&cert))
                        .args(["-out", "/dev/null"])
                        .output()
                };
                let good = verify(&f.module)?;
                assert!(
                    good.status.success(),
                    "{tag}: openssl cms -verify failed: {}",
                    String::from_utf8_lossy(&good.stderr)
                );
                // And it can fail: a different content does not verify.
                let other = scratch(f, &format!("{tag}-other"));
                let mut tampered = std::fs::read(&f.module)?;
                tampered[100] ^= 1;
                std::fs::write(&other, tampered)?;
                assert!(
                    !verify(&other)?.status.success(),
                    "{tag}: tampered module verified"
                );
            }
        }
    }
    Ok(())
}

fn modinfo_field(module: &Path, field: &str) -> Result<String> {
    let out = run(Command::new("modinfo").args(["-F", field]).arg(module))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn modinfo_shows_our_signer_and_hash() -> Result<()> {
    let f = fixture()?;
    for (key, cert, cn, hash) in [
        ("rsa2048.key", "rsa2048.pem", "kmm rsa2048 signer", "sha256"),
        ("rsa4096.key", "rsa4096.pem", "kmm rsa4096 signer", "sha512"),
        ("p384.key", "p384.der", "kmm p384 signer", "sha384"),
    ] {
        our_sign(f, hash, key, cert, &f.module, &format!("modinfo-{key}"))?;
        let signed = scratch(f, &format!("modinfo-{key}"));
        assert_eq!(modinfo_field(&signed, "signer")?, cn);
        assert_eq!(modinfo_field(&signed, "sig_hashalgo")?, hash);
        assert_eq!(modinfo_field(&signed, "sig_id")?, "PKCS#7");

        // Our own reading of the signature agrees with the certificate.
        let info =
            kmm_hub::sign::signature_info(&std::fs::read(&signed)?)?.context("no signature")?;
        let serial = run(Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(f.path(cert))
            .args([
                "-inform",
                if cert.ends_with(".der") { "DER" } else { "PEM" },
            ]))?;
        let serial = String::from_utf8_lossy(&serial.stdout);
        assert_eq!(info.signer.as_deref(), Some(cn));
        assert_eq!(
            Some(info.serial_hex.as_str()),
            serial.trim().strip_prefix("serial=")
        );
        assert_eq!(info.hash.name(), hash);
        assert_eq!(
            modinfo_field(&signed, "sig_key")?.replace(':', ""),
            info.serial_hex
        );
    }
    Ok(())
}

#[test]
fn resigning_equals_signing_the_unsigned_module() -> Result<()> {
    let f = fixture()?;
    let fresh = our_sign(
        f,
        "sha256",
        "rsa2048.key",
        "rsa2048.pem",
        &f.module,
        "resign-fresh",
    )?;
    // Signed by another key and hash first, then re-signed.
    our_sign(
        f,
        "sha512",
        "rsa4096.key",
        "rsa4096.pem",
        &f.module,
        "resign-first",
    )?;
    let again = our_sign(
        f,
        "sha256",
        "rsa2048.key",
        "rsa2048.pem",
        &scratch(f, "resign-first"),
        "resign-again",
    )?;
    assert!(
        again == fresh,
        "re-signing differs from signing the unsigned module"
    );
    // Even a module the kernel tool signed twice (it appends) comes back to one signature.
    let kernel_once = kernel_sign(f, "sha256", "p256.key", "p256.pem", &f.module, "resign-k1")?;
    let kernel_twice = kernel_sign(
        f,
        "sha256",
        "p256.key",
        "p256.pem",
        &scratch(f, "resign-k1"),
        "resign-k2",
    )?;
    assert!(kernel_twice.len() > kernel_once.len());
    let from_twice = our_sign(
        f,
        "sha256",
        "rsa2048.key",
        "rsa2048.pem",
        &scratch(f, "resign-k2"),
        "resign-from-twice",
    )?;
    assert!(from_twice == fresh);
    Ok(())
}

/// Base64 lines of the PEM body: none of them may show up in any message.
fn key_fragments(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(|l| l[..16].to_string())
        .collect()
}

fn assert_no_key_material(text: &str, key_pem: &str) {
    for fragment in key_fragments(key_pem) {
        assert!(!text.contains(&fragment), "key material in: {text}");
    }
}

#[test]
fn mismatched_key_and_certificate_fail_clearly() -> Result<()> {
    let f = keys_fixture()?;
    let out = Command::new(KMM_HUB)
        .args(["sign-file", "sha256"])
        .arg(f.path("rsa2048.key"))
        .arg(f.path("rsa4096.pem"))
        .arg(&f.module)
        .arg(scratch(f, "mismatch"))
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not match the certificate"),
        "{stderr}"
    );
    assert!(stderr.contains("kmm rsa4096 signer"), "{stderr}");
    assert!(!scratch(f, "mismatch").exists());
    let key_pem = std::fs::read_to_string(f.path("rsa2048.key"))?;
    assert_no_key_material(&stderr, &key_pem);

    // Library: algorithm and curve mismatches too, with the "key" category.
    for (key, cert, needle) in [
        ("rsa2048.key", "rsa4096.pem", "different public key"),
        ("p256.key", "rsa2048.pem", "RSA"),
        ("p256.key", "p384.pem", "P-384"),
        ("rsa2048.key", "p256.der", "P-256"),
    ] {
        let key_bytes = std::fs::read(f.path(key))?;
        let err = Signer::from_pem_or_der(&key_bytes, &std::fs::read(f.path(cert))?)
            .err()
            .with_context(|| format!("{key} with {cert} was accepted"))?;
        assert!(matches!(err, SignError::KeyCertMismatch(_)), "{err:?}");
        assert_eq!(err.category(), "key");
        let display = err.to_string();
        assert!(display.contains(needle), "{display}");
        let key_text = String::from_utf8_lossy(&key_bytes);
        assert_no_key_material(&display, &key_text);
        assert_no_key_material(&format!("{err:?}"), &key_text);
    }
    Ok(())
}

#[test]
fn keys_never_appear_in_debug_or_errors() -> Result<()> {
    let f = keys_fixture()?;
    for name in ["rsa2048", "p256"] {
        let key_pem = std::fs::read_to_string(f.path(&format!("{name}.key")))?;
        let signer = Signer::from_pem_or_der(
            key_pem.as_bytes(),
            &std::fs::read(f.path(&format!("{name}.pem")))?,
        )?;
        let debug = format!("{signer:?} {signer:#?}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert_no_key_material(&debug, &key_pem);
        // The private scalar/exponent in hex must not show up either.
        let text = run(Command::new("openssl")
            .args(["pkey", "-noout", "-text", "-in"])
            .arg(f.path(&format!("{name}.key"))))?;
        let text = String::from_utf8_lossy(&text.stdout);
        let secret_hex: String = text
            .lines()
            .skip_while(|l| !(l.starts_with("privateExponent") || l.starts_with("priv:")))
            .skip(1)
            .take(2)
            .map(|l| l.trim().replace(':', ""))
            .collect();
        assert!(
            secret_hex.len() >= 16,
            "could not read the secret from openssl: {text}"
        );
        assert!(
            !debug
                .to_lowercase()
                .contains(&secret_hex[..16].to_lowercase())
        );
    }

    // Corrupted and unsupported keys: errors say what is wrong, not what the key is.
    let good = std::fs::read_to_string(f.path("rsa2048.key"))?;
    let cert = std::fs::read(f.path("rsa2048.pem"))?;
    let corrupted = good.replacen("MII", "MIX", 1);
    let truncated: String = good.lines().take(5).collect::<Vec<_>>().join("\n");
    let der = std::fs::read(f.path("rsa2048.key.der"))?;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupted", corrupted.clone().into_bytes(), "key"),
        ("truncated", truncated.clone().into_bytes(), "key"),
        ("garbage DER", der[..der.len() / 2].to_vec(), "key"),
        (
            "ed25519",
            std::fs::read(f.path("ed25519.key"))?,
            "unsupported key algorithm",
        ),
        (
            "encrypted",
            std::fs::read(f.path("encrypted.key"))?,
            "encrypted",
        ),
        ("a certificate", cert.clone(), "key"),
    ];
    for (what, key, needle) in cases {
        let err = Signer::from_pem_or_der(&key, &cert)
            .err()
            .with_context(|| format!("{what} key was accepted"))?;
        assert_eq!(err.category(), "key", "{what}: {err}");
        let text = format!("{err} {err:?}");
        assert!(text.contains(needle), "{what}: {text}");
        assert_no_key_material(&text, &good);
    }
    let err = Signer::from_pem_or_der(good.as_bytes(), b"not a certificate").err();
    assert_eq!(err.map(|e| e.category()), Some("certificate"));
    Ok(())
}

#[test]
fn library_and_cli_agree() -> Result<()> {
    let f = fixture()?;
    let signer = Signer::from_pem_or_der(
        &std::fs::read(f.path("rsa2048.trad.key"))?,
        &std::fs::read(f.path("rsa2048.der"))?,
    )?;
    let module = std::fs::read(&f.module)?;
    let lib = kmm_hub::sign::sign_module(&module, &signer, HashAlgorithm::Sha384)?;
    let cli = our_sign(
        f,
        "sha384",
        "rsa2048.key",
        "rsa2048.pem",
        &f.module,
        "lib-vs-cli",
    )?;
    assert!(lib == cli);
    assert_eq!(module_sig::strip_signature(&lib)?, module.as_slice());
    let cms = appended_cms(&lib)?;
    assert_eq!(
        kmm_hub::sign::cms::parse_signature(&cms)?.signature_algorithm,
        "rsaEncryption"
    );
    Ok(())
}

/// The hub's verifier (what gates shipping a signed image) accepts what the kernel's sign-file
/// writes, for RSA and ECDSA, and rejects a module signed by another certificate or altered.
#[test]
fn kernel_sign_file_output_passes_our_verifier() -> Result<()> {
    let f = fixture()?;
    let cert = |name: &str| -> Result<kmm_hub::sign::SigningCert> {
        Ok(kmm_hub::sign::SigningCert::from_pem_or_der(
            &std::fs::read(f.path(name))?,
        )?)
    };
    for (key, pem, hash) in [
        ("rsa2048.key", "rsa2048.pem", "sha256"),
        ("rsa4096.key", "rsa4096.pem", "sha512"),
        ("p256.key", "p256.pem", "sha256"),
        ("p384.key", "p384.pem", "sha384"),
    ] {
        let signed = kernel_sign(f, hash, key, pem, &f.module, &format!("verify-{key}"))?;
        kmm_hub::sign::verify::verify_module(&signed, &cert(pem)?)
            .map_err(|e| anyhow::anyhow!("{key} {hash}: {e}"))?;
        let other = if pem.starts_with("rsa2048") {
            "rsa4096.pem"
        } else {
            "rsa2048.pem"
        };
        assert!(
            kmm_hub::sign::verify::verify_module(&signed, &cert(other)?).is_err(),
            "{key}: verified against {other}"
        );
        let mut altered = signed.clone();
        altered[200] ^= 1;
        assert!(
            kmm_hub::sign::verify::verify_module(&altered, &cert(pem)?).is_err(),
            "{key}: an altered module verified"
        );
    }
    Ok(())
}
