//! Status the control plane writes back: per HTTPRoute parentRef and per Gateway, with the
//! Gateway API condition types and reasons.

use std::fmt;

/// Gateway API condition types used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConditionType {
    Accepted,
    ResolvedRefs,
    Programmed,
    /// HTTPRoute: some rules were dropped (Gateway API v1.1 `PartiallyInvalid`).
    PartiallyInvalid,
}

/// Gateway API condition reasons used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Accepted,
    NoMatchingParent,
    NotAllowedByListeners,
    NoMatchingListenerHostname,
    UnsupportedValue,
    ResolvedRefs,
    BackendNotFound,
    InvalidKind,
    RefNotPermitted,
    Programmed,
    Invalid,
    UnsupportedProtocol,
    PortUnavailable,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Accepted => "Accepted",
            ConditionType::ResolvedRefs => "ResolvedRefs",
            ConditionType::Programmed => "Programmed",
            ConditionType::PartiallyInvalid => "PartiallyInvalid",
        }
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Accepted => "Accepted",
            Reason::NoMatchingParent => "NoMatchingParent",
            Reason::NotAllowedByListeners => "NotAllowedByListeners",
            Reason::NoMatchingListenerHostname => "NoMatchingListenerHostname",
            Reason::UnsupportedValue => "UnsupportedValue",
            Reason::ResolvedRefs => "ResolvedRefs",
            Reason::BackendNotFound => "BackendNotFound",
            Reason::InvalidKind => "InvalidKind",
            Reason::RefNotPermitted => "RefNotPermitted",
            Reason::Programmed => "Programmed",
            Reason::Invalid => "Invalid",
            Reason::UnsupportedProtocol => "UnsupportedProtocol",
            Reason::PortUnavailable => "PortUnavailable",
        }
    }
}

/// One condition (the control plane adds `lastTransitionTime`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: ConditionType,
    pub status: bool,
    pub reason: Reason,
    pub message: String,
    /// `metadata.generation` of the object the condition is about.
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub(crate) fn new(
        type_: ConditionType,
        status: bool,
        reason: Reason,
        message: impl Into<String>,
        observed_generation: Option<i64>,
    ) -> Self {
        Condition {
            type_,
            status,
            reason,
            message: message.into(),
            observed_generation,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={} ({}){}",
            self.type_.as_str(),
            if self.status { "True" } else { "False" },
            self.reason.as_str(),
            if self.message.is_empty() {
                String::new()
            } else {
                format!(": {}", self.message)
            }
        )
    }
}

/// A parentRef as written in the route, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<i32>,
}

/// Status of one HTTPRoute for one of its parentRefs (`status.parents[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteParentStatus {
    pub route_namespace: String,
    pub route_name: String,
    pub parent_ref: ParentRef,
    /// The GatewayClass controller of the parent (one of ours).
    pub controller_name: String,
    /// `Accepted` and `ResolvedRefs` (and `PartiallyInvalid` when rules were dropped).
    pub conditions: Vec<Condition>,
}

impl RouteParentStatus {
    pub fn condition(&self, t: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == t)
    }
}

/// Status of one listener of a Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    pub name: String,
    /// Number of routes attached to the listener.
    pub attached_routes: i32,
    /// Route kinds the listener accepts (`HTTPRoute`).
    pub supported_kinds: Vec<String>,
    pub conditions: Vec<Condition>,
}

/// Status of a Gateway we serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    pub namespace: String,
    pub name: String,
    pub controller_name: String,
    /// `Accepted` and `Programmed`.
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerStatus>,
}
