//! Serving certificate from PEM files, swapped in place when the files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("building TLS config")]
    Rustls(#[from] rustls::Error),
}

/// Parse a PEM certificate chain and private key into a rustls [`CertifiedKey`].
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &*cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.into(),
            message: "no CERTIFICATE block".into(),
        });
    }
    let key = rustls_pemfile::private_key(&mut &*key_pem)
        .map_err(|e| TlsError::Pem {
            path: key_path.into(),
            message: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Pem {
            path: key_path.into(),
            message: "no PRIVATE KEY block".into(),
        })?;
    let signer = mesh_tls::signing_key(&key)?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match().map_err(|e| TlsError::Pem {
        path: key_path.into(),
        message: format!("key does not match certificate: {e}"),
    })?;
    Ok(ck)
}

/// Certificate + key files, and the key currently served.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwapOption<CertifiedKey>,
    last: std::sync::Mutex<Option<(Vec<u8>, Vec<u8>)>>,
}

impl CertStore {
    /// Load the files now; fails if they are unreadable or invalid.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Result<Arc<Self>, TlsError> {
        let s = Arc::new(Self {
            cert_path: cert_path.into(),
            key_path: key_path.into(),
            current: ArcSwapOption::empty(),
            last: std::sync::Mutex::new(None),
        });
        s.reload()?;
        Ok(s)
    }

    /// Re-read the files; swap the served key if their content changed and is valid.
    /// Returns whether a new key was installed. On error the old key stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.into(),
                source,
            })
        };
        let cert = read(&self.cert_path)?;
        let key = read(&self.key_path)?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref().is_some_and(|(c, k)| *c == cert && *k == key) {
            return Ok(false);
        }
        let ck = certified_key(&cert, &key, &self.cert_path, &self.key_path)?;
        self.current.store(Some(Arc::new(ck)));
        *last = Some((cert, key));
        Ok(true)
    }

    /// The leaf certificate currently served (DER).
    pub fn current_leaf(&self) -> Option<Vec<u8>> {
        self.current
            .load_full()
            .and_then(|ck| ck.cert.first().map(|c| c.as_ref().to_vec()))
    }

    /// A rustls server config resolving to whatever key is current.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = mesh_tls::provider();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}
