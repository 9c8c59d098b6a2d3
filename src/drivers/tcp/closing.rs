//! The lingering close: a closed or dropped connection reads (and drops) what the peer
//! still sends until it is safe to close the socket.
//!
//! A socket closed while bytes from the peer wait unread makes the kernel answer with
//! a reset instead of FIN, and a reset throws away what is still on its way to the
//! peer: the end of the last messages `send` accepted. (Linux's `tcp_close` sends the
//! reset whenever data was unread; data the peer's kernel already acknowledged stays
//! readable there.) So when a transport is closed or its last handle is dropped, its
//! read half is not dropped at once. A [`Closing`] keeps it and reads everything that
//! arrives, dropping it, and lets the socket close only when
//! * the peer ended its side (end of stream, or an error: nothing more can come), or
//! * the send side is finished (every accepted byte written, FIN sent, or writing gave
//!   up) and no byte from the peer arrived for [`QUIET`] (none at all: at once), or
//! * the connection's `linger` time is up.
//!
//! It runs as a task on the connection's runtime, or, once that has shut down, on the
//! linger thread; the process exit hook drives it too ([`crate::linger`]).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::sync::EventListener;
use futures::io::AsyncRead;

use super::send::SendSide;
use crate::linger::{self, Deliver, Delivery, Registration};
use crate::runtime::{Runtime, TcpReader};

/// How long the peer must stay silent, once everything of ours went out, before the
/// socket is closed (at most the linger time).
pub(crate) const QUIET: Duration = Duration::from_millis(500);

/// A read half kept open until the socket can close without a reset.
pub(crate) struct Closing {
    state: Mutex<State>,
    send: Arc<SendSide>,
    deadline: Instant,
    quiet: Duration,
    registration: Mutex<Option<Registration>>,
}

struct State {
    /// `None` once done (dropped: the socket closes when the write half is gone too).
    reader: Option<TcpReader>,
    /// When a byte from the peer last arrived (or was found unread), if ever.
    last_input: Option<Instant>,
    scratch: Vec<u8>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one look at the socket found.
enum Step {
    /// Done: drop the read half.
    Done,
    /// Bytes arrived (and were dropped).
    Input,
    /// Nothing now.
    Nothing,
}

impl Closing {
    /// Keep `reader` open until the socket can close (see the module docs). `unread`:
    /// bytes from the peer were waiting unread when the transport was closed.
    pub(crate) fn new(
        reader: TcpReader,
        send: Arc<SendSide>,
        linger: Duration,
        unread: bool,
    ) -> Arc<Closing> {
        let now = Instant::now();
        let c = Arc::new(Closing {
            state: Mutex::new(State {
                reader: Some(reader),
                last_input: unread.then_some(now),
                scratch: vec![0u8; 16 * 1024],
            }),
            send,
            deadline: crate::time::deadline(now, linger),
            quiet: QUIET.min(linger),
            registration: Mutex::new(None),
        });
        let listed: Weak<dyn Deliver> = Arc::downgrade(&(c.clone() as Arc<dyn Deliver>));
        *c.registration.lock().unwrap_or_else(|p| p.into_inner()) = Some(linger::register(listed));
        c
    }

    /// Run until done: as a task on `rt`, or on the linger thread if `rt` has shut
    /// down.
    pub(crate) fn start(self: Arc<Self>, rt: &Arc<dyn Runtime>) {
        if rt.is_shut_down() {
            linger::adopt(self);
            return;
        }
        let rt2 = rt.clone();
        let guard = Adopt(Some(self.clone()));
        rt.spawn(Box::pin(async move {
            let mut guard = guard;
            self.run(rt2).await;
            guard.0 = None;
        }));
    }

    fn is_done(&self) -> bool {
        lock(&self.state).reader.is_none()
    }

    /// Whether it may close now, for what is known at `now` (the send side's state is
    /// read by the caller).
    fn may_close(&self, st: &State, send_done: bool, now: Instant) -> bool {
        if now >= self.deadline {
            return true;
        }
        send_done
            && st
                .last_input
                .is_none_or(|t| now.duration_since(t) >= self.quiet)
    }

    /// Read what is there without blocking (`cx`: through the runtime, registering the
    /// waker; `None`: straight from the socket).
    fn drain(&self, st: &mut State, cx: Option<&mut Context<'_>>) -> Step {
        let State {
            reader,
            last_input,
            scratch,
        } = st;
        let Some(r) = reader.as_mut() else {
            return Step::Done;
        };
        let res = match cx {
            Some(cx) => match Pin::new(r).poll_read(cx, scratch) {
                Poll::Pending => return Step::Nothing,
                Poll::Ready(res) => res,
            },
            None => r.read_now(scratch),
        };
        match res {
            Ok(0) => Step::Done,
            Ok(_) => {
                *last_input = Some(Instant::now());
                Step::Input
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Nothing,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Input,
            // A broken socket: nothing more can come, nothing more can be lost.
            Err(_) => Step::Done,
        }
    }

    fn finish(&self, st: &mut State) {
        drop(st.reader.take());
    }

    async fn run(self: Arc<Self>, rt: Arc<dyn Runtime>) {
        let mut sent: Option<EventListener> = None;
        let mut timer: Option<(Instant, crate::transport::BoxFuture<'static, ()>)> = None;
        futures::future::poll_fn(|cx| loop {
            let mut st = lock(&self.state);
            match self.drain(&mut st, Some(cx)) {
                Step::Done => {
                    self.finish(&mut st);
                    return Poll::Ready(());
                }
                Step::Input => continue,
                Step::Nothing => {}
            }
            let send_done = self.send.poll_finished(cx, &mut sent).is_ready();
            let now = Instant::now();
            if self.may_close(&st, send_done, now) {
                self.finish(&mut st);
                return Poll::Ready(());
            }
            // Wake at the deadline, or when the quiet time would be over.
            let at = match (send_done, st.last_input) {
                (true, Some(t)) => (t + self.quiet).min(self.deadline),
                _ => self.deadline,
            };
            drop(st);
            if timer.as_ref().is_none_or(|(when, _)| *when != at) {
                timer = Some((at, rt.sleep(at.saturating_duration_since(now))));
            }
            let (_, sleep) = timer.as_mut().expect("set above");
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // A timer of a runtime that shut down fires at once: go on without the
            // runtime, on the linger thread.
            if rt.is_shut_down() && Instant::now() < at {
                linger::adopt(self.clone());
                return Poll::Ready(());
            }
        })
        .await
    }
}

/// The task of a [`Closing`], dropped by its runtime before it was done (a runtime
/// shutting down drops its tasks): the linger thread takes over.
struct Adopt(Option<Arc<Closing>>);

impl Drop for Adopt {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            if !c.is_done() {
                linger::adopt(c);
            }
        }
    }
}

impl Deliver for Closing {
    fn deliver_now(&self) -> Delivery {
        let Ok(mut st) = self.state.try_lock() else {
            return Delivery::Blocked;
        };
        let mut moved = false;
        loop {
            match self.drain(&mut st, None) {
                Step::Done => {
                    self.finish(&mut st);
                    return Delivery::Done;
                }
                Step::Input => moved = true,
                Step::Nothing => break,
            }
        }
        let send_done = self.send.is_finished();
        if self.may_close(&st, send_done, Instant::now()) {
            self.finish(&mut st);
            return Delivery::Done;
        }
        if moved {
            Delivery::Wrote
        } else {
            Delivery::Blocked
        }
    }

    fn give_up(&self) {
        self.finish(&mut lock(&self.state));
    }

    fn linger(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}
