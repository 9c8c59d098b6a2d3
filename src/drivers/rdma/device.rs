//! One completion poller thread per RDMA device, shared by every connection on it.
//!
//! Each connection keeps its own completion queue (so its completions need no routing
//! and its CQ goes away with its QP), but all CQs of a device send their notifications
//! to one completion channel, and one thread ("net-rs-rdma-dev") drives them all with
//! the adaptive [`Poller`]: it polls every member's CQ while completions flow, then
//! arms them all and sleeps on the shared channel (and on the RDMA-CM channels of the
//! connections that own one). An idle device costs one sleeping thread however many
//! connections it has.
//!
//! The registry keeps a weak reference per device: the first connection on a device
//! starts its reactor (with that connection's [`PollerConfig`]), the last one to go
//! stops it. Members are weak too: a connection whose last handle is dropped is handed
//! to the reactor to linger (below), which removes it when it is done.
//!
//! Nothing that changes the set depends on a timeout to be noticed: a connection that
//! joins rings the reactor's doorbell (an eventfd the thread also sleeps on), so its CQ
//! is polled and armed at once; so does work that no completion announces (a lent
//! receive buffer given back while the thread sleeps: see [`DeviceReactor::wake`]). A
//! connection whose last handle was dropped *lingers*: the reactor keeps it (a strong
//! reference) and drives it until what it still had to send is delivered or its linger
//! time is up, then finishes it (disconnect) and lets it go; so the last handle's drop
//! makes no verbs call on whatever thread it runs.
//!
//! The thread is also the driver's clock: a task that waits with a deadline (a `close`
//! bounded by its linger time) registers a timer ([`DeviceReactor::wake_at`]), and the
//! thread wakes it when the time comes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use sideway::ibverbs::completion::CompletionChannel;
use sideway::rdmacm::communication_manager::EventChannel;

use super::context::RdmaContext;
use super::poller::{new_channel, CqSource, CqWaiter, Doorbell};
use crate::error::{Error, Result};
use crate::reactor::{Completion, CompletionSource, Poller, PollerConfig, PollerHandle};

/// A connection as the device thread sees it: a CQ to drain and to arm.
pub(crate) trait Member: Send + Sync {
    /// Poll the member's CQ once and handle what it had (errors are the member's own
    /// business: it fails its connection). Returns how many completions it handled.
    fn poll_cq(&self, max: usize) -> usize;
    /// Request a notification for the member's next completion, unless it is being
    /// polled by a waiting task.
    fn arm_cq(&self);
    /// Whether it has work no completion will announce (checked before the thread
    /// sleeps: `poll_cq` does that work).
    fn needs_service(&self) -> bool;
    /// A lingering member: whether it is done (everything delivered, or failed).
    fn settled(&self) -> bool;
    /// End a lingering member (`expired`: its linger time ran out first).
    fn finish(&self, expired: bool);
}

/// A connection whose last handle is gone, kept until it settles or `deadline`.
struct Lingering {
    member: Arc<dyn Member>,
    id: usize,
    deadline: Instant,
}

struct Entry {
    member: Weak<dyn Member>,
    cm: Option<Arc<EventChannel>>,
}

#[derive(Default)]
struct Members {
    list: Mutex<slab::Slab<Entry>>,
    version: AtomicU64,
    lingering: Mutex<Vec<Lingering>>,
    /// Tasks to wake at a time (see [`DeviceReactor::wake_at`]).
    timers: Mutex<Vec<(Instant, Waker)>>,
    /// How many there are, so that the busy-polling thread takes no lock while none are.
    timer_count: AtomicUsize,
    /// The thread is about to sleep or sleeps: work must ring the doorbell.
    asleep: AtomicBool,
}

/// The device's poller thread and the completion channel its CQs share.
pub(crate) struct DeviceReactor {
    key: usize,
    channel: Arc<CompletionChannel>,
    members: Arc<Members>,
    doorbell: Arc<Doorbell>,
    _poller: PollerHandle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static REACTORS: Mutex<Vec<(usize, Weak<DeviceReactor>)>> = Mutex::new(Vec::new());

impl DeviceReactor {
    /// The reactor of `ctx`'s device, started with `config` if it is not running.
    pub(crate) fn for_device(ctx: &RdmaContext, config: PollerConfig) -> Result<Arc<Self>> {
        let key = Arc::as_ptr(ctx.device_context()) as usize;
        let mut all = lock(&REACTORS);
        all.retain(|(_, w)| w.strong_count() > 0);
        if let Some(r) = all
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(r);
        }
        let channel = new_channel(ctx)?;
        let members = Arc::new(Members::default());
        let doorbell = Arc::new(Doorbell::new().map_err(Error::from)?);
        let source = DeviceSource {
            members: members.clone(),
            channel: channel.clone(),
            doorbell: doorbell.clone(),
            seen: u64::MAX,
            snapshot: Vec::new(),
            waiter: CqWaiter::new(channel.clone(), Vec::new()).with_doorbell(doorbell.clone()),
        };
        let poller = Poller::new(source, |_: &[Completion]| {}, config)
            .spawn("net-rs-rdma-dev")
            .map_err(Error::from)?;
        let r = Arc::new(DeviceReactor {
            key,
            channel,
            members,
            doorbell,
            _poller: poller,
        });
        all.push((key, Arc::downgrade(&r)));
        Ok(r)
    }

    /// A CQ of `entries` entries for a new connection on this device.
    pub(crate) fn new_cq(&self, ctx: &RdmaContext, entries: u32) -> Result<CqSource> {
        debug_assert_eq!(Arc::as_ptr(ctx.device_context()) as usize, self.key);
        CqSource::on_channel(ctx, entries, self.channel.clone())
    }

    /// Drive `member` from now on (and watch its RDMA-CM channel `cm`, if it owns one).
    /// Returns its id (the key under which [`linger`](DeviceReactor::linger) takes it).
    pub(crate) fn add(&self, member: Weak<dyn Member>, cm: Option<Arc<EventChannel>>) -> usize {
        let id = lock(&self.members.list).insert(Entry { member, cm });
        self.members.version.fetch_add(1, Ordering::Release);
        // Its CQ is not armed yet and its RDMA-CM channel not watched: the sleeping
        // thread must take it in now, not when its sleep times out.
        self.doorbell.ring();
        id
    }

    /// Keep driving member `id` (whose last handle is gone) until it settles or
    /// `deadline`, then finish and remove it.
    pub(crate) fn linger(&self, member: Arc<dyn Member>, id: usize, deadline: Instant) {
        lock(&self.members.lingering).push(Lingering {
            member,
            id,
            deadline,
        });
        self.doorbell.ring();
    }

    /// Wake `waker` at `at` (or soon after: the thread's next round past it). The
    /// sleeping thread is rung so that it sleeps no longer than that.
    pub(crate) fn wake_at(&self, at: Instant, waker: Waker) {
        let mut t = lock(&self.members.timers);
        t.push((at, waker));
        self.members.timer_count.store(t.len(), Ordering::Release);
        drop(t);
        self.doorbell.ring();
    }

    /// A future that is ready at `at`, woken by this reactor's thread.
    pub(crate) fn sleep_until(self: &Arc<Self>, at: Instant) -> Sleep {
        Sleep {
            reactor: self.clone(),
            at,
            registered: None,
        }
    }

    /// A member has work that no completion announces: make sure the thread sees it.
    /// Call after making `needs_service` true (a doorbell ring costs a system call, so
    /// it happens only when the thread is asleep or about to be).
    pub(crate) fn wake(&self) {
        if self.members.asleep.load(Ordering::SeqCst) {
            self.doorbell.ring();
        }
    }
}

/// Ready at its time; see [`DeviceReactor::sleep_until`]. Registers its waker with the
/// reactor once (again only if the task's waker changes).
pub(crate) struct Sleep {
    reactor: Arc<DeviceReactor>,
    at: Instant,
    registered: Option<Waker>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            self.registered = Some(cx.waker().clone());
            self.reactor.wake_at(self.at, cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The device thread's completion source: every member's CQ.
struct DeviceSource {
    members: Arc<Members>,
    channel: Arc<CompletionChannel>,
    doorbell: Arc<Doorbell>,
    seen: u64,
    snapshot: Vec<Weak<dyn Member>>,
    waiter: CqWaiter,
}

impl DeviceSource {
    /// Take a fresh copy of the member list if it changed (no lock in the hot loop).
    fn refresh(&mut self) {
        let v = self.members.version.load(Ordering::Acquire);
        if v == self.seen {
            return;
        }
        let list = lock(&self.members.list);
        self.seen = self.members.version.load(Ordering::Acquire);
        self.snapshot = list.iter().map(|(_, e)| e.member.clone()).collect();
        let cms = list.iter().filter_map(|(_, e)| e.cm.clone()).collect();
        self.waiter = CqWaiter::new(self.channel.clone(), cms).with_doorbell(self.doorbell.clone());
    }

    /// Wake the tasks whose time has come.
    fn fire_timers(&mut self) {
        if self.members.timer_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let due: Vec<Waker> = {
            let mut t = lock(&self.members.timers);
            let now = Instant::now();
            let (due, keep) = std::mem::take(&mut *t)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            *t = keep;
            self.members.timer_count.store(t.len(), Ordering::Release);
            due.into_iter().map(|(_, w)| w).collect()
        };
        for w in due {
            w.wake();
        }
    }

    /// Finish the lingering members that settled or ran out of time.
    fn settle_lingering(&mut self) {
        let done: Vec<Lingering> = {
            let mut l = lock(&self.members.lingering);
            if l.is_empty() {
                return;
            }
            let now = Instant::now();
            let (done, keep) = std::mem::take(&mut *l)
                .into_iter()
                .partition(|m| m.member.settled() || now >= m.deadline);
            *l = keep;
            done
        };
        let now = Instant::now();
        for m in done {
            m.member.finish(now >= m.deadline && !m.member.settled());
            lock(&self.members.list).try_remove(m.id);
            self.members.version.fetch_add(1, Ordering::Release);
        }
    }
}

impl CompletionSource for DeviceSource {
    /// Polls every member's CQ once; each member hands its batch to its own protocol
    /// core (routing it here would only be handed back), so `out` stays empty.
    fn poll(&mut self, _out: &mut Vec<Completion>, max: usize) -> io::Result<usize> {
        self.fire_timers();
        self.settle_lingering();
        self.refresh();
        Ok(self
            .snapshot
            .iter()
            .filter_map(Weak::upgrade)
            .map(|m| m.poll_cq(max))
            .sum())
    }

    fn arm(&mut self) -> io::Result<()> {
        self.refresh();
        for m in self.snapshot.iter().filter_map(Weak::upgrade) {
            m.arm_cq();
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> io::Result<bool> {
        // Announce the sleep, then look for work that would not wake it (the other
        // side stores its work, then reads `asleep`: one of the two sees the other).
        self.members.asleep.store(true, Ordering::SeqCst);
        let work = self
            .snapshot
            .iter()
            .filter_map(Weak::upgrade)
            .any(|m| m.needs_service());
        // Lingering members are checked against their deadlines at least this often.
        let mut timeout = if lock(&self.members.lingering).is_empty() {
            timeout
        } else {
            timeout.min(Duration::from_millis(10))
        };
        // No later than the first timer.
        if let Some(first) = lock(&self.members.timers).iter().map(|(at, _)| *at).min() {
            timeout = timeout.min(first.saturating_duration_since(Instant::now()));
        }
        let res = if work {
            Ok(true)
        } else {
            // The thread must outlive a failed wait (its connections would hang
            // without it): treat it as a short timeout, and the next round polls every
            // CQ again.
            self.waiter.wait(timeout).or_else(|_| {
                std::thread::sleep(Duration::from_millis(1));
                Ok(false)
            })
        };
        self.members.asleep.store(false, Ordering::SeqCst);
        res
    }
}
