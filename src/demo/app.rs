//! The walkthrough's demo application (`rlawnsdud/demo`): a small HTTP server whose body names the
//! app. It reads the same settings as the container does (`APP_NAME`, `GLOBAL_PREFIX`), so
//! `meshctl demo` runs the walkthrough's three Deployments as local processes' worth of tasks.
//!
//! Beyond the image, it answers [`WHOAMI_PATH`] with the `X-Forwarded-Client-Cert` it received,
//! so the demo's security part can show who the app's sidecar says called it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The path on which every demo app answers with the `X-Forwarded-Client-Cert` values it
/// received (one per line; an empty body when there were none), whatever its prefix: it is
/// how an app behind a sidecar learns its caller's identity.
pub const WHOAMI_PATH: &str = "/whoami";

/// What one demo app answers.
#[derive(Debug, Clone)]
pub struct DemoApp {
    /// Body of every answer (`APP_NAME`), e.g. `myapp v1`.
    pub name: String,
    /// Only paths under this prefix are served (`GLOBAL_PREFIX`); others get 404.
    pub prefix: String,
}

/// A running demo app.
pub struct RunningApp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DemoApp {
    pub fn new(name: &str, prefix: &str) -> Self {
        DemoApp {
            name: name.to_string(),
            prefix: prefix.to_string(),
        }
    }

    /// Serves on `127.0.0.1:0` until the returned handle is dropped.
    pub async fn start(self) -> std::io::Result<RunningApp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Arc::new(self);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let app = app.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(app.answer(&req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(RunningApp { addr, task })
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path == WHOAMI_PATH {
            return text(StatusCode::OK, whoami(req));
        }
        let prefix = self.prefix.trim_end_matches('/');
        let under_prefix = prefix.is_empty()
            || path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'));
        let (status, body) = if under_prefix {
            (StatusCode::OK, format!("{}\n", self.name))
        } else {
            (StatusCode::NOT_FOUND, "404 page not found\n".to_string())
        };
        text(status, body)
    }
}

/// The `X-Forwarded-Client-Cert` values of a request, one per line.
fn whoami(req: &Request<Incoming>) -> String {
    req.headers()
        .get_all(X_FORWARDED_CLIENT_CERT)
        .iter()
        .map(|v| format!("{}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

const X_FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
