//! Gateway API status: GatewayClass `Accepted`; Gateway `Accepted`/`Programmed`, addresses
//! and listeners; HTTPRoute `status.parents` entries of our controllers (`Accepted`,
//! `ResolvedRefs`, ..., with `observedGeneration`). Written (merge patch on the status
//! subresource) only when they differ from what the object has, ignoring
//! `lastTransitionTime`, which is kept while a condition's status does not change.

use std::collections::{BTreeMap, HashMap};

use gateway_api::apis::standard::{
    gatewayclasses::GatewayClass, gateways::Gateway, httproutes::HttpRoute,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use mesh_translate::status::{Condition, GatewayStatus, RouteParentStatus};
use mesh_translate::{Resources, TranslateOptions, Warning};
use serde_json::{Value, json};

use super::gateways::{deployment_name, our_gateways};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

fn now() -> String {
    // Seconds precision, like the API server's own timestamps.
    Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| Timestamp::now())
        .to_string()
}

fn condition_json(
    c: &Condition,
    previous: Option<&Value>,
    fallback_generation: Option<i64>,
) -> Value {
    let status = if c.status { "True" } else { "False" };
    let time = previous
        .and_then(|conds| conds.as_array())
        .and_then(|a| {
            a.iter()
                .find(|p| p["type"] == c.type_.as_str() && p["status"] == status)
        })
        .and_then(|p| p["lastTransitionTime"].as_str().map(str::to_string))
        .unwrap_or_else(now);
    json!({
        "type": c.type_.as_str(),
        "status": status,
        "reason": c.reason.as_str(),
        "message": c.message,
        "observedGeneration": c.observed_generation.or(fallback_generation).unwrap_or(0),
        "lastTransitionTime": time,
    })
}

fn strip_times(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("lastTransitionTime");
            m.values_mut().for_each(strip_times);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_times),
        _ => {}
    }
}

fn same(a: &Value, b: &Value) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    strip_times(&mut a);
    strip_times(&mut b);
    a == b
}

fn parent_ref_json(s: &RouteParentStatus) -> Value {
    let p = &s.parent_ref;
    let mut v = json!({"group": p.group, "kind": p.kind, "namespace": p.namespace, "name": p.name});
    if let Some(sn) = &p.section_name {
        v["sectionName"] = json!(sn);
    }
    if let Some(port) = p.port {
        v["port"] = json!(port);
    }
    v
}

/// Remembers what was written at which resourceVersion, so a write the reflector has not
/// delivered yet is not repeated.
#[derive(Default)]
pub struct StatusWriter {
    written: HashMap<String, (String, Value)>,
    last_warnings: Vec<Warning>,
}

impl StatusWriter {
    fn skip(&self, key: &str, resource_version: &str, desired: &Value) -> bool {
        self.written
            .get(key)
            .is_some_and(|(rv, d)| rv == resource_version && same(d, desired))
    }

    pub async fn write(
        &mut self,
        client: &Client,
        resources: &Resources,
        options: &TranslateOptions,
    ) {
        let options = TranslateOptions {
            gateways: Vec::new(),
            ..options.clone()
        };
        let t = mesh_translate::translate(resources, &options);
        if t.warnings != self.last_warnings {
            for w in &t.warnings {
                tracing::warn!("{w}");
            }
            self.last_warnings = t.warnings.clone();
        }
        self.gateway_classes(client, resources, &options).await;
        self.gateways(client, resources, &options, &t.gateway_status)
            .await;
        self.routes(client, resources, &options, &t.route_status)
            .await;
    }

    async fn patch<K>(&mut self, api: Api<K>, key: String, rv: String, name: &str, status: Value)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(%key, "status written");
                self.written.insert(key, (rv, status));
            }
            Err(e) => tracing::warn!(%key, "status write failed: {e}"),
        }
    }

    async fn gateway_classes(
        &mut self,
        client: &Client,
        resources: &Resources,
        options: &TranslateOptions,
    ) {
        for class in &resources.gateway_classes {
            if !options
                .controller_names
                .contains(&class.spec.controller_name)
            {
                continue;
            }
            let existing = serde_json::to_value(&class.status).unwrap_or(Value::Null);
            let accepted = Condition {
                type_: mesh_translate::status::ConditionType::Accepted,
                status: true,
                reason: mesh_translate::status::Reason::Accepted,
                message: format!("Handled by meshctl ({})", class.spec.controller_name),
                observed_generation: class.metadata.generation,
            };
            let desired = json!({
                "conditions": [condition_json(&accepted, existing.get("conditions"), None)],
            });
            let current =
                json!({"conditions": existing.get("conditions").cloned().unwrap_or(json!([]))});
            let name = class.name_any();
            let key = format!("GatewayClass/{name}");
            let rv = class.resource_version().unwrap_or_default();
            if same(&current, &desired) || self.skip(&key, &rv, &desired) {
                continue;
            }
            self.patch(
                Api::<GatewayClass>::all(client.clone()),
                key,
                rv,
                &name,
                desired,
            )
            .await;
        }
    }

    async fn gateways(
        &mut self,
        client: &Client,
        resources: &Resources,
        options: &TranslateOptions,
        statuses: &[GatewayStatus],
    ) {
        for g in our_gateways(resources, &options.controller_names) {
            let gw = g.gateway;
            let ns = gw.namespace().unwrap_or_default();
            let name = gw.name_any();
            let Some(st) = statuses
                .iter()
                .find(|s| s.namespace == ns && s.name == name)
            else {
                continue;
            };
            let existing = serde_json::to_value(&gw.status).unwrap_or(Value::Null);
            // Addresses of the Service we deployed: load-balancer ingress, else the cluster IP.
            let svc_name = deployment_name(&name, &g.class);
            let mut addresses = Vec::new();
            if let Some(svc) = resources.services.iter().find(|s| {
                s.metadata.namespace.as_deref() == Some(&ns)
                    && s.metadata.name.as_deref() == Some(&svc_name)
            }) {
                for ing in svc
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .into_iter()
                    .flatten()
                {
                    if let Some(ip) = &ing.ip {
                        addresses.push(json!({"type": "IPAddress", "value": ip}));
                    } else if let Some(h) = &ing.hostname {
                        addresses.push(json!({"type": "Hostname", "value": h}));
                    }
                }
                if addresses.is_empty()
                    && let Some(ip) = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_ref())
                    && ip != "None"
                    && !ip.is_empty()
                {
                    addresses.push(json!({"type": "IPAddress", "value": ip}));
                }
            }
            let mut conditions = Vec::new();
            for c in &st.conditions {
                let mut c = c.clone();
                if c.type_ == mesh_translate::status::ConditionType::Programmed
                    && c.status
                    && addresses.is_empty()
                {
                    c.status = false;
                    c.message = format!("the Service {ns}/{svc_name} has no address yet");
                    let mut v =
                        condition_json(&c, existing.get("conditions"), gw.metadata.generation);
                    v["reason"] = json!("AddressNotAssigned");
                    conditions.push(v);
                    continue;
                }
                conditions.push(condition_json(
                    &c,
                    existing.get("conditions"),
                    gw.metadata.generation,
                ));
            }
            let old_listeners: BTreeMap<String, Value> = existing
                .get("listeners")
                .and_then(|l| l.as_array())
                .into_iter()
                .flatten()
                .filter_map(|l| Some((l["name"].as_str()?.to_string(), l["conditions"].clone())))
                .collect();
            let listeners: Vec<Value> = st
                .listeners
                .iter()
                .map(|l| {
                    let prev = old_listeners.get(&l.name);
                    json!({
                        "name": l.name,
                        "attachedRoutes": l.attached_routes,
                        "supportedKinds": l.supported_kinds.iter().map(|k| json!({"group": GATEWAY_GROUP, "kind": k})).collect::<Vec<_>>(),
                        "conditions": l.conditions.iter().map(|c| condition_json(c, prev, gw.metadata.generation)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let desired =
                json!({"conditions": conditions, "addresses": addresses, "listeners": listeners});
            let current = json!({
                "conditions": existing.get("conditions").cloned().unwrap_or(json!([])),
                "addresses": existing.get("addresses").cloned().unwrap_or(json!([])),
                "listeners": existing.get("listeners").cloned().unwrap_or(json!([])),
            });
            let key = format!("Gateway/{ns}/{name}");
            let rv = gw.resource_version().unwrap_or_default();
            if same(&current, &desired) || self.skip(&key, &rv, &desired) {
                continue;
            }
            self.patch(
                Api::<Gateway>::namespaced(client.clone(), &ns),
                key,
                rv,
                &name,
                desired,
            )
            .await;
        }
    }

    async fn routes(
        &mut self,
        client: &Client,
        resources: &Resources,
        options: &TranslateOptions,
        statuses: &[RouteParentStatus],
    ) {
        let mut by_route: BTreeMap<(String, String), Vec<&RouteParentStatus>> = BTreeMap::new();
        for s in statuses {
            by_route
                .entry((s.route_namespace.clone(), s.route_name.clone()))
                .or_default()
                .push(s);
        }
        for route in &resources.http_routes {
            let ns = route.namespace().unwrap_or_default();
            let name = route.name_any();
            let existing = serde_json::to_value(&route.status).unwrap_or(Value::Null);
            let old_parents: Vec<Value> = existing
                .get("parents")
                .and_then(|p| p.as_array())
                .cloned()
                .unwrap_or_default();
            let ours = |p: &Value| {
                p["controllerName"]
                    .as_str()
                    .is_some_and(|c| options.controller_names.iter().any(|o| o == c))
            };
            let mine = by_route.get(&(ns.clone(), name.clone()));
            if mine.is_none() && !old_parents.iter().any(ours) {
                continue;
            }
            // Others' entries stay as they are.
            let mut parents: Vec<Value> =
                old_parents.iter().filter(|p| !ours(p)).cloned().collect();
            for s in mine.into_iter().flatten() {
                let pref = parent_ref_json(s);
                let prev = old_parents
                    .iter()
                    .find(|p| {
                        p["parentRef"] == pref && p["controllerName"] == s.controller_name.as_str()
                    })
                    .map(|p| &p["conditions"]);
                parents.push(json!({
                    "parentRef": pref,
                    "controllerName": s.controller_name,
                    "conditions": s.conditions.iter().map(|c| condition_json(c, prev, route.metadata.generation)).collect::<Vec<_>>(),
                }));
            }
            let desired = json!({"parents": parents});
            let current = json!({"parents": old_parents});
            let key = format!("HTTPRoute/{ns}/{name}");
            let rv = route.resource_version().unwrap_or_default();
            if same(&current, &desired) || self.skip(&key, &rv, &desired) {
                continue;
            }
            self.patch(
                Api::<HttpRoute>::namespaced(client.clone(), &ns),
                key,
                rv,
                &name,
                desired,
            )
            .await;
        }
    }
}
