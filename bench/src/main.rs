//! `mesh-bench`: mesh-proxy beside Envoy, HAProxy and a direct connection, on loopback; and
//! the injection webhook. `bench/run.sh` installs the contenders and runs `mesh-bench run`.

mod backend;
mod configs;
mod hop;
mod http1;
mod load;
mod regression;
mod run;
mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mesh-bench", about = "meshctl's benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole benchmark: table on stdout, JSON under --out.
    Run(RunArgs),
    /// The HTTP/1.1 backend (one app per port).
    Backend {
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Load generator: closed loop (no --rate) or open loop at --rate; JSON on stdout.
    Load {
        #[arg(long)]
        addr: SocketAddr,
        /// Requests per second (open loop, CO-corrected); omit for closed-loop saturation.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 32)]
        conns: usize,
        /// Threads of the closed loop.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Instructions per request through mesh-proxy (callgrind) against a checked-in baseline;
    /// exits 1 on a regression.
    Regression {
        #[arg(long, default_value = "target/release/mesh-proxy")]
        mesh_proxy: PathBuf,
        #[arg(long, default_value = "bench/baseline.json")]
        baseline: PathBuf,
        /// Write the measured value as the new baseline.
        #[arg(long)]
        update: bool,
        #[arg(long, default_value_t = 100)]
        small: u64,
        #[arg(long, default_value_t = 1100)]
        large: u64,
        #[arg(long, default_value = "target/bench/regression")]
        out: PathBuf,
        /// Print instructions per request of each scenario (plain, seed, seed+ratelimit)
        /// instead of checking the baseline.
        #[arg(long)]
        scenarios: bool,
    },
    /// AdmissionReviews over HTTPS, closed loop; JSON on stdout.
    WebhookLoad {
        #[arg(long)]
        addr: SocketAddr,
        /// PEM of the serving certificate (trusted as the CA).
        #[arg(long)]
        ca: PathBuf,
        /// The AdmissionReview JSON to send.
        #[arg(long)]
        body: PathBuf,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Short phases and one repetition, for development.
    #[arg(long)]
    quick: bool,
    /// Interleaved repetitions (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds measured per phase (default 3; 1 with --quick).
    #[arg(long)]
    phase: Option<f64>,
    /// Warm-up seconds before each phase (default 1; 0.3 with --quick).
    #[arg(long)]
    warmup: Option<f64>,
    /// Connections of the closed-loop (saturation) phase.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Connections of the open-loop (fixed-rate) phases.
    #[arg(long, default_value_t = 16)]
    open_conns: usize,
    /// Fixed rates (req/s), comma-separated.
    #[arg(long, default_value = "1000,5000", value_delimiter = ',')]
    rates: Vec<f64>,
    /// Scenarios to measure, comma-separated: plain, seed, seed+ratelimit (one proxy), hop,
    /// hop-mtls (a mesh hop: two proxies) [default: all].
    #[arg(long, value_delimiter = ',', value_parser = parse_scenario)]
    scenarios: Vec<configs::Scenario>,
    #[arg(long, default_value = "target/release/mesh-proxy")]
    mesh_proxy: PathBuf,
    #[arg(long, default_value = "target/release/meshctl")]
    meshctl: PathBuf,
    /// The Envoy binary (omit to leave Envoy out).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// The HAProxy binary (omit to leave HAProxy out).
    #[arg(long)]
    haproxy: Option<PathBuf>,
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Skip the two-core run.
    #[arg(long)]
    no_two_core: bool,
    /// Skip the webhook.
    #[arg(long)]
    no_webhook: bool,
    /// Only the webhook.
    #[arg(long)]
    webhook_only: bool,
    /// Niceness of every process the benchmark starts (e.g. -10 on a shared machine, as root).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    nice: i32,
}

fn parse_scenario(s: &str) -> Result<configs::Scenario, String> {
    configs::Scenario::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = configs::Scenario::ALL
            .into_iter()
            .chain(configs::Scenario::HOPS)
            .map(|s| s.name())
            .collect();
        format!("unknown scenario {s:?}; one of {}", names.join(", "))
    })
}

fn print_json(r: &load::LoadResult) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    mesh_tls::install_default();
    match Cli::parse().command {
        Cmd::Run(a) => {
            let q = a.quick;
            run::run(run::Opts {
                reps: a.reps.unwrap_or(if q { 1 } else { 3 }),
                phase: Duration::from_secs_f64(a.phase.unwrap_or(if q { 1.0 } else { 3.0 })),
                warmup: Duration::from_secs_f64(a.warmup.unwrap_or(if q { 0.3 } else { 1.0 })),
                conns: a.conns,
                open_conns: a.open_conns,
                rates: a.rates,
                scenarios: if a.scenarios.is_empty() {
                    configs::Scenario::ALL
                        .into_iter()
                        .chain(configs::Scenario::HOPS)
                        .collect()
                } else {
                    a.scenarios
                },
                mesh_proxy: a.mesh_proxy,
                meshctl: a.meshctl,
                envoy: a.envoy,
                haproxy: a.haproxy,
                out: a.out,
                two_core: !a.no_two_core,
                webhook: !a.no_webhook,
                proxies: !a.webhook_only,
                nice: a.nice,
            })
        }
        Cmd::Regression {
            mesh_proxy,
            baseline,
            update,
            small,
            large,
            out,
            scenarios,
        } => {
            let ok = regression::run(regression::Opts {
                mesh_proxy,
                baseline,
                update,
                small,
                large,
                out,
                scenarios,
            })?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Backend { ports, threads } => backend::run(&ports, threads),
        Cmd::Load {
            addr,
            rate,
            conns,
            threads,
            warmup,
            duration,
            path,
        } => {
            let t = load::Target {
                addr,
                request: Arc::new(http1::get_request("bench", &path)),
                tls: None,
            };
            let (w, d) = (
                Duration::from_secs_f64(warmup),
                Duration::from_secs_f64(duration),
            );
            let r = match rate {
                Some(rate) => load::open(&t, rate, conns, w, d)?,
                None => load::closed(&t, conns, threads, w, d)?,
            };
            print_json(&r)
        }
        Cmd::WebhookLoad {
            addr,
            ca,
            body,
            conns,
            warmup,
            duration,
        } => {
            let cfg = webhook::client_config(&std::fs::read(&ca)?)?;
            let body = std::fs::read(&body)?;
            let t = load::Target {
                addr,
                request: Arc::new(http1::post_request(
                    &format!("localhost:{}", addr.port()),
                    "/inject",
                    &body,
                )),
                tls: Some((cfg, "localhost".into())),
            };
            let r = load::closed(
                &t,
                conns,
                1,
                Duration::from_secs_f64(warmup),
                Duration::from_secs_f64(duration),
            )?;
            print_json(&r)
        }
    }
}
