//! The config distribution server's certificate: from files, or generated (a CA and a serving
//! certificate signed by it) and written to a directory so proxies and tests can read the CA,
//! and a restart keeps the same CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use mesh_tls::ca::{ServingSpec, serving_certificate};

use crate::webhook::tls::certified_key;

/// File names in the generated directory.
pub const CA_FILE: &str = "root-cert.pem";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// Serving TLS config and the CA (PEM) that proxies use to verify it.
pub struct DistributionTls {
    pub server_config: Arc<rustls::ServerConfig>,
    pub ca_pem: String,
    /// Where the CA was read from or written to.
    pub ca_path: PathBuf,
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Files (the installer's Secret): chain, key, and the CA proxies trust.
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
    /// `dir/{root-cert.pem,tls.crt,tls.key}`, generated when absent, with `sans` (DNS names or
    /// IP addresses) in the serving certificate.
    Generated { dir: PathBuf, sans: Vec<String> },
}

pub fn load(source: &CertSource) -> Result<DistributionTls> {
    let (cert, key, ca) = match source {
        CertSource::Files { cert, key, ca } => (cert.clone(), key.clone(), ca.clone()),
        CertSource::Generated { dir, sans } => {
            let (cert, key, ca) = (dir.join(CERT_FILE), dir.join(KEY_FILE), dir.join(CA_FILE));
            if !(cert.exists() && key.exists() && ca.exists()) {
                generate(dir, sans)?;
                tracing::info!(dir = %dir.display(), ?sans, "generated a self-signed CA and serving certificate for config distribution");
            }
            (cert, key, ca)
        }
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let ck = certified_key(&read(&cert)?, &read(&key)?, &cert, &key)?;
    let ca_pem = String::from_utf8(read(&ca)?).with_context(|| format!("{}", ca.display()))?;
    let provider = mesh_tls::provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(ck))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(DistributionTls {
        server_config: Arc::new(config),
        ca_pem,
        ca_path: ca,
    })
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn generate(dir: &Path, sans: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let generated = serving_certificate(&ServingSpec {
        ca_name: "meshctl config distribution CA",
        ca_path_len: None,
        common_name: sans.first().map_or("meshd", |s| s),
        sans,
        validity: None,
    })
    .with_context(|| format!("subject alternative names {sans:?}"))?;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &p))
            .with_context(|| format!("writing {}", p.display()))
    };
    // The CA last: its presence means the set is complete.
    write(KEY_FILE, &generated.key_pem)?;
    write(CERT_FILE, &generated.cert_pem)?;
    write(CA_FILE, &generated.ca_pem)?;
    Ok(())
}
