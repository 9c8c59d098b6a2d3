//! The protocol's own cost: two connection cores through an in-memory wire, on one
//! thread, no verbs. Run by `cargo run --release --example core_bench`.
//!
//! Both ends' protocol work runs on the one core that is measured (sender and
//! receiver), so a figure here is the cost of a message end to end. The "device" moves
//! each SEND's fragment into the next posted receive of the peer (a `memcpy` of its
//! bytes, as the NIC's DMA would) and reports both completions; the receiving
//! application takes each message and drops it at once, which gives its buffer back.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::conn::{Connection, Incoming, Limits, RecvBuf, RecvWr, SendWr, Sge, Staged, Stager};
use crate::error::Result;
use crate::reactor::Completion;

/// A receive buffer the in-memory "device" writes into.
struct MemBuf {
    addr: u64,
    data: Rc<RefCell<Box<[u8]>>>,
}

impl RecvBuf for MemBuf {
    fn bytes(&self) -> impl std::ops::Deref<Target = [u8]> + '_ {
        std::cell::Ref::map(self.data.borrow(), |b| &b[..])
    }
    fn sge(&self) -> Sge {
        Sge {
            addr: self.addr,
            len: self.data.borrow().len() as u32,
            lkey: 0,
        }
    }
}

/// Stages a fragment where it is (as for registered memory). The simulated device
/// holds the `Bytes` until it has read them (in posting order), as a NIC reads a
/// fragment before it completes it; the core's in-flight entry keeps nothing more.
struct InPlace(VecDeque<Bytes>);

impl Stager for InPlace {
    type Keep = ();
    fn stage(&mut self, frag: Bytes) -> Result<Staged<()>> {
        let sge = Sge {
            addr: frag.as_ptr() as u64,
            len: frag.len() as u32,
            lkey: 0,
        };
        self.0.push_back(frag);
        Ok(Staged {
            keep: (),
            sge,
            zero_copy: true,
        })
    }
}

struct End {
    conn: Connection<MemBuf, ()>,
    bufs: Vec<Rc<RefCell<Box<[u8]>>>>,
    rq: VecDeque<RecvWr>,
    cq: VecDeque<Completion>,
    stager: InPlace,
    sends: Vec<SendWr>,
    recvs: Vec<RecvWr>,
}

fn end(lim: Limits) -> End {
    let bufs: Vec<Rc<RefCell<Box<[u8]>>>> = (0..lim.depth)
        .map(|_| Rc::new(RefCell::new(vec![0u8; lim.chunk].into_boxed_slice())))
        .collect();
    let mem = bufs
        .iter()
        .enumerate()
        .map(|(i, d)| MemBuf {
            addr: i as u64,
            data: d.clone(),
        })
        .collect();
    let (conn, first) = Connection::new(lim, mem);
    End {
        conn,
        bufs,
        rq: first.into(),
        cq: VecDeque::with_capacity(2048),
        stager: InPlace(VecDeque::with_capacity(1024)),
        sends: Vec::with_capacity(1024),
        recvs: Vec::with_capacity(1024),
    }
}

/// Post what `e` asks for; deliver its SENDs into `peer`. Returns whether anything moved.
fn transmit(e: &mut End, peer: &mut End) -> bool {
    e.recvs.clear();
    e.conn.poll_recv_posts(&mut e.recvs);
    e.rq.extend(e.recvs.drain(..));
    e.sends.clear();
    e.conn.poll_transmit(&mut e.stager, &mut e.sends);
    for wr in &e.sends {
        let recv = peer
            .rq
            .pop_front()
            .expect("a receive is posted for every SEND (credits)");
        let len = match wr.sge {
            Some(_) => {
                let frag = e.stager.0.pop_front().expect("one fragment per SEND");
                let buf = &peer.bufs[recv.sge.addr as usize];
                buf.borrow_mut()[..frag.len()].copy_from_slice(&frag);
                frag.len()
            }
            None => 0,
        };
        peer.cq.push_back(Completion {
            wr_id: recv.wr_id,
            status: 0,
            opcode: 128,
            byte_len: len as u32,
            imm: Some(wr.imm),
        });
        e.cq.push_back(Completion::success(wr.wr_id));
    }
    !e.sends.is_empty()
}

fn poll(e: &mut End) -> bool {
    let any = !e.cq.is_empty();
    while let Some(c) = e.cq.pop_front() {
        e.conn.on_completion(&c);
    }
    any
}

/// Take every message waiting at `e` and drop it (a lent buffer goes back at once).
fn consume(e: &mut End) -> u64 {
    let mut n = 0;
    while let Some(Ok(m)) = e.conn.poll_recv() {
        if let Incoming::Lent { idx, buf, .. } = m {
            e.conn.buffer_returned(idx, buf);
        }
        n += 1;
    }
    n
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct CoreBench {
    /// Messages delivered.
    pub messages: u64,
    /// Time they took (both ends' protocol work, one thread).
    pub elapsed: Duration,
}

impl CoreBench {
    /// Messages per second on the one core.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
    /// Nanoseconds per message (both ends).
    pub fn ns_per_message(&self) -> f64 {
        self.elapsed.as_nanos() as f64 / self.messages as f64
    }
}

fn limits() -> Limits {
    Limits {
        depth: 512,
        chunk: 4096,
        max_message_size: 8 << 20,
        send_buffer: 4 << 20,
        recv_budget: 4 << 20,
        sq_depth: 512,
        cork_in_flight: 8,
        port_mtu: 4096,
        initiator: false,
        keepalive_ms: 0,
        keepalive_misses: 3,
    }
}

/// Two connected cores and a message to send between them.
#[allow(missing_debug_implementations)]
pub struct Bench {
    a: End,
    b: End,
    msg: Bytes,
    ping_pong: bool,
}

impl Bench {
    /// Messages of `size` bytes from one core to the other: one way (a stream), or
    /// ping-pong (each message answered before the next goes). Runs the hellos.
    pub fn new(size: usize, ping_pong: bool) -> Bench {
        let (mut a, mut b) = (end(limits()), end(limits()));
        for _ in 0..4 {
            transmit(&mut a, &mut b);
            transmit(&mut b, &mut a);
            poll(&mut a);
            poll(&mut b);
        }
        Bench {
            a,
            b,
            msg: Bytes::from(vec![0x5Au8; size]),
            ping_pong,
        }
    }

    /// Move `n` messages (round trips, in ping-pong) and time it.
    pub fn run(&mut self, n: u64) -> CoreBench {
        let t0 = Instant::now();
        let messages = self.go(n);
        CoreBench {
            messages,
            elapsed: t0.elapsed(),
        }
    }

    fn go(&mut self, n: u64) -> u64 {
        let Bench {
            a,
            b,
            msg,
            ping_pong,
        } = self;
        let mut got = 0u64;
        let mut sent = 0u64;
        while got < n {
            if *ping_pong {
                if sent == got {
                    let left = a.conn.queue_send(msg.clone()).expect("send");
                    assert!(left.is_none(), "one message in flight is always accepted");
                    sent += 1;
                }
            } else {
                while sent < n {
                    match a.conn.queue_send(msg.clone()).expect("send") {
                        None => sent += 1,
                        Some(_) => break,
                    }
                }
            }
            transmit(a, b);
            poll(b);
            let k = consume(b);
            if *ping_pong {
                for _ in 0..k {
                    let left = b.conn.queue_send(msg.clone()).expect("reply");
                    assert!(left.is_none(), "one reply in flight is always accepted");
                }
            }
            transmit(b, a);
            poll(a);
            got += if *ping_pong { consume(a) } else { k };
        }
        got
    }
}
