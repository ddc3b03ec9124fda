//! AdmissionReviews for the webhook benchmark, and its TLS material.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};

const WALKTHROUGH_DEPLOYMENTS: &str = include_str!("../../tests/inject/seed-deployment.yaml");

/// The pod of the walkthrough's first Deployment (`myapp-v1`).
pub fn walkthrough_pod() -> anyhow::Result<Value> {
    let doc = mesh_translate::split_yaml_stream(WALKTHROUGH_DEPLOYMENTS)
        .into_iter()
        .find(|d| d.text.contains("kind: Deployment"))
        .context("no Deployment in tests/inject/seed-deployment.yaml")?;
    let d: Value = serde_saphyr::from_str(&doc.text).with_context(|| {
        format!(
            "parsing the Deployment of tests/inject/seed-deployment.yaml (line {})",
            doc.line
        )
    })?;
    let t = &d["spec"]["template"];
    Ok(json!({"apiVersion": "v1", "kind": "Pod", "metadata": t["metadata"], "spec": t["spec"]}))
}

/// A pod with `n` containers.
pub fn pod_with(n: usize) -> Value {
    let cs: Vec<_> = (0..n)
        .map(|i| {
            json!({"name": format!("c{i}"), "image": "app:1",
                   "ports": [{"containerPort": 8000 + i}],
                   "env": [{"name": "INDEX", "value": i.to_string()}]})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "big-", "namespace": "demo", "labels": {"app": "big"}},
           "spec": {"containers": cs}})
}

/// An AdmissionReview (CREATE) of `pod` in `namespace`, as the API server sends it.
pub fn review_for(pod: &Value, namespace: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// Writes a serving certificate for `localhost` and the CA that signed it (what the load
/// client trusts).
pub fn write_cert(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<()> {
    let tls = mesh_tls::ca::serving_certificate(&mesh_tls::ca::ServingSpec {
        ca_name: "mesh-bench webhook CA",
        ca_path_len: Some(0),
        common_name: "localhost",
        sans: &["localhost".to_string()],
        validity: None,
    })?;
    std::fs::write(cert, tls.cert_pem)?;
    std::fs::write(key, tls.key_pem)?;
    std::fs::write(ca, tls.ca_pem)?;
    Ok(())
}

/// A client config trusting exactly `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let ders = rustls_certs(ca_pem)?;
    for d in ders {
        roots.add(d)?;
    }
    let provider = mesh_tls::provider();
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

fn rustls_certs(pem: &[u8]) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("reading the CA PEM")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_walkthrough_pod_is_the_first_deployments_template() {
        let pod = super::walkthrough_pod().unwrap();
        assert_eq!(pod["kind"], "Pod");
        assert_eq!(pod["metadata"]["labels"]["version"], "v1");
        assert_eq!(pod["spec"]["containers"][0]["name"], "myapp");
    }
}
