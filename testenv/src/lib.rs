//! `mesh-testenv`: a real Kubernetes control plane for meshctl's tests (our "envtest").
//!
//! It starts `etcd`, `kube-apiserver`, `kube-controller-manager`, `kube-scheduler` and `kwok`
//! (which plays a fake node: scheduled pods turn Running with IPs) on free 127.0.0.1 ports,
//! with a freshly generated CA, serving and client certificates and service-account key, and
//! writes an admin kubeconfig. The binaries are built from their Go modules by
//! `tests/kube-testenv/build.sh` (see the README there); set `MESHCTL_TESTENV_BIN` to a
//! directory holding them to skip the build step.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use k8s_openapi::api::core::v1::ConfigMap;
//! let env = mesh_testenv::TestEnv::shared(); // one control plane per test binary
//! let ns = env.create_namespace("demo").await?; // one namespace per test
//! let cms: kube::Api<ConfigMap> = kube::Api::namespaced(env.client()?, &ns);
//! let out = env.kubectl().args(["get", "pods", "-n", &ns]).output().await?;
//! # let _ = (cms, out); Ok(()) }
//! ```
//!
//! Processes: every process is started under a tiny `sh` watchdog that stops it (SIGTERM,
//! then SIGKILL) as soon as the test process closes a pipe — which happens when the
//! [`TestEnv`] is dropped (also while unwinding from a panic) and, for the shared
//! environment that lives in a `static`, when the test process exits or is killed. See
//! `process.rs`. Set `MESHCTL_TESTENV_KEEP=1` to keep the work directory (logs, certs,
//! kubeconfig) after the run.

mod certs;
mod process;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use certs::CertPair;
use certs::{Ca, Usage};
use process::Supervised;

/// The programs an environment needs, all in one directory.
pub const BINARIES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
];

/// Environment variable naming a directory that holds [`BINARIES`].
pub const BIN_ENV: &str = "MESHCTL_TESTENV_BIN";

/// The name of the fake node kwok manages.
pub const NODE_NAME: &str = "kwok-node-0";

/// The Service cluster IP range of the environment.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// The range kwok takes pod IPs from.
pub const POD_CIDR: &str = "10.244.0.1/16";

const KWOK_STAGES: &str = include_str!("../../tests/kube-testenv/kwok/stages.yaml");
const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/kube-testenv/build.sh"
);

/// A running control plane. Dropping it stops every process it started and removes its
/// work directory.
#[derive(Debug)]
pub struct TestEnv {
    dir: PathBuf,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    ca: Ca,
    config: kube::Config,
    /// In start order; stopped in reverse.
    processes: Mutex<Vec<Supervised>>,
    janitor: Mutex<Option<Supervised>>,
    keep: bool,
    startup: Duration,
}

impl TestEnv {
    /// The environment shared by all tests of this test binary, started on first use (on a
    /// thread of its own, so it does not depend on the calling test's runtime). Panics if
    /// it cannot start: the error names the failing component and shows its log.
    ///
    /// Blocks the calling thread while starting; call it at the top of a test.
    pub fn shared() -> &'static TestEnv {
        static SHARED: OnceLock<Result<TestEnv, String>> = OnceLock::new();
        let env = SHARED.get_or_init(|| {
            std::thread::Builder::new()
                .name("mesh-testenv-start".to_owned())
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    rt.block_on(TestEnv::start()).map_err(|e| format!("{e:#}"))
                })
                .map_err(|e| e.to_string())
                .and_then(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the start thread panicked".to_owned()))
                })
        });
        match env {
            Ok(env) => env,
            Err(e) => {
                panic!("mesh-testenv: the shared Kubernetes environment failed to start: {e}")
            }
        }
    }

    /// Starts a new environment owned by the caller.
    pub async fn start() -> Result<TestEnv> {
        install_crypto_provider();
        let bin_dir = binaries_dir()?;
        let started = Instant::now();
        let keep = std::env::var_os("MESHCTL_TESTENV_KEEP").is_some_and(|v| v != "0");
        let dir = tempfile::Builder::new()
            .prefix("meshctl-testenv-")
            .tempdir()
            .context("creating the work directory")?
            .keep();
        // The janitor comes first, so the directory goes away even if this process is
        // killed while starting.
        let janitor = if keep {
            None
        } else {
            Some(Supervised::janitor(&dir)?)
        };
        let result = start_in(&dir, &bin_dir, keep, janitor).await;
        match result {
            Ok(mut env) => {
                env.startup = started.elapsed();
                eprintln!(
                    "mesh-testenv: control plane ready in {:.1}s (server {}, kubeconfig {})",
                    env.startup.as_secs_f64(),
                    env.server,
                    env.kubeconfig.display()
                );
                Ok(env)
            }
            Err(e) => {
                if !keep {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(e)
            }
        }
    }

    /// A new client with admin rights. Call it from inside the tokio runtime that will use
    /// it (clients are bound to the runtime they were made in; each `#[tokio::test]` has
    /// its own).
    pub fn client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.config.clone()).context("building a kube client")
    }

    /// The client configuration (admin).
    pub fn config(&self) -> &kube::Config {
        &self.config
    }

    /// The admin kubeconfig (credentials embedded).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// The PEM of the CA that signed the API server's certificate and all client
    /// certificates; also the CA bundle for webhooks served with [`TestEnv::issue_cert`].
    pub fn ca_pem(&self) -> &str {
        &self.ca.pair.cert_pem
    }

    /// A serving certificate signed by the environment's CA, for e.g. a webhook server the
    /// API server calls (`sans`: DNS names or IPs such as `"127.0.0.1"`).
    pub fn issue_cert(&self, sans: &[&str]) -> Result<CertPair> {
        let cn = sans.first().copied().unwrap_or("meshctl-testenv-server");
        self.ca.issue(cn, &[], sans, Usage::Server)
    }

    /// A rustls server configuration (no ALPN: HTTP/1.1; set `alpn_protocols` for h2) with a
    /// certificate from
    /// [`TestEnv::issue_cert`] — for an HTTPS server the API server calls, such as a
    /// URL-mode admission webhook whose `caBundle` is [`TestEnv::ca_pem`].
    pub fn server_tls_config(&self, sans: &[&str]) -> Result<std::sync::Arc<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        install_crypto_provider();
        let pair = self.issue_cert(sans)?;
        let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the issued certificate")?;
        let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
            .context("parsing the issued key")?;
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("building the TLS server config")?;
        Ok(std::sync::Arc::new(config))
    }

    /// The directory holding the binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The real `kubectl`.
    pub fn kubectl_path(&self) -> PathBuf {
        self.bin_dir.join("kubectl")
    }

    /// A `kubectl` command already pointed at this environment (`--kubeconfig`).
    pub fn kubectl(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.kubectl_path());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env_remove("KUBECONFIG")
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl with `args`; fails with its stderr unless it succeeds. Returns stdout.
    pub async fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self
            .kubectl()
            .args(args)
            .output()
            .await
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The work directory: `pki/`, `logs/<component>.log`, `kubeconfig`, etcd data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log file of a component (`etcd`, `kube-apiserver`, ..., `kwok`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{component}.log"))
    }

    /// How long [`TestEnv::start`] took until everything was ready.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Creates a namespace `<prefix>-<random>` and waits until its `default`
    /// ServiceAccount exists (pods cannot be created before that).
    pub async fn create_namespace(&self, prefix: &str) -> Result<String> {
        let client = self.client()?;
        let name = format!("{prefix}-{}", random_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name },
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        let sas: Api<ServiceAccount> = Api::namespaced(client, &name);
        eventually(
            Duration::from_secs(60),
            &format!("the default ServiceAccount of namespace {name}"),
            || async { Ok(sas.get_opt("default").await?.map(|_| ())) },
        )
        .await?;
        Ok(name)
    }

    /// Fails if a component has exited (with the tail of its log).
    pub fn check_running(&self) -> Result<()> {
        let mut procs = self.processes.lock().unwrap_or_else(|e| e.into_inner());
        procs.iter_mut().try_for_each(Supervised::check_running)
    }

    /// Stops every process and removes the work directory (same as dropping it).
    pub fn stop(self) {}
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let procs = self.processes.get_mut().unwrap_or_else(|e| e.into_inner());
        // Ask all at once, then wait: dependents first, etcd last.
        for p in procs.iter_mut().rev() {
            p.request_stop();
        }
        while let Some(mut p) = procs.pop() {
            p.stop(Duration::from_secs(10));
        }
        let janitor = self
            .janitor
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if self.keep {
            eprintln!("mesh-testenv: kept {}", self.dir.display());
            drop(janitor); // none is started when keeping
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
            drop(janitor);
        }
    }
}

/// Installs rustls' ring provider as the process default (ignored if one is installed).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `f` every 200 ms until it returns `Ok(Some(_))`; fails after `timeout` with the
/// last error, naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The directory holding [`BINARIES`]: `$MESHCTL_TESTENV_BIN`, else what
/// `tests/kube-testenv/build.sh` builds (or finds cached). Computed once per process.
pub fn binaries_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_binaries() -> Result<PathBuf> {
    let dir = match std::env::var_os(BIN_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            eprintln!("mesh-testenv: {BIN_ENV} is not set; running {BUILD_SCRIPT}");
            let out = std::process::Command::new("bash")
                .arg(BUILD_SCRIPT)
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {BUILD_SCRIPT}"))?;
            if !out.status.success() {
                bail!(
                    "{BUILD_SCRIPT} failed ({}); its messages are above",
                    out.status
                );
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout
                .lines()
                .last()
                .ok_or_else(|| anyhow!("{BUILD_SCRIPT} printed no bin directory"))?;
            PathBuf::from(last.trim())
        }
    };
    for b in BINARIES {
        let p = dir.join(b);
        if !p.is_file() {
            bail!(
                "{} is missing (from {}); run tests/kube-testenv/build.sh",
                p.display(),
                if std::env::var_os(BIN_ENV).is_some() {
                    BIN_ENV
                } else {
                    "build.sh"
                }
            );
        }
    }
    Ok(dir)
}

fn random_suffix() -> String {
    (0..6)
        .map(|_| fastrand::alphanumeric().to_ascii_lowercase())
        .collect()
}

/// Free loopback ports, all distinct (held open together while choosing).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, client: &CertPair) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testenv
  context:
    cluster: testenv
    user: {user}
    namespace: default
current-context: testenv
",
        ca = base64(ca_pem.as_bytes()),
        cert = base64(client.cert_pem.as_bytes()),
        key = base64(client.key_pem.as_bytes()),
    )
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Starter<'a> {
    dir: &'a Path,
    bin_dir: &'a Path,
    procs: Vec<Supervised>,
    /// (what, seconds since the start) for each readiness step, for the startup report.
    phases: Vec<(String, f64)>,
    t0: Instant,
}

impl Starter<'_> {
    fn spawn(&mut self, name: &str, args: Vec<String>) -> Result<()> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let p = Supervised::spawn(name, &self.bin_dir.join(name), &args, &log)?;
        self.procs.push(p);
        Ok(())
    }

    fn check(&mut self) -> Result<()> {
        self.procs
            .iter_mut()
            .try_for_each(Supervised::check_running)
    }

    /// Polls `f` until it yields, failing early if a component dies.
    async fn wait<T, F, Fut>(&mut self, timeout: Duration, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            self.check()
                .with_context(|| format!("while waiting for {what}"))?;
            match f().await {
                Ok(Some(v)) => {
                    self.phases
                        .push((what.to_owned(), self.t0.elapsed().as_secs_f64()));
                    return Ok(v);
                }
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                let e = last_err.unwrap_or_else(|| anyhow!("not yet"));
                let logs = self
                    .procs
                    .iter()
                    .map(|p| {
                        format!(
                            "--- {} ---\n{}",
                            p.log.display(),
                            process::log_tail(&p.log, 15)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(e.context(format!(
                    "timed out after {timeout:?} waiting for {what}; recent logs:\n{logs}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn start_in(
    dir: &Path,
    bin_dir: &Path,
    keep: bool,
    janitor: Option<Supervised>,
) -> Result<TestEnv> {
    let d = |p: &str| dir.join(p).display().to_string();
    for sub in [
        "pki",
        "logs",
        "etcd",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        std::fs::create_dir_all(dir.join(sub))?;
    }

    // PKI.
    let ca = Ca::generate()?;
    let serving = ca.issue(
        "kube-apiserver",
        &[],
        &[
            "localhost",
            "127.0.0.1",
            "10.96.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        Usage::Server,
    )?;
    let admin = ca.issue(
        "meshctl-testenv-admin",
        &["system:masters"],
        &[],
        Usage::Client,
    )?;
    let kcm = ca.issue("system:kube-controller-manager", &[], &[], Usage::Client)?;
    let scheduler = ca.issue("system:kube-scheduler", &[], &[], Usage::Client)?;
    let kwok = ca.issue("kwok-controller", &["system:masters"], &[], Usage::Client)?;
    let (sa_key, sa_pub) = certs::service_account_key()?;
    write(&dir.join("pki/ca.crt"), &ca.pair.cert_pem)?;
    write(&dir.join("pki/ca.key"), &ca.pair.key_pem)?;
    write(&dir.join("pki/apiserver.crt"), &serving.cert_pem)?;
    write(&dir.join("pki/apiserver.key"), &serving.key_pem)?;
    write(&dir.join("pki/sa.key"), &sa_key)?;
    write(&dir.join("pki/sa.pub"), &sa_pub)?;

    let [
        etcd_client,
        etcd_peer,
        apiserver_port,
        kcm_port,
        scheduler_port,
    ]: [u16; 5] = free_ports(5)?.try_into().map_err(|_| anyhow!("ports"))?;
    let server = format!("https://127.0.0.1:{apiserver_port}");
    let kubeconfig = dir.join("kubeconfig");
    write(
        &kubeconfig,
        &kubeconfig_yaml(&server, &ca.pair.cert_pem, "admin", &admin),
    )?;
    for (file, user, pair) in [
        (
            "kube-controller-manager.kubeconfig",
            "system:kube-controller-manager",
            &kcm,
        ),
        (
            "kube-scheduler.kubeconfig",
            "system:kube-scheduler",
            &scheduler,
        ),
        ("kwok.kubeconfig", "kwok-controller", &kwok),
    ] {
        write(
            &dir.join(file),
            &kubeconfig_yaml(&server, &ca.pair.cert_pem, user, pair),
        )?;
    }
    write(&dir.join("kwok.yaml"), KWOK_STAGES)?;

    let mut s = Starter {
        dir,
        bin_dir,
        procs: Vec::new(),
        phases: Vec::new(),
        t0: Instant::now(),
    };
    let result = start_processes(
        &mut s,
        &d,
        etcd_client,
        etcd_peer,
        apiserver_port,
        kcm_port,
        scheduler_port,
        &kubeconfig,
    )
    .await;
    let config = match result {
        Ok(config) => {
            let phases: Vec<String> = s
                .phases
                .iter()
                .map(|(what, at)| format!("{what} at {at:.1}s"))
                .collect();
            eprintln!("mesh-testenv: {}", phases.join(", "));
            config
        }
        Err(e) => {
            // Dropping the processes stops them.
            for p in s.procs.iter_mut().rev() {
                p.request_stop();
            }
            drop(s.procs);
            return Err(e);
        }
    };
    Ok(TestEnv {
        dir: dir.to_owned(),
        bin_dir: bin_dir.to_owned(),
        kubeconfig,
        server,
        ca,
        config,
        processes: Mutex::new(s.procs),
        janitor: Mutex::new(janitor),
        keep,
        startup: Duration::ZERO,
    })
}

#[allow(clippy::too_many_arguments)]
async fn start_processes(
    s: &mut Starter<'_>,
    d: &dyn Fn(&str) -> String,
    etcd_client: u16,
    etcd_peer: u16,
    apiserver_port: u16,
    kcm_port: u16,
    scheduler_port: u16,
    kubeconfig: &Path,
) -> Result<kube::Config> {
    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    s.spawn(
        "etcd",
        vec![
            "--name=testenv".into(),
            format!("--data-dir={}", d("etcd")),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=testenv={peer_url}"),
            // Throwaway data: no fsync keeps writes fast on a busy disk.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ],
    )?;
    s.wait(Duration::from_secs(30), "etcd /health", || {
        etcd_healthy(etcd_client)
    })
    .await?;

    s.spawn(
        "kube-apiserver",
        vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={apiserver_port}"),
            format!("--cert-dir={}", d("pki")),
            format!("--tls-cert-file={}", d("pki/apiserver.crt")),
            format!("--tls-private-key-file={}", d("pki/apiserver.key")),
            format!("--client-ca-file={}", d("pki/ca.crt")),
            format!("--service-account-key-file={}", d("pki/sa.pub")),
            format!("--service-account-signing-key-file={}", d("pki/sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            // The "kubernetes" Endpoints cannot hold a loopback address.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ],
    )?;
    let options = KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(kubeconfig)?, &options)
        .await
        .context("reading the admin kubeconfig")?;
    let client = kube::Client::try_from(config.clone())?;
    s.wait(Duration::from_secs(90), "kube-apiserver /readyz", || {
        let client = client.clone();
        async move {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            let body = client.request_text(req).await?;
            Ok((body.trim() == "ok").then_some(()))
        }
    })
    .await?;

    let component_common = |name: &str, port: u16| -> Vec<String> {
        let kc = d(&format!("{name}.kubeconfig"));
        vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d(name)),
            "--leader-elect=false".into(),
        ]
    };
    let mut kcm_args = component_common("kube-controller-manager", kcm_port);
    kcm_args.extend([
        "--use-service-account-credentials=true".into(),
        format!("--service-account-private-key-file={}", d("pki/sa.key")),
        format!("--root-ca-file={}", d("pki/ca.crt")),
        format!("--cluster-signing-cert-file={}", d("pki/ca.crt")),
        format!("--cluster-signing-key-file={}", d("pki/ca.key")),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
    ]);
    s.spawn("kube-controller-manager", kcm_args)?;
    s.spawn(
        "kube-scheduler",
        component_common("kube-scheduler", scheduler_port),
    )?;
    s.spawn(
        "kwok",
        vec![
            format!("--kubeconfig={}", d("kwok.kubeconfig")),
            format!("--config={}", d("kwok.yaml")),
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--node-lease-duration-seconds=40".into(),
            format!("--cidr={POD_CIDR}"),
            "--node-ip=10.243.0.1".into(),
        ],
    )?;

    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &fake_node()?)
        .await
        .context("creating the kwok node")?;
    s.wait(
        Duration::from_secs(60),
        &format!("node {NODE_NAME} to be Ready (kwok)"),
        || {
            let nodes = nodes.clone();
            async move {
                let node = nodes.get(NODE_NAME).await?;
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let tainted = node
                    .spec
                    .and_then(|s| s.taints)
                    .is_some_and(|t| !t.is_empty());
                Ok((ready && !tainted).then_some(()))
            }
        },
    )
    .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
    s.wait(
        Duration::from_secs(60),
        "the default ServiceAccount (kube-controller-manager)",
        || {
            let sas = sas.clone();
            async move { Ok(sas.get_opt("default").await?.map(|_| ())) }
        },
    )
    .await?;
    Ok(config)
}

/// `GET /health` on etcd's client port, by hand (HTTP/1.0, plain text on loopback).
async fn etcd_healthy(port: u16) -> Result<Option<()>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    Ok(text.contains("\"health\":\"true\"").then_some(()))
}

fn fake_node() -> Result<Node> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {
                "kwok.x-k8s.io/node": "fake",
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": { "cpu": "32", "memory": "256Gi", "pods": "110" },
            "capacity": { "cpu": "32", "memory": "256Gi", "pods": "110" },
        },
    }))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(5).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 5);
    }

    #[test]
    fn kubeconfig_is_readable_by_kube() {
        let ca = Ca::generate().unwrap();
        let admin = ca
            .issue("admin", &["system:masters"], &[], Usage::Client)
            .unwrap();
        let yaml = kubeconfig_yaml("https://127.0.0.1:6443", &ca.pair.cert_pem, "admin", &admin);
        let kc = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("testenv"));
        assert_eq!(
            kc.clusters[0].cluster.as_ref().unwrap().server.as_deref(),
            Some("https://127.0.0.1:6443")
        );
    }
}
