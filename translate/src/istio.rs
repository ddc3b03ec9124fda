//! Istio compatibility input: `EnvoyFilter` carrying `envoy.filters.http.local_ratelimit`, and
//! the `IstioOperator` install profile (only `spec.meshConfig.accessLogFile` matters to the
//! proxy).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FieldProblem;
use crate::typed::from_value;

/// Istio `EnvoyFilter` (`networking.istio.io/v1alpha3`, also read as `v1`). Only patches that
/// insert `envoy.filters.http.local_ratelimit` are supported; see [`local_rate_limits`].
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[kube(
    group = "networking.istio.io",
    version = "v1alpha3",
    kind = "EnvoyFilter",
    plural = "envoyfilters",
    namespaced
)]
#[kube(derive = "PartialEq", derive = "Default")]
#[serde(rename_all = "camelCase")]
pub struct EnvoyFilterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// Not supported (an error when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<Value>>,
    #[serde(default)]
    pub config_patches: Vec<EnvoyConfigObjectPatch>,
    /// Accepted; only orders patches, which does not matter for the one filter we support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyConfigObjectPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_to: Option<String>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<EnvoyConfigObjectMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<Patch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyConfigObjectMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_configuration: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListenerMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_number: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_chain: Option<FilterChainMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener_filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FilterChainMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_protocols: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FilterMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_filter: Option<SubFilterMatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
pub struct SubFilterMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Patch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_class: Option<String>,
}

/// An install profile (`install.istio.io/v1alpha1` `IstioOperator`, or our
/// `install.meshctl.io/v1alpha1` `MeshOperator`). The proxy only uses
/// `spec.meshConfig.accessLogFile` and `spec.meshConfig.pathNormalization`; the rest is the
/// installer's business.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IstioOperator {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}

impl IstioOperator {
    /// `spec.meshConfig.accessLogFile`, if set and not empty.
    pub fn access_log_file(&self) -> Option<&str> {
        self.spec
            .pointer("/meshConfig/accessLogFile")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// `spec.meshConfig.trustDomain`, if set and valid (validated on load).
    pub fn trust_domain(&self) -> Option<&str> {
        self.spec
            .pointer("/meshConfig/trustDomain")
            .and_then(Value::as_str)
            .filter(|s| mesh_config::identity::valid_trust_domain(s))
    }

    /// `spec.meshConfig.pathNormalization.normalization`, if set (validated on load).
    pub fn path_normalization(&self) -> Option<mesh_config::PathNormalization> {
        self.spec
            .pointer("/meshConfig/pathNormalization/normalization")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
    }
}

/// Where an EnvoyFilter patch applies (`match.context`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchContext {
    Any,
    Gateway,
    SidecarInbound,
    SidecarOutbound,
}

impl PatchContext {
    pub fn as_str(self) -> &'static str {
        match self {
            PatchContext::Any => "ANY",
            PatchContext::Gateway => "GATEWAY",
            PatchContext::SidecarInbound => "SIDECAR_INBOUND",
            PatchContext::SidecarOutbound => "SIDECAR_OUTBOUND",
        }
    }
}

/// One supported EnvoyFilter patch: insert a local rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRateLimitPatch {
    /// Index in `spec.configPatches`.
    pub index: usize,
    pub context: PatchContext,
    /// `match.listener.portNumber`.
    pub port: Option<u32>,
    pub stat_prefix: String,
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval: Duration,
    pub status: u16,
    pub response_headers_to_add: Vec<mesh_config::HeaderValue>,
    pub x_ratelimit_headers: bool,
    /// `false` when `filter_enabled`/`filter_enforced` is 0% (or absent: Envoy's default),
    /// i.e. the filter never limits.
    pub enforced: bool,
}

/// What [`local_rate_limits`] found in an EnvoyFilter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvoyFilterPatches {
    pub patches: Vec<LocalRateLimitPatch>,
    /// Unsupported or invalid fields: the filter must not be applied.
    pub errors: Vec<FieldProblem>,
    /// Fields accepted but without effect.
    pub warnings: Vec<FieldProblem>,
}

const LOCAL_RATELIMIT: &str = "envoy.filters.http.local_ratelimit";
const LOCAL_RATELIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const TYPED_STRUCT_TYPES: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];
const HCM: &str = "envoy.filters.network.http_connection_manager";

#[derive(Deserialize)]
struct LocalRateLimitProto {
    #[serde(default, alias = "statPrefix")]
    stat_prefix: Option<String>,
    #[serde(default)]
    status: Option<HttpStatus>,
    #[serde(default, alias = "tokenBucket")]
    token_bucket: Option<TokenBucket>,
    #[serde(default, alias = "filterEnabled")]
    filter_enabled: Option<RuntimeFractionalPercent>,
    #[serde(default, alias = "filterEnforced")]
    filter_enforced: Option<RuntimeFractionalPercent>,
    #[serde(default, alias = "responseHeadersToAdd")]
    response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default, alias = "enableXRatelimitHeaders")]
    enable_x_ratelimit_headers: Option<String>,
    #[serde(default, alias = "requestHeadersToAddWhenNotEnforced")]
    request_headers_to_add_when_not_enforced: Option<Value>,
    #[serde(default)]
    descriptors: Option<Value>,
    #[serde(default)]
    stage: Option<u32>,
    #[serde(default, alias = "localRateLimitPerDownstreamConnection")]
    local_rate_limit_per_downstream_connection: Option<bool>,
    #[serde(default, alias = "vhRateLimits")]
    vh_rate_limits: Option<String>,
    #[serde(default, alias = "alwaysConsumeDefaultTokenBucket")]
    always_consume_default_token_bucket: Option<bool>,
    #[serde(default, alias = "rateLimitedAsResourceExhausted")]
    rate_limited_as_resource_exhausted: Option<bool>,
}

#[derive(Deserialize)]
struct HttpStatus {
    code: u16,
}

#[derive(Deserialize)]
struct TokenBucket {
    #[serde(alias = "maxTokens")]
    max_tokens: u64,
    #[serde(default, alias = "tokensPerFill")]
    tokens_per_fill: Option<u64>,
    #[serde(alias = "fillInterval")]
    fill_interval: String,
}

#[derive(Deserialize)]
struct RuntimeFractionalPercent {
    #[serde(default, alias = "defaultValue")]
    default_value: Option<FractionalPercent>,
    #[serde(default, alias = "runtimeKey")]
    #[allow(dead_code)]
    runtime_key: Option<String>,
}

#[derive(Deserialize)]
struct FractionalPercent {
    #[serde(default)]
    numerator: u64,
    #[serde(default)]
    denominator: Option<String>,
}

#[derive(Deserialize)]
struct HeaderValueOption {
    header: HeaderKv,
    #[serde(default, alias = "appendAction")]
    append_action: Option<String>,
    #[serde(default)]
    append: Option<bool>,
    #[serde(default, alias = "keepEmptyValue")]
    #[allow(dead_code)]
    keep_empty_value: Option<bool>,
}

#[derive(Deserialize)]
struct HeaderKv {
    key: String,
    #[serde(default)]
    value: String,
}

/// Reads the local rate limit patches of an EnvoyFilter. Anything else an EnvoyFilter can do
/// is reported in `errors` (with the field path), never dropped silently.
pub fn local_rate_limits(ef: &EnvoyFilter) -> EnvoyFilterPatches {
    let mut out = EnvoyFilterPatches::default();
    let spec = &ef.spec;
    if spec.target_refs.as_ref().is_some_and(|t| !t.is_empty()) {
        out.errors.push(FieldProblem::new(
            "spec.targetRefs",
            "not supported (use workloadSelector)",
        ));
    }
    if spec.config_patches.is_empty() {
        out.warnings.push(FieldProblem::new(
            "spec.configPatches",
            "no patches: the EnvoyFilter does nothing",
        ));
    }
    for (i, p) in spec.config_patches.iter().enumerate() {
        let path = format!("spec.configPatches[{i}]");
        let errs_before = out.errors.len();
        let mut err = |f: &str, m: String| {
            out.errors.push(FieldProblem::new(format!("{path}.{f}"), m));
        };
        match p.apply_to.as_deref() {
            Some("HTTP_FILTER") => {}
            Some(other) => err(
                "applyTo",
                format!(
                    "{other:?} is not supported: only HTTP_FILTER patches inserting {LOCAL_RATELIMIT}"
                ),
            ),
            None => err("applyTo", "required (HTTP_FILTER)".into()),
        }
        let mut context = PatchContext::Any;
        let mut port = None;
        if let Some(m) = &p.match_ {
            match m.context.as_deref() {
                None | Some("ANY") => context = PatchContext::Any,
                Some("GATEWAY") => context = PatchContext::Gateway,
                Some("SIDECAR_INBOUND") => context = PatchContext::SidecarInbound,
                Some("SIDECAR_OUTBOUND") => context = PatchContext::SidecarOutbound,
                Some(other) => err(
                    "match.context",
                    format!("{other:?} is not ANY, GATEWAY, SIDECAR_INBOUND or SIDECAR_OUTBOUND"),
                ),
            }
            if m.proxy.is_some() {
                err(
                    "match.proxy",
                    "not supported (proxy version/metadata matching)".into(),
                );
            }
            if m.route_configuration.is_some() {
                err(
                    "match.routeConfiguration",
                    "not supported: an HTTP_FILTER patch matches a listener".into(),
                );
            }
            if m.cluster.is_some() {
                err(
                    "match.cluster",
                    "not supported: an HTTP_FILTER patch matches a listener".into(),
                );
            }
            if let Some(l) = &m.listener {
                port = l.port_number;
                if l.name.is_some() {
                    err(
                        "match.listener.name",
                        "not supported (Envoy listener names do not exist in mesh-proxy); use portNumber".into(),
                    );
                }
                if l.listener_filter.is_some() {
                    err("match.listener.listenerFilter", "not supported".into());
                }
                if let Some(fc) = &l.filter_chain {
                    for (f, set) in [
                        ("name", fc.name.is_some()),
                        ("sni", fc.sni.is_some()),
                        ("transportProtocol", fc.transport_protocol.is_some()),
                        ("applicationProtocols", fc.application_protocols.is_some()),
                        ("destinationPort", fc.destination_port.is_some()),
                    ] {
                        if set {
                            err(
                                &format!("match.listener.filterChain.{f}"),
                                "not supported".into(),
                            );
                        }
                    }
                    if let Some(f) = &fc.filter {
                        if let Some(n) = &f.name
                            && n != HCM
                        {
                            err(
                                "match.listener.filterChain.filter.name",
                                format!("{n:?}: only {HCM} is supported"),
                            );
                        }
                        if let Some(sf) = &f.sub_filter
                            && let Some(n) = &sf.name
                            && n != "envoy.filters.http.router"
                        {
                            err(
                                "match.listener.filterChain.filter.subFilter.name",
                                format!(
                                    "{n:?}: only envoy.filters.http.router is supported (the local rate limit runs before routing to a backend)"
                                ),
                            );
                        }
                    }
                }
            }
        }
        let Some(patch) = &p.patch else {
            err("patch", "required".into());
            continue;
        };
        match patch.operation.as_deref() {
            Some("INSERT_BEFORE" | "INSERT_AFTER" | "INSERT_FIRST" | "ADD") => {}
            Some(other) => err(
                "patch.operation",
                format!(
                    "{other:?} is not supported: only inserting {LOCAL_RATELIMIT} (INSERT_BEFORE, INSERT_AFTER, INSERT_FIRST, ADD)"
                ),
            ),
            None => err("patch.operation", "required".into()),
        }
        if patch.filter_class.is_some() {
            err("patch.filterClass", "not supported".into());
        }
        let Some(value) = &patch.value else {
            err("patch.value", "required".into());
            continue;
        };
        let parsed = parse_filter_value(value, &format!("{path}.patch.value"));
        match parsed {
            Ok((mut lr, warnings)) => {
                out.warnings.extend(warnings);
                if out.errors.len() == errs_before {
                    lr.index = i;
                    lr.context = context;
                    lr.port = port;
                    out.patches.push(lr);
                }
            }
            Err(errs) => out.errors.extend(errs),
        }
    }
    out
}

type Parsed = Result<(LocalRateLimitPatch, Vec<FieldProblem>), Vec<FieldProblem>>;

/// A patch's `value`: the local rate limit filter, its config checked field by field.
fn parse_filter_value(value: &Value, path: &str) -> Parsed {
    let (proto_value, proto_path) = local_rate_limit_config(value, path)?;
    let proto: LocalRateLimitProto = from_value(proto_value, &proto_path, &[])?;
    local_rate_limit(proto, &proto_path)
}

/// The filter's config and its path: `name` must be the local rate limit filter and
/// `typed_config` its proto, given as is or inside a TypedStruct.
fn local_rate_limit_config(
    value: &Value,
    path: &str,
) -> Result<(Value, String), Vec<FieldProblem>> {
    let one = |p: String, m: String| Err(vec![FieldProblem::new(p, m)]);
    let Some(obj) = value.as_object() else {
        return one(path.to_string(), "must be an object".into());
    };
    for k in obj.keys() {
        if k != "name" && k != "typed_config" && k != "typedConfig" {
            return one(
                format!("{path}.{k}"),
                "not supported (only name and typed_config)".into(),
            );
        }
    }
    match obj.get("name").and_then(Value::as_str) {
        Some(LOCAL_RATELIMIT) => {}
        Some(other) => {
            return one(
                format!("{path}.name"),
                format!("{other:?} is not supported: only {LOCAL_RATELIMIT}"),
            );
        }
        None => {
            return one(
                format!("{path}.name"),
                format!("required ({LOCAL_RATELIMIT})"),
            );
        }
    }
    let (tc_key, tc) = match (obj.get("typed_config"), obj.get("typedConfig")) {
        (Some(tc), _) => ("typed_config", tc),
        (None, Some(tc)) => ("typedConfig", tc),
        (None, None) => return one(format!("{path}.typed_config"), "required".into()),
    };
    let tc_path = format!("{path}.{tc_key}");
    let Some(tc_obj) = tc.as_object() else {
        return one(tc_path, "must be an object".into());
    };
    let ty = tc_obj.get("@type").and_then(Value::as_str).unwrap_or("");
    if TYPED_STRUCT_TYPES.contains(&ty) {
        for k in tc_obj.keys() {
            if !["@type", "type_url", "typeUrl", "value"].contains(&k.as_str()) {
                return one(format!("{tc_path}.{k}"), "unknown field".into());
            }
        }
        let url = tc_obj
            .get("type_url")
            .or_else(|| tc_obj.get("typeUrl"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if url != LOCAL_RATELIMIT_TYPE {
            return one(
                format!("{tc_path}.type_url"),
                format!("{url:?} is not supported: only {LOCAL_RATELIMIT_TYPE}"),
            );
        }
        Ok((
            tc_obj.get("value").cloned().unwrap_or(Value::Null),
            format!("{tc_path}.value"),
        ))
    } else if ty == LOCAL_RATELIMIT_TYPE {
        let mut v = tc.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("@type");
        }
        Ok((v, tc_path))
    } else {
        one(
            format!("{tc_path}.@type"),
            format!(
                "{ty:?} is not supported: use {LOCAL_RATELIMIT_TYPE} or a TypedStruct carrying it"
            ),
        )
    }
}

/// Errors and warnings about one local rate limit config, with paths under its own.
struct Problems<'a> {
    base: &'a str,
    errors: Vec<FieldProblem>,
    warnings: Vec<FieldProblem>,
}

impl Problems<'_> {
    fn err(&mut self, field: &str, message: impl Into<String>) {
        self.errors
            .push(FieldProblem::new(format!("{}.{field}", self.base), message));
    }

    fn warn(&mut self, field: &str, message: impl Into<String>) {
        self.warnings
            .push(FieldProblem::new(format!("{}.{field}", self.base), message));
    }
}

/// The local rate limit proto → a patch, refusing what mesh-proxy cannot enforce.
fn local_rate_limit(proto: LocalRateLimitProto, proto_path: &str) -> Parsed {
    let mut p = Problems {
        base: proto_path,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let Some(tb) = &proto.token_bucket else {
        p.err(
            "token_bucket",
            "required (max_tokens, tokens_per_fill, fill_interval)",
        );
        return Err(p.errors);
    };
    let (tokens_per_fill, fill_interval) = token_bucket(tb, &mut p);
    let enforced = enforced(&proto, &mut p);
    let status = match &proto.status {
        None => 429,
        Some(s) if (400..=599).contains(&s.code) => s.code,
        Some(s) => {
            p.err(
                "status.code",
                format!("{} is not a 4xx or 5xx status", s.code),
            );
            429
        }
    };
    let headers = response_headers(&proto.response_headers_to_add, &mut p);
    let x_ratelimit_headers = match proto.enable_x_ratelimit_headers.as_deref() {
        None | Some("OFF") => false,
        Some("DRAFT_VERSION_03") => true,
        Some(other) => {
            p.err(
                "enable_x_ratelimit_headers",
                format!("{other:?} is not OFF or DRAFT_VERSION_03"),
            );
            false
        }
    };
    refuse_unsupported(&proto, &mut p);
    if !p.errors.is_empty() {
        return Err(p.errors);
    }
    Ok((
        LocalRateLimitPatch {
            index: 0,
            context: PatchContext::Any,
            port: None,
            stat_prefix: proto.stat_prefix.clone().unwrap_or_default(),
            max_tokens: tb.max_tokens,
            tokens_per_fill,
            fill_interval,
            status,
            response_headers_to_add: headers,
            x_ratelimit_headers,
            enforced,
        },
        p.warnings,
    ))
}

/// Tokens per fill and the fill interval (at least 50 ms).
fn token_bucket(tb: &TokenBucket, p: &mut Problems<'_>) -> (u64, Duration) {
    if tb.max_tokens == 0 {
        p.err("token_bucket.max_tokens", "must be at least 1");
    }
    let tokens_per_fill = tb.tokens_per_fill.unwrap_or(1);
    if tokens_per_fill == 0 {
        p.err("token_bucket.tokens_per_fill", "must be at least 1");
    }
    let fill_interval = match mesh_config::parse_duration(&tb.fill_interval) {
        Ok(d) if d >= Duration::from_millis(50) => d,
        Ok(_) => {
            p.err("token_bucket.fill_interval", "must be at least 50ms");
            Duration::ZERO
        }
        Err(e) => {
            p.err("token_bucket.fill_interval", e);
            Duration::ZERO
        }
    };
    (tokens_per_fill, fill_interval)
}

/// Whether the limit is enforced: `filter_enabled` and `filter_enforced` at 100% (0%, or
/// absent as Envoy's default, is a limit that never limits: a warning).
fn enforced(proto: &LocalRateLimitProto, p: &mut Problems<'_>) -> bool {
    let mut enforced = true;
    for (f, v) in [
        ("filter_enabled", &proto.filter_enabled),
        ("filter_enforced", &proto.filter_enforced),
    ] {
        match percent(v) {
            Ok(x) if x >= 1.0 => {}
            Ok(x) if x <= 0.0 => {
                enforced = false;
                p.warn(
                    f,
                    if v.is_none() {
                        "absent: Envoy's default is 0%, so this rate limit never limits (set default_value 100/HUNDRED to enforce it)"
                    } else {
                        "0%: this rate limit never limits"
                    },
                );
            }
            Ok(x) => p.err(
                &format!("{f}.default_value"),
                format!(
                    "{}% is not supported: only 100% (or 0%)",
                    (x * 100.0 * 1000.0).round() / 1000.0
                ),
            ),
            Err(m) => p.err(&format!("{f}.default_value.denominator"), m),
        }
    }
    enforced
}

/// The headers of a limited response.
fn response_headers(
    options: &[HeaderValueOption],
    p: &mut Problems<'_>,
) -> Vec<mesh_config::HeaderValue> {
    let mut headers = Vec::new();
    for (i, h) in options.iter().enumerate() {
        match h.append_action.as_deref() {
            None
            | Some("APPEND_IF_EXISTS_OR_ADD")
            | Some("ADD_IF_ABSENT")
            | Some("OVERWRITE_IF_EXISTS_OR_ADD") => {}
            Some("OVERWRITE_IF_EXISTS") => p.err(
                &format!("response_headers_to_add[{i}].append_action"),
                "OVERWRITE_IF_EXISTS is not supported (a limited response is generated locally: the header never exists yet)",
            ),
            Some(other) => p.err(
                &format!("response_headers_to_add[{i}].append_action"),
                format!("{other:?} is not an Envoy HeaderAppendAction"),
            ),
        }
        if h.append.is_some() && h.append_action.is_some() {
            p.err(
                &format!("response_headers_to_add[{i}].append"),
                "append and append_action are mutually exclusive",
            );
        }
        headers.push(mesh_config::HeaderValue {
            name: h.header.key.clone(),
            value: h.header.value.clone(),
        });
    }
    headers
}

/// Fields of the proto mesh-proxy has no equivalent for: errors, not silent no-ops.
fn refuse_unsupported(proto: &LocalRateLimitProto, p: &mut Problems<'_>) {
    let set = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    };
    if set(&proto.request_headers_to_add_when_not_enforced) {
        p.err("request_headers_to_add_when_not_enforced", "not supported");
    }
    if set(&proto.descriptors) {
        p.err(
            "descriptors",
            "not supported (descriptor-based local rate limits)",
        );
    }
    if proto.stage.is_some_and(|s| s != 0) {
        p.err("stage", "not supported (only stage 0)");
    }
    if proto.local_rate_limit_per_downstream_connection == Some(true) {
        p.err(
            "local_rate_limit_per_downstream_connection",
            "not supported (buckets are per proxy instance)",
        );
    }
    if proto.vh_rate_limits.is_some() {
        p.err(
            "vh_rate_limits",
            "not supported (no route-level Envoy rate limit config in mesh-proxy)",
        );
    }
    if proto.rate_limited_as_resource_exhausted == Some(true) {
        p.err("rate_limited_as_resource_exhausted", "not supported");
    }
    // `always_consume_default_token_bucket` only matters with descriptors.
    let _ = proto.always_consume_default_token_bucket;
}

/// A RuntimeFractionalPercent's default as a fraction (absent → 0, Envoy's default).
fn percent(v: &Option<RuntimeFractionalPercent>) -> Result<f64, String> {
    let Some(fp) = v.as_ref().and_then(|v| v.default_value.as_ref()) else {
        return Ok(0.0);
    };
    let den = match fp.denominator.as_deref() {
        None | Some("HUNDRED") => 100.0,
        Some("TEN_THOUSAND") => 10_000.0,
        Some("MILLION") => 1_000_000.0,
        Some(other) => {
            return Err(format!("{other:?} is not HUNDRED, TEN_THOUSAND or MILLION"));
        }
    };
    Ok((fp.numerator as f64 / den).min(1.0))
}
