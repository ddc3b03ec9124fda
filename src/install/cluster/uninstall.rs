//! Uninstall: delete everything labelled as ours, and what the control plane published.

use std::time::Duration;

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};

use super::client::{CRD, Cluster, LiveRef, OWNED_KINDS, wait_gone};

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
