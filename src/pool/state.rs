//! The pool's state machine: no I/O, no clock, no runtime. Every input carries the
//! current time, so tests drive it deterministically with manual time.
//!
//! Waiters queue in FIFO order with tickets; only the head of the queue may take an idle
//! connection or reserve a slot to connect. Connect failures put the pool into backoff
//! (`retry_at`): while it lasts, a fresh checkout that would need a new connection fails
//! at once with the last connect error (a circuit breaker), and the first checkout (or
//! background refill) after it probes the server again.
//!
//! Whether a connection may serve another checkout is decided here too, from what the
//! shell observed of it ([`Health`]: non-blocking probes it made outside the lock), at
//! check-in and again at checkout. A connection handed out by [`Step::Take`] counts as
//! in use until the shell reports [`PoolState::vetted`] or checks it in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::policy::{is_transient, Backoff, ReconnectPolicy, Rng};
use super::Status;
use crate::error::Error;

struct Idle<T> {
    conn: T,
    created: Instant,
    since: Instant,
}

/// What a waiting checkout should do next.
pub(crate) enum Step<T> {
    /// Vet this idle connection (created at the given time), then report
    /// [`PoolState::vetted`]; until then it counts as in use.
    Take(T, Instant),
    /// A slot is reserved: connect, then report `connected` or `checkout_connect_failed`.
    Connect,
    /// Wait for a change, or until the given time at the latest.
    Wait(Option<Instant>),
    /// Give up with this error (the server is down and the pool is backing off).
    Fail(Error),
    /// The pool is closed.
    Closed,
}

/// What the shell observed of a connection, at check-in or at checkout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Health {
    /// `Transport::is_closed`: closed or broken, or the peer closed or reset it.
    pub(crate) closed: bool,
    /// `Transport::has_unread`: something arrived that nobody received (a late reply
    /// to an abandoned request would go to the next user).
    pub(crate) unread: bool,
    /// Marked broken: an exchange on it was abandoned (a `recv` dropped before it
    /// completed), a request failed midway, the user marked it, or `Connector::check`
    /// failed, timed out or was cancelled.
    pub(crate) broken: bool,
    /// The pool's runtime has shut down, so the connection's tasks and timers are gone.
    pub(crate) runtime_down: bool,
}

impl Health {
    /// The rule: only a connection with nothing wrong may serve another checkout.
    pub(crate) fn reusable(self) -> bool {
        !(self.closed || self.unread || self.broken || self.runtime_down)
    }
}

/// What to do with a connection that was just vetted at checkout.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Vetted {
    /// Hand it to the checkout.
    Keep,
    /// It was discarded (the caller drops it); the checkout goes on with this ticket,
    /// at the head of the queue.
    Retry(u64),
}

/// One checkout's connect episode, for deciding whether it may try again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Episode {
    /// Attempts made so far, the failed one included.
    pub(crate) attempts: u32,
    /// When the first attempt started.
    pub(crate) started: Instant,
    /// The checkout's deadline.
    pub(crate) deadline: Instant,
}

/// The limits the state machine enforces.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_size: usize,
    pub(crate) min_idle: usize,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) policy: ReconnectPolicy,
}

pub(crate) struct PoolState<T> {
    limits: Limits,
    idle: VecDeque<Idle<T>>,
    in_use: usize,
    connecting: usize,
    waiters: VecDeque<u64>,
    next_ticket: u64,
    closed: bool,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Error>,
    rng: Rng,
    created: u64,
    failed_connects: u64,
    discarded: u64,
    timeouts: u64,
}

impl<T> PoolState<T> {
    pub(crate) fn new(limits: Limits, seed: u64) -> Self {
        PoolState {
            limits,
            idle: VecDeque::new(),
            in_use: 0,
            connecting: 0,
            waiters: VecDeque::new(),
            next_ticket: 0,
            closed: false,
            failures: 0,
            retry_at: None,
            last_error: None,
            rng: Rng::new(seed),
            created: 0,
            failed_connects: 0,
            discarded: 0,
            timeouts: 0,
        }
    }

    fn total(&self) -> usize {
        self.idle.len() + self.in_use + self.connecting
    }

    fn expired(&self, i: &Idle<T>, now: Instant) -> bool {
        let l = &self.limits;
        l.idle_timeout
            .is_some_and(|t| now.saturating_duration_since(i.since) >= t)
            || l.max_lifetime
                .is_some_and(|t| now.saturating_duration_since(i.created) >= t)
    }

    /// Join the back of the queue.
    pub(crate) fn join(&mut self) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.waiters.push_back(t);
        t
    }

    /// Join the front of the queue (a checkout that keeps its turn after a failed try).
    pub(crate) fn rejoin_front(&mut self) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.waiters.push_front(t);
        t
    }

    /// Leave the queue (timed out or cancelled). No-op if already served.
    pub(crate) fn leave(&mut self, ticket: u64) {
        self.waiters.retain(|&t| t != ticket);
    }

    /// Decide what the checkout holding `ticket` does now. `retrying` is true when this
    /// checkout's own connect attempt failed and its policy lets it try again.
    pub(crate) fn poll_checkout(
        &mut self,
        ticket: u64,
        now: Instant,
        deadline: Instant,
        retrying: bool,
    ) -> Step<T> {
        if self.closed {
            self.leave(ticket);
            return Step::Closed;
        }
        if self.waiters.front() != Some(&ticket) {
            return Step::Wait(None);
        }
        while let Some(i) = self.idle.pop_back() {
            if self.expired(&i, now) {
                self.discarded += 1;
                continue;
            }
            self.waiters.pop_front();
            self.in_use += 1;
            return Step::Take(i.conn, i.created);
        }
        if self.total() >= self.limits.max_size {
            return Step::Wait(None);
        }
        if let Some(at) = self.retry_at.filter(|&at| at > now) {
            if !retrying || at >= deadline {
                self.waiters.pop_front();
                return Step::Fail(self.down_error());
            }
            return Step::Wait(Some(at));
        }
        self.waiters.pop_front();
        self.connecting += 1;
        Step::Connect
    }

    fn down_error(&self) -> Error {
        self.last_error.clone().unwrap_or_else(|| {
            Error::new(
                crate::ErrorKind::ConnectionRefused,
                "pool: the server is down",
            )
        })
    }

    fn reset_backoff(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.last_error = None;
    }

    /// A reserved connect for a checkout succeeded. Returns false if the pool was
    /// closed meanwhile (the caller drops the connection).
    pub(crate) fn connected(&mut self) -> bool {
        self.connecting -= 1;
        self.created += 1;
        self.reset_backoff();
        if self.closed {
            self.discarded += 1;
            return false;
        }
        self.in_use += 1;
        true
    }

    /// A background connect succeeded: the connection joins the idle set. Returns it
    /// if the pool was closed meanwhile (the caller drops it, outside the lock).
    pub(crate) fn connected_idle(&mut self, conn: T, now: Instant) -> Option<T> {
        self.connecting -= 1;
        self.created += 1;
        self.reset_backoff();
        if self.closed {
            self.discarded += 1;
            return Some(conn);
        }
        self.idle.push_back(Idle {
            conn,
            created: now,
            since: now,
        });
        None
    }

    /// A checkout's reserved connect failed with `err`: the pool backs off per its
    /// policy, and the checkout may try again (returned: its new ticket, at the head of
    /// the queue) only if the error is [transient](is_transient), its policy allows
    /// another attempt in this episode and its deadline has not passed.
    pub(crate) fn checkout_connect_failed(
        &mut self,
        now: Instant,
        err: Error,
        episode: Episode,
    ) -> Option<u64> {
        let retry = is_transient(&err)
            && now < episode.deadline
            && self.limits.policy.may_retry(
                episode.attempts,
                now.saturating_duration_since(episode.started),
            );
        self.connect_failed(now, err);
        retry.then(|| self.rejoin_front())
    }

    /// A reserved connect failed with `err`; the pool backs off per its policy.
    pub(crate) fn connect_failed(&mut self, now: Instant, err: Error) {
        self.connecting -= 1;
        self.failed_connects += 1;
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(err);
        self.retry_at = match self.limits.policy.backoff {
            Backoff::None => None,
            _ => Some(crate::time::deadline(
                now,
                self.limits.policy.delay(self.failures, &mut self.rng),
            )),
        };
    }

    /// A reserved connect was abandoned (the checkout was dropped mid-connect).
    pub(crate) fn connect_cancelled(&mut self) {
        self.connecting -= 1;
    }

    /// A checkout's reserved connect ran out of the checkout's own time (what was left
    /// of `checkout_timeout`, shorter than `connect_timeout`): the checkout times out,
    /// and the attempt says nothing about the server, so it is not a failed connect and
    /// the pool does not back off. (A checkout that got its turn just before its
    /// deadline would otherwise put a healthy server "down" for every other user.)
    pub(crate) fn checkout_connect_cut_short(&mut self, ticket: u64) {
        self.connecting -= 1;
        self.timed_out(ticket);
    }

    /// The connection a checkout took with [`Step::Take`] was vetted with `health`.
    /// A connection that is not [reusable](Health::reusable) is discarded (its slot is
    /// free again) and the checkout keeps its turn at the head of the queue.
    pub(crate) fn vetted(&mut self, health: Health) -> Vetted {
        if health.reusable() {
            return Vetted::Keep;
        }
        self.in_use -= 1;
        self.discarded += 1;
        Vetted::Retry(self.rejoin_front())
    }

    /// A checked-out connection comes back with what the shell saw of it. Returns it if
    /// it is discarded (not reusable, expired, or the pool is closed); the caller drops
    /// it outside the lock.
    pub(crate) fn checkin(
        &mut self,
        conn: T,
        created: Instant,
        now: Instant,
        health: Health,
    ) -> Option<T> {
        self.in_use -= 1;
        let i = Idle {
            conn,
            created,
            since: now,
        };
        if self.closed || !health.reusable() || self.expired(&i, now) {
            self.discarded += 1;
            return Some(i.conn);
        }
        self.idle.push_back(i);
        None
    }

    /// A checked-out connection left the pool for good (detached or discarded).
    pub(crate) fn release(&mut self, discarded: bool) {
        self.in_use -= 1;
        if discarded {
            self.discarded += 1;
        }
    }

    pub(crate) fn timed_out(&mut self, ticket: u64) {
        self.leave(ticket);
        self.timeouts += 1;
    }

    /// Remove and return idle connections past their idle timeout or lifetime.
    pub(crate) fn reap(&mut self, now: Instant) -> Vec<T> {
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|i| !self.expired(i, now));
        self.idle = keep.into();
        self.discarded += gone.len() as u64;
        gone.into_iter().map(|i| i.conn).collect()
    }

    /// Reserve a slot for a background connect if `min_idle` is not met and the pool is
    /// not backing off.
    pub(crate) fn reserve_refill(&mut self, now: Instant) -> bool {
        let ok = !self.closed
            && self.idle.len() + self.connecting < self.limits.min_idle.min(self.limits.max_size)
            && self.total() < self.limits.max_size
            && self.retry_at.is_none_or(|at| at <= now);
        if ok {
            self.connecting += 1;
        }
        ok
    }

    /// Refuse new checkouts and hand back the idle connections to close.
    pub(crate) fn close(&mut self) -> Vec<T> {
        self.closed = true;
        self.waiters.clear();
        self.discarded += self.idle.len() as u64;
        self.idle.drain(..).map(|i| i.conn).collect()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Nothing is checked out or connecting.
    pub(crate) fn drained(&self) -> bool {
        self.in_use == 0 && self.connecting == 0
    }

    pub(crate) fn status(&self) -> Status {
        Status {
            idle: self.idle.len(),
            in_use: self.in_use,
            waiting: self.waiters.len(),
            connecting: self.connecting,
            max_size: self.limits.max_size,
            total_created: self.created,
            failed_connects: self.failed_connects,
            discarded: self.discarded,
            checkout_timeouts: self.timeouts,
            consecutive_failures: self.failures,
            last_error: self.last_error.clone(),
            closed: self.closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, ErrorKind};

    const MS: Duration = Duration::from_millis(1);

    fn limits(max: usize, policy: ReconnectPolicy) -> Limits {
        Limits {
            max_size: max,
            min_idle: 0,
            idle_timeout: Some(100 * MS),
            max_lifetime: Some(1000 * MS),
            policy,
        }
    }

    fn refused() -> Error {
        Error::new(ErrorKind::ConnectionRefused, "refused")
    }

    fn take<T>(s: Step<T>) -> T {
        match s {
            Step::Take(c, _) => c,
            _ => panic!("expected Take"),
        }
    }

    fn is_connect<T>(s: &Step<T>) -> bool {
        matches!(s, Step::Connect)
    }

    const GOOD: Health = Health {
        closed: false,
        unread: false,
        broken: false,
        runtime_down: false,
    };

    fn episode(t0: Instant, attempts: u32) -> Episode {
        Episode {
            attempts,
            started: t0,
            deadline: t0 + Duration::from_secs(60),
        }
    }

    #[test]
    fn fifo_fairness_and_max_size() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let mut s: PoolState<u32> = PoolState::new(limits(1, ReconnectPolicy::none()), 1);
        let a = s.join();
        let b = s.join();
        let c = s.join();
        // Only the head may act.
        assert!(matches!(
            s.poll_checkout(c, t0, far, false),
            Step::Wait(None)
        ));
        assert!(is_connect(&s.poll_checkout(a, t0, far, false)));
        assert!(s.connected());
        // Full: b waits even though it is now the head.
        assert!(matches!(
            s.poll_checkout(b, t0, far, false),
            Step::Wait(None)
        ));
        assert!(s.checkin(7, t0, t0, GOOD).is_none());
        // c must not jump b.
        assert!(matches!(
            s.poll_checkout(c, t0, far, false),
            Step::Wait(None)
        ));
        assert_eq!(take(s.poll_checkout(b, t0, far, false)), 7);
        assert!(s.checkin(7, t0, t0, GOOD).is_none());
        assert_eq!(take(s.poll_checkout(c, t0, far, false)), 7);
        let st = s.status();
        assert_eq!(
            (st.in_use, st.idle, st.waiting, st.total_created),
            (1, 0, 0, 1)
        );
    }

    #[test]
    fn idle_timeout_and_lifetime_expire_connections() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let mut s: PoolState<u32> = PoolState::new(limits(4, ReconnectPolicy::none()), 1);
        s.in_use = 2;
        assert!(s.checkin(1, t0, t0, GOOD).is_none());
        assert!(s.checkin(2, t0, t0 + 50 * MS, GOOD).is_none());
        // At 120 ms, conn 1 is idle 120 ms (> 100) and conn 2 only 70 ms.
        let gone = s.reap(t0 + 120 * MS);
        assert_eq!(gone, vec![1]);
        assert_eq!(s.status().idle, 1);
        // An old connection is discarded when it comes back past its lifetime.
        s.in_use = 1;
        assert!(s.checkin(3, t0, t0 + 1000 * MS, GOOD).is_some());
        assert_eq!(s.status().idle, 1);
        // Lazy expiry on checkout: conn 2 is idle-expired at 200 ms, so a connect is due.
        let w = s.join();
        assert!(is_connect(&s.poll_checkout(w, t0 + 200 * MS, far, false)));
        assert_eq!(s.status().discarded, 3);
    }

    #[test]
    fn connections_that_are_not_reusable_are_discarded_at_checkin() {
        let t0 = Instant::now();
        let mut s: PoolState<u32> = PoolState::new(limits(8, ReconnectPolicy::none()), 1);
        s.in_use = 5;
        let bad = [
            Health {
                closed: true,
                ..GOOD
            },
            Health {
                unread: true,
                ..GOOD
            },
            Health {
                broken: true,
                ..GOOD
            },
            Health {
                runtime_down: true,
                ..GOOD
            },
        ];
        for (n, h) in bad.into_iter().enumerate() {
            assert_eq!(s.checkin(n as u32, t0, t0, h), Some(n as u32), "{h:?}");
        }
        assert!(s.checkin(9, t0, t0, GOOD).is_none());
        let st = s.status();
        assert_eq!((st.idle, st.in_use, st.discarded), (1, 0, 4));
    }

    #[test]
    fn a_connection_that_fails_vetting_frees_its_slot_and_the_checkout_keeps_its_turn() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        // max_size 1: the stale idle connection holds the only slot.
        let mut s: PoolState<u32> = PoolState::new(limits(1, ReconnectPolicy::none()), 1);
        s.in_use = 1;
        assert!(s.checkin(7, t0, t0, GOOD).is_none());
        let a = s.join();
        let b = s.join();
        assert_eq!(take(s.poll_checkout(a, t0, far, false)), 7);
        // Being vetted, it still counts: b can neither take it nor connect.
        assert!(matches!(
            s.poll_checkout(b, t0, far, false),
            Step::Wait(None)
        ));
        assert_eq!(s.status().in_use, 1);
        // The peer had closed it while it was idle.
        let Vetted::Retry(a) = s.vetted(Health {
            closed: true,
            ..GOOD
        }) else {
            panic!("a closed connection must not be kept");
        };
        assert_eq!((s.status().in_use, s.status().discarded), (0, 1));
        // a is back at the head, ahead of b, and connects into the freed slot.
        assert!(matches!(
            s.poll_checkout(b, t0, far, false),
            Step::Wait(None)
        ));
        assert!(is_connect(&s.poll_checkout(a, t0, far, false)));
        assert!(s.connected());
        // A healthy one is kept.
        assert!(s.checkin(8, t0, t0, GOOD).is_none());
        assert_eq!(take(s.poll_checkout(b, t0, far, false)), 8);
        assert_eq!(s.vetted(GOOD), Vetted::Keep);
        assert_eq!(s.status().in_use, 1);
    }

    #[test]
    fn permanent_connect_errors_are_not_retried() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let mut s: PoolState<u32> = PoolState::new(limits(4, ReconnectPolicy::fixed(100 * MS)), 1);
        let a = s.join();
        assert!(is_connect(&s.poll_checkout(a, t0, far, false)));
        let unsupported = Error::new(ErrorKind::Unsupported, "no RDMA device");
        assert_eq!(
            s.checkout_connect_failed(t0, unsupported, episode(t0, 1)),
            None
        );
        assert_eq!(s.status().waiting, 0);
        // A transient one is retried, within the policy and the deadline.
        s.retry_at = None;
        let b = s.join();
        assert!(is_connect(&s.poll_checkout(b, t0, far, false)));
        assert!(s
            .checkout_connect_failed(t0, refused(), episode(t0, 1))
            .is_some());
        let b = s.waiters[0];
        s.leave(b);
        s.retry_at = None;
        let c = s.join();
        assert!(is_connect(&s.poll_checkout(c, t0, far, false)));
        let mut past = episode(t0, 1);
        past.deadline = t0;
        assert_eq!(s.checkout_connect_failed(t0, refused(), past), None);
        assert_eq!(s.status().failed_connects, 3);
    }

    #[test]
    fn a_connect_cut_short_by_the_checkout_deadline_is_not_a_failure() {
        let t0 = Instant::now();
        let soon = t0 + MS;
        let mut s: PoolState<u32> = PoolState::new(limits(1, ReconnectPolicy::fixed(100 * MS)), 1);
        let a = s.join();
        assert!(is_connect(&s.poll_checkout(a, t0, soon, false)));
        s.checkout_connect_cut_short(a);
        let st = s.status();
        assert_eq!((st.failed_connects, st.connecting, st.waiting), (0, 0, 0));
        assert_eq!(st.checkout_timeouts, 1);
        // The next checkout connects at once: no backoff.
        let b = s.join();
        assert!(is_connect(&s.poll_checkout(
            b,
            soon,
            soon + 60_000 * MS,
            false
        )));
    }

    #[test]
    fn the_policy_limits_attempts_and_elapsed_time_of_an_episode() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let policy = ReconnectPolicy::fixed(MS)
            .max_attempts(2)
            .max_elapsed(50 * MS);
        let mut s: PoolState<u32> = PoolState::new(limits(4, policy), 1);
        let fail = |s: &mut PoolState<u32>, now: Instant, ep: Episode| {
            s.retry_at = None;
            let w = s.join();
            assert!(is_connect(&s.poll_checkout(w, now, far, false)));
            let r = s.checkout_connect_failed(now, refused(), ep);
            if let Some(t) = r {
                s.leave(t);
            }
            r.is_some()
        };
        assert!(fail(&mut s, t0, episode(t0, 1)));
        assert!(!fail(&mut s, t0, episode(t0, 2)), "max_attempts 2");
        assert!(!fail(&mut s, t0 + 50 * MS, episode(t0, 1)), "max_elapsed");
    }

    #[test]
    fn backoff_fails_fresh_checkouts_fast_then_probes_after_the_delay() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let policy = ReconnectPolicy::fixed(50 * MS);
        let mut s: PoolState<u32> = PoolState::new(limits(4, policy), 1);
        let a = s.join();
        assert!(is_connect(&s.poll_checkout(a, t0, far, false)));
        s.connect_failed(t0, refused());
        // The failing checkout may retry: it waits for the backoff to end.
        let a = s.rejoin_front();
        match s.poll_checkout(a, t0 + MS, far, true) {
            Step::Wait(Some(at)) => assert_eq!(at, t0 + 50 * MS),
            _ => panic!("expected a timed wait"),
        }
        s.leave(a);
        // A fresh checkout during backoff fails at once with the connect error.
        let b = s.join();
        match s.poll_checkout(b, t0 + 10 * MS, far, false) {
            Step::Fail(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
            _ => panic!("expected fail-fast"),
        }
        assert_eq!(s.status().waiting, 0);
        // After the delay the next checkout probes again; success resets the backoff.
        let c = s.join();
        assert!(is_connect(&s.poll_checkout(c, t0 + 50 * MS, far, false)));
        assert!(s.connected());
        let st = s.status();
        assert_eq!((st.consecutive_failures, st.failed_connects), (0, 1));
        assert!(st.last_error.is_none());
    }

    #[test]
    fn retry_past_the_deadline_fails_instead_of_waiting() {
        let t0 = Instant::now();
        let mut s: PoolState<u32> = PoolState::new(limits(4, ReconnectPolicy::fixed(500 * MS)), 1);
        let a = s.join();
        assert!(is_connect(&s.poll_checkout(a, t0, t0 + 100 * MS, false)));
        s.connect_failed(t0, refused());
        let a = s.rejoin_front();
        assert!(matches!(
            s.poll_checkout(a, t0, t0 + 100 * MS, true),
            Step::Fail(_)
        ));
    }

    #[test]
    fn exponential_backoff_delays_grow_within_full_jitter_bounds() {
        let t0 = Instant::now();
        let policy = ReconnectPolicy::exponential(10 * MS, 80 * MS);
        let mut s: PoolState<u32> = PoolState::new(limits(4, policy), 99);
        let mut now = t0;
        for failure in 1..=6u32 {
            let w = s.join();
            assert!(is_connect(&s.poll_checkout(
                w,
                now,
                now + Duration::from_secs(9),
                false
            )));
            s.connect_failed(now, refused());
            let delay = s.retry_at.unwrap() - now;
            let bound = (10 * MS * (1 << (failure - 1))).min(80 * MS);
            assert!(delay <= bound, "failure {failure}: {delay:?} > {bound:?}");
            now += bound;
        }
        assert_eq!(s.status().consecutive_failures, 6);
    }

    #[test]
    fn policy_none_tries_every_checkout_once() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let mut s: PoolState<u32> = PoolState::new(limits(4, ReconnectPolicy::none()), 1);
        for _ in 0..3 {
            let w = s.join();
            assert!(is_connect(&s.poll_checkout(w, t0, far, false)));
            s.connect_failed(t0, refused());
        }
        assert_eq!(s.status().failed_connects, 3);
        assert!(!ReconnectPolicy::none().may_retry(1, Duration::ZERO));
    }

    #[test]
    fn refill_respects_min_idle_max_size_and_backoff() {
        let t0 = Instant::now();
        let mut l = limits(3, ReconnectPolicy::fixed(20 * MS));
        l.min_idle = 2;
        let mut s: PoolState<u32> = PoolState::new(l, 1);
        assert!(s.reserve_refill(t0));
        assert!(s.reserve_refill(t0));
        assert!(!s.reserve_refill(t0), "two already connecting");
        assert!(s.connected_idle(1, t0).is_none());
        s.connect_failed(t0, refused());
        assert!(!s.reserve_refill(t0 + MS), "backing off");
        assert!(s.reserve_refill(t0 + 20 * MS));
        assert!(s.connected_idle(2, t0 + 20 * MS).is_none());
        assert!(!s.reserve_refill(t0 + 20 * MS), "min_idle met");
    }

    #[test]
    fn close_refuses_checkouts_and_returns_idle_connections() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let mut s: PoolState<u32> = PoolState::new(limits(4, ReconnectPolicy::none()), 1);
        s.in_use = 2;
        assert!(s.checkin(1, t0, t0, GOOD).is_none());
        let w = s.join();
        assert_eq!(s.close(), vec![1]);
        assert!(matches!(s.poll_checkout(w, t0, far, false), Step::Closed));
        assert!(!s.drained());
        assert!(s.checkin(2, t0, t0, GOOD).is_some());
        assert!(s.drained());
        assert_eq!(s.status().idle, 0, "nothing returns to a closed pool");
    }
}
