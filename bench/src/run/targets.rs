//! Ratios of mesh-proxy to the others, and the targets it is held to.

use std::collections::BTreeMap;

use serde::Serialize;

use super::contenders::Contender;
use super::stats::Summary;
use super::webhook_bench::WebhookSummary;
use crate::configs::Scenario;

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub value: String,
    pub met: Option<bool>,
}

fn get(cases: &[Summary], cores: usize, s: Scenario, c: Contender) -> Option<&Summary> {
    cases
        .iter()
        .find(|x| x.cores == cores && x.scenario == s && x.contender == c)
}

fn med(cases: &[Summary], cores: usize, s: Scenario, c: Contender, k: &str) -> Option<f64> {
    get(cases, cores, s, c)?.metrics.get(k).map(|st| st.median)
}

/// The scenario whose direct connection is `s`'s reference (measured beside it).
fn reference(s: Scenario) -> Scenario {
    if s.is_hop() {
        Scenario::Hop
    } else {
        Scenario::Plain
    }
}

/// Latency a hop adds over the direct connection at one rate (medians), ms.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    pub rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// What one mesh hop costs, for one pair (one core: both proxies on core 1).
#[derive(Debug, Clone, Serialize)]
pub struct HopRow {
    pub scenario: Scenario,
    pub contender: Contender,
    /// Added latency over direct at each fixed rate.
    pub added: Vec<Added>,
    /// Both proxies' CPU per 1,000 requests, ms (saturation; highest fixed rate).
    pub cpu_ms_per_1k_saturation: Option<f64>,
    pub cpu_ms_per_1k_fixed: Option<f64>,
    /// New A↔B connections per second (B closes after each response), and both proxies' CPU
    /// per 1,000 of them.
    pub new_conns_per_s: Option<f64>,
    pub cpu_ms_per_1k_new_conns: Option<f64>,
    /// A↔B connections counted per request of that phase (~1: each had its own).
    pub upstream_conns_per_request: Option<f64>,
}

pub(super) fn hop_rows(cases: &[Summary], rates: &[f64]) -> Vec<HopRow> {
    let mut rows = Vec::new();
    for s in Scenario::HOPS {
        for c in [Contender::MeshProxy, Contender::Envoy] {
            if get(cases, 1, s, c).is_none() {
                continue;
            }
            let m = |k: &str| med(cases, 1, s, c, k);
            let added = rates
                .iter()
                .map(|&r| {
                    let k = r as u64;
                    let over = |q: &str| {
                        let key = format!("{q}_ms@{k}");
                        Some(m(&key)? - med(cases, 1, reference(s), Contender::Direct, &key)?)
                    };
                    Added {
                        rate: r,
                        p50_ms: over("p50"),
                        p99_ms: over("p99"),
                    }
                })
                .collect();
            rows.push(HopRow {
                scenario: s,
                contender: c,
                added,
                cpu_ms_per_1k_saturation: m("cpu_ms_per_1k_saturation"),
                cpu_ms_per_1k_fixed: m("cpu_ms_per_1k_fixed"),
                new_conns_per_s: m("new_conns_per_s"),
                cpu_ms_per_1k_new_conns: m("cpu_ms_per_1k_new_conns"),
                upstream_conns_per_request: m("upstream_conns_per_request"),
            });
        }
    }
    rows
}

pub(super) fn ratios_and_targets(
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
        for s in Scenario::ALL.into_iter().chain(Scenario::HOPS) {
            for (other, on) in [(Envoy, "envoy"), (Haproxy, "haproxy"), (Direct, "direct")] {
                let os = match other {
                    Direct => reference(s),
                    _ => s,
                };
                let hop_keys = ["new_conns_per_s", "cpu_ms_per_1k_new_conns"];
                let extra: &[&str] = if s.is_hop() { &hop_keys } else { &[] };
                for &k in keys.iter().chain(extra) {
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
    // The mesh hop with mutual TLS, against the same hop through two Envoys.
    let hop = Scenario::HopMtls;
    let hop_direct = med(cases, 1, Scenario::Hop, Direct, &p99);
    let hop_added = |c| Some(med(cases, 1, hop, c, &p99)? - hop_direct?);
    let half = |a: f64, b: f64| a <= 0.5 * b;
    t.push(cmp(
        &format!(
            "{}: added p99 at {top}/s mesh-proxy pair ≤ ½ Envoy pair's",
            hop.name()
        ),
        hop_added(MeshProxy).zip(hop_added(Envoy)),
        half,
        &|a, b| format!("{a:.3} vs {b:.3} ms (×{:.2})", a / b),
    ));
    for (k, what) in [
        ("cpu_ms_per_1k_saturation", "saturation"),
        ("cpu_ms_per_1k_fixed", &format!("{top}/s")),
    ] {
        t.push(cmp(
            &format!(
                "{}: CPU per request ({what}) mesh-proxy pair ≤ ½ Envoy pair's",
                hop.name()
            ),
            med(cases, 1, hop, MeshProxy, k).zip(med(cases, 1, hop, Envoy, k)),
            half,
            &|a, b| format!("{a:.1} vs {b:.1} ms/1k (×{:.2})", a / b),
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
