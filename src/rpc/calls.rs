//! The client's calls on one connection, as a sans-IO state machine: which requests are
//! open, who reads the transport, what a reply is for.
//!
//! No locks, no clock, no I/O: the client ([`super::client`]) holds it under a mutex,
//! feeds it what happened (a request sent, a message received, a caller gone) and
//! does what it answers (wake a waker, send a cancel) after releasing the lock. `W` is
//! what the shell wakes a waiting call with (a `Waker`; tests use numbers).
//!
//! # Slots
//! Each call holds one *slot* from [`begin`](Calls::begin) until its answer has been
//! taken, or, if its caller gave up (dropped the call, or its timeout passed) after the
//! request went out, until the server's answer to it arrives: the server answers every
//! request exactly once (see [`super::wire`]), so an abandoned slot is a tombstone that
//! the late answer clears, and that answer is never given to anyone else. Slots are
//! bounded ([`limit`](Calls::new)): that bounds the memory of a connection's calls and
//! is the backpressure of a client whose server is slow.
//!
//! # The reader
//! There is no background task: a call waiting for its answer reads the transport for
//! every call (the *reader*, one at a time), hands each reply to its slot and wakes its
//! caller. When the reader has its own answer, or gives up, it hands the role to another
//! waiting call ([`wait`](Calls::wait) returns [`Wait::Read`] to the one that takes it).
//! With one call in flight, the caller reads its own reply: no task switch.
//!
//! A caller waiting for a slot reads too when nobody else does
//! ([`begin`](Calls::begin) returns [`Begin::Read`], the reader is then
//! [`WINDOW`]): when every slot is a given-up call's, only their late answers can free
//! one, and no call of theirs is left to read them. A reader that stops with no call
//! to hand the role to says so ([`Release::Released`]): the shell then wakes a caller
//! waiting for a slot, which takes the role if it still needs it.

use std::collections::HashMap;

use bytes::Bytes;

use super::status::Status;
use super::wire::{Header, Kind};
use crate::error::Error;

/// One call's slot.
#[derive(Debug)]
enum Slot<W> {
    /// Reserved; its request has not been accepted by the transport (yet).
    Unsent { method: u16 },
    /// Sent; no answer yet. The waker of the caller, once it waits.
    Waiting { method: u16, waker: Option<W> },
    /// The answer, for the caller to take.
    Answered(Result<Bytes, Status>),
    /// The caller gave up after sending: the answer is discarded when it comes.
    Abandoned,
}

/// The reader id of a caller waiting for a slot (request ids start at 1).
pub(crate) const WINDOW: u64 = 0;

/// Why [`Calls::begin`] gave no slot.
#[derive(Debug)]
pub(crate) enum Begin {
    /// Every slot is taken: wait until one is freed.
    Full,
    /// Every slot is taken and nobody reads: the caller is the reader now ([`WINDOW`]),
    /// to read answers until a slot is freed, then [`stop_reading`](Calls::stop_reading).
    Read,
    /// The connection failed: every call fails with this.
    Failed(Status),
}

/// What [`Calls::stop_reading`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Release<W> {
    /// The caller was not the reader.
    NotReader,
    /// The role goes to the call with this waker (it takes it when polled).
    HandedTo(W),
    /// No call waits to take it: wake a caller waiting for a slot.
    Released,
}

impl<W> Release<W> {
    /// Whether nobody reads now.
    pub(crate) fn released(&self) -> bool {
        matches!(self, Release::Released)
    }
}

/// What a waiting call does next ([`Calls::wait`]).
#[derive(Debug)]
pub(crate) enum Wait {
    /// Its answer (the slot is freed).
    Done(Result<Bytes, Status>),
    /// It is the reader now: read the transport and feed what comes to
    /// [`on_message`](Calls::on_message).
    Read,
    /// Another call reads; its waker is stored and will be woken.
    Pending,
}

/// What [`Calls::on_message`] found.
#[derive(Debug)]
pub(crate) enum Incoming<W> {
    /// A reply for a waiting call: wake this (`None`: the caller is the reader itself,
    /// or has not waited yet).
    Answer(Option<W>),
    /// The late answer of a call whose caller gave up: dropped, its slot freed.
    Discarded,
    /// Not a valid reply (unknown or repeated id, not a reply, malformed): the
    /// connection cannot be trusted. Every call has failed; wake these.
    Protocol(Vec<W>),
}

/// The calls of one connection.
#[derive(Debug)]
pub(crate) struct Calls<W> {
    slots: HashMap<u64, Slot<W>>,
    /// The next request id (ids count up from 1 and are never reused).
    next_id: u64,
    limit: usize,
    /// The call reading the transport.
    reader: Option<u64>,
    /// Why the connection failed; every open and later call fails with it.
    failed: Option<Status>,
    /// Cancels to tell the server (request id, method), if the client sends them.
    cancels: Vec<(u64, u16)>,
    send_cancels: bool,
}

impl<W> Calls<W> {
    /// At most `limit` (at least 1) open calls; `send_cancels`: whether a call given up
    /// after its request went out queues a cancel for the server.
    pub(crate) fn new(limit: usize, send_cancels: bool) -> Self {
        Calls {
            slots: HashMap::new(),
            next_id: 1,
            limit: limit.max(1),
            reader: None,
            failed: None,
            cancels: Vec::new(),
            send_cancels,
        }
    }

    /// Slots taken (calls open, including the abandoned ones still owed an answer).
    pub(crate) fn open(&self) -> usize {
        self.slots.len()
    }

    /// Why the connection failed, if it has.
    pub(crate) fn failed(&self) -> Option<&Status> {
        self.failed.as_ref()
    }

    /// Take a slot for a new call of `method`: its request id.
    pub(crate) fn begin(&mut self, method: u16) -> Result<u64, Begin> {
        if let Some(s) = &self.failed {
            return Err(Begin::Failed(s.clone()));
        }
        if self.slots.len() >= self.limit {
            if self.reader.is_none() {
                self.reader = Some(WINDOW);
                return Err(Begin::Read);
            }
            return Err(Begin::Full);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.slots.insert(id, Slot::Unsent { method });
        Ok(id)
    }

    /// The transport accepted the request of `id`: an answer is owed now.
    pub(crate) fn sent(&mut self, id: u64) {
        if let Some(slot) = self.slots.get_mut(&id) {
            if let Slot::Unsent { method } = *slot {
                *slot = Slot::Waiting {
                    method,
                    waker: None,
                };
            }
        }
    }

    /// The call `id`, waiting for its answer, is polled with `waker`.
    pub(crate) fn wait(&mut self, id: u64, waker: W) -> Wait {
        match self.slots.get_mut(&id) {
            Some(Slot::Answered(_)) => {
                let Some(Slot::Answered(r)) = self.slots.remove(&id) else {
                    unreachable!("just matched")
                };
                Wait::Done(r)
            }
            Some(Slot::Waiting { waker: w, .. }) => {
                if let Some(s) = &self.failed {
                    let s = s.clone();
                    self.slots.remove(&id);
                    return Wait::Done(Err(s));
                }
                match self.reader {
                    None => {
                        self.reader = Some(id);
                        *w = None;
                        Wait::Read
                    }
                    Some(r) if r == id => Wait::Read,
                    Some(_) => {
                        *w = Some(waker);
                        Wait::Pending
                    }
                }
            }
            // Not sent, abandoned or unknown: a shell bug; fail this call alone.
            _ => Wait::Done(Err(Status::internal(format!(
                "call {id} waited without an open request"
            )))),
        }
    }

    /// The caller `id` (a call's, or [`WINDOW`]) stops reading, or leaves: it has its
    /// answer or its slot, or it gave up. If it was the reader, or nobody reads (it
    /// may have been woken to take the role and left before taking it), the role goes
    /// to a waiting call if there is one.
    pub(crate) fn stop_reading(&mut self, id: u64) -> Release<W> {
        match self.reader {
            Some(r) if r != id => return Release::NotReader,
            _ => {}
        }
        self.reader = None;
        // Wake one waiting call: it takes the role when polled.
        let next = self.slots.values_mut().find_map(|s| match s {
            Slot::Waiting { waker, .. } => waker.take(),
            _ => None,
        });
        match next {
            Some(w) => Release::HandedTo(w),
            None => Release::Released,
        }
    }

    /// The caller of `id` is gone (its future dropped, or its timeout passed), before
    /// or after taking its answer. Returns whether a slot was freed, and what became of
    /// the reader's role if `id` was reading.
    pub(crate) fn abandon(&mut self, id: u64) -> (bool, Release<W>) {
        let handoff = self.stop_reading(id);
        let freed = match self.slots.get(&id) {
            None => false,
            Some(Slot::Unsent { .. } | Slot::Answered(_)) => {
                self.slots.remove(&id);
                true
            }
            Some(Slot::Waiting { method, .. }) => {
                if self.failed.is_some() {
                    self.slots.remove(&id);
                    true
                } else {
                    if self.send_cancels {
                        self.cancels.push((id, *method));
                    }
                    self.slots.insert(id, Slot::Abandoned);
                    false
                }
            }
            Some(Slot::Abandoned) => false,
        };
        (freed, handoff)
    }

    /// The transport did not accept the request of `id` (its `send` failed or was
    /// cancelled): the slot is freed, nothing is owed.
    pub(crate) fn unsent(&mut self, id: u64) -> bool {
        if matches!(self.slots.get(&id), Some(Slot::Unsent { .. })) {
            self.slots.remove(&id);
            return true;
        }
        false
    }

    /// Cancels to send to the server (request id, method), oldest first.
    pub(crate) fn take_cancels(&mut self) -> Vec<(u64, u16)> {
        std::mem::take(&mut self.cancels)
    }

    /// A message arrived from the server.
    pub(crate) fn on_message(&mut self, msg: Bytes) -> Incoming<W> {
        let (h, payload) = match Header::decode(msg) {
            Ok(x) => x,
            Err(e) => return self.protocol(format!("the server sent {e}")),
        };
        if h.kind != Kind::Reply {
            return self.protocol(format!(
                "the server sent a {:?} (id {}) where only replies may come",
                h.kind, h.id
            ));
        }
        let answer = Status::answer(h.word, payload);
        match self.slots.get_mut(&h.id) {
            Some(Slot::Waiting { method, waker }) if *method == h.method => {
                let w = waker.take();
                self.slots.insert(h.id, Slot::Answered(answer));
                Incoming::Answer(w)
            }
            // The request reached the server before its sender saw `send` complete
            // (another thread read the answer first): it was sent.
            Some(Slot::Unsent { method }) if *method == h.method => {
                self.slots.insert(h.id, Slot::Answered(answer));
                Incoming::Answer(None)
            }
            Some(Slot::Abandoned) => {
                self.slots.remove(&h.id);
                Incoming::Discarded
            }
            Some(Slot::Waiting { method, .. } | Slot::Unsent { method }) => {
                let m = *method;
                self.protocol(format!(
                    "the server answered request {} with method {} (it was {m})",
                    h.id, h.method
                ))
            }
            _ if h.id >= self.next_id => self.protocol(format!(
                "the server answered request {}, which was never sent",
                h.id
            )),
            _ => self.protocol(format!(
                "the server answered request {} again (or before it was sent)",
                h.id
            )),
        }
    }

    fn protocol(&mut self, why: String) -> Incoming<W> {
        let s = Status::internal(format!("RPC protocol error: {why}"));
        Incoming::Protocol(self.fail_with(s))
    }

    /// The connection failed (`recv` or `send` returned a fatal error): every open and
    /// later call fails with it. The wakers of the waiting calls.
    pub(crate) fn fail(&mut self, err: Error) -> Vec<W> {
        self.fail_with(Status::from_transport(err))
    }

    fn fail_with(&mut self, s: Status) -> Vec<W> {
        if self.failed.is_none() {
            self.failed = Some(s);
        }
        self.reader = None;
        self.cancels.clear();
        let mut wakers = Vec::new();
        self.slots.retain(|_, slot| match slot {
            Slot::Waiting { waker, .. } => {
                wakers.extend(waker.take());
                true
            }
            // Nobody waits for these any more.
            Slot::Abandoned => false,
            Slot::Unsent { .. } | Slot::Answered(_) => true,
        });
        wakers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::wire::{Code, HEADER_LEN};
    use crate::ErrorKind;

    fn reply(id: u64, method: u16, code: Code, body: &[u8]) -> Bytes {
        let mut m = Header {
            kind: Kind::Reply,
            method,
            id,
            word: code.as_u32(),
        }
        .to_bytes()
        .to_vec();
        m.extend_from_slice(body);
        Bytes::from(m)
    }

    fn sent(c: &mut Calls<u32>, method: u16) -> u64 {
        let id = c.begin(method).unwrap();
        c.sent(id);
        id
    }

    #[test]
    fn replies_out_of_order_reach_their_own_calls() {
        let mut c = Calls::<u32>::new(8, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 2);
        assert!(matches!(c.wait(a, 10), Wait::Read));
        assert!(matches!(c.wait(b, 20), Wait::Pending));
        // b's reply first: the reader wakes b.
        assert!(matches!(
            c.on_message(reply(b, 2, Code::Ok, b"B")),
            Incoming::Answer(Some(20))
        ));
        assert!(matches!(c.wait(b, 21), Wait::Done(Ok(ref r)) if &r[..] == b"B"));
        // a's own reply: nobody to wake (a reads), a takes it.
        assert!(matches!(
            c.on_message(reply(a, 1, Code::Ok, b"A")),
            Incoming::Answer(None)
        ));
        assert!(matches!(c.wait(a, 11), Wait::Done(Ok(ref r)) if &r[..] == b"A"));
        assert_eq!(c.stop_reading(a), Release::Released);
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn an_error_status_reaches_its_call_with_its_message() {
        let mut c = Calls::<u32>::new(8, true);
        let a = sent(&mut c, 1);
        c.on_message(reply(a, 1, Code::NotFound, b"no such key"));
        match c.wait(a, 1) {
            Wait::Done(Err(s)) => {
                assert_eq!(s.code(), Code::NotFound);
                assert_eq!(s.message(), "no such key");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_reader_hands_its_role_to_a_waiting_call() {
        let mut c = Calls::<u32>::new(8, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 1);
        assert!(matches!(c.wait(a, 10), Wait::Read));
        assert!(matches!(c.wait(b, 20), Wait::Pending));
        c.on_message(reply(a, 1, Code::Ok, b""));
        assert!(matches!(c.wait(a, 10), Wait::Done(Ok(_))));
        assert_eq!(c.stop_reading(a), Release::HandedTo(20));
        assert!(matches!(c.wait(b, 20), Wait::Read));
    }

    #[test]
    fn a_reader_that_gives_up_hands_its_role_on() {
        let mut c = Calls::<u32>::new(8, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 1);
        assert!(matches!(c.wait(a, 10), Wait::Read));
        assert!(matches!(c.wait(b, 20), Wait::Pending));
        assert_eq!(c.abandon(a), (false, Release::HandedTo(20)));
        assert!(matches!(c.wait(b, 20), Wait::Read));
    }

    #[test]
    fn a_call_woken_to_read_that_leaves_before_reading_passes_the_role_on() {
        let mut c = Calls::<u32>::new(8, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 1);
        let d = sent(&mut c, 1);
        assert!(matches!(c.wait(a, 10), Wait::Read));
        assert!(matches!(c.wait(b, 20), Wait::Pending));
        assert!(matches!(c.wait(d, 30), Wait::Pending));
        c.on_message(reply(a, 1, Code::Ok, b""));
        assert!(matches!(c.wait(a, 10), Wait::Done(Ok(_))));
        let first = c.stop_reading(a);
        let Release::HandedTo(w) = first else {
            panic!("{first:?}")
        };
        // The woken call goes away without polling (its timer fired too): the role
        // must reach the other waiting call, or nobody reads for it.
        let gone = if w == 20 { b } else { d };
        let (_, release) = c.abandon(gone);
        let Release::HandedTo(next) = release else {
            panic!("the role was lost: {release:?}")
        };
        assert_ne!(next, w);
        // And the same when the woken call finds its answer there and leaves.
        let mut c = Calls::<u32>::new(8, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 1);
        let d = sent(&mut c, 1);
        assert!(matches!(c.wait(a, 10), Wait::Read));
        assert!(matches!(c.wait(b, 20), Wait::Pending));
        assert!(matches!(c.wait(d, 30), Wait::Pending));
        c.on_message(reply(b, 1, Code::Ok, b""));
        c.on_message(reply(a, 1, Code::Ok, b""));
        assert!(matches!(c.wait(a, 10), Wait::Done(Ok(_))));
        assert_eq!(
            c.stop_reading(a),
            Release::HandedTo(30),
            "b's waker went with its answer"
        );
        // d was woken to read; b, answered, is polled first and leaves: nobody reads
        // until d is polled, which it will be (it was woken).
        assert!(matches!(c.wait(b, 20), Wait::Done(Ok(_))));
        assert_eq!(c.stop_reading(b), Release::Released);
        assert!(matches!(c.wait(d, 30), Wait::Read));
    }

    #[test]
    fn a_late_reply_of_an_abandoned_call_reaches_nobody_and_frees_its_slot() {
        let mut c = Calls::<u32>::new(2, true);
        let a = sent(&mut c, 7);
        assert_eq!(c.abandon(a), (false, Release::Released));
        assert_eq!(c.take_cancels(), vec![(a, 7)]);
        // The slot is held until the answer: the window is still 1 of 2 taken.
        let b = sent(&mut c, 7);
        assert!(matches!(c.wait(b, 20), Wait::Read));
        assert!(
            matches!(c.begin(7), Err(Begin::Full)),
            "b reads: full, nothing to read"
        );
        assert!(matches!(
            c.on_message(reply(a, 7, Code::Ok, b"late")),
            Incoming::Discarded
        ));
        assert_eq!(c.open(), 1);
        c.on_message(reply(b, 7, Code::Ok, b"mine"));
        assert!(matches!(c.wait(b, 20), Wait::Done(Ok(ref r)) if &r[..] == b"mine"));
    }

    #[test]
    fn a_caller_waiting_for_a_slot_reads_when_every_slot_is_given_up() {
        let mut c = Calls::<u32>::new(2, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 1);
        assert_eq!(c.abandon(a), (false, Release::Released));
        assert_eq!(c.abandon(b), (false, Release::Released));
        // Nobody is left to read the late answers but the caller that wants a slot.
        assert!(matches!(c.begin(1), Err(Begin::Read)));
        assert!(
            matches!(c.begin(1), Err(Begin::Full)),
            "one reader at a time"
        );
        assert!(matches!(
            c.on_message(reply(a, 1, Code::Ok, b"")),
            Incoming::Discarded
        ));
        let id = c.begin(1).expect("a slot was freed");
        assert_eq!(c.stop_reading(WINDOW), Release::Released);
        c.sent(id);
        // The new call reads for itself, and clears the other tombstone on the way.
        assert!(matches!(c.wait(id, 7), Wait::Read));
        assert!(matches!(
            c.on_message(reply(b, 1, Code::Ok, b"")),
            Incoming::Discarded
        ));
        c.on_message(reply(id, 1, Code::Ok, b"mine"));
        assert!(matches!(c.wait(id, 7), Wait::Done(Ok(ref r)) if &r[..] == b"mine"));
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn a_window_reader_hands_the_role_to_a_waiting_call() {
        let mut c = Calls::<u32>::new(2, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 1);
        c.abandon(a);
        assert!(matches!(c.begin(1), Err(Begin::Read)));
        // b waits meanwhile: the window reader reads for it.
        assert!(matches!(c.wait(b, 20), Wait::Pending));
        assert!(matches!(
            c.on_message(reply(b, 1, Code::Ok, b"")),
            Incoming::Answer(Some(20))
        ));
        assert!(matches!(
            c.on_message(reply(a, 1, Code::Ok, b"")),
            Incoming::Discarded
        ));
        let _id = c.begin(1).unwrap();
        assert_eq!(c.stop_reading(WINDOW), Release::Released);
        assert!(matches!(c.wait(b, 20), Wait::Done(Ok(_))));
    }

    #[test]
    fn cancels_are_queued_only_when_asked_for_and_only_for_sent_requests() {
        let mut c = Calls::<u32>::new(4, false);
        let a = sent(&mut c, 1);
        c.abandon(a);
        assert!(c.take_cancels().is_empty());
        let mut c = Calls::<u32>::new(4, true);
        let u = c.begin(1).unwrap();
        assert_eq!(
            c.abandon(u),
            (true, Release::Released),
            "unsent: freed at once"
        );
        assert!(c.take_cancels().is_empty());
        let d = sent(&mut c, 1);
        c.on_message(reply(d, 1, Code::Ok, b""));
        assert_eq!(
            c.abandon(d),
            (true, Release::Released),
            "answered: freed at once"
        );
        assert!(c.take_cancels().is_empty());
    }

    #[test]
    fn an_answer_may_come_before_its_sender_saw_the_send_complete() {
        let mut c = Calls::<u32>::new(4, true);
        let a = c.begin(5).unwrap();
        assert!(matches!(
            c.on_message(reply(a, 5, Code::Ok, b"quick")),
            Incoming::Answer(None)
        ));
        c.sent(a);
        assert!(matches!(c.wait(a, 1), Wait::Done(Ok(ref r)) if &r[..] == b"quick"));
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn a_send_that_did_not_happen_frees_its_slot() {
        let mut c = Calls::<u32>::new(1, true);
        let a = c.begin(1).unwrap();
        assert!(matches!(c.begin(1), Err(Begin::Read)));
        assert_eq!(c.stop_reading(WINDOW), Release::Released);
        assert!(c.unsent(a));
        assert!(c.begin(1).is_ok());
    }

    #[test]
    fn unknown_repeated_and_mismatched_ids_are_protocol_errors() {
        for bad in 0..5 {
            let mut c = Calls::<u32>::new(8, true);
            let a = sent(&mut c, 1);
            let b = sent(&mut c, 1);
            assert!(matches!(c.wait(a, 10), Wait::Read));
            assert!(matches!(c.wait(b, 20), Wait::Pending));
            let msg = match bad {
                0 => reply(99, 1, Code::Ok, b""),
                1 => {
                    c.on_message(reply(a, 1, Code::Ok, b""));
                    assert!(matches!(c.wait(a, 10), Wait::Done(Ok(_))));
                    reply(a, 1, Code::Ok, b"")
                }
                2 => reply(b, 2, Code::Ok, b""),
                3 => {
                    let mut m = reply(b, 1, Code::Ok, b"").to_vec();
                    m[0] = 1; // a request, not a reply
                    Bytes::from(m)
                }
                _ => Bytes::from_static(&[2; HEADER_LEN - 1]),
            };
            match c.on_message(msg) {
                Incoming::Protocol(wakers) => {
                    let s = c.failed().expect("failed").clone();
                    assert_eq!(s.code(), Code::Internal, "case {bad}");
                    assert!(s.message().contains("protocol"), "{s}");
                    assert_eq!(wakers, vec![20], "case {bad}");
                }
                other => panic!("case {bad}: {other:?}"),
            }
            assert!(matches!(c.wait(b, 20), Wait::Done(Err(ref s)) if s.code() == Code::Internal));
            assert!(matches!(c.begin(1), Err(Begin::Failed(_))));
        }
    }

    #[test]
    fn a_lost_connection_fails_every_open_and_later_call() {
        let mut c = Calls::<u32>::new(8, true);
        let a = sent(&mut c, 1);
        let b = sent(&mut c, 1);
        let u = c.begin(1).unwrap();
        let gone = sent(&mut c, 1);
        c.abandon(gone);
        assert!(matches!(c.wait(a, 10), Wait::Read));
        assert!(matches!(c.wait(b, 20), Wait::Pending));
        let wakers = c.fail(Error::new(ErrorKind::ConnectionReset, "reset by peer"));
        assert_eq!(wakers, vec![20]);
        for id in [a, b] {
            match c.wait(id, 0) {
                Wait::Done(Err(s)) => {
                    assert_eq!(s.code(), Code::Unavailable);
                    assert!(s.message().contains("reset by peer"), "{s}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(c.unsent(u));
        assert_eq!(c.open(), 0, "the abandoned slot went with the connection");
        assert!(matches!(c.begin(1), Err(Begin::Failed(ref s)) if s.code() == Code::Unavailable));
    }

    /// Random interleavings of every operation: every call ends exactly once with its
    /// own reply or an error, slots never exceed the limit, and they all come back.
    #[test]
    fn random_interleavings_keep_every_reply_with_its_own_call() {
        use crate::pool::Rng;
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let limit = 1 + rng.below(6) as usize;
            let mut c = Calls::<u64>::new(limit, true);
            // id -> (sent, waited)
            let mut live: Vec<u64> = Vec::new();
            let mut owed: Vec<u64> = Vec::new(); // requests the server will answer
            for _ in 0..200 {
                match rng.below(6) {
                    0 => match c.begin(3) {
                        Ok(id) => {
                            if rng.below(4) == 0 {
                                assert!(c.unsent(id));
                            } else {
                                c.sent(id);
                                live.push(id);
                                owed.push(id);
                            }
                        }
                        Err(Begin::Full) => assert_eq!(c.open(), limit),
                        Err(Begin::Read) => {
                            assert_eq!(c.open(), limit);
                            c.stop_reading(WINDOW);
                        }
                        Err(Begin::Failed(_)) => unreachable!("never failed here"),
                    },
                    1 | 2 if !owed.is_empty() => {
                        let k = rng.below(owed.len() as u64) as usize;
                        let id = owed.swap_remove(k);
                        let body = id.to_be_bytes();
                        match c.on_message(reply(id, 3, Code::Ok, &body)) {
                            Incoming::Answer(_) | Incoming::Discarded => {}
                            Incoming::Protocol(_) => panic!("seed {seed}: {:?}", c.failed()),
                        }
                    }
                    3 if !live.is_empty() => {
                        let k = rng.below(live.len() as u64) as usize;
                        let id = live[k];
                        match c.wait(id, id) {
                            Wait::Done(Ok(r)) => {
                                assert_eq!(&r[..], &id.to_be_bytes(), "seed {seed}");
                                c.stop_reading(id);
                                live.swap_remove(k);
                            }
                            Wait::Done(Err(s)) => panic!("seed {seed}: {s}"),
                            Wait::Read | Wait::Pending => {}
                        }
                    }
                    4 if !live.is_empty() => {
                        let k = rng.below(live.len() as u64) as usize;
                        let id = live.swap_remove(k);
                        c.abandon(id);
                    }
                    _ => {}
                }
                assert!(c.open() <= limit, "seed {seed}");
            }
            // The server answers everything owed; every caller left takes its answer.
            for id in owed.drain(..) {
                c.on_message(reply(id, 3, Code::Ok, &id.to_be_bytes()));
            }
            for id in live.drain(..) {
                assert!(
                    matches!(c.wait(id, id), Wait::Done(Ok(ref r)) if r[..] == id.to_be_bytes()),
                    "seed {seed}"
                );
            }
            assert_eq!(c.open(), 0, "seed {seed}: a slot leaked");
        }
    }
}
