//! The config distribution protocol: how a proxy gets its config from the control plane
//! (`meshctl control-plane`, port [`DISTRIBUTION`](crate::ports::DISTRIBUTION)). Described in
//! `docs/config-distribution.md`; in short:
//!
//! - TLS (the proxy verifies the control plane against a CA file), ALPN `h2`, one long-lived
//!   HTTP/2 request per proxy: `POST` [`STREAM_PATH`], content type [`CONTENT_TYPE`].
//! - Both bodies are streams of frames: a 4-byte big-endian length, then that many bytes of
//!   JSON ([`encode`], [`FrameDecoder`]).
//! - Request body (proxy → control plane): [`ProxyMessage::Hello`] first (who the proxy is),
//!   then one [`ProxyMessage::Ack`] or [`ProxyMessage::Nack`] per snapshot received.
//! - Response body (control plane → proxy): [`ControlPlaneMessage::Snapshot`]s, each a whole
//!   [`ProxyConfig`] with a version, the first one as soon as the control plane has it and a
//!   new one whenever what concerns this proxy changes.
//!
//! The client is `mesh_proxy::distribution`, the server `meshctl`'s `controlplane::hub`.

use bytes::{Buf, Bytes, BytesMut};
use mesh_config::ProxyConfig;
use serde::{Deserialize, Serialize};

/// The one request path.
pub const STREAM_PATH: &str = "/meshctl.distribution.v1/stream";
/// Content type of both bodies.
pub const CONTENT_TYPE: &str = "application/x-meshctl-frames";
/// Largest frame either side accepts (a config with thousands of routes is a few MB).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Who a proxy is; decides which config it gets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum NodeIdentity {
    /// A gateway proxy serving the Gateway `namespace/name`.
    #[serde(rename_all = "camelCase")]
    Gateway {
        namespace: String,
        name: String,
        /// The pod it runs in (`POD_NAME`), for `proxy-status`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
    },
    /// A sidecar proxy of a pod.
    #[serde(rename_all = "camelCase")]
    Sidecar {
        namespace: String,
        pod: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_account: Option<String>,
        /// The pod's IP (`POD_IP`): which Services it backs (EndpointSlices) decides its
        /// inbound policies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<std::net::IpAddr>,
    },
}

impl NodeIdentity {
    /// `gateway demo/istio-gwapi (pod ...)` or `sidecar demo/pod`.
    pub fn describe(&self) -> String {
        match self {
            NodeIdentity::Gateway {
                namespace,
                name,
                pod,
            } => match pod {
                Some(p) => format!("gateway {namespace}/{name} (pod {p})"),
                None => format!("gateway {namespace}/{name}"),
            },
            NodeIdentity::Sidecar { namespace, pod, .. } => format!("sidecar {namespace}/{pod}"),
        }
    }

    /// The Gateway key `namespace/name` of a gateway proxy.
    pub fn gateway_key(&self) -> Option<String> {
        match self {
            NodeIdentity::Gateway {
                namespace, name, ..
            } => Some(format!("{namespace}/{name}")),
            NodeIdentity::Sidecar { .. } => None,
        }
    }
}

/// Proxy → control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ProxyMessage {
    /// First message of a stream.
    #[serde(rename_all = "camelCase")]
    Hello {
        node: NodeIdentity,
        /// The proxy's build version.
        #[serde(default)]
        proxy_version: String,
    },
    /// The snapshot `version` was applied and is being served.
    Ack { version: String },
    /// The snapshot `version` was rejected; the proxy keeps serving its previous config.
    Nack { version: String, error: String },
    /// The workload certificate the proxy serves with now (after the hello, and after each
    /// renewal), for `meshctl proxy-status`.
    #[serde(rename_all = "camelCase")]
    Certificate {
        identity: String,
        /// `notAfter`, seconds since the Unix epoch.
        expires_at_unix: u64,
        /// Lowercase hex SHA-256 of the root its chain leads to (root rotation waits for
        /// every proxy to be on the new root).
        #[serde(default)]
        root_sha256: String,
        /// Fingerprints of the roots the proxy trusts now.
        #[serde(default)]
        trust_bundle_sha256: Vec<String>,
    },
}

/// Control plane → proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ControlPlaneMessage {
    /// The whole config for this proxy (its `version` field equals `version`).
    Snapshot {
        version: String,
        config: Box<ProxyConfig>,
    },
}

/// Encodes one message as a frame (4-byte big-endian length, JSON).
pub fn encode<T: Serialize>(message: &T) -> Bytes {
    let json = serde_json::to_vec(message).expect("protocol messages serialize");
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.freeze()
}

/// Splits a byte stream into frames and decodes them.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

/// A frame that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("invalid message: {0}")]
    Json(#[from] serde_json::Error),
}

impl FrameDecoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one is buffered.
    pub fn next_message<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let frame = self.buf.split_to(len);
        Ok(Some(serde_json::from_slice(&frame)?))
    }

    /// Bytes of an incomplete frame still buffered.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_with_per_port_mtls_modes_round_trips() {
        // Port-keyed maps are written as JSON strings; inside the tagged message they must
        // still read back.
        let mut config = mesh_config::ProxyConfig::default();
        config.listeners.push(
            serde_json::from_value(serde_json::json!({
                "name": "sidecar-inbound", "port": 15006, "kind": "sidecarInbound",
                "mtls": {"mode": "PERMISSIVE", "ports": {"8080": "STRICT", "9090": "DISABLE"}},
            }))
            .unwrap(),
        );
        let m = ControlPlaneMessage::Snapshot {
            version: "1".into(),
            config: Box::new(config),
        };
        let mut d = FrameDecoder::default();
        d.push(&encode(&m));
        assert_eq!(d.next_message::<ControlPlaneMessage>().unwrap(), Some(m));
    }

    #[test]
    fn frames_round_trip_split_anywhere() {
        let a = ProxyMessage::Hello {
            node: NodeIdentity::Gateway {
                namespace: "demo".into(),
                name: "gw".into(),
                pod: None,
            },
            proxy_version: "0.1.0".into(),
        };
        let b = ProxyMessage::Nack {
            version: "7".into(),
            error: "bad".into(),
        };
        let mut bytes = encode(&a).to_vec();
        bytes.extend_from_slice(&encode(&b));
        for split in 0..bytes.len() {
            let mut d = FrameDecoder::default();
            d.push(&bytes[..split]);
            let mut got = Vec::new();
            while let Some(m) = d.next_message::<ProxyMessage>().unwrap() {
                got.push(m);
            }
            d.push(&bytes[split..]);
            while let Some(m) = d.next_message::<ProxyMessage>().unwrap() {
                got.push(m);
            }
            assert_eq!(got, vec![a.clone(), b.clone()], "split at {split}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut d = FrameDecoder::default();
        d.push(&((MAX_FRAME_BYTES as u32) + 1).to_be_bytes());
        assert!(matches!(
            d.next_message::<ProxyMessage>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn identities_serialize_as_documented() {
        let id = NodeIdentity::Sidecar {
            namespace: "demo".into(),
            pod: "p-1".into(),
            service_account: Some("default".into()),
            ip: Some("10.244.0.7".parse().unwrap()),
        };
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            r#"{"kind":"sidecar","namespace":"demo","pod":"p-1","serviceAccount":"default","ip":"10.244.0.7"}"#
        );
    }
}
