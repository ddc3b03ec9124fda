//! The whole benchmark: start the backend, then for each repetition and scenario start each
//! contender in turn (interleaved: A B C D A B C D ...), measure, stop it; then the two-core
//! run and the webhook; then medians, spreads, ratios, targets, JSON.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::configs::{self, Scenario};
use crate::load::LoadResult;
use crate::webhook;

#[derive(Debug, Clone)]
pub struct Opts {
    pub reps: usize,
    pub phase: Duration,
    pub warmup: Duration,
    pub conns: usize,
    pub open_conns: usize,
    pub rates: Vec<f64>,
    pub mesh_proxy: PathBuf,
    pub meshctl: PathBuf,
    pub envoy: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    pub out: PathBuf,
    pub two_core: bool,
    pub webhook: bool,
    pub proxies: bool,
    pub nice: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    Direct,
    MeshProxy,
    Envoy,
    Haproxy,
}

impl Contender {
    fn name(self) -> &'static str {
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

#[derive(Debug, Clone, Serialize)]
pub struct WebhookSample {
    pub rep: usize,
    pub pod: String,
    pub conns: usize,
    pub loadavg: [f64; 3],
    pub result: LoadResult,
    pub cpu_us_per_review: Option<f64>,
}

/// Niceness of everything the benchmark starts (`--nice`; negative needs root).
static NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// `nice -n N taskset -c CPUS ...`: pinned, at the benchmark's priority.
fn pinned(cpus: &str) -> Command {
    let mut c = Command::new("nice");
    c.arg("-n")
        .arg(NICE.load(std::sync::atomic::Ordering::Relaxed).to_string())
        .arg("taskset")
        .arg("-c")
        .arg(cpus);
    c
}

fn loadavg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A process we started; killed (by its pid) when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn spawn(name: &str, cpus: &str, argv: &[String], log: &Path) -> anyhow::Result<Proc> {
        let logf = std::fs::File::create(log)?;
        let child = pinned(cpus)
            .args(argv)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {name}: {argv:?}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET; the status, if any.
fn probe(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(&crate::http1::get_request("bench", "/")).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some(p)) = crate::http1::parse(&buf) {
            return Some(p.status);
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn wait_ready(p: &mut Proc, addr: SocketAddr, log: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if !p.alive() {
            bail!(
                "{} exited; its log ({}):\n{}",
                p.name,
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if probe(addr) == Some(200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{} not answering 200 on {addr} after 30 s", p.name)
}

fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {addr} after 30 s")
}

/// How one measurement is laid out on the cores.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Proxy cores and workers.
    proxy_cpus: &'static str,
    workers: usize,
    /// Load generator and backend cores and threads.
    load_cpus: &'static str,
    load_threads: usize,
}

const ONE_CORE: Layout = Layout {
    proxy_cpus: "1",
    workers: 1,
    load_cpus: "0",
    load_threads: 1,
};
const TWO_CORES: Layout = Layout {
    proxy_cpus: "0,1",
    workers: 2,
    load_cpus: "0,1",
    load_threads: 2,
};

struct Bench {
    opts: Opts,
    exe: PathBuf,
    tmp: PathBuf,
    backends: [u16; 2],
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

    fn measure(
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

    fn start_backend(&self, layout: Layout) -> anyhow::Result<Proc> {
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

/// Median, min and max.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// The medians and spreads of one case.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub cores: usize,
    pub scenario: Scenario,
    pub contender: Contender,
    pub metrics: BTreeMap<String, Stat>,
    pub samples: Vec<Sample>,
}

fn summarize(cores: usize, s: Scenario, c: Contender, samples: Vec<Sample>) -> Summary {
    let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut put = |k: String, v: Option<f64>| {
        if let Some(v) = v {
            m.entry(k).or_default().push(v);
        }
    };
    for x in &samples {
        put("saturation_rps".into(), Some(x.saturation.rps));
        put(
            "saturation_p99_ms".into(),
            Some(x.saturation.p99_us / 1000.0),
        );
        for (rate, r) in &x.fixed_rate {
            let k = format!("{}", *rate as u64);
            put(format!("p50_ms@{k}"), Some(r.p50_us / 1000.0));
            put(format!("p90_ms@{k}"), Some(r.p90_us / 1000.0));
            put(format!("p99_ms@{k}"), Some(r.p99_us / 1000.0));
            put(format!("p999_ms@{k}"), Some(r.p999_us / 1000.0));
            put(format!("achieved_rps@{k}"), Some(r.rps));
        }
        put(
            "cpu_ms_per_1k_saturation".into(),
            x.cpu_ms_per_1k_saturation,
        );
        put("cpu_ms_per_1k_fixed".into(), x.cpu_ms_per_1k_fixed);
        put(
            "rss_idle_mb".into(),
            x.rss_idle_kb.map(|k| k as f64 / 1024.0),
        );
        put(
            "rss_load_mb".into(),
            x.rss_load_kb.map(|k| k as f64 / 1024.0),
        );
        put("hwm_mb".into(), x.hwm_kb.map(|k| k as f64 / 1024.0));
    }
    Summary {
        cores,
        scenario: s,
        contender: c,
        metrics: m
            .into_iter()
            .filter_map(|(k, v)| Some((k, stat(v)?)))
            .collect(),
        samples,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WebhookSummary {
    pub pod: String,
    pub conns: usize,
    pub metrics: BTreeMap<String, Stat>,
    pub samples: Vec<WebhookSample>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub options: BTreeMap<String, String>,
    pub loadavg_start: [f64; 3],
    pub loadavg_end: [f64; 3],
    pub cases: Vec<Summary>,
    pub webhook: Vec<WebhookSummary>,
    /// `{cores}core {scenario} {metric}` → `÷envoy` / `÷haproxy` / `÷direct` → mesh-proxy's
    /// median divided by the other's.
    pub ratios: BTreeMap<String, BTreeMap<String, f64>>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub value: String,
    pub met: Option<bool>,
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        kernel,
    }
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    NICE.store(opts.nice, std::sync::atomic::Ordering::Relaxed);
    std::fs::create_dir_all(&opts.out)?;
    let tmp = opts.out.join("run");
    std::fs::create_dir_all(&tmp)?;
    let bench = Bench {
        exe,
        tmp,
        backends: [free_port()?, free_port()?],
        opts: opts.clone(),
    };
    let la_start = loadavg();
    let date = now_utc();
    eprintln!(
        "mesh-bench: {} reps, {:.1}s phases (+{:.1}s warm-up), {} conns closed loop, {} open loop; load average {:?}",
        opts.reps,
        opts.phase.as_secs_f64(),
        opts.warmup.as_secs_f64(),
        opts.conns,
        opts.open_conns,
        la_start
    );
    let mut contenders = vec![Contender::Direct, Contender::MeshProxy];
    if opts.envoy.is_some() {
        contenders.push(Contender::Envoy);
    }
    if opts.haproxy.is_some() {
        contenders.push(Contender::Haproxy);
    }

    let mut raw: BTreeMap<(usize, Scenario, Contender), Vec<Sample>> = BTreeMap::new();
    if opts.proxies {
        // One core each: proxy on core 1, load generator and backend on core 0.
        let backend = bench.start_backend(ONE_CORE)?;
        for rep in 0..opts.reps {
            for s in Scenario::ALL {
                for &c in &contenders {
                    if c == Contender::Direct && s != Scenario::Plain {
                        continue;
                    }
                    eprintln!("[1 core] rep {} {} {} ...", rep + 1, s.name(), c.name());
                    let x = bench.measure(rep, c, s, ONE_CORE, &opts.rates)?;
                    eprintln!(
                        "    {:.0} req/s, p99@{} {:.3} ms, load {:?}",
                        x.saturation.rps,
                        x.fixed_rate.last().map_or(0.0, |(r, _)| *r),
                        x.fixed_rate.last().map_or(0.0, |(_, r)| r.p99_us / 1000.0),
                        x.loadavg
                    );
                    raw.entry((1, s, c)).or_default().push(x);
                }
            }
        }
        drop(backend);
        if opts.two_core {
            let backend = bench.start_backend(TWO_CORES)?;
            let top = opts.rates.last().copied().into_iter().collect::<Vec<_>>();
            for rep in 0..opts.reps {
                for &c in &contenders {
                    eprintln!("[2 cores] rep {} plain {} ...", rep + 1, c.name());
                    let x = bench.measure(rep, c, Scenario::Plain, TWO_CORES, &top)?;
                    eprintln!("    {:.0} req/s", x.saturation.rps);
                    raw.entry((2, Scenario::Plain, c)).or_default().push(x);
                }
            }
            drop(backend);
        }
    }
    let cases: Vec<Summary> = raw
        .into_iter()
        .map(|((cores, s, c), v)| summarize(cores, s, c, v))
        .collect();

    let webhook = if opts.webhook {
        run_webhook(&bench)?
    } else {
        Vec::new()
    };

    let la_end = loadavg();
    let (ratios, targets) = ratios_and_targets(&cases, &webhook, &opts.rates);
    let mut options = BTreeMap::new();
    options.insert("reps".into(), opts.reps.to_string());
    options.insert("phase_s".into(), opts.phase.as_secs_f64().to_string());
    options.insert("warmup_s".into(), opts.warmup.as_secs_f64().to_string());
    options.insert("closed_loop_conns".into(), opts.conns.to_string());
    options.insert("open_loop_conns".into(), opts.open_conns.to_string());
    options.insert("nice".into(), opts.nice.to_string());
    let report = Report {
        date,
        machine: machine(),
        options,
        loadavg_start: la_start,
        loadavg_end: la_end,
        cases,
        webhook,
        ratios,
        targets,
    };
    let text = render(&report, &opts.rates);
    println!("{text}");
    let json = serde_json::to_vec_pretty(&report)?;
    let stamp = report.date.replace(':', "");
    std::fs::write(opts.out.join(format!("results-{stamp}.json")), &json)?;
    std::fs::write(opts.out.join("latest.json"), &json)?;
    std::fs::write(opts.out.join("latest.md"), &text)?;
    eprintln!(
        "wrote {} and latest.json / latest.md",
        opts.out.join(format!("results-{stamp}.json")).display()
    );
    Ok(())
}

fn run_webhook(bench: &Bench) -> anyhow::Result<Vec<WebhookSummary>> {
    let dir = &bench.tmp;
    let (cert, key) = (dir.join("webhook.crt"), dir.join("webhook.key"));
    webhook::write_cert(&cert, &key)?;
    let inj = dir.join("injection.yaml");
    // No cluster here: inject pods of unlabelled namespaces (as a labelled namespace would).
    std::fs::write(&inj, "defaultPolicy: enabled\n")?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let argv = vec![
        bench.opts.meshctl.display().to_string(),
        "control-plane".into(),
        "--webhook-addr".into(),
        addr.to_string(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--injection-config".into(),
        inj.display().to_string(),
        "--no-cluster".into(),
    ];
    let log = dir.join("webhook.log");
    let mut p = Proc::spawn("meshctl control-plane", "1", &argv, &log)?;
    wait_port(addr)?;
    if !p.alive() {
        bail!(
            "the webhook exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let pods = [
        ("seed-deployment", webhook::seed_pod()?),
        ("50-containers", webhook::pod_with(50)),
    ];
    let mut bodies = Vec::new();
    for (name, pod) in &pods {
        let f = dir.join(format!("review-{name}.json"));
        std::fs::write(
            &f,
            serde_json::to_vec(&webhook::review_for(pod, "demo", "bench"))?,
        )?;
        bodies.push((name.to_string(), f));
    }
    let tck = clk_tck();
    let mut raw: BTreeMap<(String, usize), Vec<WebhookSample>> = BTreeMap::new();
    for rep in 0..bench.opts.reps {
        for (name, body) in &bodies {
            // 1 connection: latency of one review at a time; 4: throughput on the one core.
            for conns in [1usize, 4] {
                eprintln!("[webhook] rep {} {name} {conns} conn ...", rep + 1);
                let la = loadavg();
                let before = cpu_ticks(p.pid());
                let argv = vec![
                    bench.exe.display().to_string(),
                    "webhook-load".into(),
                    "--addr".into(),
                    addr.to_string(),
                    "--ca".into(),
                    cert.display().to_string(),
                    "--body".into(),
                    body.display().to_string(),
                    "--conns".into(),
                    conns.to_string(),
                    "--warmup".into(),
                    bench.opts.warmup.as_secs_f64().to_string(),
                    "--duration".into(),
                    bench.opts.phase.as_secs_f64().to_string(),
                ];
                let out = pinned("0").args(&argv).stderr(Stdio::inherit()).output()?;
                if !out.status.success() {
                    bail!("webhook load failed: {}", out.status);
                }
                let result: LoadResult = serde_json::from_slice(&out.stdout)?;
                let after = cpu_ticks(p.pid());
                let cpu_us_per_review = match (before, after) {
                    (Some(b), Some(a)) if result.total_requests > 0 => {
                        Some((a - b) as f64 / tck * 1e6 / result.total_requests as f64)
                    }
                    _ => None,
                };
                eprintln!(
                    "    {:.0} reviews/s, p99 {:.3} ms",
                    result.rps,
                    result.p99_us / 1000.0
                );
                raw.entry((name.clone(), conns))
                    .or_default()
                    .push(WebhookSample {
                        rep,
                        pod: name.clone(),
                        conns,
                        loadavg: la,
                        result,
                        cpu_us_per_review,
                    });
            }
        }
    }
    if !p.alive() {
        bail!("the webhook died; see {}", log.display());
    }
    drop(p);
    Ok(raw
        .into_iter()
        .map(|((pod, conns), samples)| {
            let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for s in &samples {
                let r = &s.result;
                for (k, v) in [
                    ("reviews_per_s", r.rps),
                    ("p50_ms", r.p50_us / 1000.0),
                    ("p90_ms", r.p90_us / 1000.0),
                    ("p99_ms", r.p99_us / 1000.0),
                    ("p999_ms", r.p999_us / 1000.0),
                    ("errors", r.errors as f64),
                ] {
                    m.entry(k.into()).or_default().push(v);
                }
                if let Some(c) = s.cpu_us_per_review {
                    m.entry("cpu_us_per_review".into()).or_default().push(c);
                }
            }
            WebhookSummary {
                pod,
                conns,
                metrics: m
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, stat(v)?)))
                    .collect(),
                samples,
            }
        })
        .collect())
}

fn get(cases: &[Summary], cores: usize, s: Scenario, c: Contender) -> Option<&Summary> {
    cases
        .iter()
        .find(|x| x.cores == cores && x.scenario == s && x.contender == c)
}

fn med(cases: &[Summary], cores: usize, s: Scenario, c: Contender, k: &str) -> Option<f64> {
    get(cases, cores, s, c)?.metrics.get(k).map(|st| st.median)
}

fn ratios_and_targets(
    cases: &[Summary],
    webhook: &[WebhookSummary],
    rates: &[f64],
) -> (BTreeMap<String, BTreeMap<String, f64>>, Vec<Target>) {
    use Contender::*;
    let mut r = BTreeMap::new();
    let top = rates.last().map_or(5000, |r| *r as u64);
    let p99 = format!("p99_ms@{top}");
    let keys = [
        "saturation_rps",
        p99.as_str(),
        "cpu_ms_per_1k_saturation",
        "rss_load_mb",
    ];
    for cores in [1, 2] {
        for s in Scenario::ALL {
            for (other, on) in [(Envoy, "envoy"), (Haproxy, "haproxy"), (Direct, "direct")] {
                let os = if other == Direct { Scenario::Plain } else { s };
                for k in keys {
                    if let (Some(a), Some(b)) = (
                        med(cases, cores, s, MeshProxy, k),
                        med(cases, cores, os, other, k),
                    ) && b != 0.0
                    {
                        r.entry(format!("{cores} core {} {k}", s.name()))
                            .or_insert_with(BTreeMap::new)
                            .insert(format!("÷{on}"), a / b);
                    }
                }
            }
        }
    }
    let mut t = Vec::new();
    let cmp = |name: &str,
               v: Option<(f64, f64)>,
               ok: fn(f64, f64) -> bool,
               fmt: &dyn Fn(f64, f64) -> String| Target {
        target: name.to_string(),
        value: v.map_or("n/a".into(), |(a, b)| fmt(a, b)),
        met: v.map(|(a, b)| ok(a, b)),
    };
    for s in Scenario::ALL {
        let sat = med(cases, 1, s, MeshProxy, "saturation_rps").zip(med(
            cases,
            1,
            s,
            Haproxy,
            "saturation_rps",
        ));
        t.push(cmp(
            &format!("{}: 1-core saturation mesh-proxy ≥ HAProxy", s.name()),
            sat,
            |a, b| a >= b,
            &|a, b| format!("{a:.0} vs {b:.0} req/s (×{:.2})", a / b),
        ));
        let direct = med(cases, 1, Scenario::Plain, Direct, &p99);
        let added = |c| Some(med(cases, 1, s, c, &p99)? - direct?);
        t.push(cmp(
            &format!("{}: added p99 at {top}/s mesh-proxy ≤ HAProxy", s.name()),
            added(MeshProxy).zip(added(Haproxy)),
            |a, b| a <= b,
            &|a, b| format!("{:.3} vs {:.3} ms", a, b),
        ));
        t.push(cmp(
            &format!("{}: RSS under load mesh-proxy ≤ HAProxy", s.name()),
            med(cases, 1, s, MeshProxy, "rss_load_mb").zip(med(
                cases,
                1,
                s,
                Haproxy,
                "rss_load_mb",
            )),
            |a, b| a <= b,
            &|a, b| format!("{a:.1} vs {b:.1} MB"),
        ));
        t.push(cmp(
            &format!("{}: idle RSS mesh-proxy ≤ 10 MB", s.name()),
            med(cases, 1, s, MeshProxy, "rss_idle_mb").map(|a| (a, 10.0)),
            |a, b| a <= b,
            &|a, _| format!("{a:.1} MB"),
        ));
    }
    let plain = med(cases, 1, Scenario::Plain, MeshProxy, "saturation_rps");
    for s in [Scenario::Seed, Scenario::SeedRl] {
        let v = med(cases, 1, s, MeshProxy, "saturation_rps");
        t.push(cmp(
            &format!(
                "{} costs ≤ 10% throughput over plain (mesh-proxy)",
                s.name()
            ),
            v.zip(plain),
            |a, b| a >= 0.9 * b,
            &|a, b| format!("{:+.1}% ({a:.0} vs {b:.0} req/s)", (a / b - 1.0) * 100.0),
        ));
    }
    let plain_cpu = med(
        cases,
        1,
        Scenario::Plain,
        MeshProxy,
        "cpu_ms_per_1k_saturation",
    );
    for s in [Scenario::Seed, Scenario::SeedRl] {
        let v = med(cases, 1, s, MeshProxy, "cpu_ms_per_1k_saturation");
        t.push(cmp(
            &format!(
                "{} costs ≤ 10% CPU per request over plain (mesh-proxy, saturation)",
                s.name()
            ),
            v.zip(plain_cpu),
            |a, b| a <= 1.1 * b,
            &|a, b| format!("{:+.1}% ({a:.1} vs {b:.1} ms/1k)", (a / b - 1.0) * 100.0),
        ));
    }
    for w in webhook {
        let m = |k: &str| w.metrics.get(k).map(|s| s.median);
        if w.conns == 1 {
            t.push(cmp(
                &format!("webhook {}: p99 < 1 ms", w.pod),
                m("p99_ms").map(|a| (a, 1.0)),
                |a, b| a < b,
                &|a, _| format!("{a:.3} ms"),
            ));
        } else {
            t.push(cmp(
                &format!("webhook {}: ≥ 10,000 reviews/s on one core", w.pod),
                m("reviews_per_s").map(|a| (a, 10_000.0)),
                |a, b| a >= b,
                &|a, _| format!("{a:.0} reviews/s"),
            ));
        }
    }
    (r, t)
}

fn cell(s: Option<&Stat>, prec: usize, spread: bool) -> String {
    match s {
        None => "n/a".into(),
        Some(s) if spread && s.n > 1 => {
            format!("{:.p$} ({:.p$}–{:.p$})", s.median, s.min, s.max, p = prec)
        }
        Some(s) => format!("{:.p$}", s.median, p = prec),
    }
}

fn render(rep: &Report, rates: &[f64]) -> String {
    let mut o = String::new();
    let m = &rep.machine;
    o.push_str(&format!(
        "mesh-bench {} — {} × {} ({} cores), kernel {}; load average at start {:.2} {:.2} {:.2}, at end {:.2} {:.2} {:.2}\n",
        rep.date,
        m.nproc,
        m.cpu,
        m.nproc,
        m.kernel,
        rep.loadavg_start[0],
        rep.loadavg_start[1],
        rep.loadavg_start[2],
        rep.loadavg_end[0],
        rep.loadavg_end[1],
        rep.loadavg_end[2]
    ));
    o.push_str(&format!(
        "Medians of {} interleaved repetitions, (min–max) where shown. Latency in ms, from the intended send time (CO-corrected). CPU = proxy user+sys ms per 1,000 requests.\n",
        rep.options.get("reps").map_or("?", |s| s.as_str())
    ));
    for cores in [1, 2] {
        for s in Scenario::ALL {
            let rows: Vec<&Summary> = rep
                .cases
                .iter()
                .filter(|x| x.cores == cores && x.scenario == s)
                .collect();
            if rows.is_empty() {
                continue;
            }
            o.push_str(&format!(
                "\n### {} — {}\n\n",
                if cores == 1 {
                    "1 core (proxy: 1 worker on core 1; load + backend on core 0)"
                } else {
                    "2 cores (proxy: 2 workers; everything shares cores 0–1)"
                },
                s.name()
            ));
            let mut head = "| | saturation req/s |".to_string();
            let mut sep = "|---|---|".to_string();
            for r in rates.iter().filter(|r| {
                rows.iter()
                    .any(|x| x.metrics.contains_key(&format!("p99_ms@{}", **r as u64)))
            }) {
                head.push_str(&format!(
                    " p50 / p90 / p99 / p99.9 @{}/s | p99 @{}/s |",
                    *r as u64, *r as u64
                ));
                sep.push_str("---|---|");
            }
            head.push_str(" CPU ms/1k (sat) | CPU ms/1k (fixed) | RSS idle MB | RSS load MB |\n");
            sep.push_str("---|---|---|---|\n");
            o.push_str(&head);
            o.push_str(&sep);
            for x in rows {
                let g = |k: &str| x.metrics.get(k);
                let mut line = format!(
                    "| {} | {} |",
                    x.contender.name(),
                    cell(g("saturation_rps"), 0, true)
                );
                for r in rates {
                    let k = *r as u64;
                    if g(&format!("p99_ms@{k}")).is_none() {
                        continue;
                    }
                    line.push_str(&format!(
                        " {} / {} / {} / {} | {} |",
                        cell(g(&format!("p50_ms@{k}")), 3, false),
                        cell(g(&format!("p90_ms@{k}")), 3, false),
                        cell(g(&format!("p99_ms@{k}")), 3, false),
                        cell(g(&format!("p999_ms@{k}")), 3, false),
                        cell(g(&format!("p99_ms@{k}")), 3, true),
                    ));
                }
                line.push_str(&format!(
                    " {} | {} | {} | {} |\n",
                    cell(g("cpu_ms_per_1k_saturation"), 1, false),
                    cell(g("cpu_ms_per_1k_fixed"), 1, false),
                    cell(g("rss_idle_mb"), 1, false),
                    cell(g("rss_load_mb"), 1, true),
                ));
                o.push_str(&line);
            }
        }
    }
    if !rep.webhook.is_empty() {
        o.push_str(
            "\n### Webhook (meshctl control-plane, 1 core; client on core 0, HTTPS keep-alive)\n\n",
        );
        o.push_str("| pod | connections | reviews/s | p50 ms | p90 ms | p99 ms | p99.9 ms | CPU µs/review |\n|---|---|---|---|---|---|---|---|\n");
        for w in &rep.webhook {
            let g = |k: &str| w.metrics.get(k);
            o.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                w.pod,
                w.conns,
                cell(g("reviews_per_s"), 0, true),
                cell(g("p50_ms"), 3, false),
                cell(g("p90_ms"), 3, false),
                cell(g("p99_ms"), 3, true),
                cell(g("p999_ms"), 3, false),
                cell(g("cpu_us_per_review"), 0, false),
            ));
        }
    }
    if !rep.ratios.is_empty() {
        o.push_str("\n### Ratios mesh-proxy ÷ other (medians; direct = plain route, no proxy)\n\n| cores, scenario, metric | ÷ Envoy | ÷ HAProxy | ÷ direct |\n|---|---|---|---|\n");
        let f = |m: &BTreeMap<String, f64>, k: &str| {
            m.get(k).map_or("n/a".to_string(), |v| format!("{v:.2}"))
        };
        for (k, m) in &rep.ratios {
            if k.contains("rss") || k.contains("cpu") {
                // Direct has no proxy process.
                o.push_str(&format!(
                    "| {k} | {} | {} | — |\n",
                    f(m, "÷envoy"),
                    f(m, "÷haproxy")
                ));
            } else {
                o.push_str(&format!(
                    "| {k} | {} | {} | {} |\n",
                    f(m, "÷envoy"),
                    f(m, "÷haproxy"),
                    f(m, "÷direct")
                ));
            }
        }
    }
    if !rep.targets.is_empty() {
        o.push_str("\n### Targets\n\n| target | measured | met |\n|---|---|---|\n");
        for t in &rep.targets {
            o.push_str(&format!(
                "| {} | {} | {} |\n",
                t.target,
                t.value,
                match t.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "n/a",
                }
            ));
        }
    }
    o
}
