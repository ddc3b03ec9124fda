//! The contenders (direct, mesh-proxy, Envoy, HAProxy): how each is started on its cores,
//! and one measurement of one of them (saturation, fixed rates, CPU, RSS).

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
use crate::configs::{self, Scenario};
use crate::load::LoadResult;

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
}

impl Bench {
    /// Runs the load generator as a child on the load cores; polls the proxy's RSS meanwhile.
    fn load(
        &self,
        layout: Layout,
        addr: SocketAddr,
        args: &[String],
        watch: Option<u32>,
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
            if let Some(pid) = watch
                && let Some(kb) = status_kb(pid, "VmRSS:")
            {
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

    fn start_proxy(
        &self,
        c: Contender,
        s: Scenario,
        layout: Layout,
        port: u16,
    ) -> anyhow::Result<Option<(Proc, PathBuf)>> {
        let tag = format!("{}-{}-{}", c.name(), s.name(), layout.workers);
        let log = self.tmp.join(format!("{tag}.log"));
        let argv: Vec<String> = match c {
            Contender::Direct => return Ok(None),
            Contender::MeshProxy => {
                let cfg = self.tmp.join(format!("{tag}.json"));
                std::fs::write(
                    &cfg,
                    serde_json::to_vec_pretty(&configs::mesh(s, port, self.backends))?,
                )?;
                vec![
                    self.opts.mesh_proxy.display().to_string(),
                    "run".into(),
                    "--config".into(),
                    cfg.display().to_string(),
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
                ]
            }
            Contender::Envoy => {
                let cfg = self.tmp.join(format!("{tag}.yaml"));
                std::fs::write(&cfg, configs::envoy(s, port, self.backends))?;
                let envoy = self.opts.envoy.as_ref().context("no envoy")?;
                vec![
                    envoy.display().to_string(),
                    "-c".into(),
                    cfg.display().to_string(),
                    "--concurrency".into(),
                    layout.workers.to_string(),
                    "--disable-hot-restart".into(),
                    "-l".into(),
                    "warning".into(),
                    "--base-id".into(),
                    port.to_string(),
                ]
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
        Ok(Some((p, log)))
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
        let mut proxy = self.start_proxy(c, s, layout, port)?;
        if let Some((p, log)) = &mut proxy {
            wait_ready(p, addr, log)?;
        }
        let pid = proxy.as_ref().map(|(p, _)| p.pid());
        std::thread::sleep(Duration::from_millis(300));
        let rss_idle_kb = pid.and_then(|p| status_kb(p, "VmRSS:"));
        let tck = clk_tck();
        let cpu_per_1k = |before: Option<u64>, after: Option<u64>, total: u64| match (before, after)
        {
            (Some(b), Some(a)) if total > 0 => {
                Some((a - b) as f64 / tck * 1000.0 / total as f64 * 1000.0)
            }
            _ => None,
        };

        let before = pid.and_then(cpu_ticks);
        let (saturation, peak) = self.load(
            layout,
            addr,
            &["--conns".into(), self.opts.conns.to_string()],
            pid,
        )?;
        let after = pid.and_then(cpu_ticks);
        let cpu_ms_per_1k_saturation = cpu_per_1k(before, after, saturation.total_requests);

        let mut fixed_rate = Vec::new();
        let mut cpu_ms_per_1k_fixed = None;
        let mut peak_all = peak;
        for &rate in fixed_rates {
            let before = pid.and_then(cpu_ticks);
            let (r, peak) = self.load(
                layout,
                addr,
                &[
                    "--rate".into(),
                    rate.to_string(),
                    "--conns".into(),
                    self.opts.open_conns.to_string(),
                ],
                pid,
            )?;
            let after = pid.and_then(cpu_ticks);
            cpu_ms_per_1k_fixed = cpu_per_1k(before, after, r.total_requests);
            peak_all = match (peak_all, peak) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            fixed_rate.push((rate, r));
        }
        let hwm_kb = pid.and_then(|p| status_kb(p, "VmHWM:"));
        if let Some((p, log)) = &mut proxy
            && !p.alive()
        {
            bail!("{} died during the run; see {}", p.name, log.display());
        }
        drop(proxy);
        let errs: u64 = saturation.errors + fixed_rate.iter().map(|(_, r)| r.errors).sum::<u64>();
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
