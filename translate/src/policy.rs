//! `RateLimitPolicy` (`policy.meshctl.io/v1alpha1`): our own rate-limit resource, attached to a
//! Gateway, an HTTPRoute or a Service with Gateway API `targetRefs`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A token-bucket rate limit with Envoy's local rate limit semantics, attached with
/// `targetRefs`:
///
/// - `Gateway` (group `gateway.networking.k8s.io`): every request on the Gateway's listeners
///   (`sectionName`: one listener);
/// - `HTTPRoute` (group `gateway.networking.k8s.io`): every request the route serves
///   (`sectionName`: one rule, by its `name`);
/// - `Service` (group `""`): every request sent to the Service (`sectionName`: one port, by
///   its `name`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq)]
#[kube(
    group = "policy.meshctl.io",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    plural = "ratelimitpolicies",
    shortname = "rlp",
    namespaced
)]
#[kube(derive = "PartialEq")]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// What the limit applies to (Gateway API `LocalPolicyTargetReference`, plus an optional
    /// `sectionName`). Targets are in the policy's namespace.
    pub target_refs: Vec<PolicyTargetReference>,
    /// Capacity of the bucket and its initial fill.
    pub max_tokens: u64,
    /// Tokens added every `fillInterval`.
    pub tokens_per_fill: u64,
    /// Refill period: `500ms`, `1s`, `1m`, `1h30m`.
    pub fill_interval: String,
    /// Status of limited responses (default 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Headers added to limited responses only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_add: Vec<PolicyHeader>,
    /// Add `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` to responses.
    #[serde(default)]
    pub x_rate_limit_headers: bool,
    /// `Local` (default): every proxy instance that enforces the limit has the whole budget
    /// (Envoy's local rate limit). `Distributed`: one budget split across the instances.
    #[serde(default)]
    pub mode: RateLimitPolicyMode,
}

/// Gateway API `LocalPolicyTargetReferenceWithSectionName`.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// `gateway.networking.k8s.io` for Gateway and HTTPRoute, `""` for Service.
    pub group: String,
    /// `Gateway`, `HTTPRoute` or `Service`.
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Eq)]
pub struct PolicyHeader {
    pub name: String,
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, JsonSchema, PartialEq, Eq)]
pub enum RateLimitPolicyMode {
    /// Per proxy instance (Envoy's local rate limit).
    #[default]
    Local,
    /// One budget split across the instances that enforce it.
    Distributed,
}
