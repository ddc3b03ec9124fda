//! `meshctl demo`'s security part: what the mesh adds between two apps once each has its own
//! sidecar. An in-process mesh CA (a fresh self-signed root, as the control plane makes when
//! it finds no `mesh-ca-secret`) gives two of the walkthrough's apps their workload
//! identities, and each app gets a real `mesh-proxy` sidecar in this process. The client app's
//! sidecar takes its plaintext requests on loopback and opens mutual TLS to the server app's
//! sidecar, whose inbound port is STRICT and which tells the app who called in
//! `X-Forwarded-Client-Cert`.
//!
//! Without root there is no traffic capture (`mesh-proxy redirect`), so each sidecar serves an
//! explicit listener instead of the captured 15001/15006: the client app dials its sidecar's
//! outbound listener, and the server sidecar's listener takes mutual TLS exactly as a captured
//! inbound port does (`Listener.mtls`). Everything shown is measured on real sockets.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use mesh_config::identity::DEFAULT_TRUST_DOMAIN;
use mesh_proxy::config::ProxyConfig;
use mesh_proxy::{Proxy, ProxyHandle, ProxyOptions};
use mesh_tls::ca::CertificateAuthority;
use mesh_tls::issuer::InProcessIssuer;
use mesh_tls::{SpiffeId, WorkloadCertificates};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::app::WHOAMI_PATH;
use super::{DemoError, NAMESPACE, get};

/// How long the demo's workload certificates live: far longer than the demo runs, so nothing
/// needs renewing while it does.
const CERTIFICATE_TTL: Duration = Duration::from_secs(3600);

/// How long a handshake or a plaintext client waits for the server sidecar. A refusal is
/// immediate; this only bounds the demo if something is wrong.
const WAIT: Duration = Duration::from_secs(5);

/// What the security part measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityReport {
    /// The client app's identity, as the mesh CA issued it.
    pub client_id: String,
    /// The server app's identity, as the mesh CA issued it.
    pub server_id: String,
    /// Status of the client app's plaintext GET through its own sidecar.
    pub through_sidecar_status: u16,
    /// The `X-Forwarded-Client-Cert` the server app received (`None`: none).
    pub xfcc: Option<String>,
    /// `URI=` of that header: the caller's identity, as the server app learnt it.
    pub client_id_seen: Option<String>,
    /// `By=` of that header: the identity the server's sidecar received the call as.
    pub server_id_seen: Option<String>,
    /// Whether `Hash=` of that header is the SHA-256 of the client sidecar's certificate.
    pub xfcc_hash_is_client_certificate: bool,
    /// The identity the client's sidecar requires the server's sidecar to prove (its config).
    pub server_id_required: String,
    /// The identity in the certificate the server's sidecar presented.
    pub server_id_presented: String,
    /// TLS version the sidecars negotiated, e.g. `TLSv1.3`.
    pub tls_version: String,
    /// Key-exchange group the sidecars negotiated, e.g. `X25519MLKEM768`.
    pub key_exchange_group: String,
    /// What a plaintext client sent straight to the server's sidecar got.
    pub plaintext_direct: PlaintextAnswer,
}

/// What a plaintext HTTP client got from a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaintextAnswer {
    /// The connection was closed (or reset) without a byte of response.
    Refused,
    /// A response came back; its status line.
    Answered(String),
    /// The connection stayed open and silent for the whole wait.
    NoAnswer,
}

impl PlaintextAnswer {
    fn describe(&self) -> String {
        match self {
            PlaintextAnswer::Refused => "refused: connection closed, no response".to_string(),
            PlaintextAnswer::Answered(line) => format!("answered: {line}"),
            PlaintextAnswer::NoAnswer => {
                format!("no answer within {}s, connection left open", WAIT.as_secs())
            }
        }
    }
}

/// One app of the security part: the app, its identity and its sidecar.
struct Workload {
    service: &'static str,
    id: SpiffeId,
    certs: Arc<WorkloadCertificates>,
    sidecar: ProxyHandle,
    /// The sidecar's listener the part talks to.
    listener: SocketAddr,
}

fn identity(service_account: &str) -> SpiffeId {
    SpiffeId::new(DEFAULT_TRUST_DOMAIN, NAMESPACE, service_account)
}

/// A key made here and a certificate for `id` from `ca`, as a sidecar gets them from the
/// control plane.
async fn certificates(
    ca: &Arc<Mutex<CertificateAuthority>>,
    id: &SpiffeId,
) -> Result<Arc<WorkloadCertificates>, DemoError> {
    let certs = WorkloadCertificates::new(None);
    let issuer = InProcessIssuer::new(ca.clone(), id.to_string(), CERTIFICATE_TTL);
    certs
        .renew_once(&issuer)
        .await
        .map_err(|message| DemoError::Certificate {
            id: id.to_string(),
            message,
        })?;
    Ok(certs)
}

fn sidecar_config(value: serde_json::Value) -> Result<ProxyConfig, DemoError> {
    serde_json::from_value(value).map_err(|e| DemoError::SidecarConfig(e.to_string()))
}

/// The server app's sidecar: one listener that takes only mutual TLS from the mesh (STRICT)
/// and forwards to the app.
fn server_sidecar_config(service: &str, app: SocketAddr) -> Result<ProxyConfig, DemoError> {
    sidecar_config(json!({
        "listeners": [{
            "name": format!("{NAMESPACE}/{service}/inbound"),
            "port": 0,
            "mtls": {"mode": "STRICT"},
            "virtualHosts": [{"name": service, "hostnames": ["*"], "routes": [{
                "name": "app",
                "match": {},
                "action": {"type": "forward",
                    "backends": [{"target": {"backend": service}, "weight": 1}]},
            }]}],
        }],
        "backends": [{"name": service, "endpoints": [app.to_string()]}],
    }))
}

/// The client app's sidecar: a plain listener on loopback whose route goes to the server's
/// sidecar, a meshed endpoint that must prove `server_id`.
fn client_sidecar_config(
    service: &str,
    server_service: &str,
    server_sidecar: SocketAddr,
    server_id: &SpiffeId,
) -> Result<ProxyConfig, DemoError> {
    sidecar_config(json!({
        "listeners": [{
            "name": format!("{NAMESPACE}/{service}/outbound"),
            "port": 0,
            "virtualHosts": [{"name": server_service, "hostnames": ["*"], "routes": [{
                "name": server_service,
                "match": {},
                "action": {"type": "forward",
                    "backends": [{"target": {"backend": server_service}, "weight": 1}]},
            }]}],
        }],
        "backends": [{
            "name": server_service,
            "endpoints": [server_sidecar.to_string()],
            "mtlsIdentities": {server_sidecar.to_string(): server_id.to_string()},
        }],
    }))
}

async fn start_sidecar(
    service: &'static str,
    id: SpiffeId,
    certs: Arc<WorkloadCertificates>,
    config: ProxyConfig,
) -> Result<Workload, DemoError> {
    let sidecar = Proxy::start(
        config,
        ProxyOptions {
            bind_address: [127, 0, 0, 1].into(),
            identity: Some(certs.clone()),
            ..ProxyOptions::default()
        },
    )
    .await?;
    let listener = sidecar
        .listeners()
        .await
        .first()
        .map(|l| l.address)
        .ok_or(DemoError::NoSidecarListener(service))?;
    Ok(Workload {
        service,
        id,
        certs,
        sidecar,
        listener,
    })
}

/// The fields of the last element of an `X-Forwarded-Client-Cert` value (the one the nearest
/// proxy appended), in Envoy's format: `Key=value` pairs separated by `;`, elements by `,`,
/// values possibly quoted.
fn xfcc_fields(value: &str) -> Vec<(String, String)> {
    let mut elements = vec![Vec::new()];
    let mut field = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                field.push(c);
            }
            ';' | ',' if !quoted => {
                let element = elements.last_mut().expect("one element at least");
                element.push(std::mem::take(&mut field));
                if c == ',' {
                    elements.push(Vec::new());
                }
            }
            _ => field.push(c),
        }
    }
    elements
        .last_mut()
        .expect("one element at least")
        .push(field);
    elements
        .pop()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| {
            let (key, value) = f.trim().split_once('=')?;
            let value = value.strip_prefix('"').unwrap_or(value);
            let value = value.strip_suffix('"').unwrap_or(value);
            Some((key.to_string(), value.to_string()))
        })
        .collect()
}

fn xfcc_field(fields: &[(String, String)], key: &str) -> Option<String> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
}

/// SHA-256 of the leaf certificate `certs` holds (what `Hash=` of the XFCC is).
fn leaf_sha256(certs: &WorkloadCertificates) -> Option<String> {
    let info = certs.info()?;
    let leaf = rustls_pemfile::certs(&mut info.chain_pem.as_bytes()).next()?;
    leaf.ok().map(|der| mesh_tls::ca::sha256_hex(der.as_ref()))
}

/// What the sidecars agree on: one handshake to the server's sidecar made the way the client's
/// sidecar makes them (`mesh_proxy::mtls::connect`, with the client's own certificates and the
/// identity it requires).
struct Negotiated {
    version: String,
    group: String,
    presented: String,
}

async fn negotiate(
    server: SocketAddr,
    certs: &WorkloadCertificates,
    expected: &SpiffeId,
) -> Result<Negotiated, DemoError> {
    let fail = |message: String| DemoError::Handshake { server, message };
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(server))
        .await
        .map_err(|_| fail(format!("no connection within {}s", WAIT.as_secs())))?
        .map_err(|e| fail(e.to_string()))?;
    let mut tls = mesh_proxy::mtls::connect(tcp, certs, expected, WAIT)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let connection = tls.get_ref().1;
    let version = match connection.protocol_version() {
        Some(mesh_tls::rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(mesh_tls::rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => return Err(fail("no protocol version after the handshake".into())),
    };
    let group = connection
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .ok_or_else(|| fail("no key-exchange group after the handshake".into()))?;
    let presented = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| fail("the server presented no certificate".into()))
        .and_then(|leaf| mesh_tls::identity::identity_of(leaf).map_err(|e| fail(e.to_string())))?
        .to_string();
    // A clean close (close_notify), so the server sidecar sees a finished connection.
    let _ = tls.shutdown().await;
    Ok(Negotiated {
        version,
        group,
        presented,
    })
}

/// A plaintext HTTP request sent straight to `addr`, claiming an identity in its own
/// `X-Forwarded-Client-Cert`, and what came back.
async fn plaintext_request(
    addr: SocketAddr,
    claimed_id: &str,
) -> Result<PlaintextAnswer, DemoError> {
    let fail = |message: String| DemoError::Request {
        url: format!("http://{addr}{WHOAMI_PATH}"),
        message,
    };
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let request = format!(
        "GET {WHOAMI_PATH} HTTP/1.1\r\nhost: {addr}\r\nx-forwarded-client-cert: URI={claimed_id}\r\nconnection: close\r\n\r\n"
    );
    // The sidecar may close before the whole request is written; that is its answer.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) if received.is_empty() => return Ok(PlaintextAnswer::NoAnswer),
            Err(_) => break,
        }
    }
    if received.is_empty() {
        return Ok(PlaintextAnswer::Refused);
    }
    let text = String::from_utf8_lossy(&received);
    Ok(PlaintextAnswer::Answered(
        text.lines().next().unwrap_or_default().to_string(),
    ))
}

/// The one line of the server sidecar's metrics that counts connections it refused.
fn refused_metric(sidecar: &ProxyHandle) -> Option<String> {
    sidecar
        .metrics()
        .encode()
        .lines()
        .find(|l| l.starts_with("mesh_mtls_connections_total{") && l.contains("refused"))
        .map(str::to_string)
}

/// One of the walkthrough's apps as the mesh sees it: its Service and its service account.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meshed {
    pub service: &'static str,
    pub service_account: &'static str,
}

/// Runs the security part with `client` calling `server` (the app at `server_app`), and prints
/// it to `out`.
pub(super) async fn run(
    client: Meshed,
    server: Meshed,
    server_app: SocketAddr,
    out: &mut impl Write,
) -> Result<SecurityReport, DemoError> {
    let (client_service, server_service) = (client.service, server.service);
    // The CA's root is made here, like every key of the mesh: where it is used.
    let ca = CertificateAuthority::generate_root().map_err(DemoError::Ca)?;
    let root_sha256 = ca.signing_root_sha256();
    let ca = Arc::new(Mutex::new(ca));
    let client_id = identity(client.service_account);
    let server_id = identity(server.service_account);

    let server_certs = certificates(&ca, &server_id).await?;
    let server = start_sidecar(
        server_service,
        server_id.clone(),
        server_certs,
        server_sidecar_config(server_service, server_app)?,
    )
    .await?;
    let client_certs = certificates(&ca, &client_id).await?;
    let client = start_sidecar(
        client_service,
        client_id.clone(),
        client_certs,
        client_sidecar_config(client_service, server_service, server.listener, &server_id)?,
    )
    .await?;

    writeln!(
        out,
        "\n8. mutual TLS: a mesh CA and two apps with sidecars of their own (still no cluster, no root)"
    )?;
    writeln!(
        out,
        "     mesh CA: a fresh self-signed root, sha256 {}",
        &root_sha256[..root_sha256.len().min(16)]
    )?;
    let width = client.id.to_string().len().max(server.id.to_string().len());
    writeln!(
        out,
        "     {:<9} {:<width$}  sidecar outbound http://{} (plaintext, loopback)",
        client.service,
        client.id.to_string(),
        client.listener
    )?;
    writeln!(
        out,
        "     {:<9} {:<width$}  sidecar inbound  {} (mutual TLS, STRICT) -> http://{server_app}",
        server.service,
        server.id.to_string(),
        server.listener
    )?;

    // The client app calls the server through its sidecar, in plaintext as apps do.
    writeln!(
        out,
        "9. {client_service} calls {server_service} through its sidecar: curl http://{}{WHOAMI_PATH}",
        client.listener
    )?;
    let (status, _, body) = get(client.listener, WHOAMI_PATH).await?;
    let body = String::from_utf8_lossy(&body);
    // Only the app's own answer carries what it received; anything else is the proxy's.
    let xfcc = (status == StatusCode::OK)
        .then(|| body.lines().last().map(str::to_string))
        .flatten()
        .filter(|l| !l.is_empty());
    let fields = xfcc.as_deref().map(xfcc_fields).unwrap_or_default();
    let client_id_seen = xfcc_field(&fields, "URI");
    let server_id_seen = xfcc_field(&fields, "By");
    let client_hash = leaf_sha256(&client.certs);
    let xfcc_hash_is_client_certificate =
        client_hash.is_some() && xfcc_field(&fields, "Hash") == client_hash;
    writeln!(
        out,
        "     {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )?;
    match &xfcc {
        _ if status != StatusCode::OK => writeln!(
            out,
            "     {}: the request did not reach {server_service}",
            body.trim()
        )?,
        Some(value) => {
            writeln!(
                out,
                "     {server_service} received X-Forwarded-Client-Cert: {value}"
            )?;
            writeln!(
                out,
                "       URI=  the caller:        {}",
                client_id_seen.as_deref().unwrap_or("(missing)")
            )?;
            writeln!(
                out,
                "       By=   itself:            {}",
                server_id_seen.as_deref().unwrap_or("(missing)")
            )?;
            writeln!(
                out,
                "       Hash= {client_service}'s certificate: {}",
                if xfcc_hash_is_client_certificate {
                    "yes"
                } else {
                    "no"
                }
            )?;
        }
        None => writeln!(
            out,
            "     {server_service} received no X-Forwarded-Client-Cert: it does not know who called"
        )?,
    }

    // The client's side: the identity its sidecar's config requires of the server...
    let server_id_required = client
        .sidecar
        .config()
        .backends
        .iter()
        .find_map(|b| b.mtls_identities.get(&server.listener.to_string()).cloned())
        .unwrap_or_default();
    // ...and what a handshake made exactly as that sidecar makes them negotiates.
    let negotiated = negotiate(server.listener, &client.certs, &server_id).await?;
    writeln!(
        out,
        "     {client_service}'s sidecar required {server_id_required} of the server; it presented {}",
        negotiated.presented
    )?;
    writeln!(
        out,
        "     the sidecars negotiated {}, key exchange {} (a handshake made as {client_service}'s sidecar makes them)",
        negotiated.version, negotiated.group
    )?;

    writeln!(
        out,
        "10. STRICT: a plaintext client dials {server_service}'s sidecar itself, claiming to be {client_service}"
    )?;
    writeln!(
        out,
        "     curl -H 'X-Forwarded-Client-Cert: URI={client_id}' http://{}{WHOAMI_PATH}",
        server.listener
    )?;
    let plaintext_direct = plaintext_request(server.listener, &client_id.to_string()).await?;
    writeln!(
        out,
        "     {} (through {client_service}'s sidecar: {})",
        plaintext_direct.describe(),
        status.as_u16()
    )?;
    if let Some(line) = refused_metric(&server.sidecar) {
        writeln!(out, "     {server_service}'s sidecar counted it: {line}")?;
    }

    client.sidecar.shutdown(Duration::from_secs(1)).await;
    server.sidecar.shutdown(Duration::from_secs(1)).await;
    Ok(SecurityReport {
        client_id: client_id.to_string(),
        server_id: server_id.to_string(),
        through_sidecar_status: status.as_u16(),
        xfcc,
        client_id_seen,
        server_id_seen,
        xfcc_hash_is_client_certificate,
        server_id_required,
        server_id_presented: negotiated.presented,
        tls_version: negotiated.version,
        key_exchange_group: negotiated.group,
        plaintext_direct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_element_of_an_xfcc_is_read_with_quotes() {
        let fields = xfcc_fields(
            "By=spiffe://a;URI=spiffe://x,By=spiffe://b;Hash=ab12;Subject=\"CN=x;O=y,z\";URI=spiffe://c",
        );
        assert_eq!(xfcc_field(&fields, "By").as_deref(), Some("spiffe://b"));
        assert_eq!(xfcc_field(&fields, "URI").as_deref(), Some("spiffe://c"));
        assert_eq!(
            xfcc_field(&fields, "Subject").as_deref(),
            Some("CN=x;O=y,z")
        );
        assert_eq!(xfcc_field(&fields, "Hash").as_deref(), Some("ab12"));
        assert!(xfcc_fields("").is_empty());
    }
}
