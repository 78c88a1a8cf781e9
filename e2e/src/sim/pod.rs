//! One kubelet task per bound pod: volumes, image pulls (init containers first), running
//! containers (module loader, kaniko executor, or anything else), status writes, restarts
//! with back-off, reboots, and graceful deletion with the loader's preStop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::context::Ctx;
use super::images::{self, Pulled};
use super::kaniko;
use super::loader::{self, Loaded, LoaderEnv, NodeKernel};
use super::vmrun::{self, VmContainer, VmSlot};

/// First delay before retrying a failed pull or restarting a failed container; doubles
/// up to the cap (kubelet uses 10 s → 5 min; shorter here so tests recover quickly).
const BACKOFF_START: Duration = Duration::from_secs(2);
const BACKOFF_CAP: Duration = Duration::from_secs(20);
/// How long `ErrImagePull` / a terminated state shows before the back-off reason.
const SHOW_ERROR_FOR: Duration = Duration::from_secs(1);

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started: String,
    },
    Terminated {
        code: i32,
        reason: String,
        message: Option<String>,
        started: String,
        finished: String,
    },
}

impl State {
    fn waiting(reason: &str, message: Option<String>) -> State {
        State::Waiting {
            reason: reason.to_string(),
            message,
        }
    }

    fn to_json(&self, container_id: &str) -> Value {
        match self {
            State::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            State::Running { started } => json!({"running": {"startedAt": started}}),
            State::Terminated {
                code,
                reason,
                message,
                started,
                finished,
            } => json!({"terminated": {
                "exitCode": code, "reason": reason, "message": message,
                "startedAt": started, "finishedAt": finished, "containerID": container_id,
            }}),
        }
    }
}

#[derive(Clone, Debug)]
struct Cs {
    name: String,
    image: String,
    image_id: String,
    state: State,
    last: Option<State>,
    ready: bool,
    restarts: i32,
}

impl Cs {
    fn new(c: &Container, reason: &str) -> Cs {
        Cs {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: String::new(),
            state: State::waiting(reason, None),
            last: None,
            ready: false,
            restarts: 0,
        }
    }

    fn container_id(&self, pod_uid: &str) -> String {
        format!(
            "containerd://{}",
            shared_api::labels::short_hash(
                &format!("{pod_uid}/{}/{}", self.name, self.restarts),
                64
            )
        )
    }

    fn to_json(&self, pod_uid: &str) -> Value {
        let started = !matches!(self.state, State::Waiting { .. });
        let mut v = json!({
            "name": self.name, "image": self.image, "imageID": self.image_id,
            "ready": self.ready, "restartCount": self.restarts, "started": matches!(self.state, State::Running { .. }),
            "state": self.state.to_json(&self.container_id(pod_uid)),
            "lastState": self.last.as_ref().map(|l| l.to_json(&self.container_id(pod_uid))).unwrap_or(json!({})),
        });
        if started && let Some(o) = v.as_object_mut() {
            o.insert("containerID".into(), json!(self.container_id(pod_uid)));
        }
        v
    }

    fn terminate(&mut self, code: i32, reason: &str, message: Option<String>) {
        let started = match &self.state {
            State::Running { started } => started.clone(),
            _ => now(),
        };
        self.state = State::Terminated {
            code,
            reason: reason.into(),
            message,
            started,
            finished: now(),
        };
        self.ready = false;
    }
}

enum Interrupt {
    Deleted,
    Gone,
    Reboot,
}

enum Kind {
    Loader(Box<LoaderEnv>),
    Kaniko,
    Plain,
}

struct Kubelet {
    ctx: Arc<Ctx>,
    api: Api<Pod>,
    key: String,
    name: String,
    uid: String,
    node: String,
    kernel: Arc<Mutex<NodeKernel>>,
    reboot: watch::Receiver<u64>,
    reboot_closed: bool,
    rx: watch::Receiver<Option<Arc<Pod>>>,
    restart_policy: String,
    pod_ip: String,
    start_time: String,
    phase: &'static str,
    initialized: bool,
    init: Vec<Cs>,
    main: Vec<Cs>,
    pulled: Vec<Option<Pulled>>,
    loaded: Option<(LoaderEnv, Loaded, BTreeMap<String, Vec<u8>>)>,
    conditions: BTreeMap<&'static str, (bool, String)>,
    written: Option<Value>,
    /// Real-kernel nodes: the VM every container runs in, the running containers, and
    /// what their monitors report.
    vm: Option<VmSlot>,
    in_vm: Vec<Option<(VmContainer, watch::Receiver<bool>)>>,
    events_tx: tokio::sync::mpsc::UnboundedSender<vmrun::Event>,
    events_rx: tokio::sync::mpsc::UnboundedReceiver<vmrun::Event>,
}

/// Serve one pod bound to `node` until it is gone.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    node: String,
    kernel: Arc<Mutex<NodeKernel>>,
    reboot: watch::Receiver<u64>,
    vm: Option<VmSlot>,
    rx: watch::Receiver<Option<Arc<Pod>>>,
) {
    let Some(pod) = rx.borrow().clone() else {
        return;
    };
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let ns = pod.namespace().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let has_init = spec.init_containers.as_ref().is_some_and(|v| !v.is_empty());
    let main_reason = if has_init {
        "PodInitializing"
    } else {
        "ContainerCreating"
    };
    let mut k = Kubelet {
        api: Api::namespaced(ctx.client.clone(), &ns),
        key: format!("{ns}/{}", pod.name_any()),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        pod_ip: ctx.pod_ip(),
        ctx,
        node,
        kernel,
        reboot,
        reboot_closed: false,
        rx,
        restart_policy: spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into()),
        start_time: now(),
        phase: "Pending",
        initialized: !has_init,
        init: spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| Cs::new(c, "PodInitializing"))
            .collect(),
        main: spec
            .containers
            .iter()
            .map(|c| Cs::new(c, main_reason))
            .collect(),
        pulled: vec![None; spec.containers.len()],
        loaded: None,
        conditions: BTreeMap::new(),
        written: None,
        vm,
        in_vm: vec![None; spec.containers.len()],
        events_tx,
        events_rx,
    };
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase == "Succeeded" || phase == "Failed" {
        // Finished before this simulator saw it: only deletion is left to handle.
        k.ctx.log(format!("pod {}: already {phase}", k.key));
        loop {
            match k.wait(None).await {
                Some(Interrupt::Reboot) | None => {}
                Some(i) => return k.finish(i).await,
            }
        }
    }
    k.ctx.log(format!(
        "pod {} on node {}: starting ({} init, {} containers)",
        k.key,
        k.node,
        k.init.len(),
        k.main.len()
    ));
    if let Some(i) = k.lifecycle().await {
        k.finish(i).await;
    }
}

impl Kubelet {
    fn pod(&self) -> Option<Arc<Pod>> {
        self.rx.borrow().clone()
    }

    fn deleting(&self) -> bool {
        self.rx
            .borrow()
            .as_ref()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
    }

    /// Wait for `dur` (forever when `None`) unless the pod is deleted/gone or the node reboots.
    async fn wait(&mut self, dur: Option<Duration>) -> Option<Interrupt> {
        let sleep = async move {
            match dur {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep);
        loop {
            if self.rx.borrow().is_none() {
                return Some(Interrupt::Gone);
            }
            if self.deleting() {
                return Some(Interrupt::Deleted);
            }
            tokio::select! {
                _ = &mut sleep => return None,
                Some(ev) = self.events_rx.recv() => {
                    self.apply_vm_event(ev).await;
                    // Waiting forever means "until something changes": it did.
                    dur?;
                }
                r = self.rx.changed() => if r.is_err() { return Some(Interrupt::Gone) },
                r = self.reboot.changed(), if !self.reboot_closed => match r {
                    Ok(()) => return Some(Interrupt::Reboot),
                    Err(_) => self.reboot_closed = true,
                },
            }
        }
    }

    fn log(&self, line: impl AsRef<str>) {
        self.ctx.log(format!("pod {}: {}", self.key, line.as_ref()));
    }

    /// The node is rebooting (see [`NodeKernel::kubelet_down`]).
    fn kubelet_down(&self) -> bool {
        self.kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .kubelet_down
    }

    /// A container in the VM became ready or ended.
    async fn apply_vm_event(&mut self, ev: vmrun::Event) {
        if self.kubelet_down() {
            // The VM went down under a reboot: nobody reports; the restart follows.
            return;
        }
        match ev {
            vmrun::Event::Ready { index, generation } => {
                let Some(cs) = self.main.get_mut(index) else {
                    return;
                };
                if cs.restarts == generation && matches!(cs.state, State::Running { .. }) {
                    cs.ready = true;
                    let name = cs.name.clone();
                    self.log(format!("{name}: ready"));
                }
            }
            vmrun::Event::Exited {
                index,
                generation,
                status,
                message,
                output,
            } => {
                let Some(cs) = self.main.get_mut(index) else {
                    return;
                };
                if cs.restarts != generation {
                    return;
                }
                let reason = if status == 0 { "Completed" } else { "Error" };
                cs.terminate(status, reason, message.clone());
                let name = cs.name.clone();
                if let Some(slot) = self.in_vm.get_mut(index) {
                    *slot = None;
                }
                let lines: Vec<&str> = output.lines().collect();
                for l in &lines[lines.len().saturating_sub(40)..] {
                    self.log(format!("{name}: {l}"));
                }
                self.log(format!(
                    "{name}: exited with status {status}{}",
                    message.map(|m| format!(": {m}")).unwrap_or_default()
                ));
            }
        }
        self.ctx.annotations_dirty.notify_one();
        self.write().await;
    }

    /// Starts container `i` in the node's VM.
    async fn start_in_vm(&mut self, i: usize, c: &Container) {
        let Some(slot) = self.vm.clone() else { return };
        let started = now();
        self.main[i].state = State::Running {
            started: started.clone(),
        };
        self.main[i].ready = false;
        let vm = match vmrun::booted(&slot).await {
            Ok(vm) => vm,
            Err(e) => {
                self.log(format!("{}: no VM: {e}", c.name));
                self.main[i].terminate(128, "StartError", Some(e));
                return;
            }
        };
        let Some(pod) = self.pod() else { return };
        let pulled = self.pulled[i].clone().unwrap_or_default();
        let uid8: String = self.uid.chars().take(8).collect();
        let cid = format!("{uid8}-{}-{}", c.name, self.main[i].restarts);
        match vmrun::start(vm.clone(), &self.ctx.client, &pod, c, &pulled, &cid).await {
            Ok((vc, job)) => {
                self.log(format!(
                    "{}: started in VM {} (job {})",
                    c.name,
                    vm.name(),
                    job.id
                ));
                let probe = c
                    .readiness_probe
                    .as_ref()
                    .and_then(|p| p.exec.as_ref())
                    .and_then(|e| e.command.clone());
                let done = vmrun::monitor(
                    vc.clone(),
                    job,
                    probe,
                    i,
                    self.main[i].restarts,
                    self.events_tx.clone(),
                );
                self.in_vm[i] = Some((vc, done));
            }
            Err(msg) => {
                self.log(format!("{}: {msg}", c.name));
                self.main[i].terminate(128, "StartError", Some(msg));
            }
        }
    }

    /// Runs init container `i` in the node's VM to its end: its status and message.
    async fn run_init_in_vm(&mut self, c: &Container, pulled: &Pulled) -> (i32, Option<String>) {
        let Some(slot) = self.vm.clone() else {
            return (0, None);
        };
        let vm = match vmrun::booted(&slot).await {
            Ok(vm) => vm,
            Err(e) => return (128, Some(e)),
        };
        let Some(pod) = self.pod() else {
            return (0, None);
        };
        let uid8: String = self.uid.chars().take(8).collect();
        let cid = format!("{uid8}-init-{}", c.name);
        match vmrun::start(vm, &self.ctx.client, &pod, c, pulled, &cid).await {
            Ok((vc, job)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let _done = vmrun::monitor(vc, job, None, 0, 0, tx);
                while let Some(ev) = rx.recv().await {
                    if let vmrun::Event::Exited {
                        status,
                        message,
                        output,
                        ..
                    } = ev
                    {
                        for l in output.lines() {
                            self.log(format!("{}: {l}", c.name));
                        }
                        return (status, message);
                    }
                }
                (137, Some("the VM stopped".into()))
            }
            Err(msg) => (128, Some(msg)),
        }
    }

    fn set_condition(&mut self, t: &'static str, v: bool) {
        match self.conditions.get(t) {
            Some((old, _)) if *old == v => {}
            _ => {
                self.conditions.insert(t, (v, now()));
            }
        }
    }

    fn status_json(&mut self) -> Value {
        let ready = !self.main.is_empty() && self.main.iter().all(|c| c.ready);
        self.set_condition("PodScheduled", true);
        self.set_condition("Initialized", self.initialized);
        self.set_condition("ContainersReady", ready);
        self.set_condition("Ready", ready);
        let unready: Vec<&str> = self
            .main
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.as_str())
            .collect();
        let uninit: Vec<&str> = self
            .init
            .iter()
            .filter(|c| !matches!(c.state, State::Terminated { code: 0, .. }))
            .map(|c| c.name.as_str())
            .collect();
        let conditions: Vec<Value> = ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
            .iter()
            .map(|t| {
                let (v, at) = self.conditions.get(t).cloned().unwrap_or((false, now()));
                let mut c = json!({"type": t, "status": if v { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": at});
                if !v && let Some(o) = c.as_object_mut() {
                    if *t == "Initialized" {
                        o.insert("reason".into(), json!("ContainersNotInitialized"));
                        o.insert("message".into(), json!(format!("containers with incomplete status: [{}]", uninit.join(" "))));
                    } else {
                        o.insert("reason".into(), json!("ContainersNotReady"));
                        o.insert("message".into(), json!(format!("containers with unready status: [{}]", unready.join(" "))));
                    }
                }
                c
            })
            .collect();
        json!({"status": {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            // No qosClass: the API server sets it at creation from the requests and limits
            // and it is immutable (a hard-coded BestEffort broke pods with resources).
            "initContainerStatuses": self.init.iter().map(|c| c.to_json(&self.uid)).collect::<Vec<_>>(),
            "containerStatuses": self.main.iter().map(|c| c.to_json(&self.uid)).collect::<Vec<_>>(),
        }})
    }

    async fn write(&mut self) {
        if self.kubelet_down() {
            return;
        }
        let v = self.status_json();
        if self.written.as_ref() == Some(&v) {
            return;
        }
        match self
            .api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&v))
            .await
        {
            Ok(_) => self.written = Some(v),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => self.log(format!("writing status: {e}")),
        }
    }

    fn container(&self, i: usize, init: bool) -> Option<Container> {
        let pod = self.pod()?;
        let spec = pod.spec.as_ref()?;
        if init {
            spec.init_containers.as_ref()?.get(i).cloned()
        } else {
            spec.containers.get(i).cloned()
        }
    }

    async fn lifecycle(&mut self) -> Option<Interrupt> {
        self.write().await;
        // Volumes: a missing ConfigMap/Secret keeps the pod in ContainerCreating.
        let mut said = None;
        loop {
            let pod = self.pod()?;
            match images::missing_volume(&self.ctx.client, &pod).await {
                None => break,
                Some(msg) => {
                    if said.as_ref() != Some(&msg) {
                        self.log(&msg);
                        said = Some(msg);
                    }
                    match self.wait(Some(Duration::from_secs(2))).await {
                        None | Some(Interrupt::Reboot) => {}
                        Some(i) => return Some(i),
                    }
                }
            }
        }
        // Init containers, in order: pull, run to completion.
        for i in 0..self.init.len() {
            let c = self.container(i, true)?;
            let pulled = self.pull_until_ok(&c, i, true).await?;
            self.init[i].image_id = pulled.image_id.clone();
            let mut delay = BACKOFF_START;
            // Simulated nodes complete init containers at once; real-kernel nodes run them.
            while self.vm.is_some() {
                self.init[i].state = State::Running { started: now() };
                self.write().await;
                let (status, message) = self.run_init_in_vm(&c, &pulled).await;
                if status == 0 {
                    break;
                }
                self.log(format!("init container {} failed: status {status}", c.name));
                self.init[i].terminate(status, "Error", message);
                self.init[i].restarts += 1;
                self.write().await;
                if let Some(i) = self
                    .wait(Some(delay))
                    .await
                    .filter(|i| !matches!(i, Interrupt::Reboot))
                {
                    return self.interrupted(i).await;
                }
                delay = (delay * 2).min(BACKOFF_CAP);
            }
            self.init[i].terminate(0, "Completed", None);
            self.log(format!("init container {} completed", c.name));
            self.write().await;
        }
        self.initialized = true;
        for c in self.main.iter_mut() {
            if matches!(&c.state, State::Waiting { reason, .. } if reason == "PodInitializing") {
                c.state = State::waiting("ContainerCreating", None);
            }
        }
        self.write().await;
        // Containers: pull every image (failures retried with back-off).
        for i in 0..self.main.len() {
            let c = self.container(i, false)?;
            let pulled = self.pull_until_ok(&c, i, false).await?;
            self.main[i].image_id = pulled.image_id.clone();
            self.pulled[i] = Some(pulled);
        }
        self.run_containers().await
    }

    /// Pull a container's image until it succeeds (or the pod goes away).
    async fn pull_until_ok(&mut self, c: &Container, i: usize, init: bool) -> Option<Pulled> {
        let image = c.image.clone().unwrap_or_default();
        let mut delay = BACKOFF_START;
        loop {
            let pod = self.pod()?;
            let mut log = Vec::new();
            let result = images::pull_for_pod(&self.ctx.client, &pod, &image, &mut log).await;
            for l in log {
                self.log(l);
            }
            match result {
                Ok(p) => {
                    self.log(format!(
                        "pulled image {image} ({}) for container {}",
                        p.image_id, c.name
                    ));
                    return Some(p);
                }
                Err(f) => {
                    self.log(format!("container {}: ErrImagePull: {}", c.name, f.message));
                    let cs = if init {
                        &mut self.init[i]
                    } else {
                        &mut self.main[i]
                    };
                    cs.state = State::waiting("ErrImagePull", Some(f.message));
                    self.write().await;
                    if let Some(i) = self
                        .wait(Some(SHOW_ERROR_FOR))
                        .await
                        .filter(|i| !matches!(i, Interrupt::Reboot))
                    {
                        return self.interrupted(i).await;
                    }
                    let cs = if init {
                        &mut self.init[i]
                    } else {
                        &mut self.main[i]
                    };
                    cs.state = State::waiting(
                        "ImagePullBackOff",
                        Some(format!("Back-off pulling image \"{image}\"")),
                    );
                    self.write().await;
                    if let Some(i) = self
                        .wait(Some(delay))
                        .await
                        .filter(|i| !matches!(i, Interrupt::Reboot))
                    {
                        return self.interrupted(i).await;
                    }
                    delay = (delay * 2).min(BACKOFF_CAP);
                }
            }
        }
    }

    /// Finish a pod interrupted in the middle of a step (then there is nothing to return).
    async fn interrupted<T>(&mut self, i: Interrupt) -> Option<T> {
        self.finish(i).await;
        None
    }

    fn kind(&self, c: &Container) -> Kind {
        let pod = self.pod();
        if c.name == loader::LOADER_CONTAINER && pod.as_deref().is_some_and(loader::is_loader_pod) {
            Kind::Loader(Box::new(LoaderEnv::from_container(c)))
        } else if kaniko::is_kaniko(c) {
            Kind::Kaniko
        } else {
            Kind::Plain
        }
    }

    /// Start container `i`; its new state is set (running or terminated).
    async fn start_container(&mut self, i: usize) {
        let Some(c) = self.container(i, false) else {
            return;
        };
        if self.vm.is_some() {
            self.start_in_vm(i, &c).await;
            self.ctx.annotations_dirty.notify_one();
            return;
        }
        match self.kind(&c) {
            Kind::Loader(env) => {
                let env = *env;
                let files = self.pulled[i]
                    .as_ref()
                    .map(|p| p.files.clone())
                    .unwrap_or_default();
                let kernel = self.kernel.clone();
                let (env2, files2) = (env.clone(), files.clone());
                let res = tokio::task::spawn_blocking(move || {
                    let mut k = kernel.lock().unwrap_or_else(|e| e.into_inner());
                    loader::start(&env2, &files2, &mut k)
                })
                .await;
                self.ctx.annotations_dirty.notify_one();
                let (log, result) = res.unwrap_or_else(|e| {
                    (Vec::new(), Err(format!("loader emulation panicked: {e}")))
                });
                for l in log {
                    self.log(format!("{}: {l}", c.name));
                }
                match result {
                    Ok(loaded) => {
                        self.log(format!("{}: modules loaded; ready", c.name));
                        self.main[i].state = State::Running { started: now() };
                        self.main[i].ready = true;
                        self.loaded = Some((env, loaded, files));
                    }
                    Err(msg) => {
                        self.log(format!("{}: failed: {msg}", c.name));
                        self.main[i].state = State::Running { started: now() };
                        self.main[i].terminate(1, "Error", Some(msg));
                    }
                }
            }
            Kind::Kaniko => {
                self.main[i].state = State::Running { started: now() };
                self.write().await;
                let Some(pod) = self.pod() else { return };
                let (log, result) = kaniko::run(&self.ctx.client, &pod, &c).await;
                for l in log {
                    self.log(format!("{}: {l}", c.name));
                }
                match result {
                    Ok(digests) => {
                        self.log(format!("{}: build succeeded {digests:?}", c.name));
                        self.main[i].terminate(0, "Completed", None);
                    }
                    Err(msg) => {
                        self.log(format!("{}: build failed: {msg}", c.name));
                        self.main[i].terminate(1, "Error", Some(msg));
                    }
                }
            }
            Kind::Plain => {
                self.main[i].state = State::Running { started: now() };
                if self.restart_policy == "Always" {
                    self.main[i].ready = true;
                    self.log(format!("{}: running", c.name));
                    self.take_holds();
                } else {
                    self.main[i].terminate(0, "Completed", None);
                    self.log(format!("{}: ran to completion", c.name));
                }
            }
        }
    }

    fn update_phase(&mut self) {
        let all_done = self
            .main
            .iter()
            .all(|c| matches!(c.state, State::Terminated { .. }));
        let all_ok = self
            .main
            .iter()
            .all(|c| matches!(c.state, State::Terminated { code: 0, .. }));
        self.phase = if all_done && self.restart_policy == "Never" {
            if all_ok { "Succeeded" } else { "Failed" }
        } else if all_done && all_ok && self.restart_policy == "OnFailure" {
            "Succeeded"
        } else {
            "Running"
        };
    }

    fn needs_restart(&self, c: &Cs) -> bool {
        match (&c.state, self.restart_policy.as_str()) {
            (State::Terminated { .. }, "Always") => true,
            (State::Terminated { code, .. }, "OnFailure") => *code != 0,
            (State::Waiting { reason, .. }, _) => reason == "CrashLoopBackOff",
            _ => false,
        }
    }

    async fn run_containers(&mut self) -> Option<Interrupt> {
        for i in 0..self.main.len() {
            self.start_container(i).await;
        }
        let mut delay = BACKOFF_START;
        loop {
            self.update_phase();
            self.write().await;
            if self.phase == "Succeeded" || self.phase == "Failed" {
                self.log(self.phase);
                loop {
                    match self.wait(None).await {
                        Some(Interrupt::Reboot) | None => {}
                        Some(i) => return Some(i),
                    }
                }
            }
            let restart: Vec<usize> = (0..self.main.len())
                .filter(|i| self.needs_restart(&self.main[*i]))
                .collect();
            let wait_for = if restart.is_empty() {
                None
            } else {
                // Show the terminated state a moment, then CrashLoopBackOff until the restart.
                if let Some(i) = self.wait(Some(SHOW_ERROR_FOR)).await {
                    match i {
                        Interrupt::Reboot => {
                            self.reboot_containers().await;
                            continue;
                        }
                        i => return Some(i),
                    }
                }
                for &i in &restart {
                    let cs = &mut self.main[i];
                    if let State::Terminated { .. } = cs.state {
                        cs.last = Some(cs.state.clone());
                        cs.state = State::waiting(
                            "CrashLoopBackOff",
                            Some(format!(
                                "back-off {}s restarting failed container={} pod={}",
                                delay.as_secs(),
                                cs.name,
                                self.name
                            )),
                        );
                    }
                }
                self.write().await;
                Some(delay)
            };
            match self.wait(wait_for).await {
                None => {
                    for i in restart {
                        self.main[i].restarts += 1;
                        self.log(format!(
                            "restarting container {} (restart {})",
                            self.main[i].name, self.main[i].restarts
                        ));
                        self.start_container(i).await;
                    }
                    delay = (delay * 2).min(BACKOFF_CAP);
                }
                Some(Interrupt::Reboot) => {
                    self.reboot_containers().await;
                    delay = BACKOFF_START;
                }
                Some(i) => return Some(i),
            }
        }
    }

    /// The node rebooted: every container is restarted from scratch.
    async fn reboot_containers(&mut self) {
        self.log("node rebooted: restarting containers");
        self.loaded = None;
        for i in 0..self.main.len() {
            let cs = &mut self.main[i];
            let prev = match &cs.state {
                State::Waiting { .. } => cs.last.clone(),
                s => Some(s.clone()),
            };
            cs.last = prev.map(|s| match s {
                State::Running { started } => State::Terminated {
                    code: 255,
                    reason: "Unknown".into(),
                    message: None,
                    started,
                    finished: now(),
                },
                s => s,
            });
            cs.ready = false;
            cs.restarts += 1;
            self.start_container(i).await;
        }
    }

    /// Deleted, on a real-kernel node: each running container's preStop hook, then SIGTERM
    /// and, after the grace period (at most 10 s here), SIGKILL.
    async fn stop_in_vm(&mut self) {
        let grace = self
            .pod()
            .and_then(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .clamp(0, 10) as u64;
        for i in 0..self.in_vm.len() {
            let Some((vc, mut done)) = self.in_vm[i].take() else {
                continue;
            };
            let hook = self
                .container(i, false)
                .and_then(|c| c.lifecycle)
                .and_then(|l| l.pre_stop)
                .and_then(|h| h.exec)
                .and_then(|e| e.command);
            if let Some(cmd) = hook {
                match vc.exec(&cmd).await {
                    Ok(out) => {
                        for l in out.output.lines() {
                            self.log(format!("{} preStop: {l}", vc.name));
                        }
                        self.log(format!("{} preStop: exit status {}", vc.name, out.status));
                    }
                    Err(e) => self.log(format!("{} preStop: {e:#}", vc.name)),
                }
            }
            vc.stop(Duration::from_secs(grace), &mut done).await;
            self.log(format!("{}: stopped", vc.name));
        }
        self.ctx.annotations_dirty.notify_one();
    }

    /// Hold the modules the simulator's hold rules give this pod (it has just started).
    fn take_holds(&self) {
        let Some(pod) = self.pod() else { return };
        let rules = self
            .ctx
            .hold_rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (key, value, module) in rules {
            if pod.labels().get(&key) == Some(&value) {
                self.kernel
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pod_holds
                    .insert(self.uid.clone(), module.clone());
                self.log(format!("holds module {module}"));
            }
        }
    }

    /// Release what [`Kubelet::take_holds`] held: the pod's containers have stopped.
    fn release_holds(&self) {
        let released = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pod_holds
            .remove(&self.uid);
        if let Some(m) = released {
            self.log(format!("released module {m}"));
        }
    }

    /// Deleted (graceful): preStop, containers stopped, then the final delete.
    async fn finish(&mut self, i: Interrupt) {
        match i {
            Interrupt::Gone => {
                self.release_holds();
                self.log("gone");
                return;
            }
            Interrupt::Reboot => return,
            Interrupt::Deleted => {}
        }
        self.stop_in_vm().await;
        // The containers' real exit statuses (a loader says whether its module is gone).
        while let Ok(ev) = self.events_rx.try_recv() {
            self.apply_vm_event(ev).await;
        }
        if let Some((env, loaded, files)) = self.loaded.take() {
            let kernel = self.kernel.clone();
            let (log, still) = tokio::task::spawn_blocking(move || {
                let mut k = kernel.lock().unwrap_or_else(|e| e.into_inner());
                let log = loader::stop(&env, &files, &loaded.firmware_copied, &mut k);
                (log, loader::still_loaded(&env, &k))
            })
            .await
            .unwrap_or_default();
            self.ctx.annotations_dirty.notify_one();
            for l in &log {
                self.log(format!("preStop: {l}"));
            }
            // As the loader script does on SIGTERM: exit 3 while the kernel has the module.
            if let Some(m) = still {
                let why = log.last().cloned().unwrap_or_default();
                if let Some(c) = self
                    .main
                    .iter_mut()
                    .find(|c| c.name == loader::LOADER_CONTAINER)
                {
                    c.terminate(
                        3,
                        "Error",
                        Some(format!("unload failed: {m} is still loaded: {why}")),
                    );
                }
            }
        }
        for c in self.main.iter_mut() {
            match &c.state {
                State::Running { .. } => c.terminate(0, "Completed", None),
                State::Waiting { .. } => c.ready = false,
                State::Terminated { .. } => {}
            }
        }
        self.release_holds();
        if self.phase == "Pending" || self.phase == "Running" {
            self.update_phase();
        }
        if self.written.is_some() {
            self.write().await;
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.api.delete(&self.name, &dp).await {
            Ok(_) => self.log("containers stopped; deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => self.log(format!("final delete: {e}")),
        }
        // Finalizers may keep the object; nothing more to do until it is gone.
        while self.rx.borrow().is_some() {
            if self.rx.changed().await.is_err() {
                break;
            }
        }
    }
}
