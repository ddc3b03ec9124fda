//! The load generator.
//!
//! - **Closed loop** (saturation): `conns` keep-alive connections, each sending its next
//!   request as soon as the previous response is complete, on `threads` single-threaded tokio
//!   runtimes (epoll, many connections per thread). Throughput = completed / measured time.
//! - **Open loop** (latency at a fixed rate, wrk2-style): `conns` keep-alive connections, each
//!   on its own OS thread with a fixed schedule (`rate / conns` requests per second, staggered).
//!   Request `i` of a connection is *intended* at `start + offset + i * interval`; latency is
//!   measured from that intended time, not from when it was actually sent, so a stall delays
//!   and charges every request scheduled behind it (coordinated-omission correction). Threads
//!   sleep with a 1 µs timer slack so the schedule is kept to a few microseconds.
//!
//! Both record into an HDR histogram (nanoseconds, 3 significant digits).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::http1;

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Responses completed in the measured window.
    pub requests: u64,
    /// Responses completed in the whole run (warm-up included), for CPU per request.
    pub total_requests: u64,
    /// Non-2xx responses and connection errors in the measured window.
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn finish(h: &Histogram<u64>, requests: u64, total: u64, errors: u64, secs: f64) -> LoadResult {
    let us = |v: u64| v as f64 / 1000.0;
    let q = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            us(h.value_at_quantile(p))
        }
    };
    LoadResult {
        requests,
        total_requests: total,
        errors,
        seconds: secs,
        rps: requests as f64 / secs.max(1e-9),
        p50_us: q(0.50),
        p90_us: q(0.90),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: if h.is_empty() { 0.0 } else { us(h.max()) },
        mean_us: if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
    }
}

/// Where to connect and what to send.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub request: Arc<Vec<u8>>,
    /// TLS (the webhook): client config and server name.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(t: &Target) -> std::io::Result<Box<dyn Io>> {
    let tcp = tokio::net::TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    match &t.tls {
        None => Ok(Box::new(tcp)),
        Some((cfg, name)) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await?;
            Ok(Box::new(s))
        }
    }
}

/// One request/response on an async stream. Returns the status and whether to reconnect.
async fn exchange(
    s: &mut Box<dyn Io>,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, bool)> {
    s.write_all(req).await?;
    buf.clear();
    loop {
        if let Some(p) = http1::parse(buf)? {
            return Ok((p.status, p.close));
        }
        let n = s.read_buf(buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
    }
}

struct ConnStats {
    hist: Histogram<u64>,
    requests: u64,
    total: u64,
    errors: u64,
}

async fn closed_conn(t: Target, warm_end: Instant, end: Instant) -> ConnStats {
    let mut st = ConnStats {
        hist: new_hist(),
        requests: 0,
        total: 0,
        errors: 0,
    };
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut conn: Option<Box<dyn Io>> = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let s = match &mut conn {
            Some(s) => s,
            None => match connect(&t).await {
                Ok(s) => conn.insert(s),
                Err(_) => {
                    if now >= warm_end {
                        st.errors += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        let r = exchange(s, &t.request, &mut buf).await;
        let t1 = Instant::now();
        let measured = t0 >= warm_end && t1 <= end;
        match r {
            Ok((status, close)) => {
                st.total += 1;
                if measured {
                    st.requests += 1;
                    if !(200..300).contains(&status) {
                        st.errors += 1;
                    }
                    let _ = st.hist.record((t1 - t0).as_nanos() as u64);
                }
                if close {
                    conn = None;
                }
            }
            Err(_) => {
                if measured {
                    st.errors += 1;
                }
                conn = None;
            }
        }
    }
    st
}

/// Closed loop: `conns` connections on `threads` threads for `warmup + duration`.
pub fn closed(
    t: &Target,
    conns: usize,
    threads: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let threads = threads.clamp(1, conns.max(1));
    let start = Instant::now() + Duration::from_millis(20);
    let warm_end = start + warmup;
    let end = warm_end + duration;
    let mut handles = Vec::new();
    for th in 0..threads {
        let n = conns / threads + usize::from(th < conns % threads);
        let t = t.clone();
        handles.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<ConnStats>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(async move {
                    let tasks: Vec<_> = (0..n)
                        .map(|_| tokio::spawn(closed_conn(t.clone(), warm_end, end)))
                        .collect();
                    let mut out = Vec::new();
                    for task in tasks {
                        if let Ok(s) = task.await {
                            out.push(s);
                        }
                    }
                    out
                }))
            },
        ));
    }
    let mut hist = new_hist();
    let (mut req, mut total, mut errors) = (0, 0, 0);
    for h in handles {
        let stats = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        for s in stats {
            hist.add(&s.hist).context("merging histograms")?;
            req += s.requests;
            total += s.total;
            errors += s.errors;
        }
    }
    Ok(finish(&hist, req, total, errors, duration.as_secs_f64()))
}

/// Sets this thread's timer slack to 1 µs, so sleeps end within microseconds of the schedule.
fn precise_timers() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes an integer and only affects the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
}

fn blocking_exchange(
    s: &mut std::net::TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, bool)> {
    s.write_all(req)?;
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(p) = http1::parse(buf)? {
            return Ok((p.status, p.close));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn blocking_connect(addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Open loop at `rate` requests/s over `conns` connections (plain TCP only).
pub fn open(
    t: &Target,
    rate: f64,
    conns: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(t.tls.is_none(), "open loop is plain HTTP only");
    anyhow::ensure!(
        rate > 0.0 && conns > 0,
        "rate and connections must be positive"
    );
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    // Connect everything first, then start the schedule.
    let mut streams = Vec::new();
    for _ in 0..conns {
        streams.push(blocking_connect(t.addr).context("connecting")?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let warm_end = start + warmup;
    let end = warm_end + duration;
    let mut handles = Vec::new();
    for (k, mut s) in streams.into_iter().enumerate() {
        let t = t.clone();
        let offset = interval.mul_f64(k as f64 / conns as f64);
        handles.push(std::thread::spawn(move || {
            precise_timers();
            let mut st = ConnStats {
                hist: new_hist(),
                requests: 0,
                total: 0,
                errors: 0,
            };
            let mut buf = Vec::with_capacity(16 * 1024);
            let mut ok = true;
            for i in 0u64.. {
                let intended = start + offset + interval.mul_f64(i as f64);
                if intended >= end {
                    break;
                }
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                if !ok {
                    match blocking_connect(t.addr) {
                        Ok(n) => s = n,
                        Err(_) => {
                            if intended >= warm_end {
                                st.errors += 1;
                            }
                            continue;
                        }
                    }
                }
                let r = blocking_exchange(&mut s, &t.request, &mut buf);
                let done = Instant::now();
                let measured = intended >= warm_end;
                match r {
                    Ok((status, close)) => {
                        st.total += 1;
                        if measured {
                            st.requests += 1;
                            if !(200..300).contains(&status) {
                                st.errors += 1;
                            }
                            let _ = st.hist.record((done - intended).as_nanos() as u64);
                        }
                        ok = !close;
                    }
                    Err(_) => {
                        if measured {
                            st.errors += 1;
                        }
                        ok = false;
                    }
                }
            }
            st
        }));
    }
    let mut hist = new_hist();
    let (mut req, mut total, mut errors) = (0, 0, 0);
    for h in handles {
        let s = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        hist.add(&s.hist).context("merging histograms")?;
        req += s.requests;
        total += s.total;
        errors += s.errors;
    }
    Ok(finish(&hist, req, total, errors, duration.as_secs_f64()))
}
