//! `meshctl inject` as a user runs it: files, directories, stdin, formats, --diff,
//! config sources, and errors that name file, document and field.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

fn meshctl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut sin = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        sin.write_all(s.as_bytes()).unwrap();
    }
    drop(sin);
    child.wait_with_output().unwrap()
}

fn corpus(name: &str) -> String {
    format!("{}/tests/inject/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn file_output_matches_golden() {
    let o = meshctl(&["inject", "-f", &corpus("seed-deployment.yaml")], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let golden = std::fs::read_to_string(corpus("seed-deployment.yaml.injected")).unwrap();
    assert_eq!(text(&o.stdout), golden);
}

#[test]
fn stdin_json_output_and_skip_notes() {
    let input = std::fs::read_to_string(corpus("opt-out.yaml")).unwrap();
    let o = meshctl(&["inject", "-f", "-", "-o", "json"], Some(&input));
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "Deployment");
    assert!(
        v["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none()
    );
    let err = text(&o.stderr);
    assert!(err.contains("<stdin>: document 1: Deployment/no-mesh: skipped: pod label sidecar.istio.io/inject=false"), "{err}");
}

#[test]
fn directory_input_and_diff() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(corpus("pod.yaml"), dir.path().join("a.yaml")).unwrap();
    std::fs::copy(corpus("job.yaml"), dir.path().join("b.yml")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let o = meshctl(&["inject", "-f", dir.path().to_str().unwrap()], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("kind: Pod") && out.contains("kind: Job") && out.contains("\n---\n"));
    let o = meshctl(&["inject", "--diff", "-f", &corpus("pod.yaml")], None);
    assert!(o.status.success());
    let d = text(&o.stdout);
    assert!(d.starts_with("--- a/"), "{d}");
    assert!(
        d.contains("+  - name: mesh-proxy") || d.contains("+    name: mesh-proxy"),
        "{d}"
    );
    assert!(!d.contains("-  containers:"), "{d}");
}

#[test]
fn config_file_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cm.yaml");
    std::fs::write(&cfg, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mesh-sidecar-injector, namespace: mesh-system}\ndata:\n  config: |\n    hub: cm.example.com\n").unwrap();
    let o = meshctl(
        &[
            "inject",
            "-f",
            &corpus("pod.yaml"),
            "--injection-config",
            cfg.to_str().unwrap(),
            "--set",
            "tag=9.9",
            "--set",
            "nativeSidecar=false",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("image: cm.example.com/mesh-proxy:9.9"),
        "{out}"
    );
    assert!(
        out.contains("\n  - args:\n    - sidecar"),
        "proxy should be a classic container:\n{out}"
    );
    let o = meshctl(
        &[
            "inject",
            "-f",
            &corpus("pod.yaml"),
            "--set",
            "proxy.ports.inbound=notaport",
        ],
        None,
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("proxy.ports.inbound"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn bad_documents_name_file_document_and_field_and_write_nothing() {
    let good = "apiVersion: v1\nkind: Pod\nmetadata: {name: ok}\nspec:\n  containers: [{name: a, image: a}]\n";
    let cases = [
        ("invalid YAML", format!("{good}---\nkind: Pod\n  bad: [indent\n"), "document 2 (line 8): invalid YAML"),
        ("invalid JSON", "{\"apiVersion\": \"v1\", \"kind\": \"Pod\",".to_string(), "document 1 (line 1): invalid JSON"),
        ("no kind", format!("{good}---\napiVersion: v1\nmetadata: {{name: x}}\n"), "document 2 (line 7): kind: missing"),
        ("no apiVersion", format!("{good}---\nkind: Pod\n"), "document 2 (line 7, Pod): apiVersion: missing"),
        (
            "wrong apiVersion",
            "apiVersion: apps/v1beta1\nkind: Deployment\nmetadata: {name: old}\nspec: {}\n".to_string(),
            "document 1 (line 1, Deployment/old): apiVersion: Deployment in apps/v1beta1 is not supported",
        ),
        (
            "no template",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 1}\n".to_string(),
            "Deployment/d): spec.template: missing",
        ),
        (
            "no containers",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n".to_string(),
            "Pod/p): spec.containers: a pod needs at least one container",
        ),
        (
            "wrong field type",
            format!("{good}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec:\n  template:\n    spec:\n      containers:\n      - name: a\n        ports: [{{containerPort: http}}]\n"),
            "document 2 (line 7, Deployment/d): spec.template.spec.containers[0].ports[0].containerPort: invalid type",
        ),
        (
            "bad annotation",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {traffic.sidecar.meshctl.io/excludeOutboundPorts: ssh}\nspec:\n  containers: [{name: a}]\n".to_string(),
            "metadata.annotations[\"traffic.sidecar.meshctl.io/excludeOutboundPorts\"]: \"ssh\" is not a port number",
        ),
        ("scalar document", format!("{good}---\njust a string\n"), "document 2 (line 7): (document): a Kubernetes object must be a mapping"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, input, want) in cases {
        let path = dir.path().join("in.yaml");
        std::fs::write(&path, &input).unwrap();
        let o = meshctl(&["inject", "-f", path.to_str().unwrap()], None);
        assert!(!o.status.success(), "{name}: should fail");
        assert!(
            o.stdout.is_empty(),
            "{name}: wrote output: {}",
            text(&o.stdout)
        );
        let err = text(&o.stderr);
        assert!(
            err.contains(path.to_str().unwrap()),
            "{name}: no file name in {err}"
        );
        assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
    }
    // A bad second file means nothing at all is written for the first.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: [").unwrap();
    let o = meshctl(
        &[
            "inject",
            "-f",
            &corpus("pod.yaml"),
            "-f",
            bad.to_str().unwrap(),
        ],
        None,
    );
    assert!(!o.status.success());
    assert!(o.stdout.is_empty());
}
