//! Checks of the manifests that start nothing: RBAC, the Deployments against their binaries'
//! flags, and the Policy against the spoke manifests (drift check of `just generate`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail, ensure};
use clap::{CommandFactory as _, Parser as _};
use serde_json::{Value, json};

use crate::manifests::{
    all_manifest_docs, args, container, find, ident, kustomize, policy_objects, repo, s, yaml_docs,
};
use crate::rbac::shipped_roles;
use crate::{BUILD_NS, HUB_NS, HUB_SA, POLICY, POLICY_NS, SPOKE_EVENTS_NS, SPOKE_NS, SPOKE_SA};

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
    // secrets, and only in its own namespace(s), never cluster-wide. The one exception is the
    // work executor's grant for the pull-secret copies (spokePrerequisites.pullSecret): a
    // SubjectAccessReview subject with no token, separately bound so it can be removed.
    for (key, (ns, grants)) in &roles {
        let secrets: Vec<&String> = grants
            .iter()
            .filter(|g| g.starts_with("core secrets "))
            .collect();
        if secrets.is_empty() || key == "ClusterRole/kmm-work-executor-pull-secrets" {
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

fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| s(e, "/name") == name)
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
pub(crate) fn volume_for<'a>(d: &'a Value, file: &str) -> anyhow::Result<(&'a Value, String)> {
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

#[test]
fn policy_yaml_is_generated_from_the_spoke_manifests() -> anyhow::Result<()> {
    let (want, _) = kmm_e2e::manifests::generate_policy()?;
    let path = repo().join(kmm_e2e::manifests::POLICY_FILE);
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
             `just generate`"
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
            "Namespace"
                | "CustomResourceDefinition"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "ValidatingWebhookConfiguration"
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
