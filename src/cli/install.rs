//! `meshctl install`, `meshctl verify-install`, `meshctl uninstall`.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use meshctl::install::cluster::{self, Change, Cluster};
use meshctl::install::render::Component;

use super::install_args::{ClusterArgs, ProfileArgs};

#[derive(Args, Debug)]
pub struct InstallArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Do not ask for confirmation (it is only asked on a terminal).
    #[arg(short = 'y', long)]
    pub yes: bool,
    /// Show what would change (diff against the live cluster) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for every component to become ready (0s: do not wait).
    #[arg(long, default_value = "5m", value_parser = mesh_config::parse_duration)]
    pub readiness_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Do not ask for confirmation (it is only asked on a terminal).
    #[arg(short = 'y', long)]
    pub yes: bool,
    /// Also delete the CRDs meshctl installed (and with them every object of those kinds).
    #[arg(long)]
    pub purge: bool,
    /// How long to wait for the deleted objects to be gone.
    #[arg(long, default_value = "2m", value_parser = mesh_config::parse_duration)]
    pub timeout: Duration,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn connect(c: &ClusterArgs) -> Result<Cluster> {
    Cluster::connect(c.kubeconfig.as_deref(), c.context.as_deref()).await
}

/// Ask on a terminal; elsewhere (scripts, CI) proceed.
fn confirm(question: &str, yes: bool) -> Result<bool> {
    if yes || !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

pub fn install(args: InstallArgs) -> Result<ExitCode> {
    let resolved = args.profile.resolve()?;
    runtime()?.block_on(async {
        let cluster = connect(&args.cluster).await?;
        let plan = cluster::plan(&cluster, &resolved).await?;
        if !plan.kept_crds.is_empty() {
            eprintln!(
                "CRDs already in the cluster (Gateway API, Istio; not installed by meshctl) are left as they are: {}",
                plan.kept_crds.join(", ")
            );
        }
        if args.dry_run {
            let changes = cluster::diff(&cluster, &plan).await?;
            let (mut c, mut u, mut p) = (0, 0, 0);
            for ch in &changes {
                match ch {
                    Change::Create { what, validated } => {
                        c += 1;
                        let note = if *validated { "" } else { " (validated when its namespace or CRD exists)" };
                        println!("create {what}{note}");
                    }
                    Change::Update { what, diff } => {
                        u += 1;
                        println!("update {what}\n{diff}");
                    }
                    Change::Prune { what } => {
                        p += 1;
                        println!("prune {what}");
                    }
                }
            }
            let same = plan.objects.len() - c - u;
            println!(
                "dry run (profile {}, {}): {c} to create, {u} to update, {p} to prune, {same} unchanged; nothing was changed",
                plan.profile, cluster.server
            );
            return Ok(ExitCode::SUCCESS);
        }
        let question = format!(
            "Install profile {} into {} ({} objects{})?",
            plan.profile,
            cluster.server,
            plan.objects.len(),
            if plan.prune.is_empty() {
                String::new()
            } else {
                format!(", pruning {}", plan.prune.len())
            }
        );
        if !confirm(&question, args.yes)? {
            bail!("cancelled");
        }
        let start = Instant::now();
        let report = cluster::apply_plan(&cluster, &plan, args.readiness_timeout.max(Duration::from_secs(30))).await?;
        for (verb, list) in [
            ("created", &report.created),
            ("configured", &report.configured),
            ("pruned", &report.pruned),
        ] {
            for w in list {
                eprintln!("{w} {verb}");
            }
        }
        if !args.readiness_timeout.is_zero() {
            wait_with_progress(&cluster, &plan, args.readiness_timeout).await?;
        }
        println!(
            "✔ profile {} installed in {:.1}s: {} created, {} configured, {} unchanged, {} pruned",
            plan.profile,
            start.elapsed().as_secs_f64(),
            report.created.len(),
            report.configured.len(),
            report.unchanged.len(),
            report.pruned.len()
        );
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_with_progress(
    cluster: &Cluster,
    plan: &cluster::Plan,
    timeout: Duration,
) -> Result<()> {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{spinner} {prefix:16} {wide_msg}")
        .expect("valid template")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✔");
    let mut comps: Vec<Component> = plan.objects.iter().map(|o| o.component).collect();
    comps.sort();
    comps.dedup();
    let bars: Vec<(Component, ProgressBar)> = comps
        .iter()
        .map(|c| {
            let pb = multi.add(ProgressBar::new_spinner());
            pb.set_style(style.clone());
            pb.set_prefix(c.name());
            pb.set_message("waiting");
            pb.enable_steady_tick(Duration::from_millis(120));
            (*c, pb)
        })
        .collect();
    let start = Instant::now();
    let result = cluster::wait_ready(cluster, &plan.objects, timeout, |c, state| {
        if let Some((_, pb)) = bars.iter().find(|(k, _)| *k == c) {
            match state {
                Some(why) => pb.set_message(why.to_owned()),
                None if !pb.is_finished() => {
                    let msg = format!("ready ({:.1}s)", start.elapsed().as_secs_f64());
                    if !tty {
                        eprintln!("✔ {} {msg}", c.name());
                    }
                    pb.finish_with_message(msg);
                }
                None => {}
            }
        }
    })
    .await;
    for (_, pb) in &bars {
        if !pb.is_finished() {
            pb.abandon_with_message("not ready");
        }
    }
    result
}

pub fn verify(args: VerifyArgs) -> Result<ExitCode> {
    let resolved = args.profile.resolve()?;
    runtime()?.block_on(async {
        let cluster = connect(&args.cluster).await?;
        let (checked, problems) = cluster::verify(&cluster, &resolved).await?;
        if problems.is_empty() {
            println!(
                "✔ {checked} objects of profile {} are installed, as rendered, and ready",
                resolved.profile
            );
            return Ok(ExitCode::SUCCESS);
        }
        for p in &problems {
            println!("✘ {p}");
        }
        println!(
            "{} problem(s) in {checked} objects of profile {}",
            problems.len(),
            resolved.profile
        );
        Ok(ExitCode::FAILURE)
    })
}

pub fn uninstall(args: UninstallArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let cluster = connect(&args.cluster).await?;
        let what = if args.purge {
            "everything meshctl installed, including its CRDs and all objects of those kinds"
        } else {
            "everything meshctl installed except CRDs"
        };
        if !confirm(&format!("Delete {what} from {}?", cluster.server), args.yes)? {
            bail!("cancelled");
        }
        let deleted = cluster::uninstall(&cluster, args.purge, args.timeout).await?;
        for r in &deleted {
            eprintln!("{r} deleted");
        }
        if deleted.is_empty() {
            println!("nothing to uninstall");
        } else {
            println!("✔ uninstalled: {} objects deleted", deleted.len());
        }
        Ok(ExitCode::SUCCESS)
    })
}
