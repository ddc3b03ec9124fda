//! How many watchers have not listed yet. The world publisher waits for every watcher (the
//! reflectors of `watch` and the pod-label watch of `pods`) to list once before the first
//! world, so no proxy is ever served a config translated from half a cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts watchers that have not listed (or failed to list) yet.
#[derive(Clone, Default)]
pub struct Unlisted(Arc<AtomicUsize>);

impl Unlisted {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// One more watcher to wait for.
    pub fn begin(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// That watcher listed (or failed to).
    pub fn end(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
