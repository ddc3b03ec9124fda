//! Istio's plug-in CA layout: the four files (or keys of a Secret) a CA is read from and
//! written to.

use std::path::Path;

use super::error::{CaError, material};

/// File (and Secret key) names of Istio's plug-in CA layout.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// The four PEM texts of Istio's plug-in CA layout.
#[derive(Clone, PartialEq, Eq)]
pub struct PluginFiles {
    /// `ca-cert.pem`: the certificate that signs workload certificates.
    pub ca_cert: String,
    /// `ca-key.pem`: its private key.
    pub ca_key: String,
    /// `cert-chain.pem`: the chain from `ca-cert.pem` up (may be empty when `ca-cert.pem` is
    /// the root itself).
    pub cert_chain: String,
    /// `root-cert.pem`: the roots workloads trust.
    pub root_cert: String,
}

impl std::fmt::Debug for PluginFiles {
    // Never the private key in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginFiles")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"(hidden)")
            .field("cert_chain", &self.cert_chain)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

impl PluginFiles {
    /// Reads `dir/{ca-cert.pem,ca-key.pem,cert-chain.pem,root-cert.pem}`; `cert-chain.pem` may
    /// be absent.
    pub fn read_dir(dir: &Path) -> Result<PluginFiles, CaError> {
        let read = |name: &str, optional: bool| {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(t) => Ok(t),
                Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) => Err(material(p.display().to_string(), e.to_string())),
            }
        };
        Ok(PluginFiles {
            ca_cert: read(CA_CERT_FILE, false)?,
            ca_key: read(CA_KEY_FILE, false)?,
            cert_chain: read(CERT_CHAIN_FILE, true)?,
            root_cert: read(ROOT_CERT_FILE, false)?,
        })
    }

    /// Whether `dir` holds a plug-in CA (its `ca-cert.pem`).
    pub fn present_in(dir: &Path) -> bool {
        dir.join(CA_CERT_FILE).exists()
    }

    /// Writes the four files into `dir` (created when absent; the key readable by its owner
    /// only). `root-cert.pem` last: its presence means the set is complete.
    pub fn write_dir(&self, dir: &Path) -> Result<(), CaError> {
        let fail = |p: &Path, e: std::io::Error| material(p.display().to_string(), e.to_string());
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
        for (name, text) in [
            (CA_KEY_FILE, &self.ca_key),
            (CA_CERT_FILE, &self.ca_cert),
            (CERT_CHAIN_FILE, &self.cert_chain),
            (ROOT_CERT_FILE, &self.root_cert),
        ] {
            let p = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            write_private(&tmp, text.as_bytes())
                .and_then(|()| std::fs::rename(&tmp, &p))
                .map_err(|e| fail(&p, e))?;
        }
        Ok(())
    }

    /// `(name, text)` of each file, for a Secret's data.
    pub fn entries(&self) -> [(&'static str, &str); 4] {
        [
            (CA_CERT_FILE, &self.ca_cert),
            (CA_KEY_FILE, &self.ca_key),
            (CERT_CHAIN_FILE, &self.cert_chain),
            (ROOT_CERT_FILE, &self.root_cert),
        ]
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
