//! Istio `PeerAuthentication` → what a meshed pod's inbound side accepts
//! ([`mesh_config::InboundMtls`]), and whether its endpoints are reached over mutual TLS.
//!
//! Scopes and precedence as Istio's: a policy without a selector (or with empty
//! `matchLabels`) in a mesh root namespace is mesh-wide; one without a selector elsewhere is
//! namespace-wide; one with `selector.matchLabels` applies to the pods of its namespace
//! whose labels match (a selector in a root namespace: Istio applies nothing from it). The
//! workload policy beats the namespace one, which beats the mesh one; among several at one
//! scope the oldest wins (`creationTimestamp`, then namespace and name; objects without a
//! timestamp, from files, after those with one). `UNSET` (or no `mtls`) inherits the mode of
//! the enclosing scope, and `portLevelMtls` (workload policies only) `UNSET` the workload's
//! mode; with nothing set, `PERMISSIVE`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::{Selector, SelectorExt};
use mesh_config::{InboundMtls, MtlsMode};

use super::Ctx;
use super::mesh_options::trust_domain;
use crate::identity::{MeshedPod, is_meshed};
use crate::peer_authentication::{PeerAuthentication, ValidPolicy, read};
use crate::resources::{Resources, ns_name, pod_key};
use crate::{TranslateOptions, Warning};
use mesh_config::identity::spiffe_id;

/// One applicable policy.
struct Policy {
    /// `namespace/name`.
    name: String,
    valid: ValidPolicy,
    /// Built once from `valid.selector`.
    selector: Option<Selector>,
}

/// The PeerAuthentications sorted into their scopes, the meshed pods and the trust domain:
/// everything that decides a pod's inbound modes and its identity.
pub(crate) struct Peers<'a> {
    pub(crate) trust_domain: String,
    pods: &'a HashMap<String, Arc<MeshedPod>>,
    mesh: Option<Policy>,
    /// Namespace → its namespace-wide policy.
    namespaces: HashMap<String, Policy>,
    /// Namespace → its workload policies, oldest first.
    workloads: HashMap<String, Vec<Policy>>,
    /// What the translation reports once (not per pod): invalid, shadowed and ignored
    /// policies, conflicting trust domains.
    warnings: Vec<Warning>,
}

/// The inbound settings of one pod and the policies they came from (`namespace/name`).
pub(crate) struct Resolved {
    pub(crate) mtls: InboundMtls,
    pub(crate) from: Vec<String>,
}

impl<'a> Peers<'a> {
    pub(crate) fn new(res: &'a Resources, opts: &TranslateOptions) -> Peers<'a> {
        let (trust_domain, mut warnings) = trust_domain(res, opts);
        let default_ns = &opts.default_namespace;
        let mut policies: Vec<&PeerAuthentication> = res.peer_authentications.iter().collect();
        policies.sort_by_key(|p| age(p, default_ns));
        let mut peers = Peers {
            trust_domain,
            pods: &res.pods,
            mesh: None,
            namespaces: HashMap::new(),
            workloads: HashMap::new(),
            warnings: Vec::new(),
        };
        for pa in policies {
            let (ns, name) = ns_name(&pa.metadata, default_ns);
            let ctx = format!("PeerAuthentication {ns}/{name}");
            let valid = match read(pa) {
                Ok(v) => v,
                Err(problems) => {
                    for p in problems {
                        warnings.push(Warning::new(
                            &ctx,
                            format!("{p}; the PeerAuthentication is not applied"),
                        ));
                    }
                    continue;
                }
            };
            let in_root = opts.root_namespaces.contains(&ns);
            let policy = Policy {
                name: format!("{ns}/{name}"),
                selector: valid.selector.clone().map(Selector::from_iter),
                valid,
            };
            match (&policy.valid.selector, in_root) {
                (Some(_), true) => warnings.push(Warning::new(
                    &ctx,
                    format!(
                        "a selector in the mesh root namespace {ns}: Istio applies no workload policy from there; not applied"
                    ),
                )),
                (Some(_), false) => peers.workloads.entry(ns).or_default().push(policy),
                (None, true) => match &peers.mesh {
                    Some(first) => warnings.push(Warning::new(
                        &ctx,
                        format!(
                            "the mesh-wide policy is the older {}; not applied",
                            first.name
                        ),
                    )),
                    None => peers.mesh = Some(policy),
                },
                (None, false) => match peers.namespaces.get(&ns) {
                    Some(first) => warnings.push(Warning::new(
                        &ctx,
                        format!(
                            "the namespace-wide policy of {ns} is the older {}; not applied",
                            first.name
                        ),
                    )),
                    None => {
                        peers.namespaces.insert(ns, policy);
                    }
                },
            }
        }
        peers.warnings = warnings;
        peers
    }

    /// The mesh, namespace and workload policies that apply to a pod of namespace `ns` with
    /// `labels`, widest first.
    fn scopes(&self, ns: &str, labels: &BTreeMap<String, String>) -> [Option<&Policy>; 3] {
        let workload = self.workloads.get(ns).and_then(|ps| {
            ps.iter()
                .find(|p| p.selector.as_ref().is_some_and(|s| s.matches(labels)))
        });
        [self.mesh.as_ref(), self.namespaces.get(ns), workload]
    }

    /// The pod-wide mode: the narrowest scope's that is not `UNSET`, else `PERMISSIVE`.
    fn mode(scopes: &[Option<&Policy>; 3]) -> MtlsMode {
        scopes
            .iter()
            .rev()
            .flatten()
            .find_map(|p| p.valid.mode.resolved())
            .unwrap_or(MtlsMode::Permissive)
    }

    /// The inbound modes of a pod of namespace `ns` with `labels`.
    pub(crate) fn resolve(&self, ns: &str, labels: &BTreeMap<String, String>) -> Resolved {
        let scopes = self.scopes(ns, labels);
        let mode = Self::mode(&scopes);
        let ports = scopes[2]
            .map(|p| {
                p.valid
                    .ports
                    .iter()
                    .map(|(port, m)| (*port, m.resolved().unwrap_or(mode)))
                    .collect()
            })
            .unwrap_or_default();
        Resolved {
            mtls: InboundMtls { mode, ports },
            from: scopes.iter().flatten().map(|p| p.name.clone()).collect(),
        }
    }

    /// The mode of one port of a pod ([`Peers::resolve`] without building the whole answer:
    /// it is asked once per endpoint of every backend).
    fn mode_at(&self, ns: &str, labels: &BTreeMap<String, String>, port: u16) -> MtlsMode {
        let scopes = self.scopes(ns, labels);
        let mode = Self::mode(&scopes);
        scopes[2]
            .and_then(|p| p.valid.ports.get(&port))
            .map_or(mode, |m| m.resolved().unwrap_or(mode))
    }

    /// The identity the endpoint of pod `namespace/name` on `port` presents, when that pod
    /// is a meshed workload whose mode for the port is not `DISABLE` (then, as with Istio's
    /// automatic mutual TLS, it is sent plaintext).
    pub(crate) fn identity(&self, namespace: &str, name: &str, port: u16) -> Option<String> {
        let pod = self.pods.get(&pod_key(namespace, name))?;
        if !is_meshed(&pod.labels) {
            return None;
        }
        (self.mode_at(namespace, &pod.labels, port) != MtlsMode::Disable)
            .then(|| spiffe_id(&self.trust_domain, namespace, &pod.service_account))
    }
}

/// Objects with a timestamp first, oldest first; then by namespace and name.
fn age(p: &PeerAuthentication, default_ns: &str) -> (bool, Option<Time>, (String, String)) {
    let c = p.metadata.creation_timestamp.clone();
    (c.is_none(), c, ns_name(&p.metadata, default_ns))
}

/// Reports, once per translation, the policies that are not applied and why.
pub(crate) fn report_peer_authentications(cx: &mut Ctx<'_>) {
    let warnings = std::mem::take(&mut cx.peers.warnings);
    cx.warnings.extend(warnings);
}

/// The inbound modes of the sidecar of pod `namespace/pod` with `labels`, and a notice of
/// the policies that decided them.
pub(crate) fn inbound_mtls(
    cx: &mut Ctx<'_>,
    namespace: &str,
    pod: &str,
    labels: &BTreeMap<String, String>,
) -> InboundMtls {
    let r = cx.peers.resolve(namespace, labels);
    if !r.from.is_empty() {
        let ports: Vec<String> = r
            .mtls
            .ports
            .iter()
            .map(|(p, m)| format!("port {p}: {}", mode_name(*m)))
            .collect();
        let ports = if ports.is_empty() {
            String::new()
        } else {
            format!(" ({})", ports.join(", "))
        };
        cx.warn(
            format!("Pod {namespace}/{pod}"),
            format!(
                "inbound mutual TLS {}{ports}, from PeerAuthentication {}",
                mode_name(r.mtls.mode),
                r.from.join(", ")
            ),
        );
    }
    r.mtls
}

fn mode_name(m: MtlsMode) -> &'static str {
    match m {
        MtlsMode::Permissive => "PERMISSIVE",
        MtlsMode::Strict => "STRICT",
        MtlsMode::Disable => "DISABLE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_authentication::PeerAuthenticationSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pa(ns: &str, name: &str, age_s: Option<i64>, spec: serde_json::Value) -> PeerAuthentication {
        PeerAuthentication {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                creation_timestamp: age_s.map(|s| {
                    Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + s).unwrap())
                }),
                ..Default::default()
            },
            spec: serde_json::from_value::<PeerAuthenticationSpec>(spec).unwrap(),
        }
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resolve(policies: Vec<PeerAuthentication>, ns: &str, l: &[(&str, &str)]) -> InboundMtls {
        let res = Resources {
            peer_authentications: policies,
            ..Default::default()
        };
        let opts = TranslateOptions::default();
        Peers::new(&res, &opts).resolve(ns, &labels(l)).mtls
    }

    fn mtls(mode: MtlsMode, ports: &[(u16, MtlsMode)]) -> InboundMtls {
        InboundMtls {
            mode,
            ports: ports.iter().copied().collect(),
        }
    }

    use MtlsMode::{Disable, Permissive, Strict};
    use serde_json::json;

    #[test]
    fn nothing_is_permissive() {
        assert_eq!(resolve(vec![], "shop", &[]), mtls(Permissive, &[]));
    }

    #[test]
    fn workload_over_namespace_over_mesh() {
        let mesh = pa(
            "mesh-system",
            "default",
            None,
            json!({"mtls": {"mode": "STRICT"}}),
        );
        let ns = pa(
            "shop",
            "default",
            None,
            json!({"mtls": {"mode": "DISABLE"}}),
        );
        let wl = pa(
            "shop",
            "web",
            None,
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}}),
        );
        let all = vec![mesh.clone(), ns.clone(), wl.clone()];
        assert_eq!(resolve(vec![mesh.clone()], "shop", &[]), mtls(Strict, &[]));
        assert_eq!(
            resolve(all.clone(), "other", &[("app", "web")]),
            mtls(Strict, &[])
        );
        assert_eq!(
            resolve(all.clone(), "shop", &[("app", "db")]),
            mtls(Disable, &[])
        );
        assert_eq!(
            resolve(all.clone(), "shop", &[("app", "web")]),
            mtls(Permissive, &[])
        );
        // istio-system is a root namespace too.
        let istio = pa(
            "istio-system",
            "default",
            None,
            json!({"mtls": {"mode": "DISABLE"}}),
        );
        assert_eq!(resolve(vec![istio], "shop", &[]), mtls(Disable, &[]));
    }

    #[test]
    fn unset_inherits_from_the_enclosing_scope() {
        let mesh = pa(
            "mesh-system",
            "default",
            None,
            json!({"mtls": {"mode": "STRICT"}}),
        );
        let ns_unset = pa("shop", "default", None, json!({"mtls": {"mode": "UNSET"}}));
        let wl_no_mtls = pa(
            "shop",
            "web",
            None,
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "portLevelMtls": {"8080": {"mode": "DISABLE"}, "9090": {"mode": "UNSET"}, "7070": {}}}),
        );
        assert_eq!(
            resolve(vec![mesh.clone(), ns_unset.clone()], "shop", &[]),
            mtls(Strict, &[])
        );
        assert_eq!(
            resolve(
                vec![mesh.clone(), ns_unset.clone(), wl_no_mtls.clone()],
                "shop",
                &[("app", "web")]
            ),
            mtls(Strict, &[(7070, Strict), (8080, Disable), (9090, Strict)])
        );
        // UNSET ports take the workload's own mode when it sets one.
        let wl_permissive = pa(
            "shop",
            "web",
            None,
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"},
                   "portLevelMtls": {"9090": {"mode": "UNSET"}}}),
        );
        assert_eq!(
            resolve(vec![mesh, wl_permissive], "shop", &[("app", "web")]),
            mtls(Permissive, &[(9090, Permissive)])
        );
        // Mesh UNSET: PERMISSIVE.
        let mesh_unset = pa("mesh-system", "default", None, json!({}));
        assert_eq!(
            resolve(vec![mesh_unset], "shop", &[]),
            mtls(Permissive, &[])
        );
    }

    #[test]
    fn the_oldest_wins_at_one_scope_then_the_name() {
        let old = pa(
            "shop",
            "b-old",
            Some(0),
            json!({"mtls": {"mode": "STRICT"}}),
        );
        let new = pa(
            "shop",
            "a-new",
            Some(10),
            json!({"mtls": {"mode": "DISABLE"}}),
        );
        assert_eq!(
            resolve(vec![new.clone(), old.clone()], "shop", &[]),
            mtls(Strict, &[])
        );
        // Same age: by name.
        let a = pa("shop", "a", Some(5), json!({"mtls": {"mode": "DISABLE"}}));
        let b = pa("shop", "b", Some(5), json!({"mtls": {"mode": "STRICT"}}));
        assert_eq!(resolve(vec![b, a], "shop", &[]), mtls(Disable, &[]));
        // Workload policies: the oldest that selects the pod.
        let sel = |name: &str, age: i64, mode: &str| {
            pa(
                "shop",
                name,
                Some(age),
                json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": mode}}),
            )
        };
        assert_eq!(
            resolve(
                vec![sel("x", 9, "DISABLE"), sel("y", 3, "STRICT")],
                "shop",
                &[("app", "web")]
            ),
            mtls(Strict, &[])
        );
        // Mesh scope across both root namespaces.
        let m1 = pa(
            "mesh-system",
            "default",
            Some(7),
            json!({"mtls": {"mode": "STRICT"}}),
        );
        let m2 = pa(
            "istio-system",
            "default",
            Some(2),
            json!({"mtls": {"mode": "DISABLE"}}),
        );
        assert_eq!(resolve(vec![m1, m2], "shop", &[]), mtls(Disable, &[]));
    }

    #[test]
    fn a_selector_matches_all_its_labels_and_only_in_its_namespace() {
        let wl = pa(
            "shop",
            "web",
            None,
            json!({"selector": {"matchLabels": {"app": "web", "tier": "front"}}, "mtls": {"mode": "STRICT"}}),
        );
        assert_eq!(
            resolve(
                vec![wl.clone()],
                "shop",
                &[("app", "web"), ("tier", "front"), ("x", "y")]
            ),
            mtls(Strict, &[])
        );
        assert_eq!(
            resolve(vec![wl.clone()], "shop", &[("app", "web")]),
            mtls(Permissive, &[])
        );
        assert_eq!(
            resolve(
                vec![wl.clone()],
                "other",
                &[("app", "web"), ("tier", "front")]
            ),
            mtls(Permissive, &[])
        );
        // An empty matchLabels is namespace-wide, as in Istio.
        let empty = pa(
            "shop",
            "all",
            None,
            json!({"selector": {"matchLabels": {}}, "mtls": {"mode": "STRICT"}}),
        );
        assert_eq!(resolve(vec![empty], "shop", &[]), mtls(Strict, &[]));
        // A selector in a root namespace applies nowhere (Istio).
        let root_sel = pa(
            "mesh-system",
            "web",
            None,
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
        );
        assert_eq!(
            resolve(vec![root_sel.clone()], "mesh-system", &[("app", "web")]),
            mtls(Permissive, &[])
        );
        assert_eq!(
            resolve(vec![root_sel], "shop", &[("app", "web")]),
            mtls(Permissive, &[])
        );
    }

    #[test]
    fn invalid_policies_are_reported_and_not_applied() {
        let bad = vec![
            pa(
                "shop",
                "typo",
                None,
                json!({"mtls": {"mode": "STRICT"}, "mTLS": {"mode": "STRICT"}}),
            ),
            pa("shop", "mode", None, json!({"mtls": {"mode": "strict"}})),
            pa(
                "shop",
                "ports",
                None,
                json!({"portLevelMtls": {"8080": {"mode": "STRICT"}}}),
            ),
            pa(
                "shop",
                "key",
                None,
                json!({"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}),
            ),
        ];
        let res = Resources {
            peer_authentications: bad,
            ..Default::default()
        };
        let opts = TranslateOptions::default();
        let peers = Peers::new(&res, &opts);
        assert_eq!(
            peers.resolve("shop", &labels(&[("a", "b")])).mtls,
            mtls(Permissive, &[])
        );
        let text: Vec<String> = peers.warnings.iter().map(ToString::to_string).collect();
        let expect = [
            "PeerAuthentication shop/typo: spec.mTLS: unknown field",
            "PeerAuthentication shop/mode: spec.mtls.mode: unknown mode \"strict\"",
            "PeerAuthentication shop/ports: spec.portLevelMtls: requires a selector",
            "PeerAuthentication shop/key: spec.portLevelMtls.http: not a port number",
        ];
        for e in expect {
            assert!(
                text.iter()
                    .any(|t| t.starts_with(e)
                        && t.ends_with("the PeerAuthentication is not applied")),
                "{e} in {text:#?}"
            );
        }
    }
}
