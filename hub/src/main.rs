use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kmm-fleet hub: ManagedClusterModule -> builds, signing, digest-pinned ManifestWorks.
#[derive(Parser, Debug)]
#[command(name = "kmm-hub", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crd {
        /// Write `<group>_<plural>.yaml` files here instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also write the generated CRD reference page to this file.
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// Validate Module and ManagedClusterModule YAML files (multi-document allowed).
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Sign a kernel module like the kernel's scripts/sign-file (replaces an existing signature).
    SignFile(kmm_hub::sign::cli::SignFileArgs),
    /// Sign the modules of an image and push it, as the hub does for a `sign` section.
    SignImage(Box<kmm_hub::sign::cli::SignImageArgs>),
    /// Check that an image's modules carry valid signatures by a certificate.
    VerifyImage(Box<kmm_hub::sign::cli::VerifyImageArgs>),
    /// Run the hub controller (MCM reconciler, webhook, admin port).
    Run(Box<kmm_hub::run::RunArgs>),
    /// Print, as YAML, the ManifestWorks the controller would write (no cluster needed).
    Render(kmm_hub::render_cmd::RenderArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kmm-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime `kmm-hub run` uses: two async workers (blocking work has its own threads).
fn hub_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd { dir, reference } => {
            if let Some(path) = reference {
                std::fs::write(&path, shared_api::reference::crd_reference_markdown())?;
                println!("wrote {}", path.display());
            }
            let files = shared_api::crd_files();
            match dir {
                Some(dir) => {
                    for (rel, yaml) in files {
                        let path = dir.join(rel);
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent)?;
                        }
                        std::fs::write(&path, yaml)?;
                        println!("wrote {}", path.display());
                    }
                }
                None => {
                    for (_, yaml) in files {
                        print!("---\n{yaml}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            shared_api::runtime::telemetry::init_tracing(
                args.log_format.parse().map_err(anyhow::Error::msg)?,
                &args.log_filter,
            )?;
            hub_runtime()?.block_on(async move {
                let token = shared_api::runtime::shutdown::install();
                kmm_hub::run::run(*args, token).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Render(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let ok = rt.block_on(kmm_hub::render_cmd::run(args, &mut std::io::stdout()))?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::SignFile(args) => {
            args.run()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SignImage(args) => {
            shared_api::runtime::telemetry::init_tracing(
                "text".parse().map_err(anyhow::Error::msg)?,
                "warn",
            )?;
            let signed = hub_runtime()?.block_on(args.run())?;
            println!("{}", signed.digest);
            for f in &signed.signed_files {
                eprintln!("signed {f}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::VerifyImage(args) => {
            shared_api::runtime::telemetry::init_tracing(
                "text".parse().map_err(anyhow::Error::msg)?,
                "warn",
            )?;
            let (digest, files) = hub_runtime()?.block_on(args.run())?;
            println!("{digest}");
            for f in &files {
                eprintln!("verified {f}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => {
            let problems = kmm_hub::validate_cmd::run(&files, &mut std::io::stdout())?;
            Ok(if problems == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
