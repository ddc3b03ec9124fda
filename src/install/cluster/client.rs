//! The connection to the cluster and what the installer does with live objects: discovery per
//! kind, get, server-side apply, list what is ours, delete, wait until gone.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use kube::{Client, Config};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::install::render::{LABEL_OWNED_BY, OWNER, Object};

/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "meshctl";

/// Kinds the installer may have created (besides CRDs); prune and uninstall look here.
pub const OWNED_KINDS: &[(&str, &str)] = &[
    (
        "admissionregistration.k8s.io/v1",
        "MutatingWebhookConfiguration",
    ),
    ("gateway.networking.k8s.io/v1", "GatewayClass"),
    ("policy/v1", "PodDisruptionBudget"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("v1", "ServiceAccount"),
    ("v1", "Namespace"),
];
pub(super) const CRD: (&str, &str) = ("apiextensions.k8s.io/v1", "CustomResourceDefinition");

/// One line on a failed connection: unreachable, unauthorized or forbidden.
pub fn one_line(e: &kube::Error, server: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 401 => {
            format!(
                "unauthorized by the Kubernetes API server at {server} (check your credentials)"
            )
        }
        kube::Error::Api(s) if s.code == 403 => {
            format!(
                "forbidden by the Kubernetes API server at {server}: {}",
                s.message
            )
        }
        other => {
            let mut cause: &dyn std::error::Error = other;
            while let Some(next) = cause.source() {
                cause = next;
            }
            format!("cannot reach the Kubernetes API server at {server}: {cause}")
        }
    }
}

/// A reference to a live object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LiveRef {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl LiveRef {
    pub fn of(o: &Object) -> Self {
        LiveRef {
            api_version: o.api_version().to_owned(),
            kind: o.kind().to_owned(),
            namespace: o.namespace().map(str::to_owned),
            name: o.name().to_owned(),
        }
    }
    fn group(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map(|(g, _)| g)
            .unwrap_or("")
    }
    pub(super) fn same(&self, other: &LiveRef) -> bool {
        self.group() == other.group()
            && self.kind == other.kind
            && self.namespace == other.namespace
            && self.name == other.name
    }
}

impl std::fmt::Display for LiveRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

pub struct Cluster {
    pub client: Client,
    pub server: String,
    kinds: Mutex<HashMap<(String, String), (ApiResource, bool)>>,
}

impl Cluster {
    /// Connect with `--kubeconfig`/`--context` (else `$KUBECONFIG`, `~/.kube/config`,
    /// in-cluster) and check that the server answers and accepts us.
    pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Self> {
        let opts = kube::config::KubeConfigOptions {
            context: context.map(str::to_owned),
            ..Default::default()
        };
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
                Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| anyhow!("kubeconfig {}: {e}", path.display()))?
            }
            None if context.is_some() => Config::from_kubeconfig(&opts)
                .await
                .map_err(|e| anyhow!("kubeconfig: {e}"))?,
            None => Config::infer().await.map_err(|e| {
                anyhow!("no cluster configuration (set KUBECONFIG or use --kubeconfig): {e}")
            })?,
        };
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| anyhow!("Kubernetes client: {e}"))?;
        // Reachable and authenticated: list namespaces (needs credentials, unlike /version).
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        ns.list_metadata(&ListParams::default().limit(1))
            .await
            .map_err(|e| anyhow!("{}", one_line(&e, &server)))?;
        Ok(Cluster {
            client,
            server,
            kinds: Mutex::new(HashMap::new()),
        })
    }

    /// From an existing client (tests); `server` is only used in messages.
    pub fn from_client(client: Client, server: &str) -> Self {
        Cluster {
            client,
            server: server.to_owned(),
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// The API resource of a kind, `None` when the server does not serve it.
    pub(super) async fn resource(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Result<Option<(ApiResource, bool)>> {
        let key = (api_version.to_owned(), kind.to_owned());
        if let Some(r) = self.kinds.lock().await.get(&key) {
            return Ok(Some(r.clone()));
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((ar, caps)) => {
                let r = (ar, caps.scope == Scope::Namespaced);
                self.kinds.lock().await.insert(key, r.clone());
                Ok(Some(r))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(kube::Error::Discovery(_)) => Ok(None),
            Err(e) => Err(anyhow!("discovering {api_version} {kind}: {e}")),
        }
    }

    async fn api(&self, r: &LiveRef) -> Result<Option<Api<DynamicObject>>> {
        let Some((ar, namespaced)) = self.resource(&r.api_version, &r.kind).await? else {
            return Ok(None);
        };
        Ok(Some(match (&r.namespace, namespaced) {
            (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &ar),
            _ => Api::all_with(self.client.clone(), &ar),
        }))
    }

    /// Forget discovery results (after CRDs were created or deleted).
    pub async fn forget_kinds(&self) {
        self.kinds.lock().await.clear();
    }

    pub async fn get(&self, r: &LiveRef) -> Result<Option<Value>> {
        let Some(api) = self.api(r).await? else {
            return Ok(None);
        };
        match api.get_opt(&r.name).await {
            Ok(o) => Ok(o.map(|o| serde_json::to_value(o).expect("objects serialize"))),
            // The kind itself is gone (its CRD was deleted since discovery).
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(anyhow!("reading {r}: {e}")),
        }
    }

    /// Server-side apply (forced: meshctl owns every field it renders).
    pub async fn apply(&self, o: &Object, dry_run: bool) -> Result<Value> {
        let r = LiveRef::of(o);
        let api = self
            .api(&r)
            .await?
            .ok_or_else(|| anyhow!("applying {r}: the server does not serve {}", r.api_version))?;
        let mut pp = PatchParams::apply(FIELD_MANAGER).force();
        if dry_run {
            pp = pp.dry_run();
        }
        let out = api
            .patch(&r.name, &pp, &Patch::Apply(&o.value))
            .await
            .map_err(|e| anyhow!("applying {r}: {e}"))?;
        Ok(serde_json::to_value(out).expect("objects serialize"))
    }

    /// Every live object labelled as ours, of the given kinds.
    pub async fn owned(&self, kinds: &[(&str, &str)]) -> Result<Vec<LiveRef>> {
        let mut out = Vec::new();
        let lp = ListParams::default().labels(&format!("{LABEL_OWNED_BY}={OWNER}"));
        for (api_version, kind) in kinds {
            let Some((ar, _)) = self.resource(api_version, kind).await? else {
                continue;
            };
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let list = api
                .list_metadata(&lp)
                .await
                .map_err(|e| anyhow!("listing {kind}: {e}"))?;
            for item in list.items {
                out.push(LiveRef {
                    api_version: (*api_version).to_owned(),
                    kind: (*kind).to_owned(),
                    namespace: item.metadata.namespace.clone(),
                    name: item.metadata.name.clone().unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    /// Delete; `false` when it was already gone.
    pub async fn delete(&self, r: &LiveRef) -> Result<bool> {
        let Some(api) = self.api(r).await? else {
            return Ok(false);
        };
        match api.delete(&r.name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(anyhow!("deleting {r}: {e}")),
        }
    }

    pub(super) async fn namespace_exists(&self, ns: &str) -> Result<bool> {
        Ok(self
            .get(&LiveRef {
                api_version: "v1".into(),
                kind: "Namespace".into(),
                namespace: None,
                name: ns.into(),
            })
            .await?
            .is_some())
    }
}

/// Wait until none of `refs` exists any more.
pub async fn wait_gone(cluster: &Cluster, refs: &[LiveRef], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut left = Vec::new();
        for r in refs {
            if cluster.get(r).await?.is_some() {
                left.push(r.to_string());
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "deleted, but still present after {timeout:?}: {}",
                left.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
