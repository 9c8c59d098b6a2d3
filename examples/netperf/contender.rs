//! What one implementation in the TCP tables provides ([`Contender`], [`Sender`]), and
//! the pieces every implementation shares: the runtimes, a server thread, and the
//! measuring loops (so an implementation only says how it sends and receives one
//! message, not how the clock runs).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Round trips of a ping-pong cell run before the measured ones.
const WARMUP: usize = 200;
/// Messages a streaming sender sends between two looks at the clock.
const BATCH: u64 = 64;

/// One implementation of the TCP tables (`--impl`): its row of the latency table, its
/// rows of the send-side table (one per way it sends) and its row of the receive-side
/// table. Every cell runs on a fresh connection.
pub trait Contender {
    /// Its name in the latency and receive-side tables (`--impl` selects it by a key).
    fn name(&self) -> &'static str;

    /// Ping-pong: starts its own echo server on a thread of its own, runs
    /// [`ping_pong_to`](Contender::ping_pong_to) against it and waits for the server to
    /// end. The measured round trips.
    fn ping_pong(&self, msg: &Bytes, dur: Duration) -> Vec<Duration>;

    /// The client half of [`ping_pong`](Contender::ping_pong): connects to the echo
    /// server at `addr`, sends `msg` and waits for the echo, again and again for `dur`
    /// (see [`round_trips`]), then closes the connection. The measured round trips.
    fn ping_pong_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> Vec<Duration>;

    /// Its rows of the send-side table: each way it sends to the common receiver.
    fn senders(&self) -> Vec<Box<dyn Sender>>;

    /// Receive side: connects to the common sender at `addr` and receives messages of
    /// `size` bytes (checking each size) up to the empty end marker, then sends back the
    /// count as 8 big-endian bytes.
    fn stream_from(&self, addr: SocketAddr, size: usize);
}

/// One row of the send-side table.
pub trait Sender {
    /// Its name in the send-side table.
    fn name(&self) -> &'static str;

    /// Connects to the common receiver at `addr`, sends `msg` in batches of 64 until
    /// `dur` has passed (see [`stream_until`]), then an empty end marker, and reads the
    /// receiver's count (asserted equal to the messages sent). The count and the time
    /// from the first message to the count's arrival.
    fn stream_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> (u64, Duration);
}

/// A current-thread tokio runtime (the one net-rs and `Framed` use unless a row says
/// `mt`).
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A multi-thread tokio runtime with 2 workers if `multi` (the `mt` rows), else a
/// current-thread one.
pub fn runtime(multi: bool) -> tokio::runtime::Runtime {
    if multi {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    } else {
        current_thread()
    }
}

/// Runs `server` on its own thread with a listener on a free loopback port; returns
/// the port's address.
pub fn serve<T, F>(server: F) -> (SocketAddr, std::thread::JoinHandle<T>)
where
    T: Send + 'static,
    F: FnOnce(std::net::TcpListener) -> T + Send + 'static,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    (addr, std::thread::spawn(move || server(l)))
}

/// Runs `trip` (one round trip) until `dur` has passed and at least one was measured;
/// the durations of all but the first 200 (the warm-up).
pub fn round_trips(dur: Duration, mut trip: impl FnMut()) -> Vec<Duration> {
    let mut rtts = Vec::new();
    let end = Instant::now() + dur;
    let mut i = 0;
    while Instant::now() < end || rtts.is_empty() {
        let t0 = Instant::now();
        trip();
        if i >= WARMUP {
            rtts.push(t0.elapsed());
        }
        i += 1;
    }
    rtts
}

/// [`round_trips`] for an async `trip`.
pub async fn round_trips_async(dur: Duration, mut trip: impl AsyncFnMut()) -> Vec<Duration> {
    let mut rtts = Vec::new();
    let end = Instant::now() + dur;
    let mut i = 0;
    while Instant::now() < end || rtts.is_empty() {
        let t0 = Instant::now();
        trip().await;
        if i >= WARMUP {
            rtts.push(t0.elapsed());
        }
        i += 1;
    }
    rtts
}

/// Runs `send` (one message) in batches of 64 until `end`; the messages sent.
pub fn stream_until(end: Instant, mut send: impl FnMut()) -> u64 {
    let mut sent = 0;
    while Instant::now() < end {
        for _ in 0..BATCH {
            send();
        }
        sent += BATCH;
    }
    sent
}

/// [`stream_until`] for an async `send`.
pub async fn stream_until_async(end: Instant, mut send: impl AsyncFnMut()) -> u64 {
    let mut sent = 0;
    while Instant::now() < end {
        for _ in 0..BATCH {
            send().await;
        }
        sent += BATCH;
    }
    sent
}

/// Runs `recv` (one message, its length) up to the empty end marker, asserting that
/// every message is `size` bytes; the messages counted.
pub fn count_until_end(size: usize, mut recv: impl FnMut() -> usize) -> u64 {
    let mut n = 0;
    loop {
        let len = recv();
        if len == 0 {
            return n;
        }
        assert_eq!(len, size);
        n += 1;
    }
}

/// [`count_until_end`] for an async `recv`.
pub async fn count_until_end_async(size: usize, mut recv: impl AsyncFnMut() -> usize) -> u64 {
    let mut n = 0;
    loop {
        let len = recv().await;
        if len == 0 {
            return n;
        }
        assert_eq!(len, size);
        n += 1;
    }
}

/// The count a receiver sends back: 8 big-endian bytes.
pub fn decode_count(reply: &[u8]) -> u64 {
    u64::from_be_bytes(reply.try_into().expect("an 8-byte count"))
}
