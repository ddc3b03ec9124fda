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
mod startup;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};

pub use certs::CertPair;
use certs::{Ca, Usage};
use process::Supervised;
use startup::start_in;

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
    mesh_tls::install_default();
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
