//! [`RdmaTransport`]: messages over one RC queue pair, with receive credits.
//!
//! * Hello: the first message each side sends carries its receive depth, buffer size
//!   and maximum message size (sideway has no RDMA-CM private data), so the peers need
//!   not be configured alike.
//! * Receives: `depth` registered buffers of `chunk` bytes stay posted. A message that
//!   fits one buffer is lent to the application as `Bytes` over that buffer (a
//!   `Lease`; the buffer is posted again when it drops), while at most half the
//!   buffers are lent; otherwise the bytes are copied out and the buffer goes back at
//!   once (re-posted with the rest of its completion batch), so the receive queue never
//!   runs dry however long the application holds its messages. Larger messages are reassembled from fragments.
//! * Sends: `send` queues the whole message (so a dropped `send` future never leaves
//!   half a message on the wire) and the pump posts it as SEND_WITH_IMM fragments of
//!   the smaller `chunk` of both sides while credits last, several per doorbell. The
//!   immediate data carries the credits being returned (16 bits) and flags: last
//!   fragment, credit-only update, hello, end of stream (their encodings, and the
//!   `wr_id` numbering, are in `wire.rs`). A fragment in registered
//!   memory (an `alloc_buf` buffer, a received message) is sent where it is; others go
//!   through a registered bounce slot. The op-slab entry owns either until the
//!   completion; the pump runs again when credits or send-queue slots come back.
//! * Credits ([`Credits`]) make sure a SEND never finds the peer without a posted
//!   receive; should it happen anyway the QP retries (`rnr_retry` 7) and the device's
//!   RNR counter shows it.
//! * Completions come from the device's shared poller thread (`DeviceReactor`), or,
//!   in latency mode, from the waiting task polling its own CQ; either way a batch is
//!   polled and handled under the connection's CQ lock, in CQ order.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use event_listener::Event;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairAttributeMask,
    QueuePairState, SetScatterGatherEntry, WorkRequestFlags,
};

use super::buffer::{stage, GiveBack, Lease};
use super::cm::{CmHandle, CmListener};
use super::config::{APP_REGION, CQ_ENTRIES, QUEUE_DEPTH};
use super::context::RdmaContext;
use super::device::{DeviceReactor, Member};
use super::poller::CqSource;
use super::recv_pool::RecvPool;
use super::wire::{Hello, Imm, ImmFlags, WrKind};
use crate::buffer::Buf;
use crate::codec::too_large;
use crate::error::{Error, ErrorKind, Result};
use crate::mem::{Slab, SlabBuf};
use crate::reactor::credit::Credits;
use crate::reactor::{Completion, CompletionSource, OpSlab};
use crate::transport::Transport;

/// Sends in flight from which `send` queues without posting (see `send`).
const CORK_IN_FLIGHT: u32 = 8;
pub use super::config::{RdmaConfig, APP_MAX};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Fin,
    Hello,
}

struct Outgoing {
    data: Bytes,
    off: usize,
    kind: Kind,
}

struct State {
    credits: Credits,
    sq_free: u32,
    /// Data fragments (and FIN) posted and not completed yet.
    data_in_flight: u32,
    /// A data fragment completed with an error: `flush` cannot succeed any more.
    lost: bool,
    /// Fragments sent from registered memory (`alloc_buf`, received messages) without
    /// a copy.
    zero_copy_sends: u64,

    sendq: VecDeque<Outgoing>,
    queued: usize,
    recvq: VecDeque<Bytes>,
    partial: Vec<u8>,
    recv: RecvPool,
    /// The peer's parameters, from its hello.
    peer: Option<Hello>,
    /// Fragment size: the smaller of both sides' receive buffers.
    frag: usize,
    peer_fin: bool,
    shut: bool,
    closed: bool,
    /// Why RDMA-CM says the connection ended, once it has.
    gone: Option<String>,
    error: Option<Error>,
}

/// The connection's completion queue, shared by its device's poller thread and (in
/// latency mode) the tasks waiting on the connection. A batch is polled and handled under this
/// one lock, so batches are handled in CQ order whoever polls.
struct Core {
    source: CqSource,
    buf: Vec<Completion>,
}

struct Shared {
    // Declared first: the QP is destroyed before the memory its requests name.
    qp: Mutex<BasicQueuePair>,
    core: Mutex<Core>,
    /// Tasks busy-polling the CQ now (latency mode). While there are any, the device
    /// thread does not arm this CQ: a notification per completion would wake it for
    /// nothing.
    inline: AtomicUsize,
    reactor: Arc<DeviceReactor>,
    state: Mutex<State>,
    /// Lent receive buffers given back by dropped messages, waiting to be posted again
    /// (a leaf lock: a message dropped while its thread holds `state` only queues).
    returns: Mutex<Vec<(usize, SlabBuf)>>,
    me: Weak<Shared>,
    ops: Arc<OpSlab>,
    /// Receive buffers and send bounce slots, `chunk` bytes each.
    slab: Slab,
    /// Registered memory handed to the application by `alloc_buf` (size classes from
    /// one chunk to [`APP_MAX`]), sent without a copy.
    app_slab: Slab,
    changed: Event,
    cfg: RdmaConfig,
    cm: CmHandle,
    _context: RdmaContext,
}

/// The immediate data of a SEND carrying `credits` (at most
/// [`MAX_PIGGYBACK`](crate::reactor::credit::MAX_PIGGYBACK), which [`Credits`] never
/// exceeds) and `flags`.
fn imm_data(credits: u32, flags: ImmFlags) -> u32 {
    let credits = u16::try_from(credits).expect("Credits hands out at most 16 bits");
    Imm { credits, flags }.encode()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A message connection over an RDMA reliable-connected queue pair.
pub struct RdmaTransport {
    shared: Arc<Shared>,
    member: usize,
    peer: Option<SocketAddr>,
}

/// The connection state, locked. On unlock it posts the receive buffers that messages
/// dropped meanwhile gave back (see [`Shared::drain_returns`]).
struct StateGuard<'a> {
    shared: &'a Shared,
    guard: Option<MutexGuard<'a, State>>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.shared.drain_returns();
    }
}

impl GiveBack for Shared {
    fn give_back(&self, idx: usize, buf: SlabBuf) {
        lock(&self.returns).push((idx, buf));
        self.drain_returns();
    }
}

impl Member for Shared {
    fn poll_cq(&self, max: usize) -> usize {
        let res = self.poll_core(&mut lock(&self.core), max, None);
        match res {
            Ok(n) => n,
            Err(e) => {
                let e = Error::new(ErrorKind::ConnectionReset, format!("ibv_poll_cq: {e}"));
                self.fail(&mut self.lock_state(), e);
                self.changed.notify(usize::MAX);
                0
            }
        }
    }

    fn arm_cq(&self) {
        if self.inline.load(Ordering::Acquire) > 0 {
            return;
        }
        let res = lock(&self.core).source.arm();
        if let Err(e) = res {
            let e = Error::new(
                ErrorKind::ConnectionReset,
                format!("ibv_req_notify_cq: {e}"),
            );
            self.fail(&mut self.lock_state(), e);
            self.changed.notify(usize::MAX);
        }
    }
}

impl Shared {
    fn lock_state(&self) -> StateGuard<'_> {
        StateGuard {
            shared: self,
            guard: Some(lock(&self.state)),
        }
    }

    /// Post the given-back receive buffers, unless another holder of `state` is about
    /// to: every holder runs this after unlocking, and a buffer queued while the lock
    /// was held is seen by that holder's re-check.
    fn drain_returns(&self) {
        loop {
            if lock(&self.returns).is_empty() {
                return;
            }
            let mut st = match self.state.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            let items = std::mem::take(&mut *lock(&self.returns));
            let dead = st.error.is_some() || st.closed || st.gone.is_some();
            for (idx, buf) in items {
                st.recv.returned();
                if !dead {
                    st.recv.put_back(idx, buf);
                }
            }
            self.post_receives(&mut st);
            self.pump(&mut st);
            drop(st);
            self.changed.notify(usize::MAX);
        }
    }
    /// Poll one batch from the CQ and handle it (the caller holds the core's lock).
    fn poll_core(
        &self,
        core: &mut Core,
        max: usize,
        out: Option<&mut Vec<Completion>>,
    ) -> io::Result<usize> {
        let Core { source, buf } = core;
        buf.clear();
        let n = source.poll(buf, max)?;
        if n > 0 {
            self.on_completions(buf);
            if let Some(out) = out {
                out.extend_from_slice(buf);
            }
        }
        Ok(n)
    }

    /// Latency mode: poll the CQ from the waiting task, unless another thread is.
    fn poll_inline(&self) {
        let mut core = match self.core.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if let Err(e) = self.poll_core(&mut core, 32, None) {
            drop(core);
            let e = Error::new(ErrorKind::ConnectionReset, format!("ibv_poll_cq: {e}"));
            self.fail(&mut self.lock_state(), e);
            self.changed.notify(usize::MAX);
        }
    }
    fn fail(&self, st: &mut State, e: Error) {
        if st.error.is_some() || st.closed {
            return;
        }
        // After a disconnect every failure (flushed work requests) has that one cause.
        st.error = Some(match &st.gone {
            Some(why) => Error::new(
                ErrorKind::ConnectionReset,
                format!("the connection ended: {why}"),
            ),
            None => e,
        });
    }

    /// RDMA-CM says the connection ended (peer disconnected or died). Move the QP to
    /// the error state: what already arrived is still delivered, then every posted
    /// request completes with a flush error, which fails the waiting operations (so
    /// even a side that only receives learns of it).
    fn on_gone(&self, why: String) {
        let mut st = self.lock_state();
        if st.gone.is_some() {
            return;
        }
        st.gone = Some(why);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        // The QP's lock must be released before `st` is: unlocking the state may post
        // receives, which takes the QP's lock again.
        let moved = lock(&self.qp).modify(&attr).map_err(|e| e.to_string());
        let failed = match moved {
            Ok(()) => None,
            // A QP in the error state already (a failed request put it there) needs no
            // move: its flushes come anyway.
            Err(_) if self.qp_in_error() => None,
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            // No flushes will come: fail now.
            let e = Error::new(
                ErrorKind::ConnectionReset,
                format!("cannot move the queue pair to the error state: {e}"),
            );
            self.fail(&mut st, e);
            drop(st);
            self.changed.notify(usize::MAX);
        }
    }

    fn qp_in_error(&self) -> bool {
        lock(&self.qp)
            .query(QueuePairAttributeMask::State)
            .is_ok_and(|(a, _)| a.state() == QueuePairState::Error)
    }

    /// Post queued fragments while credits and send-queue slots last, then a credit
    /// update if one is due, all in one `ibv_post_send`.
    ///
    /// A fragment that lies in this connection's registered memory (a [`Buf`] from
    /// [`alloc_buf`](Transport::alloc_buf), frozen) is sent from where it is: its
    /// `Bytes` is kept by the op-slab entry until the completion. Anything else is
    /// copied into a registered bounce slot first. Credit updates carry no payload.
    fn pump(&self, st: &mut State) {
        struct Wr {
            wr_id: u64,
            imm: u32,
            sge: Option<(u32, u64, u32)>,
            // Held until the post, then dropped: the entry is orphaned and lives
            // until the completion.
            _op: Option<crate::reactor::OpFuture>,
        }
        let mut wrs: Vec<Wr> = Vec::new();
        while st.error.is_none() && st.sq_free > 0 {
            let Some(front) = st.sendq.front() else { break };
            let left = front.data.len() - front.off;
            let n = left.min(st.frag);
            let kind = front.kind;
            let piggy = match kind {
                Kind::Hello => st.credits.take_for_hello(),
                _ => st.credits.take_for_data(),
            };
            let Some(piggy) = piggy else { break };
            let flags = match kind {
                Kind::Hello => ImmFlags::Hello,
                Kind::Fin => ImmFlags::Fin,
                Kind::Data if n == left => ImmFlags::LastFragment,
                Kind::Data => ImmFlags::Fragment,
            };
            let front = st.sendq.front_mut().expect("checked above");
            let frag = front.data.slice(front.off..front.off + n);
            front.off += n;
            if front.off == front.data.len() {
                st.sendq.pop_front();
            }
            st.sq_free -= 1;
            st.queued -= n;
            st.data_in_flight += 1;
            let staged = match stage(frag, &[&self.app_slab, &self.slab], &self.slab) {
                Ok(staged) => staged,
                Err(e) => {
                    self.fail(st, e);
                    break;
                }
            };
            st.zero_copy_sends += u64::from(staged.zero_copy);
            let (key, addr) = (staged.lkey, staged.addr);
            let op = self.ops.register(staged.keep);
            wrs.push(Wr {
                wr_id: WrKind::Op(op.wr_id()).to_u64(),
                imm: imm_data(piggy, flags),
                sge: Some((key, addr, n as u32)),
                _op: Some(op),
            });
        }
        if st.error.is_none() && st.sq_free > 0 {
            if let Some(piggy) = st.credits.take_for_update() {
                st.sq_free -= 1;
                wrs.push(Wr {
                    wr_id: WrKind::Control.to_u64(),
                    imm: imm_data(piggy, ImmFlags::CreditUpdate),
                    sge: None,
                    _op: None,
                });
            }
        }
        if wrs.is_empty() {
            return;
        }
        let mut qp = lock(&self.qp);
        let mut g = qp.start_post_send();
        for wr in &wrs {
            let h = g
                .construct_wr(wr.wr_id, WorkRequestFlags::Signaled)
                .setup_send_imm(wr.imm);
            if let Some((key, addr, len)) = wr.sge {
                // SAFETY: `addr..addr+len` is registered with this QP's PD under `key`
                // (a bounce slot, or a slot of `app_slab` found by `lookup`), and the
                // op-slab entry keeps its owner (the `SlabBuf`, or the `Bytes` holding
                // the slot) alive until this request's completion has been polled; if
                // the future is dropped the entry is orphaned, not freed.
                unsafe { h.setup_sge(key, addr, len) };
            }
        }
        let res = g.post();
        drop(qp);
        // The futures are not awaited: dropping them orphans their entries, which free
        // the memory when the completion (success or flush error) arrives. If posting
        // failed, requests that never went out stay orphaned until the connection is
        // dropped (after the QP): a bounded leak on a dead connection, never a free of
        // memory the device may still read.
        drop(wrs);
        if let Err(e) = res {
            self.fail(
                st,
                Error::new(ErrorKind::ConnectionReset, format!("ibv_post_send: {e}")),
            );
        }
    }

    fn on_recv(&self, st: &mut State, idx: u32, c: &Completion) {
        let Some((idx, buf)) = st.recv.take(idx) else {
            return;
        };
        if !c.is_success() {
            let e = Error::new(
                ErrorKind::WorkCompletion { status: c.status },
                format!("receive failed with work completion status {}", c.status),
            );
            self.fail(st, e);
            return;
        }
        let imm = match c.imm.map(Imm::decode) {
            Some(Ok(imm)) => imm,
            Some(Err(e)) => {
                self.fail(st, e.into());
                return;
            }
            None => {
                let e = Error::new(ErrorKind::InvalidData, "a receive without immediate data");
                self.fail(st, e);
                return;
            }
        };
        st.credits.on_receive(u32::from(imm.credits));
        if imm.flags == ImmFlags::Hello {
            match Hello::decode(&buf.as_ref()[..c.byte_len as usize]) {
                Ok(p) if st.peer.is_none() => {
                    st.credits.on_hello(p.depth);
                    st.frag = self.cfg.chunk.min(p.chunk as usize);
                    st.peer = Some(p);
                }
                Ok(_) => {}
                Err(e) => self.fail(st, e.into()),
            }
        }
        if imm.flags.is_data() {
            let len = c.byte_len as usize;
            if st.partial.len() + len > self.cfg.max_message_size {
                let size = (st.partial.len() + len) as u64;
                self.fail(st, too_large(size, self.cfg.max_message_size, true));
                return;
            }
            // A whole message in one buffer is lent as it is, while at most half the
            // receive buffers are out: the rest keep cycling, so receives never run dry
            // however many messages the application holds (those are copied).
            let last = imm.flags == ImmFlags::LastFragment;
            if last && st.partial.is_empty() && len > 0 && st.recv.try_lend() {
                let msg = Lease::bytes(buf, idx, len, self.me.clone());
                st.recvq.push_back(msg);
                return;
            }
            st.partial.extend_from_slice(&buf.as_ref()[..len]);
            if last {
                let msg = std::mem::take(&mut st.partial);
                st.recvq.push_back(Bytes::from(msg));
            }
        }
        if imm.flags == ImmFlags::Fin {
            st.peer_fin = true;
        }
        // Posted again with the batch's other buffers (`post_receives`).
        st.recv.put_back(idx, buf);
    }

    /// Post the receive buffers that came back, in one batch, and count the credits.
    fn post_receives(&self, st: &mut State) {
        match st.recv.post_pending(&mut lock(&self.qp)) {
            Ok(n) => st.credits.reposted(n),
            Err(e) => self.fail(st, e),
        }
    }

    fn on_completions(&self, batch: &[Completion]) {
        // Release the finished sends' bounce slots first, so the pump below reuses them:
        // live send slots never exceed the send queue's depth, which bounds the memory
        // ever registered.
        let sends: Vec<Completion> = batch
            .iter()
            .filter(|c| matches!(WrKind::try_from(c.wr_id), Ok(WrKind::Op(_))))
            .copied()
            .collect();
        self.ops.complete_batch(&sends, &mut Vec::new());
        {
            let mut st = self.lock_state();
            for c in batch {
                match WrKind::try_from(c.wr_id) {
                    Ok(WrKind::Op(_)) => {}
                    Ok(WrKind::Control) => {
                        st.sq_free += 1;
                        continue;
                    }
                    Ok(WrKind::Recv(idx)) => {
                        self.on_recv(&mut st, idx, c);
                        continue;
                    }
                    Err(e) => {
                        self.fail(&mut st, e.into());
                        continue;
                    }
                }
                st.sq_free += 1;
                st.data_in_flight -= 1;
                if !c.is_success() {
                    st.lost = true;
                    let e = Error::new(
                        ErrorKind::WorkCompletion { status: c.status },
                        format!("send failed with work completion status {}", c.status),
                    );
                    self.fail(&mut st, e);
                }
            }
            self.post_receives(&mut st);
            self.pump(&mut st);
        }
        self.changed.notify(usize::MAX);
    }

    /// Wait until `check` gives a value (check → listen → re-check). In latency mode
    /// the task first polls the CQ itself for up to `busy_poll`.
    async fn wait<T>(&self, mut check: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            if let Some(v) = check(&mut self.lock_state()) {
                return v;
            }
            if let Some(window) = self.cfg.busy_poll {
                let until = Instant::now() + window;
                self.inline.fetch_add(1, Ordering::AcqRel);
                let found = loop {
                    self.poll_inline();
                    if let Some(v) = check(&mut self.lock_state()) {
                        break Some(v);
                    }
                    if Instant::now() >= until {
                        break None;
                    }
                    std::hint::spin_loop();
                };
                if self.inline.fetch_sub(1, Ordering::AcqRel) == 1 && found.is_none() {
                    // The last busy poller goes to sleep: arm the CQ so the poller thread
                    // is woken by the next completion (it did not arm meanwhile).
                    let _ = lock(&self.core).source.arm();
                    self.poll_inline();
                }
                if let Some(v) = found {
                    return v;
                }
                if let Some(v) = check(&mut self.lock_state()) {
                    return v;
                }
            }
            let listener = self.changed.listen();
            if let Some(v) = check(&mut self.lock_state()) {
                return v;
            }
            listener.await;
        }
    }
}

impl RdmaTransport {
    fn setup(
        ctx: &RdmaContext,
        qp: &mut BasicQueuePair,
        cfg: &RdmaConfig,
    ) -> Result<(Slab, Slab, RecvPool)> {
        let slab = ctx.slab(cfg.chunk, cfg.chunk, (cfg.chunk * 256).max(1 << 20));
        // Regions are registered lazily, on the first `alloc_buf` of a class.
        let app_slab = ctx.slab(cfg.chunk, APP_MAX, APP_REGION);
        let recv = RecvPool::post_all(qp, &slab, cfg.depth, cfg.chunk)?;
        // Register the send bounce slots now too (one per send-queue entry, the most
        // ever live): from here on no message registers anything.
        let bounce = (0..QUEUE_DEPTH)
            .map(|_| slab.alloc(cfg.chunk))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::new(ErrorKind::Registration, e.to_string()))?;
        drop(bounce);
        Ok((slab, app_slab, recv))
    }

    /// The connection's CQ, on its device's shared reactor (started if need be).
    fn make_cq(
        ctx: &RdmaContext,
        cfg: &RdmaConfig,
        reactor: &mut Option<Arc<DeviceReactor>>,
    ) -> Result<CqSource> {
        let r = DeviceReactor::for_device(ctx, cfg.poller)?;
        let cq = r.new_cq(ctx, CQ_ENTRIES)?;
        *reactor = Some(r);
        Ok(cq)
    }

    fn start(
        conn: super::cm::CmConnection,
        reactor: Arc<DeviceReactor>,
        (slab, app_slab, recv): (Slab, Slab, RecvPool),
        cfg: RdmaConfig,
        peer: Option<SocketAddr>,
    ) -> Result<RdmaTransport> {
        let (qp, source, context, cm) = conn.into_parts();
        // Parameters travel in-band (sideway has no RDMA-CM private data): the hello
        // is the first message each side sends.
        let hello = Bytes::copy_from_slice(
            &Hello {
                depth: cfg.depth,
                chunk: cfg.chunk as u32,
                max_message_size: cfg.max_message_size as u64,
            }
            .encode(),
        );
        let mut source =
            source.ok_or_else(|| Error::new(ErrorKind::Registration, "no completion queue"))?;
        let cm_channel = source.take_cm();
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            returns: Mutex::new(Vec::new()),
            qp: Mutex::new(qp),
            core: Mutex::new(Core {
                source,
                buf: Vec::with_capacity(64),
            }),
            inline: AtomicUsize::new(0),
            reactor,
            state: Mutex::new(State {
                credits: Credits::before_hello(cfg.depth),
                sendq: VecDeque::from([Outgoing {
                    data: hello.clone(),
                    off: 0,
                    kind: Kind::Hello,
                }]),
                queued: hello.len(),
                sq_free: QUEUE_DEPTH,
                data_in_flight: 0,
                lost: false,
                zero_copy_sends: 0,

                recvq: VecDeque::new(),
                partial: Vec::new(),
                recv,
                peer: None,
                frag: cfg.chunk,
                peer_fin: false,
                shut: false,
                closed: false,
                gone: None,
                error: None,
            }),
            ops: OpSlab::new(),
            slab,
            app_slab,
            changed: Event::new(),
            cfg: cfg.clone(),
            cm,
            _context: context,
        });
        shared.pump(&mut shared.lock_state());
        let weak = Arc::downgrade(&shared);
        shared.cm.on_gone(move |why| {
            if let Some(s) = weak.upgrade() {
                s.on_gone(why);
            }
        });
        let member = Arc::downgrade(&shared) as Weak<dyn Member>;
        let member = shared.reactor.add(member, cm_channel);
        Ok(RdmaTransport {
            shared,
            member,
            peer,
        })
    }

    /// Connect to `addr` (blocking the calling thread for at most `timeout`).
    ///
    /// # Errors
    /// As [`cm::connect_qp`](super::cm::connect_qp).
    pub fn connect_blocking(addr: SocketAddr, timeout: Duration, cfg: RdmaConfig) -> Result<Self> {
        Self::open(cfg, Some(addr), |make_cq, before| {
            super::cm::connect_qp_with(addr, timeout, make_cq, before)
        })
    }

    /// Accept one connection on `listener` (blocking for at most `timeout`).
    ///
    /// # Errors
    /// As [`CmListener::accept`].
    pub fn accept_blocking(
        listener: &CmListener,
        timeout: Duration,
        cfg: RdmaConfig,
    ) -> Result<Self> {
        Self::open(cfg, None, |make_cq, before| {
            listener.accept_with(timeout, make_cq, before)
        })
    }

    /// Set a connection up through `dial` (RDMA-CM connect or accept), which makes the
    /// CQ with the first hook and, once the QP exists, runs the second (registered
    /// memory, posted receives) before the peer can send.
    fn open(
        cfg: RdmaConfig,
        peer: Option<SocketAddr>,
        dial: impl FnOnce(
            &mut dyn FnMut(&RdmaContext) -> Result<CqSource>,
            &mut dyn FnMut(&RdmaContext, &mut BasicQueuePair) -> Result<()>,
        ) -> Result<super::cm::CmConnection>,
    ) -> Result<Self> {
        let cfg = cfg.normalized();
        let (mut setup, mut reactor) = (None, None);
        let conn = dial(
            &mut |ctx| Self::make_cq(ctx, &cfg, &mut reactor),
            &mut |ctx, qp| {
                setup = Some(Self::setup(ctx, qp, &cfg)?);
                Ok(())
            },
        )?;
        let missing = || {
            Error::new(
                ErrorKind::Io(std::io::ErrorKind::Other),
                "RDMA-CM set up a connection without its completion queue or memory",
            )
        };
        let reactor = reactor.ok_or_else(missing)?;
        let setup = setup.ok_or_else(missing)?;
        Self::start(conn, reactor, setup, cfg, peer)
    }

    /// Memory registrations this connection made: the receive buffers and one bounce
    /// slot per send-queue entry, all registered when it was set up
    /// ([`registration_bound`](RdmaTransport::registration_bound)) and reused for every
    /// message, plus the regions of [`alloc_buf`](Transport::alloc_buf) buffers (made on
    /// first use of a size class, then reused).
    pub fn registrations(&self) -> u64 {
        self.shared.slab.regions() + self.shared.app_slab.regions()
    }

    /// Message fragments sent straight from registered memory (buffers from
    /// [`alloc_buf`](Transport::alloc_buf), received messages sent on), without a copy.
    pub fn zero_copy_sends(&self) -> u64 {
        self.shared.lock_state().zero_copy_sends
    }

    /// Messages received without a copy: handed out in the receive buffer they arrived
    /// in (messages of up to one `chunk`, while at most half the buffers are lent).
    pub fn zero_copy_recvs(&self) -> u64 {
        self.shared.lock_state().recv.lent_total
    }

    /// The most registrations this connection can ever make.
    pub fn registration_bound(&self) -> u64 {
        let cfg = &self.shared.cfg;
        let region = (cfg.chunk * 256).max(1 << 20);
        let per_region = (region / cfg.chunk) as u64;
        let recv = (cfg.depth as u64).div_ceil(per_region);
        let send = (QUEUE_DEPTH as u64).div_ceil(per_region);
        recv + send
    }

    /// Receiver-not-ready events counted by this connection's device, all connections
    /// together ([`RdmaContext::rnr_events`]); credits keep it from growing.
    pub fn device_rnr_events(&self) -> Option<u64> {
        self.shared._context.rnr_events()
    }

    /// Credits this side may still send with (for tests and monitoring).
    pub fn send_credits(&self) -> u32 {
        self.shared.lock_state().credits.available()
    }
}

impl Transport for RdmaTransport {
    fn send(&self, msg: Bytes) -> impl Future<Output = Result<()>> + Send + '_ {
        let s = &*self.shared;
        async move {
            if msg.len() > s.cfg.max_message_size {
                return Err(too_large(msg.len() as u64, s.cfg.max_message_size, false));
            }
            let mut msg = Some(msg);
            s.wait(|st| {
                if let Some(e) = &st.error {
                    return Some(Err(e.clone()));
                }
                if st.shut || st.closed {
                    return Some(Err(Error::closed("send")));
                }
                // Data waits for the peer's hello (its limits and credits).
                let peer_max = st.peer?.max_message_size;
                let len = msg.as_ref().map_or(0, Bytes::len);
                if len as u64 > peer_max {
                    let e = too_large(len as u64, peer_max as usize, false);
                    let e = Error::new(e.kind(), format!("{e} of the peer"));
                    return Some(Err(e));
                }
                if st.queued > 0 && st.queued + len > s.cfg.send_buffer {
                    return None;
                }
                st.queued += len;
                st.sendq.push_back(Outgoing {
                    data: msg.take().expect("queued once"),
                    off: 0,
                    kind: Kind::Data,
                });
                // With enough sends in flight their completions will run the pump:
                // leave it to them, so a stream of small messages goes out in batches
                // (one doorbell for many) instead of one post per message.
                if st.data_in_flight < CORK_IN_FLIGHT {
                    s.pump(st);
                }
                Some(Ok(()))
            })
            .await
        }
    }

    fn recv(&self) -> impl Future<Output = Result<Bytes>> + Send + '_ {
        let s = &*self.shared;
        s.wait(|st| {
            if let Some(m) = st.recvq.pop_front() {
                return Some(Ok(m));
            }
            if st.closed {
                return Some(Err(Error::closed("recv")));
            }
            // An orderly end (the peer's FIN) wins over the disconnect that follows it.
            if st.peer_fin {
                return Some(Err(Error::new(
                    ErrorKind::Closed,
                    "recv: the peer closed the connection",
                )));
            }
            st.error.as_ref().map(|e| Err(e.clone()))
        })
    }

    /// Waits until every queued message has been sent and acknowledged by the peer's
    /// device (its send completions arrived), or fails if one of them cannot be.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        self.shared.wait(|st| {
            let done = st.sendq.is_empty() && st.data_in_flight == 0;
            match &st.error {
                Some(e) if st.lost || !done => Some(Err(e.clone())),
                _ => done.then_some(Ok(())),
            }
        })
    }

    async fn shutdown(&self) -> Result<()> {
        {
            let mut st = self.shared.lock_state();
            if !st.shut {
                st.shut = true;
                st.sendq.push_back(Outgoing {
                    data: Bytes::new(),
                    off: 0,
                    kind: Kind::Fin,
                });
                self.shared.pump(&mut st);
            }
        }
        self.flush().await
    }

    async fn close(&self) -> Result<()> {
        let res = self.shutdown().await;
        let mut st = self.shared.lock_state();
        // The peer ended the stream and then the connection before our end-of-stream
        // got through: there is nobody left to deliver it to, and closing succeeds (as
        // a TCP close after the peer's FIN does).
        let peer_gone_first = st.peer_fin && st.gone.is_some();
        st.closed = true;
        drop(st);
        self.shared.changed.notify(usize::MAX);
        let _ = self.shared.cm.disconnect();
        if peer_gone_first {
            return Ok(());
        }
        res
    }

    fn alloc_buf(&self, len: usize) -> Buf {
        match self.shared.app_slab.alloc_buf(len) {
            Ok(Some(b)) => b,
            _ => crate::transport::BufferPool::alloc(&crate::buffer::HeapPool::default(), len),
        }
    }

    fn max_message_size(&self) -> usize {
        self.shared.cfg.max_message_size
    }

    fn is_closed(&self) -> bool {
        let st = self.shared.lock_state();
        st.closed || st.shut || st.error.is_some() || st.peer_fin
    }

    fn has_unread(&self) -> bool {
        let st = self.shared.lock_state();
        !st.recvq.is_empty() || !st.partial.is_empty()
    }

    fn local_addr(&self) -> Result<SocketAddr> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "local address of an RDMA connection: not exposed by sideway 0.4.3",
        ))
    }

    fn peer_addr(&self) -> Result<SocketAddr> {
        self.peer.ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "peer address of an accepted RDMA connection: not exposed by sideway 0.4.3",
            )
        })
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock_state();
            st.closed = true;
        }
        self.shared.changed.notify(usize::MAX);
        let _ = self.shared.cm.disconnect();
        // The device thread lets go of the connection; the QP, then the memory its
        // requests named, go away with the last reference to `shared`.
        self.shared.reactor.remove(self.member);
    }
}

impl fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock_state();
        f.debug_struct("RdmaTransport")
            .field("peer", &self.peer)
            .field("registrations", &self.registrations())
            .field("send_credits", &st.credits.available())
            .field("credits_to_return", &st.credits.pending_return())
            .field("queued_messages", &st.sendq.len())
            .field("sends_in_flight", &st.data_in_flight)
            .field("send_queue_free", &st.sq_free)
            .field("received_unread", &st.recvq.len())
            .field("receive_buffers", &st.recv)
            .field("peer_fin", &st.peer_fin)
            .field("closed", &(st.closed || st.shut))
            .field("error", &st.error)
            .finish_non_exhaustive()
    }
}
