//! The synchronisation primitives of the TCP send side, swapped for loom's under
//! `--cfg net_rs_loom` so its hand-off of the socket can be model-checked:
//!
//! ```text
//! RUSTFLAGS="--cfg net_rs_loom" cargo test --release --no-default-features --lib loom
//! ```
//!
//! A cfg of our own rather than the customary `loom`: `--cfg loom` reaches every crate
//! in the build, and the async-io dev-dependency does not build under it. Under the
//! model, `Event` is a small loom-visible stand-in with event-listener's check → listen
//! → re-check contract (a listener created before a `notify` completes).

#[cfg(not(net_rs_loom))]
pub(crate) use event_listener::{Event, EventListener};
#[cfg(not(net_rs_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(net_rs_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(net_rs_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, Ordering};
#[cfg(net_rs_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(net_rs_loom)]
pub(crate) use model::{Event, EventListener};

#[cfg(net_rs_loom)]
mod model {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use loom::sync::Mutex;

    /// Notifies every listener created before the notification.
    #[derive(Debug, Default)]
    pub(crate) struct Event {
        inner: Arc<Mutex<(u64, Vec<Waker>)>>,
    }

    #[derive(Debug)]
    pub(crate) struct EventListener {
        inner: Arc<Mutex<(u64, Vec<Waker>)>>,
        generation: u64,
    }

    impl Event {
        pub(crate) fn new() -> Self {
            Event::default()
        }

        pub(crate) fn listen(&self) -> EventListener {
            let generation = self.inner.lock().unwrap().0;
            EventListener {
                inner: self.inner.clone(),
                generation,
            }
        }

        pub(crate) fn notify(&self, _n: usize) {
            let wakers = {
                let mut g = self.inner.lock().unwrap();
                g.0 += 1;
                std::mem::take(&mut g.1)
            };
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    impl Future for EventListener {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let mut g = self.inner.lock().unwrap();
            if g.0 != self.generation {
                return Poll::Ready(());
            }
            g.1.push(cx.waker().clone());
            Poll::Pending
        }
    }
}
