//! Applying and removing the rules: `iptables-restore` for the rules, `iptables` for the
//! jumps from the built-in chains, with the nft or the legacy back end.
//!
//! Idempotent: [`apply`] first removes our jumps from `PREROUTING`/`OUTPUT`, then restores with
//! `--noflush`, where declaring our chains creates or flushes them (other tables' and chains'
//! rules stay untouched). Running it twice leaves the same rules as running it once.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use mesh_wire::names::{PROXY_GID, PROXY_UID};
use mesh_wire::ports::{SIDECAR_INBOUND, SIDECAR_OUTBOUND};
use mesh_wire::redirect::{CHAINS, IpRanges, PortSet, RedirectSpec};

/// `mesh-proxy redirect`: the flags the injector writes (see `RedirectSpec::args`).
#[derive(Debug, Clone, clap::Args)]
pub struct RedirectArgs {
    /// The proxy's uid: its own connections are never captured.
    #[arg(long, value_name = "UID", default_value_t = PROXY_UID)]
    pub proxy_uid: i64,
    /// The proxy's gid: its own connections are never captured.
    #[arg(long, value_name = "GID", default_value_t = PROXY_GID)]
    pub proxy_gid: i64,
    /// Port of the proxy's inbound listener (captured inbound connections go there).
    #[arg(long, value_name = "PORT", default_value_t = SIDECAR_INBOUND)]
    pub inbound_port: u16,
    /// Port of the proxy's outbound listener (captured outbound connections go there).
    #[arg(long, value_name = "PORT", default_value_t = SIDECAR_OUTBOUND)]
    pub outbound_port: u16,
    /// Inbound ports to capture: `*` or a comma-separated list; absent or empty: none.
    #[arg(long, value_name = "PORTS", value_parser = PortSet::parse)]
    pub include_inbound_ports: Option<PortSet>,
    /// Inbound ports never captured (with `*` included).
    #[arg(long, value_name = "PORTS", value_parser = PortSet::parse)]
    pub exclude_inbound_ports: Option<PortSet>,
    /// Outbound destination ports always captured (besides the ranges).
    #[arg(long, value_name = "PORTS", value_parser = PortSet::parse)]
    pub include_outbound_ports: Option<PortSet>,
    /// Outbound destination ports never captured.
    #[arg(long, value_name = "PORTS", value_parser = PortSet::parse)]
    pub exclude_outbound_ports: Option<PortSet>,
    /// Outbound destinations captured: `*` or comma-separated IPv4 CIDRs; absent: none.
    #[arg(long, value_name = "CIDRS", value_parser = IpRanges::parse)]
    pub include_outbound_ip_ranges: Option<IpRanges>,
    /// Outbound destinations never captured.
    #[arg(long, value_name = "CIDRS", value_parser = IpRanges::parse)]
    pub exclude_outbound_ip_ranges: Option<IpRanges>,
    /// Print what would be done (the iptables-restore input, or the cleanup commands) and
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove our rules and chains instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
    /// iptables back end: `nft` (iptables-nft), `legacy` (iptables-legacy), or `auto` (the
    /// one that already holds rules in this network namespace; nft when both or neither do).
    #[arg(long, value_name = "auto|nft|legacy", default_value = "auto", value_parser = BackendChoice::parse)]
    pub backend: BackendChoice,
}

impl RedirectArgs {
    pub fn spec(&self) -> RedirectSpec {
        let ports = |p: &Option<PortSet>| p.clone().unwrap_or_else(PortSet::none);
        let ranges = |r: &Option<IpRanges>| {
            r.clone()
                .unwrap_or_else(|| IpRanges::List(Default::default()))
        };
        RedirectSpec {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            include_inbound_ports: ports(&self.include_inbound_ports),
            exclude_inbound_ports: ports(&self.exclude_inbound_ports),
            include_outbound_ports: ports(&self.include_outbound_ports),
            exclude_outbound_ports: ports(&self.exclude_outbound_ports),
            include_outbound_ip_ranges: ranges(&self.include_outbound_ip_ranges),
            exclude_outbound_ip_ranges: ranges(&self.exclude_outbound_ip_ranges),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Fixed(Backend),
}

impl BackendChoice {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "nft" => Ok(Self::Fixed(Backend::Nft)),
            "legacy" => Ok(Self::Fixed(Backend::Legacy)),
            _ => Err(format!("{s:?} is not auto, nft or legacy")),
        }
    }
}

/// Which iptables programs to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`, `iptables-nft-restore` (plain `iptables` when only it is installed).
    Nft,
    /// `iptables-legacy`, `iptables-legacy-restore`.
    Legacy,
    /// Plain `iptables`/`iptables-restore`, whatever they are.
    Default,
}

impl Backend {
    fn programs(self) -> (&'static str, &'static str) {
        match self {
            Backend::Nft => ("iptables-nft", "iptables-nft-restore"),
            Backend::Legacy => ("iptables-legacy", "iptables-legacy-restore"),
            Backend::Default => ("iptables", "iptables-restore"),
        }
    }

    fn resolve(choice: BackendChoice) -> anyhow::Result<Backend> {
        let have = |p: &str| find_program(p).is_some();
        match choice {
            BackendChoice::Fixed(b) => {
                let (ipt, _) = b.programs();
                if !have(ipt) {
                    bail!("{ipt} is not installed (the {b:?} iptables back end was asked for)");
                }
                Ok(b)
            }
            BackendChoice::Auto => {
                let (nft, legacy) = (have("iptables-nft"), have("iptables-legacy"));
                Ok(match (nft, legacy) {
                    (true, true) => {
                        // Follow the back end the node (or another tool) already uses here.
                        if has_rules("iptables-legacy-save") && !has_rules("iptables-nft-save") {
                            Backend::Legacy
                        } else {
                            Backend::Nft
                        }
                    }
                    (true, false) => Backend::Nft,
                    (false, true) => Backend::Legacy,
                    (false, false) if have("iptables") => Backend::Default,
                    (false, false) => bail!(
                        "no iptables found (iptables-nft, iptables-legacy or iptables); \
                         install the iptables package"
                    ),
                })
            }
        }
    }
}

fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn has_rules(save: &str) -> bool {
    Command::new(save)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("-A "))
        })
        .unwrap_or(false)
}

/// The `iptables` argument lists that remove our rules: the jumps from the built-in chains
/// (repeated until none is left), then our chains flushed and deleted.
pub fn cleanup_commands() -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    cmds.push(v(&[
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-p",
        "tcp",
        "-j",
        "MESH_INBOUND",
    ]));
    cmds.push(v(&[
        "-t",
        "nat",
        "-D",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "MESH_OUTPUT",
    ]));
    for c in CHAINS {
        cmds.push(v(&["-t", "nat", "-F", c]));
    }
    for c in CHAINS {
        cmds.push(v(&["-t", "nat", "-X", c]));
    }
    cmds
}

fn iptables(program: &str, args: &[String]) -> anyhow::Result<std::process::Output> {
    Command::new(program)
        .arg("-w")
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))
}

/// Removes our rules and chains (nothing to remove is fine).
pub fn cleanup(backend: Backend) -> anyhow::Result<()> {
    let (ipt, _) = backend.programs();
    for args in cleanup_commands() {
        let is_delete = args.get(2).is_some_and(|a| a == "-D");
        // A jump may have been added more than once (by something else than us): repeat.
        for _ in 0..if is_delete { 16 } else { 1 } {
            let out = iptables(ipt, &args)?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                // "No chain/target/match by that name", "does a matching rule exist": absent.
                let absent = err.contains("No chain")
                    || err.contains("does a matching rule exist")
                    || err.contains("doesn't exist")
                    || err.contains("does not exist")
                    || err.contains("No such file");
                if !absent {
                    bail!("{ipt} {}: {}", args.join(" "), err.trim());
                }
                break;
            }
        }
    }
    Ok(())
}

/// Installs the rules of `spec` (replacing ours if present).
pub fn apply(spec: &RedirectSpec, backend: Backend) -> anyhow::Result<()> {
    cleanup(backend)?;
    let (_, restore) = backend.programs();
    let rules = spec.iptables_rules();
    let mut child = Command::new(restore)
        .args(["--noflush", "-w"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {restore}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())
        .with_context(|| format!("cannot write to {restore}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{restore} --noflush failed: {}\ninput was:\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The subcommand.
pub fn run(args: &RedirectArgs) -> anyhow::Result<()> {
    let spec = args.spec();
    if args.dry_run {
        if args.cleanup {
            for c in cleanup_commands() {
                println!("iptables {}", c.join(" "));
            }
        } else {
            print!("{}", spec.iptables_rules());
        }
        return Ok(());
    }
    let backend = Backend::resolve(args.backend)?;
    if args.cleanup {
        cleanup(backend)?;
        eprintln!("mesh-proxy redirect: rules removed ({backend:?} back end)");
    } else {
        apply(&spec, backend)?;
        eprintln!(
            "mesh-proxy redirect: rules installed ({backend:?} back end):\n{}",
            spec.iptables_rules()
        );
    }
    Ok(())
}
