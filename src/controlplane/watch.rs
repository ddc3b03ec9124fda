//! Reflectors for everything the translator reads, and the debounced publisher of
//! [`World`]s. Kinds whose CRD is absent (EnvoyFilter, PeerAuthentication, RateLimitPolicy,
//! even Gateway API) are tolerated: their watcher retries with backoff and starts delivering
//! once the CRD is installed.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_api::apis::standard::{
    gatewayclasses::GatewayClass, gateways::Gateway, httproutes::HttpRoute,
    referencegrants::ReferenceGrant,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use mesh_translate::{EnvoyFilter, PeerAuthentication, RateLimitPolicy, Resources};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use super::pods;
use super::unlisted::Unlisted;
use super::world::World;

/// Label on the Deployments (and pods) of Gateways we deploy.
pub use mesh_wire::names::GATEWAY_NAME_LABEL;

/// The reflector stores.
#[derive(Clone)]
pub struct Stores {
    pub gateway_classes: Store<GatewayClass>,
    pub gateways: Store<Gateway>,
    pub http_routes: Store<HttpRoute>,
    pub reference_grants: Store<ReferenceGrant>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub namespaces: Store<Namespace>,
    pub rate_limit_policies: Store<RateLimitPolicy>,
    pub envoy_filters: Store<EnvoyFilter>,
    /// Gateway Deployments (label `gateway.networking.k8s.io/gateway-name`): ready replicas.
    pub gateway_deployments: Store<Deployment>,
    pub peer_authentications: Store<PeerAuthentication>,
    /// Labels and service accounts of meshed pods.
    pub pods: pods::MeshedPods,
}

fn all<T>(store: &Store<T>) -> Vec<T>
where
    T: Resource + Clone + 'static,
    T::DynamicType: Eq + Hash + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

impl Stores {
    pub fn resources(&self) -> Resources {
        Resources {
            gateway_classes: all(&self.gateway_classes),
            gateways: all(&self.gateways),
            http_routes: all(&self.http_routes),
            reference_grants: all(&self.reference_grants),
            services: all(&self.services),
            endpoint_slices: all(&self.endpoint_slices),
            namespaces: all(&self.namespaces),
            rate_limit_policies: all(&self.rate_limit_policies),
            envoy_filters: all(&self.envoy_filters),
            operators: Vec::new(),
            peer_authentications: all(&self.peer_authentications),
            pods: self.pods.snapshot(),
        }
    }

    /// Ready replicas per Gateway `namespace/name`.
    pub fn gateway_replicas(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for d in self.gateway_deployments.state() {
            let ns = d.metadata.namespace.clone().unwrap_or_default();
            let Some(gw) = d
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            else {
                continue;
            };
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0)
                .max(0) as u32;
            *out.entry(format!("{ns}/{gw}")).or_insert(0) += ready;
        }
        out
    }
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changes: mpsc::UnboundedSender<()>,
    pending: Unlisted,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    pending.begin();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o| {
            o.meta_mut().managed_fields = None;
        })
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut settled = false;
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let settle = |settled: &mut bool| {
                if !*settled {
                    *settled = true;
                    pending.end();
                }
            };
            match event {
                Ok(watcher::Event::InitDone) => {
                    if failing {
                        tracing::info!(%kind, "watch established");
                    }
                    failing = false;
                    settle(&mut settled);
                    let _ = changes.send(());
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    let _ = changes.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!(%kind, "watch failed (retrying with backoff; a missing CRD is fine until it is installed): {e}");
                    } else {
                        tracing::debug!(%kind, "watch failed: {e}");
                    }
                    failing = true;
                    if !settled {
                        settle(&mut settled);
                        let _ = changes.send(());
                    }
                }
            }
        }
    });
    reader
}

/// Starts every reflector. `changes` gets a message on every change.
pub fn start(client: &Client, changes: mpsc::UnboundedSender<()>) -> (Stores, Unlisted) {
    let pending = Unlisted::default();
    let c = || watcher::Config::default();
    let stores = Stores {
        pods: pods::start(client, changes.clone(), pending.clone()),
        gateway_classes: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        gateways: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        http_routes: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        reference_grants: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        services: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        endpoint_slices: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        namespaces: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        rate_limit_policies: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        envoy_filters: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        peer_authentications: reflect(
            Api::all(client.clone()),
            c(),
            changes.clone(),
            pending.clone(),
        ),
        gateway_deployments: reflect(
            Api::all(client.clone()),
            c().labels(GATEWAY_NAME_LABEL),
            changes,
            pending.clone(),
        ),
    };
    (stores, pending)
}

/// Publishes a new [`World`] after each burst of changes: at most `debounce` after the first
/// change of a burst, and not before every watcher has listed once.
pub async fn publish_worlds(
    stores: Stores,
    pending: Unlisted,
    mut changes: mpsc::UnboundedReceiver<()>,
    worlds: watch::Sender<Option<Arc<World>>>,
    debounce: Duration,
) {
    let mut generation = 0u64;
    while changes.recv().await.is_some() {
        tokio::time::sleep(debounce).await;
        while changes.try_recv().is_ok() {}
        if pending.count() > 0 {
            continue;
        }
        generation += 1;
        let world = World::new(
            generation,
            Arc::new(stores.resources()),
            stores.gateway_replicas(),
        );
        tracing::debug!(generation, "new world");
        worlds.send_replace(Some(Arc::new(world)));
    }
}
