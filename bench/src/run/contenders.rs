//! The contenders (direct, mesh-proxy, Envoy, HAProxy): how each is started on its cores (one
//! proxy, or a mesh hop's two), and one measurement of one of them (saturation, fixed rates,
//! CPU, RSS; for a hop also the new-connection phase).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::Opts;
use super::host::{clk_tck, cpu_ticks, loadavg, status_kb};
use super::process::{Proc, free_port, pinned, wait_port, wait_ready};
use super::syn_count::SynCounter;
use crate::configs::{self, Scenario};
use crate::hop::{self, Upstream};
use crate::load::LoadResult;
use mesh_config as c;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    Direct,
    MeshProxy,
    Envoy,
    Haproxy,
}

impl Contender {
    pub(super) fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::MeshProxy => "mesh-proxy",
            Contender::Envoy => "envoy",
            Contender::Haproxy => "haproxy",
        }
    }
}

/// One contender × scenario × repetition.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub rep: usize,
    pub loadavg: [f64; 3],
    pub saturation: LoadResult,
    pub fixed_rate: Vec<(f64, LoadResult)>,
    /// Proxy CPU (user + system) per 1,000 requests during the saturation phase, ms.
    pub cpu_ms_per_1k_saturation: Option<f64>,
    /// The same at the highest fixed rate.
    pub cpu_ms_per_1k_fixed: Option<f64>,
    pub rss_idle_kb: Option<u64>,
    /// Highest VmRSS seen under load (sampled every 100 ms) and VmHWM at the end.
    pub rss_load_kb: Option<u64>,
    pub hwm_kb: Option<u64>,
    /// A hop only: the phase in which B closes every A↔B connection after one response.
    pub new_conns: Option<NewConns>,
}

/// A hop's new-connection phase: the client keeps its connections to A alive while B ends
/// every A↔B connection after one response, so each request costs A a new upstream
/// connection (a full mutual TLS handshake in `hop-mtls`). Closed loop at the saturation
/// phase's connections.
#[derive(Debug, Clone, Serialize)]
pub struct NewConns {
    /// Requests per second = new A↔B connections per second.
    pub result: LoadResult,
    /// CPU (user + system) of A and B together per 1,000 requests (new connections), ms.
    pub cpu_ms_per_1k: Option<f64>,
    /// A↔B connections opened during the phase (warm-up included), counted by the kernel
    /// (SYNs to B's port, `syn_count`): checks that every request really had a connection of
    /// its own. `None` without the privilege to count (`CAP_NET_RAW`).
    pub upstream_conns: Option<u64>,
    /// `upstream_conns` ÷ the phase's requests (warm-up included): ~1 when the method works.
    pub upstream_conns_per_request: Option<f64>,
}

/// How one measurement is laid out on the cores.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    /// Proxy cores and workers.
    proxy_cpus: &'static str,
    workers: usize,
    /// Load generator and backend cores and threads.
    load_cpus: &'static str,
    load_threads: usize,
}

pub(super) const ONE_CORE: Layout = Layout {
    proxy_cpus: "1",
    workers: 1,
    load_cpus: "0",
    load_threads: 1,
};
pub(super) const TWO_CORES: Layout = Layout {
    proxy_cpus: "0,1",
    workers: 2,
    load_cpus: "0,1",
    load_threads: 2,
};

pub(super) struct Bench {
    pub(super) opts: Opts,
    pub(super) exe: PathBuf,
    pub(super) tmp: PathBuf,
    pub(super) backends: [u16; 2],
    /// Workload certificates of the hop's proxies.
    pub(super) certs: hop::Certs,
}

/// What one measurement started: nothing (direct), one proxy, or a hop's two (B, then A).
struct Started {
    procs: Vec<(Proc, PathBuf)>,
    /// A hop's B port.
    b_port: Option<u16>,
}

impl Started {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|(p, _)| p.pid()).collect()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (p, log) in &mut self.procs {
            if !p.alive() {
                bail!("{} died during the run; see {}", p.name, log.display());
            }
        }
        Ok(())
    }
}

/// The sum over `pids` of a per-process number (`None` if there are none or one is missing):
/// a hop's CPU and memory are both proxies'.
fn sum(pids: &[u32], f: impl Fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| f(p)).sum()
}

fn cpu_per_1k(before: Option<u64>, after: Option<u64>, total: u64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if total > 0 => {
            Some(a.saturating_sub(b) as f64 / clk_tck() * 1000.0 / total as f64 * 1000.0)
        }
        _ => None,
    }
}

impl Bench {
    /// Runs the load generator as a child on the load cores; polls the proxy's RSS meanwhile.
    fn load(
        &self,
        layout: Layout,
        addr: SocketAddr,
        args: &[String],
        watch: &[u32],
    ) -> anyhow::Result<(LoadResult, Option<u64>)> {
        let mut argv = vec![
            self.exe.display().to_string(),
            "load".into(),
            "--addr".into(),
            addr.to_string(),
            "--threads".into(),
            layout.load_threads.to_string(),
            "--warmup".into(),
            self.opts.warmup.as_secs_f64().to_string(),
            "--duration".into(),
            self.opts.phase.as_secs_f64().to_string(),
        ];
        argv.extend(args.iter().cloned());
        let mut child = pinned(layout.load_cpus)
            .args(&argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the load generator")?;
        let mut peak = None::<u64>;
        loop {
            if let Some(kb) = sum(watch, |p| status_kb(p, "VmRSS:")) {
                peak = Some(peak.map_or(kb, |p| p.max(kb)));
            }
            if child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut out = String::new();
        child
            .stdout
            .take()
            .context("load generator stdout")?
            .read_to_string(&mut out)?;
        let status = child.wait()?;
        if !status.success() {
            bail!("load generator failed ({status})");
        }
        Ok((
            serde_json::from_str(out.trim()).context("load generator output")?,
            peak,
        ))
    }

    fn mesh_argv(
        &self,
        cfg: &c::ProxyConfig,
        tag: &str,
        layout: Layout,
    ) -> anyhow::Result<Vec<String>> {
        let path = self.tmp.join(format!("{tag}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(cfg)?)?;
        Ok(vec![
            self.opts.mesh_proxy.display().to_string(),
            "run".into(),
            "--config".into(),
            path.display().to_string(),
            "--bind-address".into(),
            "127.0.0.1".into(),
            "--admin-address".into(),
            "off".into(),
            "--readiness-address".into(),
            "off".into(),
            "--metrics-address".into(),
            "off".into(),
            "--drain-timeout".into(),
            "1s".into(),
            "--workers".into(),
            layout.workers.to_string(),
        ])
    }

    fn envoy_argv(
        &self,
        yaml: &str,
        tag: &str,
        layout: Layout,
        port: u16,
    ) -> anyhow::Result<Vec<String>> {
        let path = self.tmp.join(format!("{tag}.yaml"));
        std::fs::write(&path, yaml)?;
        let envoy = self.opts.envoy.as_ref().context("no envoy")?;
        Ok(vec![
            envoy.display().to_string(),
            "-c".into(),
            path.display().to_string(),
            "--concurrency".into(),
            layout.workers.to_string(),
            "--disable-hot-restart".into(),
            "-l".into(),
            "warning".into(),
            "--base-id".into(),
            port.to_string(),
        ])
    }

    fn start(
        &self,
        c: Contender,
        s: Scenario,
        layout: Layout,
        port: u16,
        upstream: Upstream,
    ) -> anyhow::Result<Started> {
        if c == Contender::Direct {
            return Ok(Started {
                procs: Vec::new(),
                b_port: None,
            });
        }
        if s.is_hop() {
            return self.start_hop(c, s, layout, port, upstream);
        }
        let tag = format!("{}-{}-{}", c.name(), s.name(), layout.workers);
        let log = self.tmp.join(format!("{tag}.log"));
        let argv: Vec<String> = match c {
            Contender::Direct => unreachable!("handled above"),
            Contender::MeshProxy => {
                self.mesh_argv(&configs::mesh(s, port, self.backends), &tag, layout)?
            }
            Contender::Envoy => {
                self.envoy_argv(&configs::envoy(s, port, self.backends), &tag, layout, port)?
            }
            Contender::Haproxy => {
                let cfg = self.tmp.join(format!("{tag}.cfg"));
                std::fs::write(
                    &cfg,
                    configs::haproxy(s, port, self.backends, layout.workers),
                )?;
                let haproxy = self.opts.haproxy.as_ref().context("no haproxy")?;
                vec![
                    haproxy.display().to_string(),
                    "-db".into(),
                    "-f".into(),
                    cfg.display().to_string(),
                ]
            }
        };
        let p = Proc::spawn(c.name(), layout.proxy_cpus, &argv, &log)?;
        Ok(Started {
            procs: vec![(p, log)],
            b_port: None,
        })
    }

    /// A hop: B on a port of its own in front of the backend, then A on `port` in front of B,
    /// both pinned to the proxy cores with the layout's workers each.
    fn start_hop(
        &self,
        c: Contender,
        s: Scenario,
        layout: Layout,
        port: u16,
        upstream: Upstream,
    ) -> anyhow::Result<Started> {
        let mtls = s == Scenario::HopMtls;
        let b_port = free_port()?;
        let origin = self.backends[0];
        let tag = format!(
            "{}-{}-{}{}",
            c.name(),
            s.name(),
            layout.workers,
            if upstream == Upstream::CloseEach {
                "-close"
            } else {
                ""
            }
        );
        let (tag_a, tag_b) = (format!("{tag}-a"), format!("{tag}-b"));
        let certs = |dir: &PathBuf| -> Vec<String> {
            if mtls {
                vec!["--workload-certs".into(), dir.display().to_string()]
            } else {
                Vec::new()
            }
        };
        let (argv_b, argv_a) = match c {
            Contender::MeshProxy => {
                let mut b =
                    self.mesh_argv(&hop::mesh_b(b_port, origin, mtls, upstream), &tag_b, layout)?;
                b.extend(certs(&self.certs.b));
                let mut a = self.mesh_argv(&hop::mesh_a(port, b_port, mtls), &tag_a, layout)?;
                a.extend(certs(&self.certs.a));
                (b, a)
            }
            Contender::Envoy => {
                let dir = |d: &PathBuf| mtls.then(|| d.clone());
                let b = self.envoy_argv(
                    &hop::envoy_b(b_port, origin, dir(&self.certs.b).as_deref(), upstream),
                    &tag_b,
                    layout,
                    b_port,
                )?;
                let a = self.envoy_argv(
                    &hop::envoy_a(port, b_port, dir(&self.certs.a).as_deref()),
                    &tag_a,
                    layout,
                    port,
                )?;
                (b, a)
            }
            Contender::Direct | Contender::Haproxy => {
                bail!("no {} pair for the {} scenario", c.name(), s.name())
            }
        };
        let log_b = self.tmp.join(format!("{tag_b}.log"));
        let mut b = Proc::spawn(
            &format!("{} B", c.name()),
            layout.proxy_cpus,
            &argv_b,
            &log_b,
        )?;
        if let Err(e) = wait_port(SocketAddr::from(([127, 0, 0, 1], b_port))) {
            bail!(
                "{e}: {} B; its log ({}):\n{}",
                c.name(),
                log_b.display(),
                std::fs::read_to_string(&log_b).unwrap_or_default()
            );
        }
        if !b.alive() {
            bail!(
                "{} B exited; its log ({}):\n{}",
                c.name(),
                log_b.display(),
                std::fs::read_to_string(&log_b).unwrap_or_default()
            );
        }
        let log_a = self.tmp.join(format!("{tag_a}.log"));
        let a = Proc::spawn(
            &format!("{} A", c.name()),
            layout.proxy_cpus,
            &argv_a,
            &log_a,
        )?;
        Ok(Started {
            procs: vec![(b, log_b), (a, log_a)],
            b_port: Some(b_port),
        })
    }

    pub(super) fn measure(
        &self,
        rep: usize,
        c: Contender,
        s: Scenario,
        layout: Layout,
        fixed_rates: &[f64],
    ) -> anyhow::Result<Sample> {
        let la = loadavg();
        let port = if c == Contender::Direct {
            self.backends[0]
        } else {
            free_port()?
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut started = self.start(c, s, layout, port, Upstream::KeepAlive)?;
        if !started.procs.is_empty() {
            wait_ready(&mut started.procs, addr)?;
        }
        let pids = started.pids();
        std::thread::sleep(Duration::from_millis(300));
        let rss_idle_kb = sum(&pids, |p| status_kb(p, "VmRSS:"));
        let cpu = || sum(&pids, cpu_ticks);

        let before = cpu();
        let (saturation, peak) = self.load(
            layout,
            addr,
            &["--conns".into(), self.opts.conns.to_string()],
            &pids,
        )?;
        let after = cpu();
        let cpu_ms_per_1k_saturation = cpu_per_1k(before, after, saturation.total_requests);

        let mut fixed_rate = Vec::new();
        let mut cpu_ms_per_1k_fixed = None;
        let mut peak_all = peak;
        for &rate in fixed_rates {
            let before = cpu();
            let (r, peak) = self.load(
                layout,
                addr,
                &[
                    "--rate".into(),
                    rate.to_string(),
                    "--conns".into(),
                    self.opts.open_conns.to_string(),
                ],
                &pids,
            )?;
            let after = cpu();
            cpu_ms_per_1k_fixed = cpu_per_1k(before, after, r.total_requests);
            peak_all = match (peak_all, peak) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            fixed_rate.push((rate, r));
        }
        let hwm_kb = sum(&pids, |p| status_kb(p, "VmHWM:"));
        started.check_alive()?;
        drop(started);
        let new_conns = if s.is_hop() && c != Contender::Direct {
            Some(self.new_conns(c, s, layout)?)
        } else {
            None
        };
        let errs: u64 = saturation.errors
            + fixed_rate.iter().map(|(_, r)| r.errors).sum::<u64>()
            + new_conns.as_ref().map_or(0, |n| n.result.errors);
        if errs > 0 {
            eprintln!("  warning: {errs} errors ({} {})", c.name(), s.name());
        }
        Ok(Sample {
            rep,
            loadavg: la,
            saturation,
            fixed_rate,
            cpu_ms_per_1k_saturation,
            cpu_ms_per_1k_fixed,
            rss_idle_kb,
            rss_load_kb: peak_all,
            hwm_kb,
            new_conns,
        })
    }

    /// A hop's new-connection phase (see [`NewConns`]), on a pair started for it: B closes
    /// every connection after one response.
    fn new_conns(&self, c: Contender, s: Scenario, layout: Layout) -> anyhow::Result<NewConns> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut started = self.start(c, s, layout, port, Upstream::CloseEach)?;
        wait_ready(&mut started.procs, addr)?;
        let b_port = started.b_port.context("a hop has a B")?;
        let pids = started.pids();
        let counter = match SynCounter::open(b_port) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("  A↔B connections not counted (a packet socket on lo: {e})");
                None
            }
        };
        let before = sum(&pids, cpu_ticks);
        let (result, _) = self.load(
            layout,
            addr,
            &["--conns".into(), self.opts.conns.to_string()],
            &pids,
        )?;
        let after = sum(&pids, cpu_ticks);
        let upstream_conns = counter.map(|c| c.take()).transpose()?;
        started.check_alive()?;
        Ok(NewConns {
            cpu_ms_per_1k: cpu_per_1k(before, after, result.total_requests),
            upstream_conns,
            upstream_conns_per_request: upstream_conns
                .filter(|_| result.total_requests > 0)
                .map(|n| n as f64 / result.total_requests as f64),
            result,
        })
    }

    pub(super) fn start_backend(&self, layout: Layout) -> anyhow::Result<Proc> {
        let log = self.tmp.join("backend.log");
        let argv = vec![
            self.exe.display().to_string(),
            "backend".into(),
            "--port".into(),
            self.backends[0].to_string(),
            "--port".into(),
            self.backends[1].to_string(),
            "--threads".into(),
            layout.load_threads.to_string(),
        ];
        let p = Proc::spawn("backend", layout.load_cpus, &argv, &log)?;
        wait_port(SocketAddr::from(([127, 0, 0, 1], self.backends[1])))?;
        wait_port(SocketAddr::from(([127, 0, 0, 1], self.backends[0])))?;
        Ok(p)
    }
}
