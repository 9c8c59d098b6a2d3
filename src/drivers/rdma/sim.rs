//! A deterministic simulation of the RDMA protocol: two [`Connection`] cores joined by a
//! simulated reliable-connected wire, driven by a seeded RNG.
//!
//! At each step the RNG picks one of the things that can happen under RC semantics:
//! the next SEND posted on one side is delivered into the next receive posted on the
//! other (in order; its send completion follows), a batch of completions is polled
//! (in CQ order), an application sends (a waiting send may also be given up: a dropped
//! `send` future), receives, gives a lent buffer back, stalls, shuts down, closes,
//! RDMA-CM reports a disconnect (the QPs go to the error state and every posted request
//! completes with a flush error), a keepalive interval passes (time moves to the next
//! tick of either side; the wire first carries everything in flight, as a network's
//! delay is far below an interval), or one side *vanishes silently* (its host or link
//! dies: nothing reaches it or comes from it any more, and the other side's sends are
//! never acknowledged). After every step the invariants are checked:
//!
//! * no SEND reaches the peer without a posted receive (no RNR), no fragment is
//!   larger than the receive buffer it lands in, and no packet larger than the
//!   receiving port's MTU (the ports' MTUs differ; RDMA-CM gives both sides the
//!   connecting side's path MTU, which the accepting side clamps to its own);
//! * memory a posted SEND names is alive and unchanged until its completion (bounce
//!   slots are reused from a free list, so freeing one early corrupts a later message);
//! * every accepted message arrives once, in order, intact (per sending task), or the
//!   connection reports an error; the end of stream comes after the last message;
//! * unread bytes stay below the receive budget plus one window of credits;
//! * progress: once the applications stop, everything accepted is delivered (no credit
//!   deadlock), every wait ends, and nothing stays in flight or allocated;
//! * keepalive: a connection whose peer is alive never fails for silence (however long
//!   either application stalls, so probes and their answers must find credits), and
//!   after a peer vanished the survivor fails with `TimedOut` within its silence limit
//!   plus one tick, after which every wait of it ends.
//!
//! A failure panics with the seed and step; `NET_RS_SIM_SEED=<seed> cargo test --lib
//! sim::replay -- --nocapture` replays it exactly (and prints the trace with
//! `NET_RS_SIM_TRACE=1`). `NET_RS_SIM_SEEDS=<n>` runs more seeds than the default.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use bytes::Bytes;

use super::conn::{
    Connection, Incoming, Limits, RecvBuf, RecvWr, SendWr, Sge, Staged, Stager, Tick,
};
use super::wire::{Imm, WrKind};
use crate::error::{ErrorKind, Result};
use crate::pool::Rng;
use crate::reactor::Completion;

/// `IBV_WC_WR_FLUSH_ERR`.
const FLUSH_ERR: u32 = 5;
const SENDERS: usize = 64;

/// A receive buffer: bytes the simulated device writes into, at a fake address.
#[derive(Clone)]
struct FakeBuf {
    addr: u64,
    data: Rc<RefCell<Vec<u8>>>,
}

impl RecvBuf for FakeBuf {
    fn bytes(&self) -> impl std::ops::Deref<Target = [u8]> + '_ {
        std::cell::Ref::map(self.data.borrow(), |v| v.as_slice())
    }
    fn sge(&self) -> Sge {
        Sge {
            addr: self.addr,
            len: self.data.borrow().len() as u32,
            lkey: 1,
        }
    }
}

/// Registered send memory: bounce slots by address, reused from a free list.
#[derive(Default)]
struct Memory {
    live: HashMap<u64, Vec<u8>>,
    free: Vec<u64>,
    next: u64,
}

/// A staged fragment's slot; freeing it puts the address back on the free list.
struct Slot {
    addr: u64,
    mem: Rc<RefCell<Memory>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.mem.borrow_mut();
        m.live.remove(&self.addr);
        m.free.push(self.addr);
    }
}

struct FakeStager(Rc<RefCell<Memory>>);

impl Stager for FakeStager {
    type Keep = Slot;
    fn stage(&mut self, frag: Bytes) -> Result<Staged<Slot>> {
        let mut m = self.0.borrow_mut();
        let addr = match m.free.pop() {
            Some(a) => a,
            None => {
                m.next += 1;
                0x1000_0000 + (m.next << 24)
            }
        };
        assert!(
            m.live.insert(addr, frag.to_vec()).is_none(),
            "one slot named by two live sends"
        );
        Ok(Staged {
            keep: Slot {
                addr,
                mem: self.0.clone(),
            },
            sge: Sge {
                addr,
                len: frag.len() as u32,
                lkey: 2,
            },
            zero_copy: false,
        })
    }
}

type Core = Connection<FakeBuf, Slot>;

/// One side: the core, its posted receives (in order), its CQ, its application.
struct Side {
    conn: Core,
    stager: FakeStager,
    mem: Rc<RefCell<Memory>>,
    bufs: HashMap<u64, FakeBuf>,
    rq: VecDeque<RecvWr>,
    cq: VecDeque<Completion>,
    /// The QP went to the error state.
    errored: bool,
    app: App,
}

/// What one application does and has seen.
#[derive(Default)]
struct App {
    /// Messages still to send, per task.
    plan: Vec<VecDeque<Bytes>>,
    /// A send waiting for room (its future pending), per task.
    waiting: Vec<Option<Bytes>>,
    /// Accepted messages, in order, as the peer must see them.
    accepted: VecDeque<Bytes>,
    lent: Vec<(u32, FakeBuf)>,
    /// Whether it calls recv at all now (off: it stalls).
    reading: bool,
    shut: bool,
    /// `recv` returned this end (`Closed`, or the error).
    ended: Option<ErrorKind>,
    /// Messages received.
    got: u64,
}

struct Sim {
    rng: Rng,
    seed: u64,
    step: u64,
    sides: [Side; 2],
    /// SENDs posted and not delivered yet, per sending side.
    wire: [VecDeque<SendWr>; 2],
    disconnected: bool,
    lim: [Limits; 2],
    /// Each queue pair's path MTU: side 0 connects, so RDMA-CM gives both sides its
    /// port's MTU, and side 1 clamps it to its own port's (as `cm` does).
    path_mtu: [u32; 2],
    /// Simulated time in ms, and each side's next keepalive tick (`u64::MAX`: off).
    clock: u64,
    next_tick: [u64; 2],
    /// The side that vanished, and the survivor's ticks since.
    vanished: Option<usize>,
    vanish_limit: u32,
    ticks_since_vanish: u32,
    trace: bool,
}

/// A scenario: what the seed exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// A random mix of everything.
    Mixed,
    /// Both sides at depth 16 send many messages larger than a buffer before either
    /// reads (kind 3).
    BothSendFirst,
    /// Send one, receive one, in lockstep (kind 3).
    Lockstep,
    /// A thousand sends outstanding, then a disconnect or close (kind 4).
    Teardown,
    /// 64 tasks share one side, two-fragment messages (kind 5).
    ManyTasks,
}

fn payload(rng: &mut Rng, len: usize, tag: u64) -> Bytes {
    let mut v = vec![0u8; len];
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ rng.next_u64();
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // The first bytes name the task and the message, for the order check.
    if len >= 6 {
        v[..2].copy_from_slice(&((tag >> 32) as u16).to_be_bytes());
        v[2..6].copy_from_slice(&(tag as u32).to_be_bytes());
    }
    Bytes::from(v)
}

impl Sim {
    fn new(seed: u64) -> (Sim, Scenario) {
        let mut rng = Rng::new(seed);
        let scenario = match rng.below(10) {
            0 => Scenario::BothSendFirst,
            1 => Scenario::Lockstep,
            2 => Scenario::Teardown,
            3 => Scenario::ManyTasks,
            _ => Scenario::Mixed,
        };
        let mut lims = [limits(&mut rng, scenario), limits(&mut rng, scenario)];
        if scenario == Scenario::BothSendFirst {
            for l in &mut lims {
                l.depth = 16;
            }
        }
        // Side 0 connects.
        lims[0].initiator = true;

        let path_mtu = [lims[0].port_mtu, lims[0].port_mtu.min(lims[1].port_mtu)];
        let sides = [0, 1].map(|i| {
            let lim = lims[i];
            let mem = Rc::new(RefCell::new(Memory::default()));
            let bufs: Vec<FakeBuf> = (0..lim.depth)
                .map(|k| FakeBuf {
                    addr: 0x10_0000_0000 * (i as u64 + 1) + u64::from(k) * 0x1_0000,
                    data: Rc::new(RefCell::new(vec![0u8; lim.chunk])),
                })
                .collect();
            let map = bufs.iter().map(|b| (b.addr, b.clone())).collect();
            let (mut conn, first) = Connection::new(lim, bufs);
            conn.set_path_mtu(path_mtu[i]);
            Side {
                conn,
                stager: FakeStager(mem.clone()),
                mem,
                bufs: map,
                rq: first.into(),
                cq: VecDeque::new(),
                errored: false,
                app: App::default(),
            }
        });
        let mut sim = Sim {
            rng,
            seed,
            step: 0,
            sides,
            wire: [VecDeque::new(), VecDeque::new()],
            disconnected: false,
            lim: lims,
            path_mtu,
            clock: 0,
            next_tick: [u64::MAX; 2],
            vanished: None,
            vanish_limit: 0,
            ticks_since_vanish: 0,
            trace: std::env::var_os("NET_RS_SIM_TRACE").is_some(),
        };
        sim.plan(scenario);
        for i in 0..2 {
            sim.outputs(i);
            if let Some(ms) = sim.sides[i].conn.first_keepalive_tick() {
                sim.next_tick[i] = u64::from(ms);
            }
        }
        (sim, scenario)
    }

    /// What each application will send.
    fn plan(&mut self, scenario: Scenario) {
        for i in 0..2 {
            let chunk = self.lim[i.min(1)].chunk.min(self.lim[1 - i].chunk);
            let tasks = if scenario == Scenario::ManyTasks && i == 0 {
                SENDERS
            } else {
                1
            };
            let per_task = match scenario {
                Scenario::BothSendFirst => 200,
                Scenario::Teardown => 1000,
                Scenario::ManyTasks if i == 0 => 30,
                Scenario::Lockstep => 150,
                _ => self.rng.below(300) as usize,
            };
            let mut plan = vec![VecDeque::new(); tasks];
            for (t, q) in plan.iter_mut().enumerate() {
                for k in 0..per_task {
                    let len = match scenario {
                        Scenario::BothSendFirst => 3 * chunk,
                        Scenario::ManyTasks => {
                            chunk + 1 + self.rng.below(chunk as u64 - 1) as usize
                        }
                        _ => match self.rng.below(10) {
                            0 => 0,
                            1..=5 => 6 + self.rng.below(chunk as u64) as usize,
                            6..=8 => chunk + self.rng.below(3 * chunk as u64) as usize,
                            _ => self.rng.below(2000) as usize,
                        },
                    };
                    let len = len.min(self.lim[i].max_message_size);
                    let tag = ((t as u64) << 32) | k as u64;
                    q.push_back(payload(&mut self.rng, len, tag));
                }
            }
            let app = &mut self.sides[i].app;
            app.waiting = vec![None; tasks];
            app.plan = plan;
            app.reading = scenario != Scenario::BothSendFirst;
        }
    }

    fn fail(&self, what: &str) -> ! {
        let state: Vec<String> = (0..2)
            .map(|i| {
                let s = &self.sides[i];
                format!(
                    "side {i}: {:?}; {} receives posted, {} completions unpolled, {} sends \
                     on the wire, app: {} accepted not yet received by the peer, {} \
                     waiting, reading {}",
                    s.conn,
                    s.rq.len(),
                    s.cq.len(),
                    self.wire[i].len(),
                    s.app.accepted.len(),
                    s.app.waiting.iter().filter(|w| w.is_some()).count(),
                    s.app.reading
                )
            })
            .collect();
        panic!(
            "simulation seed {} failed at step {}: {what}\n{}\n(replay: NET_RS_SIM_SEED={} \
             cargo test --lib sim::replay -- --nocapture)",
            self.seed,
            self.step,
            state.join("\n"),
            self.seed
        )
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{}] {}", self.step, what());
        }
    }

    /// After an input: post what the core asks for (the shell's job).
    fn outputs(&mut self, i: usize) {
        let side = &mut self.sides[i];
        let mut recvs = Vec::new();
        side.conn.poll_recv_posts(&mut recvs);
        let mut sends = Vec::new();
        side.conn.poll_transmit(&mut side.stager, &mut sends);
        side.conn.take_changed();
        if side.errored {
            // Posting to a QP in the error state completes at once with a flush error.
            for r in recvs {
                side.cq.push_back(flushed(r.wr_id));
            }
            for s in sends {
                side.cq.push_back(flushed(s.wr_id));
            }
            return;
        }
        side.rq.extend(recvs);
        self.wire[i].extend(sends);
        let posted_sends = self.wire[i].len();
        if posted_sends > self.lim[i].sq_depth as usize {
            self.fail(&format!(
                "side {i}: {posted_sends} sends posted, more than the send queue"
            ));
        }
    }

    /// Deliver the next SEND of side `i` to the other side.
    fn deliver(&mut self, i: usize) {
        let j = 1 - i;
        if self.vanished.is_some() && self.vanished != Some(i) && self.vanished != Some(j) {
            unreachable!("two sides");
        }
        if self.vanished.is_some() {
            // Nothing reaches a vanished side or comes from it.
            return;
        }
        let Some(wr) = self.wire[i].pop_front() else {
            return;
        };
        let data = match wr.sge {
            None => Vec::new(),
            Some(sge) => match self.sides[i].mem.borrow().live.get(&sge.addr) {
                Some(d) if d.len() == sge.len as usize => d.clone(),
                _ => self.fail(&format!(
                    "side {i} sends memory at {:#x} that was freed or reused before its \
                     completion",
                    sge.addr
                )),
            },
        };
        let Some(recv) = self.sides[j].rq.pop_front() else {
            let imm = Imm::decode(wr.imm);
            self.fail(&format!(
                "RNR: side {i} sent {imm:?} ({} bytes) with no receive posted at side {j}",
                data.len()
            ));
        };
        let buf = self.sides[j].bufs[&recv.sge.addr].clone();
        if data.len() > buf.data.borrow().len() {
            self.fail(&format!(
                "side {i} sent a {}-byte fragment into a {}-byte receive buffer",
                data.len(),
                buf.data.borrow().len()
            ));
        }
        // The SEND leaves in packets of the path MTU: the first must fit the
        // receiving port's MTU, or the peer's link drops it (and on the device every
        // such message would hang, retried without end).
        let packet = data.len().min(self.path_mtu[i] as usize);
        if packet > self.lim[j].port_mtu as usize {
            self.fail(&format!(
                "side {i} sent a {packet}-byte packet (path MTU {}) to a port of MTU {}",
                self.path_mtu[i], self.lim[j].port_mtu
            ));
        }
        buf.data.borrow_mut()[..data.len()].copy_from_slice(&data);
        self.log(|| {
            format!(
                "deliver {i}->{j} {:?} {} B",
                Imm::decode(wr.imm),
                data.len()
            )
        });
        self.sides[j].cq.push_back(Completion {
            wr_id: recv.wr_id,
            status: 0,
            opcode: 128,
            byte_len: data.len() as u32,
            imm: Some(wr.imm),
        });
        self.sides[i].cq.push_back(Completion::success(wr.wr_id));
    }

    /// Poll up to `max` completions of side `i`, in CQ order.
    fn poll(&mut self, i: usize, max: usize) {
        if self.vanished == Some(i) {
            return;
        }
        let n = self.sides[i].cq.len().min(max);
        for _ in 0..n {
            let c = self.sides[i].cq.pop_front().expect("counted");
            self.sides[i].conn.on_completion(&c);
        }
        if n > 0 {
            self.outputs(i);
        }
    }

    /// The application of side `i` tries to send (or gives up a waiting send).
    fn app_send(&mut self, i: usize) {
        let tasks = self.sides[i].app.plan.len();
        let t = self.rng.below(tasks as u64) as usize;
        let give_up = self.rng.below(20) == 0;
        self.task_send(i, t, give_up);
    }

    /// Task `t` of side `i` sends its next message (or retries its waiting one, or,
    /// with `give_up`, drops the waiting one).
    fn task_send(&mut self, i: usize, t: usize, give_up: bool) {
        let app = &mut self.sides[i].app;
        let msg = match app.waiting[t].take() {
            Some(m) if give_up => {
                // A dropped `send` future: this message was never accepted; the task's
                // later messages follow in order.
                self.log(|| format!("side {i} task {t} gives up a waiting send"));
                drop(m);
                return;
            }
            Some(m) => m,
            None => match app.plan[t].pop_front() {
                Some(m) => m,
                None => return,
            },
        };
        match self.sides[i].conn.queue_send(msg.clone()) {
            Ok(None) => self.sides[i].app.accepted.push_back(msg),
            Ok(Some(back)) => self.sides[i].app.waiting[t] = Some(back),
            Err(e) => {
                if matches!(e.kind(), ErrorKind::MessageTooLarge { .. }) {
                    self.fail(&format!("side {i}: a planned message was refused: {e}"));
                }
                // The connection ended: nothing more goes out.
                self.sides[i].app.plan[t].clear();
            }
        }
        self.outputs(i);
    }

    /// The application of side `i` calls `recv` once.
    fn app_recv(&mut self, i: usize) {
        let j = 1 - i;
        let got = self.sides[i].conn.poll_recv();
        match got {
            None => {}
            Some(Ok(m)) => {
                let (bytes, lent) = match m {
                    Incoming::Lent { idx, buf, len } => {
                        let b = Bytes::copy_from_slice(&buf.bytes()[..len]);
                        (b, Some((idx, buf)))
                    }
                    Incoming::Owned(b) => (b, None),
                };
                let want = self.sides[j].app.accepted.pop_front();
                match want {
                    Some(w) if w == bytes => {}
                    Some(w) => self.fail(&format!(
                        "side {i} received a {}-byte message that is not the next one sent \
                         (expected {} bytes{})",
                        bytes.len(),
                        w.len(),
                        if bytes.len() >= 6 && w.len() >= 6 {
                            format!(", got id {:?}, expected {:?}", &bytes[..6], &w[..6])
                        } else {
                            String::new()
                        }
                    )),
                    None => self.fail(&format!(
                        "side {i} received a {}-byte message that was never accepted",
                        bytes.len()
                    )),
                }
                let app = &mut self.sides[i].app;
                app.got += 1;
                if let Some(l) = lent {
                    app.lent.push(l);
                }
                self.outputs(i);
            }
            Some(Err(e)) => {
                let app = &self.sides[i].app;
                if app.ended.is_none() {
                    if e.kind() == ErrorKind::Closed
                        && !self.disconnected
                        && self.sides[i].conn.lifecycle().peer_ended
                        && !self.sides[j].app.accepted.is_empty()
                    {
                        self.fail(&format!(
                            "side {i}: end of stream before the last {} messages",
                            self.sides[j].app.accepted.len()
                        ));
                    }
                    if e.kind() != ErrorKind::Closed
                        && !self.disconnected
                        && self.vanished.is_none()
                    {
                        self.fail(&format!("side {i}: recv failed without a disconnect: {e}"));
                    }
                }
                self.sides[i].app.ended = Some(e.kind());
            }
        }
    }

    /// The application of side `i` drops one message it held (a lent buffer goes back).
    fn app_drop(&mut self, i: usize) {
        let app = &mut self.sides[i].app;
        if app.lent.is_empty() {
            return;
        }
        let k = self.rng.below(app.lent.len() as u64) as usize;
        let (idx, buf) = app.lent.swap_remove(k);
        self.sides[i].conn.buffer_returned(idx, buf);
        self.outputs(i);
    }

    /// RDMA-CM reports the end: both QPs go to the error state.
    fn disconnect(&mut self) {
        self.log(|| "disconnect".into());
        self.disconnected = true;
        for i in 0..2 {
            if self.sides[i]
                .conn
                .on_disconnect("the peer disconnected".into())
            {
                self.error_qp(i);
            }
        }
    }

    /// Move side `i`'s QP to the error state: everything posted completes, flushed.
    fn error_qp(&mut self, i: usize) {
        let side = &mut self.sides[i];
        side.errored = true;
        for wr in self.wire[i].drain(..) {
            side.cq.push_back(flushed(wr.wr_id));
        }
        for r in side.rq.drain(..) {
            side.cq.push_back(flushed(r.wr_id));
        }
    }

    /// Time moves to the next keepalive tick of either side. The wire first carries
    /// everything in flight between live sides (a network's delay is far below an
    /// interval), so a live peer's answers arrive in time.
    fn tick(&mut self) {
        let i = usize::from(self.next_tick[1] < self.next_tick[0]);
        if self.next_tick[i] == u64::MAX {
            return;
        }
        self.settle_wire();
        self.clock = self.next_tick[i];
        self.next_tick[i] = u64::MAX;
        if self.vanished == Some(i) {
            return;
        }
        if self.vanished.is_some() {
            self.ticks_since_vanish += 1;
        }
        let r = self.sides[i].conn.on_keepalive_tick();
        self.log(|| format!("side {i} keepalive tick at {} ms: {r:?}", self.clock));
        if let Tick::Again { after_ms } = r {
            self.next_tick[i] = self.clock + u64::from(after_ms);
        }
        if r == Tick::Failed {
            if self.vanished.is_none() {
                self.fail(&format!(
                    "side {i}: keepalive failed a connection whose peer is alive"
                ));
            }
            // The shell disconnects: the QP goes to the error state.
            self.error_qp(i);
        }
        self.outputs(i);
    }

    /// Deliver and poll until nothing is in flight between live sides.
    fn settle_wire(&mut self) {
        for _ in 0..100_000 {
            let mut moved = false;
            for i in 0..2 {
                if self.vanished.is_none() && !self.wire[i].is_empty() {
                    self.deliver(i);
                    moved = true;
                }
                if self.vanished != Some(i) && !self.sides[i].cq.is_empty() {
                    self.poll(i, usize::MAX);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        self.fail("the wire never settles");
    }

    /// Side `v`'s host dies silently; the survivor fails after `limit` silent ticks.
    fn vanish(&mut self, v: usize, limit: u32) {
        self.log(|| format!("side {v} vanishes"));
        self.vanished = Some(v);
        self.vanish_limit = limit;
        self.ticks_since_vanish = 0;
    }

    fn check(&self) {
        for i in 0..2 {
            let lim = &self.lim[i];
            let bound = lim.recv_budget + lim.depth as usize * lim.chunk + lim.max_message_size;
            let conn = &self.sides[i].conn;
            if conn.posted_receives() != conn.posted_by_scan() {
                self.fail(&format!(
                    "side {i}: {} receives counted as posted, {} posted",
                    conn.posted_receives(),
                    conn.posted_by_scan()
                ));
            }
            let unread = self.sides[i].conn.unread();
            if unread > bound {
                self.fail(&format!(
                    "side {i}: {unread} unread bytes, over the bound {bound}"
                ));
            }
        }
    }

    fn run(&mut self, scenario: Scenario, steps: u64) {
        let teardown_at = if scenario == Scenario::Teardown {
            Some(self.rng.below(steps / 2) + 200)
        } else if self.rng.below(12) == 0 {
            Some(self.rng.below(steps))
        } else {
            None
        };
        let lockstep = scenario == Scenario::Lockstep;
        // One side vanishes in some seeds, if the other would notice (keepalive on).
        let vanish = self.rng.below(2) as usize;
        let vanish_at = (teardown_at.is_none()
            && self.lim[1 - vanish].keepalive_ms > 0
            && self.rng.below(6) == 0)
            .then(|| self.rng.below(steps));
        for step in 0..steps {
            self.step = step;
            // (Once the survivor judges: before the hello, the handshake timeout of
            // the shell is what ends a silent peer.)
            if vanish_at.is_some_and(|at| step >= at) && self.vanished.is_none() {
                if let Some(limit) = self.sides[1 - vanish].conn.keepalive_limit() {
                    self.vanish(vanish, limit);
                }
            }
            if Some(step) == teardown_at && !self.disconnected {
                if self.rng.below(2) == 0 {
                    self.disconnect();
                } else {
                    let i = self.rng.below(2) as usize;
                    self.log(|| format!("side {i} closes"));
                    self.sides[i].conn.close();
                    // The shell disconnects after close: the peer learns.
                    self.disconnect();
                }
            }
            // Kind 3: nobody reads before every message was accepted (or waits).
            if scenario == Scenario::BothSendFirst
                && self
                    .sides
                    .iter()
                    .all(|s| s.app.plan.iter().all(VecDeque::is_empty))
            {
                for s in &mut self.sides {
                    s.app.reading = true;
                }
            }
            let i = self.rng.below(2) as usize;
            if self.vanished == Some(i) {
                continue;
            }
            if self.rng.below(40) == 0 {
                self.tick();
                self.check();
                continue;
            }
            match self.rng.below(100) {
                0..=24 => self.deliver(i),
                25..=44 => {
                    let max = 1 + self.rng.below(8) as usize;
                    self.poll(i, max);
                }
                // In lockstep a side sends its next message only once the peer has
                // read the previous one.
                45..=64
                    if !lockstep
                        || self.sides[i].app.accepted.len()
                            <= self.sides[1 - i].app.got as usize =>
                {
                    self.app_send(i)
                }
                65..=84 if self.sides[i].app.reading => self.app_recv(i),
                85..=92 => self.app_drop(i),
                // Stall or resume reading.
                93..=94 if scenario == Scenario::Mixed => {
                    let r = &mut self.sides[i].app.reading;
                    *r = !*r;
                }
                95 => {
                    let app = &self.sides[i].app;
                    let done = app.plan.iter().all(VecDeque::is_empty)
                        && app.waiting.iter().all(Option::is_none);
                    if done && !app.shut {
                        self.log(|| format!("side {i} shuts down"));
                        self.sides[i].app.shut = true;
                        self.sides[i].conn.shutdown();
                        self.outputs(i);
                    }
                }
                _ => {}
            }
            self.check();
        }
        self.quiesce();
    }

    /// Stop the applications' random choices: read everything, give every buffer
    /// back, retry waiting sends, deliver and poll until nothing changes. Then every
    /// accepted message must have arrived (no deadlock), and nothing may stay in
    /// flight or allocated.
    fn quiesce(&mut self) {
        for s in &mut self.sides {
            s.app.reading = true;
        }
        if let Some(v) = self.vanished {
            // The survivor must notice within its silence limit plus one tick.
            let u = 1 - v;
            let limit = self.vanish_limit;
            for _ in 0..100_000 {
                if self.sides[u].conn.is_closed() && self.sides[u].errored {
                    break;
                }
                self.tick();
            }
            if !self.sides[u].errored {
                self.fail(&format!("side {u} never noticed that its peer vanished"));
            }
            if self.ticks_since_vanish > limit + 1 {
                self.fail(&format!(
                    "side {u} noticed the vanished peer after {} ticks, limit {limit}",
                    self.ticks_since_vanish
                ));
            }
        }
        let mut idle_rounds = 0;
        let mut rounds = 0;
        while idle_rounds < 3 {
            rounds += 1;
            if rounds > 200_000 {
                self.fail("no quiescence after 200000 rounds");
            }
            let before = self.fingerprint();
            for i in 0..2 {
                if self.vanished == Some(i) {
                    continue;
                }
                while self.vanished.is_none() && !self.wire[i].is_empty() {
                    self.deliver(i);
                }
                self.poll(i, usize::MAX);
                for t in 0..self.sides[i].app.plan.len() {
                    self.task_send(i, t, false);
                }
                for _ in 0..64 {
                    self.app_recv(i);
                }
                while !self.sides[i].app.lent.is_empty() {
                    self.app_drop(i);
                }
            }
            self.check();
            if self.fingerprint() == before {
                idle_rounds += 1;
            } else {
                idle_rounds = 0;
            }
        }
        for i in 0..2 {
            let j = 1 - i;
            let side = &self.sides[i];
            if self.vanished == Some(i) {
                continue;
            }
            if self.vanished.is_some() {
                // The survivor: every wait ended, with the keepalive's `TimedOut` (or
                // the peer's orderly end, if it came before).
                let life = side.conn.lifecycle();
                let orderly = life.peer_ended && side.app.ended == Some(ErrorKind::Closed);
                if side.app.ended != Some(ErrorKind::TimedOut)
                    && !orderly
                    && life.local != super::conn::Local::Closed
                {
                    self.fail(&format!(
                        "side {i}: recv gave {:?} after the peer vanished, not TimedOut",
                        side.app.ended
                    ));
                }
                if side.conn.poll_flush().is_none() {
                    self.fail(&format!(
                        "side {i}: flush still waits after the peer vanished"
                    ));
                }
            } else if !self.disconnected {
                let waiting = side.app.waiting.iter().filter(|w| w.is_some()).count();
                let planned: usize = side.app.plan.iter().map(VecDeque::len).sum();
                if waiting + planned > 0 {
                    self.fail(&format!(
                        "side {i}: {waiting} sends wait and {planned} were never accepted \
                         although both sides run: a deadlock"
                    ));
                }
                if !self.sides[j].app.accepted.is_empty() {
                    self.fail(&format!(
                        "side {i} never received {} accepted messages",
                        self.sides[j].app.accepted.len()
                    ));
                }
                match side.conn.poll_flush() {
                    Some(Ok(())) => {}
                    other => self.fail(&format!("side {i}: flush gives {other:?} at the end")),
                }
            } else {
                // After a disconnect every wait ends: recv and flush answer.
                if side.app.ended.is_none()
                    && side.conn.lifecycle().local != super::conn::Local::Closed
                {
                    self.fail(&format!("side {i}: recv still waits after the disconnect"));
                }
                if side.conn.poll_flush().is_none() {
                    self.fail(&format!("side {i}: flush still waits after the disconnect"));
                }
            }
            if side.conn.sends_in_flight() != 0 || !side.mem.borrow().live.is_empty() {
                self.fail(&format!(
                    "side {i}: {} sends in flight and {} bounce slots live at the end",
                    side.conn.sends_in_flight(),
                    side.mem.borrow().live.len()
                ));
            }
        }
    }

    fn fingerprint(&self) -> (usize, usize, u64, u64, usize, usize) {
        (
            self.wire[0].len() + self.wire[1].len(),
            self.sides[0].cq.len() + self.sides[1].cq.len(),
            self.sides[0].app.got,
            self.sides[1].app.got,
            self.sides[0].app.accepted.len() + self.sides[1].app.accepted.len(),
            self.sides[0].conn.queued() + self.sides[1].conn.queued(),
        )
    }
}

fn flushed(wr_id: u64) -> Completion {
    Completion {
        wr_id,
        status: FLUSH_ERR,
        opcode: 0,
        byte_len: 0,
        imm: None,
    }
}

fn limits(rng: &mut Rng, scenario: Scenario) -> Limits {
    let chunk = [64usize, 100, 256, 512][rng.below(4) as usize];
    let depth = 3 + rng.below(30) as u32;
    Limits {
        depth,
        chunk,
        max_message_size: 4000,
        send_buffer: if scenario == Scenario::BothSendFirst || scenario == Scenario::Teardown {
            1 << 30
        } else {
            1 + rng.below(20_000) as usize
        },
        recv_budget: rng.below(4000) as usize,
        sq_depth: 4 + rng.below(60) as u32,
        cork_in_flight: 1 + rng.below(8) as u32,
        port_mtu: [256, 512, 1024, 4096][rng.below(4) as usize],
        initiator: false,
        keepalive_ms: [0, 1000, 2000, 5000][rng.below(4) as usize],
        keepalive_misses: 2 + rng.below(3) as u32,
    }
}

fn run_seed(seed: u64, steps: u64) {
    let (mut sim, scenario) = Sim::new(seed);
    sim.log(|| format!("seed {seed}: {scenario:?}, limits {:?}", sim.lim));
    sim.run(scenario, steps);
}

/// Seeds in CI: a fixed budget. `NET_RS_SIM_SEEDS=<n>` runs more (the longer run for
/// local use), `NET_RS_SIM_FIRST=<seed>` starts elsewhere.
#[test]
fn seeds() {
    let n: u64 = std::env::var("NET_RS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(miri) { 2 } else { 1000 });
    let first: u64 = std::env::var("NET_RS_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in first..first + n {
        run_seed(seed, 4000);
    }
}

/// Replay one seed: `NET_RS_SIM_SEED=<seed>` (with `NET_RS_SIM_TRACE=1` for the steps).
#[test]
fn replay() {
    if let Some(seed) = std::env::var("NET_RS_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_seed(seed, 4000);
    }
}

/// The simulation finds what it is meant to find: a core that ignored credits would
/// cause RNR, and it says so with the seed.
#[test]
fn the_simulation_catches_a_send_without_credit() {
    let (mut sim, _) = Sim::new(7);
    // Forge a SEND the core never posted: no receive can be waiting for it forever.
    for _ in 0..10_000 {
        sim.wire[0].push_back(SendWr {
            wr_id: WrKind::Control.to_u64(),
            imm: 0x0002_0000,
            sge: None,
        });
    }
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..10_000 {
            sim.deliver(0);
        }
    }));
    let msg = caught.expect_err("RNR must be reported");
    let text = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("RNR") && text.contains("seed 7"), "{text}");
}
