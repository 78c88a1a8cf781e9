use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use kmm_hub::cli::{Cli, Command};

fn main() -> ExitCode {
    let matches =
        Cli::command().get_matches_from(kmm_runtime::gather::argv("kmm-hub", std::env::args_os()));
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli, matches.subcommand_matches("run")) {
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

fn run(cli: Cli, run_matches: Option<&clap::ArgMatches>) -> anyhow::Result<ExitCode> {
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
        Command::Run(mut args) => {
            kmm_runtime::alloc::frugal_malloc();
            kmm_runtime::telemetry::init_tracing(args.common.log_format, &args.common.log_filter)?;
            // Precedence: a flag (or its variable) > upstream's config file > the default.
            if let Some((path, report)) =
                kmm_hub::cli::apply_upstream_config(&mut args, run_matches)?
            {
                kmm_runtime::upstream_config::log_report(&path, &report);
            }
            hub_runtime()?.block_on(async move {
                let token = kmm_runtime::shutdown::install();
                kmm_hub::run::run(*args, token).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Render(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let ok = rt.block_on(kmm_hub::commands::render::run(args, &mut std::io::stdout()))?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Preflight(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let ok = rt.block_on(kmm_hub::commands::preflight::run(
                args,
                &mut std::io::stdout(),
            ))?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Machineconfig(args) => {
            kmm_hub::commands::machineconfig::run(&args, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MustGather(args) => {
            let w = hub_runtime()?.block_on(kmm_hub::commands::must_gather::run(&args))?;
            print_written(&w);
            Ok(ExitCode::SUCCESS)
        }
        Command::SignFile(args) => {
            args.run()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SignImage(args) => {
            kmm_runtime::telemetry::init_tracing(kmm_runtime::telemetry::LogFormat::Plain, "warn")?;
            let signed = hub_runtime()?.block_on(args.run())?;
            println!("{}", signed.digest);
            for f in &signed.signed_files {
                eprintln!("signed {f}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::VerifyImage(args) => {
            kmm_runtime::telemetry::init_tracing(kmm_runtime::telemetry::LogFormat::Plain, "warn")?;
            let (digest, files) = hub_runtime()?.block_on(args.run())?;
            println!("{digest}");
            for f in &files {
                eprintln!("verified {f}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => {
            let problems = kmm_hub::commands::validate::run(&files, &mut std::io::stdout())?;
            Ok(if problems == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// What `must-gather` wrote, for the person running it.
fn print_written(w: &kmm_runtime::gather::Written) {
    println!(
        "wrote {} ({} files, {} errors, {} values redacted)",
        w.dir.display(),
        w.files,
        w.errors,
        w.redactions
    );
    if let Some(t) = &w.tarball {
        println!("wrote {}", t.display());
    }
}
