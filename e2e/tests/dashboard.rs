//! The hub dashboard against a real control plane: TokenReview/SubjectAccessReview decide
//! who may read (a user without RBAC gets 403, a ServiceAccount bound to a viewer ClusterRole
//! gets 200), the numbers match the ManifestWorks, and a headless Chromium driven over the
//! DevTools protocol signs in, sees the clusters of an MCM and a newly selected cluster
//! appear without a reload.
//!
//! The spoke agent is not run here: its Module status report (the ManifestWork feedback) is
//! written directly on the spokes, so the numbers are known.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kmm_e2e::fleet::{Fleet, spoke_name, worker_node};
use kmm_e2e::oci::{KmodImage, push_kmod_image};
use kmm_e2e::process::free_port;
use kmm_e2e::testkit::{HubOptions, HubProcess, eventually, put_pull_secret, set_kernel_claim};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use shared_api::ocm::{ManifestWork, work_conditions};
use shared_api::{ManagedCluster, ManagedClusterModule, Module};

const HUB_NS: &str = "kmm-hub";
const SPOKE_NS: &str = "kmm-labs";
const PULL_SECRET: &str = "registry-pull";
const KERNEL: &str = "5.14.0-284.36.1.el9_2.x86_64";
const MCM: &str = "kmm-dash";
const VIEWER_SA: &str = "dashboard-viewer";
const SELECT: (&str, &str) = ("dashboard", "yes");

// ---- the hub, in-process, with its dashboard -------------------------------------------

/// The hub with its dashboard on a free loopback port; the dashboard's base URL.
fn start_hub(fleet: &Fleet) -> anyhow::Result<(HubProcess, String)> {
    let dashboard: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let hub = HubProcess::start(HubOptions {
        dashboard: Some(dashboard),
        leader_elect: false,
        ..HubOptions::new(fleet.hub().kubeconfig_path(), HUB_NS)
    })?;
    Ok((hub, format!("http://{dashboard}")))
}

// ---- fleet preparation ----------------------------------------------------------------

async fn apply<K>(api: Api<K>, obj: Value) -> anyhow::Result<()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj)?;
    let name = obj.name_any();
    api.patch(
        &name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .with_context(|| format!("applying {name}"))?;
    Ok(())
}

/// Hub namespace and pull secret, spoke namespaces and kernel claims, the module image.
async fn prepare(fleet: &Fleet) -> anyhow::Result<()> {
    let hub = fleet.hub().client().await;
    apply(
        Api::<Namespace>::all(hub.clone()),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": HUB_NS}}),
    )
    .await?;
    put_pull_secret(&hub, fleet.registry(), PULL_SECRET, HUB_NS).await?;
    for spoke in fleet.spokes() {
        let client = spoke.client().await;
        apply(
            Api::<Namespace>::all(client.clone()),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SPOKE_NS}}),
        )
        .await?;
        set_kernel_claim(&client, &[KERNEL]).await?;
    }
    let image = image(fleet);
    push_kmod_image(
        &fleet.registry().access(),
        &image,
        &KmodImage::new(&[KERNEL], &["kmm_ci_a"]),
    )
    .await?;
    Ok(())
}

fn image(fleet: &Fleet) -> String {
    format!("{}/kmm/kmm-ci-a:{KERNEL}", fleet.registry().host())
}

async fn apply_mcm(fleet: &Fleet) -> anyhow::Result<()> {
    let host = fleet.registry().host();
    apply(
        Api::<ManagedClusterModule>::all(fleet.hub().client().await),
        json!({
            "apiVersion": "hub.kmm.sigs.x-k8s.io/v1beta1", "kind": "ManagedClusterModule",
            "metadata": {"name": MCM},
            "spec": {
                "spokeNamespace": SPOKE_NS,
                "selector": {SELECT.0: SELECT.1},
                "moduleSpec": {
                    "selector": {"node-role.kubernetes.io/worker": ""},
                    "imageRepoSecret": {"name": PULL_SECRET},
                    "moduleLoader": {"container": {
                        "modprobe": {"moduleName": "kmm_ci_a"},
                        "kernelMappings": [{"regexp": "^.*$", "containerImage": format!("{host}/kmm/kmm-ci-a:${{KERNEL_FULL_VERSION}}")}]
                    }}
                }
            }
        }),
    )
    .await
}

/// Put spoke `n` under the MCM's selector.
async fn select_spoke(fleet: &Fleet, n: usize) -> anyhow::Result<()> {
    Api::<ManagedCluster>::all(fleet.hub().client().await)
        .patch(
            &spoke_name(n),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {SELECT.0: SELECT.1}}})),
        )
        .await?;
    Ok(())
}

const AUDIENCE: &str = kmm_hub::dashboard::auth::DEFAULT_AUDIENCE;

/// A ServiceAccount on the hub bound to a ClusterRole with `rules`; its token for the
/// dashboard's audience (as `kubectl create token SA --audience kmm-fleet-dashboard`).
async fn service_account(fleet: &Fleet, name: &str, rules: Value) -> anyhow::Result<String> {
    let hub = fleet.hub().client().await;
    apply(
        Api::<ServiceAccount>::namespaced(hub.clone(), HUB_NS),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": HUB_NS}}),
    )
    .await?;
    apply(
        Api::<ClusterRole>::all(hub.clone()),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
            "rules": rules}),
    )
    .await?;
    apply(
        Api::<ClusterRoleBinding>::all(hub.clone()),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": HUB_NS}]}),
    )
    .await?;
    fleet
        .hub()
        .service_account_token_for(HUB_NS, name, Some(AUDIENCE))
        .await
}

/// A viewer that may read MCMs and ManagedClusters: its dashboard token.
async fn viewer_token(fleet: &Fleet) -> anyhow::Result<String> {
    service_account(
        fleet,
        VIEWER_SA,
        json!([
            {"apiGroups": ["hub.kmm.sigs.x-k8s.io"], "resources": ["managedclustermodules"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["cluster.open-cluster-management.io"], "resources": ["managedclusters"], "verbs": ["get", "list", "watch"]},
        ]),
    )
    .await
}

/// A stream ticket for `token`.
async fn stream_ticket(base: &str, token: &str) -> anyhow::Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/v1/stream/tickets"))
        .bearer_auth(token)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, serde_json::from_str(&resp.text().await?)?))
}

/// What the spoke agent would report once the loader pods run: `nodes` of `nodes` available.
async fn report_module_status(fleet: &Fleet, n: usize, nodes: i32) -> anyhow::Result<()> {
    let modules: Api<Module> = Api::namespaced(fleet.spoke(n).client().await, SPOKE_NS);
    eventually(
        &format!("the Module on {}", spoke_name(n)),
        Duration::from_secs(60),
        || async {
            Ok(match modules.get_opt(MCM).await? {
                Some(_) => Ok(()),
                None => Err("not delivered yet".to_string()),
            })
        },
    )
    .await?;
    let numbers = json!({"nodesMatchingSelectorNumber": nodes, "desiredNumber": nodes, "availableNumber": nodes});
    modules
        .patch_status(
            MCM,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"moduleLoader": numbers}})),
        )
        .await?;
    Ok(())
}

// ---- the dashboard over HTTP ----------------------------------------------------------

async fn get(base: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).with_context(|| format!("{path}: not JSON: {text}"))?,
    ))
}

/// Compare the dashboard's view of the MCM with the ManifestWorks and the MCM status as the
/// API server has them; the first difference, if any.
async fn compare_with_api(
    fleet: &Fleet,
    base: &str,
    token: &str,
) -> anyhow::Result<Result<Value, String>> {
    let hub = fleet.hub().client().await;
    let (status, detail) = get(
        base,
        &format!("/api/v1/managedclustermodules/{MCM}"),
        Some(token),
    )
    .await?;
    if status != 200 {
        return Ok(Err(format!("HTTP {status}: {detail}")));
    }
    let works = Api::<ManifestWork>::all(hub.clone())
        .list(&ListParams::default().labels(&format!(
            "kmm.node.kubernetes.io/managedclustermodule.name={MCM}"
        )))
        .await?;
    let mcm = Api::<ManagedClusterModule>::all(hub).get(MCM).await?;
    let s = mcm.status.unwrap_or_default();
    let counts = json!({"desired": s.number_desired, "applied": s.number_applied, "available": s.number_available, "degraded": s.number_degraded});
    let mut shown = detail["counts"].clone();
    if let Some(o) = shown.as_object_mut() {
        o.remove("selected");
    }
    if shown != counts {
        return Ok(Err(format!("counts {shown} != status {counts}")));
    }
    let clusters: BTreeMap<String, Value> = detail["clusters"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| (c["name"].as_str().unwrap_or("").to_string(), c.clone()))
                .collect()
        })
        .unwrap_or_default();
    if clusters.len() != works.items.len() {
        return Ok(Err(format!(
            "{} clusters shown, {} ManifestWorks",
            clusters.len(),
            works.items.len()
        )));
    }
    for w in &works.items {
        let ns = w.namespace().unwrap_or_default();
        let Some(c) = clusters.get(&ns) else {
            return Ok(Err(format!("no cluster {ns} shown")));
        };
        let ws = w.status.clone().unwrap_or_default();
        let feedback = |f: &str| ws.feedback_integer(&format!("moduleLoader.{f}"));
        let expected = json!({
            "applied": ws.condition_true(work_conditions::APPLIED),
            "available": ws.condition_true(work_conditions::AVAILABLE),
            "degraded": ws.condition_true(work_conditions::DEGRADED),
            "moduleLoader": {"nodesMatching": feedback("nodesMatchingSelectorNumber"), "desired": feedback("desiredNumber"), "available": feedback("availableNumber")},
            "conditions": ws.conditions.iter().map(|c| format!("{}={}", c.type_, c.status)).collect::<Vec<_>>(),
        });
        let work = &c["work"];
        let seen = json!({
            "applied": work["applied"], "available": work["available"], "degraded": work["degraded"],
            "moduleLoader": work["feedback"]["moduleLoader"],
            "conditions": work["conditions"].as_array().map(|cs| cs.iter().map(|c| format!("{}={}", c["type"].as_str().unwrap_or(""), c["status"].as_str().unwrap_or(""))).collect::<Vec<_>>()),
        });
        if seen != expected {
            return Ok(Err(format!(
                "{ns}: dashboard {seen} != ManifestWork {expected}"
            )));
        }
        let module = kmm_hub::render::module_manifest(w).context("no Module in the work")?;
        let module: Module = serde_json::from_value(module.clone())?;
        let shipped: Vec<String> = module
            .spec
            .module_loader
            .map(|l| {
                l.container
                    .kernel_mappings
                    .into_iter()
                    .map(|k| k.container_image)
                    .collect()
            })
            .unwrap_or_default();
        let pinned: Vec<String> = c["kernels"]
            .as_array()
            .map(|ks| {
                ks.iter()
                    .filter_map(|k| k["pinnedImage"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if pinned != shipped {
            return Ok(Err(format!(
                "{ns}: pinned {pinned:?} != shipped {shipped:?}"
            )));
        }
    }
    Ok(Ok(detail))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_authenticates_with_tokenreview_and_matches_the_manifestworks() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(2)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .spoke_labels(
            1,
            BTreeMap::from([(SELECT.0.to_string(), SELECT.1.to_string())]),
        )
        .spoke_labels(
            2,
            BTreeMap::from([(SELECT.0.to_string(), SELECT.1.to_string())]),
        )
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet).await?;
            let viewer = viewer_token(fleet).await?;
            let (hub, base) = start_hub(fleet)?;
            apply_mcm(fleet).await?;
            for n in [1, 2] {
                report_module_status(fleet, n, 1).await?;
            }

            // Authentication and authorisation by the hub's API server.
            let list = "/api/v1/managedclustermodules";
            let (status, body) = eventually(
                "the dashboard listening",
                Duration::from_secs(30),
                || async {
                    Ok(match get(&base, list, None).await {
                        Ok(answer) => Ok(answer),
                        Err(e) => Err(format!("{e:#}")),
                    })
                },
            )
            .await?;
            assert_eq!(
                (status, body["error"].as_str()),
                (401, Some("unauthenticated")),
                "{body}"
            );
            let (status, body) = get(&base, list, Some("not-a-token")).await?;
            assert_eq!(
                (status, body["error"].as_str()),
                (401, Some("unauthenticated")),
                "{body}"
            );
            // Tokens not issued for the dashboard's audience are refused, even the viewer's
            // own API-server token and a static token the API server accepts.
            let api_token = fleet.hub().service_account_token(HUB_NS, VIEWER_SA).await?;
            for (what, token) in [("the viewer's API-server token", api_token.as_str()), ("a static token", fleet.hub().nobody_token())] {
                let (status, body) = get(&base, list, Some(token)).await?;
                assert_eq!((status, body["error"].as_str()), (401, Some("unauthenticated")), "{what}: {body}");
            }
            // A dashboard token of a user without RBAC: 403.
            let nobody = service_account(fleet, "dashboard-nobody", json!([])).await?;
            let (status, body) = get(&base, list, Some(&nobody)).await?;
            assert_eq!(status, 403, "{body}");
            assert_eq!(body["error"], "forbidden");
            assert!(
                body["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("dashboard-nobody")),
                "{body}"
            );
            // One that may read MCMs but not ManagedClusters sees no cluster inventory.
            let mcm_only = service_account(
                fleet,
                "dashboard-mcm-only",
                json!([{"apiGroups": ["hub.kmm.sigs.x-k8s.io"], "resources": ["managedclustermodules"], "verbs": ["list"]}]),
            )
            .await?;
            assert_eq!(get(&base, list, Some(&mcm_only)).await?.0, 200);
            for path in ["/api/v1/clusters".to_string(), format!("/api/v1/managedclustermodules/{MCM}"), "/api/v1/events".into()] {
                let (status, body) = get(&base, &path, Some(&mcm_only)).await?;
                assert_eq!(status, 403, "{path}: {body}");
                assert!(body["reason"].as_str().is_some_and(|r| r.contains("managedclusters")), "{body}");
            }
            let (status, body) = get(&base, list, Some(&viewer)).await?;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["items"][0]["name"], MCM);

            // The numbers: everything applied and available, as the works and status say.
            let detail = eventually(
                "the dashboard to match the ManifestWorks",
                Duration::from_secs(90),
                || async {
                    let detail = compare_with_api(fleet, &base, &viewer).await?;
                    Ok(detail.and_then(|d| {
                        if d["counts"]["available"] == 2 {
                            Ok(d)
                        } else {
                            Err(format!("not all available yet: {}", d["counts"]))
                        }
                    }))
                },
            )
            .await?;
            assert_eq!(detail["counts"]["selected"], 2);
            for c in detail["clusters"].as_array().into_iter().flatten() {
                assert_eq!(c["phase"], "Available", "{c}");
                assert_eq!(
                    c["work"]["feedback"]["moduleLoader"],
                    json!({"nodesMatching": 1, "desired": 1, "available": 1})
                );
                assert!(
                    c["kernels"][0]["digest"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("sha256:")),
                    "{c}"
                );
            }
            let plan = &detail["imagePlan"];
            assert_eq!(plan[0]["image"], image(fleet));
            assert_eq!(plan[0]["state"], "Ready");

            let (status, clusters) = get(&base, "/api/v1/clusters", Some(&viewer)).await?;
            assert_eq!(status, 200);
            assert_eq!(clusters["items"][0]["managedClusterModules"], json!([MCM]));
            assert_eq!(clusters["items"][0]["kernels"], json!([KERNEL]));
            let (status, events) = get(&base, "/api/v1/events", Some(&viewer)).await?;
            assert_eq!(status, 200);
            assert!(
                events["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["reason"] == "ManifestWorksCreated"),
                "{events}"
            );

            // The stream, with a single-use ticket as the page opens it; never a token in a URL.
            let (status, ticket) = stream_ticket(&base, &viewer).await?;
            assert_eq!(status, 200, "{ticket}");
            let ticket = ticket["ticket"].as_str().context("a ticket")?.to_string();
            let mut resp = reqwest::Client::new()
                .get(format!("{base}/api/v1/stream?ticket={ticket}"))
                .send()
                .await?;
            assert_eq!(resp.status().as_u16(), 200);
            let first = resp
                .chunk()
                .await?
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            assert!(
                first.contains("event: change") && first.contains("\"revision\":"),
                "{first:?}"
            );
            drop(resp);
            let (status, _) = get(&base, &format!("/api/v1/stream?ticket={ticket}"), None).await?;
            assert_eq!(status, 401, "a ticket is good once");
            let (status, _) = get(&base, &format!("/api/v1/stream?access_token={viewer}"), None).await?;
            assert_eq!(status, 400, "a token in the URL is refused");
            assert_eq!(stream_ticket(&base, &nobody).await?.0, 403);

            // Guessing is limited per client: after a few failures, 429 with Retry-After,
            // even for a good token from the same address.
            let mut limited = None;
            for i in 0..=kmm_hub::dashboard::auth::FAILURE_LIMIT {
                let resp = reqwest::Client::new()
                    .get(format!("{base}{list}"))
                    .bearer_auth(format!("guess-{i}"))
                    .send()
                    .await?;
                if resp.status().as_u16() == 429 {
                    limited = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
                    break;
                }
                assert_eq!(resp.status().as_u16(), 401);
            }
            let retry_after: u64 = limited.context("no 429 after FAILURE_LIMIT failures")?.parse()?;
            assert!((1..=60).contains(&retry_after));
            assert_eq!(get(&base, list, Some(&viewer)).await?.0, 429);

            hub.stop().await;
            Ok(())
        })
        .await
}

// ---- headless Chromium over the DevTools protocol --------------------------------------

mod browser {
    //! Just enough of the DevTools protocol: one page target (flattened session), evaluate,
    //! insert text, navigate, screenshot.

    use std::path::Path;
    use std::process::Stdio;
    use std::time::Duration;

    use anyhow::{Context as _, bail};
    use base64::Engine as _;
    use futures::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    /// Every call answers within this, or the test fails (no hang).
    const CALL_TIMEOUT: Duration = Duration::from_secs(30);

    pub struct Browser {
        child: tokio::process::Child,
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        session: String,
        next_id: u64,
        _profile: tempfile::TempDir,
    }

    impl Browser {
        pub async fn launch() -> anyhow::Result<Self> {
            let profile = tempfile::Builder::new()
                .prefix("kmm-dashboard-chromium-")
                .tempdir()?;
            let log = std::fs::File::create(profile.path().join("chromium.log"))?;
            let child = tokio::process::Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    "--window-size=1400,900",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("starting chromium (Debian package `chromium`, installed by e2e/provision/provision.sh)")?;
            let mut browser_ws = None;
            let port_file = profile.path().join("DevToolsActivePort");
            for _ in 0..300 {
                if let Ok(text) = std::fs::read_to_string(&port_file)
                    && let [port, path, ..] = text.lines().collect::<Vec<_>>()[..]
                {
                    browser_ws = Some(format!("ws://127.0.0.1:{port}{path}"));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let Some(url) = browser_ws else {
                let log = std::fs::read_to_string(profile.path().join("chromium.log"))
                    .unwrap_or_default();
                bail!("chromium did not open its DevTools port in 30 s; log:\n{log}");
            };
            let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .context("connecting to DevTools")?;
            let mut b = Self {
                child,
                ws,
                session: String::new(),
                next_id: 0,
                _profile: profile,
            };
            let target = b
                .call("Target.createTarget", json!({"url": "about:blank"}), false)
                .await?;
            let target = target["targetId"]
                .as_str()
                .context("no targetId")?
                .to_string();
            let attached = b
                .call(
                    "Target.attachToTarget",
                    json!({"targetId": target, "flatten": true}),
                    false,
                )
                .await?;
            b.session = attached["sessionId"]
                .as_str()
                .context("no sessionId")?
                .to_string();
            b.page(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await?;
            Ok(b)
        }

        async fn call(
            &mut self,
            method: &str,
            params: Value,
            in_page: bool,
        ) -> anyhow::Result<Value> {
            self.next_id += 1;
            let id = self.next_id;
            let mut msg = json!({"id": id, "method": method, "params": params});
            if in_page {
                msg["sessionId"] = json!(self.session);
            }
            self.ws.send(Message::Text(msg.to_string().into())).await?;
            let answer = tokio::time::timeout(CALL_TIMEOUT, async {
                while let Some(m) = self.ws.next().await {
                    if let Message::Text(t) = m? {
                        let v: Value = serde_json::from_str(t.as_str())?;
                        if v["id"] == json!(id) {
                            return Ok(v);
                        }
                    }
                }
                bail!("DevTools connection closed")
            })
            .await
            .with_context(|| format!("{method}: no answer in {CALL_TIMEOUT:?}"))??;
            if let Some(e) = answer.get("error") {
                bail!("{method}: {e}");
            }
            Ok(answer["result"].clone())
        }

        pub async fn page(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
            self.call(method, params, true).await
        }

        /// Evaluate a JavaScript expression in the page; its JSON value.
        pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
            let r = self
                .page(
                    "Runtime.evaluate",
                    json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
                )
                .await?;
            if let Some(e) = r.get("exceptionDetails") {
                bail!("{expression}: {e}");
            }
            Ok(r["result"]["value"].clone())
        }

        pub async fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
            self.page("Page.navigate", json!({"url": url})).await?;
            Ok(())
        }

        /// Type text into the focused element, as a keyboard would.
        pub async fn type_text(&mut self, text: &str) -> anyhow::Result<()> {
            self.page("Input.insertText", json!({"text": text})).await?;
            Ok(())
        }

        pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
            let r = self
                .page(
                    "Page.captureScreenshot",
                    json!({"format": "png", "captureBeyondViewport": true}),
                )
                .await?;
            let png = base64::engine::general_purpose::STANDARD
                .decode(r["data"].as_str().context("no screenshot data")?)?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
        }

        /// Close the browser (it exits by itself); kill our child if it does not.
        pub async fn close(mut self) {
            let _ = self.call("Browser.close", json!({}), false).await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
    }
}

/// Poll a JavaScript condition in the page until it is true; fails with what the page shows.
async fn wait_for(b: &mut browser::Browser, what: &str, condition: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if b.eval(condition).await? == json!(true) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let text = b.eval("document.body.innerText").await.unwrap_or_default();
            bail!(
                "timed out waiting for {what} ({condition}); the page shows:\n{}",
                text.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("test-artifacts").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_signs_in_and_sees_a_newly_selected_cluster_without_reload() -> anyhow::Result<()> {
    Fleet::builder()
        .spokes(2)
        .nodes_with(|_, spoke| vec![worker_node(&format!("{spoke}-w1"), KERNEL)])
        .spoke_labels(1, BTreeMap::from([(SELECT.0.to_string(), SELECT.1.to_string())]))
        .registry_auth(true)
        .run(async |fleet: &mut Fleet| {
            prepare(fleet).await?;
            let viewer = viewer_token(fleet).await?;
            let (hub, base) = start_hub(fleet)?;
            apply_mcm(fleet).await?;
            report_module_status(fleet, 1, 1).await?;

            let mut b = browser::Browser::launch().await?;
            let result = async {
                b.navigate(&format!("{base}/")).await?;
                wait_for(&mut b, "the sign-in form", "!!document.getElementById('token') && !document.getElementById('login').hidden").await?;
                assert_eq!(b.eval("document.getElementById('view').childElementCount").await?, json!(0), "nothing shown before sign-in");

                // Enter the token and sign in.
                b.eval("document.getElementById('token').focus()").await?;
                b.type_text(&viewer).await?;
                b.eval("document.getElementById('signin').click()").await?;
                wait_for(&mut b, "the MCM in the overview", &format!("!!document.querySelector('#mcms tr[data-mcm=\"{MCM}\"]')")).await?;
                wait_for(&mut b, "both clusters listed", "document.querySelectorAll('#clusters tr[data-cluster]').length === 2").await?;
                b.screenshot(&artifact("dashboard-overview.png")).await?;

                // Open the MCM's page by its link.
                b.eval(&format!("document.querySelector('#mcms tr[data-mcm=\"{MCM}\"] a').click()")).await?;
                wait_for(
                    &mut b,
                    "spoke-1 available with 1/1 nodes",
                    "(() => { const r = document.querySelector('#rollout tr[data-cluster=\"spoke-1\"]'); \
                     return !!r && r.dataset.phase === 'Available' && r.querySelector('td.nodes').textContent.startsWith('1/1'); })()",
                )
                .await?;
                assert_eq!(b.eval("!!document.querySelector('#rollout tr[data-cluster=\"spoke-2\"]')").await?, json!(false));
                wait_for(&mut b, "the live stream", "document.getElementById('live').textContent === 'live'").await?;

                // A change on the hub shows up without a reload: a marker in the page survives.
                b.eval("window.kmmNoReload = true").await?;
                select_spoke(fleet, 2).await?;
                report_module_status(fleet, 2, 1).await?;
                wait_for(
                    &mut b,
                    "spoke-2 to appear and become available",
                    "(() => { const r = document.querySelector('#rollout tr[data-cluster=\"spoke-2\"]'); \
                     return !!r && r.dataset.phase === 'Available'; })()",
                )
                .await?;
                assert_eq!(b.eval("window.kmmNoReload === true").await?, json!(true), "the page was not reloaded");
                assert_eq!(b.eval("location.hash").await?, json!(format!("#/mcm/{MCM}")));
                b.screenshot(&artifact("dashboard.png")).await?;

                // The token was entered once: a reload of the tab needs no new sign-in.
                b.page("Page.reload", json!({})).await?;
                wait_for(&mut b, "the MCM page after reload", "!!document.querySelector('#rollout tr[data-cluster=\"spoke-2\"]')").await?;
                assert_eq!(b.eval("document.getElementById('login').hidden").await?, json!(true));
                anyhow::Ok(())
            }
            .await;
            b.close().await;
            hub.stop().await;
            result
        })
        .await
}
