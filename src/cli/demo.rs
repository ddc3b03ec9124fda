//! `meshctl demo`: the walkthrough on this machine, no cluster.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use meshctl::demo::{self, DemoOptions};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Local port that serves the Gateway's port 80 (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let options = DemoOptions { port: args.port };
    let mut out = std::io::stdout().lock();
    runtime.block_on(demo::run(&options, &mut out))?;
    Ok(ExitCode::SUCCESS)
}
