//! Native module signing against the kernel's `scripts/sign-file` on the same files.
//!
//! `cargo bench -p kmm-hub --bench sign [-- RUNS]` (default 31 runs per case). Prints one JSON
//! object per case: medians in microseconds and `speedup` = sign-file median / ours.
//!
//! Cases, for a small module (hello.ko) and a large one (a 4 MiB payload), RSA-2048 and
//! RSA-4096, sha256:
//! - `sign-file`: the kernel tool signing a copy in place (one process per file, as upstream's
//!   sign pod runs it);
//! - `kmm-hub sign-file`: our CLI, same arguments (one process per file);
//! - `library`: `sign_module` in process with the key loaded once (what the hub does per file);
//! - `library+load`: the same including parsing key and certificate.
//!
//! Outputs are checked to be byte-identical before timing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kmm_hub::sign::{HashAlgorithm, Signer, sign_module};

const KMM_HUB: &str = env!("CARGO_BIN_EXE_kmm-hub");

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn headers_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/src")
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

fn sign_file_tool(headers: &Path) -> Option<PathBuf> {
    let version = headers
        .file_name()?
        .to_str()?
        .strip_prefix("linux-headers-")?;
    let mut parts = version.split(['.', '-']);
    let (major, minor) = (parts.next()?, parts.next()?);
    let tool = PathBuf::from(format!(
        "/usr/lib/linux-kbuild-{major}.{minor}/scripts/sign-file"
    ));
    tool.is_file().then_some(tool)
}

/// Builds `hello.ko` and `big.ko` (a 4 MiB initialised array) under `dir`.
fn build_modules(headers: &Path, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for (name, body) in [
        ("hello", String::new()),
        (
            "big",
            "static const char payload[4 << 20] = { 1, 2, 3 };\n\
             const char *kmm_payload(void) { return payload; }\n\
             EXPORT_SYMBOL(kmm_payload);\n"
                .to_string(),
        ),
    ] {
        let src = dir.join(name);
        std::fs::create_dir_all(&src)?;
        std::fs::write(
            src.join(format!("{name}.c")),
            format!(
                "#include <linux/module.h>\n#include <linux/init.h>\nMODULE_LICENSE(\"GPL\");\n{body}\
                 static int __init m_init(void) {{ return 0; }}\nstatic void __exit m_exit(void) {{}}\n\
                 module_init(m_init);\nmodule_exit(m_exit);\n"
            ),
        )?;
        std::fs::write(src.join("Makefile"), format!("obj-m := {name}.o\n"))?;
        run(Command::new("make")
            .arg("-C")
            .arg(headers)
            .arg(format!("M={}", src.display()))
            .arg("modules"))?;
        out.push((name.to_string(), src.join(format!("{name}.ko"))));
    }
    Ok(out)
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

fn time_runs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up (page cache, lazy init)
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed());
    }
    Ok(median(samples))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a bare number sets the run count.
    let runs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(31);
    let Some(headers) = headers_dir() else {
        eprintln!("SKIPPED: no kernel headers under /usr/src");
        return Ok(());
    };
    let Some(sign_file) = sign_file_tool(&headers) else {
        bail!("no sign-file for {}", headers.display());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let modules = build_modules(&headers, dir)?;
    for bits in [2048, 4096] {
        run(Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "30"])
            .arg("-newkey")
            .arg(format!("rsa:{bits}"))
            .args(["-subj", &format!("/CN=bench rsa{bits}")])
            .arg("-keyout")
            .arg(dir.join(format!("rsa{bits}.key")))
            .arg("-out")
            .arg(dir.join(format!("rsa{bits}.pem"))))?;
    }

    println!(
        "{{\"bench\":\"sign\",\"runs\":{runs},\"hash\":\"sha256\",\"sign_file\":\"{}\"}}",
        sign_file.display()
    );
    for (name, module) in &modules {
        let unsigned = std::fs::read(module)?;
        for bits in [2048, 4096] {
            let key = dir.join(format!("rsa{bits}.key"));
            let cert = dir.join(format!("rsa{bits}.pem"));
            let kernel_out = dir.join(format!("{name}-{bits}-kernel.ko"));
            let our_out = dir.join(format!("{name}-{bits}-ours.ko"));

            let kernel = || -> Result<()> {
                std::fs::write(&kernel_out, &unsigned)?;
                run(Command::new(&sign_file)
                    .arg("sha256")
                    .arg(&key)
                    .arg(&cert)
                    .arg(&kernel_out))
            };
            let cli = || -> Result<()> {
                run(Command::new(KMM_HUB)
                    .args(["sign-file", "sha256"])
                    .arg(&key)
                    .arg(&cert)
                    .arg(module)
                    .arg(&our_out))
            };
            let (key_bytes, cert_bytes) = (std::fs::read(&key)?, std::fs::read(&cert)?);
            let signer = Signer::from_pem_or_der(&key_bytes, &cert_bytes)?;

            // Same bytes from all three before timing anything.
            kernel()?;
            cli()?;
            let expected = std::fs::read(&kernel_out)?;
            ensure!(std::fs::read(&our_out)? == expected, "CLI output differs");
            ensure!(
                sign_module(&unsigned, &signer, HashAlgorithm::Sha256)? == expected,
                "library output differs"
            );

            // The in-place copy for sign-file is written inside its timing; time that write
            // alone so it can be taken out.
            let copy_us = time_runs(runs, || Ok(std::fs::write(&kernel_out, &unsigned)?))?;
            let kernel_us = time_runs(runs, kernel)? - copy_us;
            let cli_us = time_runs(runs, cli)?;
            let lib_us = time_runs(runs, || {
                std::hint::black_box(sign_module(&unsigned, &signer, HashAlgorithm::Sha256)?);
                Ok(())
            })?;
            let lib_load_us = time_runs(runs, || {
                let s = Signer::from_pem_or_der(&key_bytes, &cert_bytes)?;
                std::hint::black_box(sign_module(&unsigned, &s, HashAlgorithm::Sha256)?);
                Ok(())
            })?;
            println!(
                "{{\"module\":\"{name}.ko\",\"bytes\":{},\"key\":\"rsa{bits}\",\
                 \"sign_file_us\":{kernel_us:.0},\"kmm_hub_cli_us\":{cli_us:.0},\
                 \"library_us\":{lib_us:.0},\"library_with_key_load_us\":{lib_load_us:.0},\
                 \"speedup_cli\":{:.2},\"speedup_library\":{:.2}}}",
                unsigned.len(),
                kernel_us / cli_us,
                kernel_us / lib_us,
            );
        }
    }
    Ok(())
}
