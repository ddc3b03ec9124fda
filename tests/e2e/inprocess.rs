//! `meshctl control-plane`'s control plane (`meshctl::controlplane::run`) in the test
//! process, against the shared API server: real watches, real TLS on config distribution,
//! the admin endpoint (`/debug/proxies`, `/metrics`) on 127.0.0.1.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_testenv::{TestEnv, eventually};
use meshctl::controlplane::ControlPlaneConfig;
use meshctl::controlplane::certs::{CA_FILE, CertSource};
use meshctl::controlplane::gateways::GatewayDeploymentOptions;
use tokio_util::sync::CancellationToken;

pub struct ControlPlane {
    pub distribution: SocketAddr,
    pub admin: SocketAddr,
    pub ca_path: PathBuf,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl ControlPlane {
    /// Starts one and waits until it has built its first world (`/ready`).
    pub async fn start(
        env: &TestEnv,
        controller_names: Vec<String>,
        gateway_deployments: Option<GatewayDeploymentOptions>,
    ) -> ControlPlane {
        let translate = mesh_translate::TranslateOptions {
            controller_names,
            ..Default::default()
        };
        Self::start_with(env, translate, gateway_deployments).await
    }

    /// [`ControlPlane::start`] with translation options of the test's own (e.g. a mesh root
    /// namespace of its own, so its mesh-wide policies reach no other test's proxies).
    pub async fn start_with(
        env: &TestEnv,
        translate: mesh_translate::TranslateOptions,
        gateway_deployments: Option<GatewayDeploymentOptions>,
    ) -> ControlPlane {
        mesh_testenv::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let config = ControlPlaneConfig {
            distribution_addr: free_port(),
            admin_addr: Some(free_port()),
            cert: CertSource::Generated {
                dir: dir.path().join("pki"),
                sans: vec!["127.0.0.1".into()],
            },
            translate,
            gateway_deployments,
            write_status: false,
            debounce: Duration::from_millis(100),
            proxy_token_audience: None,
            distribution_limits: Default::default(),
        };
        let cp = ControlPlane {
            distribution: config.distribution_addr,
            admin: config.admin_addr.unwrap(),
            ca_path: dir.path().join("pki").join(CA_FILE),
            shutdown: CancellationToken::new(),
            _dir: dir,
        };
        let client = env.client().unwrap();
        let shutdown = cp.shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = meshctl::controlplane::run(client, config, shutdown).await {
                panic!("control plane: {e:#}");
            }
        });
        eventually(
            Duration::from_secs(60),
            "the control plane ready",
            || async { Ok(cp.get("/ready").await.filter(|(s, _)| *s == 200)) },
        )
        .await
        .unwrap();
        cp
    }

    /// `GET path` on the admin endpoint: (status, body); `None` while it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    }

    /// The generation of the control plane's current world (`/debug/proxies`).
    pub async fn generation(&self) -> u64 {
        let (_, body) = self.get("/debug/proxies").await.expect("/debug/proxies");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        report["generation"].as_u64().unwrap()
    }

    /// The value of one sample of `/metrics` (0 when absent).
    pub async fn metric(&self, sample: &str) -> u64 {
        let (status, body) = self.get("/metrics").await.expect("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
