//! Root rotation of the mesh CA as control-plane state, and the control plane following its
//! CA Secrets while it runs.
//!
//! `meshctl ca rotate` only asks: it sets the phase annotation of Secret `mesh-ca-secret` to
//! `requested`. The control plane does the rest, one phase at a time, each recorded in the
//! Secret (annotations, and extra keys beside Istio's), so a rotation interrupted half-way
//! (a restarted control plane, a CLI that went away) resumes where it was:
//!
//! | phase | `ca-cert.pem`/`ca-key.pem` (signs) | `root-cert.pem` (trusted) | moves on when |
//! |---|---|---|---|
//! | `requested` | old | old | at once: a new root and key are generated here |
//! | `add` | old (new one in `next-ca-cert.pem`/`next-ca-key.pem`) | old + new | every proxy trusts both roots |
//! | `switch` | new | old + new | every proxy's certificate chains to the new root |
//! | `remove` | new | new | every proxy's trust bundle has dropped the old root |
//! | `done` | new | new | — |
//!
//! At every moment every two proxies can talk: a certificate from the new root is issued only
//! once every proxy trusts it, and the old root leaves the bundle only once no proxy serves a
//! certificate from it. "Every proxy" is every proxy connected to this control plane that
//! reports a workload certificate; a proxy without one yet cannot speak mutual TLS, and gets
//! the current signer and bundle when it obtains one.
//!
//! The Secret stays readable by Istio at every phase: `ca-cert.pem`, `ca-key.pem` and
//! `root-cert.pem` keep their meaning.
//!
//! The same loop picks up any change of the CA Secrets: a `cacerts` the user updates
//! (their own rotation), creates or deletes, and each phase above. A changed CA is put in use
//! for issuance, a new snapshot goes to every proxy (without waiting for another change of
//! the cluster), and `mesh-ca-root-cert` follows (see `ca_root`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use mesh_tls::ca::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CertificateAuthority, ROOT_CERT_FILE, summarize_pem,
};
use mesh_wire::distribution::NodeIdentity;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::hub::{Hub, ProxyState};
use super::mesh_ca::{MESH_CA_SECRET, MeshCa, MeshCaOptions, PLUGIN_CA_SECRET, from_secret};

/// Annotation of `mesh-ca-secret`: the rotation's phase ([`Phase`]).
pub const PHASE_ANNOTATION: &str = "ca.meshctl.io/rotation-phase";
/// When the phase was entered (RFC 3339, UTC).
pub const PHASE_SINCE_ANNOTATION: &str = "ca.meshctl.io/rotation-phase-since";
/// SHA-256 of the root being replaced.
pub const OLD_ROOT_ANNOTATION: &str = "ca.meshctl.io/rotation-old-root";
/// SHA-256 of the root replacing it.
pub const NEW_ROOT_ANNOTATION: &str = "ca.meshctl.io/rotation-new-root";
/// During `add`: the new root, trusted but not signing yet, and its key.
pub const NEXT_CA_CERT_KEY: &str = "next-ca-cert.pem";
pub const NEXT_CA_KEY_KEY: &str = "next-ca-key.pem";

/// How often a rotation in progress checks what the proxies report.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// A phase of a root rotation (the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Requested,
    Add,
    Switch,
    Remove,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Requested => "requested",
            Phase::Add => "add",
            Phase::Switch => "switch",
            Phase::Remove => "remove",
            Phase::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "requested" => Phase::Requested,
            "add" => Phase::Add,
            "switch" => Phase::Switch,
            "remove" => Phase::Remove,
            "done" => Phase::Done,
            _ => return None,
        })
    }

    /// Whether a rotation is under way (a new one may not start).
    pub fn in_progress(self) -> bool {
        !matches!(self, Phase::Done)
    }

    /// What the phase waits for, for people.
    pub fn waits_for(self) -> &'static str {
        match self {
            Phase::Requested => "the control plane to generate the new root",
            Phase::Add => "every proxy to trust both roots",
            Phase::Switch => "every proxy to get a certificate from the new root",
            Phase::Remove => "every proxy to drop the old root",
            Phase::Done => "nothing",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rotation recorded in `mesh-ca-secret`'s annotations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RotationState {
    /// `None`: no rotation was ever asked for.
    pub phase: Option<Phase>,
    pub since: Option<String>,
    pub old_root: Option<String>,
    pub new_root: Option<String>,
}

impl RotationState {
    /// Reads the annotations; an unknown phase is an error naming it.
    pub fn of(secret: &Secret) -> Result<RotationState> {
        let a = secret.metadata.annotations.clone().unwrap_or_default();
        let phase = match a.get(PHASE_ANNOTATION) {
            None => None,
            Some(p) => Some(Phase::parse(p).with_context(|| {
                format!(
                    "annotation {PHASE_ANNOTATION}: {p:?} is not a rotation phase (requested, add, \
                     switch, remove, done)"
                )
            })?),
        };
        Ok(RotationState {
            phase,
            since: a.get(PHASE_SINCE_ANNOTATION).cloned(),
            old_root: a.get(OLD_ROOT_ANNOTATION).cloned(),
            new_root: a.get(NEW_ROOT_ANNOTATION).cloned(),
        })
    }

    pub fn in_progress(&self) -> bool {
        self.phase.is_some_and(Phase::in_progress)
    }
}

/// What one proxy reports about its workload certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyCertificate {
    /// `sidecar ns/pod`, `gateway ns/name (pod ...)`.
    pub proxy: String,
    pub identity: Option<String>,
    /// `None`: the proxy has no workload certificate yet.
    pub root_sha256: Option<String>,
    pub trust_bundle_sha256: Vec<String>,
}

impl ProxyCertificate {
    pub fn of_state(p: &ProxyState) -> ProxyCertificate {
        ProxyCertificate {
            proxy: p.node.describe(),
            identity: p.certificate.as_ref().map(|c| c.identity.clone()),
            root_sha256: p.certificate.as_ref().map(|c| c.root_sha256.clone()),
            trust_bundle_sha256: p
                .certificate
                .as_ref()
                .map(|c| c.trust_bundle_sha256.clone())
                .unwrap_or_default(),
        }
    }

    /// From the JSON of `GET /debug/proxies` (what `meshctl ca` reads).
    pub fn of_report(report: &serde_json::Value) -> Result<Vec<ProxyCertificate>> {
        let Some(proxies) = report["proxies"].as_array() else {
            bail!("/debug/proxies: no \"proxies\" list in the answer");
        };
        proxies
            .iter()
            .map(|p| {
                let node: NodeIdentity = serde_json::from_value(p["node"].clone())
                    .context("/debug/proxies: a proxy's \"node\"")?;
                let cert = &p["certificate"];
                Ok(ProxyCertificate {
                    proxy: node.describe(),
                    identity: cert["identity"].as_str().map(str::to_string),
                    root_sha256: cert["rootSha256"].as_str().map(str::to_string),
                    trust_bundle_sha256: cert["trustBundleSha256"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect(),
                })
            })
            .collect()
    }

    fn trusts(&self, root: &str) -> bool {
        self.trust_bundle_sha256.iter().any(|r| r == root)
    }
}

/// Where the proxies are in a rotation from `old` to `new`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    /// Proxies that report a workload certificate (the ones waited for).
    pub proxies: usize,
    /// Proxies without a certificate yet (not waited for).
    pub without_certificate: usize,
    /// Proxies that trust the new root.
    pub trusting_new: usize,
    /// Proxies that trust both roots.
    pub trusting_both: usize,
    /// Proxies whose certificate chains to the new root.
    pub on_new_root: usize,
    /// Proxies whose bundle no longer has the old root.
    pub without_old_root: usize,
}

impl Progress {
    pub fn of(proxies: &[ProxyCertificate], old: &str, new: &str) -> Progress {
        let mut p = Progress::default();
        for c in proxies {
            if c.root_sha256.is_none() {
                p.without_certificate += 1;
                continue;
            }
            p.proxies += 1;
            p.trusting_new += usize::from(c.trusts(new));
            p.trusting_both += usize::from(c.trusts(new) && c.trusts(old));
            p.on_new_root += usize::from(c.root_sha256.as_deref() == Some(new));
            p.without_old_root += usize::from(!c.trusts(old));
        }
        p
    }

    /// How many proxies have done what `phase` waits for.
    pub fn done_in(&self, phase: Phase) -> usize {
        match phase {
            Phase::Requested | Phase::Done => self.proxies,
            Phase::Add => self.trusting_both,
            Phase::Switch => self.on_new_root,
            Phase::Remove => self.without_old_root,
        }
    }

    /// Whether every proxy has done what `phase` waits for.
    pub fn ready(&self, phase: Phase) -> bool {
        self.done_in(phase) == self.proxies
    }
}

/// The proxies that have not done what `phase` waits for (to say who holds a rotation up).
pub fn lagging<'a>(
    proxies: &'a [ProxyCertificate],
    phase: Phase,
    old: &str,
    new: &str,
) -> Vec<&'a ProxyCertificate> {
    proxies
        .iter()
        .filter(|c| c.root_sha256.is_some())
        .filter(|c| match phase {
            Phase::Requested | Phase::Done => false,
            Phase::Add => !(c.trusts(old) && c.trusts(new)),
            Phase::Switch => c.root_sha256.as_deref() != Some(new),
            Phase::Remove => c.trusts(old),
        })
        .collect()
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    mesh_tls::ca::format_unix_utc(secs as i64)
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

fn set(data: &mut BTreeMap<String, ByteString>, key: &str, value: &str) {
    data.insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
}

fn with_newline(mut s: String) -> String {
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// The Secret moved to `phase` (annotations), data changed by `change`, checked: it must load
/// as a CA that signs with `signing` and trusts exactly `trusted` roots.
fn next_secret(
    secret: &Secret,
    namespace: &str,
    phase: Phase,
    roots: (&str, &str),
    change: impl FnOnce(&mut BTreeMap<String, ByteString>) -> Result<()>,
    signing: &str,
    trusted: &[&str],
) -> Result<Secret> {
    let mut next = secret.clone();
    let data = next.data.get_or_insert_with(Default::default);
    change(data)?;
    let a = next
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    a.insert(PHASE_ANNOTATION.into(), phase.as_str().into());
    a.insert(PHASE_SINCE_ANNOTATION.into(), now_rfc3339());
    a.insert(OLD_ROOT_ANNOTATION.into(), roots.0.into());
    a.insert(NEW_ROOT_ANNOTATION.into(), roots.1.into());
    next.metadata.managed_fields = None;
    // What proxies will be given must be right before it is written.
    let ca = from_secret(&next, namespace, MESH_CA_SECRET)
        .with_context(|| format!("the {phase} phase's {MESH_CA_SECRET}"))?;
    if ca.signing_root_sha256() != signing {
        bail!(
            "the {phase} phase would sign with root {}, not {signing}",
            ca.signing_root_sha256()
        );
    }
    let have: Vec<String> = ca
        .roots()
        .iter()
        .map(|r| mesh_tls::ca::sha256_hex(r))
        .collect();
    for t in trusted {
        if !have.iter().any(|h| h == t) {
            bail!("the {phase} phase's trust bundle lacks root {t}");
        }
    }
    Ok(next)
}

/// `requested` → `add`: a new root and key, added to the bundle; the old root still signs.
pub fn begin(secret: &Secret, namespace: &str) -> Result<Secret> {
    let current = from_secret(secret, namespace, MESH_CA_SECRET)?;
    let old = current.signing_root_sha256();
    let next = CertificateAuthority::generate_root()?;
    let new = next.signing_root_sha256();
    let files = next.plugin_files();
    next_secret(
        secret,
        namespace,
        Phase::Add,
        (&old, &new),
        |data| {
            let bundle = text(secret, ROOT_CERT_FILE).unwrap_or_default();
            set(
                data,
                ROOT_CERT_FILE,
                &(with_newline(bundle) + &files.ca_cert),
            );
            set(data, NEXT_CA_CERT_KEY, &files.ca_cert);
            set(data, NEXT_CA_KEY_KEY, &files.ca_key);
            Ok(())
        },
        &old,
        &[&old, &new],
    )
}

/// `add` → `switch`: the new root signs; both stay trusted.
pub fn switch(secret: &Secret, namespace: &str, old: &str, new: &str) -> Result<Secret> {
    next_secret(
        secret,
        namespace,
        Phase::Switch,
        (old, new),
        |data| {
            let cert = data
                .remove(NEXT_CA_CERT_KEY)
                .with_context(|| format!("{MESH_CA_SECRET} has no key {NEXT_CA_CERT_KEY}"))?;
            let key = data
                .remove(NEXT_CA_KEY_KEY)
                .with_context(|| format!("{MESH_CA_SECRET} has no key {NEXT_CA_KEY_KEY}"))?;
            data.insert(CA_CERT_FILE.into(), cert);
            data.insert(CA_KEY_FILE.into(), key);
            // A self-signed root: no chain above it (Istio's layout).
            set(data, CERT_CHAIN_FILE, "");
            Ok(())
        },
        new,
        &[old, new],
    )
}

/// `switch` → `remove`: the old root leaves the bundle.
pub fn remove(secret: &Secret, namespace: &str, old: &str, new: &str) -> Result<Secret> {
    next_secret(
        secret,
        namespace,
        Phase::Remove,
        (old, new),
        |data| {
            let bundle = text(secret, ROOT_CERT_FILE).unwrap_or_default();
            let kept: String = summarize_pem(&bundle, ROOT_CERT_FILE)?
                .into_iter()
                .filter(|r| r.sha256 != old)
                .map(|r| r.pem)
                .collect();
            set(data, ROOT_CERT_FILE, &kept);
            Ok(())
        },
        new,
        &[new],
    )
}

/// `remove` → `done`.
pub fn finish(secret: &Secret, namespace: &str, old: &str, new: &str) -> Result<Secret> {
    next_secret(
        secret,
        namespace,
        Phase::Done,
        (old, new),
        |_| Ok(()),
        new,
        &[new],
    )
}

/// The next step of a rotation: the Secret to write, or `None` while waiting (or nothing to
/// do). `proxies`: what the connected proxies report.
pub fn step(
    secret: &Secret,
    namespace: &str,
    proxies: &[ProxyCertificate],
) -> Result<Option<Secret>> {
    let state = RotationState::of(secret)?;
    let Some(phase) = state.phase.filter(|p| p.in_progress()) else {
        return Ok(None);
    };
    if phase == Phase::Requested {
        return begin(secret, namespace).map(Some);
    }
    let (Some(old), Some(new)) = (state.old_root.as_deref(), state.new_root.as_deref()) else {
        bail!(
            "{MESH_CA_SECRET} is in phase {phase} without annotations {OLD_ROOT_ANNOTATION} and \
             {NEW_ROOT_ANNOTATION}"
        );
    };
    if !Progress::of(proxies, old, new).ready(phase) {
        return Ok(None);
    }
    match phase {
        Phase::Add => switch(secret, namespace, old, new),
        Phase::Switch => remove(secret, namespace, old, new),
        Phase::Remove => finish(secret, namespace, old, new),
        Phase::Requested | Phase::Done => unreachable!("handled above"),
    }
    .map(Some)
}

/// The latest copy of one Secret, kept by a watch.
#[derive(Default)]
struct Watched {
    /// `None` until the first listing.
    secret: Option<Option<Secret>>,
}

fn watch_secret(
    api: Api<Secret>,
    name: &'static str,
    slot: Arc<std::sync::Mutex<Watched>>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher::watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<Option<Secret>> = None;
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                _ = shutdown.cancelled() => return,
            };
            let Some(event) = event else { return };
            let update = match event {
                Ok(watcher::Event::Init) => {
                    listing = Some(None);
                    None
                }
                Ok(watcher::Event::InitApply(s)) => {
                    listing = Some(Some(s));
                    None
                }
                Ok(watcher::Event::InitDone) => Some(listing.take().unwrap_or(None)),
                Ok(watcher::Event::Apply(s)) => Some(Some(s)),
                Ok(watcher::Event::Delete(_)) => Some(None),
                Err(e) => {
                    tracing::warn!(
                        secret = name,
                        "watching the mesh CA's Secret (retried): {e}"
                    );
                    None
                }
            };
            if let Some(s) = update {
                slot.lock().expect("secret slot").secret = Some(s);
                wake.notify_one();
            }
        }
    });
}

/// Follows the CA Secrets of `namespace` and drives rotations, until `shutdown`.
pub struct CaFollower {
    pub client: kube::Client,
    pub namespace: String,
    pub options: MeshCaOptions,
    /// The CA in use: issuance and snapshots read it.
    pub ca: watch::Sender<Arc<MeshCa>>,
    pub hub: Arc<Hub>,
    /// Asks for a new world: every proxy gets a snapshot with the new trust bundle.
    pub world_changed: mpsc::UnboundedSender<()>,
}

impl CaFollower {
    pub async fn run(self, shutdown: CancellationToken) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let wake = Arc::new(Notify::new());
        let plugin = Arc::new(std::sync::Mutex::new(Watched::default()));
        let ours = Arc::new(std::sync::Mutex::new(Watched::default()));
        watch_secret(
            api.clone(),
            PLUGIN_CA_SECRET,
            plugin.clone(),
            wake.clone(),
            shutdown.clone(),
        );
        watch_secret(
            api.clone(),
            MESH_CA_SECRET,
            ours.clone(),
            wake.clone(),
            shutdown.clone(),
        );
        // The last Secret (name, resourceVersion) whose CA was looked at.
        let mut seen: Option<(String, String)> = None;
        // The mesh-ca-secret version whose rotation request was refused in the log.
        let mut warned_plugin: Option<String> = None;
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
            let (Some(plugin), Some(ours)) = (
                plugin.lock().expect("secret slot").secret.clone(),
                ours.lock().expect("secret slot").secret.clone(),
            ) else {
                continue; // not listed yet
            };
            let source = match (&plugin, &ours) {
                (Some(p), _) => (PLUGIN_CA_SECRET, p),
                (None, Some(o)) => (MESH_CA_SECRET, o),
                (None, None) => {
                    if seen.take().is_some() {
                        tracing::warn!(
                            namespace = %self.namespace,
                            "neither {PLUGIN_CA_SECRET} nor {MESH_CA_SECRET} exists any more: \
                             the mesh CA in use stays (a restarted control plane makes a new root)"
                        );
                    }
                    continue;
                }
            };
            let key = (
                source.0.to_string(),
                source
                    .1
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default(),
            );
            if seen.as_ref() != Some(&key) {
                seen = Some(key);
                self.use_secret(source.0, source.1);
            }
            match (&plugin, &ours) {
                (None, Some(ours)) => self.rotate(&api, ours).await,
                (Some(_), Some(ours)) if RotationState::of(ours).is_ok_and(|s| s.in_progress()) => {
                    // Said once per request, not every second.
                    let rv = ours.metadata.resource_version.clone();
                    if warned_plugin != rv {
                        tracing::warn!(
                            namespace = %self.namespace,
                            "a rotation of {MESH_CA_SECRET} is asked for, but the mesh CA is the \
                             user's {PLUGIN_CA_SECRET}: rotate it by updating {PLUGIN_CA_SECRET}"
                        );
                        warned_plugin = rv;
                    }
                }
                _ => {}
            }
        }
    }

    /// Puts the CA of `secret` in use when it differs from the one in use.
    fn use_secret(&self, name: &str, secret: &Secret) {
        let ca = match from_secret(secret, &self.namespace, name) {
            Ok(ca) => ca,
            Err(e) => {
                tracing::error!("the changed mesh CA cannot be used, the one in use stays: {e:#}");
                return;
            }
        };
        let current = self.ca.borrow().clone();
        if current.authority().plugin_files() == ca.plugin_files() {
            return;
        }
        let roots: Vec<String> = ca
            .roots()
            .iter()
            .map(|r| mesh_tls::ca::sha256_hex(r))
            .collect();
        tracing::info!(
            secret = %format!("{}/{name}", self.namespace),
            signing_root = %ca.signing_root_sha256(),
            ?roots,
            "the mesh CA changed: issuing from it and sending every proxy its trust bundle"
        );
        self.ca
            .send_replace(Arc::new(MeshCa::new(ca, self.options.clone())));
        let _ = self.world_changed.send(());
    }

    /// One step of a rotation in progress, when its condition holds.
    async fn rotate(&self, api: &Api<Secret>, secret: &Secret) {
        let proxies: Vec<ProxyCertificate> = self
            .hub
            .report()
            .proxies
            .iter()
            .map(ProxyCertificate::of_state)
            .collect();
        let next = match step(secret, &self.namespace, &proxies) {
            Ok(Some(next)) => next,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(
                    "the root rotation in {}/{MESH_CA_SECRET} cannot go on: {e:#}",
                    self.namespace
                );
                return;
            }
        };
        let phase = RotationState::of(&next)
            .ok()
            .and_then(|s| s.phase)
            .map_or("?", Phase::as_str);
        // resourceVersion is kept: a replica that moved first wins (409), this one re-reads.
        match api
            .replace(MESH_CA_SECRET, &PostParams::default(), &next)
            .await
        {
            Ok(_) => tracing::info!(
                namespace = %self.namespace,
                phase,
                "mesh CA root rotation: phase {phase}"
            ),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!("{MESH_CA_SECRET} changed meanwhile; looked at again")
            }
            Err(e) => tracing::warn!(
                "writing the {phase} phase into {}/{MESH_CA_SECRET} (retried): {e}",
                self.namespace
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::mesh_ca::secret;

    fn proxy(name: &str, root: &str, bundle: &[&str]) -> ProxyCertificate {
        ProxyCertificate {
            proxy: name.into(),
            identity: Some(format!("spiffe://cluster.local/ns/a/sa/{name}")),
            root_sha256: Some(root.into()),
            trust_bundle_sha256: bundle.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn requested(s: &mut Secret) {
        s.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(PHASE_ANNOTATION.into(), "requested".into());
    }

    fn ca_of(s: &Secret) -> CertificateAuthority {
        from_secret(s, "mesh-system", MESH_CA_SECRET).unwrap()
    }

    fn roots_of(s: &Secret) -> Vec<String> {
        ca_of(s)
            .roots()
            .iter()
            .map(|r| mesh_tls::ca::sha256_hex(r))
            .collect()
    }

    #[test]
    fn each_phase_waits_for_every_proxy_and_keeps_the_secret_istio_readable() {
        let first = CertificateAuthority::generate_root().unwrap();
        let old = first.signing_root_sha256();
        let mut s = secret("mesh-system", &first.plugin_files());
        // Nothing asked: nothing done.
        assert!(step(&s, "mesh-system", &[]).unwrap().is_none());
        requested(&mut s);

        // add: a new root, trusted, not signing.
        let s = step(&s, "mesh-system", &[]).unwrap().unwrap();
        let st = RotationState::of(&s).unwrap();
        assert_eq!(st.phase, Some(Phase::Add));
        assert_eq!(st.old_root.as_deref(), Some(old.as_str()));
        let new = st.new_root.unwrap();
        assert_ne!(new, old);
        assert_eq!(ca_of(&s).signing_root_sha256(), old);
        assert_eq!(roots_of(&s), [old.clone(), new.clone()]);
        assert!(text(&s, NEXT_CA_KEY_KEY).is_some());

        // Waits while a proxy trusts only the old root; a proxy without a certificate is
        // not waited for.
        let mut none = proxy("c", "", &[]);
        none.root_sha256 = None;
        let behind = [
            proxy("a", &old, &[&old, &new]),
            proxy("b", &old, &[&old]),
            none.clone(),
        ];
        assert!(step(&s, "mesh-system", &behind).unwrap().is_none());
        let lag = lagging(&behind, Phase::Add, &old, &new);
        assert_eq!(lag.len(), 1);
        assert_eq!(lag[0].proxy, "b");
        let both = [
            proxy("a", &old, &[&old, &new]),
            proxy("b", &old, &[&new, &old]),
            none,
        ];
        let s = step(&s, "mesh-system", &both).unwrap().unwrap();

        // switch: the new root signs, both trusted.
        assert_eq!(RotationState::of(&s).unwrap().phase, Some(Phase::Switch));
        assert_eq!(ca_of(&s).signing_root_sha256(), new);
        assert_eq!(roots_of(&s), [old.clone(), new.clone()]);
        assert!(text(&s, NEXT_CA_KEY_KEY).is_none());
        assert!(step(&s, "mesh-system", &both).unwrap().is_none());
        let moved = [
            proxy("a", &new, &[&old, &new]),
            proxy("b", &new, &[&old, &new]),
        ];
        let s = step(&s, "mesh-system", &moved).unwrap().unwrap();

        // remove: the old root leaves the bundle.
        assert_eq!(RotationState::of(&s).unwrap().phase, Some(Phase::Remove));
        assert_eq!(roots_of(&s), std::slice::from_ref(&new));
        assert!(step(&s, "mesh-system", &moved).unwrap().is_none());
        let s = step(
            &s,
            "mesh-system",
            &[proxy("a", &new, &[&new]), proxy("b", &new, &[&new])],
        )
        .unwrap()
        .unwrap();
        assert_eq!(RotationState::of(&s).unwrap().phase, Some(Phase::Done));
        assert!(step(&s, "mesh-system", &[]).unwrap().is_none());
        // Istio's keys throughout.
        for key in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE] {
            assert!(text(&s, key).is_some(), "{key}");
        }
    }

    #[test]
    fn an_unknown_phase_is_refused_naming_it() {
        let ca = CertificateAuthority::generate_root().unwrap();
        let mut s = secret("mesh-system", &ca.plugin_files());
        s.metadata.annotations = Some([(PHASE_ANNOTATION.into(), "sideways".into())].into());
        let e = step(&s, "mesh-system", &[]).unwrap_err().to_string();
        assert!(
            e.contains("\"sideways\"") && e.contains(PHASE_ANNOTATION),
            "{e}"
        );
    }

    #[test]
    fn progress_is_read_from_the_control_planes_report() {
        let report = serde_json::json!({"generation": 3, "proxies": [
            {"node": {"kind": "sidecar", "namespace": "a", "pod": "p"},
             "certificate": {"identity": "spiffe://cluster.local/ns/a/sa/p", "expiresAtMs": 1,
                             "rootSha256": "n", "trustBundleSha256": ["o", "n"]}},
            {"node": {"kind": "gateway", "namespace": "a", "name": "g"}}
        ]});
        let proxies = ProxyCertificate::of_report(&report).unwrap();
        assert_eq!(proxies[0].proxy, "sidecar a/p");
        let p = Progress::of(&proxies, "o", "n");
        assert_eq!(
            p,
            Progress {
                proxies: 1,
                without_certificate: 1,
                trusting_new: 1,
                trusting_both: 1,
                on_new_root: 1,
                without_old_root: 0,
            }
        );
        assert!(p.ready(Phase::Switch) && !p.ready(Phase::Remove));
    }
}
