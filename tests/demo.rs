//! `meshctl demo` prints what a user of the walkthrough saw, from the real binary and from the
//! library.

use std::process::Command;

use meshctl::demo::{DemoApp, DemoOptions, PlaintextAnswer, WHOAMI_PATH, run};

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

    // Steps 8–10: otherapp calls myapp through their sidecars over mutual TLS.
    let s = &report.security;
    let otherapp = "spiffe://cluster.local/ns/demo/sa/otherapp";
    let myapp = "spiffe://cluster.local/ns/demo/sa/myapp";
    assert_eq!(
        (s.client_id.as_str(), s.server_id.as_str()),
        (otherapp, myapp)
    );
    assert_eq!(s.through_sidecar_status, 200, "{s:?}");
    // The server app learnt who called from its sidecar: without mutual TLS there is no
    // X-Forwarded-Client-Cert at all.
    let xfcc = s
        .xfcc
        .as_deref()
        .expect("myapp received an X-Forwarded-Client-Cert");
    assert_eq!(s.client_id_seen.as_deref(), Some(otherapp), "{xfcc}");
    assert_eq!(s.server_id_seen.as_deref(), Some(myapp), "{xfcc}");
    assert!(s.xfcc_hash_is_client_certificate, "{xfcc}");
    assert!(
        text.contains(&format!("X-Forwarded-Client-Cert: {xfcc}")),
        "{text}"
    );
    // The client's side: the identity its sidecar requires, proven by the server's sidecar.
    assert_eq!(s.server_id_required, myapp);
    assert_eq!(s.server_id_presented, myapp);
    assert_eq!(s.tls_version, "TLSv1.3");
    assert_eq!(s.key_exchange_group, "X25519MLKEM768");
    // STRICT: plaintext straight to the server's sidecar gets nothing, however it introduces
    // itself.
    assert_eq!(s.plaintext_direct, PlaintextAnswer::Refused);
    assert!(
        text.contains("refused: connection closed, no response (through otherapp's sidecar: 200)"),
        "{text}"
    );
}

/// What the demo app reports on /whoami is the header it received, nothing made up: so the
/// security part's XFCC is the sidecar's, and a missing one shows as missing.
#[tokio::test]
async fn the_demo_app_reports_the_client_certificate_header_it_received() {
    let app = DemoApp::new("otherapp", "/other").start().await.unwrap();
    assert_eq!(
        raw_get(app.addr, WHOAMI_PATH, None).await,
        (200, String::new())
    );
    let value = "By=spiffe://cluster.local/ns/demo/sa/a;Hash=00;Subject=\"\";URI=spiffe://cluster.local/ns/demo/sa/b";
    assert_eq!(
        raw_get(app.addr, WHOAMI_PATH, Some(value)).await,
        (200, format!("{value}\n"))
    );
    // Its walkthrough behaviour is unchanged.
    assert_eq!(raw_get(app.addr, "/", None).await.0, 404);
    assert_eq!(
        raw_get(app.addr, "/other", None).await,
        (200, "otherapp\n".to_string())
    );
}

/// One HTTP/1.1 GET over a plain socket: status and body.
async fn raw_get(addr: std::net::SocketAddr, path: &str, xfcc: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let header = xfcc
        .map(|v| format!("x-forwarded-client-cert: {v}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: app\r\n{header}connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_string(&mut raw),
    )
    .await
    .expect("an answer within 5s")
    .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
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
        "URI=  the caller:        spiffe://cluster.local/ns/demo/sa/otherapp",
        "the sidecars negotiated TLSv1.3, key exchange X25519MLKEM768",
        "refused: connection closed, no response",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // The warnings about the compatibility input are shown, not dropped.
    assert!(stdout.contains("SIDECAR_INBOUND"), "{stdout}");
}
