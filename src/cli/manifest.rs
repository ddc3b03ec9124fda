//! `meshctl manifest generate`: the objects an install would apply, as YAML.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use meshctl::install::render::{self, Object};

use super::install_args::ProfileArgs;

#[derive(Args, Debug)]
pub struct ManifestArgs {
    #[command(subcommand)]
    pub command: ManifestCommand,
}

#[derive(Subcommand, Debug)]
pub enum ManifestCommand {
    /// Print the manifests of a profile (deterministic; CRDs and namespaces first).
    Generate(GenerateArgs),
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Write one file per component into DIR (NN-<component>.yaml) instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub output: Option<PathBuf>,
}

pub fn run(args: ManifestArgs) -> Result<ExitCode> {
    match args.command {
        ManifestCommand::Generate(g) => generate(g),
    }
}

fn generate(args: GenerateArgs) -> Result<ExitCode> {
    let resolved = args.profile.resolve()?;
    let objects = render::render(&resolved, None)?;
    match args.output {
        None => {
            print!(
                "{}{}",
                render::header(&resolved.profile),
                render::to_yaml(&objects)
            );
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut groups: Vec<(render::Component, Vec<Object>)> = Vec::new();
            for o in objects {
                match groups.iter_mut().find(|(c, _)| *c == o.component) {
                    Some((_, v)) => v.push(o),
                    None => groups.push((o.component, vec![o])),
                }
            }
            for (i, (component, objs)) in groups.iter().enumerate() {
                let path = dir.join(format!("{:02}-{}.yaml", i + 1, component.name()));
                std::fs::write(
                    &path,
                    format!(
                        "{}{}",
                        render::header(&resolved.profile),
                        render::to_yaml(objs)
                    ),
                )
                .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
