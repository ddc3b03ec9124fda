//! Proxy authentication on config distribution, against the real API server: the control
//! plane's `Hub` (in-process, real TLS) checks each proxy's service-account token with a
//! TokenReview and holds the identity the proxy claims against it. Tokens are made by
//! `kubectl create token`, bound to a pod where a kubelet would bind them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_proxy::distribution::{ClientError, ClientOptions, NodeIdentity, first_snapshot};
use mesh_testenv::TestEnv;
use meshctl::controlplane::auth::ProxyAuth;
use meshctl::controlplane::certs::{self, CertSource};
use meshctl::controlplane::{Hub, World};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

async fn token(
    env: &TestEnv,
    ns: &str,
    args: &[&str],
    dir: &Path,
    file: &str,
) -> std::path::PathBuf {
    let mut all = vec!["-n", ns, "create", "token"];
    all.extend_from_slice(args);
    let t = env.kubectl_ok(&all).await.unwrap();
    let path = dir.join(file);
    std::fs::write(&path, t.trim()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_get_config_only_with_a_token_that_proves_who_they_say_they_are() {
    let env = TestEnv::shared();
    let ns = env.create_namespace("auth").await.unwrap();
    let other_ns = env.create_namespace("auth-other").await.unwrap();
    let objects = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: app, namespace: {ns}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: gw-istio, namespace: {ns}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: app-0, namespace: {ns}}}\n\
         spec:\n  serviceAccountName: app\n  nodeName: no-kubelet\n  containers: [{{name: app, image: app:1}}]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("objects.yaml"), objects).unwrap();
    env.kubectl_ok(&[
        "apply",
        "-f",
        dir.path().join("objects.yaml").to_str().unwrap(),
    ])
    .await
    .unwrap();

    // The control plane's distribution server, its world holding Gateway `ns/gw` (class istio).
    mesh_tls::install_default();
    let tls = certs::load(&CertSource::Generated {
        dir: dir.path().join("pki"),
        sans: vec!["meshd.mesh-system.svc".into()],
    })
    .unwrap();
    let resources = mesh_translate::load_str(
        "gateway.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: istio}}\n\
             spec: {{controllerName: istio.io/gateway-controller}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: {ns}}}\n\
             spec:\n  gatewayClassName: istio\n  listeners: [{{name: http, port: 8080, protocol: HTTP}}]\n"
        ),
        &mesh_translate::LoadOptions {
            default_namespace: ns.clone(),
        },
    )
    .unwrap()
    .resources;
    let (_worlds, rx) = watch::channel(Some(Arc::new(World::new(
        1,
        Arc::new(resources),
        Default::default(),
    ))));
    let hub = Hub::new(
        rx,
        Default::default(),
        // Review open streams' tokens every second (5 min in production), no cache.
        ProxyAuth::token_review(env.client().unwrap(), "meshctl")
            .with_timings(Duration::ZERO, Duration::from_secs(1)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(
        hub.clone()
            .serve(listener, tls.server_config, shutdown.clone()),
    );

    let sidecar = |pod: &str, sa: &str| NodeIdentity::Sidecar {
        namespace: ns.clone(),
        pod: pod.into(),
        service_account: Some(sa.into()),
        ip: None,
    };
    let gateway = NodeIdentity::Gateway {
        namespace: ns.clone(),
        name: "gw".into(),
        pod: None,
    };
    let attempt = |node: NodeIdentity, token: Option<std::path::PathBuf>| {
        let mut o = ClientOptions::new(addr.to_string(), tls.ca_path.clone(), node);
        o.server_name = "meshd.mesh-system.svc".into();
        o.token_file = token;
        async move {
            tokio::time::timeout(Duration::from_secs(20), first_snapshot(&o))
                .await
                .expect("an answer within 20 s")
        }
    };
    let refused = |r: Result<_, ClientError>| match r {
        Err(ClientError::Status(status, why)) => (status.as_u16(), why),
        other => panic!("expected a refusal, got {other:?}"),
    };

    let d = dir.path();
    let bound = token(
        env,
        &ns,
        &[
            "app",
            "--audience",
            "meshctl",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "app-0",
        ],
        d,
        "bound",
    )
    .await;
    let unbound = token(env, &ns, &["app", "--audience", "meshctl"], d, "unbound").await;
    let wrong_audience = token(env, &ns, &["app", "--audience", "someone-else"], d, "aud").await;
    let gateway_sa = token(env, &ns, &["gw-istio", "--audience", "meshctl"], d, "gw").await;
    let elsewhere = token(
        env,
        &other_ns,
        &["default", "--audience", "meshctl"],
        d,
        "other",
    )
    .await;

    // The pod's own bound token: served.
    let config = attempt(sidecar("app-0", "app"), Some(bound.clone()))
        .await
        .unwrap();
    assert!(!config.listeners.is_empty(), "{config:?}");
    // No token, or one for another audience: 401.
    let (status, why) = refused(attempt(sidecar("app-0", "app"), None).await);
    assert_eq!(status, 401, "{why}");
    assert!(why.contains("no bearer token"), "{why}");
    let (status, why) = refused(attempt(sidecar("app-0", "app"), Some(wrong_audience)).await);
    assert_eq!(status, 401, "{why}");
    // Someone else's pod, a token bound to no pod, another namespace: 403.
    let (status, why) = refused(attempt(sidecar("app-1", "app"), Some(bound.clone())).await);
    assert_eq!(status, 403, "{why}");
    assert!(why.contains("not bound to pod"), "{why}");
    let (status, _) = refused(attempt(sidecar("app-0", "app"), Some(unbound)).await);
    assert_eq!(status, 403);
    let (status, why) = refused(attempt(sidecar("app-0", "app"), Some(elsewhere)).await);
    assert_eq!(status, 403, "{why}");
    // A Gateway's config: only for the service account of its Deployment.
    let config = attempt(gateway.clone(), Some(gateway_sa)).await.unwrap();
    assert_eq!(config.listeners.len(), 1, "{config:?}");
    let (status, why) = refused(attempt(gateway, Some(bound.clone())).await);
    assert_eq!(status, 403, "{why}");
    assert!(why.contains("gw-istio"), "{why}");

    // A stream lives only as long as its token holds: the pod the token is bound to is
    // deleted, the stream ends, and the proxy's reconnects are refused.
    let mut o = ClientOptions::new(
        addr.to_string(),
        tls.ca_path.clone(),
        sidecar("app-0", "app"),
    );
    o.server_name = "meshd.mesh-system.svc".into();
    o.token_file = Some(bound);
    o.min_backoff = Duration::from_millis(200);
    let (tx, mut updates) = tokio::sync::mpsc::channel(1);
    let stop = CancellationToken::new();
    tokio::spawn(mesh_proxy::distribution::run_client(o, tx, stop.clone()));
    let u = tokio::time::timeout(Duration::from_secs(20), updates.recv())
        .await
        .unwrap()
        .unwrap();
    u.reply.send(Ok(())).unwrap();
    assert_eq!(hub.report().proxies.len(), 1);
    env.kubectl_ok(&[
        "-n",
        &ns,
        "delete",
        "pod",
        "app-0",
        "--grace-period=0",
        "--force",
    ])
    .await
    .unwrap();
    mesh_testenv::eventually(
        Duration::from_secs(20),
        "the stream of the deleted pod to end",
        || {
            let n = hub.report().proxies.len();
            async move { Ok((n == 0).then_some(())) }
        },
    )
    .await
    .unwrap();
    // And it stays out (the reconnects, every 200-800 ms, are refused).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        hub.report().proxies.is_empty(),
        "{:?}",
        hub.report().proxies
    );
    stop.cancel();
    shutdown.cancel();
}
