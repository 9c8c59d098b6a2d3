//! [`Budget`]: how much of a peer's input one poll may consume before it yields.
//!
//! A poll that loops over what a peer sent (skipping empty messages, reading requests
//! that need no work) returns only when it runs out of input. On a runtime without a
//! cooperative budget of its own (async-io under smol or async-std, most hand-written
//! executors) a peer that keeps sending such input would hold the task's thread for as
//! long as it likes: the task's own timeouts, and every other task on that thread,
//! would wait. Each such loop takes a [`Budget`] at the start of the poll and spends a
//! step per input; once it is spent the poll wakes its task and returns `Pending`, so
//! the executor runs the others (and the timers) before it polls this one again. The
//! state of the loop lives outside the poll, so nothing is lost in between.

use std::task::{Context, Poll};

/// Inputs one poll consumes before it yields (tokio's own budget per task poll is 128
/// operations; a step here is a whole message).
const STEPS: u32 = 64;

/// A per-poll count of consumed inputs; see the module docs.
#[derive(Debug)]
pub(crate) struct Budget {
    left: u32,
}

impl Budget {
    /// A full budget, for one poll.
    pub(crate) fn new() -> Self {
        Budget { left: STEPS }
    }

    /// Spend a step: `Ready` while steps are left; otherwise the task is woken (it is
    /// polled again after the others) and `Pending` returned.
    pub(crate) fn spend(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.left == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.left -= 1;
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_spent_budget_yields_and_wakes_its_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut b = Budget::new();
        for _ in 0..STEPS {
            assert!(b.spend(&mut cx).is_ready());
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert!(b.spend(&mut cx).is_pending());
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "woken to be polled again"
        );
    }
}
