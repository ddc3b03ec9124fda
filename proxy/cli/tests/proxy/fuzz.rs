//! Property-based tests of the request path: generated and broken HTTP/1 requests (methods,
//! targets, header names and values, Host forms, Content-Length/Transfer-Encoding
//! combinations, chunked bodies, truncations, garbage bytes) written over real sockets to an
//! in-process proxy in front of a real backend.
//!
//! For every generated request:
//! - everything the proxy sends back parses as a sequence of well-formed HTTP/1.x responses
//!   (or nothing at all: the proxy may just close the connection);
//! - the proxy answers or closes within a few seconds of the client's end of input (no hang);
//! - when the proxy itself answers the request 4xx, the backend never received that request
//!   (each generated request carries a unique `x-fuzz-case` marker the backend records);
//! - no panic anywhere in the proxy or its HTTP stack;
//! - a normal request on a new connection is served afterwards.
//!
//! Cases: `PROPTEST_CASES` (default [`DEFAULT_CASES`]); `bench/fuzz.sh` runs many more.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

/// Cases per run when `PROPTEST_CASES` is not set: each costs a few connections and, when
/// the proxy keeps the connection open, one idle wait ([`IDLE`]).
const DEFAULT_CASES: u32 = 64;

/// How long the client waits for more bytes before it ends its input (half-close). Responses
/// that have not arrived by then are not needed for the properties: what follows the client's
/// end of input is checked with [`HANG`].
const IDLE: Duration = Duration::from_millis(250);

/// After the client's end of input, the proxy must have answered and closed within this.
const HANG: Duration = Duration::from_secs(10);

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Panics anywhere in the process except in test code (the proxy runs in this process).

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            // Assertions of the other tests in this binary are theirs to report.
            if !location.contains("tests/") {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{location}: {message}"));
            }
            previous(info)
        }));
    });
}

fn panics() -> Vec<String> {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ---------------------------------------------------------------------------------------
// The backend: records the marker of every request it received whole, answers 200 with
// `x-fuzz-backend` so a client can tell its answers from the proxy's own.

struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<HashSet<String>>>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let marker = req
                                .headers()
                                .get("x-fuzz-case")
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                            // Only a request received whole counts as received.
                            if req.into_body().collect().await.is_ok()
                                && let Some(m) = marker
                            {
                                s.lock().unwrap().insert(m);
                            }
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("x-fuzz-backend", "1")
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, seen }
    }

    fn received(&self, marker: &str) -> bool {
        self.seen.lock().unwrap().contains(marker)
    }
}

// ---------------------------------------------------------------------------------------
// Generated requests.

#[derive(Clone, Debug)]
enum Framing {
    /// No body headers (and maybe stray body bytes).
    None(Vec<u8>),
    /// `Content-Length: declared` followed by `body` (which may not match).
    Length { declared: String, body: Vec<u8> },
    /// Two Content-Length headers.
    TwoLengths(String, String, Vec<u8>),
    /// `Transfer-Encoding: te`, a chunked body, maybe a Content-Length as well.
    Chunked {
        te: String,
        length: Option<String>,
        chunks: Vec<Chunk>,
        last: bool,
        trailers: Vec<(String, String)>,
    },
}

#[derive(Clone, Debug)]
struct Chunk {
    /// `None`: the right size in hex.
    size: Option<String>,
    ext: Option<String>,
    data: Vec<u8>,
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Replace(prop::sample::Index, u8),
}

#[derive(Clone)]
struct RequestSpec {
    method: Vec<u8>,
    target: Vec<u8>,
    version: &'static str,
    lf_only: bool,
    hosts: Vec<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Index (into `headers`) before which the marker goes.
    marker_at: prop::sample::Index,
    framing: Framing,
    close: bool,
    mutations: Vec<Mutation>,
    /// A normal request pipelined after the generated one (`Some(close)`).
    follow_up: Option<bool>,
}

/// One generated case and the marker its request carries.
struct Case {
    spec: RequestSpec,
    marker: String,
}

impl std::fmt::Debug for RequestSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (wire, _) = self.build("MARKER", "MARKER2");
        write!(f, "b\"{}\"", wire.escape_ascii())
    }
}

impl RequestSpec {
    /// The bytes sent, and whether the first request is a HEAD (no response body).
    fn build(&self, marker: &str, marker2: &str) -> (Vec<u8>, bool) {
        let eol: &[u8] = if self.lf_only { b"\n" } else { b"\r\n" };
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for h in &self.hosts {
            headers.push((b"Host".to_vec(), h.clone()));
        }
        headers.extend(self.headers.iter().cloned());
        let mut body = Vec::new();
        match &self.framing {
            Framing::None(b) => body.extend_from_slice(b),
            Framing::Length { declared, body: b } => {
                headers.push((b"Content-Length".to_vec(), declared.clone().into_bytes()));
                body.extend_from_slice(b);
            }
            Framing::TwoLengths(a, b, data) => {
                headers.push((b"Content-Length".to_vec(), a.clone().into_bytes()));
                headers.push((b"content-length".to_vec(), b.clone().into_bytes()));
                body.extend_from_slice(data);
            }
            Framing::Chunked {
                te,
                length,
                chunks,
                last,
                trailers,
            } => {
                headers.push((b"Transfer-Encoding".to_vec(), te.clone().into_bytes()));
                if let Some(l) = length {
                    headers.push((b"Content-Length".to_vec(), l.clone().into_bytes()));
                }
                for c in chunks {
                    match &c.size {
                        Some(s) => body.extend_from_slice(s.as_bytes()),
                        None => body.extend_from_slice(format!("{:x}", c.data.len()).as_bytes()),
                    }
                    if let Some(e) = &c.ext {
                        body.push(b';');
                        body.extend_from_slice(e.as_bytes());
                    }
                    body.extend_from_slice(b"\r\n");
                    body.extend_from_slice(&c.data);
                    body.extend_from_slice(b"\r\n");
                }
                if *last {
                    body.extend_from_slice(b"0\r\n");
                    for (k, v) in trailers {
                        body.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                    }
                    body.extend_from_slice(b"\r\n");
                }
            }
        }
        if self.close {
            headers.push((b"Connection".to_vec(), b"close".to_vec()));
        }
        let at = self.marker_at.index(headers.len() + 1);
        headers.insert(at, (b"x-fuzz-case".to_vec(), marker.as_bytes().to_vec()));

        let mut wire = Vec::new();
        wire.extend_from_slice(&self.method);
        wire.push(b' ');
        wire.extend_from_slice(&self.target);
        if !self.version.is_empty() {
            wire.push(b' ');
            wire.extend_from_slice(self.version.as_bytes());
        }
        wire.extend_from_slice(eol);
        for (k, v) in &headers {
            wire.extend_from_slice(k);
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(v);
            wire.extend_from_slice(eol);
        }
        wire.extend_from_slice(eol);
        wire.extend_from_slice(&body);
        for m in &self.mutations {
            match m {
                Mutation::Truncate(i) => {
                    let at = i.index(wire.len() + 1);
                    wire.truncate(at);
                }
                Mutation::Insert(i, bytes) => {
                    let at = i.index(wire.len() + 1);
                    wire.splice(at..at, bytes.iter().copied());
                }
                Mutation::Replace(i, b) => {
                    if !wire.is_empty() {
                        let at = i.index(wire.len());
                        wire[at] = *b;
                    }
                }
            }
        }
        if let Some(close) = self.follow_up {
            wire.extend_from_slice(
                format!(
                    "GET /follow-up HTTP/1.1\r\nHost: fuzz\r\nx-fuzz-case: {marker2}\r\n{}\r\n",
                    if close { "Connection: close\r\n" } else { "" }
                )
                .as_bytes(),
            );
        }
        (wire, self.method == b"HEAD")
    }
}

fn token() -> impl Strategy<Value = String> {
    "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn method() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
            "get", "PROPFIND",
        ])
        .prop_map(|m| m.as_bytes().to_vec()),
        1 => token().prop_map(String::into_bytes),
        1 => bytes(8),
    ]
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "fuzz",
            "example.com",
            "example.com:80",
            "EXAMPLE.com.",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8080",
            "[::1",
            "host:port",
            "host:99999",
            "a:b:c",
            "user@host",
            "",
            ":80",
            "xn--bcher-kva.example",
            "a..b",
            "*.example.com",
        ])
        .prop_map(String::from),
        "[a-z0-9.-]{1,20}(:[0-9]{1,6})?",
        "[ -~]{0,24}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "/[a-zA-Z0-9._~!$&'()*+,;=:@/%?-]{0,40}",
        1 => prop::sample::select(vec![
            "/", "//", "/../../etc/passwd", "/%zz", "/%00", "/a?b=%", "/a#frag", "/?", "/a b",
        ])
        .prop_map(String::from),
        1 => (1usize..12_000).prop_map(|n| format!("/{}", "a".repeat(n))),
    ]
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => path().prop_map(String::into_bytes),
        1 => Just(b"*".to_vec()),
        2 => (host(), path()).prop_map(|(h, p)| format!("http://{h}{p}").into_bytes()),
        1 => (host(), path()).prop_map(|(h, p)| format!("https://{h}{p}").into_bytes()),
        1 => host().prop_map(String::into_bytes),
        1 => bytes(40),
    ]
}

fn header_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "Expect",
            "TE", "Trailer", "Keep-Alive", "Proxy-Connection", "X-Forwarded-For",
            "X-Request-Id", "Accept", "Cookie", "Content-Type", "Authorization",
        ])
        .prop_map(|n| n.as_bytes().to_vec()),
        6 => token().prop_map(String::into_bytes),
        1 => bytes(12),
        // obs-fold: a continuation line.
        1 => token().prop_map(|t| format!("{t}: a\r\n folded").into_bytes()),
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => "[ -~]{0,30}".prop_map(String::into_bytes),
        2 => prop::sample::select(vec![
            "close", "keep-alive", "upgrade", "websocket", "h2c", "100-continue", "chunked",
            "trailers", "0", "-1", "1e3", "gzip, chunked",
        ])
        .prop_map(|v| v.as_bytes().to_vec()),
        1 => bytes(20),
        1 => (1usize..80_000).prop_map(|n| vec![b'v'; n]),
    ]
}

fn length_text(actual: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(actual.to_string()),
        1 => (0usize..64).prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![
            "", "-1", "+5", " 5", "5 ", "0x10", "5, 5", "5,6", "18446744073709551616",
            "99999999999", "1e2", "abc",
        ])
        .prop_map(String::from),
    ]
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        bytes(40),
        prop::option::weighted(
            0.2,
            prop_oneof![
                "[0-9a-fA-F]{1,4}",
                prop::sample::select(vec!["", "-1", "g", "ffffffffffffffffff", " 5", "5 "])
                    .prop_map(String::from),
            ],
        ),
        prop::option::weighted(0.15, "[ -~]{0,10}"),
    )
        .prop_map(|(data, size, ext)| Chunk { size, ext, data })
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        3 => prop_oneof![3 => Just(Vec::new()), 1 => bytes(30)].prop_map(Framing::None),
        3 => bytes(64).prop_flat_map(|body| {
            length_text(body.len()).prop_map(move |declared| Framing::Length {
                declared,
                body: body.clone(),
            })
        }),
        1 => (bytes(16), (0usize..20), (0usize..20)).prop_map(|(b, x, y)| {
            Framing::TwoLengths(x.to_string(), y.to_string(), b)
        }),
        3 => (
            prop_oneof![
                4 => Just("chunked".to_string()),
                1 => prop::sample::select(vec![
                    "Chunked", " chunked", "chunked, gzip", "gzip, chunked", "identity",
                    "chunked, chunked", "chunked\x0b", "xchunked", "",
                ])
                .prop_map(String::from),
            ],
            prop::option::weighted(0.2, length_text(10)),
            prop::collection::vec(chunk(), 0..4),
            prop::bool::weighted(0.85),
            prop::collection::vec(("[a-zA-Z-]{1,10}", "[ -~]{0,10}"), 0..2),
        )
            .prop_map(|(te, length, chunks, last, trailers)| Framing::Chunked {
                te,
                length,
                chunks,
                last,
                trailers,
            }),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
    ]
}

/// Mostly valid requests (so that many reach the backend and the borderline ones are
/// interesting) and wild ones, about half each.
fn request() -> impl Strategy<Value = RequestSpec> {
    prop_oneof![request_with(true), request_with(false)]
}

fn request_with(sane: bool) -> impl Strategy<Value = RequestSpec> {
    let line = if sane {
        (
            prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
                .prop_map(|m| m.as_bytes().to_vec())
                .boxed(),
            "/[a-zA-Z0-9._~!$&'()*+,;=:@/?-]{0,30}"
                .prop_map(String::into_bytes)
                .boxed(),
            prop_oneof![9 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0")].boxed(),
            Just(false).boxed(),
        )
    } else {
        (
            method().boxed(),
            target().boxed(),
            prop_oneof![
                8 => Just("HTTP/1.1"),
                1 => Just("HTTP/1.0"),
                1 => prop::sample::select(vec![
                    "HTTP/2.0", "HTTP/1.2", "HTTP/1", "http/1.1", "HTTP/1.1 ", "HTTP/0.9", "",
                ]),
            ]
            .boxed(),
            prop::bool::weighted(0.1).boxed(),
        )
    };
    let hosts = if sane {
        "[a-z][a-z0-9]{0,10}(\\.[a-z]{2,5})?(:[0-9]{2,4})?"
            .prop_map(|h| vec![h.into_bytes()])
            .boxed()
    } else {
        prop_oneof![
            6 => "[a-z0-9.-]{1,20}(:[0-9]{1,5})?".prop_map(|h| vec![h.into_bytes()]),
            2 => host().prop_map(|h| vec![h.into_bytes()]),
            1 => Just(Vec::new()),
            1 => prop::collection::vec(host().prop_map(String::into_bytes), 2..4),
        ]
        .boxed()
    };
    let headers = if sane {
        prop::collection::vec(
            (
                token().prop_map(String::into_bytes),
                "[!-~]([ -~]{0,28}[!-~])?".prop_map(String::into_bytes),
            ),
            0..4,
        )
        .boxed()
    } else {
        prop::collection::vec((header_name(), header_value()), 0..6).boxed()
    };
    let mutations = if sane {
        prop_oneof![9 => Just(Vec::new()), 1 => prop::collection::vec(mutation(), 1..2)].boxed()
    } else {
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(mutation(), 1..3)].boxed()
    };
    (
        line,
        (
            hosts,
            headers,
            any::<prop::sample::Index>(),
            framing(),
            any::<bool>(),
        ),
        (mutations, prop::option::weighted(0.3, any::<bool>())),
    )
        .prop_map(
            |(
                (method, target, version, lf_only),
                (hosts, headers, marker_at, framing, close),
                (mutations, follow_up),
            )| RequestSpec {
                method,
                target,
                version,
                lf_only,
                hosts,
                headers,
                marker_at,
                framing,
                close,
                mutations,
                follow_up,
            },
        )
}

// ---------------------------------------------------------------------------------------
// The exchange and what the client saw.

/// Writes `wire` on a new connection while reading; ends its input after [`IDLE`] without
/// news, then reads until the proxy closes. Returns the bytes read, or an error if the proxy
/// neither answered nor closed within [`HANG`] of the client's end of input.
async fn exchange(addr: SocketAddr, wire: Vec<u8>) -> Result<Vec<u8>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    // The write half comes back so that it is not dropped (dropping it ends the input).
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&wire).await;
        wr
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut writer = Some(writer);
    let mut deadline = None;
    loop {
        let wait = match deadline {
            None => IDLE,
            Some(d) => d - tokio::time::Instant::now().min(d),
        };
        match tokio::time::timeout(wait, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => match writer.take() {
                Some(w) => {
                    // End of input: the write half is dropped (FIN), mid-write or not.
                    w.abort();
                    let _ = w.await;
                    deadline = Some(tokio::time::Instant::now() + HANG);
                }
                None => {
                    return Err(format!(
                        "the proxy neither answered nor closed the connection within {HANG:?} \
                         of the client's end of input; it sent {:?}",
                        String::from_utf8_lossy(&out)
                    ));
                }
            },
        }
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    from_backend: bool,
}

/// Parses everything read as HTTP/1.x responses, each complete. The first final response
/// answers a HEAD when `head` (no body).
fn parse_responses(mut data: &[u8], head: bool) -> Result<Vec<Answer>, String> {
    let mut answers = Vec::new();
    while !data.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(data) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(format!(
                    "response head cut short: {:?}",
                    data.escape_ascii().to_string()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "malformed response ({e}): {:?}",
                    data.escape_ascii().to_string()
                ));
            }
        };
        let status = resp.code.unwrap_or(0);
        if !(100..600).contains(&status) {
            return Err(format!("status {status}"));
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        };
        let from_backend = !header("x-fuzz-backend").is_empty();
        let te = header("transfer-encoding");
        let cl = header("content-length");
        data = &data[n..];
        if status == 101 {
            // The rest is the upgraded connection's.
            answers.push(Answer {
                status,
                from_backend,
            });
            return Ok(answers);
        }
        if status < 200 {
            continue;
        }
        let no_body = (head && answers.is_empty()) || status == 204 || status == 304;
        if no_body {
        } else if !te.is_empty() {
            if te.last().map(String::as_str) != Some("chunked") {
                return Err(format!("response Transfer-Encoding {te:?}"));
            }
            data = skip_chunked(data)?;
        } else if let Some(len) = cl.first() {
            if cl.iter().any(|l| l != len) {
                return Err(format!("response Content-Length {cl:?}"));
            }
            let len: usize = len
                .parse()
                .map_err(|_| format!("response Content-Length {len:?}"))?;
            if data.len() < len {
                return Err(format!(
                    "response body cut short: {} of {len} bytes",
                    data.len()
                ));
            }
            data = &data[len..];
        } else {
            // Delimited by the end of the connection.
            data = &[];
        }
        answers.push(Answer {
            status,
            from_backend,
        });
    }
    Ok(answers)
}

fn skip_chunked(mut data: &[u8]) -> Result<&[u8], String> {
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line cut short")?;
        let line = std::str::from_utf8(&data[..line_end]).map_err(|e| e.to_string())?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| format!("chunk size {line:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let end = data
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .ok_or("trailers cut short")?;
                data = &data[end + 2..];
                if end == 0 {
                    return Ok(data);
                }
            }
        }
        if data.len() < size + 2 || &data[size..size + 2] != b"\r\n" {
            return Err("chunk cut short".into());
        }
        data = &data[size + 2..];
    }
}

/// How the generated requests ended, printed so a run shows what it covered.
#[derive(Debug, Default)]
struct Tally {
    /// The backend answered the generated request.
    forwarded: u64,
    /// The proxy answered 4xx itself.
    refused: u64,
    /// The proxy answered something else itself (5xx, 1xx only, ...).
    other: u64,
    /// No response: the proxy closed the connection (or the input was cut before a head).
    closed: u64,
}

async fn check(
    addr: SocketAddr,
    backend: &Backend,
    case: Case,
    tally: &Mutex<Tally>,
) -> Result<(), TestCaseError> {
    let (wire, head) = case.spec.build(&case.marker, &format!("{}-2", case.marker));
    let read = exchange(addr, wire).await.map_err(TestCaseError::fail)?;
    let answers = parse_responses(&read, head).map_err(TestCaseError::fail)?;
    // The first final response answers the generated request.
    let first = answers.iter().find(|a| a.status >= 200);
    {
        let mut t = tally.lock().unwrap();
        match first {
            Some(a) if a.from_backend => t.forwarded += 1,
            Some(a) if (400..500).contains(&a.status) => t.refused += 1,
            Some(_) => t.other += 1,
            None => t.closed += 1,
        }
    }
    if let Some(first) = first
        && (400..500).contains(&first.status)
        && !first.from_backend
    {
        prop_assert!(
            !backend.received(&case.marker),
            "the proxy answered {} but the backend received the request",
            first.status
        );
    }
    let p = panics();
    prop_assert!(p.is_empty(), "panics: {p:#?}");
    // The proxy still serves a normal request on a new connection.
    let read = exchange(
        addr,
        b"GET /healthy HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await
    .map_err(TestCaseError::fail)?;
    let answers = parse_responses(&read, false).map_err(TestCaseError::fail)?;
    prop_assert!(
        matches!(answers.as_slice(), [a] if a.status == 200 && a.from_backend),
        "a normal request afterwards got {answers:?}"
    );
    Ok(())
}

#[test]
fn generated_requests_are_answered_well_or_closed_and_never_reach_the_backend_after_a_4xx() {
    record_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (backend, env) = rt.block_on(async {
        let backend = Backend::start().await;
        let env = start(gateway(
            json!([forward("all", json!({}), "b")]),
            json!([backend_with("b", &backend.addr)]),
        ))
        .await;
        (backend, env)
    });
    let addr = env.addr;
    let counter = AtomicU64::new(0);
    let tally = Mutex::new(Tally::default());
    let mut runner = TestRunner::new(Config {
        cases: cases(DEFAULT_CASES),
        failure_persistence: None,
        max_shrink_time: 60_000,
        ..Config::default()
    });
    let result = runner.run(&request(), |spec| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let marker = format!("case-{n}");
        let case = Case { spec, marker };
        rt.block_on(check(addr, &backend, case, &tally))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    println!(
        "http request property: {} cases passed: {:?}",
        counter.load(Ordering::Relaxed),
        tally.lock().unwrap()
    );
    drop(env);
}

fn backend_with(name: &str, addr: &SocketAddr) -> serde_json::Value {
    backend(name, &[addr.to_string()])
}
