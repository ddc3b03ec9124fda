//! The mesh hop scenario end to end, as `bench/run.sh` runs it but short: the real
//! `mesh-bench run` drives a real mesh-proxy pair (A originates mutual TLS with the mesh CA's
//! workload certificates, B terminates it, STRICT) over loopback, and its JSON says what a
//! reader of the results would rely on: the hop answered every request, and in the
//! new-connection phase every request had an A↔B connection (so a handshake) of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The `mesh-proxy` binary of this build profile, built (or found up to date) first so that
/// the hop measured is the proxy of this tree.
fn mesh_proxy_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let mut build = Command::new(env!("CARGO"));
    build.args(["build", "-p", "mesh-proxy-cli", "--bin", "mesh-proxy"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let st = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(st.success(), "building mesh-proxy");
    let bin = dir.join("mesh-proxy");
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

fn run_hops(out: &Path, scenarios: &str) -> Value {
    let _ = std::fs::remove_dir_all(out);
    let res = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
        .args(["run", "--scenarios", scenarios, "--reps", "1"])
        .args(["--phase", "0.5", "--warmup", "0.2", "--rates", "200"])
        .args(["--conns", "4", "--open-conns", "2", "--no-webhook"])
        .arg("--mesh-proxy")
        .arg(mesh_proxy_bin())
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success(),
        "mesh-bench run failed:\n{stderr}\n{stdout}"
    );
    // The table a reader sees names the hop and its summary.
    assert!(stdout.contains("### Mesh hop"), "{stdout}");
    serde_json::from_slice(&std::fs::read(out.join("latest.json")).unwrap()).unwrap()
}

fn case<'a>(report: &'a Value, scenario: &str, contender: &str) -> &'a Value {
    report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["scenario"] == scenario && c["contender"] == contender)
        .unwrap_or_else(|| panic!("no {scenario} {contender} case in {report:#}"))
}

#[test]
fn mesh_proxy_mtls_hop_answers_and_makes_a_handshake_per_request_when_b_closes() {
    let out = std::env::temp_dir().join(format!("mesh-bench-hop-test-{}", std::process::id()));
    let report = run_hops(&out, "hop,hop-mtls");

    for scenario in ["hop", "hop-mtls"] {
        let x = &case(&report, scenario, "mesh-proxy")["samples"][0];
        // Keep-alive phases: every request answered 2xx through both proxies.
        assert!(x["saturation"]["requests"].as_u64().unwrap() > 0, "{x:#}");
        assert_eq!(x["saturation"]["errors"], 0, "{scenario}: {x:#}");
        let fixed = &x["fixed_rate"][0][1];
        assert!(fixed["requests"].as_u64().unwrap() > 0, "{x:#}");
        assert_eq!(fixed["errors"], 0, "{scenario}: {x:#}");
        // Both proxies' CPU is read.
        assert!(x["cpu_ms_per_1k_saturation"].as_f64().unwrap() > 0.0);

        // New-connection phase: B closed after each response, so A opened one connection
        // per request (counted in the kernel, not told by the proxies).
        let n = &x["new_conns"];
        let total = n["result"]["total_requests"].as_u64().unwrap();
        assert!(total >= 20, "{scenario}: too few requests to judge: {n:#}");
        assert_eq!(n["result"]["errors"], 0, "{scenario}: {n:#}");
        let Some(per) = n["upstream_conns_per_request"].as_f64() else {
            // Counting needs a packet socket (CAP_NET_RAW); as root it must be there.
            // SAFETY: geteuid has no preconditions.
            assert_ne!(unsafe { libc::geteuid() }, 0, "no count as root: {n:#}");
            continue;
        };
        assert!(
            (0.9..=1.1).contains(&per),
            "{scenario}: {per} A↔B connections per request: {n:#}"
        );
    }
    // The direct reference of the hop group, and the summary rows.
    assert!(case(&report, "hop", "direct")["samples"][0]["new_conns"].is_null());
    let rows = report["hop"].as_array().unwrap();
    let mtls = rows
        .iter()
        .find(|r| r["scenario"] == "hop-mtls" && r["contender"] == "mesh-proxy")
        .unwrap();
    assert!(mtls["added"][0]["p99_ms"].is_number(), "{mtls:#}");
    assert!(mtls["new_conns_per_s"].as_f64().unwrap() > 0.0, "{mtls:#}");
    let _ = std::fs::remove_dir_all(&out);
}
