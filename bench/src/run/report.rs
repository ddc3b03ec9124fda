//! The report: what is written as JSON, and its markdown tables.

use std::collections::BTreeMap;

use serde::Serialize;

use super::host::Machine;
use super::stats::{Stat, Summary};
use super::targets::{HopRow, Target};
use super::webhook_bench::WebhookSummary;
use crate::configs::Scenario;

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
    /// The mesh hop scenarios: added latency over direct, CPU, new connections per second.
    pub hop: Vec<HopRow>,
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.prec$}"))
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

pub(super) fn render(rep: &Report, rates: &[f64]) -> String {
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
        for s in Scenario::ALL.into_iter().chain(Scenario::HOPS) {
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
                if s.is_hop() {
                    "1 core (hop: proxies A and B, 1 worker each, both on core 1; load + backend on core 0; CPU and RSS are A + B)"
                } else if cores == 1 {
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
    if !rep.hop.is_empty() {
        o.push_str(
            "\n### Mesh hop (client → A → B → backend; mutual TLS between A and B in hop-mtls): added latency over direct, CPU of A + B, new A↔B connections\n\n",
        );
        let mut head = "| scenario | pair |".to_string();
        let mut sep = "|---|---|".to_string();
        for r in rates {
            head.push_str(&format!(" added p50 / p99 @{}/s |", *r as u64));
            sep.push_str("---|");
        }
        head.push_str(" CPU ms/1k (sat) | CPU ms/1k (fixed) | new A↔B conns/s | CPU ms/1k new conns | A↔B conns per request |\n");
        sep.push_str("---|---|---|---|---|\n");
        o.push_str(&head);
        o.push_str(&sep);
        for h in &rep.hop {
            let mut line = format!("| {} | {} |", h.scenario.name(), h.contender.name());
            for a in &h.added {
                line.push_str(&format!(" {} / {} |", opt(a.p50_ms, 3), opt(a.p99_ms, 3)));
            }
            line.push_str(&format!(
                " {} | {} | {} | {} | {} |\n",
                opt(h.cpu_ms_per_1k_saturation, 1),
                opt(h.cpu_ms_per_1k_fixed, 1),
                opt(h.new_conns_per_s, 0),
                opt(h.cpu_ms_per_1k_new_conns, 1),
                opt(h.upstream_conns_per_request, 2),
            ));
            o.push_str(&line);
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
        o.push_str("\n### Ratios mesh-proxy ÷ other (medians; direct = no proxy, measured beside plain and beside hop)\n\n| cores, scenario, metric | ÷ Envoy | ÷ HAProxy | ÷ direct |\n|---|---|---|---|\n");
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
