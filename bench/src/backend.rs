//! The backend every contender forwards to: hyper HTTP/1.1, keep-alive, a small fixed
//! response naming the port's app (`myapp v1`, `myapp v2`, like the walkthrough's apps).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub fn run(ports: &[u16], threads: usize) -> anyhow::Result<()> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, &port) in ports.iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let listener = TcpListener::bind(addr).await?;
            let body = Bytes::from(format!("myapp v{}\n", i + 1));
            tasks.push(tokio::spawn(serve(listener, body)));
        }
        eprintln!("backend ready on {ports:?}");
        for t in tasks {
            t.await??;
        }
        Ok(())
    })
}

async fn serve(listener: TcpListener, body: Bytes) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let mut r = Response::new(Full::new(body.clone()));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain"),
                );
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
