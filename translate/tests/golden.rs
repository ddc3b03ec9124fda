//! Translation goldens: every fixture set the translator tests use is loaded from its files and
//! translated, and the resulting `ProxyConfig` (JSON) is compared with its golden file under
//! `tests/golden/`. A change of the translator's output shows up as a diff of what proxies get;
//! `UPDATE_GOLDEN=1 cargo test -p mesh-translate --test golden` rewrites the goldens (the
//! convention of every golden test: `tests/support/golden.rs` at the repository root).

#[path = "../../tests/support/golden.rs"]
mod golden;

use std::path::{Path, PathBuf};

use golden::Goldens;
use mesh_translate::{
    LoadOptions, SidecarOptions, TranslateOptions, Translation, load, translate, translate_sidecar,
};

fn here() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures(names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| match *n {
            // The walkthrough's files as users apply them (what `meshctl demo` embeds).
            "seed-walkthrough" => here().join("../examples/seed-walkthrough"),
            n => here().join("tests/fixtures").join(n),
        })
        .collect()
}

/// How a case is translated: for a gateway, or for one pod's sidecar.
enum View {
    Gateway,
    Sidecar {
        namespace: &'static str,
        pod: &'static str,
        ip: &'static str,
    },
}

struct Case {
    name: &'static str,
    inputs: &'static [&'static str],
    /// The namespace of objects without one (`kubectl apply -n`).
    namespace: &'static str,
    view: View,
}

const CASES: &[Case] = &[
    Case {
        name: "seed-walkthrough",
        inputs: &["seed-walkthrough", "seed-endpoints"],
        namespace: "demo",
        view: View::Gateway,
    },
    Case {
        name: "seed-walkthrough-without-endpoints",
        inputs: &["seed-walkthrough"],
        namespace: "demo",
        view: View::Gateway,
    },
    Case {
        name: "gateway-rules",
        inputs: &["gateway-base", "gateway-rules"],
        namespace: "demo",
        view: View::Gateway,
    },
    Case {
        name: "mesh-shop-producer-pod",
        inputs: &["mesh-shop"],
        namespace: "default",
        view: View::Sidecar {
            namespace: "shop",
            pod: "web-0",
            ip: "10.0.0.5",
        },
    },
    Case {
        name: "mesh-shop-consumer-pod",
        inputs: &["mesh-shop"],
        namespace: "default",
        view: View::Sidecar {
            namespace: "client-ns",
            pod: "c-0",
            ip: "10.0.1.1",
        },
    },
];

fn run(case: &Case) -> Translation {
    let loaded = load(
        &fixtures(case.inputs),
        &LoadOptions {
            default_namespace: case.namespace.into(),
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let base = TranslateOptions {
        default_namespace: case.namespace.into(),
        ..Default::default()
    };
    match case.view {
        View::Gateway => translate(&loaded.resources, &base),
        View::Sidecar { namespace, pod, ip } => translate_sidecar(
            &loaded.resources,
            &SidecarOptions {
                base,
                pod_namespace: namespace.into(),
                pod_name: pod.into(),
                pod_ip: Some(ip.parse().unwrap()),
                pod_labels: None,
                inbound_port: mesh_wire::ports::SIDECAR_INBOUND,
                outbound_port: mesh_wire::ports::SIDECAR_OUTBOUND,
            },
        ),
    }
}

#[test]
fn translations_match_their_goldens() {
    let dir = here().join("tests/golden");
    let mut goldens = Goldens::new("cargo test -p mesh-translate --test golden");
    for case in CASES {
        let t = run(case);
        // What a proxy would refuse is no golden.
        t.config
            .validate()
            .unwrap_or_else(|e| panic!("{}: invalid config: {e:?}", case.name));
        let mut json = serde_json::to_string_pretty(&t.config).unwrap();
        json.push('\n');
        // Deterministic: the same objects give the same bytes.
        let again = serde_json::to_string_pretty(&run(case).config).unwrap() + "\n";
        assert_eq!(
            json, again,
            "{}: translation is not deterministic",
            case.name
        );
        goldens.check(&dir.join(format!("{}.json", case.name)), &json);
    }
    goldens.orphans(&dir, ".json");
    goldens.finish();
}
