//! `meshctl proxy-status`: every proxy connected to the control plane, its identity and the
//! expiry of its workload certificate, the config version it was sent and the one it ACKed
//! (or NACKed, with the error). Reads the control plane's
//! admin endpoint `GET /debug/proxies` (127.0.0.1:15014 in the meshd pod: reach it with
//! `kubectl -n mesh-system port-forward deploy/meshd 15014`, or run next to it).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Args, Debug)]
pub struct ProxyStatusArgs {
    /// Base URL of the control plane's admin endpoint.
    #[arg(
        long,
        env = "MESHCTL_CONTROL_PLANE_ADMIN",
        default_value = "http://127.0.0.1:15014"
    )]
    pub control_plane_admin: String,
    /// `table` or `json` (the endpoint's JSON as it is).
    #[arg(long, short = 'o', default_value = "table")]
    pub output: String,
}

pub fn run(args: ProxyStatusArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt.block_on(fetch(&args.control_plane_admin))?;
    if args.output == "json" {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let report: serde_json::Value =
        serde_json::from_str(&body).context("parsing /debug/proxies")?;
    print!("{}", table(&report));
    Ok(ExitCode::SUCCESS)
}

/// The body of `GET <base>/debug/proxies`.
pub async fn fetch(base: &str) -> Result<String> {
    let url = format!("{}/debug/proxies", base.trim_end_matches('/'));
    let uri: http::Uri = url.parse().with_context(|| format!("{url:?}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
        .await
        .with_context(|| format!("{url}: timed out"))?
        .with_context(|| format!("{url}: is the control plane's admin endpoint reachable?"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{url}: {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `in 23h59m`, `in 4m10s`, or `expired`.
fn in_time(secs: u64, expired: bool) -> String {
    if expired {
        return "expired".into();
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("in {h}h{m:02}m")
    } else {
        format!("in {m}m{s:02}s")
    }
}

/// The table `proxy-status` prints.
pub fn table(report: &serde_json::Value) -> String {
    let now = meshctl::controlplane::hub::now_ms();
    let mut rows = vec![[
        "PROXY".to_string(),
        "IDENTITY".into(),
        "SPIFFE ID".into(),
        "CERT EXPIRES".into(),
        "PEER".into(),
        "CONNECTED".into(),
        "SENT".into(),
        "ACKED".into(),
        "STATE".into(),
        "ERROR".into(),
    ]];
    for p in report["proxies"].as_array().into_iter().flatten() {
        let node = &p["node"];
        let name = match node["kind"].as_str() {
            Some("gateway") => format!(
                "gateway {}/{}{}",
                node["namespace"].as_str().unwrap_or(""),
                node["name"].as_str().unwrap_or(""),
                node["pod"]
                    .as_str()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            ),
            _ => format!(
                "sidecar {}/{}",
                node["namespace"].as_str().unwrap_or(""),
                node["pod"].as_str().unwrap_or("")
            ),
        };
        let age = p["connectedSinceMs"]
            .as_u64()
            .map(|t| format!("{}s ago", now.saturating_sub(t) / 1000))
            .unwrap_or_default();
        let sent = p["lastSentVersion"].as_str().unwrap_or("-").to_string();
        let acked = p["lastAckVersion"].as_str().unwrap_or("-").to_string();
        let nack = &p["lastNack"];
        let state = match (
            p["lastSentVersion"].as_str(),
            p["lastAckVersion"].as_str(),
            nack["version"].as_str(),
        ) {
            (None, _, _) => "WAITING",
            (Some(s), _, Some(n)) if s == n => "NACKED",
            (Some(s), Some(a), _) if s == a => "SYNCED",
            _ => "STALE",
        };
        let error = nack["error"]
            .as_str()
            .map(|e| {
                format!(
                    "v{}: {}",
                    nack["version"].as_str().unwrap_or("?"),
                    e.replace('\n', " ")
                )
            })
            .unwrap_or_default();
        // The service account its token proved, and the workload certificate it serves with.
        let cert = &p["certificate"];
        let spiffe = cert["identity"].as_str().unwrap_or("-").to_string();
        let expires = cert["expiresAtMs"]
            .as_u64()
            .map(|t| in_time(t.saturating_sub(now) / 1000, t <= now))
            .unwrap_or_else(|| "-".into());
        rows.push([
            name,
            p["identity"].as_str().unwrap_or("-").to_string(),
            spiffe,
            expires,
            p["peer"].as_str().unwrap_or("").to_string(),
            age,
            sent,
            acked,
            state.to_string(),
            error,
        ]);
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
