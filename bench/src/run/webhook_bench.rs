//! The webhook part: meshctl's control plane serving admission reviews on one core.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;

use anyhow::bail;
use serde::Serialize;

use super::contenders::Bench;
use super::host::{clk_tck, cpu_ticks, loadavg};
use super::process::{Proc, free_port, pinned, wait_port};
use super::stats::{Stat, stat};
use crate::load::LoadResult;
use crate::webhook;

#[derive(Debug, Clone, Serialize)]
pub struct WebhookSample {
    pub rep: usize,
    pub pod: String,
    pub conns: usize,
    pub loadavg: [f64; 3],
    pub result: LoadResult,
    pub cpu_us_per_review: Option<f64>,
}

/// The medians and spreads of the webhook's repetitions for one pod and connection count.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookSummary {
    pub pod: String,
    pub conns: usize,
    pub metrics: BTreeMap<String, Stat>,
    pub samples: Vec<WebhookSample>,
}

pub(super) fn run_webhook(bench: &Bench) -> anyhow::Result<Vec<WebhookSummary>> {
    let dir = &bench.tmp;
    let (cert, key, ca) = (
        dir.join("webhook.crt"),
        dir.join("webhook.key"),
        dir.join("webhook-ca.crt"),
    );
    webhook::write_cert(&cert, &key, &ca)?;
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
        ("seed-deployment", webhook::walkthrough_pod()?),
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
                    ca.display().to_string(),
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
