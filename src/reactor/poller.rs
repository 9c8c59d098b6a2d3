//! The completion poller and its thread.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Completion;

/// Where completions come from: a completion queue, or [`FakeSource`] in tests.
pub trait CompletionSource: Send + 'static {
    /// Take the completions available now (at most `max` per queue), without
    /// blocking: append them to `out` for the poller's handler, or, for a source that
    /// routes them itself (the RDMA device source gives each CQ's batch to its
    /// connection), handle them and leave `out` alone. Returns how many were taken.
    ///
    /// # Errors
    /// A failed poll; the poller thread stops and reports it.
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> io::Result<usize>;

    /// Request a notification for the next completion (for a CQ: `ibv_req_notify_cq`).
    ///
    /// # Errors
    /// As for `poll`.
    fn arm(&mut self) -> io::Result<()>;

    /// Block until the armed notification fires or `timeout` passes. Returns whether it
    /// fired.
    ///
    /// # Errors
    /// As for `poll`.
    fn wait(&mut self, timeout: Duration) -> io::Result<bool>;
}

/// How the poller thread waits when completions stop.
#[derive(Debug, Clone, Copy)]
pub struct PollerConfig {
    /// Keep busy-polling (with a spin hint) this long after the last completion.
    pub spin: Duration,
    /// Then poll with a `yield_now` between tries for this long.
    pub yield_window: Duration,
    /// Most completions taken from the source at once (taken as 1 ..= 4096).
    pub batch: usize,
    /// Longest single sleep, so the thread notices a shutdown request.
    pub park_timeout: Duration,
}

/// The largest [`PollerConfig::batch`] taken: a batch's buffer is allocated up front.
const MAX_BATCH: usize = 4096;

impl Default for PollerConfig {
    /// Spin 20 µs, yield for 200 µs more, batches of 32, sleep at most 50 ms at a time.
    fn default() -> Self {
        PollerConfig {
            spin: Duration::from_micros(20),
            yield_window: Duration::from_micros(200),
            batch: 32,
            park_timeout: Duration::from_millis(50),
        }
    }
}

/// Counters of a poller.
#[derive(Debug, Default)]
pub struct PollerStats {
    /// Completions delivered.
    pub completions: AtomicU64,
    /// Times the poller armed the source and went to sleep.
    pub sleeps: AtomicU64,
}

/// Drains a [`CompletionSource`] into a handler.
pub struct Poller<S, H> {
    source: S,
    handler: H,
    buf: Vec<Completion>,
    config: PollerConfig,
    stats: Arc<PollerStats>,
}

impl<S, H> Poller<S, H>
where
    S: CompletionSource,
    H: FnMut(&[Completion]) + Send + 'static,
{
    /// A poller feeding `handler` with batches from `source`.
    pub fn new(source: S, handler: H, mut config: PollerConfig) -> Self {
        config.batch = config.batch.clamp(1, MAX_BATCH);
        Poller {
            source,
            handler,
            buf: Vec::with_capacity(config.batch),
            config,
            stats: Arc::default(),
        }
    }

    /// Poll the source once and deliver what it had. Returns the number delivered.
    ///
    /// # Errors
    /// The source's poll error.
    pub fn run_once(&mut self) -> io::Result<usize> {
        self.buf.clear();
        let n = self.source.poll(&mut self.buf, self.config.batch)?;
        if n > 0 {
            // Count first: the handler wakes futures, whose owners may read the stats.
            self.stats
                .completions
                .fetch_add(n as u64, Ordering::Relaxed);
            (self.handler)(&self.buf);
        }
        Ok(n)
    }

    /// The poller's counters.
    pub fn stats(&self) -> Arc<PollerStats> {
        self.stats.clone()
    }

    /// Run the adaptive polling loop on a new thread named `name`.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn spawn(self, name: &str) -> io::Result<PollerHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let stats = self.stats.clone();
        let (s, e) = (stop.clone(), error.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(err) = self.run(&s) {
                    *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                }
            })?;
        Ok(PollerHandle {
            stop,
            error,
            stats,
            thread: Some(thread),
        })
    }

    fn run(mut self, stop: &AtomicBool) -> io::Result<()> {
        let cfg = self.config;
        let mut idle_since: Option<Instant> = None;
        while !stop.load(Ordering::Acquire) {
            if self.run_once()? > 0 {
                idle_since = None;
                continue;
            }
            let idle = idle_since.get_or_insert_with(Instant::now).elapsed();
            if idle < cfg.spin {
                std::hint::spin_loop();
                continue;
            }
            if idle < cfg.spin.saturating_add(cfg.yield_window) {
                std::thread::yield_now();
                continue;
            }
            // Check, arm, check again: a completion that arrived before the arm took
            // effect would otherwise raise no notification.
            self.source.arm()?;
            if self.run_once()? > 0 {
                idle_since = None;
                continue;
            }
            self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            if self.source.wait(cfg.park_timeout)? {
                idle_since = None;
            }
        }
        Ok(())
    }
}

impl<S, H> fmt::Debug for Poller<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poller")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// A running poller thread; stopped and joined on drop.
pub struct PollerHandle {
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<io::Error>>>,
    stats: Arc<PollerStats>,
    thread: Option<JoinHandle<()>>,
}

impl PollerHandle {
    /// The poller's counters.
    pub fn stats(&self) -> &PollerStats {
        &self.stats
    }

    /// Whether the thread stopped because its source failed (and the error's text).
    pub fn failure(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| e.to_string())
    }

    /// Stop the thread and wait for it (at most one `park_timeout`).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Dropped by the poller thread itself (its handler released the last owner
            // of the handle): it ends after this round, it cannot wait for itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for PollerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl fmt::Debug for PollerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PollerHandle")
            .field("stats", &self.stats)
            .field("failure", &self.failure())
            .finish()
    }
}

/// An in-memory [`CompletionSource`] for tests and benchmarks; clones share the queue.
#[derive(Clone, Default)]
pub struct FakeSource {
    shared: Arc<FakeShared>,
}

#[derive(Default)]
struct FakeShared {
    queue: Mutex<FakeQueue>,
    cv: Condvar,
}

#[derive(Default)]
struct FakeQueue {
    items: VecDeque<Completion>,
    armed: bool,
    arms: u64,
    fail: bool,
}

impl FakeSource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add completions, as the hardware would, and fire an armed notification.
    pub fn push(&self, completions: impl IntoIterator<Item = Completion>) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.items.extend(completions);
        if q.armed {
            q.armed = false;
            self.shared.cv.notify_all();
        }
    }

    /// Make every later `poll` fail (a broken device).
    pub fn fail(&self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail = true;
        self.shared.cv.notify_all();
    }

    /// How many times the source was armed.
    pub fn arms(&self) -> u64 {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arms
    }
}

impl fmt::Debug for FakeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeSource").finish_non_exhaustive()
    }
}

impl CompletionSource for FakeSource {
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> io::Result<usize> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.fail {
            return Err(io::Error::other("fake completion source failed"));
        }
        let n = q.items.len().min(max);
        out.extend(q.items.drain(..n));
        Ok(n)
    }

    fn arm(&mut self) -> io::Result<()> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.armed = true;
        q.arms += 1;
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> io::Result<bool> {
        let q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let (q, _) = self
            .shared
            .cv
            .wait_timeout_while(q, timeout, |q| q.armed && !q.fail)
            .unwrap_or_else(|p| p.into_inner());
        Ok(!q.armed)
    }
}
