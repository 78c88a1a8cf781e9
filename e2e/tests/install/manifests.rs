//! Rendering and reading the shipped manifests (`kubectl kustomize manifests/<dir>`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use crate::POLICY;

pub(crate) use kmm_e2e::manifests::{kustomize, repo, yaml_docs};

pub(crate) fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub(crate) fn ident(v: &Value) -> String {
    let ns = s(v, "/metadata/namespace");
    let ns = if ns.is_empty() {
        String::new()
    } else {
        format!("{ns}/")
    };
    format!("{} {ns}{}", s(v, "/kind"), s(v, "/metadata/name"))
}

pub(crate) fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| s(d, "/kind") == kind && s(d, "/metadata/name") == name)
        .with_context(|| format!("no {kind} {name}"))
}

/// The objects the Policy's ConfigurationPolicies install, in template order.
pub(crate) fn policy_objects(policy_docs: &[Value]) -> anyhow::Result<Vec<Value>> {
    let policy = find(policy_docs, "Policy", POLICY)?;
    let mut objects = Vec::new();
    for t in policy["spec"]["policy-templates"]
        .as_array()
        .context("Policy without policy-templates")?
    {
        let config = &t["objectDefinition"];
        ensure!(
            s(config, "/kind") == "ConfigurationPolicy",
            "unexpected template {}",
            ident(config)
        );
        for o in config["spec"]["object-templates"]
            .as_array()
            .context("ConfigurationPolicy without object-templates")?
        {
            objects.push(o["objectDefinition"].clone());
        }
    }
    Ok(objects)
}

/// Every YAML document under manifests/ (not the generated CRDs), and the objects embedded
/// in Policies, with the file they came from.
pub(crate) fn all_manifest_docs() -> anyhow::Result<Vec<(String, Value)>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "crds") {
                    walk(&p, out)?;
                }
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
        Ok(())
    }
    let root = repo().join("manifests");
    let mut files = Vec::new();
    walk(&root, &mut files)?;
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&root)?.display().to_string();
        let text = std::fs::read_to_string(&f)?;
        for d in yaml_docs(&text).with_context(|| format!("parsing {rel}"))? {
            if s(&d, "/kind") == "Policy" {
                for o in policy_objects(std::slice::from_ref(&d))? {
                    docs.push((format!("{rel} (Policy)"), o));
                }
            }
            docs.push((rel.clone(), d));
        }
    }
    Ok(docs)
}

pub(crate) fn container(deployment: &Value) -> anyhow::Result<&Value> {
    let cs = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("no containers")?;
    ensure!(
        cs.len() == 1,
        "{}: one container expected",
        ident(deployment)
    );
    Ok(&cs[0])
}

pub(crate) fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}
