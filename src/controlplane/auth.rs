//! Who may ask for a proxy's config. A proxy presents a Kubernetes service-account token
//! with the mesh's audience (the projected token injection mounts at `MESH_TOKEN_PATH`; the
//! gateway Deployments mount one too) as `authorization: Bearer`. The control plane has the
//! API server check it (TokenReview) and then holds the identity the proxy claims in its
//! `hello` against what the token proves:
//!
//! - a sidecar of pod `ns/name` needs a token of namespace `ns`, bound to pod `name`
//!   (bound tokens carry the pod's name), and of the pod's service account when it says one;
//! - a gateway proxy of Gateway `ns/name` needs a token of namespace `ns` and of the service
//!   account of that Gateway's Deployment (`<gateway>-<class>`), so only the pods we deploy
//!   for a Gateway get its config.
//!
//! A proxy that fails gets `401` (no or bad token) or `403` (the token is someone else's),
//! with the reason in the body, and retries with backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use mesh_wire::distribution::NodeIdentity;
use tokio::time::Instant;

use super::gateways::deployment_name;
use super::world::World;

/// The audience injection gives the projected token (`tokenAudience`).
pub const DEFAULT_AUDIENCE: &str = "meshctl";
/// The claim bound tokens carry with the pod's name.
const POD_NAME_CLAIM: &str = "authentication.kubernetes.io/pod-name";
/// How long a reviewed token is trusted without asking again (reconnect storms).
const CACHE_FOR: Duration = Duration::from_secs(60);
/// How often the token of an open stream is reviewed again: a stream outlives neither its
/// token's expiry nor the pod the token is bound to by more than this.
const RECHECK_EVERY: Duration = Duration::from_secs(300);

/// What a token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod: Option<String>,
}

/// A refusal: the status and the reason the proxy is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// How proxies are authenticated.
pub enum ProxyAuth {
    /// Anyone who reaches the port and trusts the CA (tests, `--no-proxy-auth`).
    Disabled,
    /// Tokens checked by the API server (TokenReview).
    TokenReview(Box<TokenReviewer>),
}

/// Checks tokens with TokenReview for one audience.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    cache: Mutex<HashMap<String, (Caller, Instant)>>,
    cache_for: Duration,
    recheck_every: Duration,
}

impl ProxyAuth {
    pub fn token_review(client: Client, audience: impl Into<String>) -> ProxyAuth {
        ProxyAuth::TokenReview(Box::new(TokenReviewer {
            client,
            audience: audience.into(),
            cache: Mutex::new(HashMap::new()),
            cache_for: CACHE_FOR,
            recheck_every: RECHECK_EVERY,
        }))
    }

    /// Other timings than the defaults (60 s cache, 5 min re-review), for tests.
    pub fn with_timings(mut self, cache: Duration, recheck: Duration) -> ProxyAuth {
        if let ProxyAuth::TokenReview(r) = &mut self {
            r.cache_for = cache;
            r.recheck_every = recheck;
        }
        self
    }

    /// How often an open stream's token is reviewed again (`None`: never, auth disabled).
    pub fn recheck_every(&self) -> Option<Duration> {
        match self {
            ProxyAuth::Disabled => None,
            ProxyAuth::TokenReview(r) => Some(r.recheck_every),
        }
    }

    /// Checks the `authorization` header; `None` when authentication is disabled.
    pub async fn authenticate(
        &self,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<Option<Caller>, Refusal> {
        let ProxyAuth::TokenReview(reviewer) = self else {
            return Ok(None);
        };
        let TokenReviewer {
            client,
            audience,
            cache,
            cache_for,
            ..
        } = &**reviewer;
        let token = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "no bearer token: present a service-account token with the mesh's audience \
                     (MESH_TOKEN_PATH)",
                )
            })?;
        if let Some((caller, at)) = cache.lock().expect("token cache").get(token)
            && at.elapsed() < *cache_for
        {
            return Ok(Some(caller.clone()));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                // Never the token itself in a log or a response.
                tracing::warn!("TokenReview failed: {e}");
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the control plane cannot check tokens right now",
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                format!("token rejected for audience {audience}: {why}"),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!("{username} is not a service account"),
            ));
        };
        let pod = user
            .extra
            .as_ref()
            .and_then(|e| e.get(POD_NAME_CLAIM))
            .and_then(|v| v.first())
            .cloned();
        let caller = Caller {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            pod,
        };
        let mut cache = cache.lock().expect("token cache");
        cache.retain(|_, (_, at)| at.elapsed() < *cache_for);
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
        Ok(Some(caller))
    }
}

/// Whether `caller` may be `node`. `world` (the Gateways and their classes) decides a gateway
/// proxy's service account; without one yet, gateway proxies wait.
pub fn authorize(
    caller: &Caller,
    node: &NodeIdentity,
    world: Option<&World>,
) -> Result<(), Refusal> {
    let forbidden = |m: String| Err(refuse(StatusCode::FORBIDDEN, m));
    let who = format!(
        "service account {}/{}",
        caller.namespace, caller.service_account
    );
    match node {
        NodeIdentity::Sidecar {
            namespace,
            pod,
            service_account,
            ..
        } => {
            if caller.namespace != *namespace {
                return forbidden(format!(
                    "{who} cannot speak for pods of namespace {namespace}"
                ));
            }
            if caller.pod.as_deref() != Some(pod.as_str()) {
                return forbidden(format!(
                    "the token of {who} is not bound to pod {namespace}/{pod} (bound to {})",
                    caller.pod.as_deref().unwrap_or("no pod")
                ));
            }
            if let Some(sa) = service_account
                && *sa != caller.service_account
            {
                return forbidden(format!("{who} is not service account {sa}"));
            }
            Ok(())
        }
        NodeIdentity::Gateway {
            namespace, name, ..
        } => {
            if caller.namespace != *namespace {
                return forbidden(format!(
                    "{who} cannot speak for Gateways of namespace {namespace}"
                ));
            }
            let Some(world) = world else {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the control plane has not synced with the API server yet",
                ));
            };
            let class = world
                .resources
                .gateways
                .iter()
                .find(|g| {
                    g.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && g.metadata.name.as_deref() == Some(name.as_str())
                })
                .map(|g| g.spec.gateway_class_name.clone());
            let Some(class) = class else {
                return forbidden(format!("no Gateway {namespace}/{name}"));
            };
            let expected = deployment_name(name, &class);
            if caller.service_account != expected {
                return forbidden(format!(
                    "{who} is not the service account of Gateway {namespace}/{name} ({expected})"
                ));
            }
            Ok(())
        }
    }
}
