use std::time::Duration;

use super::*;

#[test]
fn encodes_every_metric_with_its_labels() {
    let m = Metrics::new();
    let r = m.route("gw/http", "demo/myapp/0/0", "demo/myapp-v1:80");
    r.record(200, Duration::from_millis(3));
    r.record(200, Duration::from_millis(7));
    r.record(503, Duration::from_millis(1));
    r.rate_limited("seed");
    m.record_request("gw/http", "", "", 404, Duration::from_micros(100));
    m.rate_limited("gw/http", "demo/other/0/0", "seed");
    m.upstream_error("demo/myapp-v1:80", UpstreamErrorKind::Connect);
    m.upstream_error("demo/empty:80", UpstreamErrorKind::NoEndpoints);
    m.config_reload(ReloadResult::Success);
    m.config_reload(ReloadResult::Failure);
    let conn = m.connection_opened("gw/http");
    m.access_log_dropped();

    let text = m.encode();
    for line in [
        "# TYPE mesh_requests counter",
        r#"mesh_requests_total{listener="gw/http",route="demo/myapp/0/0",backend="demo/myapp-v1:80",code="200"} 2"#,
        r#"mesh_requests_total{listener="gw/http",route="demo/myapp/0/0",backend="demo/myapp-v1:80",code="503"} 1"#,
        r#"mesh_requests_total{listener="gw/http",route="",backend="",code="404"} 1"#,
        "# TYPE mesh_request_duration_seconds histogram",
        "# UNIT mesh_request_duration_seconds seconds",
        r#"mesh_request_duration_seconds_count{listener="gw/http",route="demo/myapp/0/0",backend="demo/myapp-v1:80"} 3"#,
        r#"mesh_request_duration_seconds_bucket{le="0.005",listener="gw/http",route="demo/myapp/0/0",backend="demo/myapp-v1:80"} 2"#,
        r#"mesh_rate_limited_total{listener="gw/http",route="demo/myapp/0/0",limit="seed"} 1"#,
        r#"mesh_rate_limited_total{listener="gw/http",route="demo/other/0/0",limit="seed"} 1"#,
        r#"mesh_upstream_errors_total{backend="demo/myapp-v1:80",kind="connect"} 1"#,
        r#"mesh_upstream_errors_total{backend="demo/empty:80",kind="no_endpoints"} 1"#,
        r#"mesh_config_reloads_total{result="success"} 1"#,
        r#"mesh_config_reloads_total{result="failure"} 1"#,
        r#"mesh_connections_active{listener="gw/http"} 1"#,
        "mesh_access_log_dropped_total 1",
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert_eq!(
        m.requests_count("gw/http", "demo/myapp/0/0", "demo/myapp-v1:80", 200),
        2
    );
    assert_eq!(m.rate_limited_count("gw/http", "demo/other/0/0", "seed"), 1);
    drop(conn);
    assert!(
        m.encode()
            .lines()
            .any(|l| l == r#"mesh_connections_active{listener="gw/http"} 0"#)
    );
}

#[test]
fn connection_gauge_counts_open_guards() {
    let m = Metrics::new();
    let g = m.connections_gauge("l");
    let a = g.opened();
    let b = g.opened();
    let c = m.connection_opened("l");
    assert_eq!(g.get(), 3);
    drop((a, b));
    assert_eq!(g.get(), 1);
    drop(c);
    assert_eq!(g.get(), 0);
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::new();
    m.record_request("l", "we\"ird\\route", "b", 200, Duration::ZERO);
    let text = m.encode();
    assert!(text.contains(r#"route="we\"ird\\route""#), "{text}");
}

#[test]
fn handles_from_many_threads() {
    let m = std::sync::Arc::new(Metrics::new());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                let r = m.route("l", "r", "b");
                for _ in 0..1000 {
                    r.record(200, Duration::from_millis(1));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(m.requests_count("l", "r", "b", 200), 4000);
}

#[test]
fn the_request_path_counts_by_label_values_not_by_label_instances() {
    let m = Metrics::new();
    let listener: Arc<str> = Arc::from("gw/http");
    // Sidecar passthrough routes build their names per request: equal text, new `Arc`s.
    for _ in 0..3 {
        let route: Arc<str> = Arc::from("passthrough");
        m.record_request_arc(&listener, Some(&route), None, 200, Duration::from_millis(1));
    }
    let route: Arc<str> = Arc::from("passthrough");
    m.record_request_arc(&listener, Some(&route), None, 503, Duration::from_millis(1));
    m.record_request_arc(&listener, None, None, 404, Duration::from_millis(1));
    assert_eq!(m.requests_count("gw/http", "passthrough", "", 200), 3);
    assert_eq!(m.requests_count("gw/http", "passthrough", "", 503), 1);
    assert_eq!(m.requests_count("gw/http", "", "", 404), 1);
    let cached: usize = m
        .request_handles
        .iter()
        .map(|s| s.lock().unwrap().len)
        .sum();
    assert_eq!(cached, 3, "one cached entry per label set");
    let text = m.encode();
    assert!(
        text.contains(
            r#"mesh_request_duration_seconds_count{listener="gw/http",route="passthrough",backend=""} 4"#
        ),
        "{text}"
    );
}
