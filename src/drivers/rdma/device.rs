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
//! stops it. Members are weak too: a connection leaves with
//! [`DeviceReactor::remove`], and one being dropped is simply skipped.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sideway::ibverbs::completion::CompletionChannel;
use sideway::rdmacm::communication_manager::EventChannel;

use super::context::RdmaContext;
use super::poller::{new_channel, CqSource, CqWaiter};
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
}

struct Entry {
    member: Weak<dyn Member>,
    cm: Option<Arc<EventChannel>>,
}

#[derive(Default)]
struct Members {
    list: Mutex<slab::Slab<Entry>>,
    version: AtomicU64,
}

/// The device's poller thread and the completion channel its CQs share.
pub(crate) struct DeviceReactor {
    key: usize,
    channel: Arc<CompletionChannel>,
    members: Arc<Members>,
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
        let source = DeviceSource {
            members: members.clone(),
            channel: channel.clone(),
            seen: u64::MAX,
            snapshot: Vec::new(),
            waiter: CqWaiter::new(channel.clone(), Vec::new()),
        };
        let poller = Poller::new(source, |_: &[Completion]| {}, config)
            .spawn("net-rs-rdma-dev")
            .map_err(Error::from)?;
        let r = Arc::new(DeviceReactor {
            key,
            channel,
            members,
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
    /// Returns the id to [`remove`](DeviceReactor::remove) it with.
    pub(crate) fn add(&self, member: Weak<dyn Member>, cm: Option<Arc<EventChannel>>) -> usize {
        let id = lock(&self.members.list).insert(Entry { member, cm });
        self.members.version.fetch_add(1, Ordering::Release);
        id
    }

    /// Stop driving member `id`.
    pub(crate) fn remove(&self, id: usize) {
        lock(&self.members.list).try_remove(id);
        self.members.version.fetch_add(1, Ordering::Release);
    }
}

/// The device thread's completion source: every member's CQ.
struct DeviceSource {
    members: Arc<Members>,
    channel: Arc<CompletionChannel>,
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
        self.waiter = CqWaiter::new(self.channel.clone(), cms);
    }
}

impl CompletionSource for DeviceSource {
    fn poll(&mut self, _out: &mut Vec<Completion>, max: usize) -> io::Result<usize> {
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
        // The thread must outlive a failed wait (its connections would hang without it):
        // treat it as a short timeout, and the next round polls every CQ again.
        self.waiter.wait(timeout).or_else(|_| {
            std::thread::sleep(Duration::from_millis(1));
            Ok(false)
        })
    }
}
