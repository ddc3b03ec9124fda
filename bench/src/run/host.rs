//! What the host's `/proc` says: load average, a process's CPU time and memory, the machine.

use std::process::Command;

use serde::Serialize;

pub(super) fn loadavg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// utime + stime of a process, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub(super) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub(super) fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
}

pub(super) fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu,
        kernel,
    }
}

pub(super) fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The other ends of the TCP connections involving local port `port` that are in TIME_WAIT:
/// one entry per closed connection, whichever side closed first (both sides of a loopback
/// connection are listed, keyed by the same peer port).
pub(super) fn time_wait_peers(port: u16) -> std::collections::BTreeSet<u16> {
    let mut out = std::collections::BTreeSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(s) = std::fs::read_to_string(f) {
            out.extend(time_wait_peers_in(&s, port));
        }
    }
    out
}

/// [`time_wait_peers`] over the text of `/proc/net/tcp`.
fn time_wait_peers_in(table: &str, port: u16) -> Vec<u16> {
    const TIME_WAIT: &str = "06";
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, st) = (f.get(1)?, f.get(2)?, f.get(3)?);
            if *st != TIME_WAIT {
                return None;
            }
            let (l, r) = (port_of(local)?, port_of(remote)?);
            if l == port {
                Some(r)
            } else if r == port {
                Some(l)
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn time_wait_connections_of_one_port_by_peer() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
            1: 0100007F:1F90 0100007F:C350 06 00000000:00000000 03:00001770 00000000     0        0 0 3\n\
            2: 0100007F:C351 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3\n\
            3: 0100007F:C350 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3\n\
            4: 0100007F:C352 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 5 1\n\
            5: 0100007F:C353 0100007F:1F91 06 00000000:00000000 03:00001770 00000000     0        0 0 3\n";
        let peers: std::collections::BTreeSet<u16> = super::time_wait_peers_in(table, 0x1F90)
            .into_iter()
            .collect();
        // 0xC350 closed by both sides at once (listed twice), 0xC351 by one; the listener,
        // the established connection and another port's connection are not counted.
        assert_eq!(peers.into_iter().collect::<Vec<_>>(), [0xC350, 0xC351]);
    }
}
