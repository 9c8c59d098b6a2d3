//! Deadlines from user-given durations, without overflow.
//!
//! Every duration in net-rs's configurations (linger, timeouts, busy-poll windows,
//! back-off delays) is the user's to choose, and `Duration::MAX` is a natural way to
//! say "no limit"; `Instant + Duration` panics when the sum does not fit. Deadlines are
//! made here instead: one that does not fit is a deadline [`FAR`] away, later than
//! anything a program waits for.

use std::time::{Duration, Instant};

/// How far away a deadline that does not fit is: about thirty years.
pub(crate) const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// `now + d`, or [`FAR`] from `now` when that does not fit (`d` of `Duration::MAX`,
/// say).
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(FAR))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 60 * 60)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_that_does_not_fit_is_far_away() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_millis(5)),
            now + Duration::from_millis(5)
        );
        assert_eq!(deadline(now, Duration::MAX), now + FAR);
        assert_eq!(deadline(now, Duration::from_secs(u64::MAX / 2)), now + FAR);
        assert!(deadline(now, Duration::MAX).saturating_duration_since(now) >= FAR);
    }
}
