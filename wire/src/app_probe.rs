//! Application probes through the proxy: once a pod's inbound is mutual TLS, the kubelet's
//! plaintext probes to the app's ports would be refused, so injection rewrites each app
//! probe to an HTTP GET on the proxy's app-health port ([`crate::ports::APP_HEALTH`]) at
//! [`path`]`(container, kind)`, and hands the original probes to the proxy in the environment
//! variable [`crate::names::ENV_APP_PROBERS`] as JSON of [`AppProbers`]. The proxy runs the
//! original probe against the app on loopback and answers the kubelet.
//!
//! The JSON is Istio's `ISTIO_KUBE_APP_PROBERS` shape: a map from the new path to the
//! original probe's `httpGet`, `tcpSocket` or `grpc` and its `timeoutSeconds`, e.g.
//!
//! ```json
//! {"/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
//!                            "timeoutSeconds": 1}}
//! ```
//!
//! Ports are numbers here: the injector resolves named ports against the container's ports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every rewritten probe's path starts with this.
pub const PATH_PREFIX: &str = "/app-health/";

/// The kubelet's default probe timeout, used when `timeoutSeconds` is absent or 0.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 1;

/// Which of a container's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [
        ProbeKind::Liveness,
        ProbeKind::Readiness,
        ProbeKind::Startup,
    ];

    /// The last segment of the rewritten path (Istio's names).
    pub fn segment(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }

    /// The container field holding the probe.
    pub fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }
}

/// `/app-health/<container>/<livez|readyz|startupz>`.
pub fn path(container: &str, kind: ProbeKind) -> String {
    format!("{PATH_PREFIX}{container}/{}", kind.segment())
}

/// The new path → the original probe. A `BTreeMap`, so the JSON written into a pod is the
/// same for the same probes (re-injection changes nothing).
pub type AppProbers = BTreeMap<String, Prober>;

/// One original probe: exactly one of `httpGet`, `tcpSocket`, `grpc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Prober {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    /// 0 (or absent): the kubelet's default, [`DEFAULT_TIMEOUT_SECONDS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_seconds: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Prober {
    /// The time the probe may take.
    pub fn timeout(&self) -> std::time::Duration {
        let s = if self.timeout_seconds == 0 {
            DEFAULT_TIMEOUT_SECONDS
        } else {
            self.timeout_seconds
        };
        std::time::Duration::from_secs(s.into())
    }
}

/// The kubelet's HTTP GET probe (Kubernetes `HTTPGetAction`, port resolved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    /// Path and query as the pod spec says; empty means `/`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    pub port: u16,
    /// The pod spec's `host`. Injection leaves probes with a host alone (they do not target
    /// the pod), so the proxy refuses one here rather than probe somewhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// The kubelet's TCP probe: success when a connection opens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocket {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// The kubelet's gRPC probe: `grpc.health.v1.Health/Check` answers `SERVING`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grpc {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// What is wrong with an [`AppProbers`] document, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbersError {
    #[error("not a JSON map of path to probe: {0}")]
    Json(String),
    #[error("{path:?}: {message}")]
    Entry { path: String, message: String },
}

/// Parse and check the JSON of [`crate::names::ENV_APP_PROBERS`].
pub fn parse(text: &str) -> Result<AppProbers, ProbersError> {
    if text.trim().is_empty() {
        return Ok(AppProbers::new());
    }
    let probers: AppProbers =
        serde_json::from_str(text).map_err(|e| ProbersError::Json(e.to_string()))?;
    validate(&probers)?;
    Ok(probers)
}

/// The checks serde cannot express: a path key, exactly one action, non-zero ports.
pub fn validate(probers: &AppProbers) -> Result<(), ProbersError> {
    for (path, p) in probers {
        let bad = |message: String| ProbersError::Entry {
            path: path.clone(),
            message,
        };
        if !path.starts_with('/') {
            return Err(bad("the key must be a path starting with \"/\"".into()));
        }
        let actions = [
            p.http_get.is_some(),
            p.tcp_socket.is_some(),
            p.grpc.is_some(),
        ];
        if actions.iter().filter(|a| **a).count() != 1 {
            return Err(bad(
                "needs exactly one of httpGet, tcpSocket and grpc".into()
            ));
        }
        let port = p
            .http_get
            .as_ref()
            .map(|h| h.port)
            .or(p.tcp_socket.as_ref().map(|t| t.port))
            .or(p.grpc.as_ref().map(|g| g.port))
            .unwrap_or(0);
        if port == 0 {
            return Err(bad("port 0 is not a valid port".into()));
        }
        let host = p
            .http_get
            .as_ref()
            .and_then(|h| h.host.as_ref())
            .or(p.tcp_socket.as_ref().and_then(|t| t.host.as_ref()));
        if host.is_some_and(|h| !h.is_empty()) {
            return Err(bad(
                "a probe with a host does not target this pod; the proxy probes only the app on \
                 loopback"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The JSON written into the pod (compact, keys sorted).
pub fn to_json(probers: &AppProbers) -> String {
    serde_json::to_string(probers).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_shape_round_trips() {
        let text = r#"{"/app-health/web/livez":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP","httpHeaders":[{"name":"X-A","value":"1"}]},"timeoutSeconds":3},"/app-health/web/readyz":{"tcpSocket":{"port":9000}},"/app-health/web/startupz":{"grpc":{"port":9090,"service":"ready"}}}"#;
        let p = parse(text).unwrap();
        assert_eq!(to_json(&p), text);
        let live = &p["/app-health/web/livez"];
        assert_eq!(live.timeout(), std::time::Duration::from_secs(3));
        assert_eq!(
            p["/app-health/web/readyz"].timeout(),
            std::time::Duration::from_secs(1)
        );
        assert_eq!(path("web", ProbeKind::Startup), "/app-health/web/startupz");
    }

    #[test]
    fn bad_documents_name_the_entry() {
        assert!(parse("").unwrap().is_empty());
        assert!(matches!(parse("[]"), Err(ProbersError::Json(_))));
        let e = parse(r#"{"/a": {"httpGet": {"port": 1}, "exec": {}}}"#).unwrap_err();
        assert!(e.to_string().contains("exec"), "{e}");
        let e = parse(r#"{"/a": {}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"/a\": needs exactly one of httpGet, tcpSocket and grpc"
        );
        let e = parse(r#"{"/a": {"tcpSocket": {"port": 0}}}"#).unwrap_err();
        assert_eq!(e.to_string(), "\"/a\": port 0 is not a valid port");
        let e = parse(r#"{"a": {"tcpSocket": {"port": 1}}}"#).unwrap_err();
        assert!(e.to_string().contains("must be a path"), "{e}");
        let e = parse(r#"{"/a": {"tcpSocket": {"port": 70000}}}"#).unwrap_err();
        assert!(matches!(e, ProbersError::Json(_)), "{e}");
        let e = parse(r#"{"/a": {"httpGet": {"port": 80, "host": "example.com"}}}"#).unwrap_err();
        assert!(e.to_string().contains("host"), "{e}");
        let e = parse(r#"{"/a": {"httpGet": {"port": 80, "scheme": "FTP"}}}"#).unwrap_err();
        assert!(e.to_string().contains("FTP"), "{e}");
    }
}
