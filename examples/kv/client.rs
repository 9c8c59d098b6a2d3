//! The client: a net-rs `ConnectionPool` shared by many tasks, each issuing
//! `pool.request(...)` until the total is reached, checking every reply.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use net_rs::pool::{ConnectionPool, PoolConfig, TcpConnector};

use crate::proto::{Reply, Request};

/// How long one request may take before the run fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole run (all requests) may take before it fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Distinct keys the workload uses.
const KEYS: usize = 1024;
/// Every fifth request is a SET, the others are GETs.
const SET_EVERY: u64 = 5;

/// The requests of the workload, encoded once (16-byte keys, 64-byte values), and the
/// values a GET must return.
pub struct Workload {
    gets: Vec<Bytes>,
    sets: Vec<Bytes>,
    values: Vec<Bytes>,
}

impl Workload {
    pub fn new() -> Workload {
        let mut w = Workload {
            gets: Vec::with_capacity(KEYS),
            sets: Vec::with_capacity(KEYS),
            values: Vec::with_capacity(KEYS),
        };
        for i in 0..KEYS {
            let key = format!("key-{i:012}");
            let value = format!("value-{i:058}");
            assert_eq!((key.len(), value.len()), (16, 64));
            w.gets.push(Request::Get(key.as_bytes()).encode());
            w.sets
                .push(Request::Set(key.as_bytes(), value.as_bytes()).encode());
            w.values.push(Bytes::from(value));
        }
        w
    }

    /// Request `n`: its message, and the value a GET must return (`None` for a SET).
    fn request(&self, n: u64) -> (Bytes, Option<&Bytes>) {
        // Spread consecutive requests over the keys.
        let key = (n.wrapping_mul(7919) % KEYS as u64) as usize;
        if n % SET_EVERY == 0 {
            (self.sets[key].clone(), None)
        } else {
            (self.gets[key].clone(), Some(&self.values[key]))
        }
    }
}

/// The pool every run uses: `max_size` connections to `addr`, bounded waits.
pub fn pool(addr: SocketAddr, max_size: usize) -> net_rs::Result<ConnectionPool<TcpConnector>> {
    ConnectionPool::new(
        TcpConnector::new(addr),
        PoolConfig::default()
            .max_size(max_size)
            .checkout_timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT)
            .request_timeout(Some(REQUEST_TIMEOUT)),
    )
}

/// Set every key of the workload (so every GET of the timed part finds its value), with
/// `clients` tasks; this also opens the pool's connections.
pub async fn warm_up(
    pool: &ConnectionPool<TcpConnector>,
    work: &Arc<Workload>,
    clients: usize,
) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (pool, work, next) = (pool.clone(), work.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= KEYS {
                        return Ok(());
                    }
                    let reply = pool
                        .request(work.sets[i].clone())
                        .await
                        .map_err(|e| format!("warm-up SET: {e}"))?;
                    check(Bytes::clone(&reply), None)?;
                }
            })
        })
        .collect();
    join(tasks).await
}

/// Issue `total` requests from `clients` tasks sharing `pool`; every reply is checked.
/// Returns the time from the first request to the last reply.
pub async fn drive(
    pool: &ConnectionPool<TcpConnector>,
    work: &Arc<Workload>,
    clients: usize,
    total: u64,
) -> Result<Duration, String> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (pool, work, next) = (pool.clone(), work.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return Ok(());
                    }
                    let (msg, expect) = work.request(n);
                    let result = match pool.request(msg).await {
                        Ok(reply) => check(reply, expect),
                        Err(e) => Err(format!("{e} (pool: {})", pool.status())),
                    };
                    if let Err(e) = result {
                        // Stop the other tasks too: the run has failed.
                        next.store(total, Ordering::Relaxed);
                        return Err(format!("request {n}: {e}"));
                    }
                }
            })
        })
        .collect();
    join(tasks).await?;
    Ok(start.elapsed())
}

/// A SET must be answered OK, a GET with exactly the value that was set.
fn check(reply: Bytes, expect: Option<&Bytes>) -> Result<(), String> {
    match (Reply::decode(reply)?, expect) {
        (Reply::Ok, None) => Ok(()),
        (Reply::Value(v), Some(want)) if v == want => Ok(()),
        (got, want) => Err(format!("wrong reply {got:?}, expected {want:?}")),
    }
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>) -> Result<(), String> {
    let mut first_err = None;
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| Err(format!("client task: {e}")));
        if let (Err(e), None) = (r, &first_err) {
            first_err = Some(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}
