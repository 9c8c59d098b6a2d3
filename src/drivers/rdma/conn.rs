//! The protocol of one RDMA connection, as a pure state machine: no verbs, no locks, no
//! clock, no threads ([`Connection`]).
//!
//! The shell ([`transport`](super::transport)) holds a `Connection` under one lock, feeds
//! it inputs (a message to send, a work completion, a receive buffer given back, the
//! peer's disconnect) and, after releasing the lock, posts the work requests the core
//! asked for and wakes the tasks it said are ready. The deterministic simulation
//! (`sim.rs`) drives two of them through a simulated wire; the unit tests below drive
//! one with fake completions. Nothing here knows which thread calls it.
//!
//! # The protocol
//! * **Hello.** The first message each side sends is a [`Hello`] (its receive depth,
//!   buffer size and maximum message size); data waits for the peer's. Fragments are
//!   the smaller of both buffer sizes, credits start at the peer's depth, and a message
//!   larger than the peer accepts is refused by `queue_send`.
//! * **Credits** ([`Credits`]): a SEND goes out only against a receive the peer has
//!   posted; every SEND's immediate data ([`Imm`]) returns the receives this side
//!   re-posted since it last said so, and an explicit credit update goes out when only
//!   one side sends. The last credit is kept for updates.
//! * **Receives.** `depth` buffers of `chunk` bytes, each named by its index. A message
//!   that fits one buffer waits for `recv` in that buffer, which then lends it to the
//!   application (no copy) while at most half the buffers are out with it; past that
//!   its bytes are copied and the buffer is posted again. Larger messages are
//!   reassembled from fragments (one copy).
//! * **Backpressure.** The bytes of whole messages received and not yet taken by `recv`
//!   are *unread*. While they exceed the receive budget, buffers are not posted again,
//!   so no credits go back and the peer's `send` waits once its credits and its queue
//!   run out: unread data stays below `budget + depth * chunk` (plus the one message
//!   being reassembled, at most the maximum size) however long the application stalls.
//!   (A message still being reassembled does not hold credits back: it cannot be read
//!   before its last fragment arrives, so that would deadlock; the simulation found
//!   this.)
//! * **Keepalive** ([`Connection::on_keepalive_tick`]): one side probes twice per
//!   interval, the other answers, both fail the connection with `TimedOut` after about
//!   `interval × misses` without a word. A probe or an answer may take the last
//!   credit, and the prober never spends its last credit on anything but a probe (so
//!   the answer always gives it back); the buffers of control messages are posted
//!   again even over the receive budget, so a stalled reader still answers.
//! * **End.** `shutdown` queues an end-of-stream marker after the last message; the
//!   peer's `recv` then returns `Closed`. A disconnect (RDMA-CM) makes the shell move
//!   the QP to the error state; what had arrived is still delivered, then the flushed
//!   work requests fail every pending operation.
//!
//! # Memory
//! Every posted work request has one owner here until its completion (success or
//! flush error): a receive buffer sits in the receive table, and a send's fragment (the
//! `Bytes` of registered memory, or the bounce slot it was copied into) sits in the
//! in-flight table. Nothing a posted request names is freed before its completion.

use std::collections::VecDeque;
use std::fmt;

use bytes::Bytes;
use slab::Slab;

use super::wire::{Hello, Imm, ImmFlags, WrKind};
use crate::codec::too_large;
use crate::error::{Error, ErrorKind, Result};
use crate::reactor::credit::Credits;
use crate::reactor::{Completion, WrId};

/// `IBV_WC_RETRY_EXC_ERR`: the transport's retransmissions ran out.
const RETRY_EXC_ERR: u32 = 12;

/// The error of a SEND that completed with `status`.
fn send_failure(status: u32) -> Error {
    if status == RETRY_EXC_ERR {
        Error::connection_lost(
            ErrorKind::TimedOut,
            "the peer acknowledged nothing through every retransmission of a send \
             (RdmaConfig::ack_timeout × (retry_count + 1)): its link or host is down",
        )
    } else {
        Error::new(
            ErrorKind::WorkCompletion { status },
            format!(
                "the connection failed: a send completed with {} (work completion status \
                 {status})",
                wc_status_name(status)
            ),
        )
    }
}

/// What a work completion's status means (`ibv_wc_status`), for error messages.
fn wc_status_name(status: u32) -> &'static str {
    match status {
        1 => "a local length error",
        2 => "a local queue pair error (the local link may be down, or the QP failed)",
        4 => "a local protection error",
        5 => "a flush (the queue pair was in the error state)",
        9 => "the peer refusing the request as invalid",
        10 => "a remote access error",
        11 => "a remote operation error (the peer's queue pair failed)",
        12 => "no acknowledgement after every retransmission",
        13 => "the peer not ready to receive after every retry",
        _ => "an error",
    }
}

/// The smallest path MTU of RDMA (InfiniBand and RoCE), in bytes.
const MIN_MTU: u32 = 256;

/// Registered memory named by a work request: address, length, local key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sge {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) lkey: u32,
}

/// A receive buffer as the core sees it: its bytes and where it lies.
pub(crate) trait RecvBuf {
    /// The whole buffer (`chunk` bytes).
    fn bytes(&self) -> impl std::ops::Deref<Target = [u8]> + '_;
    /// The buffer as a receive names it.
    fn sge(&self) -> Sge;
}

/// A fragment in registered memory, ready to be named by a SEND.
pub(crate) struct Staged<K> {
    /// Keeps the memory alive until the completion (the in-flight table holds it).
    pub(crate) keep: K,
    pub(crate) sge: Sge,
    /// Sent from where it was, without a copy.
    pub(crate) zero_copy: bool,
}

/// Puts fragments into registered memory: in place if the bytes already are (a buffer
/// from `alloc_buf`, a received message), else copied into a bounce slot.
pub(crate) trait Stager {
    /// What must stay alive until the SEND's completion.
    type Keep;
    /// Stage one fragment.
    fn stage(&mut self, frag: Bytes) -> Result<Staged<Self::Keep>>;
}

/// A SEND_WITH_IMM to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendWr {
    pub(crate) wr_id: u64,
    pub(crate) imm: u32,
    /// `None` for a message without payload (credit update, end of stream).
    pub(crate) sge: Option<Sge>,
}

/// A receive to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecvWr {
    pub(crate) wr_id: u64,
    pub(crate) sge: Sge,
}

/// A received message waiting for `recv`.
pub(crate) enum Incoming<B> {
    /// In the receive buffer it arrived in, lent to the application: the shell wraps it
    /// in `Bytes` whose drop gives the buffer back ([`Connection::buffer_returned`]).
    Lent { idx: u32, buf: B, len: usize },
    /// Copied out (reassembled, or too many buffers were lent).
    Owned(Bytes),
}

impl<B> Incoming<B> {
    fn len(&self) -> usize {
        match self {
            Incoming::Lent { len, .. } => *len,
            Incoming::Owned(b) => b.len(),
        }
    }
}

/// The numbers a connection lives by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Receive buffers kept posted (3 ..= the receive queue's size).
    pub(crate) depth: u32,
    /// Bytes per receive buffer (at least [`Hello::MIN_CHUNK`]).
    pub(crate) chunk: usize,
    /// Largest message sent or accepted, in bytes.
    pub(crate) max_message_size: usize,
    /// Bytes `queue_send` accepts ahead of what is posted before it says "wait".
    pub(crate) send_buffer: usize,
    /// Unread received bytes past which receives are not posted again.
    pub(crate) recv_budget: usize,
    /// The send queue's size (work requests in flight at most).
    pub(crate) sq_depth: u32,
    /// Sends in flight from which `queue_send` leaves posting to their completions,
    /// so a stream of small messages goes out in batches (one doorbell for many).
    pub(crate) cork_in_flight: u32,
    /// The active MTU of the local port in bytes, told to the peer in the hello (0:
    /// unknown).
    pub(crate) port_mtu: u32,
    /// This side connected (RDMA-CM's active side): with keepalive on at both ends, it
    /// is the one that probes.
    pub(crate) initiator: bool,
    /// Keepalive interval in milliseconds (0: off): the shell calls
    /// [`Connection::on_keepalive_tick`] this often.
    pub(crate) keepalive_ms: u32,
    /// Intervals without a word from the peer after which the connection fails.
    pub(crate) keepalive_misses: u32,
}

/// Where the local direction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Local {
    /// Sending and receiving.
    Open,
    /// `shutdown`: the end-of-stream marker follows the last message; receiving goes on.
    Shut,
    /// `close`: neither direction; pending and later operations fail with `Closed`.
    Closed,
}

/// Whether the connection still works.
#[derive(Debug, Clone)]
pub(crate) enum Health {
    /// Up.
    Up,
    /// RDMA-CM says it ended (`why`): the QP goes to the error state, completions
    /// still arriving are handled, and the flushes then fail it.
    Disconnected(String),
    /// Failed. `lost`: a data fragment completed with an error, so `flush` cannot
    /// succeed any more.
    Failed { error: Error, lost: bool },
}

/// The connection's lifecycle: the local direction, the peer's, and its health. (Three
/// small enums in place of six flags that used to be combined differently by `recv`,
/// `close` and `is_closed`.)
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    pub(crate) local: Local,
    /// The peer's end-of-stream marker arrived.
    pub(crate) peer_ended: bool,
    pub(crate) health: Health,
    /// The failure the connection had already had when it was closed: `recv` goes on
    /// reporting it (after the close, later failures are only the close's flushes).
    pub(crate) failed_before_close: Option<Error>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A SEND in flight: what its memory belongs to, until its completion.
struct InFlight<K> {
    gen: u32,
    _keep: Option<K>,
}

/// What the shell does after a keepalive tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tick {
    /// Tick again after `after_ms` milliseconds.
    Again { after_ms: u32 },
    /// The peer was silent too long: the connection failed now (disconnect it).
    Failed,
    /// The connection is over: no more ticks.
    Stop,
}

/// The keepalive's state (see [`Connection::on_keepalive_tick`]).
#[derive(Debug, Default)]
struct Keepalive {
    /// A message from the peer arrived since the last tick.
    heard: bool,
    /// Ticks in a row with nothing heard.
    silent: u32,
    /// A probe goes out with the next transmit.
    probe_due: bool,
    /// A probe went out and nothing has come back since.
    probe_out: bool,
    /// The peer probed: an answer goes out as soon as a credit allows (any message
    /// answers).
    answer_due: bool,
}

/// Where each receive buffer is.
enum Slot<B> {
    /// Posted: the device may write it.
    Posted(B),
    /// Back from a completion (or the application), to be posted again.
    Pending(B),
    /// Lent: in a message waiting for `recv` or held by the application.
    Out,
}

/// The protocol state of one connection. `B` is a receive buffer, `K` what keeps a
/// staged fragment alive.
pub(crate) struct Connection<B, K> {
    lim: Limits,
    credits: Credits,
    /// Free send-queue entries.
    sq_free: u32,
    sendq: VecDeque<Outgoing>,
    /// Bytes in `sendq` not posted yet.
    queued: usize,
    inflight: Slab<InFlight<K>>,
    next_gen: u32,
    /// Data fragments, hello and end of stream posted and not completed.
    data_in_flight: u32,
    /// A completion or a given-back buffer may let more go out: run the pump.
    pump_due: bool,
    slots: Vec<Slot<B>>,
    /// How many `slots` are `Slot::Posted`.
    posted: u32,
    /// Indices of `Slot::Pending` buffers, in the order they came back.
    pending: Vec<u32>,
    /// Indices of `Slot::Pending` buffers that held a control message (a credit
    /// update, a probe): posted again even over the receive budget, so the credits
    /// the peer spent on them come back (they let it send no more data than before).
    pending_control: Vec<u32>,
    lent: u32,
    lend_max: u32,
    recvq: VecDeque<Incoming<B>>,
    partial: Vec<u8>,
    /// Bytes of the whole messages in `recvq` (what the receive budget limits: the
    /// bytes of a message still being reassembled cannot be read before it completes,
    /// so holding credits back for them could only deadlock).
    unread: usize,
    peer: Option<Hello>,
    /// The queue pair's path MTU in bytes (0: unknown), set by the shell once RDMA-CM
    /// has moved it to RTR.
    path_mtu: u32,
    /// Fragment size: the smaller of both sides' receive buffers, and no more than the
    /// peer's port MTU if the path MTU is larger (see [`Connection::set_path_mtu`]).
    frag: usize,
    life: Lifecycle,
    alive: Keepalive,
    /// Something a waiting task may be interested in changed.
    changed: bool,
    zero_copy_sends: u64,
    lent_total: u64,
}

/// What the first posts of a new connection are (its receives, before the peer can
/// send).
pub(crate) type Setup<B, K> = (Connection<B, K>, Vec<RecvWr>);

impl<B: RecvBuf, K> Connection<B, K> {
    /// A connection over `bufs` (its receive buffers, `lim.depth` of them), with its
    /// hello queued. Returns the receives to post before the peer can send.
    pub(crate) fn new(lim: Limits, bufs: Vec<B>) -> Setup<B, K> {
        debug_assert_eq!(bufs.len(), lim.depth as usize);
        let hello = Hello {
            depth: lim.depth,
            chunk: lim.chunk as u32,
            max_message_size: lim.max_message_size as u64,
            mtu: lim.port_mtu,
            keepalive_ms: Some(lim.keepalive_ms),
        }
        .encode();
        let hello = Bytes::copy_from_slice(&hello);
        let first: Vec<RecvWr> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| RecvWr {
                wr_id: WrKind::Recv(i as u32).to_u64(),
                sge: b.sge(),
            })
            .collect();
        let conn = Connection {
            lim,
            credits: Credits::before_hello(lim.depth),
            sq_free: lim.sq_depth,
            queued: hello.len(),
            sendq: VecDeque::from([Outgoing {
                data: hello,
                off: 0,
                kind: Kind::Hello,
            }]),
            inflight: Slab::new(),
            next_gen: 0,
            data_in_flight: 0,
            pump_due: true,
            posted: bufs.len() as u32,
            slots: bufs.into_iter().map(Slot::Posted).collect(),
            pending: Vec::new(),
            pending_control: Vec::new(),
            lent: 0,
            lend_max: lim.depth / 2,
            recvq: VecDeque::new(),
            partial: Vec::new(),
            unread: 0,
            peer: None,
            path_mtu: 0,
            frag: lim.chunk,
            life: Lifecycle {
                local: Local::Open,
                peer_ended: false,
                failed_before_close: None,
                health: Health::Up,
            },
            alive: Keepalive::default(),
            changed: false,
            zero_copy_sends: 0,
            lent_total: 0,
        };
        (conn, first)
    }

    // ---- inputs -------------------------------------------------------------------

    /// The queue pair's path MTU in bytes, known once it is ready to receive. If it is
    /// larger than the peer's port MTU (the accepting side's link allows less than the
    /// connecting side's, from which RDMA-CM takes the path MTU), fragments are cut to
    /// the peer's MTU, so each is one packet the peer's link carries.
    pub(crate) fn set_path_mtu(&mut self, bytes: u32) {
        self.path_mtu = bytes;
        self.frag = self.fragment_size();
    }

    /// A keepalive tick: the shell calls this every [`Tick::Again`]'s `after_ms`, first
    /// half the local keepalive interval after the connection is up, while keepalive
    /// is on. With keepalive on at both ends one side probes: the connecting one, or
    /// the accepting one if the other has keepalive off. Both tick twice per *prober's*
    /// interval. At each tick the prober sends a probe unless one is unanswered; the
    /// peer answers each (any message from the peer counts). Either side fails the
    /// connection with `TimedOut` once it heard nothing for `2 × misses - 1` ticks in a
    /// row, so a vanished peer, or a path that no longer carries anything, is noticed
    /// within `interval × misses` of it going silent, even on a connection with
    /// nothing in flight; a live peer would have to miss about `2 × misses` probes in
    /// a row to be taken for gone. A peer without keepalive support (a release before
    /// it) is neither probed nor judged.
    pub(crate) fn on_keepalive_tick(&mut self) -> Tick {
        let Some(after_ms) = self.keepalive_period() else {
            return Tick::Stop;
        };
        let Some(limit) = self.silence_limit() else {
            // The peer's hello has not come yet (the handshake timeout covers that).
            return Tick::Again { after_ms };
        };
        let ka = &mut self.alive;
        if std::mem::take(&mut ka.heard) {
            ka.silent = 0;
        } else {
            ka.silent += 1;
        }
        if ka.silent >= limit {
            let e = Error::connection_lost(
                ErrorKind::TimedOut,
                format!(
                    "no word from the peer in {} ms ({} keepalive ticks; \
                     RdmaConfig::keepalive_interval and keepalive_misses): it, or the \
                     path to it, is gone",
                    u64::from(ka.silent) * u64::from(after_ms),
                    ka.silent
                ),
            );
            self.fail(e);
            return Tick::Failed;
        }
        if !ka.probe_out && self.probes() {
            self.alive.probe_due = true;
            self.pump_due = true;
        }
        Tick::Again { after_ms }
    }

    /// Queue one whole message. `Ok(None)`: accepted. `Ok(Some(msg))`: not now (the
    /// peer's hello has not arrived, or `send_buffer` bytes are queued): wait for a
    /// change and try again.
    ///
    /// # Errors
    /// `MessageTooLarge` (this side's limit or the peer's; nothing is queued, the
    /// connection stays usable), `Closed` after `shutdown`/`close`, or the error that
    /// broke the connection.
    pub(crate) fn queue_send(&mut self, msg: Bytes) -> Result<Option<Bytes>> {
        let len = msg.len();
        if len > self.lim.max_message_size {
            return Err(too_large(len as u64, self.lim.max_message_size, false));
        }
        if let Health::Failed { error, .. } = &self.life.health {
            return Err(error.clone());
        }
        if self.life.local != Local::Open {
            return Err(Error::closed("send"));
        }
        let Some(peer) = self.peer else {
            return Ok(Some(msg));
        };
        if len as u64 > peer.max_message_size {
            let e = too_large(len as u64, peer.max_message_size as usize, false);
            return Err(Error::new(e.kind(), format!("{e} of the peer")));
        }
        if self.queued > 0 && self.queued + len > self.lim.send_buffer {
            return Ok(Some(msg));
        }
        self.queued += len;
        self.sendq.push_back(Outgoing {
            data: msg,
            off: 0,
            kind: Kind::Data,
        });
        if self.data_in_flight < self.lim.cork_in_flight {
            self.pump_due = true;
        }
        Ok(None)
    }

    /// Handle one work completion (polled from the CQ, in CQ order).
    pub(crate) fn on_completion(&mut self, c: &Completion) {
        self.changed = true;
        self.pump_due = true;
        let kind = match WrKind::try_from(c.wr_id) {
            Ok(k) => k,
            Err(e) => return self.fail(e.into()),
        };
        match kind {
            WrKind::Control => {
                self.sq_free += 1;
                if !c.is_success() {
                    self.fail(send_failure(c.status));
                }
            }
            WrKind::Recv(idx) => self.on_recv(idx, c),
            WrKind::Op(id) => self.on_send_done(id, c),
        }
        self.settle_disconnect();
    }

    /// RDMA-CM says the connection ended. Returns `true` the first time: the shell
    /// then moves the QP to the error state (and reports [`fail`](Self::fail) if it
    /// cannot), so the flushes of everything posted follow.
    pub(crate) fn on_disconnect(&mut self, why: String) -> bool {
        self.changed = true;
        match self.life.health {
            Health::Up => {
                self.life.health = Health::Disconnected(why);
                self.settle_disconnect();
                true
            }
            _ => false,
        }
    }

    /// After a disconnect the flushes of what was posted end the connection; with
    /// nothing posted, no completion will come: end it now.
    fn settle_disconnect(&mut self) {
        if matches!(self.life.health, Health::Disconnected(_))
            && self.inflight.is_empty()
            && self.posted_receives() == 0
        {
            self.fail(Error::new(ErrorKind::ConnectionReset, "disconnected"));
        }
    }

    /// A lent receive buffer came back (the last `Bytes` of its message dropped).
    pub(crate) fn buffer_returned(&mut self, idx: u32, buf: B) {
        self.lent = self.lent.saturating_sub(1);
        self.changed = true;
        // A dead connection posts nothing again: the buffer just returns to its slab.
        if self.is_dead() {
            return;
        }
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if !matches!(slot, Slot::Out) {
            return;
        }
        *slot = Slot::Pending(buf);
        self.pending.push(idx);
        self.pump_due = true;
    }

    /// No more messages: the end-of-stream marker follows what is queued.
    pub(crate) fn shutdown(&mut self) {
        if self.life.local == Local::Open {
            self.life.local = Local::Shut;
            self.sendq.push_back(Outgoing {
                data: Bytes::new(),
                off: 0,
                kind: Kind::Fin,
            });
            self.pump_due = true;
            self.changed = true;
        }
    }

    /// Stop both directions (after `shutdown` and `flush`, or to give up).
    pub(crate) fn close(&mut self) {
        if self.life.local != Local::Closed {
            if let Health::Failed { error, .. } = &self.life.health {
                self.life.failed_before_close = Some(error.clone());
            }
        }
        self.life.local = Local::Closed;
        self.changed = true;
    }

    /// Something outside the protocol failed (posting, polling, moving the QP).
    pub(crate) fn fail(&mut self, e: Error) {
        self.changed = true;
        let error = match &self.life.health {
            Health::Failed { .. } => return,
            // After a disconnect every failure (flushed requests) has that one cause.
            Health::Disconnected(why) => Error::new(
                ErrorKind::ConnectionReset,
                format!("the connection ended: {why}"),
            ),
            Health::Up => e,
        };
        self.life.health = Health::Failed { error, lost: false };
    }

    // ---- outputs ------------------------------------------------------------------

    /// The SENDs to post now, in order, all in one doorbell: queued fragments while
    /// credits and send-queue slots last, then a credit update if one is due.
    pub(crate) fn poll_transmit<S: Stager<Keep = K>>(
        &mut self,
        stager: &mut S,
        out: &mut Vec<SendWr>,
    ) {
        if !self.pump_due {
            return;
        }
        self.pump_due = false;
        if self.is_dead() {
            return;
        }
        while self.sq_free > 0 {
            let Some(front) = self.sendq.front() else {
                break;
            };
            let left = front.data.len() - front.off;
            let n = left.min(self.frag);
            let kind = front.kind;
            let credits = match kind {
                Kind::Hello => self.credits.take_for_hello(),
                _ => self.credits.take_for_data(),
            };
            let Some(credits) = credits else { break };
            let flags = match kind {
                Kind::Hello => ImmFlags::Hello,
                Kind::Fin => ImmFlags::Fin,
                Kind::Data if n == left => ImmFlags::LastFragment,
                Kind::Data => ImmFlags::Fragment,
            };
            let frag = if n == left && self.sendq[0].off == 0 {
                // A message in one fragment goes as it is (no slice, no refcount).
                self.sendq.pop_front().expect("checked above").data
            } else {
                let front = self.sendq.front_mut().expect("checked above");
                let frag = front.data.slice(front.off..front.off + n);
                front.off += n;
                if front.off == front.data.len() {
                    self.sendq.pop_front();
                }
                frag
            };
            self.sq_free -= 1;
            self.queued -= n;
            self.data_in_flight += 1;
            let (keep, sge) = if frag.is_empty() {
                (None, None)
            } else {
                match stager.stage(frag) {
                    Ok(s) => {
                        self.zero_copy_sends += u64::from(s.zero_copy);
                        (Some(s.keep), Some(s.sge))
                    }
                    Err(e) => {
                        // Not posted: give the slot and the count back.
                        self.sq_free += 1;
                        self.data_in_flight -= 1;
                        self.fail(e);
                        break;
                    }
                }
            };
            let gen = self.next_gen;
            self.next_gen = (self.next_gen + 1) & (u32::MAX >> 1);
            let key = self.inflight.insert(InFlight { gen, _keep: keep });
            // Any message answers a probe.
            self.alive.answer_due = false;
            out.push(SendWr {
                wr_id: WrKind::Op(WrId::new(key as u32, gen)).to_u64(),
                imm: Imm {
                    credits: credits as u16,
                    flags,
                }
                .encode(),
                sge,
            });
        }
        if self.sq_free > 0 {
            let now = self.alive.probe_due || self.alive.answer_due;
            let credits = if now {
                self.credits.take_for_control()
            } else {
                self.credits.take_for_update()
            };
            if let Some(credits) = credits {
                // The prober never spends its last credit without asking for an
                // answer: the answer brings it back, so the next probe has one.
                let probe =
                    self.alive.probe_due || (self.probes() && self.credits.available() == 0);
                if probe {
                    self.alive.probe_due = false;
                    self.alive.probe_out = true;
                }
                self.alive.answer_due = false;
                self.sq_free -= 1;
                out.push(SendWr {
                    wr_id: WrKind::Control.to_u64(),
                    imm: Imm {
                        credits: credits as u16,
                        flags: if probe {
                            ImmFlags::Probe
                        } else {
                            ImmFlags::CreditUpdate
                        },
                    }
                    .encode(),
                    sge: None,
                });
            }
        }
    }

    /// The receives to post now (buffers that came back), in one batch. None while
    /// the unread bytes are over the budget (that holds the peer's credits back),
    /// except those of control messages.
    pub(crate) fn poll_recv_posts(&mut self, out: &mut Vec<RecvWr>) {
        if self.is_dead() {
            return;
        }
        let mut ready = std::mem::take(&mut self.pending_control);
        if self.unread <= self.lim.recv_budget {
            ready.append(&mut self.pending);
        }
        if ready.is_empty() {
            return;
        }
        let mut n = 0;
        for idx in ready {
            let slot = &mut self.slots[idx as usize];
            let Slot::Pending(buf) = std::mem::replace(slot, Slot::Out) else {
                continue;
            };
            out.push(RecvWr {
                wr_id: WrKind::Recv(idx).to_u64(),
                sge: buf.sge(),
            });
            *slot = Slot::Posted(buf);
            n += 1;
        }
        self.posted += n;
        self.credits.reposted(n);
        // The credits may go back in an update.
        self.pump_due = true;
    }

    /// The next thing `recv` returns: a message, or the end (`Closed` after a local
    /// close or the peer's end of stream; the error of a failed connection, after
    /// everything that had arrived). `None`: wait.
    pub(crate) fn poll_recv(&mut self) -> Option<Result<Incoming<B>>> {
        if let Some(m) = self.recvq.pop_front() {
            self.unread -= m.len();
            // Room under the budget again: the held buffers may go back.
            self.pump_due = true;
            return Some(Ok(match m {
                // Lent as it is while at most half the buffers are out with the
                // application; past that copied, and the buffer posted again, so the
                // receives never run dry however many messages the application holds.
                Incoming::Lent { idx, buf, len } if self.lent < self.lend_max => {
                    self.lent += 1;
                    self.lent_total += 1;
                    Incoming::Lent { idx, buf, len }
                }
                Incoming::Lent { idx, buf, len } => {
                    let copy = Bytes::copy_from_slice(&buf.bytes()[..len]);
                    self.hold(idx, buf);
                    Incoming::Owned(copy)
                }
                owned => owned,
            }));
        }
        if self.life.local == Local::Closed {
            // Closed after the connection failed: the failure stays the answer.
            return Some(Err(self
                .life
                .failed_before_close
                .clone()
                .unwrap_or_else(|| Error::closed("recv"))));
        }
        // An orderly end (the peer's marker) wins over the disconnect that follows it.
        if self.life.peer_ended {
            return Some(Err(Error::new(
                ErrorKind::Closed,
                "recv: the peer closed the connection",
            )));
        }
        match &self.life.health {
            Health::Failed { error, .. } => Some(Err(error.clone())),
            _ => None,
        }
    }

    /// `flush`'s answer: `Ok` once everything queued was sent and acknowledged by the
    /// peer's device, the error if something accepted cannot be, `None`: wait.
    pub(crate) fn poll_flush(&self) -> Option<Result<()>> {
        let done = self.sendq.is_empty() && self.data_in_flight == 0;
        if !done && self.life.local == Local::Closed {
            return Some(Err(Error::closed("flush")));
        }
        match &self.life.health {
            Health::Failed { error, lost } if *lost || !done => Some(Err(error.clone())),
            _ => done.then_some(Ok(())),
        }
    }

    /// Whether something changed that a waiting task may be interested in (and clear
    /// it): the shell wakes its waiters when this is true.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::replace(&mut self.changed, false)
    }

    // ---- queries ------------------------------------------------------------------

    /// Whether the peer's hello has arrived (it speaks this protocol).
    #[cfg(any(feature = "rdma", test))]
    pub(crate) fn greeted(&self) -> bool {
        self.peer.is_some()
    }

    /// Whether the connection is closed or broken, or the peer ended it.
    pub(crate) fn is_closed(&self) -> bool {
        self.life.local != Local::Open
            || self.life.peer_ended
            || !matches!(self.life.health, Health::Up)
    }

    /// Whether received bytes wait for `recv` (a message, or part of one).
    pub(crate) fn has_unread(&self) -> bool {
        !self.recvq.is_empty() || !self.partial.is_empty()
    }

    /// The peer ended its stream and then the connection before ours got through:
    /// there is nobody left to deliver it to (a close then succeeds, as a TCP close
    /// after the peer's FIN does).
    pub(crate) fn peer_left_after_ending(&self) -> bool {
        self.life.peer_ended && !matches!(self.life.health, Health::Up)
    }

    #[cfg(test)]
    pub(crate) fn lifecycle(&self) -> &Lifecycle {
        &self.life
    }

    /// Credits this side may still send with.
    pub(crate) fn send_credits(&self) -> u32 {
        self.credits.available()
    }

    /// Bytes received and not taken by `recv`: whole messages, and the one being
    /// reassembled.
    pub(crate) fn unread(&self) -> usize {
        self.unread + self.partial.len()
    }

    /// Bytes accepted by `queue_send` and not posted yet.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// SENDs posted and not completed.
    #[cfg(test)]
    pub(crate) fn sends_in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub(crate) fn zero_copy_sends(&self) -> u64 {
        self.zero_copy_sends
    }

    pub(crate) fn zero_copy_recvs(&self) -> u64 {
        self.lent_total
    }

    /// The receive buffers this core holds (posted, or back and not posted again), with
    /// their indices; lent ones are not here (for the shell's test hook).
    #[cfg(feature = "rdma")]
    pub(crate) fn held_buffers(&self) -> impl Iterator<Item = (u32, &B)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Posted(b) | Slot::Pending(b) => Some((i as u32, b)),
            Slot::Out => None,
        })
    }

    /// Receive buffers posted now.
    pub(crate) fn posted_receives(&self) -> usize {
        self.posted as usize
    }

    /// The posted receives counted one by one (the simulation checks the count).
    #[cfg(test)]
    pub(crate) fn posted_by_scan(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Posted(_)))
            .count()
    }

    /// Whether buffers the application gives back must be posted again soon, or can
    /// wait for whatever drives this connection next (a `recv` or `send`, a completion).
    /// Soon when the receives the peer knows of (posted, less those not announced yet)
    /// are down to a quarter of the depth: it may run out of credits, and its sends
    /// are what would bring the next completion. Otherwise waking a thread for each
    /// dropped message only costs (a system call and a context switch per message).
    pub(crate) fn returns_urgent(&self) -> bool {
        let known = self.posted.saturating_sub(self.credits.pending_return());
        known <= (self.lim.depth / 4).max(2)
    }

    // ---- internals ----------------------------------------------------------------

    /// Silent ticks in a row after which this side fails the connection, if it
    /// judges.
    #[cfg(test)]
    pub(crate) fn keepalive_limit(&self) -> Option<u32> {
        self.silence_limit()
    }

    /// Milliseconds to the first keepalive tick (half the local interval), if on.
    pub(crate) fn first_keepalive_tick(&self) -> Option<u32> {
        self.keepalive_period()
    }

    /// Whether this side sends the keepalive probes (see `on_keepalive_tick`).
    fn probes(&self) -> bool {
        let Some(peer) = self.peer.as_ref().and_then(|h| h.keepalive_ms) else {
            return false;
        };
        self.lim.keepalive_ms > 0 && (self.lim.initiator || peer == 0)
    }

    /// Milliseconds between keepalive ticks: half the prober's interval (before the
    /// hello, half the local one). `None`: no more ticks (keepalive off, a peer that
    /// does not know it, or the connection is over).
    fn keepalive_period(&self) -> Option<u32> {
        let own = self.lim.keepalive_ms;
        if own == 0 || self.is_dead() {
            return None;
        }
        let interval = match &self.peer {
            None => own,
            Some(h) => match h.keepalive_ms? {
                _ if self.probes() => own,
                0 => return None,
                peer => peer,
            },
        };
        Some((interval / 2).max(1))
    }

    /// Silent ticks in a row that fail the connection (`2 × misses - 1`, see
    /// `on_keepalive_tick`), once the peer's hello has come and if this side judges.
    fn silence_limit(&self) -> Option<u32> {
        self.peer.as_ref()?;
        self.keepalive_period()?;
        let misses = self.lim.keepalive_misses.max(1);
        Some(misses.saturating_mul(2) - 1)
    }

    /// The smaller of both receive buffers; no larger than the peer's port MTU if this
    /// side's path MTU (or an unknown one) is larger. A peer's MTU under 256 bytes (the
    /// smallest there is) counts as 256.
    fn fragment_size(&self) -> usize {
        let Some(h) = &self.peer else {
            return self.lim.chunk;
        };
        let frag = self.lim.chunk.min(h.chunk as usize);
        let peer_mtu = match h.mtu {
            0 => return frag,
            m => m.max(MIN_MTU),
        };
        if self.path_mtu == 0 || self.path_mtu > peer_mtu {
            frag.min(peer_mtu as usize)
        } else {
            frag
        }
    }

    fn is_dead(&self) -> bool {
        self.life.local == Local::Closed || !matches!(self.life.health, Health::Up)
    }

    fn on_send_done(&mut self, id: WrId, c: &Completion) {
        match self.inflight.get(id.key() as usize) {
            Some(op) if op.gen == id.gen() => {
                // Frees the fragment's memory: the device is done with it.
                self.inflight.remove(id.key() as usize);
            }
            _ => {
                return self.fail(Error::new(
                    ErrorKind::InvalidData,
                    format!("a send completion for work request {id:?}, which is not in flight"),
                ))
            }
        }
        self.sq_free += 1;
        self.data_in_flight -= 1;
        if !c.is_success() {
            self.fail(send_failure(c.status));
            if let Health::Failed { lost, .. } = &mut self.life.health {
                *lost = true;
            }
        }
    }

    fn on_recv(&mut self, idx: u32, c: &Completion) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return self.fail(Error::new(
                ErrorKind::InvalidData,
                format!("a receive completion for buffer {idx}, which does not exist"),
            ));
        };
        let buf = match std::mem::replace(slot, Slot::Out) {
            Slot::Posted(b) => {
                self.posted -= 1;
                b
            }
            other => {
                *slot = other;
                return self.fail(Error::new(
                    ErrorKind::InvalidData,
                    format!("a receive completion for buffer {idx}, which was not posted"),
                ));
            }
        };
        if !c.is_success() {
            // Flushed (or failed): kept, never posted again (a dead connection posts
            // nothing), so what it holds can still be looked at.
            let e = Error::new(
                ErrorKind::WorkCompletion { status: c.status },
                format!(
                    "the connection failed: a receive completed with {} (work completion \
                     status {})",
                    wc_status_name(c.status),
                    c.status
                ),
            );
            self.hold(idx, buf);
            return self.fail(e);
        }
        let imm = match Imm::decode(c.imm.unwrap_or(0)) {
            Ok(imm) => imm,
            Err(e) => {
                self.hold(idx, buf);
                return self.fail(e.into());
            }
        };
        self.credits.on_receive(u32::from(imm.credits));
        self.alive.heard = true;
        self.alive.probe_out = false;
        let len = (c.byte_len as usize).min(buf.bytes().len());
        match imm.flags {
            ImmFlags::Hello => {
                let hello = Hello::decode(&buf.bytes()[..len]);
                match hello {
                    Ok(h) if self.peer.is_none() => {
                        self.credits.on_hello(h.depth);
                        self.peer = Some(h);
                        self.frag = self.fragment_size();
                    }
                    Ok(_) => {}
                    Err(e) => self.fail(e.into()),
                }
                self.hold(idx, buf);
            }
            ImmFlags::CreditUpdate => self.hold_control(idx, buf),
            ImmFlags::Probe => {
                self.alive.answer_due = true;
                self.hold_control(idx, buf);
            }
            ImmFlags::Fin => {
                self.life.peer_ended = true;
                self.hold(idx, buf);
            }
            flags => {
                debug_assert!(flags.is_data());
                let last = flags == ImmFlags::LastFragment;
                if self.partial.len() + len > self.lim.max_message_size {
                    let size = (self.partial.len() + len) as u64;
                    self.hold(idx, buf);
                    return self.fail(too_large(size, self.lim.max_message_size, true));
                }
                // A whole message in one buffer waits in it; `poll_recv` decides then
                // whether to lend it or copy it out (see there).
                if last && self.partial.is_empty() && len > 0 {
                    self.unread += len;
                    self.recvq.push_back(Incoming::Lent { idx, buf, len });
                    return;
                }
                self.partial.extend_from_slice(&buf.bytes()[..len]);
                if last {
                    let msg = std::mem::take(&mut self.partial);
                    self.unread += msg.len();
                    self.recvq.push_back(Incoming::Owned(Bytes::from(msg)));
                }
                self.hold(idx, buf);
            }
        }
    }

    /// Buffer `idx` is free again: post it with the next batch.
    fn hold(&mut self, idx: u32, buf: B) {
        self.slots[idx as usize] = Slot::Pending(buf);
        self.pending.push(idx);
    }

    /// Buffer `idx` held a control message: post it with the next batch, even over
    /// the receive budget.
    fn hold_control(&mut self, idx: u32, buf: B) {
        self.slots[idx as usize] = Slot::Pending(buf);
        self.pending_control.push(idx);
    }
}

impl<B, K> fmt::Debug for Connection<B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("life", &self.life)
            .field("credits", &self.credits)
            .field("sq_free", &self.sq_free)
            .field("queued", &self.queued)
            .field("sends_in_flight", &self.inflight.len())
            .field("lent", &self.lent)
            .field("unread", &self.unread)
            .field("messages", &self.recvq.len())
            .field("frag", &self.frag)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    //! The core driven by hand: one connection against a scripted peer, or two joined by
    //! a lossless in-order wire (the simulation in `sim.rs` does the random part).
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[derive(Clone)]
    struct Buf(Rc<RefCell<Vec<u8>>>, u64);

    impl RecvBuf for Buf {
        fn bytes(&self) -> impl std::ops::Deref<Target = [u8]> + '_ {
            std::cell::Ref::map(self.0.borrow(), |v| v.as_slice())
        }
        fn sge(&self) -> Sge {
            Sge {
                addr: self.1,
                len: self.0.borrow().len() as u32,
                lkey: 0,
            }
        }
    }

    /// Keeps the fragment itself; the "address" indexes a table of them.
    #[derive(Default)]
    struct Mem(Rc<RefCell<Vec<Bytes>>>);

    impl Stager for Mem {
        type Keep = ();
        fn stage(&mut self, frag: Bytes) -> Result<Staged<()>> {
            let mut m = self.0.borrow_mut();
            m.push(frag.clone());
            Ok(Staged {
                keep: (),
                sge: Sge {
                    addr: m.len() as u64 - 1,
                    len: frag.len() as u32,
                    lkey: 0,
                },
                zero_copy: false,
            })
        }
    }

    fn lim(depth: u32, chunk: usize) -> Limits {
        Limits {
            depth,
            chunk,
            max_message_size: 10_000,
            send_buffer: 100_000,
            recv_budget: 1 << 20,
            sq_depth: 64,
            cork_in_flight: 8,
            port_mtu: 0,
            initiator: false,
            keepalive_ms: 0,
            keepalive_misses: 3,
        }
    }

    struct End {
        conn: Connection<Buf, ()>,
        bufs: Vec<Buf>,
        rq: VecDeque<RecvWr>,
        mem: Mem,
        cq: VecDeque<Completion>,
    }

    fn end(l: Limits) -> End {
        let bufs: Vec<Buf> = (0..l.depth)
            .map(|i| Buf(Rc::new(RefCell::new(vec![0; l.chunk])), u64::from(i)))
            .collect();
        let (conn, first) = Connection::new(l, bufs.clone());
        End {
            conn,
            bufs,
            rq: first.into(),
            mem: Mem::default(),
            cq: VecDeque::new(),
        }
    }

    /// Post what `e` asks for and deliver its SENDs into `peer`; returns them.
    fn pump(e: &mut End, peer: &mut End) -> Vec<SendWr> {
        let mut r = Vec::new();
        e.conn.poll_recv_posts(&mut r);
        e.rq.extend(r);
        let mut out = Vec::new();
        e.conn.poll_transmit(&mut e.mem, &mut out);
        for wr in &out {
            let data = wr
                .sge
                .map(|s| e.mem.0.borrow()[s.addr as usize].clone())
                .unwrap_or_default();
            let recv = peer.rq.pop_front().expect("a receive is posted (no RNR)");
            let buf = &peer.bufs[recv.sge.addr as usize];
            buf.0.borrow_mut()[..data.len()].copy_from_slice(&data);
            peer.cq.push_back(Completion {
                wr_id: recv.wr_id,
                status: 0,
                opcode: 128,
                byte_len: data.len() as u32,
                imm: Some(wr.imm),
            });
            e.cq.push_back(Completion::success(wr.wr_id));
        }
        out
    }

    fn poll_all(e: &mut End) {
        while let Some(c) = e.cq.pop_front() {
            e.conn.on_completion(&c);
        }
    }

    /// Run both ends until nothing moves.
    fn settle(a: &mut End, b: &mut End) {
        for _ in 0..1000 {
            let moved = !pump(a, b).is_empty() | !pump(b, a).is_empty();
            let polled = !a.cq.is_empty() || !b.cq.is_empty();
            poll_all(a);
            poll_all(b);
            if !moved && !polled {
                return;
            }
        }
        panic!("the pair never settles");
    }

    fn recv(e: &mut End) -> Option<Result<Bytes>> {
        e.conn.poll_recv().map(|r| {
            r.map(|m| match m {
                Incoming::Lent { idx, buf, len } => {
                    let b = Bytes::copy_from_slice(&buf.bytes()[..len]);
                    e.conn.buffer_returned(idx, buf);
                    b
                }
                Incoming::Owned(b) => b,
            })
        })
    }

    #[test]
    fn data_waits_for_the_peers_hello_and_uses_the_smaller_buffer() {
        let (mut a, mut b) = (end(lim(8, 256)), end(lim(4, 64)));
        let msg = Bytes::from(vec![7u8; 200]);
        assert!(
            a.conn.queue_send(msg.clone()).unwrap().is_some(),
            "no hello yet: wait"
        );
        settle(&mut a, &mut b);
        assert_eq!(a.conn.queue_send(msg.clone()).unwrap(), None);
        let sent = pump(&mut a, &mut b);
        // Fragments of the peer's 64-byte buffers, as far as its 4 credits go (one was
        // the hello's, one is kept for updates).
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent.iter().all(|w| w.sge.unwrap().len == 64), "{sent:?}");
        settle(&mut a, &mut b);
        assert_eq!(recv(&mut b).unwrap().unwrap(), msg);
        assert!(recv(&mut b).is_none(), "nothing more: wait");
    }

    #[test]
    fn oversized_messages_are_refused_and_the_connection_stays_usable() {
        let mut la = lim(8, 128);
        la.max_message_size = 1000;
        let mut lb = lim(8, 128);
        lb.max_message_size = 500;
        let (mut a, mut b) = (end(la), end(lb));
        settle(&mut a, &mut b);
        let own = a.conn.queue_send(Bytes::from(vec![0; 1001])).unwrap_err();
        assert!(matches!(
            own.kind(),
            ErrorKind::MessageTooLarge {
                received: false,
                ..
            }
        ));
        let peers = a.conn.queue_send(Bytes::from(vec![0; 501])).unwrap_err();
        assert!(peers.to_string().contains("of the peer"), "{peers}");
        a.conn.queue_send(Bytes::from_static(b"fine")).unwrap();
        settle(&mut a, &mut b);
        assert_eq!(&recv(&mut b).unwrap().unwrap()[..], b"fine");
        assert!(!a.conn.is_closed());
    }

    #[test]
    fn end_of_stream_comes_after_the_last_message() {
        let (mut a, mut b) = (end(lim(8, 128)), end(lim(8, 128)));
        settle(&mut a, &mut b);
        for i in 0..20u8 {
            a.conn.queue_send(Bytes::from(vec![i; 300])).unwrap();
        }
        a.conn.shutdown();
        let refused = a.conn.queue_send(Bytes::new()).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Closed);
        settle(&mut a, &mut b);
        for i in 0..20u8 {
            assert_eq!(recv(&mut b).unwrap().unwrap(), Bytes::from(vec![i; 300]));
        }
        assert!(b.conn.is_closed(), "the peer ended");
        let end = recv(&mut b).unwrap().unwrap_err();
        assert_eq!(end.kind(), ErrorKind::Closed);
        assert!(matches!(a.conn.poll_flush(), Some(Ok(()))));
    }

    #[test]
    fn a_failed_send_fails_flush_but_what_arrived_is_still_read() {
        let (mut a, mut b) = (end(lim(8, 128)), end(lim(8, 128)));
        settle(&mut a, &mut b);
        b.conn.queue_send(Bytes::from_static(b"before")).unwrap();
        settle(&mut a, &mut b);
        a.conn.queue_send(Bytes::from_static(b"lost")).unwrap();
        let mut out = Vec::new();
        a.conn.poll_transmit(&mut a.mem, &mut out);
        assert_eq!(out.len(), 1);
        assert!(a.conn.on_disconnect("peer gone".into()), "first disconnect");
        assert!(!a.conn.on_disconnect("again".into()));
        // The QP goes to error: the SEND and the posted receives are flushed.
        a.conn.on_completion(&Completion {
            status: 5,
            ..Completion::success(out[0].wr_id)
        });
        assert_eq!(
            a.conn.poll_flush().unwrap().unwrap_err().kind(),
            ErrorKind::ConnectionReset
        );
        assert_eq!(&recv(&mut a).unwrap().unwrap()[..], b"before");
        let err = recv(&mut a).unwrap().unwrap_err();
        assert!(err.to_string().contains("peer gone"), "{err}");
        assert!(a.conn.is_closed());
    }

    #[test]
    fn a_send_the_peer_never_acknowledges_fails_everything_with_timed_out() {
        let (mut a, mut b) = (end(lim(8, 128)), end(lim(8, 128)));
        settle(&mut a, &mut b);
        a.conn
            .queue_send(Bytes::from_static(b"into the void"))
            .unwrap();
        let mut out = Vec::new();
        a.conn.poll_transmit(&mut a.mem, &mut out);
        assert_eq!(out.len(), 1);
        // The link is down: the retransmissions run out.
        a.conn.on_completion(&Completion {
            status: RETRY_EXC_ERR,
            ..Completion::success(out[0].wr_id)
        });
        let flush = a.conn.poll_flush().unwrap().unwrap_err();
        assert_eq!(flush.kind(), ErrorKind::TimedOut, "{flush}");
        assert!(flush.to_string().contains("retry_count"), "{flush}");
        assert!(flush.is_fatal(), "a pool must not keep the connection");
        assert_eq!(
            recv(&mut a).unwrap().unwrap_err().kind(),
            ErrorKind::TimedOut
        );
        let send = a.conn.queue_send(Bytes::from_static(b"later")).unwrap_err();
        assert_eq!(send.kind(), ErrorKind::TimedOut);
        assert!(a.conn.is_closed());
    }

    /// Fragment sizes `a` posts for a message of `len` bytes.
    fn fragments(a: &mut End, b: &mut End, len: usize) -> Vec<u32> {
        a.conn.queue_send(Bytes::from(vec![7u8; len])).unwrap();
        let sizes = pump(a, b)
            .iter()
            .map(|wr| wr.sge.map_or(0, |s| s.len))
            .collect();
        settle(a, b);
        assert_eq!(recv(b).unwrap().unwrap().len(), len);
        sizes
    }

    #[test]
    fn fragments_fit_the_peers_port_when_the_path_mtu_is_larger() {
        let mtu = |port_mtu| Limits {
            port_mtu,
            ..lim(16, 4096)
        };
        // `a` connected from a 4096-byte link to `b` on a 1024-byte one: RDMA-CM gave
        // both 4096, `b` clamped its own to 1024.
        let (mut a, mut b) = (end(mtu(4096)), end(mtu(1024)));
        a.conn.set_path_mtu(4096);
        b.conn.set_path_mtu(1024);
        settle(&mut a, &mut b);
        assert_eq!(fragments(&mut a, &mut b, 4096), [1024; 4]);
        assert_eq!(fragments(&mut a, &mut b, 1500), [1024, 476]);
        // `b`'s packets are 1024 bytes at most anyway: its fragments stay whole.
        assert_eq!(fragments(&mut b, &mut a, 4096), [4096]);

        // The same MTU both sides, or a peer that does not say (an older release):
        // whole buffers.
        for (pa, pb) in [(4096, 4096), (1024, 0)] {
            let (mut a, mut b) = (end(mtu(pa)), end(mtu(pb)));
            a.conn.set_path_mtu(pa);
            b.conn.set_path_mtu(pa);
            settle(&mut a, &mut b);
            assert_eq!(fragments(&mut a, &mut b, 4096), [4096]);
        }
    }

    /// `a` connects, both with keepalive every 1000 ms and 3 misses.
    fn keepalive_pair() -> (End, End) {
        let ka = |initiator| Limits {
            initiator,
            keepalive_ms: 1000,
            keepalive_misses: 3,
            ..lim(8, 128)
        };
        let (mut a, mut b) = (end(ka(true)), end(ka(false)));
        settle(&mut a, &mut b);
        (a, b)
    }

    #[test]
    fn keepalive_probes_an_idle_connection_and_notices_a_vanished_peer_on_both_sides() {
        let (mut a, mut b) = keepalive_pair();
        assert_eq!(
            a.conn.first_keepalive_tick(),
            Some(500),
            "half the interval"
        );
        // Alive and idle: `a` probes at every tick, `b` answers; nobody fails.
        for _ in 0..20 {
            assert_eq!(a.conn.on_keepalive_tick(), Tick::Again { after_ms: 500 });
            let probes = pump(&mut a, &mut b);
            assert_eq!(probes.len(), 1);
            assert_eq!(Imm::decode(probes[0].imm).unwrap().flags, ImmFlags::Probe);
            settle(&mut a, &mut b);
            assert_eq!(b.conn.on_keepalive_tick(), Tick::Again { after_ms: 500 });
            assert!(recv(&mut a).is_none() && recv(&mut b).is_none());
        }
        // `b` vanishes: nothing `a` sends arrives, nothing comes back. `a` fails at its
        // fifth silent tick (2 × 3 - 1), 2.5 s after the last answer: within 3 s.
        let mut ticks = 0;
        while a.conn.on_keepalive_tick() != Tick::Failed {
            ticks += 1;
            assert!(ticks < 10, "never noticed");
            let mut out = Vec::new();
            a.conn.poll_transmit(&mut a.mem, &mut out);
        }
        assert_eq!(ticks, 5);
        let e = recv(&mut a).unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("keepalive"), "{e}");
        assert!(e.is_fatal(), "a pool must not keep the connection");
        assert!(a.conn.is_closed());
        assert_eq!(a.conn.on_keepalive_tick(), Tick::Stop);
        // `b`, which judges by the probes it no longer gets, fails the same way (its
        // last tick above came after the last probe: four more silent ticks, then the
        // fifth fails it).
        let mut ticks = 0;
        while b.conn.on_keepalive_tick() != Tick::Failed {
            ticks += 1;
            assert!(ticks < 10, "never noticed");
        }
        assert_eq!(ticks, 4);
        assert_eq!(
            recv(&mut b).unwrap().unwrap_err().kind(),
            ErrorKind::TimedOut
        );
    }

    #[test]
    fn keepalive_goes_on_while_the_receiver_withholds_every_credit() {
        let (mut a, mut b) = keepalive_pair();
        // `b`'s application stops reading: `a` runs out of data credits.
        for k in 0..40u8 {
            let _ = a.conn.queue_send(Bytes::from(vec![k; 100]));
            settle(&mut a, &mut b);
        }
        assert!(a.conn.send_credits() <= 1, "{}", a.conn.send_credits());
        for _ in 0..50 {
            assert!(matches!(a.conn.on_keepalive_tick(), Tick::Again { .. }));
            settle(&mut a, &mut b);
            assert!(matches!(b.conn.on_keepalive_tick(), Tick::Again { .. }));
            settle(&mut a, &mut b);
        }
        assert!(!a.conn.is_closed() && !b.conn.is_closed());
        // And everything still arrives once `b` reads.
        let mut got = 0;
        for _ in 0..1000 {
            settle(&mut a, &mut b);
            match recv(&mut b) {
                Some(Ok(_)) => got += 1,
                _ if a.conn.queued() == 0 => break,
                _ => {}
            }
        }
        while let Some(Ok(_)) = recv(&mut b) {
            got += 1;
        }
        assert_eq!(got, 40);
    }

    #[test]
    fn a_peer_without_keepalive_is_neither_probed_nor_judged() {
        // A hello of a release before keepalive (20 bytes) reaches `a`.
        let mut a = end(Limits {
            initiator: true,
            keepalive_ms: 1000,
            ..lim(8, 128)
        });
        let old = Hello {
            depth: 8,
            chunk: 128,
            max_message_size: 10_000,
            mtu: 0,
            keepalive_ms: None,
        }
        .encode();
        let r = a.rq.pop_front().unwrap();
        a.bufs[r.sge.addr as usize].0.borrow_mut()[..20].copy_from_slice(&old[..20]);
        a.conn.on_completion(&Completion {
            wr_id: r.wr_id,
            status: 0,
            opcode: 128,
            byte_len: 20,
            imm: Some(
                Imm {
                    credits: 0,
                    flags: ImmFlags::Hello,
                }
                .encode(),
            ),
        });
        assert!(a.conn.greeted());
        assert_eq!(a.conn.on_keepalive_tick(), Tick::Stop);
        let mut out = Vec::new();
        a.conn.poll_transmit(&mut a.mem, &mut out);
        assert!(out
            .iter()
            .all(|wr| Imm::decode(wr.imm).unwrap().flags != ImmFlags::Probe));
        assert!(!a.conn.is_closed());
    }

    #[test]
    fn a_failure_before_close_is_what_recv_keeps_reporting() {
        let (mut a, mut b) = (end(lim(4, 64)), end(lim(4, 64)));
        settle(&mut a, &mut b);
        a.conn
            .fail(Error::new(ErrorKind::ConnectionReset, "peer gone"));
        let first = recv(&mut a).unwrap().unwrap_err();
        assert_eq!(first.kind(), ErrorKind::ConnectionReset);
        a.conn.close();
        for _ in 0..2 {
            let err = recv(&mut a).unwrap().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
            assert!(err.to_string().contains("peer gone"), "{err}");
        }
        // Closed while healthy: `Closed`, whatever the close's own flushes do after.
        let (mut c, mut d) = (end(lim(4, 64)), end(lim(4, 64)));
        settle(&mut c, &mut d);
        c.conn.close();
        c.conn
            .fail(Error::new(ErrorKind::ConnectionReset, "flushed"));
        assert_eq!(recv(&mut c).unwrap().unwrap_err().kind(), ErrorKind::Closed);
    }

    #[test]
    fn a_disconnect_with_nothing_posted_ends_every_wait_at_once() {
        let (mut a, mut b) = (end(lim(3, 64)), end(lim(3, 64)));
        settle(&mut a, &mut b);
        a.conn.close();
        // Flush every posted receive, as the QP's move to the error state would.
        while let Some(r) = a.rq.pop_front() {
            a.conn.on_completion(&Completion {
                status: 5,
                ..Completion::success(r.wr_id)
            });
        }
        a.conn.on_disconnect("closed".into());
        assert!(a.conn.poll_flush().is_some());
        assert_eq!(recv(&mut a).unwrap().unwrap_err().kind(), ErrorKind::Closed);
    }

    #[test]
    fn unread_bytes_over_the_budget_hold_credits_back_until_read() {
        let mut lb = lim(8, 64);
        lb.recv_budget = 100;
        let (mut a, mut b) = (end(lim(8, 64)), end(lb));
        settle(&mut a, &mut b);
        for _ in 0..40 {
            a.conn.queue_send(Bytes::from(vec![1u8; 60])).unwrap();
        }
        settle(&mut a, &mut b);
        // b holds what arrived; past 100 unread bytes it stopped re-posting, so a ran
        // out of credits: at most the budget plus one window of buffers is unread.
        let unread = b.conn.unread();
        assert!(unread > 100 && unread <= 100 + 8 * 64, "{unread}");
        assert!(a.conn.queued() > 0, "the rest waits at the sender");
        let mut got = 0;
        for _ in 0..100 {
            while let Some(Ok(m)) = recv(&mut b) {
                assert_eq!(m.len(), 60);
                got += 1;
            }
            settle(&mut a, &mut b);
        }
        assert_eq!(got, 40, "everything flows once the application reads");
        assert_eq!(b.conn.unread(), 0);
    }

    #[test]
    fn half_the_buffers_at_most_are_lent() {
        let (mut a, mut b) = (end(lim(8, 64)), end(lim(8, 64)));
        settle(&mut a, &mut b);
        for _ in 0..10 {
            a.conn.queue_send(Bytes::from_static(b"x")).unwrap();
        }
        // The application holds every message it gets.
        let mut lent = Vec::new();
        let mut got = 0;
        for _ in 0..100 {
            settle(&mut a, &mut b);
            while let Some(Ok(m)) = b.conn.poll_recv() {
                got += 1;
                if let Incoming::Lent { idx, buf, .. } = m {
                    lent.push((idx, buf));
                }
            }
        }
        assert_eq!(got, 10, "holding messages never stops the flow");
        assert_eq!(lent.len(), 4, "depth 8: 4 lent, the rest copied");
        assert_eq!(b.conn.zero_copy_recvs(), 4);
        assert!(!b.conn.has_unread());
        for (idx, buf) in lent {
            b.conn.buffer_returned(idx, buf);
        }
        settle(&mut a, &mut b);
        assert_eq!(b.conn.posted_receives(), 8, "every buffer is posted again");
    }

    #[test]
    fn given_back_buffers_are_urgent_only_when_the_peer_may_run_short_of_credits() {
        let (mut a, mut b) = (end(lim(16, 64)), end(lim(16, 64)));
        settle(&mut a, &mut b);
        assert!(
            !b.conn.returns_urgent(),
            "16 posted, the peer knows of them"
        );
        // The application holds what it gets: every lent buffer is a receive fewer.
        for _ in 0..8 {
            a.conn.queue_send(Bytes::from_static(b"x")).unwrap();
        }
        let mut lent = Vec::new();
        for _ in 0..100 {
            settle(&mut a, &mut b);
            while let Some(Ok(m)) = b.conn.poll_recv() {
                if let Incoming::Lent { idx, buf, .. } = m {
                    lent.push((idx, buf));
                }
            }
        }
        assert_eq!(lent.len(), 8, "depth 16: 8 lent");
        assert_eq!(b.conn.posted_receives(), 8);
        assert!(!b.conn.returns_urgent(), "8 of 16 posted: a quarter is 4");
        // Four more, copied: their buffers are posted again with the next drive.
        for _ in 0..4 {
            a.conn.queue_send(Bytes::from_static(b"y")).unwrap();
        }
        settle(&mut a, &mut b);
        while let Some(Ok(_)) = b.conn.poll_recv() {}
        settle(&mut a, &mut b);
        assert!(!b.conn.returns_urgent());
        // Consumed and not re-posted (the receive budget holds them back): the peer
        // can see only a few receives now.
        b.conn.lim.recv_budget = 0;
        for _ in 0..5 {
            a.conn.queue_send(Bytes::from_static(b"z")).unwrap();
        }
        settle(&mut a, &mut b);
        assert!(
            b.conn.posted_receives() <= 4,
            "{}",
            b.conn.posted_receives()
        );
        assert!(b.conn.returns_urgent());
        // Back under the budget and every buffer returned: posted again, not urgent.
        b.conn.lim.recv_budget = usize::MAX;
        while let Some(Ok(_)) = b.conn.poll_recv() {}
        for (idx, buf) in lent {
            b.conn.buffer_returned(idx, buf);
        }
        settle(&mut a, &mut b);
        assert_eq!(b.conn.posted_receives(), 16);
        assert!(!b.conn.returns_urgent());
    }

    #[test]
    fn malformed_or_unknown_completions_fail_the_connection_clearly() {
        let (mut a, mut b) = (end(lim(8, 64)), end(lim(8, 64)));
        settle(&mut a, &mut b);
        // A send completion for an id that is not in flight.
        a.conn
            .on_completion(&Completion::success(WrKind::Op(WrId::new(99, 3)).to_u64()));
        let e = a.conn.queue_send(Bytes::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidData);
        assert!(e.to_string().contains("not in flight"), "{e}");
        // Immediate data with reserved bits set.
        let r = b.rq.pop_front().unwrap();
        b.conn.on_completion(&Completion {
            imm: Some(0xFFF0_0000),
            ..Completion::success(r.wr_id)
        });
        assert_eq!(
            recv(&mut b).unwrap().unwrap_err().kind(),
            ErrorKind::InvalidData
        );
        assert!(!b.conn.peer_left_after_ending());
        assert!(b.conn.send_credits() > 0);
        assert_eq!(b.conn.zero_copy_sends(), 0);
    }
}
