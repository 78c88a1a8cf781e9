//! Installing kmm-fleet: the manifests of manifests/hub, manifests/spoke and manifests/policy,
//! checked offline and against real control planes.
//!
//! - RBAC is least privilege: the exact rule set of every role is pinned below (adding a
//!   permission means changing this file), wildcards are refused, and SubjectAccessReviews on
//!   the live servers show what the service accounts may not do.
//! - The Deployments are hardened and configured with flags and variables their binaries
//!   accept; the hub's shipped configuration parses.
//! - The RHACM Policy carries exactly the spoke manifests (it is generated from them).
//! - Every manifest applies with server-side apply and `dryRun=All`, the Policy and its
//!   placement against OCM's and the policy framework's released CRDs on the hub.
//! - Applied on the hub, `manifests/policy` reaches the spoke through the real Placement, the
//!   real policy propagator and the real configuration policy controller (the framework
//!   addon's sync between them is simulated: its module is refused by the Go proxy), and the
//!   objects it puts there give a working agent: the `kmm-spoke` binary, run with the
//!   Deployment's arguments and environment and its ServiceAccount's token, becomes ready,
//!   publishes the kernel ClusterClaim and loads a Module created by the work agent's
//!   ServiceAccount.
//! - The hub, run with its ServiceAccount's token and the shipped configuration, ships a
//!   ManifestWork, runs a build, records events and answers its dashboard.
//!
//! Manifests are rendered with `kubectl kustomize` (the test world's kubectl), as users apply
//! them.
//! `KMM_UPDATE_POLICY=1 cargo test -p kmm-e2e --test install policy_yaml` regenerates
//! manifests/policy/policy.yaml. The spoke test builds the `kmm-spoke` binary with cargo
//! unless `KMM_SPOKE_BIN` names one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kmm_e2e::cluster::Cluster;
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::testkit::{HubOptions, HubProcess, ensure_namespace, eventually};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::{Client, ResourceExt as _};
use serde::Deserialize as _;
use serde_json::{Value, json};
use shared_api::labels::{KERNEL_LABEL, MCM_OWNER_LABEL, ROLE_LABEL, kernel_label_value};
use shared_api::ocm::{ClusterClaim, KERNEL_VERSIONS_CLAIM, ManifestWork};
use shared_api::{ManagedCluster, ManagedClusterModule, Module};

const HUB_NS: &str = "kmm-hub";
const HUB_SA: &str = "kmm-hub";
const BUILD_NS: &str = "kmm-hub-builds";
const SPOKE_NS: &str = "kmm-spoke";
const SPOKE_SA: &str = "kmm-spoke";
const POLICY_NS: &str = "kmm-policies";
const POLICY: &str = "install-kmm-spoke";
const WORK_NS: &str = "open-cluster-management-agent";
const WORK_SA: &str = "klusterlet-work-sa";
const MODULE_NS: &str = "kmm-labs";
const SPOKE_EVENTS_NS: &str = kmm_spoke::controller::events::EVENT_NAMESPACE;
const MANAGER: &str = "kmm-install-test";
const K1: &str = "5.14.0-284.36.1.el9_2.x86_64";
const K2: &str = "6.1.0-18-amd64";
const DEADLINE: Duration = Duration::from_secs(120);

/// A fleet is several control planes: one at a time per test process.
static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------
// Rendering and reading manifests

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectl() -> anyhow::Result<PathBuf> {
    Ok(kmm_e2e::provision::ensure_provisioned()?.kubectl)
}

fn yaml_docs(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// `kubectl kustomize manifests/<dir>`: what users apply.
fn kustomize(dir: &str) -> anyhow::Result<Vec<Value>> {
    let path = repo().join("manifests").join(dir);
    let out = std::process::Command::new(kubectl()?)
        .arg("kustomize")
        .arg(&path)
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize manifests/{dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout)?)
        .with_context(|| format!("parsing the output of kubectl kustomize manifests/{dir}"))
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn ident(v: &Value) -> String {
    let ns = s(v, "/metadata/namespace");
    let ns = if ns.is_empty() {
        String::new()
    } else {
        format!("{ns}/")
    };
    format!("{} {ns}{}", s(v, "/kind"), s(v, "/metadata/name"))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| s(d, "/kind") == kind && s(d, "/metadata/name") == name)
        .with_context(|| format!("no {kind} {name}"))
}

/// The objects the Policy's ConfigurationPolicies install, in template order.
fn policy_objects(policy_docs: &[Value]) -> anyhow::Result<Vec<Value>> {
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

/// The Policy for the spoke manifests: one ConfigurationPolicy, every object `mustonlyhave`.
fn policy_for(spoke: &[Value]) -> Value {
    let templates: Vec<Value> = spoke
        .iter()
        .map(|o| json!({"complianceType": "mustonlyhave", "objectDefinition": o}))
        .collect();
    json!({
        "apiVersion": "policy.open-cluster-management.io/v1",
        "kind": "Policy",
        "metadata": {
            "name": POLICY,
            "namespace": POLICY_NS,
            "annotations": {
                "policy.open-cluster-management.io/standards": "NIST SP 800-53",
                "policy.open-cluster-management.io/categories": "CM Configuration Management",
                "policy.open-cluster-management.io/controls": "CM-2 Baseline Configuration",
            },
        },
        "spec": {
            "disabled": false,
            "remediationAction": "enforce",
            "policy-templates": [{
                "objectDefinition": {
                    "apiVersion": "policy.open-cluster-management.io/v1",
                    "kind": "ConfigurationPolicy",
                    "metadata": {"name": POLICY},
                    "spec": {
                        "remediationAction": "enforce",
                        "severity": "high",
                        "object-templates": templates,
                    },
                },
            }],
        },
    })
}

const POLICY_HEADER: &str = "\
# Generated from `kubectl kustomize manifests/spoke`; do not edit. Regenerate with
# `KMM_UPDATE_POLICY=1 cargo test -p kmm-e2e --test install policy_yaml`.
# The RHACM/OCM governance Policy that installs the spoke agent on every cluster that
# placement.yaml selects: the Module CRD, the agent's namespace, ServiceAccount, RBAC and
# Deployment, and the work agent's right to manage Modules.
";

// ---------------------------------------------------------------------------------------
// RBAC

/// `group resource verb` (`core` for the core group), plus ` name=<n>` for a rule that
/// names its objects.
fn grants(group: &str, resource: &str, verbs: &[&str], names: &[&str]) -> Vec<String> {
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
fn executor_user() -> String {
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

/// Every YAML document under manifests/ (not the generated CRDs), and the objects embedded
/// in Policies, with the file they came from.
fn all_manifest_docs() -> anyhow::Result<Vec<(String, Value)>> {
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

/// Every Role and ClusterRole of the manifests (and of the Policy), keyed `Kind/name`, with
/// its namespace and what it grants.
fn shipped_roles(
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

/// The static half of the RBAC checks: no wildcards, bindings only to our roles and to
/// service accounts, the spoke's roles in the Policy too, and secrets reachable only where the
/// product says. That the roles grant exactly what the binaries ask for is checked against
/// the API server's audit log by the tests that run the binaries under these roles
/// ([`rbac_matches_what_the_binary_asked`]).
#[test]
fn rbac_has_no_wildcards_and_binds_only_service_accounts() -> anyhow::Result<()> {
    let docs = all_manifest_docs()?;
    let roles = shipped_roles(&docs)?;
    let mut problems = Vec::new();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, d) in &docs {
        let kind = s(d, "/kind");
        let key = format!("{kind}/{}", s(d, "/metadata/name"));
        match kind {
            "Role" | "ClusterRole" => seen.entry(key).or_default().push(file.clone()),
            "RoleBinding" | "ClusterRoleBinding" => {
                let role = format!("{}/{}", s(d, "/roleRef/kind"), s(d, "/roleRef/name"));
                if !roles.contains_key(&role) {
                    problems.push(format!("{file}: {key} binds {role}, not one of ours"));
                }
                if kind == "ClusterRoleBinding" && s(d, "/roleRef/kind") == "Role" {
                    problems.push(format!("{file}: {key} refers to a Role"));
                }
                for subject in d["subjects"].as_array().into_iter().flatten() {
                    // Bindings name service accounts, never users or groups.
                    if s(subject, "/kind") != "ServiceAccount"
                        || s(subject, "/namespace").is_empty()
                    {
                        problems.push(format!("{file}: {key} binds {subject}"));
                    }
                }
            }
            _ => {}
        }
    }
    for (key, files) in &seen {
        // The spoke's roles also travel inside the Policy.
        if (key.contains("spoke") || key.contains("module-manager") || key.contains("executor"))
            && !files.iter().any(|f| f.contains("(Policy)"))
        {
            problems.push(format!("{key}: not in the Policy"));
        }
    }
    ensure!(problems.is_empty(), "RBAC:\n{}", problems.join("\n"));

    // The properties the product promises, stated on their own: only the hub reaches
    // secrets, and only in its own namespace(s), never cluster-wide.
    for (key, (ns, grants)) in &roles {
        let secrets: Vec<&String> = grants
            .iter()
            .filter(|g| g.starts_with("core secrets "))
            .collect();
        if secrets.is_empty() {
            continue;
        }
        ensure!(
            key.starts_with("Role/kmm-hub") && ns.starts_with(HUB_NS),
            "{key} (namespace {ns:?}) reaches secrets: {secrets:?}"
        );
    }
    // Namespaced roles sit where their binary needs them.
    let hub = kustomize("hub")?;
    let builds = kustomize("hub-builds")?;
    let spoke = kustomize("spoke")?;
    // The hub's events are kube-runtime's Recorder's, which puts those about cluster-scoped
    // objects (MCMs) in `default`; the spoke names its events' namespace.
    for (docs, name, ns) in [
        (&hub, "kmm-hub", HUB_NS),
        (&hub, "kmm-hub-events", "default"),
        (&builds, "kmm-hub-builds", BUILD_NS),
        (&spoke, "kmm-spoke", SPOKE_NS),
        (&spoke, "kmm-spoke-events", SPOKE_EVENTS_NS),
    ] {
        for kind in ["Role", "RoleBinding"] {
            let d = find(docs, kind, name)?;
            ensure!(
                s(d, "/metadata/namespace") == ns,
                "{} is not in {ns}",
                ident(d)
            );
        }
        let binding = find(docs, "RoleBinding", name)?;
        let sa = &binding["subjects"][0];
        let own_ns = if name.starts_with("kmm-hub") {
            HUB_NS
        } else {
            SPOKE_NS
        };
        ensure!(
            s(sa, "/namespace") == own_ns,
            "{} binds {sa}",
            ident(binding)
        );
    }
    Ok(())
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
fn rbac_matches_what_the_binary_asked(
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

// ---------------------------------------------------------------------------------------
// Deployments, configuration, Services

/// The hub's command line, as `kmm-hub run` parses it.
#[derive(clap::Parser, Debug)]
struct HubCli {
    #[command(subcommand)]
    command: HubCommand,
}

#[derive(clap::Subcommand, Debug)]
enum HubCommand {
    Run(kmm_hub::run::RunArgs),
}

/// Environment variables the `run` subcommand of a clap command reads.
fn run_env_names(cmd: &clap::Command) -> anyhow::Result<BTreeSet<String>> {
    let run = cmd
        .get_subcommands()
        .find(|c| c.get_name() == "run")
        .context("no run subcommand")?;
    Ok(run
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect())
}

fn container(deployment: &Value) -> anyhow::Result<&Value> {
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

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| s(e, "/name") == name)
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

fn port(c: &Value, name: &str) -> Option<i64> {
    c["ports"]
        .as_array()?
        .iter()
        .find(|p| s(p, "/name") == name)?
        .get("containerPort")?
        .as_i64()
}

/// The hardening every Deployment of the install must have.
fn check_hardened(d: &Value, problems: &mut Vec<String>) -> anyhow::Result<()> {
    let who = ident(d);
    let mut want = |ok: bool, what: &str| {
        if !ok {
            problems.push(format!("{who}: {what}"));
        }
    };
    let pod = &d["spec"]["template"]["spec"];
    want(d["spec"]["replicas"] == json!(1), "one replica");
    want(
        s(d, "/spec/strategy/type") == "Recreate",
        "Recreate (readiness waits for the leader Lease)",
    );
    want(
        pod["securityContext"]["runAsNonRoot"] == json!(true),
        "runAsNonRoot",
    );
    want(
        s(pod, "/securityContext/seccompProfile/type") == "RuntimeDefault",
        "seccomp RuntimeDefault",
    );
    want(
        pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none(),
        "no host namespaces",
    );
    want(
        pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|v| v.get("hostPath").is_none()),
        "no hostPath volumes",
    );
    let c = container(d)?;
    let sc = &c["securityContext"];
    want(
        sc["readOnlyRootFilesystem"] == json!(true),
        "readOnlyRootFilesystem",
    );
    want(
        sc["allowPrivilegeEscalation"] == json!(false),
        "allowPrivilegeEscalation false",
    );
    want(sc.get("privileged").is_none(), "not privileged");
    want(
        sc["capabilities"]["drop"] == json!(["ALL"]) && sc["capabilities"].get("add").is_none(),
        "capabilities: drop ALL, add none",
    );
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            want(
                c["resources"][k].get(r).is_some(),
                &format!("resources.{k}.{r}"),
            );
        }
    }
    want(port(c, "admin") == Some(8081), "admin port 8081");
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        want(
            s(&c[probe], "/httpGet/path") == path && s(&c[probe], "/httpGet/port") == "admin",
            &format!("{probe} on admin {path}"),
        );
    }
    let image = s(c, "/image");
    want(
        image.contains('/') && (image.contains('@') || image.rsplit_once(':').is_some()),
        &format!("a full image reference from manifests/images, not {image:?}"),
    );
    want(
        !image.ends_with(":latest"),
        "a pinned image tag, not latest",
    );
    Ok(())
}

fn field_ref<'a>(c: &'a Value, name: &str) -> &'a str {
    env_value(c, name).map_or("", |e| s(e, "/valueFrom/fieldRef/fieldPath"))
}

fn plain(c: &Value, name: &str) -> String {
    env_value(c, name).map_or(String::new(), |e| s(e, "/value").to_string())
}

/// The volume mounted at the directory of `file`: `(volume, file name)`.
fn volume_for<'a>(d: &'a Value, file: &str) -> anyhow::Result<(&'a Value, String)> {
    let c = container(d)?;
    let (dir, name) = file.rsplit_once('/').context("not a path")?;
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| s(m, "/mountPath") == dir)
        .with_context(|| format!("nothing mounted at {dir}"))?;
    let vol = d["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| s(v, "/name") == s(mount, "/name"))
        .with_context(|| format!("no volume {}", s(mount, "/name")))?;
    Ok((vol, name.to_string()))
}

#[test]
fn deployments_are_hardened_and_configured_for_their_binaries() -> anyhow::Result<()> {
    let hub = kustomize("hub")?;
    let spoke = kustomize("spoke")?;
    let hub_dep = find(&hub, "Deployment", "kmm-hub")?;
    let spoke_dep = find(&spoke, "Deployment", "kmm-spoke")?;
    let mut problems = Vec::new();
    check_hardened(hub_dep, &mut problems)?;
    check_hardened(spoke_dep, &mut problems)?;
    for (docs, d, sa) in [(&hub, hub_dep, HUB_SA), (&spoke, spoke_dep, SPOKE_SA)] {
        if s(d, "/spec/template/spec/serviceAccountName") != sa
            || find(docs, "ServiceAccount", sa).is_err()
        {
            problems.push(format!("{}: runs as ServiceAccount {sa}", ident(d)));
        }
    }

    // Every flag and variable is one the binary reads. The hub takes POD_NAME from the
    // environment directly (event reporter and lease identity), not through clap.
    let hub_c = container(hub_dep)?;
    let spoke_c = container(spoke_dep)?;
    let hub_env = run_env_names(&HubCli::command())?;
    let spoke_env = run_env_names(&kmm_spoke::cli::Cli::command())?;
    for (c, known, extra) in [
        (hub_c, &hub_env, &["POD_NAME"][..]),
        (spoke_c, &spoke_env, &[][..]),
    ] {
        for e in c["env"].as_array().into_iter().flatten() {
            let name = s(e, "/name");
            if !known.contains(name) && !extra.contains(&name) {
                problems.push(format!("env {name} is read by no flag"));
            }
        }
    }
    let hub_args = args(hub_c);
    HubCli::try_parse_from(std::iter::once("kmm-hub".to_string()).chain(hub_args.clone()))
        .context("the hub's args")?;
    kmm_spoke::cli::Cli::try_parse_from(
        std::iter::once("kmm-spoke".to_string()).chain(args(spoke_c)),
    )
    .context("the spoke's args")?;

    // Hub: namespace and identity from the downward API; listeners on the ports that the
    // probes and Services use.
    let mut want = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    want(
        field_ref(hub_c, "OPERATOR_NAMESPACE") == "metadata.namespace",
        "hub: OPERATOR_NAMESPACE from metadata.namespace".into(),
    );
    want(
        field_ref(hub_c, "POD_NAME") == "metadata.name",
        "hub: POD_NAME from metadata.name".into(),
    );
    want(
        plain(hub_c, "KMM_HUB_ADMIN_ADDRESS") == "0.0.0.0:8081",
        "hub: admin on 0.0.0.0:8081".into(),
    );
    for (var, port_name, service, service_port) in [
        ("KMM_HUB_WEBHOOK_ADDRESS", "webhook", "kmm-hub-webhook", 443),
        (
            "KMM_HUB_DASHBOARD_ADDRESS",
            "dashboard",
            "kmm-hub-dashboard",
            8443,
        ),
    ] {
        let p = port(hub_c, port_name);
        want(
            p.is_some() && plain(hub_c, var) == format!("0.0.0.0:{}", p.unwrap_or(0)),
            format!("hub: {var} listens on the {port_name} port"),
        );
        let svc = find(&hub, "Service", service)?;
        let sp = svc["spec"]["ports"]
            .as_array()
            .and_then(|ps| ps.first())
            .context("service without ports")?;
        want(
            sp["port"] == json!(service_port) && s(sp, "/targetPort") == port_name,
            format!("{}: port {service_port} -> {port_name}", ident(svc)),
        );
        let selector = svc["spec"]["selector"].as_object().context("no selector")?;
        let labels = &hub_dep["spec"]["template"]["metadata"]["labels"];
        want(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v),
            format!("{}: selects the hub's pods", ident(svc)),
        );
    }
    // The webhook configuration points at the webhook Service.
    let webhook = find(
        &hub,
        "ValidatingWebhookConfiguration",
        "kmm-hub-validating-webhook",
    )?;
    for w in webhook["webhooks"].as_array().into_iter().flatten() {
        let svc = &w["clientConfig"]["service"];
        want(
            s(svc, "/name") == "kmm-hub-webhook"
                && s(svc, "/namespace") == HUB_NS
                && svc["port"] == json!(443),
            format!("webhook {} points at {svc}", s(w, "/name")),
        );
    }
    // TLS files come from mounted Secrets; the config file from the shipped ConfigMap,
    // which the hub's own strict parser accepts.
    for var in [
        "KMM_HUB_WEBHOOK_CERT",
        "KMM_HUB_WEBHOOK_KEY",
        "KMM_HUB_DASHBOARD_CERT",
        "KMM_HUB_DASHBOARD_KEY",
    ] {
        let (vol, _) = volume_for(hub_dep, &plain(hub_c, var)).context(var)?;
        want(
            vol.get("secret").is_some(),
            format!("hub: {var} is in a Secret volume"),
        );
    }
    let config_path = hub_args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .context("hub: no --config=")?;
    let (vol, key) = volume_for(hub_dep, config_path)?;
    let cm = find(&hub, "ConfigMap", s(vol, "/configMap/name"))?;
    let text = cm["data"][&key]
        .as_str()
        .with_context(|| format!("{} has no key {key}", ident(cm)))?;
    let config = kmm_hub::config::HubConfig::parse(text)
        .map_err(anyhow::Error::msg)
        .context("the shipped hub configuration")?;
    want(
        !config.kaniko_image.ends_with(":latest"),
        "hub config: a pinned kaniko image".into(),
    );

    // Spoke: leader election on, its Lease in its own namespace (where its Role is).
    want(
        plain(spoke_c, "KMM_SPOKE_LEADER_ELECT") == "true",
        "spoke: leader election on".into(),
    );
    want(
        field_ref(spoke_c, "KMM_SPOKE_LEASE_NAMESPACE") == "metadata.namespace",
        "spoke: Lease in its own namespace".into(),
    );
    want(
        field_ref(spoke_c, "POD_NAME") == "metadata.name",
        "spoke: POD_NAME from metadata.name".into(),
    );
    want(
        plain(spoke_c, "KMM_SPOKE_ADMIN_ADDRESS") == "0.0.0.0:8081",
        "spoke: admin on 0.0.0.0:8081".into(),
    );
    ensure!(problems.is_empty(), "Deployments:\n{}", problems.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The Policy

#[test]
fn policy_yaml_is_generated_from_the_spoke_manifests() -> anyhow::Result<()> {
    let spoke = kustomize("spoke")?;
    let want = policy_for(&spoke);
    let path = repo().join("manifests/policy/policy.yaml");
    if std::env::var_os("KMM_UPDATE_POLICY").is_some() {
        std::fs::write(
            &path,
            format!("{POLICY_HEADER}{}", serde_yaml::to_string(&want)?),
        )?;
    }
    let have = yaml_docs(&std::fs::read_to_string(&path)?)?;
    ensure!(have.len() == 1, "policy.yaml holds one Policy");
    if have[0] != want {
        let objects = |p: &Value| policy_objects(std::slice::from_ref(p)).unwrap_or_default();
        let (h, w) = (objects(&have[0]), objects(&want));
        let differing: Vec<String> = w
            .iter()
            .filter(|o| !h.contains(o))
            .map(ident)
            .chain(
                h.iter()
                    .filter(|o| !w.contains(o))
                    .map(|o| format!("stale {}", ident(o))),
            )
            .collect();
        bail!(
            "manifests/policy/policy.yaml does not match manifests/spoke (objects: {differing:?}; \
             if empty, the Policy's frame differs); regenerate with \
             `KMM_UPDATE_POLICY=1 cargo test -p kmm-e2e --test install policy_yaml`"
        );
    }

    // The Policy as applied: enforced, every object `mustonlyhave`, namespaced objects with
    // their namespace (the config-policy controller does not guess one).
    let docs = kustomize("policy")?;
    let policy = find(&docs, "Policy", POLICY)?;
    ensure!(s(policy, "/spec/remediationAction") == "enforce");
    ensure!(s(policy, "/metadata/namespace") == POLICY_NS);
    let config = &policy["spec"]["policy-templates"][0]["objectDefinition"];
    for t in config["spec"]["object-templates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let o = &t["objectDefinition"];
        ensure!(
            s(t, "/complianceType") == "mustonlyhave",
            "{}: {}",
            ident(o),
            t["complianceType"]
        );
        let cluster_scoped = matches!(
            s(o, "/kind"),
            "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding"
        );
        ensure!(
            cluster_scoped == s(o, "/metadata/namespace").is_empty(),
            "{}: a namespace exactly when namespaced",
            ident(o)
        );
    }
    // Wiring: binding -> Placement and Policy; Placement -> a bound cluster set.
    let binding = find(&docs, "PlacementBinding", POLICY)?;
    let placement_name = s(binding, "/placementRef/name");
    let placement = find(&docs, "Placement", placement_name)?;
    ensure!(
        s(binding, "/placementRef/kind") == "Placement"
            && s(binding, "/placementRef/apiGroup") == "cluster.open-cluster-management.io"
    );
    ensure!(
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| s(x, "/kind") == "Policy"
                && s(x, "/name") == POLICY
                && s(x, "/apiGroup") == "policy.open-cluster-management.io"),
        "the binding names the Policy"
    );
    for set in placement["spec"]["clusterSets"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let set = set.as_str().unwrap_or_default();
        let b = find(&docs, "ManagedClusterSetBinding", set)?;
        ensure!(s(b, "/spec/clusterSet") == set);
    }
    for d in [binding, placement, policy] {
        ensure!(s(d, "/metadata/namespace") == POLICY_NS, "{}", ident(d));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Applying to live servers

/// Server-side apply of one manifest; `dry_run` is `dryRun=All`.
/// The API resource of a document's kind, and whether it is namespaced.
async fn api_resource(
    client: &Client,
    doc: &Value,
) -> anyhow::Result<(kube::discovery::ApiResource, bool)> {
    let api_version = s(doc, "/apiVersion");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, s(doc, "/kind"));
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {}", ident(doc)))?;
    Ok((resource, caps.scope == Scope::Namespaced))
}

async fn apply(client: &Client, doc: &Value, dry_run: bool) -> anyhow::Result<()> {
    let (resource, namespaced) = api_resource(client, doc).await?;
    let api: Api<DynamicObject> = if namespaced {
        let ns = s(doc, "/metadata/namespace");
        ensure!(!ns.is_empty(), "{} has no namespace", ident(doc));
        Api::namespaced_with(client.clone(), ns, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let mut pp = PatchParams::apply(MANAGER).force();
    pp.dry_run = dry_run;
    api.patch(s(doc, "/metadata/name"), &pp, &Patch::Apply(doc))
        .await
        .with_context(|| {
            format!(
                "{} {}",
                if dry_run {
                    "dry-run applying"
                } else {
                    "applying"
                },
                ident(doc)
            )
        })?;
    Ok(())
}

async fn wait_established(client: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(&format!("CRD {name} established"), DEADLINE, || async {
        let crd = api.get(name).await?;
        let conds = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        Ok(
            if conds
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                Ok(())
            } else {
                Err(format!("{conds:?}"))
            },
        )
    })
    .await
}

/// Create the Namespaces of `docs` for real (namespaced objects cannot be dry-run into a
/// namespace that does not exist), then dry-run every document.
async fn dry_run_all(client: &Client, docs: &[Value], what: &str) -> anyhow::Result<()> {
    for d in docs.iter().filter(|d| s(d, "/kind") == "Namespace") {
        apply(client, d, false).await.context(what.to_string())?;
    }
    for d in docs {
        apply(client, d, true).await.context(what.to_string())?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_applies_with_server_side_dry_run() -> anyhow::Result<()> {
    let hub_docs = kustomize("hub")?;
    let build_docs = kustomize("hub-builds")?;
    let spoke_docs = kustomize("spoke")?;
    let policy_docs = kustomize("policy")?;
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .run(async |fleet: &mut Fleet| {
            let hub = fleet.hub().client().await;
            let spoke = fleet.spoke(1).client().await;
            dry_run_all(&hub, &hub_docs, "manifests/hub on the hub").await?;
            dry_run_all(&hub, &build_docs, "manifests/hub-builds on the hub").await?;
            dry_run_all(&spoke, &spoke_docs, "manifests/spoke on a spoke").await?;
            // The hub has OCM's and the policy framework's released CRDs.
            dry_run_all(&hub, &policy_docs, "manifests/policy on the hub").await?;
            // What the config-policy controller applies on each spoke.
            dry_run_all(
                &spoke,
                &policy_objects(&policy_docs)?,
                "the Policy's objects on a spoke",
            )
            .await?;

            // Pod Security as the namespaces declare it: each Deployment's pod passes its
            // namespace's enforced level (a dry-run create is admitted by PodSecurity), and a
            // privileged pod is refused there.
            for (client, docs, name, ns) in [
                (&hub, &hub_docs, "kmm-hub", HUB_NS),
                (&spoke, &spoke_docs, "kmm-spoke", SPOKE_NS),
            ] {
                let d = find(docs, "Deployment", name)?;
                let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("{name}-pss"), "namespace": ns},
                    "spec": d["spec"]["template"]["spec"].clone()});
                // A dry run only validates: the ServiceAccount the Deployment names is not
                // there (admission would refuse for that before PodSecurity looks).
                if let Some(spec) = pod["spec"].as_object_mut() {
                    spec.remove("serviceAccountName");
                }
                let pods: Api<DynamicObject> = Api::namespaced_with(
                    client.clone(),
                    ns,
                    &kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
                );
                let dry = PostParams {
                    dry_run: true,
                    ..Default::default()
                };
                let obj: DynamicObject = serde_json::from_value(pod.clone())?;
                pods.create(&dry, &obj)
                    .await
                    .with_context(|| format!("{name}'s pod in namespace {ns} (Pod Security)"))?;
                pod["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
                let obj: DynamicObject = serde_json::from_value(pod)?;
                match pods.create(&dry, &obj).await {
                    Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity") => {}
                    other => {
                        bail!("a privileged pod in {ns}: want PodSecurity to refuse, got {other:?}")
                    }
                }
            }
            build_pod_passes_pod_security(&hub).await?;

            // Dry runs wrote nothing, and they do validate: a bad manifest is refused.
            let deployments: Api<DynamicObject> = Api::namespaced_with(
                hub.clone(),
                HUB_NS,
                &kube::discovery::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
            );
            ensure!(
                deployments.get_opt("kmm-hub").await?.is_none(),
                "a dry run created the hub Deployment"
            );
            let mut bad = find(&hub_docs, "Deployment", "kmm-hub")?.clone();
            bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                json!(70000);
            let refused = apply(&hub, &bad, true).await;
            ensure!(
                refused
                    .as_ref()
                    .is_err_and(|e| format!("{e:#}").contains("containerPort")),
                "a Deployment with port 70000 was not refused: {refused:?}"
            );
            Ok(())
        })
        .await
}

/// The hub's rendered kaniko build pod, with the shipped configuration, is admitted by the
/// build namespace's Pod Security level (`baseline`); the hub's namespace (`restricted`)
/// refuses it, and the build namespace refuses a privileged variant.
async fn build_pod_passes_pod_security(hub: &Client) -> anyhow::Result<()> {
    let docs = kustomize("hub")?;
    let config = kmm_hub::config::HubConfig::parse(s(
        find(&docs, "ConfigMap", "kmm-hub-config")?,
        "/data/config.yaml",
    ))
    .and_then(|c| c.resolve(HUB_NS))
    .map_err(anyhow::Error::msg)?;
    ensure!(
        config.build_namespace == BUILD_NS,
        "the shipped buildNamespace is {:?}, manifests/hub-builds makes {BUILD_NS}",
        config.build_namespace
    );
    let build: shared_api::module::Build = serde_json::from_value(json!({
        "dockerfileConfigMap": {"name": "df"}, "secrets": [{"name": "git"}]}))?;
    let job = kmm_hub::build::render_build_job(&kmm_hub::build::BuildInputs {
        mcm: "m",
        namespace: BUILD_NS,
        image: "registry.example.com/m:6.1",
        kernel: "6.1",
        mod_name: "m",
        mod_namespace: "ns",
        build: &build,
        dockerfile: "FROM x",
        registry_tls: Default::default(),
        registry_secret: true,
        kaniko_image: &config.kaniko_image,
        dtk_image: None,
        attempt: 1,
        resources: &config.build_resources,
        deadline: config.build_deadline,
    });
    let template = job.spec.context("no Job spec")?.template;
    let pod = |ns: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kaniko-pss", "namespace": ns},
            "spec": serde_json::to_value(&template.spec).unwrap_or_default()})
    };
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pods = |ns: &str| -> Api<DynamicObject> {
        Api::namespaced_with(
            hub.clone(),
            ns,
            &kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
        )
    };
    pods(BUILD_NS)
        .create(&dry, &serde_json::from_value(pod(BUILD_NS))?)
        .await
        .context("the kaniko build pod in the build namespace (Pod Security)")?;
    match pods(HUB_NS)
        .create(&dry, &serde_json::from_value(pod(HUB_NS))?)
        .await
    {
        Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity") => {}
        other => bail!("a root kaniko pod in {HUB_NS}: want PodSecurity to refuse, got {other:?}"),
    }
    let mut privileged = pod(BUILD_NS);
    privileged["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    match pods(BUILD_NS)
        .create(&dry, &serde_json::from_value(privileged)?)
        .await
    {
        Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity") => Ok(()),
        other => bail!("a privileged pod in {BUILD_NS}: want PodSecurity to refuse, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Live permissions

/// A kubeconfig for `cluster` that authenticates with a bearer token.
fn token_kubeconfig(cluster: &Cluster, token: &str, path: &Path) -> anyhow::Result<()> {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cluster.ca_pem());
    let doc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server_url(), "certificate-authority-data": ca}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    });
    std::fs::write(path, serde_yaml::to_string(&doc)?)?;
    Ok(())
}

/// Ask the server, by SubjectAccessReview, what service account `ns/sa` may do, and fail
/// with every answer that differs. A question reads like `kubectl auth can-i`, prefixed with
/// the expected answer: `yes|no <verb> <resource>[.<group>][/<subresource>] [<name>] [-n <ns>]`.
async fn check_access(
    admin: &Client,
    (ns, sa): (&str, &str),
    questions: &[&str],
) -> anyhow::Result<()> {
    let api: Api<SubjectAccessReview> = Api::all(admin.clone());
    let mut wrong = Vec::new();
    for q in questions {
        let words: Vec<&str> = q.split_whitespace().collect();
        let (want, verb, target) = match words[..] {
            [want, verb, target, ..] => (want == "yes", verb, target),
            _ => bail!("bad question {q:?}"),
        };
        let mut rest = &words[3..];
        let mut namespace = None;
        if let Some(i) = rest.iter().position(|w| *w == "-n") {
            namespace = rest.get(i + 1).map(|n| n.to_string());
            rest = &rest[..i];
        }
        let name = rest.first().map(|n| n.to_string());
        let (target, subresource) = match target.split_once('/') {
            Some((t, sub)) => (t, Some(sub.to_string())),
            None => (target, None),
        };
        let (resource, group) = target.split_once('.').unwrap_or((target, ""));
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{ns}:{sa}")),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource,
                    namespace,
                    name,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = api
            .create(&PostParams::default(), &sar)
            .await?
            .status
            .is_some_and(|s| s.allowed);
        if allowed != want {
            wrong.push(format!(
                "{q}: the server says {}",
                if allowed { "yes" } else { "no" }
            ));
        }
    }
    ensure!(wrong.is_empty(), "{ns}/{sa}:\n{}", wrong.join("\n"));
    Ok(())
}

/// A service account (and its namespace), waiting for its token.
async fn service_account(cluster: &Cluster, ns: &str, name: &str) -> anyhow::Result<String> {
    let admin = cluster.client().await;
    ensure_namespace(&admin, ns).await?;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}}))?;
    match Api::<ServiceAccount>::namespaced(admin, ns)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    cluster.service_account_token(ns, name).await
}

// ---------------------------------------------------------------------------------------
// The spoke agent installed by the Policy

/// The `kmm-spoke` binary next to this test's executable (target/<profile>/), built first;
/// cargo finds it up to date in the common case. `KMM_SPOKE_BIN` names a prebuilt one.
async fn spoke_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KMM_SPOKE_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in target/<profile>/deps")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => bail!("no profile directory"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = tokio::process::Command::new(cargo)
        .args([
            "build",
            "-p",
            "kmm-spoke",
            "--bin",
            "kmm-spoke",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(repo())
        .status()
        .await
        .context("running cargo build -p kmm-spoke")?;
    ensure!(status.success(), "cargo build -p kmm-spoke failed");
    let bin = profile_dir.join("kmm-spoke");
    ensure!(bin.is_file(), "{} missing after the build", bin.display());
    Ok(bin)
}

/// The agent's process, run as the Deployment would run it: its args, its environment
/// (downward-API fields resolved as the kubelet does), the ServiceAccount's token.
struct SpokeProcess {
    child: tokio::process::Child,
    admin: String,
    log: PathBuf,
}

impl SpokeProcess {
    fn start(
        bin: &Path,
        deployment: &Value,
        kubeconfig: &Path,
        pod_name: &str,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let c = container(deployment)?;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let value = match s(e, "/valueFrom/fieldRef/fieldPath") {
                "" => s(e, "/value").to_string(),
                "metadata.namespace" => s(deployment, "/metadata/namespace").to_string(),
                "metadata.name" => pod_name.to_string(),
                other => bail!("unsupported fieldRef {other}"),
            };
            env.insert(s(e, "/name").to_string(), value);
        }
        // Loopback only, on a free port, instead of 0.0.0.0:8081.
        let admin = format!("127.0.0.1:{}", kmm_e2e::process::free_port()?);
        env.insert("KMM_SPOKE_ADMIN_ADDRESS".into(), admin.clone());
        env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin)
            .args(args(c))
            .env_clear()
            .envs(&env)
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, admin, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stop(mut self) -> String {
        let _ = self.child.kill().await;
        self.log()
    }
}

async fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    Ok(kmm_e2e::process::http_get(addr, path).await?.0)
}

fn lab_module(image: &str) -> anyhow::Result<Module> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "kmm-ci-a", "namespace": MODULE_NS},
        "spec": {
            "selector": {"node-role.kubernetes.io/worker": ""},
            "moduleLoader": {"container": {
                "modprobe": {"moduleName": "kmm_ci_a"},
                "kernelMappings": [{"regexp": "^.*$", "containerImage": image}],
            }},
        },
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_installs_a_working_spoke_agent() -> anyhow::Result<()> {
    let policy_docs = kustomize("policy")?;
    let objects = policy_objects(&policy_docs)?;
    let deployment = find(&objects, "Deployment", "kmm-spoke")?.clone();
    let bin = spoke_binary().await?;
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .spoke_nodes(1, vec![worker_node("n1", K1), worker_node("n2", K2)])
        .run(async |fleet: &mut Fleet| {
            let admin = fleet.spoke(1).client().await;
            // On the hub, as a platform team does; the policy framework does the rest.
            let hub = fleet.hub().client().await;
            for d in &policy_docs {
                apply(&hub, d, false).await?;
            }
            policy_reaches_the_spoke(&hub, &admin, &objects).await?;
            wait_established(&admin, "modules.kmm.sigs.x-k8s.io").await?;

            let token = fleet
                .spoke(1)
                .service_account_token(SPOKE_NS, SPOKE_SA)
                .await?;
            let kubeconfig = fleet.dir().join("kmm-spoke.kubeconfig");
            token_kubeconfig(fleet.spoke(1), &token, &kubeconfig)?;
            let pod = "kmm-spoke-5d9c7b6f4-x2x7q";
            let agent = SpokeProcess::start(
                &bin,
                &deployment,
                &kubeconfig,
                pod,
                fleet.dir().join("kmm-spoke.log"),
            )?;
            let mut outcome = spoke_agent_works(fleet, &admin, &agent, pod).await;
            if outcome.is_ok() {
                outcome = lease_renewed(&admin, SPOKE_NS, "kmm-spoke").await;
            }
            let log = agent.stop().await;
            if outcome.is_err() {
                eprintln!("kmm-spoke log:\n{log}");
            }
            outcome?;
            // Every call the agent made was allowed.
            let denied: Vec<&str> = log
                .lines()
                .filter(|l| l.to_ascii_lowercase().contains("forbidden"))
                .collect();
            ensure!(
                denied.is_empty(),
                "the agent was denied:\n{}",
                denied.join("\n")
            );
            rbac_matches_what_the_binary_asked(
                fleet.spoke(1),
                &all_manifest_docs()?,
                (SPOKE_NS, SPOKE_SA),
                &[
                    // As for the hub: blockOwnerDeletion on the DaemonSets.
                    (
                        "ClusterRole/kmm-spoke",
                        "kmm.sigs.x-k8s.io modules/finalizers update",
                    ),
                    // Replaces an outdated loader pod (a re-pinned image, a new agent
                    // script), one node at a time; this run changes neither.
                    ("ClusterRole/kmm-spoke", "core pods delete"),
                    // Claims beyond the first are deleted when a cluster's kernels shrink
                    // to fewer claims.
                    (
                        "ClusterRole/kmm-spoke",
                        "cluster.open-cluster-management.io clusterclaims delete",
                    ),
                ],
            )
        })
        .await
}

/// Waits until the holder of a Lease has renewed it once (renewTime past acquireTime).
async fn lease_renewed(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    eventually("the Lease renewed", DEADLINE, || async {
        let spec = leases.get(name).await?.spec.unwrap_or_default();
        Ok(match (spec.acquire_time, spec.renew_time) {
            (Some(a), Some(r)) if r.0 > a.0 => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await
}

/// Waits until every object of the Policy exists on the spoke and the root Policy on the hub
/// reports the cluster Compliant.
async fn policy_reaches_the_spoke(
    hub: &Client,
    spoke: &Client,
    objects: &[Value],
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let policy_ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("policy.open-cluster-management.io", "v1", "Policy"),
        "policies",
    );
    let root: Api<DynamicObject> = Api::namespaced_with(hub.clone(), POLICY_NS, &policy_ar);
    loop {
        let mut missing = Vec::new();
        for o in objects {
            let (ar, namespaced) = api_resource(spoke, o).await?;
            let api: Api<DynamicObject> = match (namespaced, o["metadata"]["namespace"].as_str()) {
                (true, Some(ns)) => Api::namespaced_with(spoke.clone(), ns, &ar),
                _ => Api::all_with(spoke.clone(), &ar),
            };
            if api.get_opt(s(o, "/metadata/name")).await?.is_none() {
                missing.push(ident(o));
            }
        }
        let status = root
            .get_opt(POLICY)
            .await?
            .map(|p| p.data["status"].clone());
        let compliant = status
            .as_ref()
            .and_then(|s| s["status"].as_array())
            .is_some_and(|clusters| {
                clusters
                    .iter()
                    .any(|c| c["clustername"] == "spoke-1" && c["compliant"] == "Compliant")
            });
        if missing.is_empty() && compliant {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the Policy did not reach the spoke in 120 s: missing {missing:?}; root Policy status {status:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn spoke_agent_works(
    fleet: &Fleet,
    admin: &Client,
    agent: &SpokeProcess,
    pod: &str,
) -> anyhow::Result<()> {
    eventually("the agent ready", DEADLINE, || async {
        Ok(match http_status(&agent.admin, "/readyz").await {
            Ok(200) => Ok(()),
            Ok(code) => Err(format!("/readyz {code}; log: {}", agent.log())),
            Err(e) => Err(format!("{e:#}; log: {}", agent.log())),
        })
    })
    .await?;
    let lease = Api::<Lease>::namespaced(admin.clone(), SPOKE_NS)
        .get("kmm-spoke")
        .await
        .context("the agent's Lease in its namespace")?;
    ensure!(
        lease.spec.and_then(|s| s.holder_identity).as_deref() == Some(pod),
        "the Lease is held by the agent"
    );

    // Kernel facts: node labels and the ClusterClaim, which the hub then sees.
    let want = [K1, K2].join("\n");
    let claims: Api<ClusterClaim> = Api::all(admin.clone());
    eventually("the kernel ClusterClaim", DEADLINE, || async {
        Ok(match claims.get_opt(KERNEL_VERSIONS_CLAIM).await? {
            Some(c) if c.spec.value == want => Ok(()),
            other => Err(format!("{:?}", other.map(|c| c.spec.value))),
        })
    })
    .await?;
    for (node, kernel) in [("n1", K1), ("n2", K2)] {
        let n = Api::<Node>::all(admin.clone()).get(node).await?;
        ensure!(
            n.labels().get(KERNEL_LABEL) == Some(&kernel_label_value(kernel)),
            "{node} labelled with its kernel: {:?}",
            n.labels()
        );
    }
    let hub = fleet.hub().client().await;
    eventually(
        "the claim on the hub's ManagedCluster",
        DEADLINE,
        || async {
            let mc = Api::<ManagedCluster>::all(hub.clone())
                .get(&spoke_name(1))
                .await?;
            let claims = mc.status.map(|s| s.cluster_claims).unwrap_or_default();
            Ok(
                if claims
                    .iter()
                    .any(|c| c.name == KERNEL_VERSIONS_CLAIM && c.value == want)
                {
                    Ok(())
                } else {
                    Err(format!("{claims:?}"))
                },
            )
        },
    )
    .await?;

    // The work agent's ServiceAccount, with the Policy's binding, creates a Module; the
    // agent turns it into loader DaemonSets and the nodes load it.
    let work_token = service_account(fleet.spoke(1), WORK_NS, WORK_SA).await?;
    let work = fleet.spoke(1).client_for_token(&work_token).await?;
    ensure_namespace(admin, MODULE_NS).await?;
    let image = format!("{}/kmm/kmm-ci-a:v1", fleet.registry().host());
    push_kmod_image(
        &fleet.registry().access(),
        &image,
        &KmodImage::new(&[K1, K2], &["kmm_ci_a"]),
    )
    .await?;
    let modules: Api<Module> = Api::namespaced(work.clone(), MODULE_NS);
    modules
        .create(&PostParams::default(), &lab_module(&image)?)
        .await
        .context("the work agent's ServiceAccount creates a Module")?;
    for node in ["n1", "n2"] {
        eventually(&format!("kmm_ci_a loaded on {node}"), DEADLINE, || async {
            let got = fleet.node_sim(&spoke_name(1)).loaded_modules(node);
            Ok(if got == ["kmm_ci_a"] {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            })
        })
        .await?;
    }
    let m = eventually("the Module's status", DEADLINE, || async {
        let m = modules.get("kmm-ci-a").await?;
        Ok(match &m.status {
            Some(st) if st.module_loader.is_some() => Ok(m),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    ensure!(
        m.finalizers()
            .iter()
            .any(|f| f == shared_api::labels::MODULE_FINALIZER),
        "the agent's finalizer on the Module: {:?}",
        m.finalizers()
    );
    eventually("a ModuleLoaded event", DEADLINE, || async {
        let events = Api::<Event>::namespaced(admin.clone(), SPOKE_EVENTS_NS)
            .list(&ListParams::default())
            .await?;
        Ok(
            if events.items.iter().any(|e| {
                e.reason.as_deref() == Some(kmm_spoke::controller::events::MODULE_LOADED)
                    && e.reporting_controller.as_deref()
                        == Some(kmm_spoke::controller::events::REPORTING_CONTROLLER)
            }) {
                Ok(())
            } else {
                Err(format!("{} events", events.items.len()))
            },
        )
    })
    .await?;

    // Deleting it through the work agent: the agent removes its DaemonSets and finalizer.
    modules.delete("kmm-ci-a", &DeleteParams::default()).await?;
    eventually("the Module gone", DEADLINE, || async {
        Ok(match modules.get_opt("kmm-ci-a").await? {
            None => Ok(()),
            Some(m) => Err(format!("finalizers {:?}", m.finalizers())),
        })
    })
    .await?;
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.clone(), MODULE_NS);
    eventually("the loader DaemonSets gone", DEADLINE, || async {
        let left = daemonsets
            .list(&ListParams::default().labels(ROLE_LABEL))
            .await?;
        Ok(if left.items.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                left.items.iter().map(|d| d.name_any()).collect::<Vec<_>>()
            ))
        })
    })
    .await?;

    // What the live server says the agent and the work agent may (not) do.
    check_access(
        admin,
        (SPOKE_NS, SPOKE_SA),
        &[
            "no list secrets",
            "no get secrets any -n kmm-spoke",
            "no get secrets any -n kmm-labs",
            "no watch secrets -n kmm-labs",
            "yes patch clusterclaims.cluster.open-cluster-management.io kernel-versions.kmm.node.kubernetes.io",
            "yes create clusterclaims.cluster.open-cluster-management.io kernel-versions.kmm.node.kubernetes.io.9",
            "no create clusterclaims.cluster.open-cluster-management.io kernel-versions.kmm.node.kubernetes.io.10",
            "no patch clusterclaims.cluster.open-cluster-management.io id.k8s.io",
            "no create clusterclaims.cluster.open-cluster-management.io",
            "no delete clusterclaims.cluster.open-cluster-management.io id.k8s.io",
            "yes patch nodes n1",
            "no delete nodes n1",
            "no create pods -n kmm-labs",
            "yes patch daemonsets.apps x -n kmm-labs",
            "no patch deployments.apps x -n kmm-labs",
            "yes update leases.coordination.k8s.io kmm-spoke -n kmm-spoke",
            "no update leases.coordination.k8s.io x -n kube-node-lease",
            &format!("yes create events.events.k8s.io -n {SPOKE_EVENTS_NS}"),
            "no create events.events.k8s.io -n kmm-labs",
            "no create modules.kmm.sigs.x-k8s.io -n kmm-labs",
            "yes patch modules.kmm.sigs.x-k8s.io/status m -n kmm-labs",
            "yes update modules.kmm.sigs.x-k8s.io/finalizers m -n kmm-labs",
        ],
    )
    .await?;
    check_access(
        admin,
        (WORK_NS, WORK_SA),
        &[
            "yes create modules.kmm.sigs.x-k8s.io -n kmm-labs",
            "yes delete modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "no patch modules.kmm.sigs.x-k8s.io/status m -n kmm-labs",
            "no update modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "no create daemonsets.apps -n kmm-labs",
            "no get secrets any -n kmm-labs",
        ],
    )
    .await?;
    // The executor of the hub's works: exactly what the work agent checks for a Module the
    // work owns, and nothing a Module does not need.
    check_access(
        admin,
        (SPOKE_NS, "kmm-work-executor"),
        &[
            "yes create modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes get modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes update modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes patch modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "yes delete modules.kmm.sigs.x-k8s.io m -n kmm-labs",
            "no patch modules.kmm.sigs.x-k8s.io/status m -n kmm-labs",
            "no create clusterrolebindings.rbac.authorization.k8s.io x",
            "no create daemonsets.apps -n kmm-labs",
            "no create namespaces x",
            "no create serviceaccounts -n kmm-labs",
            "no get secrets any -n kmm-labs",
        ],
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The hub under its own RBAC

async fn http_get_bearer(addr: &str, path: &str, token: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))
}

async fn put(client: &Client, doc: Value) -> anyhow::Result<()> {
    apply(client, &doc, false).await
}

fn mcm(name: &str, mapping: Value) -> Value {
    json!({
        "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
        "metadata": {"name": name},
        "spec": {"spokeNamespace": MODULE_NS, "selector": {},
            "moduleSpec": {"selector": {"node-role.kubernetes.io/worker": ""},
                "imageRepoSecret": {"name": "registry-pull"},
                "moduleLoader": {"container": {"modprobe": {"moduleName": "kmm_ci_a"}, "kernelMappings": [mapping]}}}}
    })
}

async fn mcm_status(hub: &Client, name: &str) -> anyhow::Result<ManagedClusterModule> {
    Ok(Api::<ManagedClusterModule>::all(hub.clone())
        .get(name)
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_runs_under_its_own_rbac() -> anyhow::Result<()> {
    let mut docs = kustomize("hub")?;
    docs.extend(kustomize("hub-builds")?);
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    Fleet::builder()
        .spokes(1)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), K1)])
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            let admin = fleet.hub().client().await;
            // Everything but the Deployment (the hub runs in this process instead) and the
            // webhook registration (its Service has no endpoints in the test world).
            for d in docs.iter().filter(|d| {
                !matches!(
                    s(d, "/kind"),
                    "Deployment" | "ValidatingWebhookConfiguration"
                )
            }) {
                apply(&admin, d, false).await?;
            }
            let token = fleet.hub().service_account_token(HUB_NS, HUB_SA).await?;
            let kubeconfig = fleet.dir().join("kmm-hub.kubeconfig");
            token_kubeconfig(fleet.hub(), &token, &kubeconfig)?;
            let config = fleet.dir().join("kmm-hub-config.yaml");
            std::fs::write(
                &config,
                s(
                    find(&docs, "ConfigMap", "kmm-hub-config")?,
                    "/data/config.yaml",
                ),
            )?;

            // What an admin provides: the pull secret and a Dockerfile in the hub's
            // namespace, an image for the spoke's kernel, the spoke's kernel claim.
            let mut secret = serde_json::to_value(
                fleet
                    .registry()
                    .dockerconfigjson_secret("registry-pull", HUB_NS),
            )?;
            secret["apiVersion"] = json!("v1");
            secret["kind"] = json!("Secret");
            put(&admin, secret).await?;
            put(
                &admin,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "broken", "namespace": HUB_NS},
                "data": {"dockerfile": "FROM docker.io/redhat/ubi8-minimal\nRUN exit 3\n"}}),
            )
            .await?;
            let image = format!("{}/kmm/kmm-ci-a:{K1}", fleet.registry().host());
            push_kmod_image(
                &fleet.registry().access(),
                &image,
                &KmodImage::new(&[K1], &["kmm_ci_a"]),
            )
            .await?;
            let spoke = fleet.spoke(1).client().await;
            put(
                &spoke,
                json!({"apiVersion": "cluster.open-cluster-management.io/v1alpha1",
                "kind": "ClusterClaim", "metadata": {"name": KERNEL_VERSIONS_CLAIM},
                "spec": {"value": K1}}),
            )
            .await?;

            let dashboard: std::net::SocketAddr =
                format!("127.0.0.1:{}", kmm_e2e::process::free_port()?).parse()?;
            let mut o = HubOptions::new(kubeconfig, HUB_NS);
            o.config = Some(config);
            o.dashboard = Some(dashboard);
            o.resync = Duration::from_secs(5);
            let hub_proc = HubProcess::start(o)?;
            // The dashboard takes only tokens issued for its audience.
            let dashboard_token = fleet
                .hub()
                .service_account_token_for(
                    HUB_NS,
                    HUB_SA,
                    Some(kmm_hub::dashboard::auth::DEFAULT_AUDIENCE),
                )
                .await?;
            let outcome = hub_works(fleet, &admin, &hub_proc, &dashboard_token, dashboard).await;
            hub_proc.stop().await;
            outcome?;
            rbac_matches_what_the_binary_asked(
                fleet.hub(),
                &all_manifest_docs()?,
                (HUB_NS, HUB_SA),
                &[
                    // OwnerReferencesPermissionEnforcement (on OpenShift) checks it when the
                    // hub sets blockOwnerDeletion on a work; that check is no request.
                    (
                        "ClusterRole/kmm-hub",
                        "hub.kmm.sigs.x-k8s.io managedclustermodules/finalizers update",
                    ),
                    // kube-runtime's Recorder patches an event that repeats into a series.
                    ("Role/kmm-hub-events", "events.k8s.io events patch"),
                    // OCM's work webhook asks (SubjectAccessReview) whether the hub may
                    // execute-as the works' executor; the hub itself makes no such request.
                    (
                        "ClusterRole/kmm-hub",
                        "work.open-cluster-management.io manifestworks execute-as",
                    ),
                ],
            )
        })
        .await
}

async fn hub_works(
    fleet: &Fleet,
    admin: &Client,
    hub_proc: &HubProcess,
    token: &str,
    dashboard: std::net::SocketAddr,
) -> anyhow::Result<()> {
    // Ready: caches synced (ManagedClusters, ManifestWorks, Jobs) and the Lease held.
    let admin_addr = hub_proc.admin.to_string();
    eventually("the hub ready", DEADLINE, || async {
        Ok(match http_status(&admin_addr, "/readyz").await {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;

    // A prebuilt image: a finalizer, a digest read with the pull secret, a ManifestWork
    // created in the cluster's namespace, the status.
    let host = fleet.registry().host();
    put(
        admin,
        mcm(
            "prebuilt",
            json!({"regexp": "^.*$", "containerImage": format!("{host}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}")}),
        ),
    )
    .await?;
    let works: Api<ManifestWork> = Api::namespaced(admin.clone(), &spoke_name(1));
    eventually("the ManifestWork", DEADLINE, || async {
        let list = works
            .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}=prebuilt")))
            .await?;
        Ok(if list.items.len() == 1 {
            Ok(())
        } else {
            Err(format!("{} works", list.items.len()))
        })
    })
    .await?;
    eventually("the prebuilt MCM's status", DEADLINE, || async {
        let m = mcm_status(admin, "prebuilt").await?;
        let st = m.status.clone().unwrap_or_default();
        Ok(
            if !m.finalizers().is_empty()
                && st.number_desired == 1
                && st
                    .images
                    .iter()
                    .all(|i| i.state == shared_api::mcm::ImageState::Ready)
            {
                Ok(())
            } else {
                Err(format!("finalizers {:?}, {st:?}", m.finalizers()))
            },
        )
    })
    .await?;

    // A build that fails: a Job from the Dockerfile ConfigMap, the failed pod's message in
    // the status, events about the cluster-scoped MCM in `default`.
    put(
        admin,
        mcm(
            "broken",
            json!({"regexp": "^.*$", "containerImage": format!("{host}/kmm/broken:${{KERNEL_FULL_VERSION}}"),
                "build": {"dockerfileConfigMap": {"name": "broken"}}}),
        ),
    )
    .await?;
    let reason = eventually("the build failure in status", DEADLINE, || async {
        let st = mcm_status(admin, "broken")
            .await?
            .status
            .unwrap_or_default();
        Ok(match st.images.first() {
            Some(i) if i.state == shared_api::mcm::ImageState::Failed => {
                Ok(i.reason.clone().unwrap_or_default())
            }
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    let note = eventually("a BuildFailed event", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(
            match list
                .items
                .iter()
                .find(|e| e.reason.as_deref() == Some("BuildFailed"))
            {
                Some(e) => Ok(e.note.clone().unwrap_or_default()),
                None => Err(format!("{} events", list.items.len())),
            },
        )
    })
    .await?;
    // "the build pod failed" would mean the pods could not be listed.
    ensure!(
        note.contains("exit") && !note.contains("the build pod failed"),
        "the failed pod's message in the event: {note:?} (status: {reason:?})"
    );

    // Fixing the Dockerfile restarts the build at once: the failed Job is deleted, not
    // left to its backoff.
    let jobs: Api<Job> = Api::all(admin.clone());
    let failed: BTreeSet<String> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|j| j.metadata.uid.clone())
        .collect();
    ensure!(!failed.is_empty(), "no build Job for the broken MCM");
    put(
        admin,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "broken", "namespace": HUB_NS},
        "data": {"dockerfile": "FROM docker.io/redhat/ubi8-minimal\nRUN exit 4\n"}}),
    )
    .await?;
    eventually("the failed build Job replaced", DEADLINE, || async {
        let now: BTreeSet<String> = jobs
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|j| j.metadata.uid.clone())
            .collect();
        Ok(if now.is_disjoint(&failed) {
            Ok(())
        } else {
            Err(format!("jobs {now:?}"))
        })
    })
    .await?;

    // The dashboard reviews tokens: the hub's own account (with a token for the dashboard's
    // audience) may list MCMs; nobody's token does not even authenticate.
    let addr = dashboard.to_string();
    let path = "/api/v1/managedclustermodules";
    eventually("the dashboard answers", DEADLINE, || async {
        Ok(match http_get_bearer(&addr, path, token).await {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let nobody = http_get_bearer(&addr, path, fleet.hub().nobody_token()).await?;
    // A static token is not issued for the dashboard's audience: unauthenticated.
    ensure!(nobody == 401, "nobody gets {nobody} from the dashboard");

    // Deleting the MCM: its work deleted, then the finalizer released.
    Api::<ManagedClusterModule>::all(admin.clone())
        .delete("prebuilt", &DeleteParams::default())
        .await?;
    eventually("the prebuilt MCM and its work gone", DEADLINE, || async {
        let m = Api::<ManagedClusterModule>::all(admin.clone())
            .get_opt("prebuilt")
            .await?;
        let w = works
            .list(&ListParams::default().labels(&format!("{MCM_OWNER_LABEL}=prebuilt")))
            .await?;
        Ok(if m.is_none() && w.items.is_empty() {
            Ok(())
        } else {
            Err(format!("mcm {}, {} works", m.is_some(), w.items.len()))
        })
    })
    .await?;

    check_access(
        admin,
        (HUB_NS, HUB_SA),
        &[
            "yes list secrets -n kmm-hub",
            "yes watch secrets -n kmm-hub",
            "no list secrets -n default",
            "no get secrets registry-pull -n default",
            "no get secrets x -n spoke-1",
            "no watch secrets",
            "no get configmaps x -n default",
            "yes create jobs.batch -n kmm-hub-builds",
            "no create jobs.batch -n kmm-hub",
            "no create jobs.batch -n default",
            "yes patch secrets x -n kmm-hub-builds",
            "no get secrets x -n kmm-hub-builds",
            "no create pods -n kmm-hub-builds",
            "no create pods -n kmm-hub",
            "yes create events.events.k8s.io -n default",
            "no create events.events.k8s.io -n kmm-hub",
            "no update managedclustermodules.hub.kmm.sigs.x-k8s.io x",
            "no create managedclustermodules.hub.kmm.sigs.x-k8s.io",
            "no delete managedclustermodules.hub.kmm.sigs.x-k8s.io x",
            "no delete managedclusters.cluster.open-cluster-management.io spoke-1",
            "yes create manifestworks.work.open-cluster-management.io -n spoke-1",
            &format!(
                "yes execute-as manifestworks.work.open-cluster-management.io {} -n spoke-1",
                executor_user()
            ),
            "no execute-as manifestworks.work.open-cluster-management.io system:serviceaccount:open-cluster-management-agent:klusterlet-work-sa -n spoke-1",
            "no execute-as manifestworks.work.open-cluster-management.io system:serviceaccount:kube-system:default -n spoke-1",
            "no create modules.kmm.sigs.x-k8s.io -n kmm-labs",
        ],
    )
    .await?;
    Ok(())
}
