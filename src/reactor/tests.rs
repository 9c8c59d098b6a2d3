//! Reactor tests with the fake completion source: no device, no runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use super::*;

struct CountWake(AtomicUsize);
impl Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Drops bump a counter, so tests see exactly when kept memory is released.
struct DropFlag(Arc<AtomicUsize>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn wr_id_packs_key_and_generation() {
    let id = WrId::new(0xDEAD_BEEF, 7);
    assert_eq!(WrId::from_u64(id.to_u64()), id);
    assert_eq!((id.key(), id.gen()), (0xDEAD_BEEF, 7));
}

#[test]
fn completion_wakes_the_future_and_returns_what_it_kept() {
    let slab = OpSlab::new();
    let mut fut = slab.register(Box::new(42u32));
    let counter = Arc::new(CountWake(AtomicUsize::new(0)));
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(std::pin::Pin::new(&mut fut).poll(&mut cx).is_pending());
    let mut c = Completion::success(fut.wr_id().to_u64());
    c.byte_len = 9;
    let mut unknown = Vec::new();
    slab.complete_batch(&[c], &mut unknown);
    assert!(unknown.is_empty());
    assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken exactly once");
    match std::pin::Pin::new(&mut fut).poll(&mut cx) {
        Poll::Ready((done, keep)) => {
            assert_eq!(done.byte_len, 9);
            assert_eq!(*keep.downcast::<u32>().unwrap(), 42);
        }
        Poll::Pending => panic!("completed op still pending"),
    }
    drop(fut);
    assert_eq!(slab.in_flight(), 0);
}

#[test]
fn dropped_future_keeps_memory_until_the_completion() {
    let slab = OpSlab::new();
    let drops = Arc::new(AtomicUsize::new(0));
    let fut = slab.register(Box::new(DropFlag(drops.clone())));
    let id = fut.wr_id();
    drop(fut);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "hardware may still use it");
    assert_eq!(slab.in_flight(), 1);
    slab.complete_batch(&[Completion::success(id.to_u64())], &mut Vec::new());
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "released by the completion"
    );
    assert_eq!(slab.in_flight(), 0);
}

#[test]
fn stale_and_unknown_wr_ids_do_not_reach_reused_slots() {
    let slab = OpSlab::new();
    let first = slab.register(Box::new(()));
    let stale = first.wr_id();
    slab.complete_batch(&[Completion::success(stale.to_u64())], &mut Vec::new());
    drop(first);
    let second = slab.register(Box::new(()));
    assert_eq!(second.wr_id().key(), stale.key(), "slot reused");
    let mut unknown = Vec::new();
    slab.complete_batch(
        &[
            Completion::success(stale.to_u64()),
            Completion::success(u64::MAX),
        ],
        &mut unknown,
    );
    assert_eq!(unknown.len(), 2, "neither completes the new op");
    assert_eq!(slab.in_flight(), 1);
    let keep = slab.cancel_unposted(second);
    assert!(keep.is_some());
    assert_eq!(slab.in_flight(), 0);
}

#[test]
fn poller_thread_delivers_to_futures_and_sleeps_when_idle() {
    let slab = OpSlab::new();
    let source = FakeSource::new();
    let s2 = slab.clone();
    let poller = Poller::new(
        source.clone(),
        move |batch: &[Completion]| s2.complete_batch(batch, &mut Vec::new()),
        PollerConfig {
            spin: Duration::from_micros(10),
            yield_window: Duration::from_micros(10),
            ..PollerConfig::default()
        },
    )
    .spawn("test-poller")
    .unwrap();
    // Idle: the thread must arm and sleep rather than spin forever.
    let t0 = Instant::now();
    while source.arms() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(if cfg!(miri) { 600 } else { 5 }),
            "poller never went to sleep"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let rounds = if cfg!(miri) { 5 } else { 50 };
    for round in 0..rounds {
        let futs: Vec<OpFuture> = (0..20).map(|i| slab.register(Box::new(i))).collect();
        let ids: Vec<u64> = futs.iter().map(|f| f.wr_id().to_u64()).collect();
        let feeder = source.clone();
        let t = std::thread::spawn(move || {
            if round % 2 == 0 {
                // Sometimes after the poller has gone back to sleep.
                std::thread::sleep(Duration::from_millis(2));
            }
            feeder.push(ids.into_iter().map(Completion::success));
        });
        let results = futures::executor::block_on(futures::future::join_all(futs));
        t.join().unwrap();
        let mut kept: Vec<i32> = results
            .into_iter()
            .map(|(c, k)| {
                assert!(c.is_success());
                *k.downcast::<i32>().unwrap()
            })
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, (0..20).collect::<Vec<_>>());
    }
    assert_eq!(
        poller.stats().completions.load(Ordering::Relaxed),
        20 * rounds
    );
    assert!(poller.stats().sleeps.load(Ordering::Relaxed) > 0);
    poller.shutdown();
}

#[test]
fn failing_source_stops_the_poller_with_an_error() {
    let source = FakeSource::new();
    let poller = Poller::new(
        source.clone(),
        |_: &[Completion]| {},
        PollerConfig::default(),
    )
    .spawn("failing-poller")
    .unwrap();
    source.fail();
    let t0 = Instant::now();
    while poller.failure().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(if cfg!(miri) { 600 } else { 5 }),
            "failure not reported"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(poller.failure().unwrap().contains("failed"));
}

/// A source whose first arm finds a completion that landed just before it took effect
/// (so the hardware raises no notification for it).
struct LandsBeforeArm {
    inner: FakeSource,
    early: Option<Completion>,
}

impl CompletionSource for LandsBeforeArm {
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> std::io::Result<usize> {
        self.inner.poll(out, max)
    }
    fn arm(&mut self) -> std::io::Result<()> {
        // Not armed yet: this push raises no notification.
        if let Some(c) = self.early.take() {
            self.inner.push([c]);
        }
        self.inner.arm()
    }
    fn wait(&mut self, timeout: Duration) -> std::io::Result<bool> {
        self.inner.wait(timeout)
    }
}

/// The arm race: a completion that arrives between "poll found nothing" and "arm" must
/// be found by the poll after the arm, not after the sleep (3 s here) times out.
#[test]
#[cfg_attr(miri, ignore = "real-time bound")]
fn a_completion_just_before_the_arm_does_not_wait_for_the_sleep() {
    let slab = OpSlab::new();
    let fut = slab.register(Box::new(7u32));
    let source = LandsBeforeArm {
        inner: FakeSource::new(),
        early: Some(Completion::success(fut.wr_id().to_u64())),
    };
    let s2 = slab.clone();
    let poller = Poller::new(
        source,
        move |batch: &[Completion]| s2.complete_batch(batch, &mut Vec::new()),
        PollerConfig {
            spin: Duration::from_micros(10),
            yield_window: Duration::from_micros(10),
            park_timeout: Duration::from_secs(3),
            ..PollerConfig::default()
        },
    )
    .spawn("test-arm-race")
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(futures::executor::block_on(fut));
    });
    let (c, _) = rx
        .recv_timeout(Duration::from_secs(1))
        .expect("the completion waited for the poller's sleep to end");
    assert!(c.is_success());
    poller.shutdown();
}
