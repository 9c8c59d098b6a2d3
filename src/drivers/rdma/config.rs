//! The settings of an RDMA connection and the sizes derived from them: [`RdmaConfig`],
//! the queue pair's and completion queue's depths, the registered-memory limits.
//!
//! A leaf of the driver: the connection setup (`cm`) and the transport both read it,
//! neither is read by it.

use std::time::Duration;

use super::wire::Hello;
use crate::error::{Error, ErrorKind, Result};
use crate::reactor::PollerConfig;

/// Work requests each queue's side may have outstanding.
pub const QUEUE_DEPTH: u32 = 512;

/// Completion-queue entries a connection needs: both queues full, and some slack.
pub const CQ_ENTRIES: u32 = 2 * QUEUE_DEPTH + 16;

/// Smallest receive buffer (a hello must fit).
const MIN_CHUNK: usize = Hello::MIN_CHUNK as usize;

/// Largest receive buffer (fragment) size: 1 MiB. A connection registers `depth` of
/// them (512 MiB at the default depth), so larger ones are refused with an error
/// rather than attempted.
pub const MAX_CHUNK: usize = 1 << 20;

/// Largest `alloc_buf` served from registered memory; larger buffers come from the
/// heap (and are copied when sent).
pub const APP_MAX: usize = 4 << 20;
/// Size of each region `alloc_buf` memory is registered in.
pub(crate) const APP_REGION: usize = 8 << 20;

/// Settings of an RDMA connection. The peers tell each other theirs in a hello (the
/// first message on every connection), so they need not match: fragments are the
/// smaller `chunk`, each side's credits start at the other's `depth`, and a message
/// larger than the peer's `max_message_size` is refused by `send`.
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
    /// Spin and yield windows of the device's completion poller thread, which drives
    /// every connection on the device: the connection that starts it (the first on its
    /// device while none is open) sets them.
    pub poller: PollerConfig,
    /// Latency mode: a task waiting on this connection polls the completion queue
    /// itself for up to this long before it parks (default `None`: it parks at once
    /// and the poller thread wakes it). Saves the thread hand-off on every message at
    /// the price of a busy CPU while waiting. The device thread does not arm a CQ that
    /// a task is polling.
    pub busy_poll: Option<Duration>,
    /// Unread bytes (received, not yet taken by `recv`) past which no credits go back
    /// to the peer, so its `send` waits: like a socket's receive buffer (default
    /// 4 MiB). Unread data stays below this plus one window of credits (`depth`
    /// buffers of `chunk` bytes) plus the one message being reassembled.
    pub recv_buffer: usize,
    /// How long a dropped connection (its last handle gone) or an exiting process keeps
    /// delivering what `send` accepted before it gives up (default 10 s, as TCP).
    pub linger: Duration,
    /// How long a new connection waits for the peer's hello (the first message of the
    /// net-rs protocol) before it fails with `TimedOut` (default 10 s): a peer that
    /// connected through RDMA-CM but does not speak net-rs (another tool, an old
    /// version) makes `send`, `recv` and `flush` fail then instead of waiting forever.
    /// It also bounds the RDMA-CM handshake of a connection an `accept` has taken (the
    /// accept's own timeout bounds only the wait for a request).
    pub handshake_timeout: Duration,
    /// How long the queue pair waits for the peer's acknowledgement of a packet before
    /// it sends it again (default 1.07 s). The device takes it as 4.096 µs × 2^n
    /// (InfiniBand's "local ACK timeout"): the value is rounded up to the next such
    /// step, from 8.2 µs to 2.4 hours (never 0, which means "wait forever"). Hardware
    /// may wait longer than asked; Soft-RoCE waits about as long.
    pub ack_timeout: Duration,
    /// How many times the queue pair sends an unacknowledged packet again before the
    /// send fails (0 ..= 6, default 6; larger values are taken as 6, because Soft-RoCE
    /// takes 7 as "retry forever" while hardware takes it as 7). So a peer whose link
    /// or host is down fails a pending send, then every operation, with `TimedOut`
    /// after about `ack_timeout × (retry_count + 1)`: 7.5 s with the defaults, which a
    /// network outage of a few seconds survives. (A connection with nothing in
    /// flight notices nothing: see the README on idle connections.)
    pub retry_count: u8,
    /// Keepalive interval (default 5 s; zero: off). With keepalive on at both ends, one
    /// side (the connecting one, or the accepting one if the other has it off) sends a
    /// probe every interval, which the peer answers; either side fails the connection
    /// with `TimedOut` after `keepalive_misses` intervals without a word from the peer.
    /// So a peer whose host or link died while the connection was idle (nothing in
    /// flight, so the retries above never start) is noticed within
    /// `interval × misses` (15 s with the defaults), a pending `recv` ends and
    /// `is_closed()` turns true. Cost: one empty SEND and its answer per interval per
    /// connection. A peer *process* stopped (SIGSTOP) for that long also counts as
    /// gone: its device thread answers the probes.
    pub keepalive_interval: Duration,
    /// Keepalive intervals without a word from the peer before the connection fails
    /// (default 3; at least 1).
    pub keepalive_misses: u32,
}

/// The retransmission settings of a queue pair, as the device takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpTiming {
    /// Local ACK timeout: 4.096 µs × 2^`timeout_exp` (1 ..= 31).
    pub timeout_exp: u8,
    /// Retransmissions before a send fails (0 ..= 6).
    pub retry_cnt: u8,
}

impl QpTiming {
    /// The timing for `ack_timeout` (rounded up to a step) and `retry_count` (at most
    /// 6).
    pub fn new(ack_timeout: Duration, retry_count: u8) -> Self {
        // 4.096 µs × 2^n >= ack_timeout, n in 1..=31.
        let steps = ack_timeout.as_nanos().div_ceil(4096).max(2);
        let exp = (u128::BITS - (steps - 1).leading_zeros()).clamp(1, 31);
        QpTiming {
            timeout_exp: exp as u8,
            retry_cnt: retry_count.min(6),
        }
    }

    /// How long a send to a peer that acknowledges nothing takes to fail, at least:
    /// one timeout per try.
    pub fn give_up_after(&self) -> Duration {
        Duration::from_nanos(4096 << self.timeout_exp) * (u32::from(self.retry_cnt) + 1)
    }
}

impl Default for QpTiming {
    fn default() -> Self {
        let d = RdmaConfig::default();
        QpTiming::new(d.ack_timeout, d.retry_count)
    }
}

impl RdmaConfig {
    /// Keepalive every `interval` (zero: off), failing the connection after `misses`
    /// intervals without a word from the peer (see
    /// [`keepalive_interval`](RdmaConfig::keepalive_interval)).
    pub fn keepalive(mut self, interval: Duration, misses: u32) -> Self {
        self.keepalive_interval = interval;
        self.keepalive_misses = misses;
        self
    }

    /// The keepalive interval in whole milliseconds (0: off; at least 1 when on).
    pub(crate) fn keepalive_ms(&self) -> u32 {
        if self.keepalive_interval.is_zero() {
            0
        } else {
            self.keepalive_interval
                .as_millis()
                .clamp(1, u128::from(u32::MAX)) as u32
        }
    }

    /// The queue pair's retransmission settings from `ack_timeout` and `retry_count`.
    pub fn qp_timing(&self) -> QpTiming {
        QpTiming::new(self.ack_timeout, self.retry_count)
    }

    /// Raise `chunk` to at least 64 bytes and keep `depth` within 3 ..= 512 (the
    /// receive queue's size).
    ///
    /// # Errors
    /// `Io(InvalidInput)` for a `chunk` over [`MAX_CHUNK`], before anything is
    /// allocated or registered.
    pub(crate) fn normalized(mut self) -> Result<Self> {
        if self.chunk > MAX_CHUNK {
            return Err(Error::new(
                ErrorKind::Io(std::io::ErrorKind::InvalidInput),
                format!(
                    "RdmaConfig::chunk of {} bytes: at most {MAX_CHUNK} (the connection \
                     registers `depth` receive buffers of that size)",
                    self.chunk
                ),
            ));
        }
        self.chunk = self.chunk.max(MIN_CHUNK);
        self.depth = self.depth.clamp(Hello::MIN_DEPTH, QUEUE_DEPTH);
        Ok(self)
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            max_message_size: 8 << 20,
            chunk: 4096,
            depth: QUEUE_DEPTH,
            send_buffer: 4 << 20,
            poller: PollerConfig::default(),
            busy_poll: None,
            recv_buffer: 4 << 20,
            linger: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_nanos(4096 << 18),
            retry_count: 6,
            keepalive_interval: Duration::from_secs(5),
            keepalive_misses: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_timeouts_round_up_to_the_devices_steps_and_retries_stay_finite() {
        let t = |d: Duration| QpTiming::new(d, 6).timeout_exp;
        assert_eq!(t(Duration::ZERO), 1, "0 would mean forever");
        assert_eq!(t(Duration::from_nanos(8192)), 1);
        assert_eq!(t(Duration::from_nanos(8193)), 2);
        assert_eq!(t(Duration::from_nanos(4096 << 18)), 18);
        assert_eq!(t(Duration::from_nanos((4096 << 18) + 1)), 19);
        assert_eq!(t(Duration::from_secs(1)), 18);
        assert_eq!(t(Duration::MAX), 31);
        assert_eq!(QpTiming::new(Duration::ZERO, 7).retry_cnt, 6);
        assert_eq!(QpTiming::new(Duration::ZERO, 255).retry_cnt, 6);
        assert_eq!(QpTiming::new(Duration::ZERO, 0).retry_cnt, 0);
        let d = QpTiming::default();
        assert_eq!((d.timeout_exp, d.retry_cnt), (18, 6));
        let bound = d.give_up_after().as_secs_f64();
        assert!((7.5..7.6).contains(&bound), "{bound}");
    }
}
