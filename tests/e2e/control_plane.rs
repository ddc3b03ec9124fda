//! The harness itself: the real API server answers, kubectl talks to it, the node is Ready.

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use mesh_testenv::{NODE_NAME, TestEnv};

#[tokio::test]
async fn the_control_plane_is_real_and_kubectl_reaches_it() {
    let env = TestEnv::shared();
    eprintln!("control plane started in {:?}", env.startup_time());
    let client = env.client().unwrap();

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.36.3", "{version:?}");

    let node = Api::<Node>::all(client).get(NODE_NAME).await.unwrap();
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    assert!(ready, "kwok keeps {NODE_NAME} Ready");

    let out = env
        .kubectl_ok(&["get", "nodes", "-o", "name"])
        .await
        .unwrap();
    assert_eq!(out.trim(), format!("node/{NODE_NAME}"));
    let out = env.kubectl_ok(&["version", "-o", "json"]).await.unwrap();
    assert!(out.contains("\"gitVersion\": \"v1.36.3\""), "{out}");
    env.check_running().unwrap();
}
