//! The webhook's serving certificate: a CA and a serving certificate made by `mesh_tls::ca` at
//! install time, stored in the Secret `meshd-webhook-tls` (`ca.crt`, `tls.crt`, `tls.key`).
//! An existing Secret is kept while it is complete, names the same hosts and has more than
//! 30 days left, so a second install changes nothing.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use mesh_tls::ca::{CaError, ServingSpec, Validity, serving_certificate};
use rcgen::KeyPair;

use super::values::{MeshValues, NAMESPACE, WebhookMode, url_host};

pub const SECRET_NAME: &str = "meshd-webhook-tls";
pub const ANN_DNS_NAMES: &str = "install.meshctl.io/dns-names";
pub const ANN_NOT_AFTER: &str = "install.meshctl.io/not-after";
/// Certificates are valid this many years.
const YEARS: i64 = 5;
const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub dns_names: Vec<String>,
    /// `YYYY-MM-DDT00:00:00Z`.
    pub not_after: String,
}

/// Names the serving certificate must carry for these values.
pub fn required_names(values: &MeshValues) -> Vec<String> {
    let svc = format!("meshd.{NAMESPACE}.svc");
    let mut names = vec![
        format!("{svc}.cluster.local"),
        svc,
        format!("meshd.{NAMESPACE}"),
    ];
    if values.webhook.mode == WebhookMode::Url
        && let Ok(h) = url_host(&values.webhook.url)
        && !names.contains(&h)
    {
        names.push(h);
    }
    names
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn today() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    secs.div_euclid(86_400)
}

fn parse_date(s: &str) -> Option<i64> {
    let d = s.get(..10)?;
    let mut it = d.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, dd) = (it.next()??, it.next()??, it.next()??);
    Some(days_from_civil(y, m, dd))
}

/// A fresh CA and serving certificate for `names`, valid from yesterday's midnight (UTC)
/// for five years, to the day.
pub fn generate(names: &[String]) -> Result<WebhookTls, CaError> {
    let midnight = |days: i64| UNIX_EPOCH + Duration::from_secs((days.max(0) * 86_400) as u64);
    let end = today() + YEARS * 365;
    let (ay, am, ad) = civil_from_days(end);
    let tls = serving_certificate(&ServingSpec {
        ca_name: "meshctl webhook CA",
        ca_path_len: Some(0),
        common_name: &format!("meshd.{NAMESPACE}.svc"),
        sans: names,
        validity: Some(Validity {
            not_before: midnight(today() - 1),
            not_after: midnight(end),
        }),
    })?;
    Ok(WebhookTls {
        ca_pem: tls.ca_pem,
        cert_pem: tls.cert_pem,
        key_pem: tls.key_pem,
        dns_names: names.to_vec(),
        not_after: format!("{ay:04}-{am:02}-{ad:02}T00:00:00Z"),
    })
}

/// Read a Secret's annotations and data (base64-decoded); `Some` when it can be reused for
/// `names`.
pub fn reuse(
    annotations: &BTreeMap<String, String>,
    data: &BTreeMap<String, Vec<u8>>,
    names: &[String],
) -> Option<WebhookTls> {
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.clone()).ok())
            .filter(|s| !s.trim().is_empty())
    };
    let (ca_pem, cert_pem, key_pem) = (text("ca.crt")?, text("tls.crt")?, text("tls.key")?);
    let dns_names: Vec<String> = annotations
        .get(ANN_DNS_NAMES)?
        .split(',')
        .map(str::to_owned)
        .collect();
    if dns_names != names {
        return None;
    }
    let not_after = annotations.get(ANN_NOT_AFTER)?.clone();
    if parse_date(&not_after)? - today() < RENEW_BEFORE_DAYS {
        return None;
    }
    // The PEMs must parse and the key must be usable.
    let mut rd = ca_pem.as_bytes();
    rustls_pemfile::certs(&mut rd).next()?.ok()?;
    let mut rd = cert_pem.as_bytes();
    rustls_pemfile::certs(&mut rd).next()?.ok()?;
    KeyPair::from_pem(&key_pem).ok()?;
    Some(WebhookTls {
        ca_pem,
        cert_pem,
        key_pem,
        dns_names,
        not_after,
    })
}

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        for z in [-1000, 0, 19000, 20500, 30000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(parse_date("2000-03-01T00:00:00Z"), Some(11017));
    }

    #[test]
    fn generated_tls_is_reused_only_when_it_fits() {
        let names = vec!["meshd.mesh-system.svc".to_string(), "10.0.0.1".to_string()];
        let tls = generate(&names).unwrap();
        assert!(tls.ca_pem.contains("BEGIN CERTIFICATE"));
        let ann: BTreeMap<_, _> = [
            (ANN_DNS_NAMES.to_string(), names.join(",")),
            (ANN_NOT_AFTER.to_string(), tls.not_after.clone()),
        ]
        .into();
        let data: BTreeMap<_, _> = [
            ("ca.crt".to_string(), tls.ca_pem.clone().into_bytes()),
            ("tls.crt".to_string(), tls.cert_pem.clone().into_bytes()),
            ("tls.key".to_string(), tls.key_pem.clone().into_bytes()),
        ]
        .into();
        assert_eq!(reuse(&ann, &data, &names), Some(tls.clone()));
        assert_eq!(reuse(&ann, &data, &names[..1]), None, "other names");
        let mut old = ann.clone();
        old.insert(ANN_NOT_AFTER.into(), "2001-01-01T00:00:00Z".into());
        assert_eq!(reuse(&old, &data, &names), None, "expiring");
        let mut broken = data.clone();
        broken.insert("tls.key".into(), b"junk".to_vec());
        assert_eq!(reuse(&ann, &broken, &names), None, "bad key");
        // The serving cert works with the webhook's TLS loader.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c"), &tls.cert_pem).unwrap();
        std::fs::write(dir.path().join("k"), &tls.key_pem).unwrap();
        crate::webhook::tls::CertStore::load(dir.path().join("c"), dir.path().join("k")).unwrap();
    }
}
