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
