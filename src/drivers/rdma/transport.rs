//! [`RdmaTransport`]: messages over one RC queue pair, with receive credits.
//!
//! * Receives: `depth` registered buffers of `chunk` bytes stay posted. A receive
//!   completion's bytes are copied out (into the message being reassembled) and the
//!   buffer is re-posted at once, so the receive queue never runs dry however long the
//!   application holds its messages. (Zero-copy receives that lend the buffer to the
//!   application are the next step.)
//! * Sends: `send` queues the whole message (so a dropped `send` future never leaves
//!   half a message on the wire) and the pump posts it as `chunk`-sized SEND_WITH_IMM
//!   fragments while credits last. The immediate data carries the credits being
//!   returned (16 bits) and flags: last fragment, credit-only update, end of stream.
//!   Each fragment goes out of a registered bounce slot owned by its op-slab entry
//!   until its completion; the pump runs again from the poller thread when credits or
//!   send-queue slots come back.
//! * Credits ([`Credits`]) make sure a SEND never finds the peer without a posted
//!   receive: `rnr_retry` is set, but receiver-not-ready does not happen.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use event_listener::Event;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
};

use super::cm::{CmHandle, CmListener, QUEUE_DEPTH};
use super::context::RdmaContext;
use crate::buffer::Buf;
use crate::codec::too_large;
use crate::error::{Error, ErrorKind, Result};
use crate::mem::{Slab, SlabBuf};
use crate::reactor::credit::Credits;
use crate::reactor::{Completion, OpSlab, Poller, PollerConfig, PollerHandle, WrId};
use crate::transport::Transport;

const RECV_TAG: u64 = WrId::DRIVER_TAG;
const LAST: u32 = 1 << 16;
const CONTROL: u32 = 1 << 17;
const FIN: u32 = 1 << 18;

/// Settings of an RDMA connection. Both peers must use the same `chunk` and `depth`.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// Largest message sent or accepted (default 8 MiB, like TCP).
    pub max_message_size: usize,
    /// Receive buffer (fragment) size in bytes (default 4096).
    pub chunk: usize,
    /// Receive buffers kept posted, the peer's initial credits (default 512).
    pub depth: u32,
    /// Bytes `send` may queue before it waits (default 4 MiB).
    pub send_buffer: usize,
    /// The completion poller's spin and yield windows.
    pub poller: PollerConfig,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            max_message_size: 8 << 20,
            chunk: 4096,
            depth: QUEUE_DEPTH,
            send_buffer: 4 << 20,
            poller: PollerConfig::default(),
        }
    }
}

struct Outgoing {
    data: Bytes,
    off: usize,
    fin: bool,
}

struct State {
    credits: Credits,
    sq_free: u32,
    sendq: VecDeque<Outgoing>,
    queued: usize,
    recvq: VecDeque<Bytes>,
    partial: Vec<u8>,
    recv_bufs: Vec<Option<SlabBuf>>,
    peer_fin: bool,
    shut: bool,
    closed: bool,
    error: Option<Error>,
}

struct Shared {
    // Declared first: the QP is destroyed before the memory its requests name.
    qp: Mutex<BasicQueuePair>,
    state: Mutex<State>,
    ops: Arc<OpSlab>,
    slab: Slab,
    changed: Event,
    cfg: RdmaConfig,
    cm: CmHandle,
    _context: RdmaContext,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A message connection over an RDMA reliable-connected queue pair.
pub struct RdmaTransport {
    shared: Arc<Shared>,
    poller: Option<PollerHandle>,
    peer: Option<SocketAddr>,
}

/// Post the receive for slot `idx`.
fn post_recv(qp: &mut BasicQueuePair, idx: usize, buf: &SlabBuf, len: usize) -> Result<()> {
    let mut g = qp.start_post_recv();
    // SAFETY: `buf` is `len` bytes of memory registered with this QP's PD, and it is
    // kept in `State::recv_bufs[idx]` (or the setup vector) until this receive's
    // completion has been polled; the QP is destroyed before the slab's memory.
    unsafe {
        g.construct_wr(RECV_TAG | idx as u64).setup_sge(
            buf.key(),
            buf.as_ref().as_ptr() as u64,
            len as u32,
        )
    };
    g.post()
        .map_err(|e| Error::new(ErrorKind::Registration, format!("ibv_post_recv: {e}")))
}

impl Shared {
    fn fail(&self, st: &mut State, e: Error) {
        if st.error.is_none() && !st.closed {
            st.error = Some(e);
        }
    }

    /// Post one SEND_WITH_IMM of `data` from a registered bounce slot.
    fn post_send(&self, data: &[u8], imm: u32) -> Result<()> {
        let mut buf = self
            .slab
            .alloc(data.len().max(1))
            .map_err(|e| Error::new(ErrorKind::Registration, e.to_string()))?
            .ok_or_else(|| Error::new(ErrorKind::Registration, "fragment larger than a slot"))?;
        buf.as_mut()[..data.len()].copy_from_slice(data);
        let (key, addr) = (buf.key(), buf.as_ref().as_ptr() as u64);
        let op = self.ops.register(Box::new(buf));
        let mut qp = lock(&self.qp);
        let mut g = qp.start_post_send();
        let wr = g.construct_wr(op.wr_id().to_u64(), WorkRequestFlags::Signaled);
        // SAFETY: the bounce slot is registered with this QP's PD and owned by the
        // op-slab entry until the send's completion has been delivered (the future is
        // dropped below: the entry is orphaned, not freed).
        unsafe {
            wr.setup_send_imm(imm)
                .setup_sge(key, addr, data.len() as u32)
        };
        match g.post() {
            Ok(()) => {
                drop(qp);
                drop(op);
                Ok(())
            }
            Err(e) => {
                drop(qp);
                self.ops.cancel_unposted(op);
                Err(Error::new(
                    ErrorKind::ConnectionReset,
                    format!("ibv_post_send: {e}"),
                ))
            }
        }
    }

    /// Post queued fragments while credits and send-queue slots last, then a credit
    /// update if one is due.
    fn pump(&self, st: &mut State) {
        while st.error.is_none() && st.sq_free > 0 {
            let Some(front) = st.sendq.front() else { break };
            let left = front.data.len() - front.off;
            let n = left.min(self.cfg.chunk);
            let fin = front.fin;
            let Some(piggy) = st.credits.take_for_data() else {
                break;
            };
            let flags = if fin {
                FIN
            } else if n == left {
                LAST
            } else {
                0
            };
            let front = st.sendq.front().expect("checked above");
            let frag = front.data.slice(front.off..front.off + n);
            if let Err(e) = self.post_send(&frag, flags | piggy) {
                self.fail(st, e);
                break;
            }
            st.sq_free -= 1;
            st.queued -= n;
            let front = st.sendq.front_mut().expect("checked above");
            front.off += n;
            if front.off == front.data.len() {
                st.sendq.pop_front();
            }
        }
        if st.error.is_none() && st.sq_free > 0 {
            if let Some(piggy) = st.credits.take_for_update() {
                match self.post_send(&[], CONTROL | piggy) {
                    Ok(()) => st.sq_free -= 1,
                    Err(e) => self.fail(st, e),
                }
            }
        }
    }

    fn on_recv(&self, st: &mut State, c: &Completion) {
        let idx = (c.wr_id & 0xFFFF_FFFF) as usize;
        let Some(buf) = st.recv_bufs.get_mut(idx).and_then(Option::take) else {
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
        let imm = c.imm.unwrap_or(0);
        st.credits.on_receive(imm & 0xFFFF);
        if imm & (CONTROL | FIN) == 0 {
            let len = c.byte_len as usize;
            if st.partial.len() + len > self.cfg.max_message_size {
                let size = (st.partial.len() + len) as u64;
                self.fail(st, too_large(size, self.cfg.max_message_size, true));
                return;
            }
            st.partial.extend_from_slice(&buf.as_ref()[..len]);
            if imm & LAST != 0 {
                let msg = std::mem::take(&mut st.partial);
                st.recvq.push_back(Bytes::from(msg));
            }
        }
        if imm & FIN != 0 {
            st.peer_fin = true;
        }
        let res = post_recv(&mut lock(&self.qp), idx, &buf, self.cfg.chunk);
        st.recv_bufs[idx] = Some(buf);
        match res {
            Ok(()) => st.credits.reposted(1),
            Err(e) => self.fail(st, e),
        }
    }

    fn on_completions(&self, batch: &[Completion]) {
        // Release the finished sends' bounce slots first, so the pump below reuses them:
        // live send slots never exceed the send queue's depth, which bounds the memory
        // ever registered.
        let sends: Vec<Completion> = batch
            .iter()
            .filter(|c| c.wr_id & RECV_TAG == 0)
            .copied()
            .collect();
        self.ops.complete_batch(&sends, &mut Vec::new());
        {
            let mut st = lock(&self.state);
            for c in batch {
                if c.wr_id & RECV_TAG != 0 {
                    self.on_recv(&mut st, c);
                    continue;
                }
                st.sq_free += 1;
                if !c.is_success() {
                    let e = Error::new(
                        ErrorKind::WorkCompletion { status: c.status },
                        format!("send failed with work completion status {}", c.status),
                    );
                    self.fail(&mut st, e);
                }
            }
            self.pump(&mut st);
        }
        self.changed.notify(usize::MAX);
    }

    /// Wait until `check` gives a value (check → listen → re-check).
    async fn wait<T>(&self, mut check: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            if let Some(v) = check(&mut lock(&self.state)) {
                return v;
            }
            let listener = self.changed.listen();
            if let Some(v) = check(&mut lock(&self.state)) {
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
    ) -> Result<(Slab, Vec<Option<SlabBuf>>)> {
        let slab = ctx.slab(cfg.chunk, cfg.chunk, (cfg.chunk * 256).max(1 << 20));
        let mut bufs = Vec::with_capacity(cfg.depth as usize);
        for idx in 0..cfg.depth as usize {
            let buf = slab
                .alloc(cfg.chunk)
                .map_err(|e| Error::new(ErrorKind::Registration, e.to_string()))?
                .ok_or_else(|| Error::new(ErrorKind::Registration, "no receive slot"))?;
            post_recv(qp, idx, &buf, cfg.chunk)?;
            bufs.push(Some(buf));
        }
        Ok((slab, bufs))
    }

    fn start(
        conn: super::cm::CmConnection,
        slab: Slab,
        recv_bufs: Vec<Option<SlabBuf>>,
        cfg: RdmaConfig,
        peer: Option<SocketAddr>,
    ) -> Result<RdmaTransport> {
        let (qp, source, context, cm) = conn.into_parts();
        let source =
            source.ok_or_else(|| Error::new(ErrorKind::Registration, "no completion queue"))?;
        let shared = Arc::new(Shared {
            qp: Mutex::new(qp),
            state: Mutex::new(State {
                credits: Credits::new(cfg.depth, cfg.depth),
                sq_free: QUEUE_DEPTH,
                sendq: VecDeque::new(),
                queued: 0,
                recvq: VecDeque::new(),
                partial: Vec::new(),
                recv_bufs,
                peer_fin: false,
                shut: false,
                closed: false,
                error: None,
            }),
            ops: OpSlab::new(),
            slab,
            changed: Event::new(),
            cfg: cfg.clone(),
            cm,
            _context: context,
        });
        let s2 = shared.clone();
        let poller = Poller::new(
            source,
            move |b: &[Completion]| s2.on_completions(b),
            cfg.poller,
        )
        .spawn("net-rs-rdma-cq")
        .map_err(Error::from)?;
        Ok(RdmaTransport {
            shared,
            poller: Some(poller),
            peer,
        })
    }

    /// Connect to `addr` (blocking the calling thread for at most `timeout`).
    ///
    /// # Errors
    /// As [`cm::connect_qp`](super::cm::connect_qp).
    pub fn connect_blocking(addr: SocketAddr, timeout: Duration, cfg: RdmaConfig) -> Result<Self> {
        let mut setup = None;
        let conn = super::cm::connect_qp(addr, timeout, |ctx, qp| {
            setup = Some(Self::setup(ctx, qp, &cfg)?);
            Ok(())
        })?;
        let (slab, bufs) = setup.expect("set up before connecting");
        Self::start(conn, slab, bufs, cfg, Some(addr))
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
        let mut setup = None;
        let conn = listener.accept(timeout, |ctx, qp| {
            setup = Some(Self::setup(ctx, qp, &cfg)?);
            Ok(())
        })?;
        let (slab, bufs) = setup.expect("set up before accepting");
        Self::start(conn, slab, bufs, cfg, None)
    }

    /// Memory registrations this connection made. Bounded whatever the traffic: the
    /// receive buffers plus at most one bounce slot per send-queue entry
    /// ([`registration_bound`](RdmaTransport::registration_bound)), plus the slots of
    /// `alloc_buf` buffers the application holds.
    pub fn registrations(&self) -> u64 {
        self.shared.slab.regions()
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

    /// Credits this side may still send with (for tests and monitoring).
    pub fn send_credits(&self) -> u32 {
        lock(&self.shared.state).credits.available()
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
                let len = msg.as_ref().map_or(0, Bytes::len);
                if st.queued > 0 && st.queued + len > s.cfg.send_buffer {
                    return None;
                }
                st.queued += len;
                st.sendq.push_back(Outgoing {
                    data: msg.take().expect("queued once"),
                    off: 0,
                    fin: false,
                });
                s.pump(st);
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
            if let Some(e) = &st.error {
                return Some(Err(e.clone()));
            }
            if st.closed {
                return Some(Err(Error::closed("recv")));
            }
            st.peer_fin.then(|| {
                Err(Error::new(
                    ErrorKind::Closed,
                    "recv: the peer closed the connection",
                ))
            })
        })
    }

    fn flush(&self) -> impl Future<Output = Result<()>> + Send + '_ {
        self.shared.wait(|st| match &st.error {
            Some(e) => Some(Err(e.clone())),
            None => st.sendq.is_empty().then_some(Ok(())),
        })
    }

    async fn shutdown(&self) -> Result<()> {
        {
            let mut st = lock(&self.shared.state);
            if !st.shut {
                st.shut = true;
                st.sendq.push_back(Outgoing {
                    data: Bytes::new(),
                    off: 0,
                    fin: true,
                });
                self.shared.pump(&mut st);
            }
        }
        self.flush().await
    }

    async fn close(&self) -> Result<()> {
        let res = self.shutdown().await;
        let mut st = lock(&self.shared.state);
        st.closed = true;
        drop(st);
        self.shared.changed.notify(usize::MAX);
        let _ = self.shared.cm.disconnect();
        res
    }

    fn alloc_buf(&self, len: usize) -> Buf {
        match self.shared.slab.alloc_buf(len) {
            Ok(Some(b)) => b,
            _ => crate::transport::BufferPool::alloc(&crate::buffer::HeapPool::default(), len),
        }
    }

    fn max_message_size(&self) -> usize {
        self.shared.cfg.max_message_size
    }

    fn is_closed(&self) -> bool {
        let st = lock(&self.shared.state);
        st.closed || st.shut || st.error.is_some() || st.peer_fin
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
            let mut st = lock(&self.shared.state);
            st.closed = true;
        }
        self.shared.changed.notify(usize::MAX);
        let _ = self.shared.cm.disconnect();
        // Stop the poller before the QP and memory go away with `shared`.
        if let Some(p) = self.poller.take() {
            p.shutdown();
        }
    }
}

impl fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("peer", &self.peer)
            .field("registrations", &self.registrations())
            .finish_non_exhaustive()
    }
}
