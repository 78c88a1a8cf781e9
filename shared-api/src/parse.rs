//! Reading Module and ManagedClusterModule YAML offline (multi-document files),
//! reporting fields the types do not know instead of silently dropping them.

use serde::Deserialize;

use crate::mcm::ManagedClusterModule;
use crate::module::Module;

#[derive(Debug, Clone)]
pub enum Object {
    Module(Box<Module>),
    ManagedClusterModule(Box<ManagedClusterModule>),
    /// Any other kind (ConfigMaps and Secrets beside the Module, …): not ours to check.
    Other {
        api_version: String,
        kind: String,
    },
}

#[derive(Debug, Clone)]
pub struct Document {
    /// 1-based position in the file.
    pub index: usize,
    pub kind: String,
    pub name: String,
    pub object: Object,
    /// Paths of fields present in the YAML that the type does not have.
    pub unknown_fields: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document {index}: not valid YAML: {reason}")]
    Yaml { index: usize, reason: String },
    #[error("document {index} ({kind}/{name}): {reason}")]
    Shape {
        index: usize,
        kind: String,
        name: String,
        reason: String,
    },
}

const MODULE_API: &str = "kmm.sigs.x-k8s.io/v1beta1";
const MCM_API: &str = "hub.kmm.sigs.x-k8s.io/v1beta1";

/// Parse every YAML document of a file. Empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, ParseError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = serde_json::Value::deserialize(de).map_err(|e| ParseError::Yaml {
            index,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        out.push(parse_value(index, value)?);
    }
    Ok(out)
}

/// `spec.moduleLoader.?.container.kernelMappings.2.x` → `spec.moduleLoader.container.kernelMappings[2].x`.
fn display_path(raw: &str) -> String {
    let mut out = String::new();
    for seg in raw.split('.').filter(|s| *s != "?") {
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// Parse one object already decoded into JSON.
pub fn parse_value(index: usize, value: serde_json::Value) -> Result<Document, ParseError> {
    let s = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let api_version = s("apiVersion");
    let kind = s("kind");
    let name = value
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    let shape = |reason: String| ParseError::Shape {
        index,
        kind: kind.clone(),
        name: name.clone(),
        reason,
    };
    let mut unknown = Vec::new();
    let object = match (api_version.as_str(), kind.as_str()) {
        (MODULE_API, "Module") => Object::Module(Box::new(
            serde_ignored::deserialize(value, |p| unknown.push(p.to_string()))
                .map_err(|e| shape(e.to_string()))?,
        )),
        (MCM_API, "ManagedClusterModule") => Object::ManagedClusterModule(Box::new(
            serde_ignored::deserialize(value, |p| unknown.push(p.to_string()))
                .map_err(|e| shape(e.to_string()))?,
        )),
        (_, "Module" | "ManagedClusterModule") => {
            return Err(shape(format!(
                "unsupported apiVersion {api_version:?}: expected {} for {kind}",
                if kind == "Module" {
                    MODULE_API
                } else {
                    MCM_API
                }
            )));
        }
        _ => Object::Other {
            api_version,
            kind: kind.clone(),
        },
    };
    // kube's generated types handle `apiVersion`/`kind` themselves; `status` is the server's.
    let mut unknown: Vec<String> = unknown
        .iter()
        .map(|p| display_path(p))
        .filter(|p| !matches!(p.as_str(), "apiVersion" | "kind") && !p.starts_with("status"))
        .collect();
    unknown.dedup();
    Ok(Document {
        index,
        kind,
        name,
        object,
        unknown_fields: unknown,
    })
}
