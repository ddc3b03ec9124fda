//! The `mesh-proxy run` binary: startup line, serving, reload on file change and SIGHUP,
//! errors naming file and field, drain on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_proxy::testing::{EchoServer, get};

fn yaml(endpoint: &str, tag: &str) -> String {
    format!(
        r#"
listeners:
  - name: gw
    port: 80
    virtualHosts:
      - name: any
        hostnames: ["*"]
        routes:
          - name: r
            filters:
              - type: responseHeaderModifier
                set: [{{name: x-config, value: "{tag}"}}]
            action:
              type: forward
              backends: [{{target: {{backend: b}}, weight: 1}}]
backends:
  - name: b
    endpoints: ["{endpoint}"]
"#
    )
}

fn spawn(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["run", "--config"])
        .arg(config)
        .args([
            // Served on worker threads whatever the machine's core count.
            "--workers",
            "3",
            "--bind-address",
            "127.0.0.1",
            "--listener-port",
            "80=0",
            "--admin-address",
            "127.0.0.1:0",
            "--readiness-address",
            "off",
            "--metrics-address",
            "off",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-proxy")
}

/// Reads stderr until the `listening listener=gw address=...` line; the rest is drained in
/// the background.
fn listening_address(child: &mut Child) -> String {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("listening listener=gw address=") {
            let addr = rest.trim().to_string();
            std::thread::spawn(move || for _ in lines {});
            return addr;
        }
    }
    panic!("mesh-proxy exited without listening");
}

async fn wait_for_tag(url: &str, tag: &str) {
    for _ in 0..100 {
        if let Ok(r) = get(url).await
            && r.header("x-config") == Some(tag)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("config {tag} never served");
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_reloads_and_drains() {
    let backend = EchoServer::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, yaml(&backend.endpoint(), "one")).unwrap();
    let mut child = spawn(&path);
    let addr = listening_address(&mut child);
    let url = format!("http://{addr}/");
    wait_for_tag(&url, "one").await;

    // A file change is picked up.
    std::fs::write(&path, yaml(&backend.endpoint(), "two")).unwrap();
    wait_for_tag(&url, "two").await;

    // An invalid file is rejected and the previous config keeps serving.
    std::fs::write(&path, "listeners: [{name: gw, port: 80, bogus: 1}]").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&url).await.unwrap().header("x-config"), Some("two"));

    // SIGHUP reloads too (the watcher may or may not have seen this write already).
    std::fs::write(&path, yaml(&backend.endpoint(), "three")).unwrap();
    signal(&child, "-HUP");
    wait_for_tag(&url, "three").await;

    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(get(&url).await.is_err(), "stopped listening");
}

#[test]
fn invalid_config_names_file_and_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - name: gw\n    port: 80\n    virtualHosts:\n      - name: v\n        hostnames: [\"*\"]\n        routes:\n          - name: r\n            action: {type: forward, backends: [{target: {backend: missing}, weight: 1}]}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["run", "--config"])
        .arg(&path)
        .args([
            "--admin-address",
            "off",
            "--readiness-address",
            "off",
            "--metrics-address",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(
        err.contains("listeners[0].virtualHosts[0].routes[0].action.backends[0].target"),
        "{err}"
    );
    assert!(err.contains("no backend named \"missing\""), "{err}");

    std::fs::write(&path, "listeners: [{name: gw, port: 80, bogus: 1}]").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("bogus"), "{err}");
}
