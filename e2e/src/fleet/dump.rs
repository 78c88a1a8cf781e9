//! Rendering a fleet's state as text for failing tests ([`super::Fleet::dump`]);
//! tolerant of anything missing or malformed.

use std::fmt::Write as _;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Resource as _;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};

use crate::cluster::Cluster;

pub(super) async fn cluster(c: &Cluster, hub: bool) -> String {
    let client = c.client().await;
    let mut out = String::new();
    let _ = writeln!(out, "==== cluster {} ({})", c.name(), c.server_url());

    let _ = writeln!(out, "-- nodes");
    match Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for n in list {
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.status.clone())
                    .unwrap_or_else(|| "?".into());
                let kernel = n
                    .status
                    .as_ref()
                    .and_then(|s| s.node_info.as_ref())
                    .map(|i| i.kernel_version.clone())
                    .unwrap_or_default();
                let taints: Vec<String> = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .map(|ts| {
                        ts.iter()
                            .map(|t| format!("{}:{}", t.key, t.effect))
                            .collect()
                    })
                    .unwrap_or_default();
                let labels = fmt_map(n.metadata.labels.as_ref());
                let _ = writeln!(
                    out,
                    "  {} ready={ready} kernel={kernel} taints={taints:?}\n    labels {labels}",
                    n.metadata.name.unwrap_or_default()
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  (cannot list: {e})");
        }
    }

    let _ = writeln!(out, "-- daemonsets");
    match Api::<DaemonSet>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for d in list {
                let s = d.status.unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {}/{} desired={} scheduled={} ready={} available={} selector={}",
                    d.metadata.namespace.unwrap_or_default(),
                    d.metadata.name.unwrap_or_default(),
                    s.desired_number_scheduled,
                    s.current_number_scheduled,
                    s.number_ready,
                    s.number_available.unwrap_or(0),
                    fmt_map(
                        d.spec
                            .and_then(|s| s.template.spec)
                            .and_then(|s| s.node_selector)
                            .as_ref()
                    ),
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  (cannot list: {e})");
        }
    }

    let _ = writeln!(out, "-- pods");
    match Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for p in list {
                let spec_node = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_else(|| "-".into());
                let st = p.status.unwrap_or_default();
                let containers: Vec<String> = st
                    .container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .map(|cs| {
                        let state = cs.state.unwrap_or_default();
                        let detail = if let Some(w) = state.waiting {
                            format!(
                                "waiting {} {}",
                                w.reason.unwrap_or_default(),
                                w.message.unwrap_or_default()
                            )
                        } else if let Some(t) = state.terminated {
                            format!(
                                "terminated {} exit={}",
                                t.reason.unwrap_or_default(),
                                t.exit_code
                            )
                        } else if state.running.is_some() {
                            "running".into()
                        } else {
                            "?".into()
                        };
                        format!("{}(ready={}, {})", cs.name, cs.ready, detail.trim())
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "  {}/{} phase={} node={spec_node} {}",
                    p.metadata.namespace.unwrap_or_default(),
                    p.metadata.name.unwrap_or_default(),
                    st.phase.unwrap_or_default(),
                    containers.join(" "),
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  (cannot list: {e})");
        }
    }

    let mut kinds = vec![("modules", ApiResource::erase::<shared_api::Module>(&()))];
    if hub {
        kinds.push((
            "managedclustermodules",
            ApiResource::erase::<shared_api::ManagedClusterModule>(&()),
        ));
        kinds.push((
            "managedclusters",
            ApiResource::erase::<shared_api::ManagedCluster>(&()),
        ));
        kinds.push((
            "manifestworks",
            ApiResource::erase::<shared_api::ManifestWork>(&()),
        ));
    }
    for (title, ar) in kinds {
        let _ = writeln!(out, "-- {title}");
        match Api::<DynamicObject>::all_with(client.clone(), &ar)
            .list(&ListParams::default())
            .await
        {
            Ok(list) => {
                for o in list {
                    out.push_str(&custom_object(&o));
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  (cannot list: {e})");
            }
        }
    }

    let _ = writeln!(out, "-- events (last 60)");
    match Api::<Event>::all(client).list(&ListParams::default()).await {
        Ok(list) => {
            let mut events: Vec<Event> = list.items;
            events.sort_by_key(|e| {
                e.last_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .or(e.event_time.as_ref().map(|t| t.0))
            });
            for e in &events[events.len().saturating_sub(60)..] {
                let obj = &e.involved_object;
                let _ = writeln!(
                    out,
                    "  {} {} {}/{}/{}: {} (x{})",
                    e.type_.as_deref().unwrap_or(""),
                    e.reason.as_deref().unwrap_or(""),
                    obj.kind.as_deref().unwrap_or(""),
                    obj.namespace.as_deref().unwrap_or(""),
                    obj.name.as_deref().unwrap_or(""),
                    e.message.as_deref().unwrap_or("").trim(),
                    e.count.unwrap_or(1),
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  (cannot list: {e})");
        }
    }
    out
}

fn custom_object(o: &DynamicObject) -> String {
    let meta = o.meta();
    let ns = meta
        .namespace
        .as_deref()
        .map(|n| format!("{n}/"))
        .unwrap_or_default();
    let mut s = format!(
        "  {ns}{} gen={} labels {}\n",
        meta.name.as_deref().unwrap_or(""),
        meta.generation.unwrap_or(0),
        fmt_map(meta.labels.as_ref())
    );
    let status = o.data.get("status");
    if let Some(conds) = status
        .and_then(|s| s.get("conditions"))
        .and_then(|c| c.as_array())
    {
        for c in conds {
            let f = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            let _ = writeln!(
                s,
                "    {}={} {} {}",
                f("type"),
                f("status"),
                f("reason"),
                f("message")
            );
        }
    }
    if let Some(status) = status {
        let mut rest = status.clone();
        if let Some(m) = rest.as_object_mut() {
            m.remove("conditions");
        }
        if rest.as_object().is_some_and(|m| !m.is_empty()) {
            let text = rest.to_string();
            let cut: String = text.chars().take(600).collect();
            let _ = writeln!(
                s,
                "    status {cut}{}",
                if text.len() > cut.len() { " …" } else { "" }
            );
        }
    }
    s
}

fn fmt_map(m: Option<&std::collections::BTreeMap<String, String>>) -> String {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    })
    .unwrap_or_default()
}
