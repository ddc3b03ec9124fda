use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use mesh_config::{HeaderValue as CfgHeader, RateLimit, RateLimitMode};

use super::*;

const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn walkthrough_limit(name: &str) -> RateLimit {
    RateLimit {
        name: name.to_string(),
        max_tokens: 10,
        tokens_per_fill: 5,
        fill_interval: MIN,
        status: 429,
        response_headers_to_add: vec![CfgHeader {
            name: "x-rate-limited".into(),
            value: "TOO_MANY_REQUESTS".into(),
        }],
        x_ratelimit_headers: false,
        mode: RateLimitMode::Local,
    }
}

fn take_all(b: &TokenBucket, tries: usize) -> usize {
    (0..tries).filter(|_| b.try_take().is_ok()).count()
}

#[tokio::test(start_paused = true)]
async fn initial_burst_is_max_tokens() {
    let b = TokenBucket::new(10, 5, MIN);
    assert_eq!(b.available(), 10);
    let first = b.try_take().unwrap();
    assert_eq!(
        first,
        Remaining {
            limit: 10,
            remaining: 9,
            reset: MIN
        }
    );
    assert_eq!(take_all(&b, 20), 9);
    let e = b.try_take().unwrap_err();
    assert_eq!(e.limit, 10);
    assert_eq!(e.reset, MIN);
}

#[tokio::test(start_paused = true)]
async fn refills_after_interval() {
    let b = TokenBucket::new(10, 5, MIN);
    assert_eq!(take_all(&b, 100), 10);
    tokio::time::advance(MIN).await;
    assert_eq!(b.available(), 5);
    assert_eq!(take_all(&b, 100), 5);
    tokio::time::advance(MIN * 2).await;
    assert_eq!(take_all(&b, 100), 10);
}

#[tokio::test(start_paused = true)]
async fn partial_intervals_add_nothing_and_keep_phase() {
    let b = TokenBucket::new(10, 5, MIN);
    assert_eq!(take_all(&b, 100), 10);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(b.available(), 0);
    assert!(b.try_take().is_err());
    assert_eq!(b.time_until_next_fill(), Duration::from_secs(1));
    // The boundary is measured from creation, not from the last take.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(b.available(), 5);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(take_all(&b, 100), 5);
    assert_eq!(b.time_until_next_fill(), Duration::from_secs(30));
    tokio::time::advance(Duration::from_millis(29_500)).await;
    let e = b.try_take().unwrap_err();
    assert_eq!(e.reset, Duration::from_millis(500));
    assert_eq!(reset_seconds(e.reset), 1);
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(b.available(), 5);
}

#[tokio::test(start_paused = true)]
async fn never_above_capacity() {
    let b = TokenBucket::new(10, 5, MIN);
    // Idle for a long time: still only the capacity.
    tokio::time::advance(MIN * 1000).await;
    assert_eq!(b.available(), 10);
    assert_eq!(take_all(&b, 100), 10);
    // Partly used, then two fills: 7 + 10 clamps to 10.
    tokio::time::advance(MIN).await;
    assert_eq!(take_all(&b, 3), 3);
    assert_eq!(b.available(), 2);
    tokio::time::advance(MIN * 2).await;
    assert_eq!(b.available(), 10);
    // The clamp is not credited later either.
    tokio::time::advance(MIN).await;
    assert_eq!(b.available(), 10);
    assert_eq!(take_all(&b, 100), 10);
}

#[tokio::test(start_paused = true)]
async fn fill_larger_than_capacity_clamps() {
    let b = TokenBucket::new(3, 100, Duration::from_secs(1));
    assert_eq!(take_all(&b, 10), 3);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(take_all(&b, 10), 3);
}

#[tokio::test(start_paused = true)]
async fn remaining_counts_down() {
    let b = TokenBucket::new(3, 1, MIN);
    let r: Vec<u64> = (0..3).map(|_| b.try_take().unwrap().remaining).collect();
    assert_eq!(r, vec![2, 1, 0]);
}

#[test]
fn concurrent_takes_are_exact() {
    const K: u64 = 1000;
    for _ in 0..5 {
        let b = Arc::new(TokenBucket::new(K, 1, HOUR));
        let ok = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (b, ok) = (b.clone(), ok.clone());
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        if b.try_take().is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ok.load(Ordering::Relaxed), K);
        assert_eq!(b.available(), 0);
    }
}

#[test]
fn concurrent_takes_with_instance_changes_never_overspend() {
    // While threads take, the instance count flips between 1 and 2. Every take is accounted in
    // exactly one generation, so the total never exceeds the first capacity.
    let b = Arc::new(TokenBucket::new(10_000, 1, HOUR));
    let ok = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (b, ok) = (b.clone(), ok.clone());
            std::thread::spawn(move || {
                for _ in 0..5_000 {
                    if b.try_take().is_ok() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for i in 0..200 {
        b.set_instances(if i % 2 == 0 { 2 } else { 1 });
        std::thread::yield_now();
    }
    for t in threads {
        t.join().unwrap();
    }
    let taken = ok.load(Ordering::Relaxed);
    assert!(taken <= 10_000, "{taken}");
    assert!(b.available() <= b.capacity());
}

#[test]
fn distributed_share_rounds_up() {
    assert_eq!(
        BucketShare::of(10, 5, 2),
        BucketShare {
            capacity: 5,
            tokens_per_fill: 3
        }
    );
    assert_eq!(
        BucketShare::of(10, 5, 3),
        BucketShare {
            capacity: 4,
            tokens_per_fill: 2
        }
    );
    assert_eq!(
        BucketShare::of(2, 1, 3),
        BucketShare {
            capacity: 1,
            tokens_per_fill: 1
        }
    );
    assert_eq!(BucketShare::of(10, 5, 1), BucketShare::of(10, 5, 0));
    assert_eq!(BucketShare::of(10, 5, 1).capacity, 10);
}

#[tokio::test(start_paused = true)]
async fn distributed_bucket_gets_its_share() {
    let b = TokenBucket::with_instances(10, 5, MIN, 2);
    assert_eq!(b.instances(), 2);
    assert_eq!(b.capacity(), 5);
    assert_eq!(b.tokens_per_fill(), 3);
    assert_eq!(take_all(&b, 100), 5);
    tokio::time::advance(MIN).await;
    assert_eq!(take_all(&b, 100), 3);
    // Two instances of the walkthrough's limit let through 10, not 20.
    let other = TokenBucket::with_instances(10, 5, MIN, 2);
    assert_eq!(take_all(&other, 100), 5);
}

#[tokio::test(start_paused = true)]
async fn instance_change_rescales_proportionally() {
    let b = TokenBucket::with_instances(100, 10, MIN, 1);
    assert_eq!(take_all(&b, 50), 50); // half full
    b.set_instances(4); // capacity 25: half full is 12 (rounded down)
    assert_eq!(b.capacity(), 25);
    assert_eq!(b.tokens_per_fill(), 3);
    assert_eq!(b.available(), 12);
    b.set_instances(4); // no change
    assert_eq!(b.available(), 12);
    b.set_instances(1); // back: 12/25 of 100 = 48
    assert_eq!(b.available(), 48);
    assert_eq!(b.capacity(), 100);

    // A full bucket stays full, an empty one stays empty.
    let full = TokenBucket::new(10, 5, MIN);
    full.set_instances(3);
    assert_eq!(full.available(), 4);
    let empty = TokenBucket::new(10, 5, MIN);
    assert_eq!(take_all(&empty, 100), 10);
    empty.set_instances(2);
    assert_eq!(empty.available(), 0);
}

#[tokio::test(start_paused = true)]
async fn instance_change_keeps_fill_phase() {
    let b = TokenBucket::new(10, 4, MIN);
    assert_eq!(take_all(&b, 100), 10);
    tokio::time::advance(Duration::from_secs(40)).await;
    b.set_instances(2);
    assert_eq!(b.available(), 0);
    tokio::time::advance(Duration::from_secs(20)).await;
    assert_eq!(b.available(), 2); // next boundary at 60s, new per-fill 2
    tokio::time::advance(MIN * 10).await;
    assert_eq!(b.available(), 5);
}

#[tokio::test(start_paused = true)]
async fn walkthrough_numbers_100_tries_10_allowed() {
    let limiters = RateLimiters::build(&[walkthrough_limit("walkthrough")], None);
    let mut allowed = 0;
    let mut limited = 0;
    for _ in 0..100 {
        match limiters.check("walkthrough").unwrap() {
            RateLimitDecision::Allowed { headers } => {
                assert!(headers.is_empty());
                allowed += 1;
            }
            RateLimitDecision::Limited(_) => limited += 1,
        }
    }
    assert_eq!((allowed, limited), (10, 90));
    tokio::time::advance(MIN).await;
    let allowed = (0..100)
        .filter(|_| !limiters.check("walkthrough").unwrap().is_limited())
        .count();
    assert_eq!(allowed, 5);
}

#[tokio::test(start_paused = true)]
async fn walkthrough_parallel_tasks_10_allowed() {
    let limiters = Arc::new(RateLimiters::build(
        &[walkthrough_limit("walkthrough")],
        None,
    ));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let l = limiters.clone();
            tokio::spawn(async move { l.check("walkthrough").unwrap().is_limited() })
        })
        .collect();
    let mut limited = 0;
    for t in tasks {
        limited += usize::from(t.await.unwrap());
    }
    assert_eq!(limited, 90);
}

#[tokio::test(start_paused = true)]
async fn unknown_limit_is_none() {
    let limiters = RateLimiters::build(&[walkthrough_limit("walkthrough")], None);
    assert!(limiters.check("nope").is_none());
    assert!(limiters.get("walkthrough").is_some());
    assert_eq!(limiters.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn local_reply_matches_the_walkthrough() {
    let limiters = RateLimiters::build(&[walkthrough_limit("walkthrough")], None);
    for _ in 0..10 {
        assert!(!limiters.check("walkthrough").unwrap().is_limited());
    }
    let d = limiters.check("walkthrough").unwrap();
    let RateLimitDecision::Limited(l) = &d else {
        panic!("not limited")
    };
    assert_eq!(l.name(), "walkthrough");
    let resp = d.local_reply().unwrap();
    assert_eq!(resp.status(), 429);
    let h = resp.headers();
    assert_eq!(h["x-rate-limited"], "TOO_MANY_REQUESTS");
    assert_eq!(h["content-type"], "text/plain");
    assert_eq!(h["content-length"], "18");
    assert!(h.get(X_RATELIMIT_LIMIT).is_none());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"local_rate_limited");
    assert_eq!(body.len(), 18);
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_headers_and_custom_status() {
    let mut limit = walkthrough_limit("h");
    limit.x_ratelimit_headers = true;
    limit.status = 503;
    limit.max_tokens = 2;
    limit.response_headers_to_add.push(CfgHeader {
        name: "x-rate-limited".into(),
        value: "again".into(),
    });
    let limiters = RateLimiters::build(&[limit], None);
    tokio::time::advance(Duration::from_millis(500)).await;
    let RateLimitDecision::Allowed { headers } = limiters.check("h").unwrap() else {
        panic!("limited")
    };
    assert_eq!(headers[X_RATELIMIT_LIMIT], "2");
    assert_eq!(headers[X_RATELIMIT_REMAINING], "1");
    assert_eq!(headers[X_RATELIMIT_RESET], "60"); // 59.5 s rounded up
    assert!(!limiters.check("h").unwrap().is_limited());
    let resp = limiters.check("h").unwrap().local_reply().unwrap();
    assert_eq!(resp.status(), 503);
    let h = resp.headers();
    assert_eq!(h[X_RATELIMIT_REMAINING], "0");
    assert_eq!(h[X_RATELIMIT_LIMIT], "2");
    let added: Vec<_> = h.get_all("x-rate-limited").iter().collect();
    assert_eq!(added, vec!["TOO_MANY_REQUESTS", "again"]);
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_unchanged_buckets() {
    let mut other = walkthrough_limit("other");
    other.max_tokens = 3;
    let first = RateLimiters::build(&[walkthrough_limit("walkthrough"), other.clone()], None);
    for _ in 0..4 {
        first.check("walkthrough");
        first.check("other");
    }
    // Same settings (a different status and headers do not matter) keep the state; a changed
    // budget starts afresh; a removed limit is gone.
    let mut walkthrough = walkthrough_limit("walkthrough");
    walkthrough.status = 503;
    walkthrough.response_headers_to_add.clear();
    other.max_tokens = 4;
    let second = RateLimiters::build(
        &[walkthrough, other, walkthrough_limit("new")],
        Some(&first),
    );
    assert!(Arc::ptr_eq(
        first.get("walkthrough").unwrap().bucket(),
        second.get("walkthrough").unwrap().bucket()
    ));
    assert_eq!(second.get("walkthrough").unwrap().bucket().available(), 6);
    assert!(!Arc::ptr_eq(
        first.get("other").unwrap().bucket(),
        second.get("other").unwrap().bucket()
    ));
    assert_eq!(second.get("other").unwrap().bucket().available(), 4);
    assert_eq!(second.get("new").unwrap().bucket().available(), 10);
    let third = RateLimiters::build(&[walkthrough_limit("walkthrough")], Some(&second));
    assert!(third.get("other").is_none());
    assert_eq!(third.get("walkthrough").unwrap().bucket().available(), 6);
    let resp = {
        for _ in 0..6 {
            assert!(!third.check("walkthrough").unwrap().is_limited());
        }
        third.check("walkthrough").unwrap().local_reply().unwrap()
    };
    assert_eq!(resp.status(), 429);
}

#[tokio::test(start_paused = true)]
async fn reload_with_new_instance_count_rescales() {
    let mut limit = walkthrough_limit("d");
    limit.mode = RateLimitMode::Distributed { instances: 1 };
    let first = RateLimiters::build(std::slice::from_ref(&limit), None);
    assert_eq!(first.get("d").unwrap().bucket().capacity(), 10);
    limit.mode = RateLimitMode::Distributed { instances: 2 };
    let second = RateLimiters::build(std::slice::from_ref(&limit), Some(&first));
    let b = second.get("d").unwrap().bucket();
    assert!(Arc::ptr_eq(first.get("d").unwrap().bucket(), b));
    assert_eq!(
        (b.capacity(), b.tokens_per_fill(), b.available()),
        (5, 3, 5)
    );
    // The standalone flag overrides the config's count for distributed limits only.
    let local = walkthrough_limit("l");
    let third = RateLimiters::build_with(&[limit, local], Some(&second), Some(5));
    assert_eq!(third.get("d").unwrap().bucket().capacity(), 2);
    assert_eq!(third.get("l").unwrap().bucket().capacity(), 10);
    third.set_distributed_instances(10);
    assert_eq!(third.get("d").unwrap().bucket().capacity(), 1);
    assert_eq!(third.get("l").unwrap().bucket().capacity(), 10);
}
