//! App health through the proxy's app-health server, over real sockets: an app with an HTTP
//! `/healthz` (plain and HTTPS with a certificate that names neither the address nor anything
//! verifiable), a TCP port and a gRPC health server; the kubelet's probes, rewritten by
//! injection, go to the app-health server, which answers what the app's state is.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::app_health::{self, AppHealth, BODY_CAP};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The app: its health is switched by the test.
struct App {
    http: SocketAddr,
    https: SocketAddr,
    grpc: SocketAddr,
    healthy: Arc<AtomicBool>,
    /// `ServingStatus` of the gRPC service `app` (1 SERVING, 2 NOT_SERVING).
    grpc_status: Arc<AtomicU8>,
    /// Headers of every request to `/healthz`.
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    stop: CancellationToken,
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn app_http(
    req: Request<Incoming>,
    healthy: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let redirect = |to: &str| {
        Response::builder()
            .status(StatusCode::FOUND)
            .header("location", to)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let path = req.uri().path_and_query().unwrap().as_str().to_owned();
    Ok(match path.as_str() {
        "/healthz" | "/healthz?full=1" => {
            seen.lock().unwrap().push(req.headers().clone());
            if healthy.load(Ordering::SeqCst) {
                Response::new(Full::new(Bytes::from_static(b"ok")))
            } else {
                Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Full::new(Bytes::from_static(b"broken")))
                    .unwrap()
            }
        }
        "/moved" => redirect("/healthz"),
        "/away" => redirect("http://example.com/healthz"),
        "/loop" => redirect("/loop"),
        "/big" => Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20]))),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(Full::new(Bytes::from_static(b"late")))
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    })
}

/// A minimal `grpc.health.v1.Health/Check`: the service `app` answers `grpc_status`, the
/// empty service SERVING, any other NOT_FOUND (trailers only).
async fn app_grpc(
    req: Request<Incoming>,
    grpc_status: Arc<AtomicU8>,
) -> Result<
    Response<
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>,
    >,
    Infallible,
> {
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // Frame header (5 bytes), then field 1 (service) if any.
    let service = if body.len() > 7 && body[5] == 0x0a {
        String::from_utf8_lossy(&body[7..7 + body[6] as usize]).into_owned()
    } else {
        String::new()
    };
    let trailers = |code: &str| {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t
    };
    let status = match (path.as_str(), service.as_str()) {
        ("/grpc.health.v1.Health/Check", "") => Some(1),
        ("/grpc.health.v1.Health/Check", "app") => Some(grpc_status.load(Ordering::SeqCst)),
        _ => None,
    };
    let frames = match status {
        Some(s) => vec![
            Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, s]))),
            Ok(Frame::trailers(trailers("0"))),
        ],
        None => vec![Ok(Frame::trailers(trailers("5")))],
    };
    Ok(Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures::stream::iter(frames)))
        .unwrap())
}

impl App {
    async fn start() -> App {
        let stop = CancellationToken::new();
        let healthy = Arc::new(AtomicBool::new(true));
        let grpc_status = Arc::new(AtomicU8::new(1));
        let seen = Arc::new(Mutex::new(Vec::new()));

        let http = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let https = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let grpc = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let addrs = (
            http.local_addr().unwrap(),
            https.local_addr().unwrap(),
            grpc.local_addr().unwrap(),
        );

        // A certificate for a name the prober is never told: it must not verify it.
        let cert = rcgen::generate_simple_self_signed(vec!["app.internal".to_owned()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(mesh_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        for (listener, tls) in [(http, None), (https, Some(acceptor))] {
            let (healthy, seen, stop) = (healthy.clone(), seen.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let (stream, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        a = listener.accept() => a.unwrap(),
                    };
                    let (healthy, seen, tls) = (healthy.clone(), seen.clone(), tls.clone());
                    tokio::spawn(async move {
                        let svc =
                            service_fn(move |req| app_http(req, healthy.clone(), seen.clone()));
                        let builder = hyper::server::conn::http1::Builder::new();
                        match tls {
                            Some(acceptor) => {
                                if let Ok(s) = acceptor.accept(stream).await {
                                    let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                                }
                            }
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    });
                }
            });
        }
        {
            let (grpc_status, stop) = (grpc_status.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let (stream, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        a = grpc.accept() => a.unwrap(),
                    };
                    let grpc_status = grpc_status.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| app_grpc(req, grpc_status.clone()));
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        }
        App {
            http: addrs.0,
            https: addrs.1,
            grpc: addrs.2,
            healthy,
            grpc_status,
            seen,
            stop,
        }
    }
}

/// What the kubelet does: a GET of the rewritten path; the status and body.
async fn kubelet_get(server: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(server).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", server.to_string())
        .header("user-agent", "kube-probe/1.34")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert!(
        resp.headers().get("location").is_none(),
        "{path}: a Location would make the kubelet follow it"
    );
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

fn probers(app: &App, tcp_port: u16) -> String {
    serde_json::json!({
        "/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": app.http.port(),
            "httpHeaders": [{"name": "X-Probe", "value": "liveness"}, {"name": "Host", "value": "web.local"}]}},
        "/app-health/web/readyz": {"httpGet": {"path": "/healthz?full=1", "port": app.https.port(), "scheme": "HTTPS"}},
        "/app-health/web/startupz": {"httpGet": {"path": "/moved", "port": app.http.port()}},
        "/app-health/away/livez": {"httpGet": {"path": "/away", "port": app.http.port()}},
        "/app-health/loop/livez": {"httpGet": {"path": "/loop", "port": app.http.port()}},
        "/app-health/big/livez": {"httpGet": {"path": "/big", "port": app.http.port()}},
        "/app-health/slow/livez": {"httpGet": {"path": "/slow", "port": app.http.port()}, "timeoutSeconds": 1},
        "/app-health/db/readyz": {"tcpSocket": {"port": tcp_port}},
        "/app-health/rpc/livez": {"grpc": {"port": app.grpc.port()}},
        "/app-health/rpc/readyz": {"grpc": {"port": app.grpc.port(), "service": "app"}},
        "/app-health/rpc/startupz": {"grpc": {"port": app.grpc.port(), "service": "other"}},
    })
    .to_string()
}

async fn start_server(json: &str) -> (SocketAddr, CancellationToken) {
    let health = AppHealth::from_json(json, LOCALHOST, None).unwrap();
    let stop = CancellationToken::new();
    let server = app_health::start((LOCALHOST, 0).into(), Arc::new(health), stop.clone())
        .await
        .unwrap();
    (server.address, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_through_the_proxy_follow_the_app() {
    let app = App::start().await;
    let tcp = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let (server, stop) = start_server(&probers(&app, tcp_port)).await;

    // HTTP: the app's status code, as the app changes.
    assert_eq!(
        kubelet_get(server, "/app-health/web/livez").await,
        (200, b"ok".to_vec())
    );
    app.healthy.store(false, Ordering::SeqCst);
    assert_eq!(
        kubelet_get(server, "/app-health/web/livez").await,
        (500, b"broken".to_vec())
    );
    // HTTPS without verifying the app's certificate.
    assert_eq!(kubelet_get(server, "/app-health/web/readyz").await.0, 500);
    app.healthy.store(true, Ordering::SeqCst);
    assert_eq!(kubelet_get(server, "/app-health/web/livez").await.0, 200);
    assert_eq!(kubelet_get(server, "/app-health/web/readyz").await.0, 200);
    // The original headers went to the app, the kubelet's User-Agent too.
    {
        let seen = app.seen.lock().unwrap();
        let h = &seen[0];
        assert_eq!(h["x-probe"], "liveness");
        assert_eq!(h["host"], "web.local");
        assert_eq!(h["user-agent"], "kube-probe/1.34");
        assert_eq!(
            seen.last().unwrap()["host"],
            format!("127.0.0.1:{}", app.https.port())
        );
    }

    // TCP: 200 while the port accepts, 503 once it is closed.
    assert_eq!(kubelet_get(server, "/app-health/db/readyz").await.0, 200);
    drop(tcp);
    let (status, body) = kubelet_get(server, "/app-health/db/readyz").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));

    // gRPC: SERVING → 200, NOT_SERVING → 503, unknown service → 503.
    assert_eq!(kubelet_get(server, "/app-health/rpc/livez").await.0, 200);
    assert_eq!(kubelet_get(server, "/app-health/rpc/readyz").await.0, 200);
    app.grpc_status.store(2, Ordering::SeqCst);
    let (status, body) = kubelet_get(server, "/app-health/rpc/readyz").await;
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("NOT_SERVING"),
        "{body:?}"
    );
    app.grpc_status.store(1, Ordering::SeqCst);
    assert_eq!(kubelet_get(server, "/app-health/rpc/readyz").await.0, 200);
    let (status, body) = kubelet_get(server, "/app-health/rpc/startupz").await;
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("grpc-status 5"),
        "{body:?}"
    );

    // Redirects: followed on the pod, answered as they are (without Location) elsewhere, a
    // loop fails.
    assert_eq!(
        kubelet_get(server, "/app-health/web/startupz").await,
        (200, b"ok".to_vec())
    );
    assert_eq!(kubelet_get(server, "/app-health/away/livez").await.0, 302);
    let (status, body) = kubelet_get(server, "/app-health/loop/livez").await;
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("redirects"),
        "{body:?}"
    );

    // A large body is cut at the cap; a slow app fails at the probe's timeout.
    let (status, body) = kubelet_get(server, "/app-health/big/livez").await;
    assert_eq!((status, body.len()), (200, BODY_CAP));
    let (status, body) = kubelet_get(server, "/app-health/slow/livez").await;
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("did not answer within 1s"),
        "{body:?}"
    );

    // Unknown paths and other methods.
    assert_eq!(kubelet_get(server, "/app-health/nope/livez").await.0, 404);
    assert_eq!(kubelet_get(server, "/").await.0, 404);
    let raw = mesh_proxy::testing::raw_exchange(
        server,
        b"POST /app-health/web/livez HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    stop.cancel();
}

/// A refused app is a failed probe, not a hung or dropped one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_app_is_a_failed_probe() {
    let closed = mesh_proxy::testing::closed_port().await.port();
    let json = serde_json::json!({
        "/app-health/a/livez": {"httpGet": {"path": "/", "port": closed}},
        "/app-health/a/readyz": {"grpc": {"port": closed}},
        "/app-health/a/startupz": {"httpGet": {"path": "/", "port": closed, "scheme": "HTTPS"}},
    })
    .to_string();
    let (server, stop) = start_server(&json).await;
    for kind in ["livez", "readyz", "startupz"] {
        let (status, body) = kubelet_get(server, &format!("/app-health/a/{kind}")).await;
        assert_eq!(status, 503, "{kind}: {}", String::from_utf8_lossy(&body));
    }
    stop.cancel();
}

/// Clients that send nothing, or half a request, are closed by the server (each connection
/// has a deadline), and while they are connected the server keeps its connection cap; once
/// they are gone it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_do_not_take_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = App::start().await;
    let json = serde_json::json!({
        "/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": app.http.port()}},
    })
    .to_string();
    let (server, stop) = start_server(&json).await;
    let mut silent = Vec::new();
    for _ in 0..app_health::MAX_CONNECTIONS - 1 {
        silent.push(tokio::net::TcpStream::connect(server).await.unwrap());
    }
    let mut half = tokio::net::TcpStream::connect(server).await.unwrap();
    half.write_all(b"GET /app-health/web/livez HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Every slot is taken: a probe now waits in the backlog, and is answered once the
    // server has closed the silent ones.
    let waiting = tokio::spawn(kubelet_get(server, "/app-health/web/livez"));
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(60), half.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a half-sent request is closed by the server: {closed:?}"
    );
    for mut s in silent {
        let closed = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
    let answered = tokio::time::timeout(Duration::from_secs(60), waiting).await;
    assert_eq!(answered.unwrap().unwrap().0, 200);
    stop.cancel();
}

/// `mesh-proxy sidecar` serves the probes of `MESH_KUBE_APP_PROBERS` on `--app-health-port`,
/// and refuses to start on probers it cannot run, naming the variable and the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_serves_its_app_probes() {
    let app = App::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.yaml");
    std::fs::write(&config, "listeners: []\n").unwrap();
    let json = serde_json::json!({
        "/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": app.http.port()}},
    })
    .to_string();
    let sidecar = |probers: &str| {
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["sidecar", "--config"])
            .arg(&config)
            .args([
                "--admin-port",
                "0",
                "--readiness-port",
                "0",
                "--metrics-port",
                "0",
                "--app-health-port",
                "0",
                "--workers",
                "1",
            ])
            .env("MESH_KUBE_APP_PROBERS", probers)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mesh-proxy sidecar")
    };
    let mut child = sidecar(&json);
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr: SocketAddr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split("listening server=app-health address=")
                .nth(1)
                .map(|a| a.trim().parse().unwrap())
        })
        .expect("the sidecar serves app health");
    std::thread::spawn(move || for _ in lines {});
    let addr = SocketAddr::new(LOCALHOST, addr.port());
    assert_eq!(kubelet_get(addr, "/app-health/web/livez").await.0, 200);
    app.healthy.store(false, Ordering::SeqCst);
    assert_eq!(kubelet_get(addr, "/app-health/web/livez").await.0, 500);
    let _ = child.kill();
    let _ = child.wait();

    let bad = sidecar(r#"{"/app-health/web/livez": {"tcpSocket": {"port": 0}}}"#)
        .wait_with_output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains(
            "MESH_KUBE_APP_PROBERS: \"/app-health/web/livez\": port 0 is not a valid port"
        ),
        "{err}"
    );
}
