//! Golden tests of `meshctl manifest generate` for every profile (and the walkthrough's
//! IstioOperator file). CRD bodies are left out of the goldens (they are checked in under
//! manifests/ with their own staleness test). `UPDATE_GOLDEN=1` rewrites the goldens
//! (`tests/support/golden.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/golden.rs"]
mod golden;

use golden::Goldens;
use meshctl::install::profile::{Input, profile_names, resolve};
use meshctl::install::render::{self, Object};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests")
}

fn cases() -> Vec<(String, Vec<Input>, Vec<String>)> {
    let mut cases: Vec<(String, Vec<Input>, Vec<String>)> = profile_names()
        .into_iter()
        .map(|p| {
            let mut sets = vec![format!("profile={p}")];
            if p == "remote" {
                sets.push("webhook.url=https://192.0.2.10:15017/inject".into());
            }
            (p.to_string(), Vec::new(), sets)
        })
        .collect();
    let walkthrough = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/install/istio-gwapi.yaml");
    cases.push((
        "istio-gwapi".into(),
        vec![Input {
            name: "istio-gwapi.yaml".into(),
            text: std::fs::read_to_string(walkthrough).unwrap(),
        }],
        Vec::new(),
    ));
    cases
}

fn without_crd_bodies(objects: &[Object]) -> Vec<Object> {
    objects
        .iter()
        .cloned()
        .map(|mut o| {
            if o.kind() == "CustomResourceDefinition" {
                o.value["spec"] = "(checked in under manifests/)".into();
            }
            o
        })
        .collect()
}

#[test]
fn manifest_generate_goldens() {
    let mut goldens = Goldens::new("cargo test --test manifest_golden");
    for (name, inputs, sets) in cases() {
        let resolved = resolve(&inputs, &sets).unwrap_or_else(|e| panic!("{name}: {e}"));
        let objects = render::render(&resolved, None).unwrap();
        let again = render::render(&resolve(&inputs, &sets).unwrap(), None).unwrap();
        assert_eq!(objects, again, "{name}: rendering is deterministic");
        // CRDs, then namespaces, first.
        let kinds: Vec<&str> = objects.iter().map(Object::kind).collect();
        let first_other = kinds
            .iter()
            .position(|k| *k != "CustomResourceDefinition" && *k != "Namespace")
            .unwrap_or(kinds.len());
        assert!(
            kinds[first_other..]
                .iter()
                .all(|k| *k != "CustomResourceDefinition" && *k != "Namespace"),
            "{name}: {kinds:?}"
        );
        let text = format!(
            "{}{}",
            render::header(&resolved.profile),
            render::to_yaml(&without_crd_bodies(&objects))
        );
        goldens.check(&golden_dir().join(format!("{name}.yaml")), &text);
    }
    goldens.orphans(&golden_dir(), ".yaml");
    goldens.finish();
}

#[test]
fn cli_output_is_the_rendered_stream() {
    let walkthrough = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/install/istio-gwapi.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["manifest", "generate", "-f"])
        .arg(&walkthrough)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resolved = resolve(
        &[Input {
            name: "x".into(),
            text: std::fs::read_to_string(&walkthrough).unwrap(),
        }],
        &[],
    )
    .unwrap();
    let expected = format!(
        "{}{}",
        render::header("default"),
        render::to_yaml(&render::render(&resolved, None).unwrap())
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    // The walkthrough's file has nothing unsupported: no warning.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // -o DIR: one file per component, in apply order.
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["manifest", "generate", "--set", "profile=minimal", "-o"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(st.status.success());
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "01-gateway-api-crds.yaml",
            "02-istio-crds.yaml",
            "03-base.yaml",
            "04-control-plane.yaml",
            "05-gateway-class.yaml",
            "06-webhook.yaml"
        ]
    );

    // Errors: one line naming the source and the field.
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["manifest", "generate", "--set", "webhook.timeoutSeconds=99"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: --set webhook.timeoutSeconds=99: spec.webhook.timeoutSeconds: must be 1..=30\n"
    );
}

#[test]
fn install_time_render_adds_the_certificate_and_ca_bundle() {
    let resolved = resolve(&[], &[]).unwrap();
    let names = meshctl::install::certs::required_names(&resolved.values);
    let tls = meshctl::install::certs::generate(&names).unwrap();
    let objects = render::render(&resolved, Some(&tls)).unwrap();
    let secret = objects
        .iter()
        .find(|o| o.kind() == "Secret")
        .expect("TLS secret rendered");
    assert_eq!(secret.name(), "meshd-webhook-tls");
    let hook = objects
        .iter()
        .find(|o| o.kind() == "MutatingWebhookConfiguration")
        .unwrap();
    let bundle = meshctl::install::certs::b64(&tls.ca_pem);
    for w in hook.value["webhooks"].as_array().unwrap() {
        assert_eq!(w["clientConfig"]["caBundle"], bundle.as_str());
    }
    // Without a certificate: no Secret, no caBundle.
    let plain = render::render(&resolved, None).unwrap();
    assert!(plain.iter().all(|o| o.kind() != "Secret"));
}
