//! The shipped RBAC as grants, and the comparison with what a binary asked for (audit log).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail, ensure};
use kmm_e2e::cluster::Cluster;
use serde_json::Value;

use crate::manifests::{ident, s};

/// `group resource verb` (`core` for the core group), plus ` name=<n>` for a rule that
/// names its objects.
pub(crate) fn grants(group: &str, resource: &str, verbs: &[&str], names: &[&str]) -> Vec<String> {
    let group = if group.is_empty() { "core" } else { group };
    let mut out = Vec::new();
    for v in verbs {
        if names.is_empty() {
            out.push(format!("{group} {resource} {v}"));
        }
        for n in names {
            out.push(format!("{group} {resource} {v} name={n}"));
        }
    }
    out
}

/// The user name of the hub's default work executor, as OCM's webhook asks about it.
pub(crate) fn executor_user() -> String {
    let (ns, name) = kmm_hub::render::DEFAULT_WORK_EXECUTOR
        .split_once('/')
        .unwrap_or_default();
    format!("system:serviceaccount:{ns}:{name}")
}

/// What a Role or ClusterRole grants, in the notation of [`grants`]; wildcards and anything
/// but resource rules are errors.
fn role_grants(role: &Value) -> anyhow::Result<BTreeSet<String>> {
    let who = ident(role);
    ensure!(
        role.get("aggregationRule").is_none(),
        "{who}: aggregated roles grant what others add"
    );
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        ensure!(
            rule.get("nonResourceURLs").is_none(),
            "{who}: nonResourceURLs"
        );
        let list = |field: &str| -> Vec<String> {
            rule[field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        let (groups, resources, verbs, names) = (
            list("apiGroups"),
            list("resources"),
            list("verbs"),
            list("resourceNames"),
        );
        for x in groups.iter().chain(&resources).chain(&verbs).chain(&names) {
            ensure!(!x.contains('*'), "{who}: wildcard {x:?} in {rule}");
        }
        ensure!(
            !groups.is_empty() && !resources.is_empty() && !verbs.is_empty(),
            "{who}: incomplete rule {rule}"
        );
        let verbs: Vec<&str> = verbs.iter().map(String::as_str).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for g in &groups {
            for r in &resources {
                out.extend(grants(g, r, &verbs, &names));
            }
        }
    }
    Ok(out)
}

/// Every Role and ClusterRole of the manifests (and of the Policy), keyed `Kind/name`, with
/// its namespace and what it grants.
pub(crate) fn shipped_roles(
    docs: &[(String, Value)],
) -> anyhow::Result<BTreeMap<String, (String, BTreeSet<String>)>> {
    let mut out = BTreeMap::new();
    for (file, d) in docs {
        if matches!(s(d, "/kind"), "Role" | "ClusterRole") {
            let key = format!("{}/{}", s(d, "/kind"), s(d, "/metadata/name"));
            let grants = role_grants(d).with_context(|| file.clone())?;
            let ns = s(d, "/metadata/namespace").to_string();
            if let Some((_, prev)) = out.get(&key)
                && *prev != grants
            {
                bail!("{key} differs between manifests/ and the Policy ({file})");
            }
            out.insert(key, (ns, grants));
        }
    }
    Ok(out)
}

/// The roles the manifests bind to the service account `ns/name`: `(key, namespace of a
/// Role or "" for a ClusterRole, grants)`.
fn roles_bound_to(
    docs: &[(String, Value)],
    ns: &str,
    name: &str,
) -> anyhow::Result<Vec<(String, String, BTreeSet<String>)>> {
    let roles = shipped_roles(docs)?;
    let mut out = Vec::new();
    for (_, d) in docs {
        if !matches!(s(d, "/kind"), "RoleBinding" | "ClusterRoleBinding") {
            continue;
        }
        let binds = d["subjects"].as_array().into_iter().flatten().any(|x| {
            s(x, "/kind") == "ServiceAccount" && s(x, "/namespace") == ns && s(x, "/name") == name
        });
        if !binds {
            continue;
        }
        let key = format!("{}/{}", s(d, "/roleRef/kind"), s(d, "/roleRef/name"));
        let (role_ns, grants) = roles
            .get(&key)
            .with_context(|| format!("{} binds {key}, which is not shipped", ident(d)))?;
        // A RoleBinding to a ClusterRole grants it in the binding's namespace only.
        let scope = if s(d, "/kind") == "RoleBinding" {
            s(d, "/metadata/namespace").to_string()
        } else {
            role_ns.clone()
        };
        if out.iter().any(|(k, sc, _)| *k == key && *sc == scope) {
            continue;
        }
        out.push((key, scope, grants.clone()));
    }
    ensure!(!out.is_empty(), "no role is bound to {ns}/{name}");
    Ok(out)
}

/// One grant in the notation of [`grants`], split: group, resource, verb, allowed names.
fn split_grant(g: &str) -> (String, String, String, Option<String>) {
    let mut it = g.split(' ');
    let group = it.next().unwrap_or_default();
    let group = if group == "core" { "" } else { group };
    let resource = it.next().unwrap_or_default().to_string();
    let verb = it.next().unwrap_or_default().to_string();
    let name = it
        .next()
        .and_then(|n| n.strip_prefix("name="))
        .map(str::to_string);
    (group.to_string(), resource, verb, name)
}

/// The roles bound to a binary's service account grant exactly what the binary asked for
/// while it ran, as the API server's audit log recorded it: no request was denied, and every
/// grant was used — but for `unexercised`, grants the run cannot reach, each with the reason.
/// A request that fits a rule naming objects counts for that rule's names together.
pub(crate) fn rbac_matches_what_the_binary_asked(
    cluster: &Cluster,
    docs: &[(String, Value)],
    (ns, name): (&str, &str),
    unexercised: &[(&str, &str)],
) -> anyhow::Result<()> {
    let user = format!("system:serviceaccount:{ns}:{name}");
    let requests: Vec<_> = cluster
        .audit_requests()?
        .into_iter()
        .filter(|r| r.user == user)
        .collect();
    ensure!(!requests.is_empty(), "no audited request of {user}");
    let mut problems = Vec::new();
    for r in requests.iter().filter(|r| r.code == 403) {
        problems.push(format!(
            "denied: {} {}/{} {:?} in {:?}",
            r.verb, r.group, r.resource, r.name, r.namespace
        ));
    }
    let roles = roles_bound_to(docs, ns, name)?;
    let mut used_rules = BTreeSet::new();
    for (key, scope, grants) in &roles {
        for g in grants {
            let (group, resource, verb, object) = split_grant(g);
            let rule = match &object {
                Some(_) => format!("{group} {resource} {verb} (named)"),
                None => g.clone(),
            };
            let used = requests.iter().any(|r| {
                // A server-side apply that creates its object is checked for `create`
                // too, in the same request: the answer is 201.
                let verb_used =
                    r.verb == verb || (verb == "create" && r.verb == "patch" && r.code == 201);
                r.code != 403
                    && r.group == group
                    && r.resource == resource
                    && verb_used
                    && (scope.is_empty() || r.namespace == *scope)
                    && object.as_ref().is_none_or(|o| r.name == *o)
            });
            if used {
                used_rules.insert((key.clone(), rule));
            }
        }
    }
    for (key, scope, grants) in &roles {
        for g in grants {
            let (group, resource, verb, object) = split_grant(g);
            let rule = match &object {
                Some(_) => format!("{group} {resource} {verb} (named)"),
                None => g.clone(),
            };
            if used_rules.contains(&(key.clone(), rule)) {
                continue;
            }
            if unexercised
                .iter()
                .any(|(k, grant)| *k == key && g.starts_with(grant))
            {
                continue;
            }
            problems.push(format!(
                "{key} (scope {scope:?}) grants {g:?}, never asked for"
            ));
        }
    }
    // Each exemption must still be granted: an exemption of nothing hides nothing.
    for (key, grant) in unexercised {
        let granted = roles
            .iter()
            .any(|(k, _, gs)| k == key && gs.iter().any(|g| g.starts_with(grant)));
        if !granted {
            problems.push(format!("exemption {key} {grant:?} is not granted any more"));
        }
    }
    if !problems.is_empty() {
        let asked: BTreeSet<String> = requests
            .iter()
            .map(|r| {
                format!(
                    "{} {}/{} ns={:?} name={:?} -> {}",
                    r.verb, r.group, r.resource, r.namespace, r.name, r.code
                )
            })
            .collect();
        bail!(
            "{user} under the shipped roles:\n{}\nwhat it asked:\n{}",
            problems.join("\n"),
            asked.into_iter().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}
