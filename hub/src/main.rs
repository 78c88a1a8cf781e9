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
    },
    /// Validate Module and ManagedClusterModule YAML files (multi-document allowed).
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd { dir } => {
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
        Command::Validate { files } => {
            let problems = kmm_hub::validate_cmd::run(&files, &mut std::io::stdout())?;
            Ok(if problems == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
