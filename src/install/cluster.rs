//! The cluster side of the installer: connection, server-side apply, prune, diff, readiness,
//! verify and uninstall. Objects are handled as dynamic objects (discovery per kind).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Scope;
use kube::{Client, Config};
use serde_json::Value;
use tokio::sync::Mutex;

use super::certs::{self, SECRET_NAME, WebhookTls};
use super::profile::Resolved;
use super::render::{self, Component, LABEL_OWNED_BY, OWNER, Object};
use super::values::NAMESPACE;

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
const CRD: (&str, &str) = ("apiextensions.k8s.io/v1", "CustomResourceDefinition");

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
    fn same(&self, other: &LiveRef) -> bool {
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
    async fn resource(&self, api_version: &str, kind: &str) -> Result<Option<(ApiResource, bool)>> {
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

    async fn namespace_exists(&self, ns: &str) -> Result<bool> {
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

/// What an install will do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub profile: String,
    /// Objects to apply, in order.
    pub objects: Vec<Object>,
    /// Gateway API and Istio CRDs already in the cluster and not ours: left alone.
    pub kept_crds: Vec<String>,
    /// Live objects of ours that the render no longer contains.
    pub prune: Vec<LiveRef>,
}

/// The webhook certificate to use: the live Secret's while reusable, else a new one.
pub async fn webhook_tls(cluster: &Cluster, resolved: &Resolved) -> Result<Option<WebhookTls>> {
    let v = &resolved.values;
    if !v.webhook.enabled || !v.webhook.ca_bundle.is_empty() {
        return Ok(None);
    }
    let names = certs::required_names(v);
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    if let Some(s) = secrets
        .get_opt(SECRET_NAME)
        .await
        .with_context(|| format!("reading Secret {NAMESPACE}/{SECRET_NAME}"))?
    {
        let ann = s.metadata.annotations.unwrap_or_default();
        let data: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        if let Some(tls) = certs::reuse(&ann, &data, &names) {
            return Ok(Some(tls));
        }
    }
    Ok(Some(
        certs::generate(&names).context("generating the webhook certificate")?,
    ))
}

/// Render against the cluster: certificate, CRDs to keep, objects to prune.
pub async fn plan(cluster: &Cluster, resolved: &Resolved) -> Result<Plan> {
    let tls = webhook_tls(cluster, resolved).await?;
    let mut objects = render::render(resolved, tls.as_ref())?;
    let mut kept_crds = Vec::new();
    let mut keep = Vec::new();
    for o in objects.drain(..) {
        if matches!(
            o.component,
            Component::GatewayApiCrds | Component::IstioCrds
        ) && let Some(live) = cluster.get(&LiveRef::of(&o)).await?
            && live["metadata"]["labels"][LABEL_OWNED_BY] != OWNER
        {
            kept_crds.push(o.name().to_owned());
            continue;
        }
        keep.push(o);
    }
    let objects = keep;
    let wanted: Vec<LiveRef> = objects.iter().map(LiveRef::of).collect();
    let prune = cluster
        .owned(OWNED_KINDS)
        .await?
        .into_iter()
        .filter(|r| !wanted.iter().any(|w| w.same(r)))
        .collect();
    Ok(Plan {
        profile: resolved.profile.clone(),
        objects,
        kept_crds,
        prune,
    })
}

/// What happened to each applied object.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    pub created: Vec<String>,
    pub configured: Vec<String>,
    pub unchanged: Vec<String>,
    pub pruned: Vec<String>,
}

async fn wait_crds_established(
    cluster: &Cluster,
    names: &[String],
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    for name in names {
        let r = LiveRef {
            api_version: CRD.0.into(),
            kind: CRD.1.into(),
            namespace: None,
            name: name.clone(),
        };
        loop {
            let live = cluster.get(&r).await?;
            let established = live
                .as_ref()
                .and_then(|l| l["status"]["conditions"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True");
            if established {
                break;
            }
            if start.elapsed() > timeout {
                return Err(anyhow!(
                    "CustomResourceDefinition {name} is not Established after {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.forget_kinds().await;
    Ok(())
}

/// Apply the plan in order (CRDs first, waiting until they are established), then prune.
/// Pruned objects get `prune_timeout` to be gone (a namespace takes a while).
pub async fn apply_plan(
    cluster: &Cluster,
    plan: &Plan,
    prune_timeout: Duration,
) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    let mut crds = Vec::new();
    let mut crds_done = false;
    for o in &plan.objects {
        if o.kind() != "CustomResourceDefinition" && !crds_done {
            wait_crds_established(cluster, &crds, Duration::from_secs(60)).await?;
            crds_done = true;
        }
        let r = LiveRef::of(o);
        let before = cluster
            .get(&r)
            .await?
            .and_then(|l| l["metadata"]["resourceVersion"].as_str().map(str::to_owned));
        let after = cluster.apply(o, false).await?;
        let rv = after["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_owned);
        let line = r.to_string();
        match before {
            None => report.created.push(line),
            Some(b) if Some(&b) == rv.as_ref() => report.unchanged.push(line),
            Some(_) => report.configured.push(line),
        }
        if o.kind() == "CustomResourceDefinition" {
            crds.push(o.name().to_owned());
        }
    }
    if !crds_done {
        wait_crds_established(cluster, &crds, Duration::from_secs(60)).await?;
    }
    let mut pruned = Vec::new();
    for r in &plan.prune {
        if cluster.delete(r).await? {
            report.pruned.push(r.to_string());
            pruned.push(r.clone());
        }
    }
    wait_gone(cluster, &pruned, prune_timeout).await?;
    Ok(report)
}

/// Remove fields the server manages, for comparing.
pub fn strip_server_fields(v: &mut Value) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "managedFields",
            "resourceVersion",
            "generation",
            "uid",
            "creationTimestamp",
        ] {
            m.remove(k);
        }
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
}

/// How a server-side dry-run apply of `o` would change `live`: a unified diff headed
/// `live <what>` / `<label> <what>`, or `None` when it would change nothing (server fields
/// aside).
async fn drift(
    cluster: &Cluster,
    o: &Object,
    live: &mut Value,
    what: &dyn std::fmt::Display,
    label: &str,
    context: usize,
) -> Result<Option<String>> {
    let mut dry = cluster.apply(o, true).await?;
    strip_server_fields(live);
    strip_server_fields(&mut dry);
    if *live == dry {
        return Ok(None);
    }
    let (a, b) = (yaml(live), yaml(&dry));
    Ok(Some(
        similar::TextDiff::from_lines(&a, &b)
            .unified_diff()
            .context_radius(context)
            .header(&format!("live {what}"), &format!("{label} {what}"))
            .to_string(),
    ))
}

fn yaml(v: &Value) -> String {
    serde_saphyr::to_string(v).unwrap_or_default()
}

/// A change the install would make.
#[derive(Debug, Clone)]
pub enum Change {
    Create { what: String, validated: bool },
    Update { what: String, diff: String },
    Prune { what: String },
}

/// Compare the plan with the live cluster without changing it (server-side dry-run where
/// the server can validate: namespaced objects whose namespace exists, kinds it serves).
pub async fn diff(cluster: &Cluster, plan: &Plan) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    let ns_exists = cluster.namespace_exists(NAMESPACE).await?;
    for o in &plan.objects {
        let r = LiveRef::of(o);
        let servable = cluster.resource(&r.api_version, &r.kind).await?.is_some()
            && (o.namespace().is_none() || ns_exists);
        let live = if servable {
            cluster.get(&r).await?
        } else {
            None
        };
        match live {
            None => {
                if servable {
                    cluster.apply(o, true).await?;
                }
                changes.push(Change::Create {
                    what: r.to_string(),
                    validated: servable,
                });
            }
            Some(mut live) => {
                if let Some(diff) = drift(cluster, o, &mut live, &r, "after install", 3).await? {
                    changes.push(Change::Update {
                        what: r.to_string(),
                        diff,
                    });
                }
            }
        }
    }
    for r in &plan.prune {
        changes.push(Change::Prune {
            what: r.to_string(),
        });
    }
    Ok(changes)
}

/// Why a live object is not ready, `None` when it is. Deployments: rolled out and available;
/// CRDs: established; everything else: it exists.
pub fn not_ready_reason(kind: &str, live: &Value) -> Option<String> {
    let status = &live["status"];
    match kind {
        "Deployment" => {
            let want = live["spec"]["replicas"].as_i64().unwrap_or(1);
            let generation = live["metadata"]["generation"].as_i64().unwrap_or(0);
            let observed = status["observedGeneration"].as_i64().unwrap_or(0);
            let n = |k: &str| status[k].as_i64().unwrap_or(0);
            if observed < generation {
                Some("the new spec is not observed yet".into())
            } else if n("updatedReplicas") < want {
                Some(format!("{}/{want} replicas updated", n("updatedReplicas")))
            } else if n("availableReplicas") < want {
                Some(format!(
                    "{}/{want} replicas available",
                    n("availableReplicas")
                ))
            } else if n("replicas") > want {
                Some(format!(
                    "{} old replicas still terminating",
                    n("replicas") - want
                ))
            } else {
                None
            }
        }
        "CustomResourceDefinition" => {
            let ok = status["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            });
            (!ok).then(|| "not Established".into())
        }
        _ => None,
    }
}

fn conditions_text(v: &Value) -> Vec<String> {
    v["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    format!(
                        "{}={} {}: {}",
                        c["type"].as_str().unwrap_or("?"),
                        c["status"].as_str().unwrap_or("?"),
                        c["reason"].as_str().unwrap_or(""),
                        c["message"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Why a Deployment is not ready, at length: its conditions, its pods and their events.
pub async fn explain_deployment(cluster: &Cluster, live: &Value) -> Result<String> {
    use k8s_openapi::api::core::v1::{Event, Pod};
    let ns = live["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE);
    let mut out = Vec::new();
    for c in conditions_text(live) {
        out.push(format!("  condition {c}"));
    }
    let selector: Vec<String> = live["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&selector.join(",")))
        .await?;
    if list.items.is_empty() {
        out.push("  no pods".into());
    }
    for p in list.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let st = p.status.clone().unwrap_or_default();
        let mut line = format!("  pod {name}: {}", st.phase.unwrap_or_default());
        for cs in st.container_statuses.unwrap_or_default() {
            if let Some(w) = cs.state.and_then(|s| s.waiting) {
                line.push_str(&format!(
                    "; {} waiting: {} {}",
                    cs.name,
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                ));
            }
        }
        for c in st.conditions.unwrap_or_default() {
            if c.status != "True" {
                line.push_str(&format!(
                    "; {} {} {}",
                    c.type_,
                    c.reason.unwrap_or_default(),
                    c.message.unwrap_or_default()
                ));
            }
        }
        out.push(line);
        let evs = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await?;
        for e in evs.items.iter().rev().take(5) {
            out.push(format!(
                "    event {} {}: {}",
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            ));
        }
    }
    Ok(out.join("\n"))
}

/// Wait until every object of `objects` is ready, calling `progress(component, done)` as
/// components become ready. On timeout: which objects are not ready, and why.
pub async fn wait_ready(
    cluster: &Cluster,
    objects: &[Object],
    timeout: Duration,
    mut progress: impl FnMut(Component, Option<&str>),
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&Object> = objects
        .iter()
        .filter(|o| matches!(o.kind(), "Deployment" | "CustomResourceDefinition"))
        .collect();
    let mut components: Vec<Component> = objects.iter().map(|o| o.component).collect();
    components.dedup();
    loop {
        let mut still = Vec::new();
        let mut reasons = Vec::new();
        for o in pending {
            let r = LiveRef::of(o);
            match cluster.get(&r).await? {
                None => {
                    reasons.push((o, "does not exist".to_string(), None));
                    still.push(o);
                }
                Some(live) => {
                    if let Some(why) = not_ready_reason(o.kind(), &live) {
                        progress(o.component, Some(&format!("{r}: {why}")));
                        reasons.push((o, why, Some(live)));
                        still.push(o);
                    }
                }
            }
        }
        for c in &components {
            if !still.iter().any(|o| o.component == *c) {
                progress(*c, None);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut msg = format!("not ready after {timeout:?}:");
            for (o, why, live) in reasons {
                msg.push_str(&format!("\n{}: {why}", o.describe()));
                if let (Some(live), "Deployment") = (live, o.kind()) {
                    let detail = explain_deployment(cluster, &live)
                        .await
                        .unwrap_or_else(|e| format!("  (could not read its pods: {e})"));
                    msg.push('\n');
                    msg.push_str(&detail);
                }
            }
            return Err(anyhow!(msg));
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A problem found by verify.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    Missing(String),
    Drifted { what: String, diff: String },
    NotReady { what: String, why: String },
    Unexpected(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Missing(w) => write!(f, "missing: {w}"),
            Problem::Drifted { what, diff } => write!(f, "drifted: {what}\n{diff}"),
            Problem::NotReady { what, why } => write!(f, "not ready: {what}: {why}"),
            Problem::Unexpected(w) => {
                write!(f, "not in the rendered manifests (would be pruned): {w}")
            }
        }
    }
}

/// Live cluster against the rendered manifests.
pub async fn verify(cluster: &Cluster, resolved: &Resolved) -> Result<(usize, Vec<Problem>)> {
    let plan = plan(cluster, resolved).await?;
    let mut problems = Vec::new();
    let ns_exists = cluster.namespace_exists(NAMESPACE).await?;
    for o in &plan.objects {
        let r = LiveRef::of(o);
        let served = cluster.resource(&r.api_version, &r.kind).await?.is_some();
        let live = if served && (o.namespace().is_none() || ns_exists) {
            cluster.get(&r).await?
        } else {
            None
        };
        let Some(mut live) = live else {
            problems.push(Problem::Missing(r.to_string()));
            continue;
        };
        if let Some(why) = not_ready_reason(o.kind(), &live) {
            problems.push(Problem::NotReady {
                what: r.to_string(),
                why,
            });
        }
        if let Some(diff) = drift(cluster, o, &mut live, &r, "rendered", 2).await? {
            problems.push(Problem::Drifted {
                what: r.to_string(),
                diff,
            });
        }
    }
    for r in plan.prune {
        problems.push(Problem::Unexpected(r.to_string()));
    }
    Ok((plan.objects.len(), problems))
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

/// Delete everything labelled as ours (CRDs too with `purge`), webhooks first, the namespace
/// last, and wait until it is gone. Returns what was deleted.
pub async fn uninstall(cluster: &Cluster, purge: bool, timeout: Duration) -> Result<Vec<LiveRef>> {
    let mut kinds: Vec<(&str, &str)> = OWNED_KINDS.to_vec();
    if purge {
        kinds.push(CRD);
    }
    let mut deleted = Vec::new();
    for kind in &kinds {
        for r in cluster.owned(std::slice::from_ref(kind)).await? {
            if cluster.delete(&r).await? {
                deleted.push(r);
            }
        }
    }
    let (crds, others): (Vec<LiveRef>, Vec<LiveRef>) =
        deleted.iter().cloned().partition(|r| r.kind == CRD.1);
    wait_gone(cluster, &others, timeout).await?;
    // What meshd published itself: the CA root ConfigMap in every namespace (meshd is gone
    // now, so nothing writes them again).
    let (key, value) = crate::controlplane::ca_root::PUBLISHED_LABEL;
    let ca_copies: Api<ConfigMap> = Api::all(cluster.client.clone());
    let lp = ListParams::default().labels(&format!("{key}={value}"));
    let published = ca_copies
        .list_metadata(&lp)
        .await
        .map_err(|e| anyhow!("listing ConfigMaps {key}={value}: {e}"))?;
    for cm in published.items {
        let r = LiveRef {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: cm.metadata.namespace.clone(),
            name: cm.metadata.name.clone().unwrap_or_default(),
        };
        if cluster.delete(&r).await? {
            deleted.push(r);
        }
    }
    if purge {
        // A deleted CRD is gone once the API server's cleanup has removed its objects and torn
        // down its storage, which can take minutes while other clients still watch the kind.
        // Like `kubectl delete --wait=false`, wait a little, then leave them terminating.
        let crd_wait = timeout.min(Duration::from_secs(20));
        if let Err(e) = wait_gone(cluster, &crds, crd_wait).await {
            tracing::warn!(
                "CRDs are terminating; the API server removes them when its cleanup finishes ({e})"
            );
        }
        cluster.forget_kinds().await;
    }
    Ok(deleted)
}
