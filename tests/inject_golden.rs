//! Golden corpus: every input under tests/inject/ is injected offline and compared with its
//! `<input>.injected` file (`tests/support/golden.rs`: UPDATE_GOLDEN=1 rewrites them);
//! injecting the output again changes nothing; and every pod in it goes through the webhook over real HTTPS, whose
//! JSONPatch applied to the original pod must give the offline result.

mod common;
#[path = "support/golden.rs"]
mod golden;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use golden::Goldens;
use meshctl::inject::InjectionConfig;
use meshctl::inject::workload::template_path;
use meshctl::kube_yaml;
use meshctl::offline;
use meshctl::webhook::Limits;
use serde_json::{Value, json};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn is_input(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_string_lossy();
    (name.ends_with(".yaml") || name.ends_with(".json")) && !name.ends_with(".config.yaml")
}

fn inputs() -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| is_input(p))
        .collect();
    v.sort();
    assert!(v.len() >= 15, "corpus too small: {v:?}");
    v
}

fn config_for(input: &Path) -> InjectionConfig {
    let name = input.file_name().unwrap().to_string_lossy();
    let stem = name.rsplit_once('.').unwrap().0;
    let cfg_path = input.with_file_name(format!("{stem}.config.yaml"));
    match std::fs::read_to_string(&cfg_path) {
        Ok(t) => InjectionConfig::from_yaml(&t).unwrap(),
        Err(_) => InjectionConfig::default(),
    }
}

fn golden_path(input: &Path) -> PathBuf {
    let mut s = input.as_os_str().to_owned();
    s.push(".injected");
    PathBuf::from(s)
}

fn inject(name: &str, text: &str, cfg: &InjectionConfig) -> String {
    let out = offline::inject_text(name, text, cfg, None).unwrap_or_else(|e| panic!("{e}"));
    offline::render(name, &out, None).unwrap()
}

#[test]
fn golden_files_are_current_and_injection_is_idempotent() {
    let mut goldens = Goldens::new("cargo test --test inject_golden");
    for input in inputs() {
        let name = input.file_name().unwrap().to_string_lossy().to_string();
        let cfg = config_for(&input);
        let text = std::fs::read_to_string(&input).unwrap();
        let got = inject(&name, &text, &cfg);
        goldens.check(&golden_path(&input), &got);
        // Twice == once.
        let again = inject(&name, &got, &cfg);
        assert_eq!(
            again, got,
            "{name}: injecting the injected output changed it"
        );
    }
    goldens.orphans(&corpus_dir(), ".injected");
    goldens.finish();
}

/// The walkthrough's deployment.yaml is in the corpus verbatim and every Deployment gets the proxy.
#[test]
fn walkthrough_deployment_is_injected() {
    let walkthrough = corpus_dir().join("seed-deployment.yaml");
    let text = std::fs::read_to_string(&walkthrough).unwrap();
    let out = offline::inject_text(
        "walkthrough",
        &text,
        &InjectionConfig::default(),
        Some("demo"),
    )
    .unwrap();
    let deployments: Vec<_> = out
        .docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 3);
    for d in deployments {
        let inits = d["spec"]["template"]["spec"]["initContainers"]
            .as_array()
            .unwrap();
        let names: Vec<_> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["mesh-init", "mesh-proxy"]);
    }
    let services = out.docs.iter().filter(|d| d["kind"] == "Service").count();
    assert_eq!(services, 3);
}

/// Pods (as the API server would send them) of every pod template in a document.
fn pods_of(doc: &Value, out: &mut Vec<(String, Value)>) {
    let kind = doc["kind"].as_str().unwrap_or("");
    let api = doc["apiVersion"].as_str().unwrap_or("");
    if kind.ends_with("List") {
        for item in doc["items"].as_array().into_iter().flatten() {
            pods_of(item, out);
        }
        return;
    }
    let Ok(Some(path)) = template_path(api, kind) else {
        return;
    };
    let ns = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("demo")
        .to_owned();
    let mut pod = if path.is_empty() {
        doc.clone()
    } else {
        let mut t = doc;
        for seg in path {
            t = &t[*seg];
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": t.get("metadata").cloned().unwrap_or(json!({})), "spec": t["spec"]})
    };
    pod["metadata"]["namespace"] = json!(ns);
    out.push((ns, pod));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_patch_equals_offline_injection() {
    let server = common::start(
        InjectionConfig::default(),
        Arc::new(common::AllEnabled),
        Limits::default(),
    )
    .await;
    let mut client = common::Client::connect(server.addr, &server.cert.der).await;
    let mut checked = 0;
    let mut patched = 0;
    for input in inputs() {
        let name = input.file_name().unwrap().to_string_lossy().to_string();
        let cfg = config_for(&input);
        server.state.config.store(Arc::new(cfg.clone()));
        let text = std::fs::read_to_string(&input).unwrap();
        let (_, docs) = kube_yaml::parse_stream(&text).unwrap();
        let injected = offline::inject_text(&name, &text, &cfg, None).unwrap();
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for d in &docs {
            pods_of(&d.value, &mut before);
        }
        for d in &injected.docs {
            pods_of(d, &mut after);
        }
        assert_eq!(before.len(), after.len());
        for (i, ((ns, pod), (_, want))) in before.iter().zip(&after).enumerate() {
            let uid = format!("{name}-{i}");
            let body = serde_json::to_vec(&common::review_for(pod, ns, &uid)).unwrap();
            let (status, resp) = client.post("/inject", body).await;
            assert_eq!(
                status,
                200,
                "{name}[{i}]: {}",
                String::from_utf8_lossy(&resp)
            );
            let (allowed, patch) = common::decode_response(&resp, &uid);
            assert!(allowed, "{name}[{i}]");
            let mut got = pod.clone();
            if let Some(p) = &patch {
                assert!(!p.0.is_empty(), "{name}[{i}]: empty patch must be omitted");
                json_patch::patch(&mut got, p).unwrap();
                patched += 1;
            }
            assert_eq!(
                &got, want,
                "{name}[{i}]: webhook result differs from offline inject"
            );
            // Patched pod sent again: nothing to do.
            let body = serde_json::to_vec(&common::review_for(&got, ns, &uid)).unwrap();
            let (status, resp) = client.post("/inject", body).await;
            assert_eq!(status, 200);
            assert!(
                common::decode_response(&resp, &uid).1.is_none(),
                "{name}[{i}]: re-review patched"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 20 && patched >= 15,
        "checked {checked}, patched {patched}"
    );
}
