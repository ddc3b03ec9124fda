//! The harness supports URL-mode admission webhooks: the API server calls an HTTPS server on
//! 127.0.0.1 whose certificate comes from the environment's CA (`caBundle` = `ca_pem`), and
//! honours `failurePolicy: Fail` when that server is gone. (The injection webhook's own
//! end-to-end test builds on this.)

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use mesh_testenv::{TestEnv, eventually};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Adds the annotation `testenv.meshctl.io/mutated: "true"` to every object it is sent.
async fn mutate(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let review: Option<AdmissionReview<DynamicObject>> =
        body.ok().and_then(|b| serde_json::from_slice(&b).ok());
    let request = review.map(TryInto::<AdmissionRequest<DynamicObject>>::try_into);
    let response = match request {
        Some(Ok(request)) => {
            let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
                { "op": "add", "path": "/metadata/annotations",
                  "value": { "testenv.meshctl.io/mutated": "true" } }
            ]))
            .unwrap();
            AdmissionResponse::from(&request)
                .with_patch(patch)
                .unwrap_or_else(|e| AdmissionResponse::invalid(e.to_string()))
        }
        _ => AdmissionResponse::invalid("not an AdmissionReview"),
    };
    let body = serde_json::to_vec(&response.into_review()).unwrap();
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// Serves until aborted; aborting it also closes the open connections (the JoinSet aborts
/// its tasks when dropped), as a stopped webhook server would.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hyper::service::service_fn(mutate))
                    .await;
            }
        });
    }
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name },
    }))
    .unwrap()
}

#[tokio::test]
async fn the_api_server_calls_a_url_webhook_signed_by_the_env_ca() {
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let ns = env.create_namespace("urlhook").await.unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(env.server_tls_config(&["127.0.0.1"]).unwrap());
    let server = tokio::spawn(serve(listener, acceptor));

    let mut hook: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": format!("testenv-{ns}") },
        "webhooks": [{
            "name": "mutate.testenv.meshctl.io",
            "clientConfig": { "url": format!("https://127.0.0.1:{port}/mutate") },
            "rules": [{
                "apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE"], "resources": ["configmaps"],
            }],
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": ns } },
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
        }],
    }))
    .unwrap();
    hook.webhooks.as_mut().unwrap()[0].client_config.ca_bundle =
        Some(ByteString(env.ca_pem().as_bytes().to_vec()));
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    hooks.create(&PostParams::default(), &hook).await.unwrap();

    // The API server picks new webhook configurations up within a moment.
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    let mut n = 0;
    eventually(
        Duration::from_secs(30),
        "a ConfigMap mutated by the webhook",
        || {
            n += 1;
            let cms = cms.clone();
            async move {
                let cm = cms
                    .create(&PostParams::default(), &config_map(&format!("cm-{n}")))
                    .await?;
                let mutated = cm.metadata.annotations.is_some_and(|a| {
                    a.get("testenv.meshctl.io/mutated").map(String::as_str) == Some("true")
                });
                Ok(mutated.then_some(()))
            }
        },
    )
    .await
    .unwrap();

    // With the server gone, failurePolicy: Fail refuses the request with the API server's
    // message naming the webhook.
    server.abort();
    let _ = server.await;
    let err = cms
        .create(&PostParams::default(), &config_map("refused"))
        .await
        .expect_err("failurePolicy: Fail with the webhook down");
    let msg = err.to_string();
    assert!(
        msg.contains("failed calling webhook") && msg.contains("mutate.testenv.meshctl.io"),
        "{msg}"
    );

    hooks
        .delete(&format!("testenv-{ns}"), &DeleteParams::default())
        .await
        .unwrap();
}
