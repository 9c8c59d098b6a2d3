//! Benchmark of the runtime-free completion reactor alone, on one core, with a fake
//! completion source: how many completions per second reach woken futures, and the
//! cost of one completion (register the op, deliver its completion, wake and poll its
//! future, collect what it kept).
//!
//! `cargo run --release --example reactor_bench [-- SECONDS]`

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use net_rs::reactor::{Completion, FakeSource, OpFuture, OpSlab, Poller, PollerConfig};

struct Count(AtomicU64);
impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    const BATCH: usize = 256;
    let slab = OpSlab::new();
    let source = FakeSource::new();
    let s2 = slab.clone();
    let mut poller = Poller::new(
        source.clone(),
        move |batch: &[Completion]| s2.complete_batch(batch, &mut Vec::new()),
        PollerConfig {
            batch: 64,
            ..PollerConfig::default()
        },
    );
    let wakes = Arc::new(Count(AtomicU64::new(0)));
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    let mut futs: Vec<OpFuture> = Vec::with_capacity(BATCH);
    let mut ids: Vec<Completion> = Vec::with_capacity(BATCH);
    let mut total = 0u64;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        for i in 0..BATCH {
            let f = slab.register(Box::new(i));
            ids.push(Completion::success(f.wr_id().to_u64()));
            futs.push(f);
        }
        // Every future is pending (and has registered its waker) before completions come.
        for f in futs.iter_mut() {
            assert!(Pin::new(f).poll(&mut cx).is_pending());
        }
        source.push(ids.drain(..));
        let mut delivered = 0;
        while delivered < BATCH {
            delivered += poller.run_once().expect("fake source");
        }
        for f in futs.iter_mut() {
            match Pin::new(f).poll(&mut cx) {
                Poll::Ready((c, _keep)) => assert!(c.is_success()),
                Poll::Pending => panic!("completion not delivered"),
            }
        }
        futs.clear();
        total += BATCH as u64;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    assert_eq!(
        wakes.0.load(Ordering::Relaxed),
        total,
        "one wake per completion"
    );
    assert_eq!(slab.in_flight(), 0);
    println!(
        "reactor: {total} completions in {elapsed:.2} s on one thread: {:.2} M completions/s, {:.0} ns per completion (register + deliver + wake + poll)",
        total as f64 / elapsed / 1e6,
        elapsed * 1e9 / total as f64
    );
}
