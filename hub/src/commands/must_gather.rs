//! `kmm-hub must-gather`: the hub's support bundle (see docs/operations.md, "Support bundle").
//! What is read: ManagedClusterModules, the ManifestWorks of MCMs with their status,
//! ManagedClusters (claims), the build Jobs and the logs of their pods, events in the hub's
//! namespaces and about MCMs, the hub's Deployment, pods and logs, ConfigMaps, and the
//! Secrets of the hub's namespaces as names. Secrets anywhere else are never read.

use kmm_runtime::gather::collect::{CONFIG_MAP, DEPLOYMENT, JOB, Kind, Scope, keep};
use kmm_runtime::gather::{Bundle, GatherArgs, Gatherer, Written};
use kube::ResourceExt;
use shared_api::ManagedClusterModule;
use shared_api::labels::MCM_OWNER_LABEL;

/// The namespace of manifests/hub.
pub const DEFAULT_NAMESPACE: &str = "kmm-hub";

const MCM: Kind = Kind::new(
    "hub.kmm.sigs.x-k8s.io",
    "v1beta1",
    "ManagedClusterModule",
    "managedclustermodules",
);
const MANIFEST_WORK: Kind = Kind::new(
    "work.open-cluster-management.io",
    "v1",
    "ManifestWork",
    "manifestworks",
);
const MANAGED_CLUSTER: Kind = Kind::new(
    "cluster.open-cluster-management.io",
    "v1",
    "ManagedCluster",
    "managedclusters",
);

/// `kmm-hub must-gather` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct MustGatherArgs {
    #[command(flatten)]
    pub gather: GatherArgs,
    /// The namespace of build Jobs [default: `<namespace>-builds`].
    #[arg(long)]
    pub build_namespace: Option<String>,
}

/// Gather the hub into the bundle directory (and tarball).
pub async fn run(args: &MustGatherArgs) -> anyhow::Result<Written> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = args
        .gather
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let builds = args
        .build_namespace
        .clone()
        .unwrap_or_else(|| format!("{ns}-builds"));
    let client = kmm_runtime::gather::client(args.gather.kubeconfig.as_deref()).await?;
    let bundle = Bundle::create(&args.gather.output_dir(), "kmm-hub must-gather")?;
    let mut g = Gatherer::new(client, bundle, args.gather.since);
    g.bundle
        .note(format!("hub namespace: {ns}, build namespace: {builds}"));

    let mcms = g.objects(MCM, Scope::All, None, keep).await;
    for o in &mcms {
        let line = serde_json::to_value(o)
            .ok()
            .and_then(|v| serde_json::from_value::<ManagedClusterModule>(v).ok())
            .map(|m| mcm_line(&m))
            .unwrap_or_else(|| format!("MCM {}: status unreadable", o.name_any()));
        g.bundle.note(line);
    }
    g.objects(MANIFEST_WORK, Scope::All, Some(MCM_OWNER_LABEL), keep)
        .await;
    g.objects(MANAGED_CLUSTER, Scope::All, None, keep).await;

    g.objects(JOB, Scope::Namespace(&builds), None, keep).await;
    g.pods_with_logs(Scope::Namespace(&builds), None).await;

    g.objects(DEPLOYMENT, Scope::Namespace(&ns), None, keep)
        .await;
    g.pods_with_logs(Scope::Namespace(&ns), None).await;
    for n in [&ns, &builds] {
        g.objects(CONFIG_MAP, Scope::Namespace(n), None, keep).await;
        g.secret_names(n).await;
        g.events(n, None, None).await;
    }
    // Events of cluster-scoped MCMs live in `default`.
    g.events(
        "default",
        Some("involvedObject.kind=ManagedClusterModule"),
        Some("managedclustermodules"),
    )
    .await;
    Ok(g.bundle.finish(args.gather.tar)?)
}

/// One line per MCM for the summary: counts, conditions and the reasons of images and
/// clusters that are not fine.
pub fn mcm_line(m: &ManagedClusterModule) -> String {
    let mut s = format!("MCM {}:", m.name_any());
    let Some(st) = &m.status else {
        return s + " no status yet";
    };
    s.push_str(&format!(
        " desired {} applied {} available {} degraded {}",
        st.number_desired, st.number_applied, st.number_available, st.number_degraded
    ));
    for c in &st.conditions {
        s.push_str(&format!(
            "\n  condition {}={} {}: {}",
            c.type_, c.status, c.reason, c.message
        ));
    }
    for i in &st.images {
        if let Some(r) = &i.reason {
            s.push_str(&format!(
                "\n  image {} ({}) {}: {r}",
                i.image,
                i.kernel,
                i.state.as_str()
            ));
        }
    }
    for c in &st.clusters {
        s.push_str(&format!(
            "\n  cluster {} {}: {}",
            c.name, c.reason, c.message
        ));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_names_the_failure() {
        let m: ManagedClusterModule = serde_json::from_value(serde_json::json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": "broken"},
            "spec": {"spokeNamespace": "labs", "selector": {}, "moduleSpec": {"selector": {}}},
            "status": {"numberDesired": 1,
                "images": [{"image": "r/x:k", "kernel": "k", "state": "Missing",
                    "reason": "image r/x:k does not exist and there is no build", "clusters": 1}],
                "clusters": [{"name": "spoke-1", "reason": "ImageMissing", "message": "waiting"}]}
        }))
        .unwrap();
        let line = mcm_line(&m);
        assert!(
            line.starts_with("MCM broken: desired 1 applied 0"),
            "{line}"
        );
        assert!(
            line.contains("image r/x:k (k) Missing: image r/x:k does not exist"),
            "{line}"
        );
        assert!(
            line.contains("cluster spoke-1 ImageMissing: waiting"),
            "{line}"
        );
    }
}
