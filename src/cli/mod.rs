//! Subcommand handlers (the anyhow edge of the program).

pub mod config_args;
pub mod control_plane;
pub mod inject;
pub mod proxy_status;
