//! Worker threads that serve connections: one thread per worker, each running its own
//! current-thread tokio runtime (thread per core, as HAProxy, nginx and Envoy do it).
//!
//! Why not tokio's multi-thread runtime: measured with two workers on two busy cores, it spent
//! ~60% more CPU per request than one current-thread worker (work stealing, waking parked
//! workers, tasks and sockets hopping between threads). Here a connection stays on the worker
//! that took it: its socket is registered with that worker's reactor, its tasks run on that
//! thread, and its upstream connections come from that worker's own pool
//! ([`crate::upstream::Clients`] is sharded by [`current`]).
//!
//! The listeners accept on the main runtime and hand each accepted socket to the next worker,
//! round robin. Accepting is a small part of the cost of a keep-alive connection, and one
//! accept loop per socket keeps reloads (which swap listeners) simple.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// Index of the worker running on this thread; 0 outside the pool.
    static WORKER_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker this code runs on (0 outside a pool): picks per-worker state.
pub fn current() -> usize {
    WORKER_INDEX.with(Cell::get)
}

struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A fixed set of worker threads. Dropping it stops them (their connections end).
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.workers.len())
            .finish()
    }
}

impl Workers {
    /// Starts `count` (at least 1) worker threads.
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("mesh-worker-{index}"))
                .spawn(move || {
                    WORKER_INDEX.with(|w| w.set(index));
                    // Tasks spawned through the handle run while this blocks.
                    let _ = runtime.block_on(stopped);
                })?;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Moves an accepted connection to the next worker and serves it there with `serve`.
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // The socket leaves the accepting runtime's reactor and joins the worker's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "accepted connection lost before hand-off");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[i].handle.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!(error = %e, "connection not registered on its worker"),
            }
        });
    }
}

/// Serves an accepted connection with `serve`: on the next worker of `workers`, or on the
/// current runtime when there are none.
pub fn serve_connection<F, Fut>(workers: Option<&Workers>, stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match workers {
        Some(w) => w.serve(stream, serve),
        None => drop(tokio::spawn(serve(stream))),
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            // Never join from a worker itself (that would wait forever).
            if let Some(t) = w.thread.take()
                && t.thread().id() != std::thread::current().id()
            {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread")]
    async fn connections_are_served_round_robin_on_worker_threads() {
        let workers = Workers::start(2).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            workers.serve(server, |mut s| async move {
                let name = std::thread::current().name().unwrap_or("").to_string();
                let reply = format!("{name} {}", current());
                let _ = s.write_all(reply.as_bytes()).await;
            });
            let mut reply = String::new();
            client.read_to_string(&mut reply).await.unwrap();
            seen.push(reply);
        }
        assert_eq!(
            seen,
            [
                "mesh-worker-0 0",
                "mesh-worker-1 1",
                "mesh-worker-0 0",
                "mesh-worker-1 1"
            ]
        );
        assert_eq!(current(), 0, "the test's own thread is not a worker");
    }
}
