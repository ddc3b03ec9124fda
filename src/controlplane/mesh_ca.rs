//! The mesh CA of the control plane: which root it signs with, and the policy of workload
//! certificate issuance (`POST mesh_wire::certificate::CERTIFICATE_PATH` on the config
//! distribution server, served by [`Hub`](super::Hub)).
//!
//! Where the CA comes from, on start:
//! - Secret `cacerts` in the control plane's namespace, when it exists: an operator's own CA in
//!   Istio's plug-in layout (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`),
//!   used as it is. A broken one stops the control plane with the key and what is wrong,
//!   rather than quietly issuing from another root.
//! - else Secret `mesh-ca-secret` (same layout), created with a new self-signed root when
//!   absent. Replicas starting at once all try to create it; the API server lets one win
//!   (409 for the others), and the others read the winner's, so the mesh has one root.
//! - or, without Kubernetes (tests, the demo), a directory in the same layout
//!   (`--mesh-ca-dir`), where a new root is written when it holds none.
//!
//! The roots reach workloads three ways: in every issued certificate's answer, in every
//! config snapshot (`ProxyConfig.meshIdentity`), and appended to the ConfigMap
//! `mesh-ca-root-cert` in every namespace (after the CA that verifies the control plane).
//!
//! While it runs, the control plane follows both Secrets (`ca_rotation`): a `cacerts` the user
//! updates (their own rotation: both roots in `root-cert.pem`, then the new signer), created
//! or deleted, and the phases of `meshctl ca rotate` in `mesh-ca-secret`, are picked up and
//! pushed to every proxy at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use mesh_config::MeshIdentity;
use mesh_config::identity::{
    DEFAULT_TRUST_DOMAIN, SpiffeIdError, check_trust_domain, checked_spiffe_id, parse_spiffe_id,
};
use mesh_tls::ca::{CaError, CertificateAuthority, PluginFiles, VerifiedCsr};
use mesh_wire::certificate::{CertificateRequest, IssuedCertificate};

/// The Secret holding the CA the control plane generated.
pub const MESH_CA_SECRET: &str = "mesh-ca-secret";
/// The Secret of a user's CA (Istio's name and layout); it wins over [`MESH_CA_SECRET`].
pub const PLUGIN_CA_SECRET: &str = "cacerts";
pub const DEFAULT_NAMESPACE: &str = "mesh-system";
/// Lifetime of a workload certificate when the proxy does not ask for one (Istio's default).
pub const DEFAULT_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest lifetime a proxy may ask for.
pub const DEFAULT_MAX_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(48 * 3600);
/// The shortest lifetime issued (and accepted by the flags): a proxy renews at half of it.
pub const MIN_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(60);

/// Where the CA's key and certificates live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Secret `cacerts`, else Secret `mesh-ca-secret` (created when absent), in `namespace`.
    Kubernetes { namespace: String },
    /// Plug-in files in a directory; a new root is written there when it holds none.
    Dir(PathBuf),
}

/// How the control plane issues workload certificates.
#[derive(Debug, Clone)]
pub struct MeshCaOptions {
    pub source: CaSource,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub trust_domain: String,
    /// Lifetime when the proxy does not ask for one.
    pub workload_cert_ttl: Duration,
    /// The longest lifetime issued.
    pub max_workload_cert_ttl: Duration,
    /// Only with proxy authentication off (`--no-proxy-auth`), for tests: issue the
    /// identity the CSR names. Without it, issuance is refused when no token is reviewed,
    /// because then no identity is proven.
    pub insecure_issue_requested_identity: bool,
}

impl MeshCaOptions {
    pub fn new(source: CaSource) -> MeshCaOptions {
        MeshCaOptions {
            source,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            workload_cert_ttl: DEFAULT_WORKLOAD_CERT_TTL,
            max_workload_cert_ttl: DEFAULT_MAX_WORKLOAD_CERT_TTL,
            insecure_issue_requested_identity: false,
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        if let Err(e) = check_trust_domain(&self.trust_domain) {
            bail!("--trust-domain: {e}");
        }
        if self.workload_cert_ttl < MIN_WORKLOAD_CERT_TTL
            || self.max_workload_cert_ttl < MIN_WORKLOAD_CERT_TTL
        {
            bail!("workload certificate lifetimes must be at least 1m");
        }
        if self.workload_cert_ttl > self.max_workload_cert_ttl {
            bail!(
                "--workload-cert-ttl ({}s) is longer than --max-workload-cert-ttl ({}s)",
                self.workload_cert_ttl.as_secs(),
                self.max_workload_cert_ttl.as_secs()
            );
        }
        Ok(())
    }
}

/// The loaded CA and the issuance policy.
pub struct MeshCa {
    ca: CertificateAuthority,
    options: MeshCaOptions,
    identity: Arc<MeshIdentity>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("ca", &self.ca)
            .field("options", &self.options)
            .finish()
    }
}

/// Why a certificate was not issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No identity is proven (401).
    Unauthenticated,
    /// The request is at fault (400).
    BadRequest,
    /// It asks for an identity the caller does not have (403).
    Forbidden,
    /// The CA cannot issue now (503).
    Unavailable,
}

impl MeshCa {
    pub fn new(ca: CertificateAuthority, options: MeshCaOptions) -> MeshCa {
        let identity = Arc::new(MeshIdentity {
            trust_bundle_pem: ca.trust_bundle_pem(),
            signing_root_sha256: ca.signing_root_sha256(),
        });
        MeshCa {
            ca,
            options,
            identity,
        }
    }

    /// Loads (or creates) the CA from `options.source`.
    pub async fn load(client: Option<&kube::Client>, options: MeshCaOptions) -> Result<MeshCa> {
        options.validate()?;
        let ca = match &options.source {
            CaSource::Dir(dir) => {
                if PluginFiles::present_in(dir) {
                    let ca = CertificateAuthority::from_plugin_dir(dir)?;
                    tracing::info!(dir = %dir.display(), root = %ca.signing_root_sha256(), "mesh CA read from files");
                    ca
                } else {
                    let ca = CertificateAuthority::generate_root()?;
                    ca.plugin_files().write_dir(dir)?;
                    tracing::info!(dir = %dir.display(), root = %ca.signing_root_sha256(), "mesh CA: a new self-signed root, written to files");
                    ca
                }
            }
            CaSource::Kubernetes { namespace } => {
                let Some(client) = client else {
                    bail!("the mesh CA's Secrets need cluster access (or --mesh-ca-dir)");
                };
                from_secrets(client, namespace).await?
            }
        };
        Ok(MeshCa::new(ca, options))
    }

    pub fn options(&self) -> &MeshCaOptions {
        &self.options
    }

    pub fn authority(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// What every config snapshot carries.
    pub fn mesh_identity(&self) -> &MeshIdentity {
        &self.identity
    }

    /// [`mesh_identity`](Self::mesh_identity), shared (what the hub puts in snapshots).
    pub fn shared_identity(&self) -> Arc<MeshIdentity> {
        self.identity.clone()
    }

    /// The lifetime to issue for a request: the default when it asks for none, at most the
    /// maximum, at least a minute.
    pub fn ttl_for(&self, requested_seconds: Option<u64>) -> Duration {
        requested_seconds
            .map_or(self.options.workload_cert_ttl, Duration::from_secs)
            .clamp(MIN_WORKLOAD_CERT_TTL, self.options.max_workload_cert_ttl)
    }

    /// The identity a reviewed token proves, and nothing else.
    pub fn identity_of(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<String, SpiffeIdError> {
        checked_spiffe_id(&self.options.trust_domain, namespace, service_account)
    }

    /// Issues the certificate of `identity` for `request`. `None`: no identity was proven
    /// (proxy authentication is off), which only [`MeshCaOptions::insecure_issue_requested_identity`]
    /// allows, with the identity the CSR names.
    pub fn issue(
        &self,
        request: &CertificateRequest,
        identity: Option<&str>,
    ) -> Result<IssuedCertificate, (Refused, String)> {
        let requested;
        let identity = match identity {
            Some(id) => id,
            None if !self.options.insecure_issue_requested_identity => {
                return Err((
                    Refused::Unauthenticated,
                    "no identity can be proven: the control plane runs without proxy \
                     authentication (--no-proxy-auth)"
                        .into(),
                ));
            }
            None => {
                requested = self.requested_identity(&request.csr_pem)?;
                requested.as_str()
            }
        };
        let ttl = self.ttl_for(request.ttl_seconds);
        self.ca
            .sign_workload(&request.csr_pem, identity, ttl)
            .map_err(|e| {
                let kind = match &e {
                    CaError::BadCsr(_) | CaError::CsrSignature => Refused::BadRequest,
                    CaError::OtherIdentity { .. } | CaError::BadIdentity(_) => Refused::Forbidden,
                    _ => Refused::Unavailable,
                };
                (kind, e.to_string())
            })
    }

    fn requested_identity(&self, csr_pem: &str) -> Result<String, (Refused, String)> {
        let csr = VerifiedCsr::parse(csr_pem).map_err(|e| (Refused::BadRequest, e.to_string()))?;
        let prefix = format!("spiffe://{}/", self.options.trust_domain);
        match csr.uris.as_slice() {
            [one]
                if parse_spiffe_id(one)
                    .is_ok_and(|id| id.trust_domain == self.options.trust_domain) =>
            {
                Ok(one.clone())
            }
            _ => Err((
                Refused::BadRequest,
                format!(
                    "without proxy authentication the CSR must name its identity as its only URI SAN, \
                     {prefix}ns/<namespace>/sa/<service account> (it names {:?})",
                    csr.uris
                ),
            )),
        }
    }
}

/// `cacerts` when it exists, else `mesh-ca-secret`, created with a new root when absent.
async fn from_secrets(client: &kube::Client, namespace: &str) -> Result<CertificateAuthority> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let get = |name: &'static str| {
        let api = api.clone();
        async move {
            api.get_opt(name)
                .await
                .with_context(|| format!("reading Secret {namespace}/{name}"))
        }
    };
    if let Some(s) = get(PLUGIN_CA_SECRET).await? {
        let ca = from_secret(&s, namespace, PLUGIN_CA_SECRET)?;
        tracing::info!(secret = %format!("{namespace}/{PLUGIN_CA_SECRET}"), root = %ca.signing_root_sha256(), "mesh CA: the plugged-in CA");
        return Ok(ca);
    }
    if let Some(s) = get(MESH_CA_SECRET).await? {
        let ca = from_secret(&s, namespace, MESH_CA_SECRET)?;
        tracing::info!(secret = %format!("{namespace}/{MESH_CA_SECRET}"), root = %ca.signing_root_sha256(), "mesh CA: the root made earlier");
        return Ok(ca);
    }
    let ca = CertificateAuthority::generate_root()?;
    match api
        .create(
            &PostParams::default(),
            &secret(namespace, &ca.plugin_files()),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{MESH_CA_SECRET}"), root = %ca.signing_root_sha256(), "mesh CA: a new self-signed root, stored");
            Ok(ca)
        }
        // Another replica created it first: use its root, so the mesh has one.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = get(MESH_CA_SECRET).await?.with_context(|| {
                format!(
                    "Secret {namespace}/{MESH_CA_SECRET} was created, then deleted, while starting"
                )
            })?;
            let ca = from_secret(&s, namespace, MESH_CA_SECRET)?;
            tracing::info!(secret = %format!("{namespace}/{MESH_CA_SECRET}"), root = %ca.signing_root_sha256(), "mesh CA: another replica made the root first; using it");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 404 => bail!(
            "creating Secret {namespace}/{MESH_CA_SECRET}: namespace {namespace} does not exist \
             (install the mesh, or point --mesh-ca-namespace or --mesh-ca-dir elsewhere)"
        ),
        Err(e) => Err(e).with_context(|| format!("creating Secret {namespace}/{MESH_CA_SECRET}")),
    }
}

/// The Secret that stores a generated CA.
pub fn secret(namespace: &str, files: &PluginFiles) -> Secret {
    let data: BTreeMap<String, ByteString> = files
        .entries()
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(MESH_CA_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [(
                    super::ca_root::PUBLISHED_LABEL.0.to_string(),
                    super::ca_root::PUBLISHED_LABEL.1.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// A CA from a Secret in Istio's plug-in layout; errors name the Secret and the key.
pub fn from_secret(s: &Secret, namespace: &str, name: &str) -> Result<CertificateAuthority> {
    let data = s.data.clone().unwrap_or_default();
    let text = |key: &str, optional: bool| -> Result<String> {
        match data.get(key) {
            Some(b) => String::from_utf8(b.0.clone())
                .with_context(|| format!("Secret {namespace}/{name} key {key}: not UTF-8 text")),
            None if optional => Ok(String::new()),
            None => bail!(
                "Secret {namespace}/{name} has no key {key} (Istio's plug-in layout: ca-cert.pem, \
                 ca-key.pem, cert-chain.pem, root-cert.pem; it has {:?})",
                data.keys().collect::<Vec<_>>()
            ),
        }
    };
    let files = PluginFiles {
        ca_cert: text(mesh_tls::ca::CA_CERT_FILE, false)?,
        ca_key: text(mesh_tls::ca::CA_KEY_FILE, false)?,
        cert_chain: text(mesh_tls::ca::CERT_CHAIN_FILE, true)?,
        root_cert: text(mesh_tls::ca::ROOT_CERT_FILE, false)?,
    };
    Ok(CertificateAuthority::from_plugin(&files, |key| {
        format!("Secret {namespace}/{name} key {key}")
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(options: MeshCaOptions) -> MeshCa {
        MeshCa::new(CertificateAuthority::generate_root().unwrap(), options)
    }

    fn csr(uris: &[&str]) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        for u in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(u.to_string().try_into().unwrap()));
        }
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn lifetimes_are_the_default_or_what_is_asked_within_the_bounds() {
        let m = ca(MeshCaOptions::new(CaSource::Dir("/nonexistent".into())));
        assert_eq!(m.ttl_for(None), DEFAULT_WORKLOAD_CERT_TTL);
        assert_eq!(m.ttl_for(Some(3600)), Duration::from_secs(3600));
        assert_eq!(
            m.ttl_for(Some(10 * 24 * 3600)),
            DEFAULT_MAX_WORKLOAD_CERT_TTL
        );
        assert_eq!(m.ttl_for(Some(0)), MIN_WORKLOAD_CERT_TTL);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let id = m.identity_of("shop", "a").unwrap();
        assert_eq!(id, "spiffe://cluster.local/ns/shop/sa/a");
        let issued = m
            .issue(
                &CertificateRequest {
                    csr_pem: csr(&[]),
                    ttl_seconds: Some(30 * 24 * 3600),
                },
                Some(&id),
            )
            .unwrap();
        let left = issued.expires_at_unix - now;
        assert!((48 * 3600 - 5..=48 * 3600 + 5).contains(&left), "{left}");
    }

    #[test]
    fn settings_that_contradict_each_other_are_refused() {
        let mut o = MeshCaOptions::new(CaSource::Dir("/x".into()));
        o.validate().unwrap();
        o.workload_cert_ttl = Duration::from_secs(72 * 3600);
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-workload-cert-ttl")
        );
        o.workload_cert_ttl = Duration::from_secs(30);
        assert!(o.validate().unwrap_err().to_string().contains("1m"));
        o.workload_cert_ttl = DEFAULT_WORKLOAD_CERT_TTL;
        o.trust_domain = "Example.COM/x".into();
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("--trust-domain")
        );
    }

    #[test]
    fn without_a_proven_identity_only_the_insecure_mode_issues_and_only_what_the_csr_names() {
        let mut o = MeshCaOptions::new(CaSource::Dir("/x".into()));
        o.insecure_issue_requested_identity = true;
        o.trust_domain = "example.org".into();
        let m = ca(o);
        let req = |uris: &[&str]| CertificateRequest {
            csr_pem: csr(uris),
            ttl_seconds: None,
        };
        let ok = m
            .issue(&req(&["spiffe://example.org/ns/a/sa/b"]), None)
            .unwrap();
        assert_eq!(ok.identity, "spiffe://example.org/ns/a/sa/b");
        for bad in [
            &[][..],
            &["spiffe://cluster.local/ns/a/sa/b"][..],
            &[
                "spiffe://example.org/ns/a/sa/b",
                "spiffe://example.org/ns/a/sa/c",
            ][..],
        ] {
            let (kind, why) = m.issue(&req(bad), None).unwrap_err();
            assert_eq!(kind, Refused::BadRequest, "{bad:?}: {why}");
            assert!(why.contains("spiffe://example.org/"), "{why}");
        }
    }

    #[test]
    fn a_secret_in_the_wrong_layout_is_refused_naming_the_key() {
        let m = ca(MeshCaOptions::new(CaSource::Dir("/x".into())));
        let mut s = secret("mesh-system", &m.authority().plugin_files());
        let back = from_secret(&s, "mesh-system", MESH_CA_SECRET).unwrap();
        assert_eq!(
            back.signing_root_sha256(),
            m.mesh_identity().signing_root_sha256
        );
        s.data.as_mut().unwrap().remove("ca-key.pem");
        let e = from_secret(&s, "mesh-system", "cacerts")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Secret mesh-system/cacerts has no key ca-key.pem"),
            "{e}"
        );
    }
}
