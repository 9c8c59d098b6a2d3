//! RDMA-CM events after connection setup, routed to the connection they concern.
//!
//! RDMA-CM reports a peer's disconnect (or death: the peer's kernel disconnects for
//! it), a device removal or a failed handshake as events on the identifier's event
//! channel. Each connection's identifier carries a [`Watch`] (its user context); whoever
//! reads the channel calls [`dispatch`], which hands the event to that watch:
//!
//! * a connecting side owns its channel, and the poller thread of its device reads it
//!   while it sleeps (`CqSource::watch_cm`, handed on to the device reactor), so no
//!   extra thread;
//! * accepted connections share the listener's channel, which the listener's thread
//!   reads for as long as the listener or any connection it accepted is alive.
//!
//! The watch records `Established` (what `accept` waits for) and the first event that
//! ends the connection, and runs the connection's `on_gone` callback once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use sideway::rdmacm::communication_manager::{Event, EventChannel, EventType, Identifier};

use crate::error::{Error, ErrorKind, Result};

type OnGone = Box<dyn FnOnce(String) + Send>;

#[derive(Default)]
struct WatchState {
    established: bool,
    gone: Option<String>,
    on_gone: Option<OnGone>,
}

/// What RDMA-CM said about one connection.
#[derive(Default)]
pub(super) struct Watch {
    state: Mutex<WatchState>,
    cv: Condvar,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attach a fresh watch to `id` and return it.
    pub(crate) fn attach(id: &Identifier) -> Arc<Watch> {
        id.setup_context(Watch::default());
        id.get_context::<Watch>()
            .expect("the context was just set to a Watch")
    }

    /// The watch attached to `id`, if any.
    pub(crate) fn of(id: &Identifier) -> Option<Arc<Watch>> {
        id.get_context::<Watch>()
    }

    fn deliver(&self, ty: EventType, status: i32) {
        let mut st = self.lock();
        match ty {
            EventType::Established => st.established = true,
            EventType::Disconnected
            | EventType::DeviceRemoval
            | EventType::ConnectError
            | EventType::Unreachable
            | EventType::Rejected => {
                if st.gone.is_none() {
                    let why = format!("RDMA-CM reported {ty:?} (status {status})");
                    st.gone = Some(why.clone());
                    if let Some(f) = st.on_gone.take() {
                        drop(st);
                        self.cv.notify_all();
                        f(why);
                        return;
                    }
                }
            }
            _ => return,
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Run `f` once when the connection ends (now, if it already has).
    pub(crate) fn on_gone(&self, f: impl FnOnce(String) + Send + 'static) {
        let mut st = self.lock();
        match st.gone.clone() {
            Some(why) => {
                drop(st);
                f(why);
            }
            None => st.on_gone = Some(Box::new(f)),
        }
    }

    /// Wait (blocking) until the connection is established, fails, or `deadline` passes.
    pub(crate) fn wait_established(&self, deadline: Instant, what: &str) -> Result<()> {
        let mut st = self.lock();
        loop {
            if let Some(why) = &st.gone {
                return Err(Error::new(
                    ErrorKind::ConnectionRefused,
                    format!("{what}: {why}"),
                ));
            }
            if st.established {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("{what}: timed out waiting for the connection to be established"),
                ));
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Hand `ev` to the watch of its identifier (events of identifiers without one are
/// dropped). The event is acknowledged before the watch runs, so a callback that ends
/// up destroying the identifier never waits for its own event.
pub(crate) fn dispatch(ev: Event) {
    let (ty, status, id) = (ev.event_type(), ev.status(), ev.cm_id());
    drop(ev);
    if let Some(watch) = id.as_deref().and_then(Watch::of) {
        watch.deliver(ty, status);
    }
}

/// Take every event waiting on the non-blocking `ch`, handing each to `handle`.
pub(crate) fn drain(ch: &Arc<EventChannel>, mut handle: impl FnMut(Event)) {
    while let Ok(ev) = ch.get_cm_event() {
        handle(ev);
    }
}
