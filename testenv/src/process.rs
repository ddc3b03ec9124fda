//! Processes started by the environment, each under a small `sh` watchdog (`watchdog.sh`).
//!
//! Why a watchdog: a process-wide shared environment lives in a `static` and is never
//! dropped, and a test binary can also die by a signal. Each watchdog reads a pipe whose only
//! writer is the test process; when that pipe reaches EOF — we closed it in `Drop`, or the
//! test process exited in any way, since the kernel closes its descriptors — the watchdog
//! sends SIGTERM to its program, then SIGKILL after 5 s. Every watchdog is also the leader of
//! its own process group (`process_group(0)`), so a last-resort `kill -KILL -- -PGID` reaches
//! the program too, and a Ctrl-C aimed at `cargo test` does not race our own shutdown.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const WATCHDOG: &str = include_str!("watchdog.sh");

/// One supervised process.
#[derive(Debug)]
pub(crate) struct Supervised {
    pub(crate) name: String,
    pub(crate) log: PathBuf,
    child: Child,
    /// Closing this tells the watchdog to stop the program.
    lifeline: Option<ChildStdin>,
    exited: Option<ExitStatus>,
}

impl Supervised {
    /// Starts `program args...` under the watchdog, output appended to `log`.
    pub(crate) fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("mesh-testenv-watchdog")
            .arg("run")
            .arg(program)
            .args(args);
        Self::start(name, cmd, Stdio::from(out), Stdio::from(err), log)
    }

    /// Starts the janitor that removes `dir` once the test process is gone (or closed the
    /// lifeline) and no process mentions `dir` on its command line any more.
    pub(crate) fn janitor(dir: &Path) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("mesh-testenv-watchdog")
            .arg("janitor")
            .arg(dir);
        Self::start("janitor", cmd, Stdio::null(), Stdio::null(), Path::new(""))
    }

    fn start(name: &str, mut cmd: Command, out: Stdio, err: Stdio, log: &Path) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} (sh watchdog)"))?;
        let lifeline = child.stdin.take();
        Ok(Supervised {
            name: name.to_owned(),
            log: log.to_owned(),
            child,
            lifeline,
            exited: None,
        })
    }

    /// Fails (with the tail of its log) if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        match self.exited {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 40)
            ),
        }
    }

    /// Asks the watchdog to stop the program (non-blocking).
    pub(crate) fn request_stop(&mut self) {
        self.lifeline.take();
    }

    /// Stops the program and waits for it: closes the lifeline, waits up to `timeout`, then
    /// kills the whole process group.
    pub(crate) fn stop(&mut self, timeout: Duration) {
        self.request_stop();
        let deadline = Instant::now() + timeout;
        while self.exited.is_none() {
            match self.child.try_wait() {
                Ok(Some(status)) => self.exited = Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let pgid = self.child.id();
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{pgid}")])
                        .stderr(Stdio::null())
                        .status();
                    let _ = self.child.kill();
                    self.exited = self.child.wait().ok();
                }
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The last `lines` lines of a log file (at most 64 KiB are read).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: &str) -> bool {
        Command::new("kill")
            .args(["-0", pid])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn closing_the_lifeline_stops_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let pidfile = dir.path().join("pid");
        // The program records its own PID so the test can see it die.
        let script = format!("echo $$ > {}; exec sleep 600", pidfile.display());
        let mut p = Supervised::spawn("sleeper", Path::new("sh"), &["-c".to_owned(), script], &log)
            .unwrap();
        assert!(wait_for(
            || std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
        ));
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
        assert!(alive(&pid));
        p.check_running().unwrap();
        let started = Instant::now();
        p.stop(Duration::from_secs(10));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGTERM suffices"
        );
        assert!(wait_for(|| !alive(&pid)), "program {pid} still alive");
    }

    #[test]
    fn an_exited_program_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fail.log");
        let mut p = Supervised::spawn(
            "failing",
            Path::new("sh"),
            &["-c".to_owned(), "echo boom >&2; exit 3".to_owned()],
            &log,
        )
        .unwrap();
        assert!(wait_for(|| p.check_running().is_err()));
        let err = p.check_running().unwrap_err().to_string();
        assert!(err.contains("failing exited unexpectedly"), "{err}");
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn janitor_waits_for_processes_that_use_the_directory() {
        let dir = tempfile::tempdir().unwrap().keep();
        let marker = dir.join("marker");
        // A process with the directory on its command line, alive for about a second.
        let mut user = Command::new("sh")
            .args(["-c", "sleep 1; :"])
            .arg(&marker)
            .spawn()
            .unwrap();
        let mut j = Supervised::janitor(&dir).unwrap();
        let started = Instant::now();
        j.request_stop();
        std::thread::sleep(Duration::from_millis(400));
        assert!(dir.exists(), "removed while still in use");
        user.wait().unwrap();
        assert!(wait_for(|| !dir.exists()), "removed once unused");
        assert!(started.elapsed() >= Duration::from_millis(900));
        j.stop(Duration::from_secs(10));
    }

    #[test]
    fn janitor_removes_the_directory_after_the_lifeline_closes() {
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(dir.join("f"), "x").unwrap();
        let mut j = Supervised::janitor(&dir).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(dir.exists());
        j.stop(Duration::from_secs(10));
        assert!(!dir.exists());
    }
}
