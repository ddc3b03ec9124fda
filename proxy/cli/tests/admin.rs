//! The admin, readiness and metrics servers over real sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_proxy::admin::{self, AdminAddresses, AdminState};
use mesh_proxy::config::ProxyConfig;
use mesh_proxy::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn loopback() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

#[tokio::test]
async fn admin_readiness_and_metrics_servers() {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(AdminState::new(metrics.clone()));
    let shutdown = CancellationToken::new();
    let servers = admin::start(
        &AdminAddresses {
            admin: loopback(),
            readiness: loopback(),
            metrics: loopback(),
        },
        state.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (a, r, m) = (
        servers.admin.unwrap(),
        servers.readiness.unwrap(),
        servers.metrics.unwrap(),
    );

    // Not ready before a config and bound listeners.
    let rep = request(a, "GET", "/ready").await;
    assert_eq!(
        (rep.status, rep.body.as_str()),
        (503, "not ready: no config\n")
    );
    assert_eq!(request(r, "GET", "/ready").await.status, 503);
    let dump: serde_json::Value =
        serde_json::from_str(&request(a, "GET", "/config_dump").await.body).unwrap();
    assert_eq!(dump["config"], serde_json::Value::Null);

    let config: ProxyConfig = serde_json::from_value(serde_json::json!({
        "version": "v42",
        "rateLimits": [{"name": "seed", "maxTokens": 10, "tokensPerFill": 5, "fillInterval": "60s"}],
        "accessLog": {"path": "/dev/stdout"},
    }))
    .unwrap();
    state.set_config(Arc::new(config.clone()));
    let rep = request(r, "GET", "/ready").await;
    assert_eq!(
        (rep.status, rep.body.as_str()),
        (503, "not ready: listeners not bound\n")
    );
    let listeners = BTreeMap::from([(
        "demo/istio-gwapi/http".to_string(),
        "127.0.0.1:8080".parse().unwrap(),
    )]);
    state.set_listeners(listeners);
    for addr in [a, r] {
        let rep = request(addr, "GET", "/ready").await;
        assert_eq!((rep.status, rep.body.as_str()), (200, "ready\n"));
    }
    assert_eq!(request(r, "GET", "/healthz/ready").await.status, 200);
    assert_eq!(request(a, "HEAD", "/ready").await.status, 200);

    // /config_dump: the config, its version and load time.
    let rep = request(a, "GET", "/config_dump").await;
    assert_eq!(rep.status, 200);
    assert_eq!(rep.header("content-type"), Some("application/json"));
    let dump: serde_json::Value = serde_json::from_str(&rep.body).unwrap();
    assert_eq!(dump["version"], "v42");
    assert!(dump["loadedAt"].as_str().unwrap().ends_with('Z'));
    let back: ProxyConfig = serde_json::from_value(dump["config"].clone()).unwrap();
    assert_eq!(back, config);

    // /listeners
    let rep = request(a, "GET", "/listeners").await;
    let l: serde_json::Value = serde_json::from_str(&rep.body).unwrap();
    assert_eq!(
        l,
        serde_json::json!({"demo/istio-gwapi/http": "127.0.0.1:8080"})
    );

    // /stats/prometheus on the admin and metrics servers.
    metrics.record_request("gw", "r", "b", 200, Duration::from_millis(2));
    metrics.rate_limited("gw", "r", "seed");
    for addr in [a, m] {
        let rep = request(addr, "GET", "/stats/prometheus").await;
        assert_eq!(rep.status, 200);
        assert!(
            rep.header("content-type")
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        assert!(
            rep.body.contains(
                r#"mesh_requests_total{listener="gw",route="r",backend="b",code="200"} 1"#
            )
        );
        assert!(
            rep.body
                .contains(r#"mesh_rate_limited_total{listener="gw",route="r",limit="seed"} 1"#)
        );
        assert!(rep.body.ends_with("# EOF\n"));
    }

    // Each public server exposes only its own endpoint.
    assert_eq!(request(r, "GET", "/stats/prometheus").await.status, 404);
    assert_eq!(request(r, "GET", "/config_dump").await.status, 404);
    assert_eq!(request(m, "GET", "/ready").await.status, 404);
    assert_eq!(request(m, "GET", "/config_dump").await.status, 404);
    assert_eq!(request(m, "GET", "/listeners").await.status, 404);

    let rep = request(a, "GET", "/healthz").await;
    assert_eq!((rep.status, rep.body.as_str()), (200, "ok\n"));
    assert_eq!(request(a, "GET", "/nope").await.status, 404);
    let rep = request(a, "POST", "/ready").await;
    assert_eq!(rep.status, 405);
    assert_eq!(rep.header("allow"), Some("GET, HEAD"));

    // Draining: not ready any more.
    state.set_draining(true);
    let rep = request(r, "GET", "/ready").await;
    assert_eq!(
        (rep.status, rep.body.as_str()),
        (503, "not ready: draining\n")
    );

    // Shutdown stops every server.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), servers.join())
        .await
        .expect("servers stop");
    for addr in [a, r, m] {
        assert!(TcpStream::connect(addr).await.is_err());
    }
}

#[tokio::test]
async fn servers_are_optional_and_bind_errors_name_the_server() {
    let state = Arc::new(AdminState::new(Arc::new(Metrics::new())));
    let shutdown = CancellationToken::new();
    let only_metrics = admin::start(
        &AdminAddresses {
            admin: None,
            readiness: None,
            metrics: loopback(),
        },
        state.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert!(only_metrics.admin.is_none() && only_metrics.readiness.is_none());
    let taken = only_metrics.metrics.unwrap();
    let err = admin::start(
        &AdminAddresses {
            admin: loopback(),
            readiness: Some(taken),
            metrics: None,
        },
        state,
        shutdown.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("readiness server: cannot bind {taken}")),
        "{err}"
    );
    shutdown.cancel();
    only_metrics.join().await;
}

#[test]
fn flags_parse_addresses_and_off() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        admin: admin::AdminArgs,
    }
    let cli = Cli::parse_from(["x"]);
    assert_eq!(AdminAddresses::from(&cli.admin), AdminAddresses::default());
    assert_eq!(
        AdminAddresses::default().admin,
        Some("127.0.0.1:15000".parse().unwrap())
    );
    let cli = Cli::parse_from([
        "x",
        "--admin-address",
        "127.0.0.1:9000",
        "--readiness-address",
        "off",
        "--metrics-address",
        "0.0.0.0:9090",
    ]);
    let a = AdminAddresses::from(&cli.admin);
    assert_eq!(a.admin, Some("127.0.0.1:9000".parse().unwrap()));
    assert_eq!(a.readiness, None);
    assert_eq!(a.metrics, Some("0.0.0.0:9090".parse().unwrap()));
    assert!(Cli::try_parse_from(["x", "--admin-address", "nonsense"]).is_err());
}
