//! Install: the plan (render against the cluster: the webhook certificate, CRDs left alone,
//! objects to prune), applying it, and the diff of `install --dry-run`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::Value;

use super::client::{CRD, Cluster, LiveRef, OWNED_KINDS, wait_gone};
use crate::install::certs::{self, SECRET_NAME, WebhookTls};
use crate::install::profile::Resolved;
use crate::install::render::{self, Component, LABEL_OWNED_BY, OWNER, Object};
use crate::install::values::NAMESPACE;

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
pub(super) async fn drift(
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
