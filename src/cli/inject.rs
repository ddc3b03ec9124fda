//! `meshctl inject`: offline sidecar injection of manifests.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use meshctl::kube_yaml::{self, Format};
use meshctl::offline;

use super::config_args::ConfigArgs;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Yaml,
    Json,
}

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// Input: a file, a directory (its *.yaml, *.yml, *.json files), or - for stdin.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    pub files: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "yaml")]
    pub output: OutputFormat,
    /// Show a unified diff of each input against its injected form instead of the output.
    #[arg(long)]
    pub diff: bool,
    /// Namespace the objects will be created in (for the system-namespace rule), when
    /// they do not name one.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Print the decision for every pod template to stderr (skips are always printed).
    #[arg(short = 'v', long)]
    pub verbose: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

fn inputs(spec: &str) -> Result<Vec<(String, String)>> {
    if spec == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        return Ok(vec![("<stdin>".into(), s)]);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading directory {spec}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
            })
            .collect();
        files.sort();
        return files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Ok((p.display().to_string(), text))
            })
            .collect();
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {spec}"))?;
    Ok(vec![(spec.to_owned(), text)])
}

pub fn run(args: InjectArgs) -> Result<ExitCode> {
    let mesh_ns = "mesh-system";
    let cfg = args.config.load(mesh_ns)?;
    let format = match args.output {
        OutputFormat::Yaml => Format::Yaml,
        OutputFormat::Json => Format::Json,
    };
    let mut sources = Vec::new();
    for f in &args.files {
        sources.extend(inputs(f)?);
    }
    if sources.is_empty() {
        bail!("no input files found");
    }
    // Everything is computed before anything is written: an error leaves no partial output.
    let mut out = String::new();
    let mut notes = Vec::new();
    for (name, text) in &sources {
        let result = offline::inject_text(name, text, &cfg, args.namespace.as_deref())?;
        for (index, r) in &result.reports {
            let Some(d) = &r.decision else { continue };
            let what = if d.inject { "injected" } else { "skipped" };
            if !d.inject || args.verbose {
                notes.push(format!(
                    "{name}: document {index}: {}: {what}: {}",
                    r.object, d.reason
                ));
            }
        }
        let rendered = offline::render(name, &result, Some(format))?;
        if args.diff {
            let (_, docs) =
                kube_yaml::parse_stream(text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let values: Vec<_> = docs.into_iter().map(|d| d.value).collect();
            let before =
                kube_yaml::render(&values, format).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let diff = similar::TextDiff::from_lines(&before, &rendered);
            out.push_str(
                &diff
                    .unified_diff()
                    .context_radius(3)
                    .header(&format!("a/{name}"), &format!("b/{name}"))
                    .to_string(),
            );
        } else {
            if !out.is_empty() && format == Format::Yaml && !rendered.is_empty() {
                out.push_str("---\n");
            }
            out.push_str(&rendered);
        }
    }
    for n in notes {
        eprintln!("{n}");
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
