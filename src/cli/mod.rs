//! Subcommand handlers (the anyhow edge of the program).

pub mod ca;
pub mod config_args;
pub mod control_plane;
pub mod demo;
pub mod inject;
pub mod install;
pub mod install_args;
pub mod manifest;
pub mod proxy_status;
