//! The proxy's downstream HTTP options: timeouts, the connection cap, path normalization
//! and protocol upgrades.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;

/// How the proxy treats downstream HTTP connections and requests. Every field is optional:
/// an unset field takes the value given on the proxy's command line
/// (`mesh-proxy run --idle-timeout 30m`), else the default shown. A duration of `0s` turns
/// that timeout off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpOptions {
    /// A connection must deliver a complete request head within this time of being accepted
    /// (and each later head within this time of its first byte), else it is closed.
    /// Default `10s`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::serde_opt_duration"
    )]
    pub request_headers_timeout: Option<Duration>,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    /// Default `1h`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::serde_opt_duration"
    )]
    pub idle_timeout: Option<Duration>,
    /// A request whose backend sends nothing (no response head, or no body data) for this
    /// long ends: 504 before the response head, a reset after it. Default `5m`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration::serde_opt_duration"
    )]
    pub stream_idle_timeout: Option<Duration>,
    /// Open downstream connections per listener; at the cap the listener stops accepting
    /// until one closes (new connections wait in the kernel's backlog). Default: half the
    /// process's file-descriptor limit (each connection may hold an upstream one too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How request paths are normalized before routing; the normalized path is also what
    /// the backend receives. Default `BASE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<PathNormalization>,
    /// Protocols a request may upgrade to (`Upgrade` header, lowercase tokens). A request
    /// asking for any other protocol is forwarded without its `Upgrade` header, so it can
    /// never become a tunnel; `h2c` is never allowed. Default `[websocket]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrades: Option<Vec<String>>,
}

impl HttpOptions {
    pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

    /// Whether no field is set (the section is then left out when serialized).
    pub fn is_unset(&self) -> bool {
        *self == HttpOptions::default()
    }

    /// Each field of `self`, or `fallback`'s where `self` leaves it unset.
    pub fn or(&self, fallback: &HttpOptions) -> HttpOptions {
        HttpOptions {
            request_headers_timeout: self
                .request_headers_timeout
                .or(fallback.request_headers_timeout),
            idle_timeout: self.idle_timeout.or(fallback.idle_timeout),
            stream_idle_timeout: self.stream_idle_timeout.or(fallback.stream_idle_timeout),
            max_connections: self.max_connections.or(fallback.max_connections),
            path_normalization: self.path_normalization.or(fallback.path_normalization),
            upgrades: self.upgrades.clone().or_else(|| fallback.upgrades.clone()),
        }
    }
}

/// Request path normalization, as Istio's `meshConfig.pathNormalization.normalization`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// The path is routed and forwarded as received.
    None,
    /// RFC 3986: percent-encoded unreserved characters decoded, dot segments removed,
    /// backslashes turned into slashes.
    #[default]
    Base,
    /// `BASE`, then runs of slashes merged into one.
    MergeSlashes,
    /// `%2F` and `%5C` decoded first, then `MERGE_SLASHES`.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// Istio's name for the option (`BASE`, `MERGE_SLASHES`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }
}

impl std::str::FromStr for PathNormalization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "NONE" => PathNormalization::None,
            "BASE" | "DEFAULT" => PathNormalization::Base,
            "MERGE_SLASHES" => PathNormalization::MergeSlashes,
            "DECODE_AND_MERGE_SLASHES" => PathNormalization::DecodeAndMergeSlashes,
            _ => {
                return Err(format!(
                    "{s:?} is not a path normalization (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)"
                ));
            }
        })
    }
}
