//! Medians and spreads over the repetitions of one case.

use std::collections::BTreeMap;

use serde::Serialize;

use super::contenders::{Contender, Sample};
use crate::configs::Scenario;

/// Median, min and max.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub(super) fn stat(mut v: Vec<f64>) -> Option<Stat> {
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

pub(super) fn summarize(cores: usize, s: Scenario, c: Contender, samples: Vec<Sample>) -> Summary {
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
        if let Some(n) = &x.new_conns {
            put("new_conns_per_s".into(), Some(n.result.rps));
            put("cpu_ms_per_1k_new_conns".into(), n.cpu_ms_per_1k);
            put(
                "upstream_conns_per_request".into(),
                n.upstream_conns_per_request,
            );
        }
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
