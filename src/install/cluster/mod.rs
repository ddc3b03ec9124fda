//! The cluster side of the installer: connection, server-side apply, prune, diff, readiness,
//! verify and uninstall. Objects are handled as dynamic objects (discovery per kind).
//!
//! - [`client`]: the connection and the live-object operations everything else uses;
//! - [`apply`]: the install plan, applying it, and the dry-run diff;
//! - [`health`]: readiness, and verify;
//! - [`uninstall`].

pub mod apply;
pub mod client;
pub mod health;
pub mod uninstall;

pub use apply::{
    ApplyReport, Change, Plan, apply_plan, diff, plan, strip_server_fields, webhook_tls,
};
pub use client::{Cluster, FIELD_MANAGER, LiveRef, OWNED_KINDS, one_line, wait_gone};
pub use health::{Problem, explain_deployment, not_ready_reason, verify, wait_ready};
pub use uninstall::uninstall;
