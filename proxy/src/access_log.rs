//! JSON access log: one line per request, written off the request path.
//!
//! On/off and destination come from [`mesh_config::AccessLog::path`]: `None` is off,
//! `/dev/stdout` and `/dev/stderr` are the process's streams (Istio's `accessLogFile:
//! /dev/stdout`), anything else is a file opened for appending. [`AccessLogger::reconfigure`]
//! switches on reload.
//!
//! The request path only builds an [`AccessLogEntry`] (check [`AccessLogger::is_enabled`]
//! first) and hands it to [`AccessLogger::log`], which never blocks: the entry goes into a
//! bounded channel read by a dedicated writer thread that serialises and writes in batches. When
//! the channel is full the entry is dropped and counted (`mesh_access_log_dropped_total`).
//!
//! A line (keys always present, `null` when unknown):
//!
//! ```json
//! {"start_time":"2025-01-02T03:04:05.678Z","method":"GET","path":"/other","protocol":"HTTP/1.1",
//!  "status":429,"bytes_received":0,"bytes_sent":18,"duration_ms":0.412,
//!  "upstream_host":null,"listener":"demo/istio-gwapi/http","route":"demo/otherapp/0/0",
//!  "backend":null,"x_request_id":"…","user_agent":"curl/8.5.0","authority":"localhost",
//!  "downstream_remote_address":"127.0.0.1:53422","rate_limited":true,"response_flags":"RL"}
//! ```
//!
//! Secrets are never logged: no header is logged except `x-request-id`, `user-agent` and the
//! authority (so never `Authorization`, `Cookie`, `Proxy-Authorization`), and the path is logged
//! without its query string (which often carries tokens).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::Version;
use prometheus_client::metrics::counter::Counter;
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Entries waiting to be written before new ones are dropped.
pub const DEFAULT_QUEUE: usize = 8192;

/// Envoy-style response flags (the `response_flags` field, comma separated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    /// `RL`: refused by a local rate limit.
    pub const RATE_LIMITED: ResponseFlags = ResponseFlags(1);
    /// `NR`: no route (or virtual host) matched.
    pub const NO_ROUTE: ResponseFlags = ResponseFlags(1 << 1);
    /// `UH`: the backend had no endpoint.
    pub const NO_HEALTHY_UPSTREAM: ResponseFlags = ResponseFlags(1 << 2);
    /// `UF`: connecting to the upstream failed.
    pub const UPSTREAM_CONNECT_FAILURE: ResponseFlags = ResponseFlags(1 << 3);
    /// `UT`: the upstream did not answer in time.
    pub const UPSTREAM_TIMEOUT: ResponseFlags = ResponseFlags(1 << 4);
    /// `UC`: the upstream connection ended before a complete response.
    pub const UPSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 5);
    /// `DC`: the downstream connection ended before the response was complete.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 6);
    /// `DPE`: the downstream request was invalid (e.g. headers too large, 431).
    pub const DOWNSTREAM_PROTOCOL_ERROR: ResponseFlags = ResponseFlags(1 << 7);
    /// `UPE`: the upstream sent an invalid response.
    pub const UPSTREAM_PROTOCOL_ERROR: ResponseFlags = ResponseFlags(1 << 8);
    /// `DI`: a direct response or redirect configured on the route.
    pub const DIRECT_RESPONSE: ResponseFlags = ResponseFlags(1 << 9);
    /// `SI`: the stream idle timeout ended the request (the backend went silent).
    pub const STREAM_IDLE_TIMEOUT: ResponseFlags = ResponseFlags(1 << 10);

    const CODES: [(ResponseFlags, &'static str); 11] = [
        (ResponseFlags::RATE_LIMITED, "RL"),
        (ResponseFlags::NO_ROUTE, "NR"),
        (ResponseFlags::NO_HEALTHY_UPSTREAM, "UH"),
        (ResponseFlags::UPSTREAM_CONNECT_FAILURE, "UF"),
        (ResponseFlags::UPSTREAM_TIMEOUT, "UT"),
        (ResponseFlags::UPSTREAM_CONNECTION_TERMINATION, "UC"),
        (ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION, "DC"),
        (ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
        (ResponseFlags::UPSTREAM_PROTOCOL_ERROR, "UPE"),
        (ResponseFlags::DIRECT_RESPONSE, "DI"),
        (ResponseFlags::STREAM_IDLE_TIMEOUT, "SI"),
    ];

    pub const fn empty() -> ResponseFlags {
        ResponseFlags(0)
    }

    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, rhs: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | rhs.0)
    }
}

impl fmt::Display for ResponseFlags {
    /// Comma-separated codes (`UF,UT`), or `-` when empty (Envoy's convention).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, code) in ResponseFlags::CODES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(code)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// One request's line. Built on the request path, serialised by the writer thread.
#[derive(Debug, Clone)]
pub struct AccessLogEntry {
    /// Wall-clock time the request arrived.
    pub start_time: SystemTime,
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'static str,
    /// Status sent downstream (0 if none was sent).
    pub status: u16,
    /// Request body bytes received from downstream.
    pub bytes_received: u64,
    /// Response body bytes sent downstream.
    pub bytes_sent: u64,
    /// From arrival to the end of the response.
    pub duration: Duration,
    /// The endpoint (`ip:port`) the request was sent to, if any.
    pub upstream_host: Option<String>,
    pub listener: Arc<str>,
    pub route: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    pub x_request_id: Option<String>,
    pub user_agent: Option<String>,
    /// The Host header (or `:authority`).
    pub authority: Option<String>,
    pub downstream_remote_address: Option<SocketAddr>,
    pub rate_limited: bool,
    pub response_flags: ResponseFlags,
}

fn header_str(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `HTTP/1.1` etc.
pub fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

impl AccessLogEntry {
    /// An entry with what the request itself tells (method, path, protocol, `x-request-id`,
    /// `user-agent`, authority), the start time now, and everything else empty.
    pub fn from_request(
        parts: &http::request::Parts,
        listener: Arc<str>,
        downstream_remote_address: Option<SocketAddr>,
    ) -> AccessLogEntry {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| header_str(&parts.headers, "host"));
        AccessLogEntry {
            start_time: SystemTime::now(),
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            protocol: protocol_name(parts.version),
            status: 0,
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            upstream_host: None,
            listener,
            route: None,
            backend: None,
            x_request_id: header_str(&parts.headers, "x-request-id"),
            user_agent: header_str(&parts.headers, "user-agent"),
            authority,
            downstream_remote_address,
            rate_limited: false,
            response_flags: ResponseFlags::empty(),
        }
    }

    /// The JSON line (without the newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Serialize for AccessLogEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(18))?;
        m.serialize_entry("start_time", &rfc3339(self.start_time))?;
        m.serialize_entry("method", &self.method)?;
        m.serialize_entry("path", &self.path)?;
        m.serialize_entry("protocol", self.protocol)?;
        m.serialize_entry("status", &self.status)?;
        m.serialize_entry("bytes_received", &self.bytes_received)?;
        m.serialize_entry("bytes_sent", &self.bytes_sent)?;
        // Milliseconds with microsecond precision.
        let ms = (self.duration.as_micros() as f64) / 1000.0;
        m.serialize_entry("duration_ms", &ms)?;
        m.serialize_entry("upstream_host", &self.upstream_host)?;
        m.serialize_entry("listener", &*self.listener)?;
        m.serialize_entry("route", &self.route.as_deref())?;
        m.serialize_entry("backend", &self.backend.as_deref())?;
        m.serialize_entry("x_request_id", &self.x_request_id)?;
        m.serialize_entry("user_agent", &self.user_agent)?;
        m.serialize_entry("authority", &self.authority)?;
        m.serialize_entry(
            "downstream_remote_address",
            &self.downstream_remote_address.map(|a| a.to_string()),
        )?;
        m.serialize_entry("rate_limited", &self.rate_limited)?;
        m.serialize_entry("response_flags", &self.response_flags.to_string())?;
        m.end()
    }
}

/// RFC 3339 UTC timestamp with milliseconds: `2025-01-02T03:04:05.678Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Where lines go.
enum Destination {
    Stdout,
    Stderr,
    File(std::fs::File),
}

impl Destination {
    fn open(path: &str) -> io::Result<Destination> {
        Ok(match path {
            "/dev/stdout" => Destination::Stdout,
            "/dev/stderr" => Destination::Stderr,
            _ => Destination::File(OpenOptions::new().create(true).append(true).open(path)?),
        })
    }

    fn writer(self) -> Box<dyn Write + Send> {
        match self {
            Destination::Stdout => Box::new(io::stdout()),
            Destination::Stderr => Box::new(io::stderr()),
            Destination::File(f) => Box::new(f),
        }
    }
}

struct Sink {
    path: String,
    tx: SyncSender<AccessLogEntry>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn write_loop(rx: Receiver<AccessLogEntry>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(1024);
    let mut write = |out: &mut BufWriter<_>, e: &AccessLogEntry| {
        line.clear();
        if serde_json::to_writer(&mut line, e).is_ok() {
            line.push(b'\n');
            if let Err(err) = out.write_all(&line) {
                tracing::warn!(%err, "access log write failed");
            }
        }
    };
    // Block for the first entry of a batch, drain what is queued, then flush.
    while let Ok(e) = rx.recv() {
        write(&mut out, &e);
        while let Ok(e) = rx.try_recv() {
            write(&mut out, &e);
        }
        if let Err(err) = out.flush() {
            tracing::warn!(%err, "access log flush failed");
        }
    }
    let _ = out.flush();
}

impl Sink {
    fn start(path: &str, queue: usize) -> io::Result<Sink> {
        let dest = Destination::open(path)?;
        Sink::start_writer(path, dest.writer(), queue)
    }

    fn start_writer(path: &str, out: Box<dyn Write + Send>, queue: usize) -> io::Result<Sink> {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let handle = std::thread::Builder::new()
            .name("mesh-access-log".into())
            .spawn(move || write_loop(rx, out))?;
        Ok(Sink {
            path: path.to_owned(),
            tx,
            writer: Mutex::new(Some(handle)),
        })
    }
}

/// The access logger of one proxy process; cheap to share (`Arc<AccessLogger>`).
pub struct AccessLogger {
    sink: ArcSwapOption<Sink>,
    queue: usize,
    dropped: Counter,
    /// Serialises reconfiguration.
    reconfigure: Mutex<()>,
}

impl fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogger")
            .field("path", &self.path())
            .field("dropped", &self.dropped.get())
            .finish()
    }
}

impl AccessLogger {
    /// A logger that is off. `dropped` is the counter of dropped lines (pass
    /// [`crate::metrics::Metrics::access_log_dropped_counter`] to export it).
    pub fn new(dropped: Counter) -> AccessLogger {
        AccessLogger::with_queue(dropped, DEFAULT_QUEUE)
    }

    /// Like [`AccessLogger::new`] with a queue of `queue` entries.
    pub fn with_queue(dropped: Counter, queue: usize) -> AccessLogger {
        AccessLogger {
            sink: ArcSwapOption::empty(),
            queue,
            dropped,
            reconfigure: Mutex::new(()),
        }
    }

    /// Applies a config's access log setting: starts, stops or redirects the writer. On error
    /// (the file cannot be opened) the previous setting stays. The previous writer finishes
    /// the lines already queued.
    pub fn reconfigure(&self, config: &mesh_config::AccessLog) -> io::Result<()> {
        let _serial = self
            .reconfigure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.sink.load();
        if current.as_ref().map(|s| s.path.as_str()) == config.path.as_deref() {
            return Ok(());
        }
        let new = match &config.path {
            Some(path) => Some(Arc::new(Sink::start(path, self.queue)?)),
            None => None,
        };
        drop(current);
        // Dropping the old sink (once no `log` call holds it) closes its channel; its thread
        // writes what is queued and exits.
        self.sink.store(new);
        Ok(())
    }

    /// Test hook: log to `out` (named `name`).
    #[cfg(test)]
    fn start_with_writer(&self, name: &str, out: Box<dyn Write + Send>) {
        let sink = Sink::start_writer(name, out, self.queue).expect("spawn writer");
        self.sink.store(Some(Arc::new(sink)));
    }

    pub fn is_enabled(&self) -> bool {
        self.sink.load().is_some()
    }

    /// The current destination, if on.
    pub fn path(&self) -> Option<String> {
        self.sink.load().as_ref().map(|s| s.path.clone())
    }

    /// Queues one line; never blocks. Dropped (and counted) when the queue is full or the
    /// logger is off (nothing counted then).
    pub fn log(&self, entry: AccessLogEntry) {
        if let Some(sink) = &*self.sink.load() {
            match sink.tx.try_send(entry) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.inc();
                }
            }
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Turns the log off and waits until every queued line is written (shutdown, tests).
    pub fn close(&self) {
        let _serial = self
            .reconfigure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sink) = self.sink.swap(None) {
            let handle = sink
                .writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            drop(sink);
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
    }
}

impl Drop for AccessLogger {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
