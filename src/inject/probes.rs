//! App probes under mutual TLS: once a pod's inbound is STRICT mutual TLS, the kubelet's
//! plaintext probes to the app's ports would be refused. Injection rewrites each app
//! container's `livenessProbe`, `readinessProbe` and `startupProbe` that is `httpGet`,
//! `tcpSocket` or `grpc` to an HTTP GET on the proxy's app-health port (15020) at
//! `/app-health/<container>/<livez|readyz|startupz>`, keeping the timing fields; the originals
//! go to the proxy container as JSON in `MESH_KUBE_APP_PROBERS`
//! ([`mesh_wire::app_probe`], Istio's `ISTIO_KUBE_APP_PROBERS` shape), and the proxy runs
//! them against the app on loopback (`mesh-proxy`'s `app_health`).
//!
//! Left alone: `exec` probes (they run inside the container), probes with a `host` (they do
//! not target this pod), and probes of the proxy's own ports. Named ports are resolved
//! against the container's ports. The original handlers are recorded in the status
//! annotation, so removing the injection ([`restore`]) gives the pod its probes back exactly
//! as written (a named port stays named).
//!
//! On by default (`rewriteAppHTTPProbe` in the injection config); a pod turns it off with the
//! annotation `sidecar.meshctl.io/rewriteAppHTTPProbers: "false"` (or Istio's
//! `sidecar.istio.io/rewriteAppHTTPProbers`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, GRPCAction, HTTPGetAction, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use mesh_wire::app_probe::{self, AppProbers, ProbeKind, Prober};
use mesh_wire::names::ENV_APP_PROBERS;

use super::InjectError;
use super::config::InjectionConfig;
use super::parse::parse_flag;
use super::template::annotation;

/// What the status annotation records of the rewritten probes: container → probe field
/// (`livenessProbe`, ...) → the original handler (`{"httpGet": {...}}`, as written).
pub type Originals = BTreeMap<String, BTreeMap<String, Value>>;

/// A rewrite's results: the proxy's probers and what undoing it needs.
#[derive(Debug, Clone, Default)]
pub struct Rewritten {
    pub probers: AppProbers,
    pub originals: Originals,
}

/// A probe's handler as the pod spec wrote it (the part the rewrite replaces).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Handler {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http_get: Option<HTTPGetAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tcp_socket: Option<TCPSocketAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grpc: Option<GRPCAction>,
}

/// Whether this pod's probes are rewritten: the pod's annotation, else the config.
pub fn enabled(cfg: &InjectionConfig, ann: &BTreeMap<String, String>) -> Result<bool, InjectError> {
    match annotation(ann, "sidecar", "rewriteAppHTTPProbers") {
        Some((key, v)) => parse_flag(v).ok_or_else(|| InjectError::Annotation {
            key,
            message: format!("{v:?} is not true/false"),
        }),
        None => Ok(cfg.rewrite_app_http_probe),
    }
}

/// Rewrite the probes of the app `containers` (`spec.containers`, before the proxy joins
/// them) when this pod's probes are to be rewritten.
pub fn rewrite_pod(
    cfg: &InjectionConfig,
    ann: &BTreeMap<String, String>,
    containers: &mut [Container],
) -> Result<Rewritten, InjectError> {
    if !enabled(cfg, ann)? {
        return Ok(Rewritten::default());
    }
    let p = cfg.proxy.ports;
    let own = [
        p.outbound,
        p.inbound,
        p.admin,
        p.app_health,
        p.readiness,
        p.metrics,
    ];
    rewrite(containers, p.app_health, &own)
}

/// Rewrite every rewritable probe of `containers` to `app_health_port`. Probes of a port in
/// `own_ports` (the proxy's) are not the app's and stay as they are.
pub fn rewrite(
    containers: &mut [Container],
    app_health_port: u16,
    own_ports: &[u16],
) -> Result<Rewritten, InjectError> {
    let mut out = Rewritten::default();
    for (i, c) in containers.iter_mut().enumerate() {
        for kind in ProbeKind::ALL {
            let field = format!("spec.containers[{i}].{}", kind.field());
            let name = c.name.clone();
            let ports = c.ports.clone().unwrap_or_default();
            let Some(probe) = slot(c, kind).as_mut() else {
                continue;
            };
            let Some((prober, handler)) = original(probe, &ports, &field)? else {
                continue;
            };
            if own_ports.contains(&port_of(&prober)) {
                continue;
            }
            let path = app_probe::path(&name, kind);
            probe.http_get = Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(app_health_port.into()),
                ..Default::default()
            });
            probe.tcp_socket = None;
            probe.grpc = None;
            out.probers.insert(path, prober);
            let handler = serde_json::to_value(&handler).map_err(|e| InjectError::Invalid {
                field: field.clone(),
                message: e.to_string(),
            })?;
            out.originals
                .entry(name)
                .or_default()
                .insert(kind.field().to_owned(), handler);
        }
    }
    Ok(out)
}

/// The proxy container's environment variable carrying the probers (none when there are
/// none, so pods without probes look as before).
pub fn env(probers: &AppProbers) -> Option<EnvVar> {
    (!probers.is_empty()).then(|| EnvVar {
        name: ENV_APP_PROBERS.into(),
        value: Some(app_probe::to_json(probers)),
        value_from: None,
    })
}

/// Undo [`rewrite`]: each probe recorded in `originals` that is still the rewritten one gets
/// its original handler back (its timing fields are kept as they are now). A probe someone
/// changed since is theirs and stays.
pub fn restore(containers: &mut [Container], originals: &Originals) {
    for c in containers.iter_mut() {
        let Some(fields) = originals.get(&c.name) else {
            continue;
        };
        let name = c.name.clone();
        for kind in ProbeKind::ALL {
            let Some(handler) = fields.get(kind.field()) else {
                continue;
            };
            let Some(probe) = slot(c, kind).as_mut() else {
                continue;
            };
            let ours = probe.http_get.as_ref().and_then(|h| h.path.as_deref())
                == Some(app_probe::path(&name, kind).as_str());
            let Ok(h) = Handler::deserialize(handler) else {
                continue;
            };
            if ours {
                probe.http_get = h.http_get;
                probe.tcp_socket = h.tcp_socket;
                probe.grpc = h.grpc;
            }
        }
    }
}

fn slot(c: &mut Container, kind: ProbeKind) -> &mut Option<Probe> {
    match kind {
        ProbeKind::Liveness => &mut c.liveness_probe,
        ProbeKind::Readiness => &mut c.readiness_probe,
        ProbeKind::Startup => &mut c.startup_probe,
    }
}

fn port_of(p: &Prober) -> u16 {
    p.http_get
        .as_ref()
        .map(|h| h.port)
        .or(p.tcp_socket.as_ref().map(|t| t.port))
        .or(p.grpc.as_ref().map(|g| g.port))
        .unwrap_or(0)
}

/// The prober for one probe and its handler as written; `None` when the probe is not
/// rewritten (`exec`, no handler, or a `host` elsewhere).
fn original(
    probe: &Probe,
    ports: &[k8s_openapi::api::core::v1::ContainerPort],
    field: &str,
) -> Result<Option<(Prober, Handler)>, InjectError> {
    let invalid = |f: &str, message: String| InjectError::Invalid {
        field: format!("{field}.{f}"),
        message,
    };
    let timeout_seconds = match probe.timeout_seconds {
        None => 0,
        Some(t) => {
            u32::try_from(t).map_err(|_| invalid("timeoutSeconds", format!("{t} is negative")))?
        }
    };
    let elsewhere = |host: &Option<String>| host.as_deref().is_some_and(|h| !h.is_empty());
    let mut prober = Prober {
        timeout_seconds,
        ..Default::default()
    };
    let mut handler = Handler::default();
    if let Some(h) = &probe.http_get {
        if elsewhere(&h.host) {
            return Ok(None);
        }
        let scheme = match h.scheme.as_deref() {
            None => None,
            Some("HTTP") => Some(app_probe::Scheme::Http),
            Some("HTTPS") => Some(app_probe::Scheme::Https),
            Some(s) => {
                return Err(invalid(
                    "httpGet.scheme",
                    format!("{s:?} is not HTTP or HTTPS"),
                ));
            }
        };
        prober.http_get = Some(app_probe::HttpGet {
            path: h.path.clone().unwrap_or_default(),
            port: resolve(&h.port, ports).map_err(|m| invalid("httpGet.port", m))?,
            host: None,
            scheme,
            http_headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|x| app_probe::HttpHeader {
                    name: x.name.clone(),
                    value: x.value.clone(),
                })
                .collect(),
        });
        handler.http_get = Some(h.clone());
    } else if let Some(t) = &probe.tcp_socket {
        if elsewhere(&t.host) {
            return Ok(None);
        }
        prober.tcp_socket = Some(app_probe::TcpSocket {
            port: resolve(&t.port, ports).map_err(|m| invalid("tcpSocket.port", m))?,
            host: None,
        });
        handler.tcp_socket = Some(t.clone());
    } else if let Some(g) = &probe.grpc {
        prober.grpc = Some(app_probe::Grpc {
            port: port_number(g.port).map_err(|m| invalid("grpc.port", m))?,
            service: g.service.clone().filter(|s| !s.is_empty()),
        });
        handler.grpc = Some(g.clone());
    } else {
        return Ok(None);
    }
    Ok(Some((prober, handler)))
}

fn port_number(p: i32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{p} is not a port number (1-65535)"))
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve(
    port: &IntOrString,
    ports: &[k8s_openapi::api::core::v1::ContainerPort],
) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => port_number(*p),
        IntOrString::String(name) => {
            if let Some(p) = ports.iter().find(|p| p.name.as_deref() == Some(name)) {
                return port_number(p.container_port);
            }
            if let Ok(n) = name.parse::<i32>() {
                return port_number(n);
            }
            let named: Vec<&str> = ports.iter().filter_map(|p| p.name.as_deref()).collect();
            Err(if named.is_empty() {
                format!("no container port is named {name:?} (the container names none)")
            } else {
                format!(
                    "no container port is named {name:?} (the container's port names: {})",
                    named.join(", ")
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn containers(v: Value) -> Vec<Container> {
        serde_json::from_value(v).unwrap()
    }

    const OWN: [u16; 4] = [15000, 15020, 15021, 15090];

    #[test]
    fn http_tcp_grpc_rewritten_exec_and_host_left_alone() {
        let mut cs = containers(json!([{
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTPS",
                "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                "periodSeconds": 7, "timeoutSeconds": 2, "failureThreshold": 4},
            "readinessProbe": {"tcpSocket": {"port": 9000}},
            "startupProbe": {"grpc": {"port": 9090, "service": "app"}, "initialDelaySeconds": 3}
        }, {
            "name": "side",
            "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"httpGet": {"path": "/", "port": 80, "host": "example.com"}},
            "startupProbe": {"httpGet": {"path": "/ready", "port": 15021}}
        }]));
        let before = cs.clone();
        let r = rewrite(&mut cs, 15020, &OWN).unwrap();
        let got = serde_json::to_value(&cs[0]).unwrap();
        assert_eq!(
            got["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/web/livez", "port": 15020},
                "periodSeconds": 7, "timeoutSeconds": 2, "failureThreshold": 4})
        );
        assert_eq!(
            got["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15020}})
        );
        assert_eq!(
            got["startupProbe"],
            json!({"httpGet": {"path": "/app-health/web/startupz", "port": 15020},
                "initialDelaySeconds": 3})
        );
        assert_eq!(
            cs[1], before[1],
            "exec, other host and the proxy's port stay"
        );
        assert_eq!(
            app_probe::to_json(&r.probers),
            r#"{"/app-health/web/livez":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTPS","httpHeaders":[{"name":"X-Probe","value":"1"}]},"timeoutSeconds":2},"/app-health/web/readyz":{"tcpSocket":{"port":9000}},"/app-health/web/startupz":{"grpc":{"port":9090,"service":"app"}}}"#
        );
        assert_eq!(
            r.originals["web"]["livenessProbe"]["httpGet"]["port"],
            json!("http"),
            "the original keeps its named port"
        );
        restore(&mut cs, &r.originals);
        assert_eq!(cs, before, "restore gives the probes back as written");
    }

    #[test]
    fn bad_ports_name_the_field() {
        let mut cs = containers(json!([{"name": "a"}, {
            "name": "b",
            "ports": [{"name": "web", "containerPort": 80}],
            "readinessProbe": {"httpGet": {"port": "http"}}
        }]));
        let e = rewrite(&mut cs, 15020, &OWN).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.containers[1].readinessProbe.httpGet.port: no container port is named \"http\" \
             (the container's port names: web)"
        );
        let mut cs = containers(json!([{"name": "a",
            "livenessProbe": {"grpc": {"port": 70000}}}]));
        let e = rewrite(&mut cs, 15020, &OWN).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.containers[0].livenessProbe.grpc.port: 70000 is not a port number (1-65535)"
        );
        let mut cs = containers(json!([{"name": "a",
            "livenessProbe": {"httpGet": {"port": 80, "scheme": "FTP"}}}]));
        let e = rewrite(&mut cs, 15020, &OWN).unwrap_err();
        assert!(e.to_string().contains("httpGet.scheme"), "{e}");
    }

    #[test]
    fn opt_out_annotation_and_config() {
        let ann = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        let mut cfg = InjectionConfig::default();
        assert!(enabled(&cfg, &BTreeMap::new()).unwrap());
        assert!(
            !enabled(
                &cfg,
                &ann("sidecar.istio.io/rewriteAppHTTPProbers", "false")
            )
            .unwrap()
        );
        assert!(
            !enabled(
                &cfg,
                &ann("sidecar.meshctl.io/rewriteAppHTTPProbers", "false")
            )
            .unwrap()
        );
        cfg.rewrite_app_http_probe = false;
        assert!(!enabled(&cfg, &BTreeMap::new()).unwrap());
        assert!(enabled(&cfg, &ann("sidecar.istio.io/rewriteAppHTTPProbers", "true")).unwrap());
        let e = enabled(
            &cfg,
            &ann("sidecar.meshctl.io/rewriteAppHTTPProbers", "maybe"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation sidecar.meshctl.io/rewriteAppHTTPProbers: \"maybe\" is not true/false"
        );
    }

    #[test]
    fn a_probe_changed_after_injection_is_kept() {
        let mut cs = containers(json!([{"name": "web",
            "livenessProbe": {"tcpSocket": {"port": 9000}}}]));
        let r = rewrite(&mut cs, 15020, &OWN).unwrap();
        cs[0].liveness_probe = Some(Probe {
            exec: Some(Default::default()),
            ..Default::default()
        });
        let changed = cs.clone();
        restore(&mut cs, &r.originals);
        assert_eq!(cs, changed);
    }
}
