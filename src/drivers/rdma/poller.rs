//! A completion queue as a [`CompletionSource`] for the reactor's poller thread.
//!
//! Polling drains the CQ without a syscall. Arming calls `ibv_req_notify_cq`; waiting
//! `poll(2)`s the completion channel's file descriptor (non-blocking) with a timeout,
//! then takes and acknowledges the event with `ibv_get_cq_event` /
//! `ibv_ack_cq_events` (sideway 0.4.3 wraps neither, so they come from
//! `rdma-mummy-sys`). Every event is acknowledged as soon as it is taken, so destroying
//! the CQ never blocks on unacknowledged events.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, PollCompletionQueueError,
};
use sideway::rdmacm::communication_manager::EventChannel;

use super::context::RdmaContext;
use crate::error::{Error, ErrorKind, Result};
use crate::reactor::{Completion, CompletionSource};

/// The verbs opcode bit that marks receive completions (`IBV_WC_RECV` and up).
const WC_RECV: u32 = 128;

/// A completion queue with its own completion channel.
pub struct CqSource {
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    cm: Option<Arc<EventChannel>>,
}

impl CqSource {
    /// A CQ of `entries` entries on `ctx`, with a non-blocking completion channel.
    ///
    /// # Errors
    /// [`ErrorKind::Registration`] if the channel or CQ cannot be created.
    pub fn new(ctx: &RdmaContext, entries: u32) -> Result<CqSource> {
        Self::on_channel(ctx, entries, new_channel(ctx)?)
    }

    /// A CQ of `entries` entries on `ctx` whose notifications go to `channel` (which
    /// other CQs of the device may share).
    ///
    /// # Errors
    /// [`ErrorKind::Registration`] if the CQ cannot be created.
    pub fn on_channel(
        ctx: &RdmaContext,
        entries: u32,
        channel: Arc<CompletionChannel>,
    ) -> Result<CqSource> {
        let dev = ctx.device_context();
        let fail = |what: &str, e: &dyn fmt::Display| {
            Error::new(
                ErrorKind::Registration,
                format!("{what} on {}: {e}", ctx.name()),
            )
        };
        let cq = dev
            .create_cq_builder()
            .setup_cqe(entries)
            .setup_comp_channel(&channel, 0)
            .build()
            .map_err(|e| fail("cannot create a completion queue", &e))?;
        Ok(CqSource {
            cq,
            channel,
            cm: None,
        })
    }

    /// Also read the (non-blocking) RDMA-CM event channel `cm` while waiting, handing
    /// its events to the connections they concern (`events::dispatch`). A
    /// connection that owns its channel needs no thread of its own for it.
    pub fn watch_cm(&mut self, cm: Arc<EventChannel>) {
        self.cm = Some(cm);
    }

    /// The RDMA-CM channel given to [`watch_cm`](CqSource::watch_cm), taken out (a
    /// shared device poller watches it instead).
    pub fn take_cm(&mut self) -> Option<Arc<EventChannel>> {
        self.cm.take()
    }

    /// The half that sleeps on the channels.
    pub fn waiter(&self) -> CqWaiter {
        CqWaiter::new(self.channel.clone(), self.cm.iter().cloned().collect())
    }

    /// The CQ, to attach queue pairs to.
    pub fn cq(&self) -> &Arc<BasicCompletionQueue> {
        &self.cq
    }
}

/// A non-blocking completion channel on `ctx`'s device.
///
/// # Errors
/// [`ErrorKind::Registration`] if it cannot be created.
pub fn new_channel(ctx: &RdmaContext) -> Result<Arc<CompletionChannel>> {
    let fail = |what: &str, e: &dyn fmt::Display| {
        Error::new(
            ErrorKind::Registration,
            format!("{what} on {}: {e}", ctx.name()),
        )
    };
    let channel = CompletionChannel::new(ctx.device_context())
        .map_err(|e| fail("cannot create a completion channel", &e))?;
    channel
        .set_nonblocking(true)
        .map_err(|e| fail("cannot make the completion channel non-blocking", &e))?;
    Ok(channel)
}

impl fmt::Debug for CqSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqSource")
            .field("channel_fd", &self.channel.as_raw_fd())
            .finish()
    }
}

impl CompletionSource for CqSource {
    fn poll(&mut self, out: &mut Vec<Completion>, _max: usize) -> io::Result<usize> {
        let poller = match self.cq.start_poll() {
            Ok(p) => p,
            Err(PollCompletionQueueError::CompletionQueueEmpty) => return Ok(0),
            Err(e) => return Err(io::Error::other(format!("ibv_poll_cq failed: {e}"))),
        };
        let before = out.len();
        // One `ibv_poll_cq` filled the poller's batch; take all of it (what is not taken
        // would be lost).
        for wc in poller {
            let opcode = wc.opcode();
            out.push(Completion {
                wr_id: wc.wr_id(),
                status: wc.status(),
                opcode,
                byte_len: wc.byte_len(),
                imm: (opcode & WC_RECV != 0).then(|| wc.imm_data()),
            });
        }
        Ok(out.len() - before)
    }

    fn arm(&mut self) -> io::Result<()> {
        // SAFETY: `self.cq` keeps the CQ alive for the duration of the call.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc.abs()));
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> io::Result<bool> {
        self.waiter().wait(timeout)
    }
}

/// The sleeping half of a [`CqSource`]: its completion channel and the RDMA-CM channel
/// it watches. Waiting needs no access to the CQ itself, so a source shared with
/// callers that poll it inline is not locked while its thread sleeps.
#[derive(Clone)]
pub struct CqWaiter {
    channel: Arc<CompletionChannel>,
    cm: Vec<Arc<EventChannel>>,
    doorbell: Option<Arc<Doorbell>>,
}

/// An eventfd that wakes a thread sleeping in [`CqWaiter::wait`] for work that no
/// completion announces (a connection joined, a lent buffer came back).
#[derive(Debug)]
pub(crate) struct Doorbell {
    fd: std::fs::File,
}

impl Doorbell {
    pub(crate) fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid file descriptor that nothing else owns.
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        Ok(Doorbell { fd: owned.into() })
    }

    /// Wake the sleeper (or make its next sleep return at once).
    pub(crate) fn ring(&self) {
        // A full counter (2^64 - 2 rings unread) only means it is already rung.
        let _ = std::io::Write::write(&mut &self.fd, &1u64.to_ne_bytes());
    }

    /// Take the rings (after a wake-up).
    fn clear(&self) {
        let mut b = [0u8; 8];
        let _ = std::io::Read::read(&mut &self.fd, &mut b);
    }
}

impl fmt::Debug for CqWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqWaiter")
            .field("channel_fd", &self.channel.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl CqWaiter {
    /// Sleep on `channel` (shared by any number of CQs) and the RDMA-CM channels `cm`.
    pub fn new(channel: Arc<CompletionChannel>, cm: Vec<Arc<EventChannel>>) -> CqWaiter {
        CqWaiter {
            channel,
            cm,
            doorbell: None,
        }
    }

    /// Also wake when `doorbell` rings ([`wait`](CqWaiter::wait) then returns `true`).
    pub(crate) fn with_doorbell(mut self, doorbell: Arc<Doorbell>) -> CqWaiter {
        self.doorbell = Some(doorbell);
        self
    }

    /// Block until the armed CQ notification fires (taking and acknowledging the
    /// event), the doorbell rings, or `timeout` passes; RDMA-CM events that arrive
    /// meanwhile are dispatched. Returns whether the CQ notification fired or the
    /// doorbell rang.
    ///
    /// # Errors
    /// A failed `poll(2)` or `ibv_get_cq_event`.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let pollfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.channel.as_raw_fd())
            .chain(self.cm.iter().map(|c| c.as_raw_fd()))
            .chain(self.doorbell.iter().map(|d| d.fd.as_raw_fd()))
            .map(pollfd)
            .collect();
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` holds `fds.len()` valid, initialized pollfds that outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        for (fd, cm) in fds[1..].iter().zip(&self.cm) {
            if fd.revents != 0 {
                super::events::drain(cm, super::events::dispatch);
            }
        }
        let rung = match (&self.doorbell, fds.last()) {
            (Some(d), Some(fd)) if fd.revents != 0 => {
                d.clear();
                true
            }
            _ => false,
        };
        if fds[0].revents == 0 {
            return Ok(rung);
        }
        let mut cq = std::ptr::null_mut();
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the channel is alive (`self.channel`) and non-blocking; `cq`/`ctx` are
        // valid out-pointers.
        let rc = unsafe {
            rdma_mummy_sys::ibv_get_cq_event(
                self.channel.comp_channel().as_ptr(),
                &mut cq,
                &mut ctx,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // SAFETY: `cq` was just returned by `ibv_get_cq_event`: a CQ on this channel
        // that cannot be destroyed before this event is acknowledged (`ibv_destroy_cq`
        // waits for every taken event's ack); one event was taken, one is acknowledged.
        unsafe { rdma_mummy_sys::ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }
}
