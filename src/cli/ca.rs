//! `meshctl ca rotate` and `meshctl ca status`: the mesh CA's roots, and replacing the root
//! in one command.
//!
//! `rotate` asks the control plane for a rotation (annotation on Secret `mesh-ca-secret`,
//! see `meshctl::controlplane::ca_rotation`), then follows it: the phase from the Secret, the
//! proxies on the new bundle and on the new root from the control plane's
//! `GET /debug/proxies` (as `meshctl proxy-status` reads it). The rotation is the control
//! plane's state, not the CLI's: a CLI that stops (Ctrl-C, `--timeout`) leaves it going, and
//! running `rotate` again follows the one under way.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use mesh_tls::ca::{CertificateSummary, summarize_pem};
use meshctl::controlplane::ca_rotation::{
    self, NEW_ROOT_ANNOTATION, OLD_ROOT_ANNOTATION, PHASE_ANNOTATION, PHASE_SINCE_ANNOTATION,
    Phase, Progress, ProxyCertificate, RotationState,
};
use meshctl::controlplane::mesh_ca::{
    DEFAULT_NAMESPACE, MESH_CA_SECRET, PLUGIN_CA_SECRET, from_secret,
};
use meshctl::install::cluster::Cluster;

use super::install_args::ClusterArgs;

#[derive(Args, Debug)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Replace the mesh's root: add a new root to every proxy's trust bundle, sign with it
    /// once every proxy trusts it, drop the old one once every proxy has a certificate from
    /// the new one. Shows progress until done.
    Rotate(RotateArgs),
    /// The mesh CA's roots, the one that signs, a rotation under way, and the proxies on
    /// each root.
    Status(StatusArgs),
}

/// Where the CA and the control plane are.
#[derive(Args, Debug)]
pub struct Target {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Namespace of the control plane and its CA Secrets.
    #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Base URL of the control plane's admin endpoint (`/debug/proxies`); from outside the
    /// cluster: `kubectl -n mesh-system port-forward deploy/meshd 15014` first.
    #[arg(
        long,
        env = "MESHCTL_CONTROL_PLANE_ADMIN",
        default_value = "http://127.0.0.1:15014"
    )]
    pub control_plane_admin: String,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    pub target: Target,
    /// How long to follow the rotation before giving up (it goes on in the control plane).
    #[arg(long, default_value = "10m", value_parser = mesh_config::parse_duration)]
    pub timeout: Duration,
    /// Show the current root and the proxies that would be re-issued; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
}

/// How often a rotation is looked at while it is followed.
const POLL: Duration = Duration::from_millis(500);

pub fn run(args: CaArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match args.command {
            CaCommand::Rotate(a) => rotate(a).await,
            CaCommand::Status(a) => status(a).await,
        }
    })
}

/// The CA Secrets of the target namespace.
struct Secrets {
    api: Api<Secret>,
    namespace: String,
}

impl Secrets {
    async fn connect(t: &Target) -> Result<Secrets> {
        let cluster = Cluster::connect(
            t.cluster.kubeconfig.as_deref(),
            t.cluster.context.as_deref(),
        )
        .await?;
        Ok(Secrets {
            api: Api::namespaced(cluster.client, &t.namespace),
            namespace: t.namespace.clone(),
        })
    }

    async fn get(&self, name: &str) -> Result<Option<Secret>> {
        self.api
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {}/{name}", self.namespace))
    }

    /// `mesh-ca-secret`; an error saying what to do when the mesh CA is not that one.
    async fn ours(&self) -> Result<Secret> {
        let ns = &self.namespace;
        if self.get(PLUGIN_CA_SECRET).await?.is_some() {
            bail!(
                "the mesh CA is your own CA, Secret {ns}/{PLUGIN_CA_SECRET} (Istio's plug-in \
                 layout), so meshctl does not rotate it: rotate it by updating \
                 {PLUGIN_CA_SECRET} — first put the new root next to the old one in \
                 root-cert.pem, then (once every proxy trusts both: `meshctl ca status`) the \
                 new ca-cert.pem, ca-key.pem and cert-chain.pem, then drop the old root. The \
                 control plane picks up each change at once and sends it to every proxy"
            );
        }
        self.get(MESH_CA_SECRET).await?.with_context(|| {
            format!(
                "there is no Secret {ns}/{MESH_CA_SECRET}: the control plane makes it when it \
                 starts (is meshd running in namespace {ns}? --namespace)"
            )
        })
    }
}

/// The proxies and their certificates, from `/debug/proxies`.
async fn proxies(admin: &str) -> Result<Vec<ProxyCertificate>> {
    let body = super::proxy_status::fetch(admin).await?;
    let report: serde_json::Value =
        serde_json::from_str(&body).context("parsing /debug/proxies")?;
    ProxyCertificate::of_report(&report)
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}

fn describe_root(r: &CertificateSummary) -> String {
    format!(
        "{} ({}, expires {})",
        r.sha256,
        if r.subject.is_empty() {
            "no subject"
        } else {
            &r.subject
        },
        r.not_after()
    )
}

/// The roots of a CA Secret, and the one that signs.
fn roots_of(
    secret: &Secret,
    namespace: &str,
    name: &str,
) -> Result<(String, Vec<CertificateSummary>)> {
    let ca = from_secret(secret, namespace, name)?;
    let bundle = ca.trust_bundle_pem();
    let roots = summarize_pem(
        &bundle,
        &format!("Secret {namespace}/{name} key root-cert.pem"),
    )?;
    Ok((ca.signing_root_sha256(), roots))
}

async fn rotate(args: RotateArgs) -> Result<ExitCode> {
    let t = &args.target;
    let secrets = Secrets::connect(t).await?;
    let ns = &secrets.namespace;
    let mut secret = secrets.ours().await?;
    let state = RotationState::of(&secret)?;
    if args.dry_run {
        return dry_run(&secret, &state, t).await;
    }
    // Ask, unless a rotation is under way (then follow it). resourceVersion makes the ask
    // conditional: two CLIs at once start one rotation.
    let mut asked = false;
    for _ in 0..5 {
        let state = RotationState::of(&secret)?;
        if state.in_progress() {
            println!(
                "a rotation of the mesh root is under way (phase {}{}): following it",
                state.phase.map_or("?", Phase::as_str),
                state
                    .since
                    .as_deref()
                    .map(|s| format!(" since {s}"))
                    .unwrap_or_default()
            );
            break;
        }
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": secret.metadata.resource_version,
            "annotations": {
                PHASE_ANNOTATION: Phase::Requested.as_str(),
                PHASE_SINCE_ANNOTATION: ca_rotation::now_rfc3339(),
                OLD_ROOT_ANNOTATION: null,
                NEW_ROOT_ANNOTATION: null,
            },
        }});
        match secrets
            .api
            .patch(
                MESH_CA_SECRET,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                asked = true;
                let (signing, _) = roots_of(&secret, ns, MESH_CA_SECRET)?;
                println!(
                    "rotation requested: the control plane replaces root {} (Secret {ns}/{MESH_CA_SECRET})",
                    short(&signing)
                );
                break;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                secret = secrets.ours().await?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("asking for a rotation on Secret {ns}/{MESH_CA_SECRET}")
                });
            }
        }
    }
    if !asked && !RotationState::of(&secret)?.in_progress() {
        bail!("Secret {ns}/{MESH_CA_SECRET} kept changing while asking for a rotation; try again");
    }
    follow(&secrets, t, args.timeout).await
}

/// What the last look showed, as one line.
fn progress_line(
    phase: Phase,
    proxies: &Result<Vec<ProxyCertificate>>,
    old: &str,
    new: &str,
) -> String {
    let head = format!("phase {phase}: waiting for {}", phase.waits_for());
    if phase == Phase::Requested {
        // No new root yet: nothing to count.
        return head;
    }
    match proxies {
        Err(e) => format!("{head}; proxies unknown ({e:#})"),
        Ok(list) => {
            let p = Progress::of(list, old, new);
            let n = p.proxies;
            let mut line = format!(
                "{head}; on the new bundle {}/{n}, on the new root {}/{n}, old root dropped {}/{n}",
                p.trusting_new, p.on_new_root, p.without_old_root
            );
            if p.without_certificate > 0 {
                line.push_str(&format!(
                    " ({} more without a certificate yet)",
                    p.without_certificate
                ));
            }
            line
        }
    }
}

async fn follow(secrets: &Secrets, t: &Target, timeout: Duration) -> Result<ExitCode> {
    let ns = &secrets.namespace;
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        None,
        if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{spinner} {wide_msg}")
            .expect("valid template")
            .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✔"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let start = Instant::now();
    let mut last_line = String::new();
    loop {
        let secret = secrets.ours().await?;
        let state = RotationState::of(&secret)?;
        let phase = state.phase.unwrap_or(Phase::Requested);
        let (old, new) = (
            state.old_root.clone().unwrap_or_default(),
            state.new_root.clone().unwrap_or_default(),
        );
        let list = proxies(&t.control_plane_admin).await;
        if phase == Phase::Done {
            let n = list
                .as_ref()
                .map(|l| Progress::of(l, &old, &new).on_new_root);
            let msg = format!(
                "rotation done in {:.0}s: root {} signs and is the only root trusted (was {}){}",
                start.elapsed().as_secs_f64(),
                short(&new),
                short(&old),
                n.map(|n| format!("; {n} proxies on it"))
                    .unwrap_or_default()
            );
            bar.finish_and_clear();
            println!("✔ {msg}");
            return Ok(ExitCode::SUCCESS);
        }
        let line = progress_line(phase, &list, &old, &new);
        if line != last_line {
            if tty {
                bar.set_message(line.clone());
            } else {
                println!("{line}");
            }
            last_line = line;
        }
        if start.elapsed() >= timeout {
            bar.abandon();
            let who = match &list {
                Ok(l) => {
                    let lag = ca_rotation::lagging(l, phase, &old, &new);
                    if lag.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; not there yet: {}",
                            lag.iter()
                                .map(|c| format!(
                                    "{} (certificate from root {}, trusts {})",
                                    c.proxy,
                                    short(c.root_sha256.as_deref().unwrap_or("-")),
                                    c.trust_bundle_sha256
                                        .iter()
                                        .map(|s| short(s))
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ))
                                .collect::<Vec<_>>()
                                .join("; ")
                        )
                    }
                }
                Err(e) => format!("; the proxies could not be read: {e:#}"),
            };
            bail!(
                "timed out after {}s in phase {phase}, waiting for {}{who}. The rotation stays \
                 in Secret {ns}/{MESH_CA_SECRET} and goes on in the control plane: run `meshctl \
                 ca rotate` again to follow it, `meshctl ca status` to see it",
                timeout.as_secs(),
                phase.waits_for()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn dry_run(secret: &Secret, state: &RotationState, t: &Target) -> Result<ExitCode> {
    let ns = &t.namespace;
    let (signing, roots) = roots_of(secret, ns, MESH_CA_SECRET)?;
    println!("mesh CA: Secret {ns}/{MESH_CA_SECRET}");
    for r in &roots {
        let mark = if r.sha256 == signing { "signing " } else { "" };
        println!("  {mark}root {}", describe_root(r));
    }
    if state.in_progress() {
        println!(
            "a rotation is under way (phase {}): `meshctl ca rotate` would follow it",
            state.phase.map_or("?", Phase::as_str)
        );
    } else {
        println!(
            "`meshctl ca rotate` would: add a new root to every proxy's trust bundle; once every \
             proxy trusts it, sign with it (every proxy gets a new certificate); once every \
             proxy has one, drop root {}",
            short(&signing)
        );
    }
    match proxies(&t.control_plane_admin).await {
        Ok(list) => {
            let reissued: Vec<&ProxyCertificate> =
                list.iter().filter(|c| c.root_sha256.is_some()).collect();
            println!("proxies that would be re-issued ({}):", reissued.len());
            for c in reissued {
                println!(
                    "  {}  {}  root {}",
                    c.proxy,
                    c.identity.as_deref().unwrap_or("-"),
                    short(c.root_sha256.as_deref().unwrap_or("-"))
                );
            }
            let without = list.len() - list.iter().filter(|c| c.root_sha256.is_some()).count();
            if without > 0 {
                println!("  ({without} connected proxies have no certificate yet)");
            }
        }
        Err(e) => println!("proxies: unknown ({e:#})"),
    }
    println!("dry run: nothing was changed");
    Ok(ExitCode::SUCCESS)
}

async fn status(args: StatusArgs) -> Result<ExitCode> {
    let t = &args.target;
    let secrets = Secrets::connect(t).await?;
    let ns = &secrets.namespace;
    let (name, secret) = match secrets.get(PLUGIN_CA_SECRET).await? {
        Some(s) => (PLUGIN_CA_SECRET, s),
        None => (
            MESH_CA_SECRET,
            secrets.get(MESH_CA_SECRET).await?.with_context(|| {
                format!(
                    "neither Secret {ns}/{PLUGIN_CA_SECRET} nor {ns}/{MESH_CA_SECRET} exists: is \
                     the control plane running in namespace {ns}? (--namespace)"
                )
            })?,
        ),
    };
    let (signing, roots) = roots_of(&secret, ns, name)?;
    println!(
        "mesh CA: Secret {ns}/{name}{}",
        if name == PLUGIN_CA_SECRET {
            " (your own CA; rotate it by updating it)"
        } else {
            ""
        }
    );
    for r in &roots {
        let mark = if r.sha256 == signing { "signing " } else { "" };
        println!("  {mark}root {}", describe_root(r));
    }
    let state = if name == MESH_CA_SECRET {
        RotationState::of(&secret)?
    } else {
        RotationState::default()
    };
    if let Some(phase) = state.phase {
        println!(
            "rotation: phase {phase}{}{}",
            state
                .since
                .as_deref()
                .map(|s| format!(" since {s}"))
                .unwrap_or_default(),
            match (&state.old_root, &state.new_root) {
                (Some(o), Some(n)) => format!(" (root {} → {})", short(o), short(n)),
                _ => String::new(),
            }
        );
        if phase.in_progress() {
            println!("  waiting for {}", phase.waits_for());
        }
    }
    match proxies(&t.control_plane_admin).await {
        Ok(list) => {
            println!("proxies per root ({} connected):", list.len());
            let mut by_root: std::collections::BTreeMap<String, Vec<&ProxyCertificate>> =
                Default::default();
            for c in &list {
                let key = c
                    .root_sha256
                    .clone()
                    .unwrap_or_else(|| "(no certificate yet)".into());
                by_root.entry(key).or_default().push(c);
            }
            for (root, cs) in by_root {
                let known = roots.iter().any(|r| r.sha256 == root);
                println!(
                    "  {root}{}: {}",
                    if known || root.starts_with('(') {
                        ""
                    } else {
                        " (no longer trusted)"
                    },
                    cs.len()
                );
                for c in cs {
                    println!(
                        "    {}  trusts {}",
                        c.proxy,
                        c.trust_bundle_sha256
                            .iter()
                            .map(|s| short(s))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        Err(e) => eprintln!("warning: proxies unknown: {e:#}"),
    }
    Ok(ExitCode::SUCCESS)
}
