//! Downstream connections: the resolved HTTP settings, the per-connection watchdog (request
//! headers timeout from accept, idle timeout) and the per-listener connection cap.
//!
//! Why a watchdog of our own: hyper's HTTP/1 header-read timer starts only once the first
//! byte of a request has arrived, and HTTP/2 has none, so a socket that sends nothing, part of
//! the HTTP/2 preface, or opens no stream would stay open for good. The watchdog is one timer
//! per connection (not per request): the connection must start its first request within the
//! request headers timeout of being accepted, and is closed once no request has been in
//! flight for the idle timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::{HttpOptions, PathNormalization};

/// The command-line flags of `mesh-proxy run` and `mesh-proxy sidecar` for
/// [`HttpOptions`]: the values a config's `http` section may still override.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HttpArgs {
    /// Close a connection that has not sent a complete request head this long after it was
    /// accepted (or after the first byte of a later head) [default: 10s; 0s: off].
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub request_headers_timeout: Option<Duration>,
    /// Close a connection with no request in flight for this long [default: 1h; 0s: off].
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// End a request whose backend sends nothing for this long: 504 before the response
    /// head, a reset after it [default: 5m; 0s: off].
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub stream_idle_timeout: Option<Duration>,
    /// Open connections per listener; at the cap new ones wait in the kernel's backlog
    /// [default: half the open-file limit].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Request path normalization before routing: NONE, BASE, MERGE_SLASHES or
    /// DECODE_AND_MERGE_SLASHES (Istio's meshConfig.pathNormalization) [default: BASE].
    #[arg(long, value_name = "MODE")]
    pub path_normalization: Option<PathNormalization>,
}

impl HttpArgs {
    pub fn options(&self) -> HttpOptions {
        HttpOptions {
            request_headers_timeout: self.request_headers_timeout,
            idle_timeout: self.idle_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
            max_connections: self.max_connections,
            path_normalization: self.path_normalization,
            upgrades: None,
        }
    }
}

/// [`HttpOptions`] with every default filled in (config, then command line, then built-in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// `None`: off.
    pub request_headers_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    pub max_connections: usize,
    pub path_normalization: PathNormalization,
    /// Lowercase protocol names a request may upgrade to.
    pub upgrades: Box<[Box<str>]>,
}

impl HttpSettings {
    /// The settings of a config: its own values, else `cli`'s, else the defaults.
    pub fn resolve(config: &HttpOptions, cli: &HttpOptions) -> HttpSettings {
        let o = config.or(cli);
        let on = |d: Duration| (!d.is_zero()).then_some(d);
        HttpSettings {
            request_headers_timeout: on(o
                .request_headers_timeout
                .unwrap_or(HttpOptions::DEFAULT_REQUEST_HEADERS_TIMEOUT)),
            idle_timeout: on(o.idle_timeout.unwrap_or(HttpOptions::DEFAULT_IDLE_TIMEOUT)),
            stream_idle_timeout: on(o
                .stream_idle_timeout
                .unwrap_or(HttpOptions::DEFAULT_STREAM_IDLE_TIMEOUT)),
            max_connections: o
                .max_connections
                .map_or_else(default_max_connections, |n| n as usize),
            path_normalization: o.path_normalization.unwrap_or_default(),
            upgrades: o
                .upgrades
                .unwrap_or_else(|| vec!["websocket".to_string()])
                .into_iter()
                .map(|u| u.to_ascii_lowercase().into_boxed_str())
                .collect(),
        }
    }

    /// Whether every protocol an `Upgrade` header asks for is allowed (`h2c` never is).
    pub fn upgrade_allowed(&self, upgrade: &http::HeaderValue) -> bool {
        let Ok(v) = upgrade.to_str() else {
            return false;
        };
        let mut any = false;
        for token in v.split(',') {
            // `websocket`, `foo/2`: the protocol name, without its version.
            let name = token.trim().split('/').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            any = true;
            if name.eq_ignore_ascii_case("h2c")
                || !self.upgrades.iter().any(|u| name.eq_ignore_ascii_case(u))
            {
                return false;
            }
        }
        any
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings::resolve(&HttpOptions::default(), &HttpOptions::default())
    }
}

/// Half the process's open-file limit: each downstream connection may hold an upstream one,
/// and the listeners, pools and files need a few more.
pub fn default_max_connections() -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    (soft.saturating_sub(64) / 2).clamp(16, 1_000_000)
}

/// What the watchdog knows of one connection's requests. Written by the request path (two
/// relaxed atomic operations per request), read by the watchdog.
#[derive(Debug, Default)]
pub struct ConnWatch {
    started: AtomicU64,
    in_flight: AtomicU32,
    /// Signalled when the first request starts (ends the request headers timeout).
    first: Notify,
}

impl ConnWatch {
    /// Marks a request as started; it stays in flight until the returned mark is dropped
    /// (with its response body).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        if self.started.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first.notify_one();
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<ConnWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the watchdog ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request started within the request headers timeout of the accept.
    RequestHeaders,
    /// No request in flight for the idle timeout.
    Idle,
}

/// Resolves when the connection should be closed; never, if both timeouts are off.
///
/// The idle check ticks at an eighth of the idle timeout (at most every 30 s), so an idle
/// connection is closed between the idle timeout and an eighth more, with no clock read on
/// the request path. A connection that started no request counts as idle from its accept
/// when the request headers timeout is off.
pub async fn watchdog(
    watch: &ConnWatch,
    headers_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
) -> Expiry {
    if let Some(t) = headers_timeout {
        tokio::select! {
            _ = tokio::time::sleep(t) => {
                if watch.started() == 0 {
                    return Expiry::RequestHeaders;
                }
            }
            _ = watch.first.notified() => {}
        }
    }
    let Some(idle) = idle_timeout else {
        return std::future::pending().await;
    };
    let tick = (idle / 8).clamp(Duration::from_millis(1), Duration::from_secs(30));
    let mut seen = watch.started();
    // Counted from the first tick that saw the connection idle: it became idle at most a
    // tick earlier, so it is closed between `idle` and `idle + tick` after that.
    let mut idle_for: Option<Duration> = None;
    loop {
        tokio::time::sleep(tick).await;
        let started = watch.started();
        if watch.in_flight() > 0 || started != seen {
            seen = started;
            idle_for = None;
            continue;
        }
        let d = idle_for.map_or(Duration::ZERO, |d| d + tick);
        if d >= idle {
            return Expiry::Idle;
        }
        idle_for = Some(d);
    }
}

/// The connection cap of one listener: the accept loop takes a slot before each accept and
/// waits while none is free (new connections then wait in the kernel's backlog, as with
/// HAProxy's `maxconn`). The cap can change on reload.
#[derive(Debug)]
pub struct ConnectionSlots {
    open: AtomicUsize,
    cap: AtomicUsize,
    freed: Notify,
}

impl ConnectionSlots {
    pub fn new(cap: usize) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            open: AtomicUsize::new(0),
            cap: AtomicUsize::new(cap.max(1)),
            freed: Notify::new(),
        })
    }

    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap.max(1), Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits for a free slot and takes it.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let open = self.open.load(Ordering::Acquire);
            if open < self.cap.load(Ordering::Relaxed) {
                if self
                    .open
                    .compare_exchange(open, open + 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Slot(self.clone());
                }
                continue;
            }
            freed.await;
        }
    }
}

/// One open connection's place under the cap; freed when dropped.
#[derive(Debug)]
pub struct Slot(Arc<ConnectionSlots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_starts_no_request_expires_at_the_headers_timeout() {
        let w = Arc::new(ConnWatch::default());
        let t0 = tokio::time::Instant::now();
        let why = watchdog(
            &w,
            Some(Duration::from_secs(10)),
            Some(Duration::from_secs(3600)),
        );
        assert_eq!(why.await, Expiry::RequestHeaders);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_only_while_nothing_is_in_flight() {
        let w = Arc::new(ConnWatch::default());
        let t0 = tokio::time::Instant::now();
        let mark = w.begin();
        let w2 = w.clone();
        let dog = tokio::spawn(async move {
            watchdog(
                &w2,
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(8)),
            )
            .await
        });
        // A request in flight for a minute keeps the connection open.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!dog.is_finished());
        drop(mark);
        assert_eq!(dog.await.unwrap(), Expiry::Idle);
        let closed_after = t0.elapsed() - Duration::from_secs(60);
        assert!(
            closed_after >= Duration::from_secs(8) && closed_after <= Duration::from_secs(10),
            "{closed_after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeouts_never_expire() {
        let w = ConnWatch::default();
        let r = tokio::time::timeout(Duration::from_secs(86_400), watchdog(&w, None, None)).await;
        assert!(r.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_accepts_until_a_slot_is_freed() {
        let slots = ConnectionSlots::new(2);
        let a = slots.acquire().await;
        let _b = slots.acquire().await;
        let s2 = slots.clone();
        let third = tokio::spawn(async move { s2.acquire().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!third.is_finished());
        drop(a);
        let _c = third.await.unwrap();
        assert_eq!(slots.open(), 2);
        slots.set_cap(3);
        let _d = slots.acquire().await;
        assert_eq!(slots.open(), 3);
    }

    #[test]
    fn upgrades_need_every_protocol_allowed_and_never_h2c() {
        let s = HttpSettings::default();
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert!(s.upgrade_allowed(&v("websocket")));
        assert!(s.upgrade_allowed(&v("WebSocket")));
        assert!(!s.upgrade_allowed(&v("h2c")));
        assert!(!s.upgrade_allowed(&v("websocket, h2c")));
        assert!(!s.upgrade_allowed(&v("foo/1")));
        assert!(!s.upgrade_allowed(&v("")));
    }
}
