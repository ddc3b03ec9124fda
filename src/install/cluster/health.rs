//! Whether the install is healthy: readiness of what was applied (with the reasons of a
//! Deployment that is not ready), and `verify-install`'s comparison of the live cluster with
//! the rendered manifests.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::apply::{drift, plan};
use super::client::{Cluster, LiveRef};
use crate::install::profile::Resolved;
use crate::install::render::{Component, Object};
use crate::install::values::NAMESPACE;

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
