//! Counts the TCP connections opened to one loopback port, in the kernel: a packet socket on
//! `lo` whose BPF filter keeps only connection-opening SYNs (SYN without ACK) to that port.
//! Nothing is read from the socket: the kernel's count of packets that passed the filter
//! (`PACKET_STATISTICS`, queued and dropped alike) is the count. It does not depend on how a
//! connection ends (with mutual TLS a close often ends in a reset, which leaves no TIME_WAIT
//! socket to count) nor on what the proxies report about themselves.
//!
//! Opening a packet socket needs `CAP_NET_RAW` (root); without it there is no count.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `PACKET_STATISTICS` (linux/if_packet.h): the socket's counters, reset when read.
const PACKET_STATISTICS: libc::c_int = 6;

#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    /// Packets that passed the filter, dropped ones included (the kernel adds them when read).
    tp_packets: u32,
    tp_drops: u32,
}

/// Counts SYNs to `127.0.0.1:port` from [`SynCounter::open`] on.
pub(super) struct SynCounter {
    fd: OwnedFd,
}

/// Classic BPF over an IPv4 packet (no link header: `SOCK_DGRAM`): TCP, not a later fragment,
/// destination `port`, SYN set and ACK clear.
fn filter(port: u16) -> [libc::sock_filter; 12] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    [
        op(0x30, 0, 0, 9),               // 0: A = ip[9] (protocol)
        op(0x15, 0, 9, 6),               // 1: A == TCP ? next : drop
        op(0x28, 0, 0, 6),               // 2: A = ip[6:2] (flags, fragment offset)
        op(0x45, 7, 0, 0x1fff),          // 3: a later fragment ? drop : next
        op(0xb1, 0, 0, 0),               // 4: X = IP header length
        op(0x48, 0, 0, 2),               // 5: A = tcp[2:2] (destination port)
        op(0x15, 0, 4, u32::from(port)), // 6: A == port ? next : drop
        op(0x50, 0, 0, 13),              // 7: A = tcp[13] (flags)
        op(0x54, 0, 0, 0x12),            // 8: A &= SYN | ACK
        op(0x15, 0, 1, 0x02),            // 9: A == SYN ? keep : drop
        op(0x06, 0, 0, 64),              // 10: keep (64 bytes)
        op(0x06, 0, 0, 0),               // 11: drop
    ]
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl SynCounter {
    pub(super) fn open(port: u16) -> io::Result<SynCounter> {
        let proto = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto.into()) };
        check(raw)?;
        // SAFETY: `raw` is a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let prog = filter(port);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies it.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        })?;
        // Nothing is read: a small buffer, full after a few packets (the rest count as drops).
        let small: libc::c_int = 4096;
        // SAFETY: an int option, passed by pointer and size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
        // SAFETY: a NUL-terminated name.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        if lo == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = lo as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size given.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        let c = SynCounter { fd };
        // Packets taken before the filter was attached are not ours: start from zero.
        c.take()?;
        Ok(c)
    }

    /// SYNs counted since the last call (or since `open`).
    pub(super) fn take(&self) -> io::Result<u64> {
        let mut st = TpacketStats::default();
        let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
        // SAFETY: `st` is a tpacket_stats of the size given; the kernel writes at most `len`.
        check(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                (&mut st as *mut TpacketStats).cast(),
                &mut len,
            )
        })?;
        Ok(u64::from(st.tp_packets))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::SynCounter;

    #[test]
    fn counts_each_connection_to_its_port_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counter = match SynCounter::open(port) {
            Ok(c) => c,
            // Without CAP_NET_RAW the benchmark reports no count; nothing to test here.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return,
            Err(e) => panic!("opening the counter: {e}"),
        };
        let mut kept = Vec::new();
        for _ in 0..25 {
            kept.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
            kept.push(TcpStream::connect(other.local_addr().unwrap()).unwrap());
        }
        for _ in 0..25 {
            // Data and closes on the counted port are not connections.
            let (mut s, _) = listener.accept().unwrap();
            std::io::Write::write_all(&mut s, b"x").unwrap();
        }
        drop(kept);
        assert_eq!(counter.take().unwrap(), 25);
        // Reset by reading.
        TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(counter.take().unwrap(), 1);
    }
}
