//! Processes the benchmark starts: pinned to cores at the benchmark's priority, killed when
//! dropped, and waited on until they answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Niceness of everything the benchmark starts (`--nice`; negative needs root).
pub(super) static NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// `nice -n N taskset -c CPUS ...`: pinned, at the benchmark's priority.
pub(super) fn pinned(cpus: &str) -> Command {
    let mut c = Command::new("nice");
    c.arg("-n")
        .arg(NICE.load(std::sync::atomic::Ordering::Relaxed).to_string())
        .arg("taskset")
        .arg("-c")
        .arg(cpus);
    c
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A process we started; killed (by its pid) when dropped.
pub(super) struct Proc {
    child: Child,
    pub(super) name: String,
}

impl Proc {
    pub(super) fn spawn(
        name: &str,
        cpus: &str,
        argv: &[String],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let logf = std::fs::File::create(log)?;
        let child = pinned(cpus)
            .args(argv)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {name}: {argv:?}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET; the status, if any.
fn probe(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(&crate::http1::get_request("bench", "/")).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some(p)) = crate::http1::parse(&buf) {
            return Some(p.status);
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until `addr` answers 200 (for a hop: through every process started), failing at
/// once with its log if one of `procs` exits.
pub(super) fn wait_ready(procs: &mut [(Proc, PathBuf)], addr: SocketAddr) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        for (p, log) in procs.iter_mut() {
            if !p.alive() {
                bail!(
                    "{} exited; its log ({}):\n{}",
                    p.name,
                    log.display(),
                    std::fs::read_to_string(&*log).unwrap_or_default()
                );
            }
        }
        if probe(addr) == Some(200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let names: Vec<&str> = procs.iter().map(|(p, _)| p.name.as_str()).collect();
    bail!(
        "{} not answering 200 on {addr} after 30 s",
        names.join(" + ")
    )
}

pub(super) fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {addr} after 30 s")
}
