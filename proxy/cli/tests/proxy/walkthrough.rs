//! The walkthrough through the real binary: `mesh-proxy run --resources` with the
//! walkthrough's files as they are (plus EndpointSlices for local backends), in the
//! walkthrough's order:
//! routes first and the canary check, then the EnvoyFilter (picked up by the file watcher)
//! and the parallel rate-limit check.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_proxy::testing::{EchoServer, TestClient, get};

/// The walkthrough: ../shared/seed-walkthrough when present (the files as they are written
/// there), else the repository's verbatim copy.
fn walkthrough_dir() -> PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/seed-walkthrough");
    if shared.is_dir() {
        shared
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/seed-walkthrough")
    }
}

/// EndpointSlices for the walkthrough's Services, as the EndpointSlice controller would write them,
/// pointing at local backends.
fn endpoint_slices(backends: &[(&str, &EchoServer)]) -> String {
    backends
        .iter()
        .map(|(service, b)| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-local\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - name: http\n    port: {}\n    protocol: TCP\nendpoints:\n  - addresses: [\"127.0.0.1\"]\n    conditions:\n      ready: true\n",
                b.addr.port()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

struct ProxyProcess {
    child: Child,
    url: String,
    admin: String,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(resources: &Path) -> ProxyProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["run", "--resources"])
        .arg(resources)
        .args([
            "-n",
            "demo",
            "--bind-address",
            "127.0.0.1",
            "--listener-port",
            "80=0",
        ])
        .args(["--admin-address", "127.0.0.1:0"])
        .args(["--readiness-address", "off", "--metrics-address", "off"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-proxy");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut url = None;
    let mut admin = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("listening listener=demo/istio-gwapi/http address=") {
            url = Some(format!("http://{}", rest.trim()));
        }
        if let Some(rest) = line.strip_prefix("listening server=admin address=") {
            admin = Some(format!("http://{}", rest.trim()));
        }
        if url.is_some() && admin.is_some() {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    ProxyProcess {
        child,
        url: url.expect("mesh-proxy exited without serving the walkthrough's Gateway listener"),
        admin: admin.expect("mesh-proxy did not start its admin server"),
    }
}

async fn successful_reloads(admin: &str) -> u64 {
    let Ok(r) = get(&format!("{admin}/stats/prometheus")).await else {
        return 0;
    };
    r.text()
        .lines()
        .find(|l| l.starts_with("mesh_config_reloads_total") && l.contains("success"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn walkthrough_canary_then_rate_limit() {
    let v1 = EchoServer::start("myapp v1").await;
    let v2 = EchoServer::start("myapp v2").await;
    let other = EchoServer::start("otherapp").await;

    // The resources directory: the walkthrough's files except the EnvoyFilter, which the
    // walkthrough applies later (step 7).
    let dir = tempfile::tempdir().unwrap();
    let walkthrough = walkthrough_dir();
    for f in [
        "gateway.yaml",
        "httproute-myapp.yaml",
        "httproute-otherapp.yaml",
        "deployment.yaml",
        "istio-gwapi.yaml",
    ] {
        std::fs::copy(walkthrough.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("endpointslices.yaml"),
        endpoint_slices(&[("myapp-v1", &v1), ("myapp-v2", &v2), ("otherapp", &other)]),
    )
    .unwrap();
    let proxy = spawn(dir.path());
    let client = TestClient::http1();

    // Step 5: headers on the request the backend sees and on the response.
    let r = client.get(&format!("{}/", proxy.url), &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-canary"), Some("v2-20pct"));
    assert_eq!(r.header("x-mesh"), Some("istio"));
    let seen = r.echo();
    assert_eq!(seen.header("x-canary"), Some("v2-20pct"), "{seen:?}");
    assert_eq!(seen.header("x-mesh"), Some("istio"), "{seen:?}");
    let r = client
        .get(&format!("{}/other/x", proxy.url), &[])
        .await
        .unwrap();
    assert_eq!(r.echo().name, "otherapp");
    assert_eq!(r.header("x-mesh"), None, "other-route has no header filter");

    // Step 6: the canary split. 1000 requests; v2's share within 3 standard deviations of
    // 0.2 (a second sample only if the first misses, see routing::weights).
    let n = 1000u32;
    let sd = (f64::from(n) * 0.2 * 0.8).sqrt();
    for attempt in 1..=2 {
        let mut got_v2 = 0;
        for _ in 0..n {
            let r = client.get(&format!("{}/", proxy.url), &[]).await.unwrap();
            assert_eq!(r.status, 200);
            match r.echo().name.as_str() {
                "myapp v2" => got_v2 += 1,
                "myapp v1" => {}
                other => panic!("`/` answered by {other}"),
            }
        }
        eprintln!("walkthrough canary: v1 {} v2 {got_v2}", n - got_v2);
        if (f64::from(got_v2) - 200.0).abs() <= 3.0 * sd {
            break;
        }
        assert!(
            attempt < 2,
            "v2 got {got_v2} of {n} twice outside 200 ± {:.0}",
            3.0 * sd
        );
    }

    // Step 7: the EnvoyFilter arrives; the proxy reloads on the file change.
    let before = successful_reloads(&proxy.admin).await;
    assert!(before >= 1);
    std::fs::copy(
        walkthrough.join("istio-envoy-filter.yaml"),
        dir.path().join("istio-envoy-filter.yaml"),
    )
    .unwrap();
    let mut reloaded = false;
    for _ in 0..100 {
        if successful_reloads(&proxy.admin).await > before {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the EnvoyFilter file was not picked up");

    // 100 parallel requests, each on its own connection (xargs -P100 curl).
    async fn burst(url: String) -> Vec<mesh_proxy::testing::TestResponse> {
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { get(&url).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }
    let other_before = other.requests().len();
    let answers = burst(format!("{}/other", proxy.url)).await;
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        (ok, limited.len()),
        (10, 90),
        "one otherapp pod: 10 x 200, 90 x 429"
    );
    assert_eq!(other.requests().len() - other_before, 10);
    let r = limited[0];
    assert_eq!(r.header("x-rate-limited"), Some("TOO_MANY_REQUESTS"));
    assert_eq!(r.header("content-length"), Some("18"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.text(), "local_rate_limited");

    // `/` is served by two single-pod Services, each with its own bucket (the walkthrough's 20).
    let (v1_before, v2_before) = (v1.requests().len(), v2.requests().len());
    let answers = burst(format!("{}/", proxy.url)).await;
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = answers.iter().filter(|r| r.status == 429).collect();
    let (to_v1, to_v2) = (
        v1.requests().len() - v1_before,
        v2.requests().len() - v2_before,
    );
    eprintln!(
        "walkthrough rate limit on /: {ok} x 200, {} x 429 (v1 {to_v1}, v2 {to_v2})",
        limited.len()
    );
    assert_eq!(ok + limited.len(), 100);
    // v1 is chosen ~80 times, so its bucket empties: exactly 10 reach it. v2 is chosen ~20
    // times: 10 reach it unless it was chosen fewer than 10 times (p < 0.6%).
    assert_eq!(to_v1, 10);
    assert!(to_v2 <= 10);
    assert_eq!(ok, to_v1 + to_v2);
    let r = limited[0];
    assert_eq!(r.header("x-rate-limited"), Some("TOO_MANY_REQUESTS"));
    assert_eq!(
        r.header("x-canary"),
        Some("v2-20pct"),
        "the route's response headers"
    );
    assert_eq!(r.header("x-mesh"), Some("istio"));
    assert_eq!(r.header("content-length"), Some("18"));
}
