//! The node simulator: Node objects kept Ready, a scheduler for pods that target its
//! nodes, and one kubelet task per bound pod (see [`super::pod`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::SimNode;
use super::context::{Ctx, NodeEntry};
use super::loader::NodeKernel;
use super::vmrun::VmSlot;

use crate::oci::RegistryAccess;
use crate::vm::{Vm, VmSpec};

/// Node annotation: the node's loaded modules, comma-separated, in load order.
pub const LOADED_MODULES_ANNOTATION: &str = "sim.kmm-fleet.io/loaded-modules";
/// Node annotation: the files in the node's firmware directories, comma-separated.
pub const FIRMWARE_ANNOTATION: &str = "sim.kmm-fleet.io/firmware";
/// Node annotation: `true` on nodes with Secure Boot.
pub const SECURE_BOOT_ANNOTATION: &str = "sim.kmm-fleet.io/secure-boot";
/// Node annotation: `true` on nodes whose kernel is real (a VM), not simulated.
pub const REAL_KERNEL_ANNOTATION: &str = "sim.kmm-fleet.io/real-kernel";
/// Simulates the nodes (and their kubelets) of one cluster.
pub struct NodeSim {
    ctx: Arc<Ctx>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for NodeSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSim")
            .field("cluster", &self.ctx.cluster)
            .finish_non_exhaustive()
    }
}

fn new_boot_id() -> String {
    let r: u128 = rand::random();
    let h = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl NodeSim {
    /// Create (or adopt) `nodes` on the cluster, make them Ready and start serving pods.
    /// `registry` is the test world's registry; pods still need `imagePullSecrets` for
    /// it, as on a real node (the simulator has no node-level credentials).
    pub async fn start(
        cluster: &str,
        client: Client,
        registry: RegistryAccess,
        nodes: Vec<SimNode>,
    ) -> anyhow::Result<NodeSim> {
        let ctx = Arc::new(Ctx::new(cluster, client.clone()));
        ctx.log(format!(
            "node simulator starting with {} node(s); registry {}",
            nodes.len(),
            registry.host
        ));
        let sim = NodeSim {
            ctx: ctx.clone(),
            tasks: Vec::new(),
        };
        for n in nodes {
            sim.add_node(n).await?;
        }
        let mut sim = sim;
        sim.tasks.push(tokio::spawn(annotation_writer(ctx.clone())));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        sim.tasks
            .push(tokio::spawn(dispatcher(ctx.clone(), ready_tx)));
        // Wait until the pod and node caches are listed, so callers can rely on the sim.
        let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
        Ok(sim)
    }

    /// Loaded modules of a node, in load order (kernel-style names).
    pub fn loaded_modules(&self, node: &str) -> Vec<String> {
        self.ctx
            .node_kernel(node)
            .map(|(k, _, _)| k.lock().unwrap_or_else(|e| e.into_inner()).loaded.clone())
            .unwrap_or_default()
    }

    /// A handle to hold modules in use from other tasks.
    pub fn kernels(&self) -> Kernels {
        Kernels {
            ctx: self.ctx.clone(),
        }
    }
}

/// Shared access to the simulated kernels of one cluster's nodes.
#[derive(Clone)]
pub struct Kernels {
    ctx: Arc<Ctx>,
}

impl Kernels {
    /// Hold (or release) a loaded module of a node, as a process using its device would:
    /// `modprobe -r` of a held module fails with "Module … is in use".
    pub fn hold_module(&self, node: &str, module: &str, held: bool) {
        if let Some((k, _, _)) = self.ctx.node_kernel(node) {
            let mut k = k.lock().unwrap_or_else(|e| e.into_inner());
            let name = module.replace('-', "_");
            if held {
                k.in_use.insert(name);
            } else {
                k.in_use.remove(&name);
            }
        }
    }

    /// From now on, every pod labelled `key`=`value` holds `module` on its node from the start
    /// of its containers until they stop (a device plugin holding its driver's device).
    pub fn hold_while_running(&self, key: &str, value: &str, module: &str) {
        self.ctx
            .hold_rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key.into(), value.into(), module.replace('-', "_")));
    }

    /// Forget the rules of [`Kernels::hold_while_running`]; pods already holding keep holding
    /// until their containers stop.
    pub fn clear_hold_rules(&self) {
        self.ctx
            .hold_rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl NodeSim {
    /// Files in a node's simulated firmware directories.
    pub fn firmware(&self, node: &str) -> Vec<String> {
        self.ctx
            .node_kernel(node)
            .map(|(k, _, _)| {
                k.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .firmware
                    .iter()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The names of the simulated nodes.
    pub fn nodes(&self) -> Vec<String> {
        self.ctx.node_names()
    }

    /// The booted VMs of the real-kernel nodes, by node name.
    pub fn vms(&self) -> Vec<(String, Arc<Vm>)> {
        self.ctx.vms()
    }

    /// Waits until every real-kernel node's VM has booted (or one failed to).
    pub async fn vms_booted(&self) -> anyhow::Result<Vec<(String, Arc<Vm>)>> {
        let slots: Vec<(String, VmSlot)> = {
            let nodes = self.ctx.nodes.lock().unwrap_or_else(|e| e.into_inner());
            nodes
                .iter()
                .filter_map(|(n, e)| e.vm.as_ref().map(|(tx, _)| (n.clone(), tx.subscribe())))
                .collect()
        };
        let mut out = Vec::new();
        for (name, slot) in slots {
            let vm = super::vmrun::booted(&slot)
                .await
                .map_err(|e| anyhow::anyhow!("node {name}: {e}"))?;
            out.push((name, vm));
        }
        Ok(out)
    }

    /// Add a node (created Ready; adopted if the Node object exists). A real-kernel node's
    /// VM boots in the background; its pods wait for it.
    pub async fn add_node(&self, mut node: SimNode) -> anyhow::Result<()> {
        let boot_id = new_boot_id();
        let vm = if node.real_kernel {
            if node.kernel.is_empty() {
                node.kernel = crate::vm::KernelDist::locate(&crate::provision::cache_dir())
                    .map(|d| d.release)
                    .context("no unpacked kernel for real-kernel nodes (run the provisioning)")?;
            }
            let dir = Arc::new(
                tempfile::Builder::new()
                    .prefix(&format!("kmm-vm-{}-", node.name))
                    .tempdir()
                    .context("creating the VM's directory")?,
            );
            let (tx, _) = watch::channel(None);
            let spec = VmSpec {
                name: node.name.clone(),
                secure_boot: node.secure_boot.then(|| node.enrolled_certs.clone()),
            };
            let in_tree = node.in_tree_modules.clone();
            let (ctx, tx2, dir2) = (self.ctx.clone(), tx.clone(), dir.clone());
            tokio::spawn(async move {
                let result = boot_node_vm(&ctx, &spec, dir2.path(), &in_tree).await;
                if let Err(e) = &result {
                    ctx.log(format!("node {}: VM failed to boot: {e}", spec.name));
                }
                // `send` drops the value when nobody listens yet: the VM must stay.
                let _ = tx2.send_replace(Some(result));
                ctx.annotations_dirty.notify_one();
            });
            Some((tx, dir))
        } else {
            None
        };
        let kernel = NodeKernel {
            in_use: Default::default(),
            pod_holds: Default::default(),
            kubelet_down: false,
            kernel: node.kernel.clone(),
            secure_boot: node.secure_boot,
            enrolled_certs: node.enrolled_certs.clone(),
            loaded: node
                .in_tree_modules
                .iter()
                .map(|m| m.replace('-', "_"))
                .collect(),
            firmware: Default::default(),
        };
        ensure_node(&self.ctx, &node, &boot_id).await?;
        let (reboot, _) = watch::channel(0);
        self.ctx.log(format!(
            "node {} ready: kernel {}, secure boot {}, {} enrolled cert(s), in-tree {:?}",
            node.name,
            node.kernel,
            node.secure_boot,
            node.enrolled_certs.len(),
            node.in_tree_modules
        ));
        let name = node.name.clone();
        self.ctx
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                name,
                NodeEntry {
                    spec: node,
                    boot_id,
                    kernel: Arc::new(Mutex::new(kernel)),
                    reboot,
                    vm,
                },
            );
        self.ctx.annotations_dirty.notify_one();
        Ok(())
    }

    /// Upgrade a node's kernel: a reboot (new bootID, loaded modules back to the in-tree
    /// ones, running containers restarted).
    /// An OS update: the node reports `os_image` and reboots into `kernel`.
    pub async fn upgrade_os(&self, node: &str, kernel: &str, os_image: &str) -> anyhow::Result<()> {
        {
            let mut nodes = self.ctx.nodes.lock().unwrap_or_else(|e| e.into_inner());
            let entry = nodes
                .get_mut(node)
                .with_context(|| format!("no simulated node {node}"))?;
            entry.spec.os_image = Some(os_image.to_string());
        }
        self.set_kernel(node, kernel).await
    }

    pub async fn set_kernel(&self, node: &str, kernel: &str) -> anyhow::Result<()> {
        let boot_id = new_boot_id();
        let spec = {
            let mut nodes = self.ctx.nodes.lock().unwrap_or_else(|e| e.into_inner());
            let entry = nodes
                .get_mut(node)
                .with_context(|| format!("no simulated node {node}"))?;
            if entry.vm.is_some() {
                anyhow::bail!(
                    "node {node} runs a real kernel in a VM: its kernel cannot be swapped"
                );
            }
            entry.spec.kernel = kernel.to_string();
            entry.boot_id = boot_id.clone();
            let mut k = entry.kernel.lock().unwrap_or_else(|e| e.into_inner());
            k.kernel = kernel.to_string();
            k.loaded = entry
                .spec
                .in_tree_modules
                .iter()
                .map(|m| m.replace('-', "_"))
                .collect();
            drop(k);
            entry.spec.clone()
        };
        self.ctx.log(format!(
            "node {node}: rebooted into kernel {kernel} (boot {boot_id})"
        ));
        let api: Api<Node> = Api::all(self.ctx.client.clone());
        api.patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(node_status(&spec, &boot_id)),
        )
        .await
        .with_context(|| format!("updating node {node} status"))?;
        if let Some(entry) = self
            .ctx
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
        {
            entry.reboot.send_modify(|g| *g += 1);
        }
        self.ctx.annotations_dirty.notify_one();
        Ok(())
    }

    /// Reboot a node into the same kernel; see [`Self::reboot_held`]. Returns once the
    /// kubelet is back and restarts the containers.
    pub async fn reboot(&self, node: &str) -> anyhow::Result<()> {
        self.reboot_held(node).await?.release();
        Ok(())
    }

    /// Reboot a node into the same kernel, as a real one goes: the kubelet is down, so pod
    /// statuses stay as they were (a loader still says Ready); the kernel comes back with its
    /// boot-time modules only (a real-kernel node's VM is powered off and booted again); the
    /// node reports a new `bootID`. The kubelet restarts the containers only when the
    /// returned [`HeldRestart`] is released (or dropped): in between, the node shows what an
    /// agent sees right after a reboot.
    pub async fn reboot_held(&self, node: &str) -> anyhow::Result<HeldRestart> {
        let boot_id = new_boot_id();
        let (spec, vm) = {
            let mut nodes = self.ctx.nodes.lock().unwrap_or_else(|e| e.into_inner());
            let entry = nodes
                .get_mut(node)
                .with_context(|| format!("no simulated node {node}"))?;
            entry.boot_id = boot_id.clone();
            let mut k = entry.kernel.lock().unwrap_or_else(|e| e.into_inner());
            k.kubelet_down = true;
            k.loaded = entry
                .spec
                .in_tree_modules
                .iter()
                .map(|m| m.replace('-', "_"))
                .collect();
            k.pod_holds.clear();
            drop(k);
            let vm = entry
                .vm
                .as_ref()
                .map(|(tx, dir)| (tx.clone(), tx.send_replace(None), dir.clone()));
            (entry.spec.clone(), vm)
        };
        let held = HeldRestart {
            ctx: self.ctx.clone(),
            node: node.to_string(),
        };
        self.ctx
            .log(format!("node {node}: rebooting (boot {boot_id})"));
        if let Some((tx, old, dir)) = vm {
            if let Some(Ok(old)) = old {
                old.shutdown().await;
            }
            let vm_spec = VmSpec {
                name: spec.name.clone(),
                secure_boot: spec.secure_boot.then(|| spec.enrolled_certs.clone()),
            };
            let result = boot_node_vm(&self.ctx, &vm_spec, dir.path(), &spec.in_tree_modules).await;
            let failed = result.as_ref().err().cloned();
            tx.send_replace(Some(result));
            if let Some(e) = failed {
                anyhow::bail!("node {node}: the VM did not boot again: {e}");
            }
        }
        let api: Api<Node> = Api::all(self.ctx.client.clone());
        api.patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(node_status(&spec, &boot_id)),
        )
        .await
        .with_context(|| format!("updating node {node} status"))?;
        self.ctx.log(format!(
            "node {node}: up again (boot {boot_id}), kubelet not yet"
        ));
        self.ctx.annotations_dirty.notify_one();
        Ok(held)
    }

    /// Every decision the simulator made, oldest first.
    pub fn logs(&self) -> Vec<String> {
        self.ctx.logs()
    }

    /// Stop serving (Node objects and pods are left as they are); VMs are powered off.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        for (_, vm) in self.ctx.vms() {
            vm.shutdown().await;
        }
    }
}

/// A rebooted node whose kubelet has not restarted its containers yet ([`Nodes::reboot_held`]).
pub struct HeldRestart {
    ctx: Arc<Ctx>,
    node: String,
}

impl HeldRestart {
    /// The kubelet is back: every container restarts.
    pub fn release(self) {}
}

impl Drop for HeldRestart {
    fn drop(&mut self) {
        if let Some(entry) = self
            .ctx
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.node)
        {
            entry
                .kernel
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .kubelet_down = false;
            entry.reboot.send_modify(|g| *g += 1);
        }
        self.ctx.log(format!(
            "node {}: kubelet back, restarting containers",
            self.node
        ));
        self.ctx.annotations_dirty.notify_one();
    }
}

/// Read a node's loaded modules from its annotation (for processes without the sim).
pub async fn read_loaded_modules(client: &Client, node: &str) -> anyhow::Result<Vec<String>> {
    let n = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(n.annotations()
        .get(LOADED_MODULES_ANNOTATION)
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

/// Boots a real-kernel node's VM and loads its in-tree modules.
async fn boot_node_vm(
    ctx: &Ctx,
    spec: &VmSpec,
    dir: &std::path::Path,
    in_tree: &[String],
) -> Result<Arc<Vm>, String> {
    let bins = tokio::task::spawn_blocking(crate::provision::ensure_provisioned)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
    ctx.log(format!(
        "node {}: booting a VM with kernel {}{}",
        spec.name,
        bins.kernel.release,
        if spec.secure_boot.is_some() {
            " (UEFI Secure Boot)"
        } else {
            ""
        }
    ));
    let vm = Vm::boot(&bins, spec, dir)
        .await
        .map_err(|e| format!("{e:#}"))?;
    for m in in_tree {
        let out = vm
            .exec(&format!("modprobe {}", crate::vm::shell_quote(m)))
            .await
            .map_err(|e| format!("{e:#}"))?;
        if out.status != 0 {
            return Err(format!("modprobe {m}: {}", out.output.trim()));
        }
    }
    ctx.log(format!(
        "node {}: VM up in {:.1}s, kernel {}{}",
        spec.name,
        vm.boot_time().as_secs_f32(),
        vm.release(),
        if in_tree.is_empty() {
            String::new()
        } else {
            format!(", in-tree {in_tree:?} loaded")
        }
    ));
    Ok(Arc::new(vm))
}

fn node_status(spec: &SimNode, boot_id: &str) -> serde_json::Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let cond = |t: &str, s: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": msg,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let resources =
        json!({"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    json!({"status": {
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status (simulated)"),
        ],
        "capacity": resources,
        "allocatable": resources,
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": spec.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "kernelVersion": spec.kernel,
            "bootID": boot_id,
            "machineID": shared_api::labels::short_hash(&spec.name, 32),
            "systemUUID": shared_api::labels::short_hash(&format!("uuid-{}", spec.name), 32),
            "osImage": match &spec.os_image {
                Some(os) => os.as_str(),
                None if spec.real_kernel => "Debian GNU/Linux 12 (bookworm), kernel in a qemu VM",
                None => "kmm-fleet simulated node",
            },
            "containerRuntimeVersion": "containerd://1.7.0-sim",
            "kubeletVersion": "v1.20.2",
            "kubeProxyVersion": "v1.20.2",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }})
}

async fn ensure_node(ctx: &Ctx, spec: &SimNode, boot_id: &str) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), spec.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), "amd64".to_string()),
    ]);
    labels.extend(spec.labels.clone());
    let annotations = BTreeMap::from([
        (
            SECURE_BOOT_ANNOTATION.to_string(),
            spec.secure_boot.to_string(),
        ),
        (
            REAL_KERNEL_ANNOTATION.to_string(),
            spec.real_kernel.to_string(),
        ),
    ]);
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels, "annotations": annotations},
    }))?;
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            api.patch(
                &spec.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels, "annotations": annotations}})),
            )
            .await
            .with_context(|| format!("adopting node {}", spec.name))?;
        }
        Err(e) => return Err(e).with_context(|| format!("creating node {}", spec.name)),
    }
    api.patch_status(
        &spec.name,
        &PatchParams::default(),
        &Patch::Merge(node_status(spec, boot_id)),
    )
    .await
    .with_context(|| format!("writing node {} status", spec.name))?;
    // TaintNodesByCondition put `not-ready` on the new node; a node-lifecycle controller
    // would lift it once Ready. Retry on conflicts (optimistic concurrency).
    for _ in 0..10 {
        let n = api.get(&spec.name).await?;
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let kept: Vec<_> = taints
            .iter()
            .filter(|t| {
                t.key != "node.kubernetes.io/not-ready" && t.key != "node.kubernetes.io/unreachable"
            })
            .cloned()
            .collect();
        if kept.len() == taints.len() {
            return Ok(());
        }
        let patch = json!({"metadata": {"resourceVersion": n.resource_version()}, "spec": {"taints": kept}});
        match api
            .patch(&spec.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing the not-ready taint of {}", spec.name));
            }
        }
    }
    anyhow::bail!("could not remove the not-ready taint of {}", spec.name)
}

/// Mirrors each node's loaded modules and firmware into its annotations.
async fn annotation_writer(ctx: Arc<Ctx>) {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut written: HashMap<String, (String, String)> = HashMap::new();
    loop {
        // Real-kernel nodes: what their kernels say.
        let vms = ctx.vms();
        for (name, vm) in &vms {
            let Ok(loaded) = vm.modules().await else {
                continue;
            };
            let fw = vm
                .exec("cd /var/lib/firmware 2>/dev/null && find . -type f | sed 's#^./##' | sort")
                .await
                .map(|o| o.output.lines().map(str::to_string).collect::<Vec<_>>())
                .unwrap_or_default();
            if let Some(n) = ctx
                .nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
            {
                let mut k = n.kernel.lock().unwrap_or_else(|e| e.into_inner());
                // /proc/modules lists the most recent first.
                k.loaded = loaded.into_iter().rev().collect();
                k.firmware = fw.into_iter().collect();
            }
        }
        let snapshot: Vec<(String, String, String)> = {
            let nodes = ctx.nodes.lock().unwrap_or_else(|e| e.into_inner());
            nodes
                .iter()
                .map(|(name, n)| {
                    let k = n.kernel.lock().unwrap_or_else(|e| e.into_inner());
                    let fw: Vec<&str> = k.firmware.iter().map(String::as_str).collect();
                    (name.clone(), k.loaded.join(","), fw.join(","))
                })
                .collect()
        };
        let mut failed = false;
        for (name, loaded, fw) in snapshot {
            if written.get(&name) == Some(&(loaded.clone(), fw.clone())) {
                continue;
            }
            let patch = json!({"metadata": {"annotations": {LOADED_MODULES_ANNOTATION: loaded, FIRMWARE_ANNOTATION: fw}}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    written.insert(name, (loaded, fw));
                }
                Err(e) => {
                    failed = true;
                    ctx.log(format!("node {name}: writing module annotations: {e}"));
                }
            }
        }
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else if !vms.is_empty() {
            // A real kernel changes without telling anyone: look again now and then.
            let _ = tokio::time::timeout(Duration::from_secs(5), ctx.annotations_dirty.notified())
                .await;
        } else {
            ctx.annotations_dirty.notified().await;
        }
    }
}

/// A running kubelet task: its node and the channel feeding it the latest pod.
type PodTask = (String, watch::Sender<Option<Arc<Pod>>>);

/// Watches pods and runs a kubelet task per pod bound (by the real kube-scheduler, or by
/// whoever set `nodeName`) to one of this simulator's nodes.
async fn dispatcher(ctx: Arc<Ctx>, ready: tokio::sync::oneshot::Sender<()>) {
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let pods = watcher::watcher(
        Api::<Pod>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(pod_writer);
    futures::pin_mut!(pods);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<String, PodTask> = HashMap::new();
    let mut ready = Some(ready);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            ev = pods.next() => {
                let Some(ev) = ev else { break };
                match ev {
                    Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) => {
                        handle_pod(&ctx, Arc::new(p), &mut running, &mut tasks);
                    }
                    Ok(Event::Delete(p)) => {
                        if let Some(uid) = p.uid() {
                            running.remove(&uid);
                        }
                    }
                    Ok(Event::InitDone) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        // Pods deleted while the watch was down: stop their tasks.
                        let live: std::collections::HashSet<String> = pod_store.state().iter().filter_map(|p| p.uid()).collect();
                        running.retain(|uid, _| live.contains(uid));
                    }
                    Ok(Event::Init) => {}
                    Err(e) => ctx.log(format!("pod watch: {e}")),
                }
            }
            _ = tick.tick() => {
                while tasks.try_join_next().is_some() {}
            }
        }
    }
}

fn handle_pod(
    ctx: &Arc<Ctx>,
    pod: Arc<Pod>,
    running: &mut HashMap<String, PodTask>,
    tasks: &mut JoinSet<()>,
) {
    let Some(uid) = pod.uid() else { return };
    if let Some((_, tx)) = running.get(&uid) {
        let _ = tx.send(Some(pod));
        return;
    }
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    match node_name {
        Some(node) if ctx.has_node(&node) => {
            // A finished pod (or one going away that we no longer run) must not run again:
            // an update after completion, e.g. the Job's garbage collection, is not a new start.
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if pod.metadata.deletion_timestamp.is_some()
                || matches!(phase, Some("Succeeded" | "Failed"))
            {
                return;
            }
            let Some((kernel, reboot, vm)) = ctx.node_kernel(&node) else {
                return;
            };
            let (tx, rx) = watch::channel(Some(pod.clone()));
            running.insert(uid, (node.clone(), tx));
            tasks.spawn(super::pod::run(ctx.clone(), node, kernel, reboot, vm, rx));
        }
        // Another cluster's node, or not scheduled yet.
        Some(_) | None => {}
    }
}
