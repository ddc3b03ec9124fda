//! The whole benchmark: start the backend, then for each repetition and scenario start each
//! contender in turn (interleaved: A B C D A B C D ...), measure, stop it; the mesh hop
//! scenarios start two proxies per contender (`crate::hop`); then the two-core run and the
//! webhook; then medians, spreads, ratios, targets, JSON.

mod contenders;
mod host;
mod process;
mod report;
mod stats;
mod syn_count;
mod targets;
mod webhook_bench;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::configs::Scenario;

use contenders::{Bench, Contender, ONE_CORE, Sample, TWO_CORES};
use host::{loadavg, machine, now_utc};
use process::{NICE, free_port};
use report::{Report, render};
use stats::{Summary, summarize};
use targets::{hop_rows, ratios_and_targets};
use webhook_bench::run_webhook;

#[derive(Debug, Clone)]
pub struct Opts {
    pub reps: usize,
    pub phase: Duration,
    pub warmup: Duration,
    pub conns: usize,
    pub open_conns: usize,
    pub rates: Vec<f64>,
    /// Which scenarios to measure (the two-core run is `plain`'s).
    pub scenarios: Vec<Scenario>,
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

pub fn run(opts: Opts) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    NICE.store(opts.nice, std::sync::atomic::Ordering::Relaxed);
    std::fs::create_dir_all(&opts.out)?;
    let tmp = opts.out.join("run");
    std::fs::create_dir_all(&tmp)?;
    let certs = crate::hop::write_certs(&tmp.join("hop-certs"))?;
    let bench = Bench {
        exe,
        tmp,
        backends: [free_port()?, free_port()?],
        opts: opts.clone(),
        certs,
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
            for &s in &opts.scenarios {
                for &c in &contenders {
                    // Direct is the reference of each group (one proxy, a hop); HAProxy is
                    // measured as a single proxy only.
                    let skip = match c {
                        Contender::Direct => s != Scenario::Plain && s != Scenario::Hop,
                        Contender::Haproxy => s.is_hop(),
                        Contender::MeshProxy | Contender::Envoy => false,
                    };
                    if skip {
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
                    if let Some(n) = &x.new_conns {
                        eprintln!(
                            "    new A↔B connections: {:.0}/s, {} opened for {} requests",
                            n.result.rps,
                            n.upstream_conns
                                .map_or("(not counted)".into(), |n| n.to_string()),
                            n.result.total_requests,
                        );
                    }
                    raw.entry((1, s, c)).or_default().push(x);
                }
            }
        }
        drop(backend);
        if opts.two_core && opts.scenarios.contains(&Scenario::Plain) {
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
    let hop = hop_rows(&cases, &opts.rates);
    let mut options = BTreeMap::new();
    options.insert("reps".into(), opts.reps.to_string());
    options.insert("phase_s".into(), opts.phase.as_secs_f64().to_string());
    options.insert("warmup_s".into(), opts.warmup.as_secs_f64().to_string());
    options.insert("closed_loop_conns".into(), opts.conns.to_string());
    options.insert("open_loop_conns".into(), opts.open_conns.to_string());
    options.insert("nice".into(), opts.nice.to_string());
    options.insert(
        "scenarios".into(),
        opts.scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(","),
    );
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
        hop,
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
