//! One cluster's real control plane: kube-apiserver, kube-controller-manager and
//! kube-scheduler (the release `provision` builds) on 127.0.0.1, against the fleet's shared
//! etcd under a per-cluster prefix.
//!
//! Layout of a cluster directory: `pki/` (certificates, keys, static tokens),
//! `admin.kubeconfig`, `nobody.kubeconfig`, `controller-manager.kubeconfig`,
//! `scheduler.kubeconfig`, `kube-apiserver.log`, `kube-controller-manager.log`,
//! `kube-scheduler.log`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::pki::Ca;
use crate::process::{ManagedProcess, free_port};
use crate::provision::Binaries;

/// The field manager the test world applies with.
pub const FIELD_MANAGER: &str = "kmm-fleet-testworld";
/// The user of the static token with no RBAC permissions.
pub const NOBODY_USER: &str = "nobody";
/// Loopback service range: there is no kube-proxy, and only loopback is a valid target here.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "127.96.0.0/16";
/// What a cluster of the fleet needs: no node lifecycle (simulated nodes send no heartbeats),
/// no cloud, no volumes. `csrsigning`/`csrapproving` sign the OCM agents' hub certificates;
/// `root-ca-cert-publisher` makes the `kube-root-ca.crt` ConfigMap that projected
/// service-account volumes need.
const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,serviceaccount-controller,\
daemonset-controller,job-controller,deployment-controller,replicaset-controller,ttl-after-finished-controller,\
clusterrole-aggregation-controller,certificatesigningrequest-signing-controller,\
certificatesigningrequest-approving-controller,certificatesigningrequest-cleaner-controller,\
root-ca-certificate-publisher-controller,resourceclaim-controller,pod-garbage-collector-controller";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const APISERVER_GRACE: Duration = Duration::from_secs(2);

/// The fleet's etcd (one per fleet; clusters are separated by `--etcd-prefix`).
#[derive(Debug)]
pub struct Etcd {
    process: ManagedProcess,
    url: String,
    data_dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd with its data on tmpfs (`/dev/shm` when present) and waits for `/health`.
    pub async fn start(binaries: &Binaries, log_dir: &Path) -> anyhow::Result<Self> {
        let shm = Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("kmm-fleet-etcd-");
        let data_dir = if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir_in(log_dir)
        }
        .context("creating etcd data dir")?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let args: Vec<String> = vec![
            "--name=kmm-fleet".into(),
            format!("--data-dir={}", data_dir.path().join("data").display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=kmm-fleet={peer}"),
            "--initial-cluster-state=new".into(),
            "--logger=zap".into(),
            "--log-level=warn".into(),
            // The 5,000-cluster benches write a lot; the default quota is 2 GiB.
            "--quota-backend-bytes=8589934592".into(),
        ];
        let mut process =
            ManagedProcess::spawn("etcd", &binaries.etcd, &args, &log_dir.join("etcd.log"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) =
                crate::process::http_get(&format!("127.0.0.1:{client_port}"), "/health").await
                && body.contains("true")
            {
                break;
            }
            if let Some(status) = process.exited() {
                bail!(
                    "etcd exited ({status}) while starting; log tail:\n{}",
                    process.log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd not healthy after 30 s; log tail:\n{}",
                    process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            process,
            url,
            data_dir,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops etcd and removes its data.
    pub async fn stop(self) {
        let Self {
            mut process,
            data_dir,
            ..
        } = self;
        process.stop(Duration::from_secs(5)).await;
        drop(data_dir);
    }
}

/// What a cluster needs from its fleet.
#[derive(Clone, Copy, Debug)]
pub struct ClusterConfig<'a> {
    pub name: &'a str,
    /// The cluster's own directory (created).
    pub dir: &'a Path,
    pub binaries: &'a Binaries,
    pub etcd_url: &'a str,
    pub ca: &'a Ca,
    /// Directories of released CRD files (YAML) installed besides ours: OCM's hub or spoke
    /// CRDs and the policy framework's.
    pub crd_dirs: &'a [PathBuf],
}

/// The audit log of the API server, in the cluster directory.
pub const AUDIT_LOG: &str = "audit.log";

/// Audit only the requests of the service accounts in kmm-fleet's namespaces (the hub's, the
/// spoke agent's, the build executor's), at `Metadata` level: who asked what of which object,
/// and the answer. Tests compare these requests with the shipped roles.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups:
  - system:serviceaccounts:kmm-hub
  - system:serviceaccounts:kmm-hub-builds
  - system:serviceaccounts:kmm-spoke
- level: None
";

/// One audited request: who, what, where, and the HTTP status of the answer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditedRequest {
    pub user: String,
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub code: u16,
}

/// Parses an audit log written with [`AUDIT_POLICY`]; lines of other shapes (non-resource
/// URLs) are skipped.
pub fn parse_audit_log(text: &str) -> Vec<AuditedRequest> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(obj) = v.get("objectRef") else {
            continue;
        };
        let field = |o: &serde_json::Value, k: &str| o[k].as_str().unwrap_or_default().to_string();
        let mut resource = field(obj, "resource");
        let sub = field(obj, "subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        out.push(AuditedRequest {
            user: field(&v["user"], "username"),
            verb: field(&v, "verb"),
            group: field(obj, "apiGroup"),
            resource,
            namespace: field(obj, "namespace"),
            name: field(obj, "name"),
            code: v["responseStatus"]["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(0),
        });
    }
    out
}

/// A running control plane. Dropping it kills its processes; [`Cluster::stop`] stops them
/// gracefully.
pub struct Cluster {
    name: String,
    dir: PathBuf,
    port: u16,
    binaries: Binaries,
    apiserver_args: Vec<String>,
    controller_manager_args: Vec<String>,
    scheduler_args: Vec<String>,
    apiserver: Option<ManagedProcess>,
    controller_manager: Option<ManagedProcess>,
    scheduler: Option<ManagedProcess>,
    ca_pem: String,
    nobody_token: String,
    admin: kube::Client,
    crd_dirs: Vec<PathBuf>,
}

impl Cluster {
    /// Writes certificates and kubeconfigs, starts kube-apiserver (waits for `/readyz`),
    /// kube-controller-manager, installs the CRDs of `shared_api::crds()` and waits until
    /// they are Established and the token controller has made the `default` token.
    pub async fn start(cfg: ClusterConfig<'_>) -> anyhow::Result<Self> {
        let started = Instant::now();
        let name = cfg.name;
        let dir = cfg.dir.to_path_buf();
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");

        let serving = cfg
            .ca
            .serving_cert("kube-apiserver", &["127.0.0.1", "localhost"])?;
        let admin = cfg.ca.client_cert("kmm-fleet-admin", &["system:masters"])?;
        let kcm = cfg.ca.client_cert("system:kube-controller-manager", &[])?;
        let scheduler = cfg.ca.client_cert("system:kube-scheduler", &[])?;
        let sa = crate::pki::service_account_key()?;
        let nobody_token = random_token();
        let ca_pem = cfg.ca.cert_pem().to_string();
        let files = [
            ("ca.crt", ca_pem.as_str()),
            ("apiserver.crt", &serving.cert_pem),
            ("apiserver.key", &serving.key_pem),
            ("admin.crt", &admin.cert_pem),
            ("admin.key", &admin.key_pem),
            ("controller-manager.crt", &kcm.cert_pem),
            ("controller-manager.key", &kcm.key_pem),
            ("scheduler.crt", &scheduler.cert_pem),
            ("scheduler.key", &scheduler.key_pem),
            ("ca.key", cfg.ca.key_pem()),
            ("sa.key", &sa.private_pem),
            ("sa.pub", &sa.public_pem),
        ];
        for (file, content) in files {
            write_private(&pki.join(file), content)?;
        }
        // token,user,uid[,"groups"]: a user that authenticates but has no permissions.
        write_private(
            &pki.join("tokens.csv"),
            &format!("{nobody_token},{NOBODY_USER},nobody-uid\n"),
        )?;

        let admin_yaml = kubeconfig_yaml(
            name,
            &server,
            &ca_pem,
            User::Cert(&admin.cert_pem, &admin.key_pem),
        );
        write_private(&dir.join("admin.kubeconfig"), &admin_yaml)?;
        let kcm_yaml = kubeconfig_yaml(
            name,
            &server,
            &ca_pem,
            User::Cert(&kcm.cert_pem, &kcm.key_pem),
        );
        write_private(&dir.join("controller-manager.kubeconfig"), &kcm_yaml)?;
        write_private(
            &dir.join("scheduler.kubeconfig"),
            &kubeconfig_yaml(
                name,
                &server,
                &ca_pem,
                User::Cert(&scheduler.cert_pem, &scheduler.key_pem),
            ),
        )?;
        write_private(
            &dir.join("nobody.kubeconfig"),
            &kubeconfig_yaml(name, &server, &ca_pem, User::Token(&nobody_token)),
        )?;

        write_private(&pki.join("audit-policy.yaml"), AUDIT_POLICY)?;
        let p = |f: &str| pki.join(f).display().to_string();
        let apiserver_args: Vec<String> = vec![
            "--advertise-address=127.0.0.1".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", p(""),),
            format!("--etcd-servers={}", cfg.etcd_url),
            format!("--etcd-prefix=/kmm-fleet/{name}"),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            // Endpoints validation rejects loopback IPs: no master endpoint reconciling.
            "--endpoint-reconciler-type=none".into(),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", p("tokens.csv")),
            format!("--service-account-issuer=https://{name}.kmm-fleet.invalid"),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--api-audiences=https://{name}.kmm-fleet.invalid"),
            // The defaults (PodSecurity among them) plus NodeRestriction, as kubeadm runs it;
            // TaintNodesByCondition is what makes simulated nodes start NotReady.
            "--enable-admission-plugins=NodeRestriction".into(),
            // The front-proxy settings kubeadm gives every cluster: delegating servers (OCM's
            // controllers, webhooks) read them from kube-system/extension-apiserver-authentication.
            format!("--requestheader-client-ca-file={}", p("ca.crt")),
            "--requestheader-allowed-names=front-proxy-client".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            // Loader pods are privileged, as in real KMM.
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            // What kmm-fleet's own service accounts ask for (see [`Cluster::audit_requests`]).
            format!("--audit-policy-file={}", p("audit-policy.yaml")),
            format!("--audit-log-path={}", dir.join(AUDIT_LOG).display()),
            "--audit-log-format=json".into(),
            "--audit-log-mode=blocking".into(),
        ];
        let controller_manager_args: Vec<String> = vec![
            format!(
                "--kubeconfig={}",
                dir.join("controller-manager.kubeconfig").display()
            ),
            format!("--controllers={CONTROLLERS}"),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
            // Each controller acts as its own service account, as in kubeadm clusters.
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            // Signs the OCM agents' CertificateSigningRequests once the hub approved them.
            format!("--cluster-signing-cert-file={}", p("ca.crt")),
            format!("--cluster-signing-key-file={}", p("ca.key")),
            "--profiling=false".into(),
        ];
        let scheduler_args: Vec<String> = vec![
            format!(
                "--kubeconfig={}",
                dir.join("scheduler.kubeconfig").display()
            ),
            format!(
                "--authentication-kubeconfig={}",
                dir.join("scheduler.kubeconfig").display()
            ),
            format!(
                "--authorization-kubeconfig={}",
                dir.join("scheduler.kubeconfig").display()
            ),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            format!("--cert-dir={}", pki.join("scheduler-serving").display()),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
        ];

        let admin_client = client_from_yaml(&admin_yaml).await?;
        let mut cluster = Self {
            name: name.to_string(),
            dir,
            port,
            binaries: cfg.binaries.clone(),
            apiserver_args,
            controller_manager_args,
            scheduler_args,
            apiserver: None,
            controller_manager: None,
            scheduler: None,
            ca_pem,
            nobody_token,
            admin: admin_client,
            crd_dirs: cfg.crd_dirs.to_vec(),
        };
        cluster.start_apiserver().await?;
        let t_api = started.elapsed();
        cluster.start_controller_manager()?;
        cluster.start_scheduler()?;
        let (crds, token) = tokio::join!(
            cluster.install_crds(),
            cluster.service_account_token("default", "default")
        );
        crds.with_context(|| format!("{name}: installing CRDs"))?;
        token.with_context(|| {
            format!(
                "{name}: kube-controller-manager did not create the default service account; log tail:\n{}",
                cluster.controller_manager.as_ref().map(|p| p.log_tail(30)).unwrap_or_default()
            )
        })?;
        eprintln!(
            "kmm-fleet: cluster {name} ready on {} in {:.1?} (apiserver {:.1?})",
            cluster.server_url(),
            started.elapsed(),
            t_api
        );
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin (system:masters client certificate) kubeconfig.
    /// Every audited request so far (our service accounts' only; see [`AUDIT_POLICY`]).
    pub fn audit_requests(&self) -> anyhow::Result<Vec<AuditedRequest>> {
        let path = self.dir.join(AUDIT_LOG);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(parse_audit_log(&text))
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A kubeconfig for the user `nobody` (static token, no permissions).
    pub fn nobody_kubeconfig_path(&self) -> PathBuf {
        self.dir.join("nobody.kubeconfig")
    }

    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The static token of the user `nobody`.
    pub fn nobody_token(&self) -> &str {
        &self.nobody_token
    }

    /// An admin client (system:masters).
    pub async fn client(&self) -> kube::Client {
        self.admin.clone()
    }

    /// A client authenticating with a bearer token.
    pub async fn client_for_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        client_from_yaml(&kubeconfig_yaml(
            &self.name,
            &self.server_url(),
            &self.ca_pem,
            User::Token(token),
        ))
        .await
    }

    /// A bound token of a service account (TokenRequest, one hour), waiting up to 60 s for
    /// the service account (the controller manager creates `default` in each namespace).
    pub async fn service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<String> {
        self.service_account_token_for(namespace, service_account, None)
            .await
    }

    /// Like [`Cluster::service_account_token`], for `audience` (what
    /// `kubectl create token SA --audience AUDIENCE` asks); `None`: the API server's own.
    pub async fn service_account_token_for(
        &self,
        namespace: &str,
        service_account: &str,
        audience: Option<&str>,
    ) -> anyhow::Result<String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.map(String::from).into_iter().collect(),
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::from("service account not found");
        while Instant::now() < deadline {
            match sas
                .create_token_request(service_account, &PostParams::default(), &request)
                .await
            {
                Ok(tr) => {
                    if let Some(status) = tr.status {
                        return Ok(status.token);
                    }
                    last = "TokenRequest answered without a token".into();
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    last = "service account not found".into()
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{}: no token for service account {namespace}/{service_account} after 60 s ({last})",
            self.name
        )
    }

    /// A client acting as a service account (see [`Cluster::service_account_token`]).
    pub async fn service_account_client(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<kube::Client> {
        let token = self
            .service_account_token(namespace, service_account)
            .await?;
        self.client_for_token(&token).await
    }

    /// Stops and restarts kube-apiserver on the same port with the same certificates and
    /// waits until it is ready again.
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        self.stop_apiserver().await;
        self.start_apiserver().await
    }

    /// Stops kube-apiserver (for "API server down" scenarios); [`Cluster::start_apiserver`]
    /// brings it back.
    pub async fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            // A SIGTERMed kube-apiserver drains open watches for up to a minute; nothing in
            // the test world needs that, so it gets a short grace before SIGKILL.
            p.stop(APISERVER_GRACE).await;
        }
    }

    /// Starts kube-apiserver (same port, same certificates) and waits for `/readyz`.
    pub async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let log = self.dir.join("kube-apiserver.log");
        let mut process = ManagedProcess::spawn(
            "kube-apiserver",
            &self.binaries.kube_apiserver,
            &self.apiserver_args,
            &log,
        )?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .context("building /readyz request")?;
            match self.admin.request_text(req).await {
                Ok(body) if body.trim() == "ok" => break,
                Ok(body) => last = body,
                // /readyz lists every check; only the failing ones ("[-]…") say anything.
                Err(kube::Error::Api(s)) => {
                    last = s
                        .message
                        .lines()
                        .filter(|l| l.starts_with("[-]"))
                        .collect::<Vec<_>>()
                        .join("; ")
                }
                Err(e) => last = e.to_string(),
            }
            if let Some(status) = process.exited() {
                bail!(
                    "{}: kube-apiserver exited ({status}) while starting; log {}:\n{}",
                    self.name,
                    log.display(),
                    process.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: kube-apiserver not ready after {READY_TIMEOUT:?} ({last}); log {}:\n{}",
                    self.name,
                    log.display(),
                    process.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.apiserver = Some(process);
        Ok(())
    }

    fn start_controller_manager(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("kube-controller-manager.log");
        self.controller_manager = Some(ManagedProcess::spawn(
            "kube-controller-manager",
            &self.binaries.kube_controller_manager,
            &self.controller_manager_args,
            &log,
        )?);
        Ok(())
    }

    fn start_scheduler(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("kube-scheduler.log");
        self.scheduler = Some(ManagedProcess::spawn(
            "kube-scheduler",
            &self.binaries.kube_scheduler,
            &self.scheduler_args,
            &log,
        )?);
        Ok(())
    }

    /// Server-side applies every CRD of `shared_api::crds()` and those of the cluster's
    /// `crd_dirs`, and waits until each is Established.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        let api: Api<CustomResourceDefinition> = Api::all(self.admin.clone());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut crds = shared_api::crds();
        for dir in &self.crd_dirs {
            crds.extend(read_crd_dir(dir)?);
        }
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            match api.patch(&name, &pp, &Patch::Apply(crd)).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    // Probe whether a plain create accepts what server-side apply rejected, so
                    // the error says which of the two is the problem.
                    let post = PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    };
                    let create = api.create(&post, crd).await;
                    bail!(
                        "server-side apply of CRD {name} rejected: {}; a plain create {}",
                        s.message,
                        match create {
                            Ok(_) => "was accepted".to_string(),
                            Err(e) => format!("failed too: {e}"),
                        }
                    );
                }
                Err(e) => return Err(e).with_context(|| format!("applying CRD {name}")),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            loop {
                let got = api
                    .get(&name)
                    .await
                    .with_context(|| format!("reading CRD {name}"))?;
                let conds = got.status.and_then(|s| s.conditions).unwrap_or_default();
                if conds
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} not Established after 30 s: {conds:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// `(component, pid)` of the running processes.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut out = Vec::new();
        if let Some(p) = &self.apiserver {
            out.push(("kube-apiserver", p.pid()));
        }
        if let Some(p) = &self.controller_manager {
            out.push(("kube-controller-manager", p.pid()));
        }
        if let Some(p) = &self.scheduler {
            out.push(("kube-scheduler", p.pid()));
        }
        out
    }

    /// Paths of the process logs.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        vec![
            self.dir.join("kube-apiserver.log"),
            self.dir.join("kube-controller-manager.log"),
            self.dir.join("kube-scheduler.log"),
        ]
    }

    /// Stops kube-scheduler, kube-controller-manager and kube-apiserver (our PIDs only).
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.scheduler.take() {
            p.stop(Duration::from_secs(5)).await;
        }
        if let Some(mut p) = self.controller_manager.take() {
            p.stop(Duration::from_secs(5)).await;
        }
        self.stop_apiserver().await;
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("server", &self.server_url())
            .field("dir", &self.dir)
            .field("pids", &self.pids())
            .finish_non_exhaustive()
    }
}

/// Server-side applies `crds` (as `manager`) and waits until each is Established.
pub async fn apply_crds(
    client: &kube::Client,
    crds: &[CustomResourceDefinition],
    manager: &str,
) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(crd),
        )
        .await
        .with_context(|| format!("installing CRD {name}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let conds = api
                .get(&name)
                .await
                .with_context(|| format!("reading CRD {name}"))?
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default();
            if conds
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("CRD {name} not Established after 30 s: {conds:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// The MachineConfig and MachineConfigPool CRDs of OpenShift's API module (provisioned),
/// installed on the cluster of `client`: what an OpenShift spoke serves.
pub async fn install_machineconfig_crds(
    client: &kube::Client,
    binaries: &Binaries,
    manager: &str,
) -> anyhow::Result<()> {
    let crds = read_crd_dir(&binaries.machineconfig_crds)?;
    let mut names: Vec<String> = crds
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    names.sort();
    if names
        != [
            "machineconfigpools.machineconfiguration.openshift.io",
            "machineconfigs.machineconfiguration.openshift.io",
        ]
    {
        bail!(
            "CRDs in {}: {names:?}",
            binaries.machineconfig_crds.display()
        );
    }
    apply_crds(client, &crds, manager).await
}

/// Every CustomResourceDefinition in the `*.yaml` files of `dir` (sorted by file name).
pub fn read_crd_dir(dir: &Path) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    use serde::Deserialize as _;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)
                .with_context(|| format!("parsing {}", f.display()))?;
            if value.get("kind").and_then(|k| k.as_str()) == Some("CustomResourceDefinition") {
                out.push(
                    serde_yaml::from_value(value)
                        .with_context(|| format!("reading the CRD in {}", f.display()))?,
                );
            }
        }
    }
    Ok(out)
}

/// A kubeconfig (YAML) for `server` authenticating with a bearer token.
pub fn token_kubeconfig_yaml(name: &str, server: &str, ca_pem: &str, token: &str) -> String {
    kubeconfig_yaml(name, server, ca_pem, User::Token(token))
}

enum User<'a> {
    Cert(&'a str, &'a str),
    Token(&'a str),
}

fn kubeconfig_yaml(name: &str, server: &str, ca_pem: &str, user: User<'_>) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let user = match user {
        User::Cert(cert, key) => serde_json::json!({
            "client-certificate-data": b64(cert),
            "client-key-data": b64(key),
        }),
        User::Token(token) => serde_json::json!({ "token": token }),
    };
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": name, "cluster": { "server": server, "certificate-authority-data": b64(ca_pem) } }],
        "users": [{ "name": name, "user": user }],
        "contexts": [{ "name": name, "context": { "cluster": name, "user": name } }],
        "current-context": name,
    });
    serde_yaml::to_string(&doc).unwrap_or_default()
}

async fn client_from_yaml(yaml: &str) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing generated kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading generated kubeconfig")?;
    kube::Client::try_from(config).context("building kube client")
}

fn random_token() -> String {
    use rand::Rng as _;
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

/// Writes a file only its owner may read (keys, tokens, kubeconfigs).
pub fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}
