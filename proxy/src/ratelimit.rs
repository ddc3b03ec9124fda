//! Local (and distributed) rate limiting with Envoy's token-bucket semantics.
//!
//! # Semantics (Envoy `envoy.filters.http.local_ratelimit`)
//!
//! - `max_tokens` is both the capacity of the bucket and its initial fill.
//! - `tokens_per_fill` tokens are added every `fill_interval`. Fills happen at fixed boundaries
//!   measured from the creation of the bucket (`created + k * fill_interval`), like Envoy's fill
//!   timer; a partial interval adds nothing. The refill is computed lazily from monotonic time
//!   ([`tokio::time::Instant`], so tests can pause and advance the clock): there is no timer task.
//! - The bucket never holds more than its capacity.
//! - One request takes one token. With no token left the request is limited: answered locally
//!   with the configured status (429 by default), body `local_rate_limited`, `content-type:
//!   text/plain` and the limit's `response_headers_to_add` (on limited responses only).
//! - Optional `x-ratelimit-limit` (the instance's capacity), `x-ratelimit-remaining` (tokens
//!   left after this request) and `x-ratelimit-reset` (whole seconds, rounded up, until the next
//!   fill) on every response the limit checked.
//!
//! One [`TokenBucket`] is shared by every worker thread of the proxy instance. It is lock-free on
//! the request path: its whole state is one `AtomicU64` updated with compare-and-swap.
//!
//! # How the state fits in one word
//!
//! Let `credit(now) = capacity + tokens_per_fill * fills(now)` (every token ever made available,
//! with `fills(now)` the number of fill boundaries passed since creation). The bucket stores one
//! number, `debit`, and its content is `tokens = min(capacity, credit(now) - debit)`. Taking a
//! token sets `debit = max(debit, credit(now) - capacity) + 1`: the `max` absorbs the tokens lost
//! to clamping, so the clamp is exact however long the bucket stayed idle.
//!
//! # Distributed mode
//!
//! Beyond Envoy: one budget split across the `N` proxy instances that enforce it. Each instance's
//! bucket gets `ceil(max_tokens / N)` capacity and `ceil(tokens_per_fill / N)` per fill.
//!
//! Rounding: **up**. Rounding down would give every instance 0 tokens when the budget is smaller
//! than `N` (a limit of 2 across 3 instances would block everything), and the limit a user writes
//! is a ceiling they expect traffic to reach. The price is that the fleet may let through at most
//! `N - 1` tokens more than written, per fill and in the initial burst. With `N = 1` the bucket is
//! exactly the local one.
//!
//! `N` can change at runtime ([`TokenBucket::set_instances`], or a reload with a new
//! `instances`): the tokens currently in the bucket are rescaled proportionally to the new
//! capacity (`floor(tokens * new_capacity / old_capacity)`, so a full bucket stays full and an
//! empty one stays empty, and rounding never lets more through than the new share) and the fill
//! boundaries keep their phase.
//!
//! # Reload
//!
//! [`RateLimiters::build`] builds the limiters of a new config; a limit whose bucket settings
//! (`max_tokens`, `tokens_per_fill`, `fill_interval`) did not change keeps its bucket (the same
//! `Arc`, so tokens are neither refunded nor lost by a reload); a change of `instances` only
//! rescales it; a change of status or headers only changes the reply.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use mesh_config::{RateLimit, RateLimitMode};
use tokio::time::Instant;

/// Body of a limited response (Envoy's).
pub const LOCAL_RATE_LIMITED_BODY: &str = "local_rate_limited";
/// `x-ratelimit-limit`: the capacity of the instance's bucket.
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `x-ratelimit-remaining`: tokens left after this request.
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `x-ratelimit-reset`: whole seconds (rounded up) until the next fill.
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Marks a generation that a change of `instances` replaced (see [`TokenBucket::set_instances`]).
const RETIRED: u64 = 1 << 63;

/// The capacity and fill of one instance's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketShare {
    pub capacity: u64,
    pub tokens_per_fill: u64,
}

impl BucketShare {
    /// One instance's share of a budget enforced by `instances` instances: both numbers are
    /// divided by `instances` and rounded **up** (see the module docs). `instances` 0 counts as 1.
    pub fn of(max_tokens: u64, tokens_per_fill: u64, instances: u32) -> BucketShare {
        let n = u64::from(instances.max(1));
        BucketShare {
            capacity: max_tokens.div_ceil(n),
            tokens_per_fill: tokens_per_fill.div_ceil(n),
        }
    }
}

/// A successful take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    /// Capacity of the bucket (`x-ratelimit-limit`).
    pub limit: u64,
    /// Tokens left after this take (`x-ratelimit-remaining`).
    pub remaining: u64,
    /// Time until the next fill (`x-ratelimit-reset`, in seconds rounded up).
    pub reset: Duration,
}

/// A refused take: the bucket was empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// Capacity of the bucket (`x-ratelimit-limit`).
    pub limit: u64,
    /// Time until the next fill.
    pub reset: Duration,
}

/// Whole seconds, rounded up (`x-ratelimit-reset`).
pub fn reset_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The bucket's parameters for one value of `instances`, plus its state word.
#[derive(Debug)]
struct Generation {
    share: BucketShare,
    instances: u32,
    /// See the module docs; bit 63 is [`RETIRED`].
    debit: AtomicU64,
}

impl Generation {
    fn credit(&self, fills: u64) -> u64 {
        self.share
            .capacity
            .saturating_add(self.share.tokens_per_fill.saturating_mul(fills))
    }

    /// Tokens in the bucket for a (non-retired) debit value.
    fn tokens(&self, debit: u64, fills: u64) -> u64 {
        self.credit(fills)
            .saturating_sub(debit)
            .min(self.share.capacity)
    }
}

/// A token bucket shared by all worker threads of one proxy instance. Lock-free on the request
/// path; see the module docs for the semantics.
#[derive(Debug)]
pub struct TokenBucket {
    max_tokens: u64,
    tokens_per_fill: u64,
    fill_interval: Duration,
    created: Instant,
    current: ArcSwap<Generation>,
    /// Serialises [`TokenBucket::set_instances`] (never taken on the request path).
    reconfigure: Mutex<()>,
}

impl TokenBucket {
    /// A full bucket of `max_tokens` that gets `tokens_per_fill` every `fill_interval`.
    pub fn new(max_tokens: u64, tokens_per_fill: u64, fill_interval: Duration) -> TokenBucket {
        TokenBucket::with_instances(max_tokens, tokens_per_fill, fill_interval, 1)
    }

    /// One instance's full bucket of a budget split across `instances` instances.
    pub fn with_instances(
        max_tokens: u64,
        tokens_per_fill: u64,
        fill_interval: Duration,
        instances: u32,
    ) -> TokenBucket {
        let instances = instances.max(1);
        let share = BucketShare::of(max_tokens, tokens_per_fill, instances);
        let generation = Generation {
            share,
            instances,
            // credit(0) - debit == capacity: full.
            debit: AtomicU64::new(0),
        };
        TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval: fill_interval.max(Duration::from_nanos(1)),
            created: Instant::now(),
            current: ArcSwap::from_pointee(generation),
            reconfigure: Mutex::new(()),
        }
    }

    /// The bucket a config's limit describes (`Local` is one instance).
    pub fn from_config(limit: &RateLimit) -> TokenBucket {
        TokenBucket::with_instances(
            limit.max_tokens,
            limit.tokens_per_fill,
            limit.fill_interval,
            instances_of(&limit.mode),
        )
    }

    fn fills(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.created).as_nanos();
        let fills = elapsed / self.fill_interval.as_nanos();
        u64::try_from(fills).unwrap_or(u64::MAX)
    }

    fn reset_at(&self, now: Instant) -> Duration {
        let interval = self.fill_interval.as_nanos();
        let into = now.saturating_duration_since(self.created).as_nanos() % interval;
        Duration::from_nanos(u64::try_from(interval - into).unwrap_or(u64::MAX))
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> Result<Remaining, Exhausted> {
        let now = Instant::now();
        let fills = self.fills(now);
        let mut spins = 0u32;
        loop {
            let generation = self.current.load();
            let credit = generation.credit(fills);
            let floor = credit.saturating_sub(generation.share.capacity);
            let mut debit = generation.debit.load(Ordering::Acquire);
            while debit & RETIRED == 0 {
                let base = debit.max(floor);
                if base >= credit {
                    return Err(Exhausted {
                        limit: generation.share.capacity,
                        reset: self.reset_at(now),
                    });
                }
                match generation.debit.compare_exchange_weak(
                    debit,
                    base + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        return Ok(Remaining {
                            limit: generation.share.capacity,
                            remaining: credit - (base + 1),
                            reset: self.reset_at(now),
                        });
                    }
                    Err(actual) => debit = actual,
                }
            }
            // `set_instances` is swapping in a new generation right now: wait for it.
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Tokens in the bucket now (a snapshot; does not take any).
    pub fn available(&self) -> u64 {
        let fills = self.fills(Instant::now());
        loop {
            let generation = self.current.load();
            let debit = generation.debit.load(Ordering::Acquire);
            if debit & RETIRED == 0 {
                return generation.tokens(debit, fills);
            }
            std::thread::yield_now();
        }
    }

    /// Capacity of this instance's bucket (`x-ratelimit-limit`).
    pub fn capacity(&self) -> u64 {
        self.current.load().share.capacity
    }

    /// Tokens this instance's bucket gets per fill.
    pub fn tokens_per_fill(&self) -> u64 {
        self.current.load().share.tokens_per_fill
    }

    /// The budget as written: `(max_tokens, tokens_per_fill, fill_interval)` before any split.
    pub fn budget(&self) -> (u64, u64, Duration) {
        (self.max_tokens, self.tokens_per_fill, self.fill_interval)
    }

    pub fn fill_interval(&self) -> Duration {
        self.fill_interval
    }

    /// Number of instances the budget is split across (1 = local).
    pub fn instances(&self) -> u32 {
        self.current.load().instances
    }

    /// Time until the next fill.
    pub fn time_until_next_fill(&self) -> Duration {
        self.reset_at(Instant::now())
    }

    /// Splits the budget across `instances` instances from now on (0 counts as 1). The tokens in
    /// the bucket are rescaled to the new capacity, rounding down; fill boundaries keep their
    /// phase. Takes run concurrently with this; none is lost or counted twice.
    pub fn set_instances(&self, instances: u32) {
        let instances = instances.max(1);
        let _serial = self
            .reconfigure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.current.load_full();
        if old.instances == instances {
            return;
        }
        let fills = self.fills(Instant::now());
        // Freeze the old generation: from here on every take retries on the new one.
        let debit = old.debit.fetch_or(RETIRED, Ordering::AcqRel);
        let tokens = old.tokens(debit, fills);
        let share = BucketShare::of(self.max_tokens, self.tokens_per_fill, instances);
        let scaled = if old.share.capacity == 0 {
            share.capacity
        } else {
            let s =
                u128::from(tokens) * u128::from(share.capacity) / u128::from(old.share.capacity);
            u64::try_from(s).unwrap_or(u64::MAX).min(share.capacity)
        };
        let new = Generation {
            share,
            instances,
            debit: AtomicU64::new(0),
        };
        let debit = new.credit(fills).saturating_sub(scaled);
        new.debit.store(debit, Ordering::Release);
        self.current.store(Arc::new(new));
    }
}

fn instances_of(mode: &RateLimitMode) -> u32 {
    match mode {
        RateLimitMode::Local => 1,
        RateLimitMode::Distributed { instances } => (*instances).max(1),
    }
}

/// What a limited response looks like (everything about a limit except its bucket).
#[derive(Debug)]
struct LimitSpec {
    name: String,
    status: StatusCode,
    response_headers_to_add: Vec<(HeaderName, HeaderValue)>,
    x_ratelimit_headers: bool,
    distributed: bool,
}

impl LimitSpec {
    fn from_config(limit: &RateLimit) -> LimitSpec {
        let status = StatusCode::from_u16(limit.status).unwrap_or_else(|_| {
            tracing::warn!(limit = %limit.name, status = limit.status, "invalid status, using 429");
            StatusCode::TOO_MANY_REQUESTS
        });
        let mut response_headers_to_add = Vec::new();
        for h in &limit.response_headers_to_add {
            match (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_str(&h.value),
            ) {
                (Ok(n), Ok(v)) => response_headers_to_add.push((n, v)),
                _ => {
                    tracing::warn!(limit = %limit.name, header = %h.name, "invalid header skipped")
                }
            }
        }
        LimitSpec {
            name: limit.name.clone(),
            status,
            response_headers_to_add,
            x_ratelimit_headers: limit.x_ratelimit_headers,
            distributed: matches!(limit.mode, RateLimitMode::Distributed { .. }),
        }
    }
}

fn put_x_ratelimit(headers: &mut HeaderMap, limit: u64, remaining: u64, reset: Duration) {
    headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(limit));
    headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(remaining));
    headers.insert(X_RATELIMIT_RESET, HeaderValue::from(reset_seconds(reset)));
}

/// One named limit of a config: its bucket and its reply. Cheap to clone (two `Arc`s), so the
/// router can resolve names once per config and keep these.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    spec: Arc<LimitSpec>,
    bucket: Arc<TokenBucket>,
}

impl RateLimiter {
    /// Builds a limiter with a fresh bucket.
    pub fn from_config(limit: &RateLimit) -> RateLimiter {
        RateLimiter {
            spec: Arc::new(LimitSpec::from_config(limit)),
            bucket: Arc::new(TokenBucket::from_config(limit)),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn bucket(&self) -> &Arc<TokenBucket> {
        &self.bucket
    }

    /// Takes a token for one request.
    pub fn check(&self) -> RateLimitDecision {
        match self.bucket.try_take() {
            Ok(r) => {
                let mut headers = HeaderMap::new();
                if self.spec.x_ratelimit_headers {
                    put_x_ratelimit(&mut headers, r.limit, r.remaining, r.reset);
                }
                RateLimitDecision::Allowed { headers }
            }
            Err(e) => RateLimitDecision::Limited(Limited {
                spec: self.spec.clone(),
                exhausted: e,
            }),
        }
    }
}

/// The outcome of checking one limit for one request.
#[derive(Debug)]
pub enum RateLimitDecision {
    /// Go on; add `headers` (the `x-ratelimit-*` ones when enabled, else empty) to the response.
    Allowed { headers: HeaderMap },
    /// Answer with [`Limited::local_reply`] instead of forwarding.
    Limited(Limited),
}

impl RateLimitDecision {
    pub fn is_limited(&self) -> bool {
        matches!(self, RateLimitDecision::Limited(_))
    }

    /// The local reply when limited.
    pub fn local_reply(&self) -> Option<Response<Full<Bytes>>> {
        match self {
            RateLimitDecision::Allowed { .. } => None,
            RateLimitDecision::Limited(l) => Some(l.local_reply()),
        }
    }
}

/// A limited request.
#[derive(Debug, Clone)]
pub struct Limited {
    spec: Arc<LimitSpec>,
    exhausted: Exhausted,
}

impl Limited {
    /// Name of the limit that refused the request (the `limit` label of the metric).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn status(&self) -> StatusCode {
        self.spec.status
    }

    /// Time until the bucket gets tokens again.
    pub fn reset(&self) -> Duration {
        self.exhausted.reset
    }

    /// The response to send: the configured status, body `local_rate_limited`,
    /// `content-type: text/plain`, `content-length`, then `response_headers_to_add` (appended,
    /// Envoy's `APPEND_IF_EXISTS_OR_ADD`) and `x-ratelimit-*` (remaining 0) when enabled.
    pub fn local_reply(&self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from_static(
            LOCAL_RATE_LIMITED_BODY.as_bytes(),
        )));
        *resp.status_mut() = self.spec.status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(
            CONTENT_LENGTH,
            HeaderValue::from(LOCAL_RATE_LIMITED_BODY.len()),
        );
        for (n, v) in &self.spec.response_headers_to_add {
            headers.append(n.clone(), v.clone());
        }
        if self.spec.x_ratelimit_headers {
            put_x_ratelimit(headers, self.exhausted.limit, 0, self.exhausted.reset);
        }
        resp
    }
}

/// All named limits of one config.
#[derive(Debug, Clone, Default)]
pub struct RateLimiters {
    limits: HashMap<String, RateLimiter>,
}

impl RateLimiters {
    /// The limiters of `limits`. A limit of `previous` with the same name and the same
    /// `max_tokens`, `tokens_per_fill` and `fill_interval` keeps its bucket (the same `Arc`,
    /// rescaled if `instances` changed); any other limit starts full.
    pub fn build(limits: &[RateLimit], previous: Option<&RateLimiters>) -> RateLimiters {
        RateLimiters::build_with(limits, previous, None)
    }

    /// Like [`RateLimiters::build`]; `distributed_instances`, when given, overrides the
    /// `instances` of every `Distributed` limit (standalone mode's flag).
    pub fn build_with(
        limits: &[RateLimit],
        previous: Option<&RateLimiters>,
        distributed_instances: Option<u32>,
    ) -> RateLimiters {
        let mut out = HashMap::with_capacity(limits.len());
        for limit in limits {
            let instances = match (&limit.mode, distributed_instances) {
                (RateLimitMode::Distributed { .. }, Some(n)) => n.max(1),
                (mode, _) => instances_of(mode),
            };
            let kept = previous
                .and_then(|p| p.limits.get(&limit.name))
                .map(|l| &l.bucket)
                .filter(|b| {
                    b.budget()
                        == (
                            limit.max_tokens,
                            limit.tokens_per_fill,
                            limit.fill_interval.max(Duration::from_nanos(1)),
                        )
                })
                .cloned();
            let bucket = match kept {
                Some(b) => {
                    b.set_instances(instances);
                    b
                }
                None => Arc::new(TokenBucket::with_instances(
                    limit.max_tokens,
                    limit.tokens_per_fill,
                    limit.fill_interval,
                    instances,
                )),
            };
            out.insert(
                limit.name.clone(),
                RateLimiter {
                    spec: Arc::new(LimitSpec::from_config(limit)),
                    bucket,
                },
            );
        }
        RateLimiters { limits: out }
    }

    /// Checks (and takes a token from) the limit called `name`; `None` if there is none.
    pub fn check(&self, name: &str) -> Option<RateLimitDecision> {
        self.limits.get(name).map(RateLimiter::check)
    }

    /// The limit called `name`, to keep and check without a lookup.
    pub fn get(&self, name: &str) -> Option<&RateLimiter> {
        self.limits.get(name)
    }

    /// Splits every `Distributed` limit's budget across `instances` instances from now on (the
    /// control plane's push of a new instance count, without a full reload).
    pub fn set_distributed_instances(&self, instances: u32) {
        for l in self.limits.values().filter(|l| l.spec.distributed) {
            l.bucket.set_instances(instances);
        }
    }

    pub fn len(&self) -> usize {
        self.limits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.limits.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
