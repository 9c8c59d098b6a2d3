//! Delivery that outlives the code that asked for it.
//!
//! `send` returning `Ok` promises that the message is delivered unless the connection
//! fails. Normally the connection's writer task delivers what the socket did not take at
//! once. Two things can stop that task before it is done, and this module covers both:
//!
//! * **The runtime shuts down** and drops the task (a tokio runtime dropped at the end of
//!   `main` or of a test, an executor dropped by its owner): the connection is
//!   *adopted* here and the `net-rs-linger` thread writes what is left straight to the
//!   socket (non-blocking writes, short sleeps while the socket is full), for up to the
//!   connection's linger time.
//! * **The process exits** (`main` returns, `std::process::exit`): an exit hook
//!   (`atexit(3)`, installed once, on Unix) writes out what every live connection still
//!   has queued, for up to each connection's linger time (measured from the exit), so
//!   the seed program `connect; send; return` delivers whatever it sent. A process that
//!   exits while a peer does not read waits at most that long. A forked child that
//!   exits does nothing (the sockets are its parent's).
//!
//! The hook is the one `unsafe` call outside the RDMA driver and the memory slab: Rust
//! has no safe way to run code when the process exits, and no other place can keep the
//! promise once the threads that run the executors are about to disappear.
//!
//! The writing itself belongs to each connection ([`Deliver`]); this module only keeps
//! the list, the thread and the hook.

use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::{Duration, Instant};

use slab::Slab;

/// A connection that can push its queued bytes out without a runtime.
pub(crate) trait Deliver: Send + Sync + 'static {
    /// Write what is queued without blocking.
    fn deliver_now(&self) -> Delivery;
    /// The linger time ran out: drop what is left and fail the connection.
    fn give_up(&self);
    /// How long delivery may take once nothing else will deliver.
    fn linger(&self) -> Duration;
}

/// What one [`Deliver::deliver_now`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Nothing left to write (or the connection failed: nothing more can be written).
    Done,
    /// Some bytes went out; more are queued.
    Wrote,
    /// The socket is full, or another writer holds the socket right now.
    Blocked,
}

struct Registry {
    /// Every live connection, for the exit hook.
    live: Slab<Weak<dyn Deliver>>,
    /// Connections whose writer task is gone, with their deadlines.
    orphans: Vec<(Arc<dyn Deliver>, Instant)>,
    thread_running: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    live: Slab::new(),
    orphans: Vec::new(),
    thread_running: false,
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection's place in the exit hook's list; leaves it on drop.
#[derive(Debug)]
pub(crate) struct Registration(usize);

impl Drop for Registration {
    fn drop(&mut self) {
        registry().live.try_remove(self.0);
    }
}

/// Put a connection on the list the exit hook works through.
pub(crate) fn register(conn: Weak<dyn Deliver>) -> Registration {
    install_exit_hook();
    Registration(registry().live.insert(conn))
}

/// The connection's writer task is gone: deliver what is left from the linger thread,
/// for up to its linger time from now.
pub(crate) fn adopt(conn: Arc<dyn Deliver>) {
    let deadline = crate::time::deadline(Instant::now(), conn.linger());
    let start = {
        let mut reg = registry();
        reg.orphans.push((conn, deadline));
        !std::mem::replace(&mut reg.thread_running, true)
    };
    if start {
        let spawned = std::thread::Builder::new()
            .name("net-rs-linger".into())
            .spawn(linger_thread);
        if spawned.is_err() {
            // No thread: deliver what the socket takes now, and leave the rest to the
            // exit hook (or give up at the deadline when it runs).
            registry().thread_running = false;
            service_orphans();
        }
    }
}

/// Backoff between rounds while every socket is full.
const MIN_NAP: Duration = Duration::from_micros(200);
const MAX_NAP: Duration = Duration::from_millis(20);

fn linger_thread() {
    let mut nap = MIN_NAP;
    loop {
        match service_orphans() {
            Round::Idle => {
                let mut reg = registry();
                if reg.orphans.is_empty() {
                    reg.thread_running = false;
                    return;
                }
            }
            Round::Progress => nap = MIN_NAP,
            Round::Blocked => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(MAX_NAP);
            }
        }
    }
}

enum Round {
    Idle,
    Progress,
    Blocked,
}

/// One pass over the orphans. Connections are called and dropped with the list
/// unlocked (dropping the last reference to one takes the lock again).
fn service_orphans() -> Round {
    let work: Vec<(Arc<dyn Deliver>, Instant)> = registry().orphans.clone();
    if work.is_empty() {
        return Round::Idle;
    }
    let mut finished = Vec::new();
    let mut progress = false;
    for (conn, deadline) in &work {
        match conn.deliver_now() {
            Delivery::Done => finished.push(conn.clone()),
            Delivery::Wrote => progress = true,
            Delivery::Blocked if Instant::now() >= *deadline => {
                conn.give_up();
                finished.push(conn.clone());
            }
            Delivery::Blocked => {}
        }
    }
    let removed: Vec<_> = {
        let mut reg = registry();
        let (gone, kept) = std::mem::take(&mut reg.orphans)
            .into_iter()
            .partition(|(c, _)| finished.iter().any(|f| Arc::ptr_eq(f, c)));
        reg.orphans = kept;
        gone
    };
    drop((work, finished, removed));
    if progress {
        Round::Progress
    } else {
        Round::Blocked
    }
}

/// The process exits: write out what every live connection has queued, each for up to
/// its linger time.
fn deliver_at_exit() {
    let start = Instant::now();
    let mut conns: Vec<(Arc<dyn Deliver>, Instant)> = {
        let reg = registry();
        reg.live
            .iter()
            .filter_map(|(_, w)| w.upgrade())
            .chain(reg.orphans.iter().map(|(c, _)| c.clone()))
            .map(|c| {
                let linger = c.linger();
                (c, crate::time::deadline(start, linger))
            })
            .collect()
    };
    let mut nap = MIN_NAP;
    while !conns.is_empty() {
        let mut progress = false;
        conns.retain(|(conn, deadline)| match conn.deliver_now() {
            Delivery::Done => false,
            Delivery::Wrote => {
                progress = true;
                true
            }
            Delivery::Blocked if Instant::now() >= *deadline => {
                conn.give_up();
                false
            }
            Delivery::Blocked => true,
        });
        if progress {
            nap = MIN_NAP;
        } else if !conns.is_empty() {
            std::thread::sleep(nap);
            nap = (nap * 2).min(MAX_NAP);
        }
    }
}

#[cfg(unix)]
fn install_exit_hook() {
    static INSTALL: Once = Once::new();
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    extern "C" fn at_exit() {
        // A forked child shares its parent's sockets: writing its copy of the queues
        // would put bytes on the wire twice.
        if PID.get() != Some(&std::process::id()) {
            return;
        }
        // Unwinding out of an `extern "C"` function aborts; never let a panic out.
        let _ = std::panic::catch_unwind(deliver_at_exit);
    }
    INSTALL.call_once(|| {
        let _ = PID.set(std::process::id());
        // SAFETY: `atexit` only records the function pointer; `at_exit` is a plain
        // `extern "C" fn` with no arguments that never unwinds (it catches panics) and
        // touches only this module's statics, which live for the whole process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::atexit(at_exit) };
        debug_assert_eq!(rc, 0, "atexit failed");
    });
}

#[cfg(not(unix))]
fn install_exit_hook() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake connection: `left` writes to do, one per call; blocked while `stuck`.
    struct Fake {
        left: AtomicUsize,
        stuck: bool,
        gave_up: AtomicUsize,
    }

    impl Deliver for Fake {
        fn deliver_now(&self) -> Delivery {
            if self.stuck {
                return Delivery::Blocked;
            }
            match self.left.load(Ordering::SeqCst) {
                0 => Delivery::Done,
                n => {
                    self.left.store(n - 1, Ordering::SeqCst);
                    Delivery::Wrote
                }
            }
        }
        fn give_up(&self) {
            self.gave_up.fetch_add(1, Ordering::SeqCst);
        }
        fn linger(&self) -> Duration {
            Duration::from_millis(50)
        }
    }

    fn wait_for(mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "condition not met in 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn orphans_are_delivered_or_given_up_at_their_deadline() {
        let fine = Arc::new(Fake {
            left: AtomicUsize::new(100),
            stuck: false,
            gave_up: AtomicUsize::new(0),
        });
        let stuck = Arc::new(Fake {
            left: AtomicUsize::new(1),
            stuck: true,
            gave_up: AtomicUsize::new(0),
        });
        let t0 = Instant::now();
        adopt(fine.clone());
        adopt(stuck.clone());
        wait_for(|| fine.left.load(Ordering::SeqCst) == 0);
        wait_for(|| stuck.gave_up.load(Ordering::SeqCst) == 1);
        assert!(t0.elapsed() >= Duration::from_millis(50), "gave up early");
        assert_eq!(fine.gave_up.load(Ordering::SeqCst), 0);
        // Both leave the list: only the test's references remain.
        wait_for(|| Arc::strong_count(&fine) == 1 && Arc::strong_count(&stuck) == 1);
    }

    #[test]
    fn registration_leaves_the_list_on_drop() {
        let conn: Arc<dyn Deliver> = Arc::new(Fake {
            left: AtomicUsize::new(0),
            stuck: false,
            gave_up: AtomicUsize::new(0),
        });
        let reg = register(Arc::downgrade(&conn));
        let key = reg.0;
        assert!(registry().live.contains(key));
        drop(reg);
        assert!(!registry().live.contains(key));
    }
}
