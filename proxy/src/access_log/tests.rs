use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use mesh_config::AccessLog;
use prometheus_client::metrics::counter::Counter;

use super::*;

fn request() -> http::request::Parts {
    let (parts, ()) = http::Request::builder()
        .method("POST")
        .uri("/other/x?token=s3cret")
        .header("host", "example.com")
        .header("user-agent", "curl/8.5.0")
        .header("x-request-id", "req-1")
        .header("authorization", "Bearer s3cret")
        .header("cookie", "session=s3cret")
        .body(())
        .unwrap()
        .into_parts();
    parts
}

fn entry(n: u64) -> AccessLogEntry {
    let mut e = AccessLogEntry::from_request(
        &request(),
        Arc::from("gw/http"),
        Some("127.0.0.1:5555".parse().unwrap()),
    );
    e.start_time = UNIX_EPOCH + Duration::from_millis(1_735_787_045_678);
    e.status = 429;
    e.bytes_received = n;
    e.bytes_sent = 18;
    e.duration = Duration::from_micros(1500);
    e.route = Some(Arc::from("demo/other/0/0"));
    e.rate_limited = true;
    e.response_flags = ResponseFlags::RATE_LIMITED;
    e
}

#[test]
fn rfc3339_formats_utc_with_millis() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        rfc3339(UNIX_EPOCH + Duration::from_millis(1_735_787_045_678)),
        "2025-01-02T03:04:05.678Z"
    );
    // A leap day.
    assert_eq!(
        rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
        "2000-02-29T00:00:00.000Z"
    );
}

#[test]
fn entry_serialises_every_field_and_no_secret() {
    let line = entry(7).to_json();
    assert!(!line.contains("s3cret"), "{line}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "start_time": "2025-01-02T03:04:05.678Z",
            "method": "POST",
            "path": "/other/x",
            "protocol": "HTTP/1.1",
            "status": 429,
            "bytes_received": 7,
            "bytes_sent": 18,
            "duration_ms": 1.5,
            "upstream_host": null,
            "listener": "gw/http",
            "route": "demo/other/0/0",
            "backend": null,
            "x_request_id": "req-1",
            "user_agent": "curl/8.5.0",
            "authority": "example.com",
            "downstream_remote_address": "127.0.0.1:5555",
            "rate_limited": true,
            "response_flags": "RL",
        })
    );
}

#[test]
fn response_flags_display() {
    assert_eq!(ResponseFlags::empty().to_string(), "-");
    let mut f = ResponseFlags::UPSTREAM_TIMEOUT;
    f.insert(ResponseFlags::UPSTREAM_CONNECT_FAILURE);
    assert_eq!(f.to_string(), "UF,UT");
    assert!(f.contains(ResponseFlags::UPSTREAM_TIMEOUT));
    assert!(!f.contains(ResponseFlags::RATE_LIMITED));
    assert_eq!(
        (ResponseFlags::NO_ROUTE | ResponseFlags::DIRECT_RESPONSE).to_string(),
        "NR,DI"
    );
}

#[test]
fn writes_json_lines_to_a_file_and_reconfigures() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.log");
    let b = dir.path().join("b.log");
    let logger = AccessLogger::new(Counter::default());
    assert!(!logger.is_enabled());
    logger.log(entry(0)); // off: nothing, not counted as dropped
    let on = |p: &std::path::Path| AccessLog {
        path: Some(p.to_str().unwrap().to_owned()),
    };
    logger.reconfigure(&on(&a)).unwrap();
    assert!(logger.is_enabled());
    for n in 1..=100 {
        logger.log(entry(n));
    }
    logger.reconfigure(&on(&a)).unwrap(); // same path: same writer
    logger.reconfigure(&on(&b)).unwrap();
    logger.log(entry(101));
    // A path that cannot be opened keeps the current setting.
    let bad = AccessLog {
        path: Some(
            dir.path()
                .join("no/such/dir/x.log")
                .to_str()
                .unwrap()
                .into(),
        ),
    };
    assert!(logger.reconfigure(&bad).is_err());
    assert_eq!(logger.path().as_deref(), b.to_str());
    logger.log(entry(102));
    logger.close();
    assert!(!logger.is_enabled());
    assert_eq!(logger.dropped(), 0);

    let read = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // The old writer finishes its queue after the switch, on its own thread.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut la = read(&a);
    while la.len() < 100 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        la = read(&a);
    }
    assert_eq!(la.len(), 100);
    let got: Vec<u64> = la
        .iter()
        .map(|v| v["bytes_received"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
    let lb = read(&b);
    assert_eq!(lb.len(), 2);
    assert_eq!(lb[1]["bytes_received"], 102);

    logger.reconfigure(&AccessLog { path: None }).unwrap();
    assert!(!logger.is_enabled());
}

/// A writer that announces its first write and then waits for the gate to open.
struct Gated {
    entered: mpsc::Sender<()>,
    gate: Arc<Mutex<mpsc::Receiver<()>>>,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.entered.send(());
        let _ = self.gate.lock().unwrap().recv();
        self.out.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn full_queue_drops_and_counts_instead_of_blocking() {
    let dropped = Counter::default();
    let logger = AccessLogger::with_queue(dropped.clone(), 2);
    let (entered_tx, entered_rx) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel();
    let out = Arc::new(Mutex::new(Vec::new()));
    logger.start_with_writer(
        "gated",
        Box::new(Gated {
            entered: entered_tx,
            gate: Arc::new(Mutex::new(gate_rx)),
            out: out.clone(),
        }),
    );
    logger.log(entry(1));
    // The writer is now stuck writing entry 1; the queue holds 2 more, the rest are dropped.
    entered_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let start = std::time::Instant::now();
    for n in 2..=11 {
        logger.log(entry(n));
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(logger.dropped(), 8);
    assert_eq!(dropped.get(), 8);
    for _ in 0..10 {
        let _ = gate_tx.send(());
    }
    logger.close();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let got: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["bytes_received"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(got, vec![1, 2, 3]);
}
