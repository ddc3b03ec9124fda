//! One mesh hop: client → proxy A → proxy B → backend, in plaintext or with mutual TLS between
//! A and B (A originates it, B terminates it), for mesh-proxy and for Envoy. The workload
//! certificates are the mesh CA's (`mesh_tls::ca`), written in Istio's file layout, which both
//! proxies read as they are (plain X.509 with a URI SAN).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use mesh_config as c;
use mesh_tls::ca::CertificateAuthority;
use mesh_tls::workload::{FILE_CERT_CHAIN, FILE_KEY, FILE_ROOT_CERT};

use crate::configs::{self, Scenario};

/// Proxy A's workload identity (the caller).
pub const ID_A: &str = "spiffe://cluster.local/ns/bench/sa/a";
/// Proxy B's workload identity (the callee, which A verifies).
pub const ID_B: &str = "spiffe://cluster.local/ns/bench/sa/b";

/// The two workload certificate directories (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
#[derive(Debug, Clone)]
pub struct Certs {
    pub a: PathBuf,
    pub b: PathBuf,
}

/// Makes a mesh CA and A's and B's workload certificates under `dir` (`dir/a`, `dir/b`). Each
/// key is made here and only its CSR goes to the CA, as a proxy would do; the certificates
/// carry only the URI SAN the CA puts in.
pub fn write_certs(dir: &Path) -> anyhow::Result<Certs> {
    let ca = CertificateAuthority::generate_root().context("generating the mesh CA")?;
    let mut dirs = Vec::new();
    for (name, id) in [("a", ID_A), ("b", ID_B)] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        // Long enough for any run; the benchmark makes new ones every time.
        let issued = ca
            .sign_workload(&csr, id, Duration::from_secs(24 * 3600))
            .with_context(|| format!("signing {id}"))?;
        std::fs::write(d.join(FILE_CERT_CHAIN), &issued.cert_chain_pem)?;
        std::fs::write(d.join(FILE_ROOT_CERT), &issued.trust_bundle_pem)?;
        write_private(&d.join(FILE_KEY), &key.serialize_pem())?;
        dirs.push(d);
    }
    let b = dirs.pop().expect("two directories");
    let a = dirs.pop().expect("two directories");
    Ok(Certs { a, b })
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

/// Whether B ends every A↔B connection after one response, so that A opens a new one (and, with
/// mutual TLS, makes a full handshake) for every request: the new-connection phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// Connections between A and B are kept alive and pooled (the latency and CPU phases).
    KeepAlive,
    /// B answers every request with `Connection: close` and closes.
    CloseEach,
}

/// mesh-proxy A: a gateway listener on `port` whose one route goes to backend `b` at
/// `127.0.0.1:b_port`, reached over mutual TLS as [`ID_B`] when `mtls`.
pub fn mesh_a(port: u16, b_port: u16, mtls: bool) -> c::ProxyConfig {
    let mut cfg = configs::mesh(Scenario::Plain, port, [b_port, b_port]);
    cfg.version = "bench-hop-a".into();
    cfg.listeners[0].name = "bench/hop-a".into();
    for b in &mut cfg.backends {
        b.name = "b".into();
        if mtls {
            b.mtls_identities
                .insert(format!("127.0.0.1:{b_port}"), ID_B.to_string());
        }
    }
    retarget(&mut cfg, "b");
    cfg
}

/// mesh-proxy B: a gateway listener on `port` (mutual TLS only when `mtls`) whose one route
/// goes to the backend at `127.0.0.1:origin`. With [`Upstream::CloseEach`] the route sets
/// `Connection: close` on its responses, which ends the connection once the response is
/// written.
pub fn mesh_b(port: u16, origin: u16, mtls: bool, upstream: Upstream) -> c::ProxyConfig {
    let mut cfg = configs::mesh(Scenario::Plain, port, [origin, origin]);
    cfg.version = "bench-hop-b".into();
    cfg.listeners[0].name = "bench/hop-b".into();
    if mtls {
        cfg.listeners[0].mtls = Some(c::InboundMtls {
            mode: c::MtlsMode::Strict,
            ports: Default::default(),
        });
    }
    if upstream == Upstream::CloseEach {
        for vh in &mut cfg.listeners[0].virtual_hosts {
            for r in &mut vh.routes {
                r.filters
                    .push(c::Filter::ResponseHeaderModifier(c::HeaderModifier {
                        set: vec![c::HeaderValue {
                            name: "Connection".into(),
                            value: "close".into(),
                        }],
                        add: vec![],
                        remove: vec![],
                    }));
            }
        }
    }
    cfg
}

/// Points every route of `cfg` at backend `name` (the plain route names `myapp-v1`).
fn retarget(cfg: &mut c::ProxyConfig, name: &str) {
    for l in &mut cfg.listeners {
        for vh in &mut l.virtual_hosts {
            for r in &mut vh.routes {
                if let c::RouteAction::Forward(f) = &mut r.action {
                    for wb in &mut f.backends {
                        wb.target = c::BackendTarget::Backend(name.into());
                    }
                }
            }
        }
    }
}

/// TLS settings both Envoys share, matching what mesh-proxy speaks between proxies: TLS 1.3
/// only, the hybrid post-quantum key exchange mesh-proxy prefers (X25519MLKEM768), the
/// workload certificate of `dir`, peers verified against its root.
fn envoy_common_tls(dir: &Path, indent: &str, san: Option<&str>) -> String {
    let f = |name: &str| dir.join(name).display().to_string();
    let mut s = format!(
        "{indent}common_tls_context:\n\
         {indent}  tls_params:\n\
         {indent}    tls_minimum_protocol_version: TLSv1_3\n\
         {indent}    tls_maximum_protocol_version: TLSv1_3\n\
         {indent}    ecdh_curves: [X25519MLKEM768]\n\
         {indent}  tls_certificates:\n\
         {indent}  - certificate_chain: {{filename: \"{}\"}}\n\
         {indent}    private_key: {{filename: \"{}\"}}\n\
         {indent}  validation_context:\n\
         {indent}    trusted_ca: {{filename: \"{}\"}}\n",
        f(FILE_CERT_CHAIN),
        f(FILE_KEY),
        f(FILE_ROOT_CERT),
    );
    if let Some(san) = san {
        s.push_str(&format!(
            "{indent}    match_typed_subject_alt_names:\n\
             {indent}    - san_type: URI\n\
             {indent}      matcher: {{exact: \"{san}\"}}\n"
        ));
    }
    s
}

/// Envoy A: plaintext HTTP/1 listener on `port`, one route to cluster `b` at `b_port`, with
/// static mutual TLS to it when `certs` is set (client certificate, B's chain verified against
/// the root and its URI SAN matched to [`ID_B`]; no session resumption, as mesh-proxy).
pub fn envoy_a(port: u16, b_port: u16, certs: Option<&Path>) -> String {
    let tls = match certs {
        None => String::new(),
        Some(dir) => format!(
            "    transport_socket:\n\
             \x20     name: envoy.transport_sockets.tls\n\
             \x20     typed_config:\n\
             \x20       \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n\
             \x20       max_session_keys: 0\n\
             {}",
            envoy_common_tls(dir, "        ", Some(ID_B))
        ),
    };
    envoy_listener(port, "b", b_port, "", "", &tls)
}

/// Envoy B: HTTP/1 listener on `port` (static mutual TLS when `certs` is set: client
/// certificate required and verified against the root, no session resumption; the caller's
/// identity appended to `X-Forwarded-Client-Cert`, as mesh-proxy does), one route to the
/// backend at `origin`. With [`Upstream::CloseEach`] every downstream connection serves one
/// request (`max_requests_per_connection: 1`: Envoy answers with `Connection: close` and
/// closes).
pub fn envoy_b(port: u16, origin: u16, certs: Option<&Path>, upstream: Upstream) -> String {
    let mut hcm = String::new();
    let mut listener_tls = String::new();
    if let Some(dir) = certs {
        hcm.push_str(
            "          forward_client_cert_details: APPEND_FORWARD\n\
             \x20         set_current_client_cert_details: {uri: true}\n",
        );
        listener_tls = format!(
            "      transport_socket:\n\
             \x20       name: envoy.transport_sockets.tls\n\
             \x20       typed_config:\n\
             \x20         \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n\
             \x20         require_client_certificate: true\n\
             \x20         disable_stateless_session_resumption: true\n\
             \x20         disable_stateful_session_resumption: true\n\
             {}",
            envoy_common_tls(dir, "          ", None)
        );
    }
    if upstream == Upstream::CloseEach {
        hcm.push_str("          common_http_protocol_options: {max_requests_per_connection: 1}\n");
    }
    envoy_listener(port, "origin", origin, &hcm, &listener_tls, "")
}

/// A static bootstrap: one HTTP/1 listener, one route, one cluster (no access log, no
/// tracing, no admin).
fn envoy_listener(
    port: u16,
    cluster: &str,
    cluster_port: u16,
    hcm_extra: &str,
    listener_tls: &str,
    cluster_tls: &str,
) -> String {
    format!(
        "static_resources:\n\
         \x20 listeners:\n\
         \x20 - name: bench_hop\n\
         \x20   address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n\
         \x20   filter_chains:\n\
         \x20   - filters:\n\
         \x20     - name: envoy.filters.network.http_connection_manager\n\
         \x20       typed_config:\n\
         \x20         \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
         \x20         stat_prefix: hop\n\
         \x20         codec_type: HTTP1\n\
         {hcm_extra}\
         \x20         route_config:\n\
         \x20           name: bench\n\
         \x20           virtual_hosts:\n\
         \x20           - name: bench\n\
         \x20             domains: [\"*\"]\n\
         \x20             routes:\n\
         \x20             - match: {{prefix: \"/\"}}\n\
         \x20               route: {{cluster: {cluster}}}\n\
         \x20         http_filters:\n\
         \x20         - name: envoy.filters.http.router\n\
         \x20           typed_config:\n\
         \x20             \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n\
         {listener_tls}\
         \x20 clusters:\n\
         \x20 - name: {cluster}\n\
         \x20   type: STATIC\n\
         \x20   connect_timeout: 5s\n\
         \x20   load_assignment:\n\
         \x20     cluster_name: {cluster}\n\
         \x20     endpoints:\n\
         \x20     - lb_endpoints:\n\
         \x20       - endpoint:\n\
         \x20           address: {{socket_address: {{address: 127.0.0.1, port_value: {cluster_port}}}}}\n\
         {cluster_tls}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn workload_certificates_carry_only_their_spiffe_id_and_chain_to_one_root() {
        let d = tmp("certs");
        let certs = write_certs(&d).unwrap();
        for (dir, id) in [(&certs.a, ID_A), (&certs.b, ID_B)] {
            let chain = std::fs::read_to_string(dir.join(FILE_CERT_CHAIN)).unwrap();
            let root = std::fs::read_to_string(dir.join(FILE_ROOT_CERT)).unwrap();
            assert_eq!(
                mesh_tls::ca::verify_workload_chain(&chain, &root).unwrap(),
                [id]
            );
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let leaf = CertificateDer::pem_slice_iter(chain.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            assert_eq!(
                mesh_tls::ca::subject_alt_names(&leaf),
                [format!("URI:{id}")]
            );
            // The proxy's own loader takes the directory as it is.
            mesh_tls::WorkloadCertificates::new(None)
                .install_dir(dir)
                .unwrap();
            let mode = std::fs::metadata(dir.join(FILE_KEY)).unwrap();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        }
        // One CA for both: each trusts the other's chain.
        assert_eq!(
            std::fs::read_to_string(certs.a.join(FILE_ROOT_CERT)).unwrap(),
            std::fs::read_to_string(certs.b.join(FILE_ROOT_CERT)).unwrap()
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn mesh_pair_configs_validate_and_name_mtls_where_asked() {
        let a = mesh_a(1000, 2000, true);
        a.validate().unwrap();
        assert_eq!(a.backends.len(), 1);
        assert_eq!(a.backends[0].endpoints, ["127.0.0.1:2000"]);
        assert_eq!(a.backends[0].mtls_identities["127.0.0.1:2000"], ID_B);
        assert!(
            mesh_a(1000, 2000, false).backends[0]
                .mtls_identities
                .is_empty()
        );

        let b = mesh_b(2000, 3000, true, Upstream::KeepAlive);
        b.validate().unwrap();
        assert_eq!(
            b.listeners[0].mtls.as_ref().map(|m| m.mode),
            Some(c::MtlsMode::Strict)
        );
        assert!(b.listeners[0].virtual_hosts[0].routes[0].filters.is_empty());
        let closing = mesh_b(2000, 3000, false, Upstream::CloseEach);
        closing.validate().unwrap();
        assert!(closing.listeners[0].mtls.is_none());
        assert_eq!(
            closing.listeners[0].virtual_hosts[0].routes[0]
                .filters
                .len(),
            1
        );
    }

    #[test]
    fn envoy_pair_configs_are_yaml_with_tls_where_asked() {
        let dir = Path::new("/certs/a");
        let parse = |s: &str| -> serde_json::Value {
            serde_saphyr::from_str(s).unwrap_or_else(|e| panic!("{e}\n{s}"))
        };
        let a = parse(&envoy_a(1000, 2000, Some(dir)));
        let tls = &a["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(tls["max_session_keys"], 0);
        let ctx = &tls["common_tls_context"];
        assert_eq!(
            ctx["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            ID_B
        );
        assert_eq!(
            ctx["tls_certificates"][0]["private_key"]["filename"],
            "/certs/a/key.pem"
        );
        assert_eq!(ctx["tls_params"]["tls_minimum_protocol_version"], "TLSv1_3");
        let plain_a = parse(&envoy_a(1000, 2000, None));
        assert!(plain_a["static_resources"]["clusters"][0]["transport_socket"].is_null());

        let b = parse(&envoy_b(2000, 3000, Some(dir), Upstream::CloseEach));
        let chain = &b["static_resources"]["listeners"][0]["filter_chains"][0];
        let tls = &chain["transport_socket"]["typed_config"];
        assert_eq!(tls["require_client_certificate"], true);
        let hcm = &chain["filters"][0]["typed_config"];
        assert_eq!(
            hcm["common_http_protocol_options"]["max_requests_per_connection"],
            1
        );
        assert_eq!(hcm["codec_type"], "HTTP1");
        assert_eq!(
            b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
                [0]["endpoint"]["address"]["socket_address"]["port_value"],
            3000
        );
        let plain_b = parse(&envoy_b(2000, 3000, None, Upstream::KeepAlive));
        let chain = &plain_b["static_resources"]["listeners"][0]["filter_chains"][0];
        assert!(chain["transport_socket"].is_null());
        assert!(chain["filters"][0]["typed_config"]["common_http_protocol_options"].is_null());
    }
}
