//! Reconnection policies: when to try connecting again after a failure. Pure math, no
//! clock and no I/O: the delay for the n-th consecutive failure and whether a connect
//! episode may go on, and which errors are worth another attempt at all.

use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// Whether `err`, from connecting (or from a request), may go away by itself, so that
/// trying again later can help.
///
/// The pool retries a connect (per its [`ReconnectPolicy`]) only after such an error;
/// any other fails the checkout at once.
///
/// | worth a retry (`true`) | permanent (`false`) |
/// |---|---|
/// | `ConnectionRefused` (nobody listens yet: the server is starting or restarting) | `Unsupported` (no RDMA device, no rdma-core, no runtime, the runtime has shut down) |
/// | `TimedOut`, `ConnectionReset`, `Closed`, `UnexpectedEof` (the network or the server hiccuped) | `PoolClosed` |
/// | `WorkCompletion`, `Registration` (an RDMA connection failed; registered memory may be freed by then) | `InvalidData`, `MessageTooLarge` (the peers disagree about the protocol) |
/// | any other `Io` kind (unreachable network, name lookup failure, ...) | `Io` of kind `InvalidInput` (a bad address, an address that resolved to nothing), `PermissionDenied`, `Unsupported`, `InvalidData` |
///
/// `Closed` or `UnexpectedEof` in the middle of a request usually means the server
/// crashed or was restarted: the kernel closes a dead process's sockets with FIN (or RST
/// when unread data was left), exactly as an orderly close looks. The request may or
/// may not have been processed; the pool never re-sends it by itself. Whether
/// re-sending is safe (idempotency) is the caller's decision.
pub fn is_transient(err: &Error) -> bool {
    use std::io::ErrorKind as Io;
    match err.kind() {
        ErrorKind::Unsupported
        | ErrorKind::PoolClosed
        | ErrorKind::InvalidData
        | ErrorKind::MessageTooLarge { .. } => false,
        ErrorKind::Io(k) => !matches!(
            k,
            Io::InvalidInput | Io::PermissionDenied | Io::Unsupported | Io::InvalidData
        ),
        _ => true,
    }
}

/// How long to wait between connection attempts after failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// Never retry on its own: each checkout makes one connection attempt and reports
    /// its error.
    None,
    /// The same delay after every failure.
    Fixed(Duration),
    /// Exponential backoff with full jitter: after the n-th consecutive failure, a
    /// uniformly random delay in `[0, min(max, base * 2^(n-1))]`.
    Exponential {
        /// The bound of the first delay.
        base: Duration,
        /// The largest bound.
        max: Duration,
    },
}

/// A reconnection policy: a [`Backoff`] plus limits on one connect episode (the
/// attempts a single checkout or refill makes before it gives up with the last error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// The delay schedule.
    pub backoff: Backoff,
    /// Most attempts in one episode (`None`: unlimited, bounded by the checkout timeout).
    pub max_attempts: Option<u32>,
    /// Longest time one episode keeps trying (`None`: bounded by the checkout timeout).
    pub max_elapsed: Option<Duration>,
}

impl ReconnectPolicy {
    /// No retries: one attempt per checkout.
    pub fn none() -> Self {
        ReconnectPolicy {
            backoff: Backoff::None,
            max_attempts: Some(1),
            max_elapsed: None,
        }
    }

    /// A fixed delay between attempts.
    pub fn fixed(delay: Duration) -> Self {
        ReconnectPolicy {
            backoff: Backoff::Fixed(delay),
            max_attempts: None,
            max_elapsed: None,
        }
    }

    /// Exponential backoff with full jitter from `base` up to `max`.
    pub fn exponential(base: Duration, max: Duration) -> Self {
        ReconnectPolicy {
            backoff: Backoff::Exponential { base, max },
            max_attempts: None,
            max_elapsed: None,
        }
    }

    /// Limit one episode to `n` attempts (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n.max(1));
        self
    }

    /// Limit one episode to `d` of trying.
    pub fn max_elapsed(mut self, d: Duration) -> Self {
        self.max_elapsed = Some(d);
        self
    }

    /// The delay before the next attempt after `failures` consecutive failures
    /// (`failures >= 1`), drawing jitter from `rng`.
    pub fn delay(&self, failures: u32, rng: &mut Rng) -> Duration {
        match self.backoff {
            Backoff::None => Duration::ZERO,
            Backoff::Fixed(d) => d,
            Backoff::Exponential { base, max } => {
                let shift = failures.saturating_sub(1).min(32);
                let bound = base.saturating_mul(1u32 << shift.min(31)).min(max);
                let nanos = bound.as_nanos().min(u64::MAX as u128) as u64;
                Duration::from_nanos(rng.below(nanos.saturating_add(1)))
            }
        }
    }

    /// Whether an episode that made `attempts` attempts over `elapsed` may try again.
    pub fn may_retry(&self, attempts: u32, elapsed: Duration) -> bool {
        if self.backoff == Backoff::None {
            return false;
        }
        self.max_attempts.is_none_or(|m| attempts < m)
            && self.max_elapsed.is_none_or(|m| elapsed < m)
    }

    /// The largest delay this policy can produce (what recovery may take once the
    /// server is back), if bounded.
    pub fn max_delay(&self) -> Duration {
        match self.backoff {
            Backoff::None => Duration::ZERO,
            Backoff::Fixed(d) => d,
            Backoff::Exponential { max, .. } => max,
        }
    }
}

impl Default for ReconnectPolicy {
    /// Exponential backoff with full jitter, 50 ms up to 5 s, at most 3 attempts per
    /// checkout.
    fn default() -> Self {
        ReconnectPolicy::exponential(Duration::from_millis(50), Duration::from_secs(5))
            .max_attempts(3)
    }
}

/// A small deterministic random number generator (SplitMix64) for jitter.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `[0, n)` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn full_jitter_stays_within_the_exponential_bound() {
        let p = ReconnectPolicy::exponential(10 * MS, 200 * MS);
        let mut rng = Rng::new(7);
        for failures in 1..12u32 {
            let bound = (10 * MS * (1 << (failures - 1))).min(200 * MS);
            let mut max_seen = Duration::ZERO;
            let mut min_seen = Duration::MAX;
            for _ in 0..2000 {
                let d = p.delay(failures, &mut rng);
                assert!(d <= bound, "failure {failures}: {d:?} > {bound:?}");
                max_seen = max_seen.max(d);
                min_seen = min_seen.min(d);
            }
            // Full jitter spreads over the whole range.
            assert!(
                max_seen > bound * 9 / 10,
                "{failures}: max {max_seen:?} of {bound:?}"
            );
            assert!(
                min_seen < bound / 10,
                "{failures}: min {min_seen:?} of {bound:?}"
            );
        }
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let p = ReconnectPolicy::exponential(Duration::from_secs(1), Duration::from_secs(60));
        let mut rng = Rng::new(1);
        assert!(p.delay(u32::MAX, &mut rng) <= Duration::from_secs(60));
    }

    #[test]
    fn fixed_and_none() {
        let mut rng = Rng::new(3);
        assert_eq!(ReconnectPolicy::fixed(5 * MS).delay(9, &mut rng), 5 * MS);
        let none = ReconnectPolicy::none();
        assert!(!none.may_retry(1, Duration::ZERO));
    }

    #[test]
    fn episode_limits() {
        let p = ReconnectPolicy::fixed(MS).max_attempts(3);
        assert!(p.may_retry(2, Duration::from_secs(100)));
        assert!(!p.may_retry(3, Duration::ZERO));
        let p = ReconnectPolicy::fixed(MS).max_elapsed(10 * MS);
        assert!(p.may_retry(1000, 9 * MS));
        assert!(!p.may_retry(1, 10 * MS));
    }

    #[test]
    fn permanent_errors_are_not_transient() {
        let e = |k| Error::new(k, "x");
        for k in [
            ErrorKind::ConnectionRefused,
            ErrorKind::TimedOut,
            ErrorKind::ConnectionReset,
            ErrorKind::Closed,
            ErrorKind::UnexpectedEof,
            ErrorKind::Io(std::io::ErrorKind::Other),
            ErrorKind::Io(std::io::ErrorKind::HostUnreachable),
        ] {
            assert!(is_transient(&e(k)), "{k:?}");
        }
        for k in [
            ErrorKind::Unsupported,
            ErrorKind::PoolClosed,
            ErrorKind::InvalidData,
            ErrorKind::Io(std::io::ErrorKind::InvalidInput),
            ErrorKind::Io(std::io::ErrorKind::PermissionDenied),
        ] {
            assert!(!is_transient(&e(k)), "{k:?}");
        }
    }

    #[test]
    fn rng_is_deterministic_and_bounded() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(42), |r, _| Some(r.below(10)))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(42), |r, _| Some(r.below(10)))
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| x < 10));
        assert_eq!(Rng::new(0).below(0), 0);
    }
}
