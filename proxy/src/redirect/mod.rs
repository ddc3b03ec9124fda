//! Traffic capture: applying and removing the nat rules `mesh-proxy redirect` (the injected
//! `mesh-init` container) programs.
//!
//! The rules themselves are [`mesh_wire::redirect::RedirectSpec`], shared with the injector
//! (`meshctl`'s `src/inject/`), which writes its `args` into the pod; this
//! subcommand parses the same flags back ([`RedirectArgs`]), so the flags in the pod and the
//! rules applied cannot drift. [`apply`] runs `iptables-restore` / `iptables`.

mod apply;
pub use apply::{Backend, BackendChoice, RedirectArgs, apply, cleanup, cleanup_commands, run};

#[cfg(test)]
mod tests;
