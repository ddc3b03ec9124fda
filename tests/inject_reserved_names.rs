//! `meshctl inject` refuses a workload whose own container (or volume) carries a name the
//! injector adds, instead of silently replacing it: non-zero exit, nothing written, and an
//! error naming the file, the document, the object and the field. Workloads we injected
//! before are re-injected as usual.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

fn meshctl(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: web:1
      - name: mesh-proxy
        image: my-own-proxy:1
";

#[test]
fn user_container_with_the_sidecars_name_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.yaml");
    let text = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n{DEPLOYMENT}");
    std::fs::write(&file, &text).unwrap();
    let o = meshctl(&["inject", "-f", file.to_str().unwrap()], "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(o.stdout.is_empty(), "output written despite the error");
    let want = "app.yaml: document 2 (line 5, Deployment/web): spec.template.spec.containers[1].name: container name \"mesh-proxy\" is reserved";
    assert!(err.contains(want), "{err}");
    assert!(err.contains("rename"), "{err}");

    // The init container's name, and a volume's, likewise.
    let init = DEPLOYMENT.replace(
        "      containers:\n",
        "      initContainers:\n      - {name: mesh-init, image: setup:1}\n      containers:\n",
    );
    let init = init.replace("name: mesh-proxy", "name: sidecar");
    let o = meshctl(&["inject", "-f", "-"], &init);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("<stdin>: document 1 (line 1, Deployment/web): spec.template.spec.initContainers[0].name: container name \"mesh-init\" is reserved"),
        "{err}"
    );
    let volume = DEPLOYMENT.replace("name: mesh-proxy", "name: sidecar")
        + "      volumes:\n      - {name: mesh-token, secret: {secretName: t}}\n";
    let o = meshctl(&["inject", "-f", "-"], &volume);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("spec.template.spec.volumes[0].name: volume name \"mesh-token\" is reserved"),
        "{err}"
    );

    // Opted out: nothing is injected, so nothing would be replaced.
    let opted_out = DEPLOYMENT.replace(
        "      labels: {app: web}\n    spec:",
        "      labels: {app: web, sidecar.meshctl.io/inject: \"false\"}\n    spec:",
    );
    let o = meshctl(&["inject", "-f", "-"], &opted_out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn injected_output_injects_again_unchanged() {
    let fine = DEPLOYMENT.replace("name: mesh-proxy", "name: sidecar");
    let once = meshctl(&["inject", "-f", "-"], &fine);
    assert!(
        once.status.success(),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let once = String::from_utf8(once.stdout).unwrap();
    assert!(once.contains("name: mesh-proxy"), "{once}");
    let twice = meshctl(&["inject", "-f", "-"], &once);
    assert!(
        twice.status.success(),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    assert_eq!(String::from_utf8(twice.stdout).unwrap(), once);
}
