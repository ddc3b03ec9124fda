//! The cheap regression check: instructions mesh-proxy executes per request of a fixed mix,
//! counted by callgrind (deterministic, unlike wall-clock time on a shared machine), compared
//! with a checked-in baseline.
//!
//! mesh-proxy (release, one worker: a current-thread runtime) runs under callgrind twice,
//! serving `small` and then `large` requests of the walkthrough's route (scenario
//! `seed+ratelimit`: weights, both header modifiers, the rate-limit check) over one keep-alive
//! connection; the difference of the two totals divided by `large - small` is the cost of one request with start-up and shutdown
//! cancelled out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::configs::{self, Scenario};
use crate::http1;

#[derive(Debug, Serialize, Deserialize)]
pub struct Baseline {
    /// Instructions per request of the walkthrough's route (+ rate limit) through mesh-proxy.
    pub instructions_per_request: f64,
    /// Allowed growth before the check fails (0.15 = +15%).
    pub tolerance: f64,
    #[serde(default)]
    pub note: String,
}

pub struct Opts {
    pub mesh_proxy: PathBuf,
    pub baseline: PathBuf,
    pub update: bool,
    pub small: u64,
    pub large: u64,
    pub out: PathBuf,
    /// Only print instructions per request of every scenario (no baseline check).
    pub scenarios: bool,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `n` sequential GETs over one keep-alive connection.
fn send(addr: SocketAddr, n: u64) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let req = http1::get_request("bench", "/");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    for i in 0..n {
        s.write_all(&req)?;
        buf.clear();
        let p = loop {
            if let Some(p) = http1::parse(&buf)? {
                break p;
            }
            let k = s.read(&mut chunk)?;
            if k == 0 {
                bail!("connection closed after {i} requests");
            }
            buf.extend_from_slice(&chunk[..k]);
        };
        if p.status != 200 {
            bail!("request {i}: status {}", p.status);
        }
    }
    Ok(())
}

fn wait_200(addr: SocketAddr, child: &mut std::process::Child) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if child.try_wait()?.is_some() {
            bail!("mesh-proxy under valgrind exited early");
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            // The first request through counts in both runs alike.
            return send(addr, 1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("mesh-proxy not listening after 60 s under valgrind")
}

/// Total instructions (Ir) of one mesh-proxy run serving `n` requests.
fn count(opts: &Opts, scenario: Scenario, backends: [u16; 2], n: u64) -> anyhow::Result<u64> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = opts.out.join("regression-config.json");
    std::fs::write(
        &cfg,
        serde_json::to_vec_pretty(&configs::mesh(scenario, port, backends))?,
    )?;
    let outfile = opts.out.join(format!("callgrind.out.{n}"));
    let mut child = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--quiet",
            &format!("--callgrind-out-file={}", outfile.display()),
        ])
        .arg(&opts.mesh_proxy)
        .args(["run", "--config"])
        .arg(&cfg)
        .args([
            "--admin-address",
            "off",
            "--readiness-address",
            "off",
            "--metrics-address",
            "off",
            "--drain-timeout",
            "0s",
            "--workers",
            "1",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting valgrind (apt-get install valgrind)")?;
    let r = wait_200(addr, &mut child).and_then(|()| send(addr, n));
    // SIGTERM: mesh-proxy drains and exits, callgrind writes its totals.
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = child.wait()?;
    r?;
    if !status.success() {
        bail!("mesh-proxy under callgrind exited with {status}");
    }
    let text = std::fs::read_to_string(&outfile)?;
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no totals in the callgrind output")?;
    Ok(total)
}

pub fn run(opts: Opts) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&opts.out)?;
    let exe = std::env::current_exe()?;
    let backends = [free_port()?, free_port()?];
    let mut backend = Command::new(exe)
        .arg("backend")
        .args(["--port", &backends[0].to_string()])
        .args(["--port", &backends[1].to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| {
        for p in backends {
            let a = SocketAddr::from(([127, 0, 0, 1], p));
            let t0 = Instant::now();
            while std::net::TcpStream::connect(a).is_err() {
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("backend not up");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if opts.scenarios {
            let mut plain = 0.0;
            for s in Scenario::ALL {
                let a = count(&opts, s, backends, opts.small)?;
                let b = count(&opts, s, backends, opts.large)?;
                let per = (b as f64 - a as f64) / (opts.large - opts.small) as f64;
                if s == Scenario::Plain {
                    plain = per;
                }
                println!(
                    "{:>15}: {per:.0} instructions per request ({:+.1}% vs plain)",
                    s.name(),
                    (per / plain - 1.0) * 100.0
                );
            }
            return Ok((0, 0));
        }
        let a = count(&opts, Scenario::SeedRl, backends, opts.small)?;
        let b = count(&opts, Scenario::SeedRl, backends, opts.large)?;
        Ok((a, b))
    })();
    let _ = backend.kill();
    let _ = backend.wait();
    let (a, b) = result?;
    if opts.scenarios {
        return Ok(true);
    }
    let per = (b as f64 - a as f64) / (opts.large - opts.small) as f64;
    println!(
        "mesh-proxy: {per:.0} instructions per request (scenario seed+ratelimit; callgrind, {} vs {} requests: {a} / {b} Ir)",
        opts.small, opts.large
    );
    if opts.update {
        let base = Baseline {
            instructions_per_request: per.round(),
            tolerance: 0.15,
            note: "bench/regression.sh --update; callgrind Ir per request of the walkthrough's route (scenario seed+ratelimit)".into(),
        };
        write_baseline(&opts.baseline, &base)?;
        println!("baseline updated: {}", opts.baseline.display());
        return Ok(true);
    }
    let base: Baseline = serde_json::from_slice(
        &std::fs::read(&opts.baseline)
            .with_context(|| format!("reading {}", opts.baseline.display()))?,
    )?;
    let limit = base.instructions_per_request * (1.0 + base.tolerance);
    let change = (per / base.instructions_per_request - 1.0) * 100.0;
    if per > limit {
        println!(
            "REGRESSION: {per:.0} > {limit:.0} (baseline {:.0} +{:.0}%): {change:+.1}%",
            base.instructions_per_request,
            base.tolerance * 100.0
        );
        return Ok(false);
    }
    println!(
        "ok: {change:+.1}% against the baseline {:.0} (limit +{:.0}%){}",
        base.instructions_per_request,
        base.tolerance * 100.0,
        if change < -15.0 {
            "; faster than the baseline: consider bench/regression.sh --update"
        } else {
            ""
        }
    );
    Ok(true)
}

fn write_baseline(path: &Path, b: &Baseline) -> anyhow::Result<()> {
    let mut s = serde_json::to_string_pretty(b)?;
    s.push('\n');
    std::fs::write(path, s)?;
    Ok(())
}
