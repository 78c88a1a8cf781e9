//! `kmm-hub validate FILE...`: offline validation of Module and ManagedClusterModule YAML.

use std::io::Write;
use std::path::PathBuf;

use shared_api::parse::{Object, parse_documents};
use shared_api::validate::{Context, validate_mcm, validate_module};

/// Validate every Module and ManagedClusterModule in the files; print one line per
/// problem as `FILE: kind/name: field.path: reason`. Returns the number of problems.
pub fn run(files: &[PathBuf], out: &mut impl Write) -> std::io::Result<usize> {
    let mut problems = 0;
    let mut checked = 0;
    for file in files {
        let shown = file.display();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                writeln!(out, "{shown}: cannot read: {e}")?;
                problems += 1;
                continue;
            }
        };
        let docs = match parse_documents(&text) {
            Ok(d) => d,
            Err(e) => {
                writeln!(out, "{shown}: {e}")?;
                problems += 1;
                continue;
            }
        };
        for doc in docs {
            let violations = match &doc.object {
                Object::Module(m) => validate_module(m, Context::default()),
                Object::ManagedClusterModule(m) => validate_mcm(m),
                Object::Other { .. } => continue,
            };
            checked += 1;
            for field in &doc.unknown_fields {
                writeln!(
                    out,
                    "{shown}: {}/{}: {field}: unknown field (not part of {})",
                    doc.kind, doc.name, doc.kind
                )?;
                problems += 1;
            }
            for v in violations {
                writeln!(out, "{shown}: {}/{}: {v}", doc.kind, doc.name)?;
                problems += 1;
            }
        }
    }
    if problems == 0 {
        writeln!(out, "{checked} object(s) valid")?;
    }
    Ok(problems)
}
