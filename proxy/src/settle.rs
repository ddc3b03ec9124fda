//! Reloading config files safely: wait until what is watched stops changing before it is
//! applied, and never let a file that is still being written drop routes.
//!
//! A file written in place (truncate, then write, maybe in several pieces with pauses) can be
//! caught half-written; the first half of a resources file often parses (whole YAML
//! documents) and would be applied, and the routes in the second half would vanish until
//! the rest arrives. The rule:
//!
//! - a file **replaced atomically** (written to a temporary file and renamed over the watched
//!   one, as editors and ConfigMap volumes do) is complete when it appears: applied at once;
//! - a file **written in place** is applied once its content has been unchanged for
//!   [`QUIET`];
//! - content that keeps changing for [`SETTLE_LIMIT`] is applied only if it drops nothing
//!   the served config has (listeners, virtual hosts, routes, Services, backends,
//!   endpoints); otherwise the last good config stays and the next change is waited for.
//!
//! Content is compared by a hash of the bytes of every watched file (for a directory: its
//! `*.yaml`, `*.yml` and `*.json` entries, as `mesh_translate::load` reads them), re-read
//! after loading so that a write during the load is not applied.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::ProxyConfig;

/// How long written-in-place content must stay unchanged before it is applied. Long enough
/// for a writer's pauses between pieces (a copy over a slow disk or network, a tool that
/// writes document by document), short enough that a deliberate edit shows within a second.
pub const QUIET: Duration = Duration::from_millis(500);

/// How long content may keep changing before it is considered anyway (under the
/// "drops nothing" rule).
pub const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// How often the content is re-read while settling.
const POLL: Duration = Duration::from_millis(100);

/// A hash of the content of every watched file (missing or unreadable files count too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(u64);

/// Reads every watched file and hashes what it read.
pub fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        if p.is_dir() {
            for f in dir_entries(p) {
                hash_file(&f, &mut h);
            }
        } else {
            hash_file(p, &mut h);
        }
    }
    Fingerprint(h.finish())
}

fn hash_file(path: &Path, h: &mut impl Hasher) {
    path.hash(h);
    match std::fs::read(path) {
        Ok(bytes) => bytes.hash(h),
        Err(e) => e.kind().hash(h),
    }
}

/// The files of a directory that `mesh_translate::load` reads, sorted.
fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    files
}

/// How waiting for the content ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Unchanged for [`QUIET`]: complete.
    Quiet(Fingerprint),
    /// Still changing after [`SETTLE_LIMIT`].
    StillChanging(Fingerprint),
}

impl Settled {
    pub fn fingerprint(self) -> Fingerprint {
        match self {
            Settled::Quiet(f) | Settled::StillChanging(f) => f,
        }
    }
}

/// Waits until the content of `paths` has been unchanged for `quiet` (or `limit` has passed).
pub async fn settle(paths: &[PathBuf], quiet: Duration, limit: Duration) -> Settled {
    let start = tokio::time::Instant::now();
    let mut last = fingerprint(paths);
    let mut since = start;
    loop {
        tokio::time::sleep(POLL.min(quiet)).await;
        let now = tokio::time::Instant::now();
        let current = fingerprint(paths);
        if current != last {
            last = current;
            since = now;
        } else if now - since >= quiet {
            return Settled::Quiet(last);
        }
        if now - start >= limit {
            return Settled::StillChanging(last);
        }
    }
}

/// What `next` would drop of `current`: listeners, virtual hosts, routes, mesh Services,
/// backends and endpoints, by name.
pub fn dropped(current: &ProxyConfig, next: &ProxyConfig) -> Vec<String> {
    let now = objects(current);
    let then = objects(next);
    now.difference(&then).cloned().collect()
}

fn objects(c: &ProxyConfig) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in &c.listeners {
        out.insert(format!("listener {}", l.name));
        for v in &l.virtual_hosts {
            out.insert(format!("virtual host {}/{}", l.name, v.name));
            for r in &v.routes {
                out.insert(format!("route {}/{}/{}", l.name, v.name, r.name));
            }
        }
        for s in &l.services {
            out.insert(format!("service {}/{}", l.name, s.name));
            for r in &s.routes {
                out.insert(format!("route {}/{}/{}", l.name, s.name, r.name));
            }
        }
    }
    for b in &c.backends {
        out.insert(format!("backend {}", b.name));
        for e in &b.endpoints {
            out.insert(format!("endpoint {}/{e}", b.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settles_after_quiet_and_gives_up_waiting_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, "one").unwrap();
        let paths = vec![f.clone()];
        let start = tokio::time::Instant::now();
        let s = settle(&paths, QUIET, SETTLE_LIMIT).await;
        assert_eq!(s, Settled::Quiet(fingerprint(&paths)));
        assert!(start.elapsed() >= QUIET);

        // A file that changes every 50 ms never goes quiet.
        let writer = {
            let f = f.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    std::fs::write(&f, format!("v{i}")).unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let start = tokio::time::Instant::now();
        let s = settle(&paths, QUIET, Duration::from_secs(2)).await;
        writer.abort();
        assert!(matches!(s, Settled::StillChanging(_)), "{s:?}");
        assert!(start.elapsed() >= Duration::from_secs(2));
    }

    #[test]
    fn fingerprint_follows_content_of_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let d = vec![dir.path().to_path_buf()];
        let empty = fingerprint(&d);
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        assert_eq!(
            fingerprint(&d),
            empty,
            "only the files the loader reads count"
        );
        std::fs::write(dir.path().join("a.yaml"), "x").unwrap();
        let one = fingerprint(&d);
        assert_ne!(one, empty);
        std::fs::write(dir.path().join("a.yaml"), "y").unwrap();
        assert_ne!(fingerprint(&d), one);
        let missing = vec![dir.path().join("missing.yaml")];
        assert_eq!(fingerprint(&missing), fingerprint(&missing));
    }

    #[test]
    fn dropped_names_what_disappears() {
        let c = |routes: &[&str], endpoints: &[&str]| -> ProxyConfig {
            let routes: Vec<serde_json::Value> = routes
                .iter()
                .map(|r| {
                    serde_json::json!({"name": r, "action": {"type": "forward",
                    "backends": [{"target": {"backend": "b"}, "weight": 1}]}})
                })
                .collect();
            serde_json::from_value(serde_json::json!({
                "listeners": [{"name": "l", "port": 80,
                    "virtualHosts": [{"name": "v", "hostnames": ["*"], "routes": routes}]}],
                "backends": [{"name": "b", "endpoints": endpoints}],
            }))
            .unwrap()
        };
        let now = c(&["a", "b"], &["10.0.0.1:80"]);
        assert!(dropped(&now, &c(&["a", "b", "c"], &["10.0.0.1:80"])).is_empty());
        assert_eq!(
            dropped(&now, &c(&["b"], &[])),
            vec![
                "endpoint b/10.0.0.1:80".to_string(),
                "route l/v/a".to_string()
            ]
        );
    }
}
