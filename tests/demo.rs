//! `meshctl demo` prints what a user of the walkthrough saw, from the real binary and from the
//! library.

use std::process::Command;

use meshctl::demo::{DemoOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_reproduces_the_walkthrough_results() {
    let mut out = Vec::new();
    let report = run(&DemoOptions::default(), &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    eprintln!("{text}");

    // Step 6: 100 requests, v2's share within 4 standard deviations of 20 (sd 4): a correct
    // split fails 1 run in ~15,000, a 50/50 split (v2 ≈ 50) practically always. The exact
    // split is checked on 1000 requests in mesh-proxy's walkthrough test.
    let v1 = report.canary.get("myapp v1").copied().unwrap_or(0);
    let v2 = report.canary.get("myapp v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 100, "{:?}", report.canary);
    assert!((4..=36).contains(&v2), "v2 got {v2} of 100");
    assert!(text.contains(&format!("v1: {v1}, v2: {v2}")));

    // Step 7: one pod behind /other: exactly 10 x 200, 90 x 429.
    assert_eq!(
        report.burst_other.get(&200),
        Some(&10),
        "{:?}",
        report.burst_other
    );
    assert_eq!(
        report.burst_other.get(&429),
        Some(&90),
        "{:?}",
        report.burst_other
    );
    // Two pods behind /: v1 (chosen ~80 times) lets exactly 10 through, v2 (chosen ~20 times)
    // up to 10: the walkthrough's 20 unless v2 was chosen fewer than 10 times.
    let ok = report.burst_root.get(&200).copied().unwrap_or(0);
    let limited = report.burst_root.get(&429).copied().unwrap_or(0);
    assert_eq!(ok + limited, 100, "{:?}", report.burst_root);
    assert!((11..=20).contains(&ok), "{:?}", report.burst_root);

    // The 429 as the walkthrough showed it.
    let header = |name: &str| {
        report
            .limited_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("x-rate-limited"), Some("TOO_MANY_REQUESTS"));
    assert_eq!(header("content-length"), Some("18"));
    assert_eq!(header("content-type"), Some("text/plain"));
    assert_eq!(header("x-canary"), Some("v2-20pct"));
    assert_eq!(header("x-mesh"), Some("istio"));
    assert_eq!(report.limited_body, "local_rate_limited");
}

#[test]
fn demo_binary_prints_the_walkthrough() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("demo")
        .output()
        .expect("run meshctl demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "6. check_canary.py: 100 sequential GETs of /",
        "seq 1 100 | xargs -P100 curl /other  10 200 / 90 429",
        "x-rate-limited: TOO_MANY_REQUESTS",
        "local_rate_limited",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // The warnings about the compatibility input are shown, not dropped.
    assert!(stdout.contains("SIDECAR_INBOUND"), "{stdout}");
}
