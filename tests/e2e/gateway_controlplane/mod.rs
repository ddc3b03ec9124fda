//! The walkthrough end to end on the real API server, with the real binaries: `meshctl
//! control-plane` (outside the cluster, `--kubeconfig`) watches the objects the walkthrough
//! applies, deploys the Gateway (Deployment + Service, run by kwok), writes Gateway API
//! status, and pushes config to a real `mesh-proxy run --control-plane` gateway process.
//!
//! How traffic reaches "pods" that kwok runs without running anything: the test creates a
//! network namespace (a veth pair to the host) and runs the gateway proxy inside it. In that
//! namespace, iptables DNAT sends each pod IP:5678 from the EndpointSlices (10.244.x.y, what
//! the control plane pushes, unchanged) to a small HTTP server of the test on the host end
//! of the veth, which answers like the walkthrough's app (`myapp v1`, `myapp v2`, `otherapp`). The
//! proxy, the config and the addresses are exactly what a cluster would have; only the pod
//! behind each IP is a process of the test. Needs root (CAP_NET_ADMIN) for `unshare`, `ip`
//! and `iptables`.
//!
//! Step 1 is the walkthrough's, through our installer: the real `meshctl install -y -f
//! istio-gwapi.yaml` with `--set profile=remote --set webhook.url=https://127.0.0.1:PORT/inject`
//! (the cluster side only: CRDs — Gateway API, ours and Istio's EnvoyFilter —, the injection
//! config, the webhook certificate and the MutatingWebhookConfiguration in URL mode), then the
//! test's `meshctl control-plane` serves that webhook on PORT with the installer's certificate
//! and injection config, so the walkthrough's pods get the real sidecar injected. The test holds
//! `MESH_INSTALL` for writing while the install's webhook is registered and runs
//! `meshctl uninstall -y` at the end (also on panic).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gateway_api::apis::standard::{
    gatewayclasses::GatewayClass, gateways::Gateway, httproutes::HttpRoute,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use mesh_testenv::{TestEnv, eventually};
use serde_json::json;

mod harness;

use harness::*;

#[tokio::test]
async fn walkthrough_through_the_control_plane() {
    // The install's webhook matches every injection-labelled namespace of the shared server.
    let _exclusive = crate::MESH_INSTALL.write().await;
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let kubeconfig = env.kubeconfig().to_str().unwrap().to_string();

    // Step 1: `meshctl install -f istio-gwapi.yaml`, the cluster side (profile remote: the
    // webhook calls the control plane this test runs outside the cluster).
    let webhook = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let t = Instant::now();
    let out = meshctl(&[
        "install",
        "-y",
        "-f",
        &walkthrough("istio-gwapi.yaml"),
        "--set",
        "profile=remote",
        "--set",
        &format!("webhook.url=https://{webhook}/inject"),
        "--kubeconfig",
        &kubeconfig,
    ]);
    let _uninstall = Uninstall {
        kubeconfig: kubeconfig.clone(),
    };
    eprintln!(
        "meshctl install: {} in {:?}\n{}{}",
        out.status,
        t.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "meshctl install failed");
    // The installer's webhook certificate and injection config, for the control plane.
    let secret = Api::<Secret>::namespaced(client.clone(), "mesh-system")
        .get("meshd-webhook-tls")
        .await
        .unwrap();
    let data = secret.data.unwrap();
    std::fs::create_dir_all(dir.join("webhook")).unwrap();
    std::fs::write(dir.join("webhook/tls.crt"), &data["tls.crt"].0).unwrap();
    std::fs::write(dir.join("webhook/tls.key"), &data["tls.key"].0).unwrap();
    let injection = Api::<ConfigMap>::namespaced(client.clone(), "mesh-system")
        .get("mesh-sidecar-injector")
        .await
        .unwrap();
    std::fs::write(
        dir.join("webhook/injection-config.yaml"),
        &injection.data.unwrap()["config"],
    )
    .unwrap();

    // Step 2: the namespace, labelled for injection with the real kubectl.
    let ns = env.create_namespace("cp").await.unwrap();
    env.kubectl_ok(&["label", "ns", &ns, "istio-injection=enabled"])
        .await
        .unwrap();

    let netns = NetNs::create().await;
    let dist = format!("{}:{}", netns.host_ip, free_port(&netns.host_ip));
    let admin_url = format!("http://127.0.0.1:{}", free_port("127.0.0.1"));
    let admin = admin_url.trim_start_matches("http://").to_string();
    let mut cp = control_plane(env, dir, &webhook, &dist, &admin, "control-plane.log");
    eventually(Duration::from_secs(30), "the webhook listening", || async {
        Ok(tokio::net::TcpStream::connect(&webhook).await.ok())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cp.log_tail()));

    // Step 3: the apps; their pods get the sidecar and run (kwok).
    let t = Instant::now();
    env.kubectl_ok(&["apply", "-n", &ns, "-f", &walkthrough("deployment.yaml")])
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for app in ["myapp-v1", "myapp-v2", "otherapp"] {
        let pod = eventually(
            Duration::from_secs(60),
            &format!("a Running pod of {app}"),
            || async {
                let list = pods.list(&ListParams::default()).await?;
                Ok(list.items.into_iter().find(|p| {
                    p.metadata.name.as_deref().unwrap_or("").starts_with(app)
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                }))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cp.log_tail()));
        let spec = pod.spec.as_ref().unwrap();
        let init = names(&spec.init_containers);
        assert!(
            init.contains(&"mesh-init".to_string()) && init.contains(&"mesh-proxy".to_string()),
            "{app}: init containers {init:?}, containers {:?}",
            names(&Some(spec.containers.clone()))
        );
        assert!(
            pod.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("sidecar.meshctl.io/status")),
            "{app}: no injection status"
        );
    }
    eprintln!(
        "app pods injected and Running {:?} after kubectl apply",
        t.elapsed()
    );

    // The rest of the walkthrough (`kubectl -n demo ...`).
    for f in [
        "gateway.yaml",
        "httproute-myapp.yaml",
        "httproute-otherapp.yaml",
    ] {
        env.kubectl_ok(&["apply", "-n", &ns, "-f", &walkthrough(f)])
            .await
            .unwrap();
    }

    // The app pods are injected, but what answers for them below are plain HTTP servers on
    // the host, without the sidecar that would terminate mutual TLS: the namespace says so
    // (Istio's PeerAuthentication DISABLE), so the gateway reaches them in plaintext.
    let plaintext = dir.join("peer-authentication.yaml");
    std::fs::write(
        &plaintext,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: stand-ins-without-sidecars}\nspec: {mtls: {mode: DISABLE}}\n",
    )
    .unwrap();
    env.kubectl_ok(&["apply", "-n", &ns, "-f", plaintext.to_str().unwrap()])
        .await
        .unwrap();

    // The control plane deploys the Gateway (Istio's naming: <gateway>-<class>).
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let gw_deploy = eventually(Duration::from_secs(60), "gateway Deployment", || async {
        Ok(deployments.get_opt("istio-gwapi-istio").await?)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cp.log_tail()));
    let owner = &gw_deploy.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Gateway", "istio-gwapi")
    );
    let labels = gw_deploy
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(
        labels["gateway.networking.k8s.io/gateway-name"],
        "istio-gwapi"
    );
    assert_eq!(labels["istio"], "ingressgateway");
    assert_eq!(labels["sidecar.meshctl.io/inject"], "false");
    // Its pod runs without a sidecar (the proxy is the gateway).
    let gw_pod = eventually(Duration::from_secs(60), "the gateway pod", || async {
        let list = pods
            .list(
                &ListParams::default().labels("gateway.networking.k8s.io/gateway-name=istio-gwapi"),
            )
            .await?;
        Ok(list.items.into_iter().next())
    })
    .await
    .unwrap();
    let gw_spec = gw_pod.spec.as_ref().unwrap();
    assert!(
        !names(&gw_spec.init_containers).contains(&"mesh-init".to_string())
            && gw_pod
                .metadata
                .annotations
                .as_ref()
                .is_none_or(|a| !a.contains_key("sidecar.meshctl.io/status")),
        "gateway pod injected: {:?}",
        names(&gw_spec.init_containers)
    );
    let pod_template = gw_deploy
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    // Hardened like the installer's ingress gateway (one pod builder for both).
    let pod_security = pod_template.security_context.as_ref().unwrap();
    assert_eq!(
        pod_security
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let container = &pod_template.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/meshctl/mesh-proxy:e2e")
    );
    let args = container.args.clone().unwrap().join(" ");
    assert!(
        args.contains(&format!(
            "--control-plane meshd.mesh-system.svc:15012 --gateway {ns}/istio-gwapi"
        )),
        "{args}"
    );
    let svc = eventually(Duration::from_secs(30), "gateway Service", || async {
        Ok(services.get_opt("istio-gwapi-istio").await?)
    })
    .await
    .unwrap();
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    let port80 = spec
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.port == 80)
        .expect("port 80 from the listener");
    assert!(port80.node_port.is_some(), "{port80:?}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let ca = cms
        .get(meshctl::controlplane::ca_root::CA_CONFIGMAP)
        .await
        .unwrap();
    assert!(ca.data.unwrap()["root-cert.pem"].contains("BEGIN CERTIFICATE"));

    // Status: routes Accepted and ResolvedRefs, with observedGeneration.
    let routes: Api<HttpRoute> = Api::namespaced(client.clone(), &ns);
    for name in ["myapp-route", "other-route"] {
        let (accepted, resolved, generation) = eventually(
            Duration::from_secs(30),
            &format!("{name} Accepted"),
            || async {
                Ok(route_conditions(&routes, name)
                    .await
                    .filter(|(a, r, _)| a["status"] == "True" && r["status"] == "True"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cp.log_tail()));
        assert_eq!(accepted["reason"], "Accepted");
        assert_eq!(resolved["reason"], "ResolvedRefs");
        assert_eq!(accepted["observedGeneration"], generation);
    }
    let classes: Api<GatewayClass> = Api::all(client.clone());
    let class = serde_json::to_value(classes.get("istio").await.unwrap().status).unwrap();
    assert_eq!(
        condition(&class["conditions"], "Accepted").unwrap()["status"],
        "True"
    );
    let gateways: Api<Gateway> = Api::namespaced(client.clone(), &ns);
    let gw_status = eventually(Duration::from_secs(30), "Gateway Programmed", || async {
        let s = serde_json::to_value(gateways.get("istio-gwapi").await?.status)?;
        Ok(condition(&s["conditions"], "Programmed")
            .is_some_and(|c| c["status"] == "True")
            .then_some(s))
    })
    .await
    .unwrap();
    assert_eq!(
        condition(&gw_status["conditions"], "Accepted").unwrap()["status"],
        "True"
    );
    assert_eq!(
        gw_status["addresses"][0]["value"],
        json!(spec.cluster_ip.clone().unwrap())
    );
    assert_eq!(gw_status["listeners"][0]["attachedRoutes"], 2);

    // Pods (kwok) have IPs; the EndpointSlices carry them. Serve them through the netns.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    for (svc, body) in [
        ("myapp-v1", "myapp v1"),
        ("myapp-v2", "myapp v2"),
        ("otherapp", "otherapp"),
    ] {
        let ip = eventually(
            Duration::from_secs(120),
            &format!("{svc} endpoint"),
            || async {
                let list = slices
                    .list(
                        &ListParams::default().labels(&format!("kubernetes.io/service-name={svc}")),
                    )
                    .await?;
                Ok(list
                    .items
                    .iter()
                    .flat_map(|s| s.endpoints.iter().flatten())
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .find_map(|e| e.addresses.first().cloned()))
            },
        )
        .await
        .unwrap();
        let addr = backend(&netns.host_ip, body).await;
        netns.dnat(&ip, 5678, addr).await;
    }

    // The gateway proxy: the real binary, in the netns, connected to the control plane, with
    // the token its Deployment's pods would mount (the service account the control plane
    // made for the Gateway, the mesh's audience).
    let token = env
        .kubectl_ok(&[
            "-n",
            &ns,
            "create",
            "token",
            "istio-gwapi-istio",
            "--audience",
            "meshctl",
        ])
        .await
        .unwrap();
    let token_file = dir.join("gateway-token");
    std::fs::write(&token_file, token.trim()).unwrap();
    let mut proxy_cmd = tokio::process::Command::new("nsenter");
    proxy_cmd
        .arg(netns.nsenter_arg())
        .arg(mesh_proxy_binary())
        .args([
            "run",
            "--control-plane",
            &dist,
            "--control-plane-server-name",
            "meshd.mesh-system.svc",
            "--ca-file",
            dir.join("pki/root-cert.pem").to_str().unwrap(),
            "--gateway",
            &format!("{ns}/istio-gwapi"),
            "--token-file",
            token_file.to_str().unwrap(),
            "--admin-address",
            "0.0.0.0:15000",
            "--readiness-address",
            "off",
            "--metrics-address",
            "off",
        ])
        .env("POD_NAME", "e2e-gateway-proxy")
        .env("RUST_LOG", "info");
    let proxy = spawn_logged(proxy_cmd, &dir.join("proxy.log"));
    let base = format!("http://{}:80", netns.ns_ip);
    let routed = eventually(
        Duration::from_secs(30),
        "the gateway to route /",
        || async {
            Ok(get(&format!("{base}/"))
                .await
                .ok()
                .filter(|r| r.status == 200))
        },
    )
    .await;
    if let Err(e) = routed {
        let last = get(&format!("{base}/")).await.map(|r| (r.status, r.body));
        panic!(
            "{e}\nlast answer: {last:?}\nconfig: {:?}\nproxy:\n{}\ncontrol plane:\n{}",
            config_dump(&netns.ns_ip).await,
            proxy.log_tail(),
            cp.log_tail()
        );
    }

    // proxy-status shows it, SYNCED.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["proxy-status", "--control-plane-admin", &admin_url])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("meshctl proxy-status:\n{table}");
    assert!(
        table.lines().any(|l| {
            l.starts_with(&format!("gateway {ns}/istio-gwapi (e2e-gateway-proxy)"))
                // Authenticated as the Gateway's own service account.
                && l.contains(&format!(" {ns}/istio-gwapi-istio "))
                && l.contains("SYNCED")
        }),
        "{table}"
    );

    // Step 6: check_canary.py — about 80/20 (v2: 80 of 400, σ = 8).
    let r = get(&format!("{base}/")).await.unwrap();
    assert_eq!(r.headers["x-mesh"], "istio");
    assert_eq!(r.headers["x-canary"], "v2-20pct");
    let (v1, v2) = canary(&format!("{base}/")).await;
    eprintln!("canary 80/20: v1: {v1}, v2: {v2}");
    assert_eq!(v1 + v2, CANARY_SAMPLES);
    assert!((44..=116).contains(&v2), "v1 {v1} v2 {v2}");

    // Step 7: the EnvoyFilter; 100 parallel requests per path.
    env.kubectl_ok(&[
        "apply",
        "-n",
        &ns,
        "-f",
        &walkthrough("istio-envoy-filter.yaml"),
    ])
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "rate limits pushed", || async {
        Ok(config_dump(&netns.ns_ip).await.filter(|d| {
            d["config"]["rateLimits"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        }))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cp.log_tail()));
    let (root, limited) = parallel(&format!("{base}/")).await;
    let (other, _) = parallel(&format!("{base}/other")).await;
    eprintln!("100 parallel: / {root:?}, /other {other:?}");
    assert_eq!(root, BTreeMap::from([(200, 20), (429, 80)]));
    assert_eq!(other, BTreeMap::from([(200, 10), (429, 90)]));
    let h = &limited[0].headers;
    assert_eq!(h["x-rate-limited"], "TOO_MANY_REQUESTS");
    assert_eq!(h["content-length"], "18");
    assert_eq!(h["content-type"], "text/plain");
    assert_eq!(h["x-canary"], "v2-20pct");
    assert_eq!(h["x-mesh"], "istio");

    // Take the limit away again for the traffic checks below.
    env.kubectl_ok(&[
        "delete",
        "-n",
        &ns,
        "-f",
        &walkthrough("istio-envoy-filter.yaml"),
    ])
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "rate limits removed", || async {
        Ok(config_dump(&netns.ns_ip).await.filter(|d| {
            d["config"]["rateLimits"]
                .as_array()
                .is_none_or(|a| a.is_empty())
        }))
    })
    .await
    .unwrap();

    // Weights to 50/50: in the proxy within 1 s.
    let patch = r#"[{"op":"replace","path":"/spec/rules/0/backendRefs/0/weight","value":50},{"op":"replace","path":"/spec/rules/0/backendRefs/1/weight","value":50}]"#;
    let before = Instant::now();
    env.kubectl_ok(&[
        "patch",
        "httproute",
        "-n",
        &ns,
        "myapp-route",
        "--type=json",
        "-p",
        patch,
    ])
    .await
    .unwrap();
    let patched = Instant::now();
    loop {
        let dump = config_dump(&netns.ns_ip).await.unwrap_or_default();
        if dump.to_string().contains("\"weight\":50") {
            break;
        }
        assert!(
            before.elapsed() < Duration::from_secs(10),
            "weights never changed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let from_patch = patched.elapsed();
    let from_kubectl = before.elapsed();
    eprintln!(
        "weights 50/50: serving {from_patch:?} after the API server took the patch ({from_kubectl:?} including kubectl)"
    );
    assert!(from_patch < Duration::from_secs(1), "{from_patch:?}");
    let (v1, v2) = canary(&format!("{base}/")).await;
    eprintln!("canary 50/50: v1: {v1}, v2: {v2}");
    // v2: 200 of 400, σ = 10.
    assert!((155..=245).contains(&v2), "v1 {v1} v2 {v2}");

    // A route to a missing Service: ResolvedRefs=False BackendNotFound; its share gets 500.
    let missing = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: missing-route, namespace: {ns}}}\n\
         spec:\n  parentRefs: [{{kind: Gateway, name: istio-gwapi}}]\n  rules:\n  \
         - matches: [{{path: {{type: PathPrefix, value: /missing}}}}]\n    \
         backendRefs: [{{name: otherapp, port: 80, weight: 1}}, {{name: no-such-service, port: 80, weight: 1}}]\n"
    );
    let file = dir.join("missing.yaml");
    std::fs::write(&file, missing).unwrap();
    env.kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();
    let (accepted, resolved, _) =
        eventually(Duration::from_secs(30), "missing-route status", || async {
            Ok(route_conditions(&routes, "missing-route")
                .await
                .filter(|(_, r, _)| r["status"] == "False"))
        })
        .await
        .unwrap();
    assert_eq!(accepted["status"], "True");
    assert_eq!(resolved["reason"], "BackendNotFound");
    eventually(Duration::from_secs(10), "/missing routed", || async {
        Ok(get(&format!("{base}/missing"))
            .await
            .ok()
            .filter(|r| r.status != 404))
    })
    .await
    .unwrap();
    let mut codes = BTreeMap::new();
    for _ in 0..CANARY_SAMPLES {
        *codes
            .entry(get(&format!("{base}/missing")).await.unwrap().status)
            .or_insert(0) += 1;
    }
    eprintln!("/missing (otherapp 1 : no-such-service 1): {codes:?}");
    assert_eq!(codes.len(), 2, "{codes:?}");
    // 500s: 200 of 400, σ = 10.
    assert!((155..=245).contains(&codes[&500]), "{codes:?}");

    // Deleting a route: 404.
    env.kubectl_ok(&["delete", "httproute", "-n", &ns, "myapp-route"])
        .await
        .unwrap();
    let t = Instant::now();
    eventually(Duration::from_secs(5), "/ to answer 404", || async {
        Ok(get(&format!("{base}/"))
            .await
            .ok()
            .filter(|r| r.status == 404))
    })
    .await
    .unwrap();
    eprintln!("route deleted: 404 after {:?}", t.elapsed());
    assert_eq!(get(&format!("{base}/other")).await.unwrap().status, 200);

    // The control plane goes away: the proxy keeps serving; it comes back: the proxy
    // reconnects (same CA, kept in the cert directory) and gets changes again.
    cp.child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&format!("{base}/other")).await.unwrap().status, 200);
    let _cp2 = control_plane(env, dir, &webhook, &dist, &admin, "control-plane-2.log");
    env.kubectl_ok(&[
        "apply",
        "-n",
        &ns,
        "-f",
        &walkthrough("httproute-myapp.yaml"),
    ])
    .await
    .unwrap();
    eventually(
        Duration::from_secs(60),
        "/ routed again after the restart",
        || async {
            Ok(get(&format!("{base}/"))
                .await
                .ok()
                .filter(|r| r.status == 200))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log_tail()));
    drop(proxy);
}
