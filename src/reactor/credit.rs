//! Credit-based flow control for one side of a connection. Pure state, no I/O.
//!
//! Each side keeps `depth` receive buffers posted. A credit is the right to post one
//! SEND that the peer has a posted receive for, so a sender that only sends with a
//! credit never causes Receiver-Not-Ready.
//!
//! * Sending a data message takes a credit, but the last credit is reserved for credit
//!   updates, so two sides that both run dry can still tell each other about freed
//!   receives.
//! * Every outgoing message (data or update) carries the credits this side has
//!   re-posted since it last told the peer (`piggyback`, at most [`MAX_PIGGYBACK`]).
//! * A side that only receives sends an explicit update once `threshold` credits are
//!   waiting to go back. The threshold is at least 2, so an update never goes out just
//!   to return the credit of the update that came in (no update ping-pong).

/// Most credits one message can carry back (16 bits of immediate data).
pub const MAX_PIGGYBACK: u32 = u16::MAX as u32;

/// Credits held back from data for credit updates.
const RESERVED: u32 = 1;

/// The credit state of one side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credits {
    send: u32,
    to_return: u32,
    threshold: u32,
}

impl Credits {
    /// A side that keeps `depth` receives posted itself and whose peer starts with
    /// `peer_depth` posted receives. Explicit updates go out once a quarter of `depth`
    /// re-posted receives wait to be announced (at least 2, at most `depth - 1`, which
    /// the peer's data alone can always bring about). Depths below 3 are raised to 3:
    /// with fewer, one-way traffic could stall below the update threshold.
    pub fn new(depth: u32, peer_depth: u32) -> Self {
        let depth = depth.max(3);
        Credits {
            send: peer_depth.max(3),
            to_return: 0,
            threshold: (depth / 4).clamp(2, depth - 1),
        }
    }

    /// A side that keeps `depth` receives posted and does not know its peer's depth
    /// yet: it holds the one credit every peer grants (each posts at least one receive
    /// before connecting) for its hello ([`take_for_hello`](Credits::take_for_hello)),
    /// which announces its own depth; the peer's hello brings the rest
    /// ([`on_hello`](Credits::on_hello)).
    pub fn before_hello(depth: u32) -> Self {
        let mut c = Credits::new(depth, 3);
        c.send = 1;
        c
    }

    /// Take the hello's credit (the reserve rule does not apply: nothing else can go
    /// out before it). `None` if it was already taken.
    pub fn take_for_hello(&mut self) -> Option<u32> {
        if self.send == 0 {
            return None;
        }
        self.send -= 1;
        Some(self.take_piggyback())
    }

    /// The peer's hello arrived: it keeps `peer_depth` receives posted, one of which
    /// this side's hello used (that one comes back as a piggybacked credit).
    pub fn on_hello(&mut self, peer_depth: u32) {
        self.send = self.send.saturating_add(peer_depth.max(3) - 1);
    }

    /// Credits available to send with now.
    pub fn available(&self) -> u32 {
        self.send
    }

    /// Re-posted receives not yet announced to the peer.
    pub fn pending_return(&self) -> u32 {
        self.to_return
    }

    /// Take a credit for a data message. Returns the credits to piggyback on it, or
    /// `None` if the message must wait for credits.
    pub fn take_for_data(&mut self) -> Option<u32> {
        if self.send <= RESERVED {
            return None;
        }
        self.send -= 1;
        Some(self.take_piggyback())
    }

    /// Take a credit for an explicit credit update if one is due. Returns the credits
    /// it carries.
    pub fn take_for_update(&mut self) -> Option<u32> {
        if self.to_return < self.threshold || self.send == 0 {
            return None;
        }
        self.send -= 1;
        Some(self.take_piggyback())
    }

    /// Take a credit for a control message that must go now whatever is waiting to be
    /// returned (a keepalive probe or its answer): any credit, the reserved one too.
    /// Returns the credits it carries, or `None` without a credit.
    pub fn take_for_control(&mut self) -> Option<u32> {
        if self.send == 0 {
            return None;
        }
        self.send -= 1;
        Some(self.take_piggyback())
    }

    fn take_piggyback(&mut self) -> u32 {
        let n = self.to_return.min(MAX_PIGGYBACK);
        self.to_return -= n;
        n
    }

    /// A message from the peer arrived carrying `piggyback` credits.
    pub fn on_receive(&mut self, piggyback: u32) {
        self.send = self.send.saturating_add(piggyback);
    }

    /// This side re-posted `n` receive buffers.
    pub fn reposted(&mut self, n: u32) {
        self.to_return = self.to_return.saturating_add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Rng;
    use std::collections::VecDeque;

    #[test]
    fn last_credit_is_reserved_for_updates() {
        let mut c = Credits::new(3, 3);
        assert_eq!(c.take_for_data(), Some(0));
        assert_eq!(c.take_for_data(), Some(0));
        assert_eq!(c.take_for_data(), None, "one credit left: reserved");
        c.reposted(1);
        assert_eq!(c.take_for_update(), None, "below threshold");
        c.reposted(1);
        assert_eq!(c.take_for_update(), Some(2));
        assert_eq!(c.available(), 0);
        c.on_receive(5);
        assert_eq!(c.take_for_data(), Some(0));
    }

    #[test]
    fn hello_exchange_grants_the_peer_depth() {
        let (mut a, mut b) = (Credits::before_hello(8), Credits::before_hello(5));
        assert_eq!(a.take_for_data(), None, "no data before the hello");
        assert_eq!(a.take_for_update(), None);
        assert_eq!(a.take_for_hello(), Some(0));
        assert_eq!(a.take_for_hello(), None, "one hello");
        assert_eq!(b.take_for_hello(), Some(0));
        // Each receives the other's hello and re-posts that receive.
        a.on_hello(5);
        b.on_hello(8);
        a.reposted(1);
        b.reposted(1);
        assert_eq!((a.available(), b.available()), (4, 7));
        // a's first data message returns b's hello receive: a now has all of b's 5.
        assert_eq!(a.take_for_data(), Some(1));
        b.on_receive(1);
        assert_eq!(b.available(), 8);
    }

    #[test]
    fn piggyback_is_capped() {
        let mut c = Credits::new(16, 10);
        c.reposted(MAX_PIGGYBACK + 3);
        assert_eq!(c.take_for_data(), Some(MAX_PIGGYBACK));
        assert_eq!(c.pending_return(), 3);
    }

    /// One side of a simulated connection.
    struct Side {
        credits: Credits,
        posted: u32,
        /// Delivered messages the application still holds (their buffers).
        held: u32,
        want_to_send: u64,
        received_data: u64,
    }

    enum Msg {
        Data(u32),
        Update(u32),
    }

    /// Miri runs the same state machine, on fewer messages.
    const SCALE: u64 = if cfg!(miri) { 100 } else { 1 };

    /// Two sides exchange messages over in-order links with random delays and random
    /// application behaviour. The receiver must always have a posted buffer (no RNR),
    /// and everything must get through (no deadlock).
    fn simulate(seed: u64, depth: u32, a_sends: u64, b_sends: u64) {
        let (a_sends, b_sends) = (a_sends.div_ceil(SCALE), b_sends.div_ceil(SCALE));
        let mut rng = Rng::new(seed);
        let mut sides = [
            Side {
                credits: Credits::new(depth, depth),
                posted: depth,
                held: 0,
                want_to_send: a_sends,
                received_data: 0,
            },
            Side {
                credits: Credits::new(depth, depth),
                posted: depth,
                held: 0,
                want_to_send: b_sends,
                received_data: 0,
            },
        ];
        let mut links: [VecDeque<Msg>; 2] = [VecDeque::new(), VecDeque::new()];
        let mut idle_steps = 0;
        for _step in 0..2_000_000u64 {
            let s = rng.below(2) as usize;
            let peer = 1 - s;
            let mut progressed = false;
            match rng.below(4) {
                0 if sides[s].want_to_send > 0 => {
                    if let Some(p) = sides[s].credits.take_for_data() {
                        sides[s].want_to_send -= 1;
                        links[s].push_back(Msg::Data(p));
                        progressed = true;
                    }
                }
                1 => {
                    // Deliver the next message on the link into the peer.
                    if let Some(m) = links[s].pop_front() {
                        let r = &mut sides[peer];
                        assert!(
                            r.posted > 0,
                            "receiver not ready: a SEND without a posted receive"
                        );
                        r.posted -= 1;
                        match m {
                            Msg::Data(p) => {
                                r.credits.on_receive(p);
                                r.held += 1;
                                r.received_data += 1;
                            }
                            Msg::Update(p) => {
                                r.credits.on_receive(p);
                                // Control messages are consumed and re-posted at once.
                                r.posted += 1;
                                r.credits.reposted(1);
                            }
                        }
                        progressed = true;
                    }
                }
                2 => {
                    // The application releases some received messages: re-post.
                    let n = rng.below(sides[s].held as u64 + 1) as u32;
                    if n > 0 {
                        sides[s].held -= n;
                        sides[s].posted += n;
                        sides[s].credits.reposted(n);
                        progressed = true;
                    }
                }
                _ => {
                    if let Some(p) = sides[s].credits.take_for_update() {
                        links[s].push_back(Msg::Update(p));
                        progressed = true;
                    }
                }
            }
            assert!(sides[s].posted + sides[s].held <= depth);
            let done =
                sides.iter().all(|x| x.want_to_send == 0) && links.iter().all(|l| l.is_empty());
            if done {
                break;
            }
            idle_steps = if progressed { 0 } else { idle_steps + 1 };
            assert!(idle_steps < 10_000, "no progress for 10000 steps: deadlock");
        }
        assert_eq!(sides[1].received_data, a_sends, "seed {seed}");
        assert_eq!(sides[0].received_data, b_sends, "seed {seed}");
    }

    #[test]
    fn one_way_flood_never_overruns_the_receiver() {
        for seed in 0..20 / SCALE.min(10) {
            simulate(seed, 16, 20_000, 0);
        }
    }

    #[test]
    fn two_way_traffic_never_overruns_or_deadlocks() {
        for seed in 100..120 {
            simulate(seed, 8, 5_000, 5_000);
        }
        simulate(7, 512, 100_000, 3);
    }

    #[test]
    fn tiny_depth_still_makes_progress() {
        for seed in 200..220 {
            simulate(seed, 3, 2_000, 2_000);
            simulate(seed, 3, 2_000, 0);
        }
    }
}
