//! Connection setup with RDMA-CM: reliable-connected queue pairs between two hosts.
//!
//! [`connect_qp`] and [`CmListener`] run the RDMA-CM handshake (address and route
//! resolution, connect/accept, the QP's INIT → RTR → RTS transitions from
//! `rdma_init_qp_attr`, with no remote access granted) on the calling thread, waiting on the event channel's file
//! descriptor with a deadline, and hand back a [`CmConnection`]: the identifier, a
//! context on the resolved device, a completion queue for the reactor and the connected
//! queue pair. Receives can be posted by the `before_connect` hook before the peer can
//! send. This is the connection layer the RDMA `Transport` will sit on.
//!
//! Errors: no listener gives [`ConnectionRefused`](ErrorKind::ConnectionRefused), a
//! passed deadline [`TimedOut`](ErrorKind::TimedOut), no RDMA support
//! [`Unsupported`](ErrorKind::Unsupported).

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairState};
use sideway::ibverbs::AccessFlags;
use sideway::rdmacm::communication_manager::{
    ConnectionParameter, Event, EventChannel, EventType, GetEventErrorKind, Identifier, PortSpace,
};

pub use super::config::{QpTiming, CQ_ENTRIES, QUEUE_DEPTH};
use super::context::RdmaContext;
use super::events::{self, Watch};
use super::poller::CqSource;
use crate::error::{Error, ErrorKind, Result};

// The transport-level face (`connect`, `listen`) lives in the driver's root module;
// re-exported here so the paths it always had keep working.
pub use super::{connect, connect_with, listen, RdmaListener};

/// How long [`CmListener::accept`] gives a taken request's handshake (the default of
/// `RdmaConfig::handshake_timeout`).
const ACCEPT_HANDSHAKE: Duration = Duration::from_secs(10);

/// A connected RC queue pair and what it needs.
pub struct CmConnection {
    /// The connected queue pair. Dropped first.
    pub qp: BasicQueuePair,
    /// The completion queue of both directions, to run a poller on (take it).
    pub source: Option<CqSource>,
    /// The device context the connection lives on.
    pub context: RdmaContext,
    /// The queue pair's path MTU in bytes (256 to 4096): the largest packet it sends.
    pub path_mtu: u32,
    handle: CmHandle,
}

/// Keeps a connection's RDMA-CM identifier (and its event channel) alive.
pub struct CmHandle {
    // The identifier keeps its event channel alive itself.
    id: Arc<Identifier>,
}

impl CmHandle {
    /// Start an orderly disconnect (the peer sees `Disconnected`).
    ///
    /// # Errors
    /// The RDMA-CM error, if any.
    pub fn disconnect(&self) -> Result<()> {
        self.id
            .disconnect()
            .map_err(|e| Error::new(ErrorKind::ConnectionReset, format!("rdma_disconnect: {e}")))
    }

    /// Run `f` once when RDMA-CM reports the connection ended (peer disconnected or
    /// died, device removed), or at once if it already has.
    pub fn on_gone(&self, f: impl FnOnce(String) + Send + 'static) {
        if let Some(w) = Watch::of(&self.id) {
            w.on_gone(f);
        }
    }
}

impl fmt::Debug for CmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmHandle").finish_non_exhaustive()
    }
}

impl CmConnection {
    /// Split into the queue pair, the completion source, the context and the handle
    /// that keeps the RDMA-CM identifier alive.
    pub fn into_parts(self) -> (BasicQueuePair, Option<CqSource>, RdmaContext, CmHandle) {
        (self.qp, self.source, self.context, self.handle)
    }

    /// Start an orderly disconnect (the peer sees `Disconnected`).
    ///
    /// # Errors
    /// The RDMA-CM error, if any.
    pub fn disconnect(&self) -> Result<()> {
        self.handle.disconnect()
    }
}

impl fmt::Debug for CmConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmConnection")
            .field("qp_number", &self.qp.qp_number())
            .finish_non_exhaustive()
    }
}

fn cm_error(kind: ErrorKind, what: &str, e: impl fmt::Display) -> Error {
    Error::new(kind, format!("{what}: {e}"))
}

fn channel() -> Result<Arc<EventChannel>> {
    let ch = EventChannel::new().map_err(|e| {
        cm_error(
            ErrorKind::Unsupported,
            "RDMA unavailable: cannot create an RDMA-CM event channel (is librdmacm1 installed \
             and the kernel built with RDMA?)",
            e,
        )
    })?;
    ch.set_nonblocking(true)
        .map_err(|e| cm_error(ErrorKind::Io(e.kind()), "RDMA-CM channel", e))?;
    Ok(ch)
}

fn ms(d: Duration) -> Duration {
    d.clamp(Duration::from_millis(1), Duration::from_secs(3600))
}

/// The next event on `ch`, waiting until `deadline`.
fn next_event(ch: &Arc<EventChannel>, deadline: Instant, what: &str) -> Result<Event> {
    loop {
        match ch.get_cm_event() {
            Ok(ev) => return Ok(ev),
            Err(e) if matches!(e.0, GetEventErrorKind::NoEvent) => {}
            Err(e) => return Err(cm_error(ErrorKind::Io(std::io::ErrorKind::Other), what, e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!("{what}: timed out waiting for RDMA-CM"),
            ));
        }
        let mut fds = libc::pollfd {
            fd: ch.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = left.as_millis().clamp(1, 100) as i32;
        // SAFETY: `fds` is one valid, initialized pollfd that outlives the call.
        unsafe { libc::poll(&mut fds, 1, wait) };
    }
}

/// Expect an event of type `want`; map the failure events to errors.
fn expect(ev: Event, want: EventType, what: &str) -> Result<Event> {
    let ty = ev.event_type();
    if ty == want {
        return Ok(ev);
    }
    let status = ev.status();
    let kind = match ty {
        EventType::Rejected | EventType::Unreachable | EventType::ConnectError => {
            ErrorKind::ConnectionRefused
        }
        EventType::AddressError | EventType::RouteError => ErrorKind::ConnectionRefused,
        _ => ErrorKind::Io(std::io::ErrorKind::Other),
    };
    Err(Error::new(
        kind,
        format!("{what}: RDMA-CM answered {ty:?} (status {status}) instead of {want:?}"),
    ))
}

/// Create the QP for `id` on its device (its CQ from `make_cq`) and move it to INIT.
fn make_qp(
    id: &Arc<Identifier>,
    make_cq: impl FnOnce(&RdmaContext) -> Result<CqSource>,
) -> Result<(RdmaContext, CqSource, BasicQueuePair)> {
    let dev = id.get_device_context().ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "RDMA-CM resolved the address to no RDMA device",
        )
    })?;
    let ctx = RdmaContext::from_device(dev)?;
    let source = make_cq(&ctx)?;
    let cq = source.cq().clone();
    let mut qp = ctx
        .protection_domain()
        .create_qp_builder()
        .setup_max_send_wr(QUEUE_DEPTH)
        .setup_max_recv_wr(QUEUE_DEPTH)
        .setup_send_cq(cq.clone())
        .setup_recv_cq(cq)
        .build()
        .map_err(|e| cm_error(ErrorKind::Registration, "cannot create a queue pair", e))?;
    move_qp(id, &ctx, &mut qp, QueuePairState::Init, QpTiming::default())?;
    Ok((ctx, source, qp))
}

/// Bytes in a packet of path MTU `mtu` (an `ibv_mtu`: 1 is 256 bytes ... 5 is 4096).
fn mtu_bytes(mtu: u32) -> u32 {
    128 << mtu.clamp(1, 5)
}

/// Move `qp` to `state` with the attributes RDMA-CM gives for it, except: no remote
/// access (INIT), a path MTU no larger than the local port's active MTU (RTR), and the
/// retransmission `timing` (RTS). Returns the path MTU in bytes at RTR, else 0.
fn move_qp(
    id: &Arc<Identifier>,
    ctx: &RdmaContext,
    qp: &mut BasicQueuePair,
    state: QueuePairState,
    timing: QpTiming,
) -> Result<u32> {
    let mut attr = id.get_qp_attr(state).map_err(|e| {
        cm_error(
            ErrorKind::Io(std::io::ErrorKind::Other),
            "rdma_init_qp_attr",
            e,
        )
    })?;
    if state == QueuePairState::Init {
        // RDMA-CM's defaults let the peer READ and WRITE (and use atomics on) any
        // memory this QP's PD registered for it. net-rs does SEND/RECV only: no
        // remote access at all (its memory is registered for local access too).
        attr.setup_access_flags(AccessFlags::none());
    }
    let mut path_mtu = 0;
    if state == QueuePairState::ReadyToReceive {
        // On the accepting side RDMA-CM takes the path MTU from the connect request,
        // i.e. from the *other* host's link, which may allow more than this one: a
        // packet larger than the local port's MTU would never leave (the connection
        // would hang on every message past it). Clamp to the port; the hello tells
        // the peer this port's MTU so it sends no larger packets either.
        let path = attr.path_mtu() as u32;
        let local = ctx
            .device_context()
            .query_port(id.port())
            .map(|p| p.attr.active_mtu)
            .unwrap_or(path);
        let mtu = if (1..path).contains(&local) {
            local
        } else {
            path
        };
        if mtu != path {
            attr.setup_path_mtu(Mtu::from(mtu));
        }
        path_mtu = mtu_bytes(mtu);
    }
    if state == QueuePairState::ReadyToSend {
        // sideway 0.4.3 cannot set these in the CM connection parameters. A packet
        // the peer does not acknowledge is sent again after `timing.timeout_exp`
        // (4.096 µs × 2^n) at most `timing.retry_cnt` times (never 7, which Soft-RoCE
        // takes as "forever"), then the send fails: a dead link or host is an error in
        // bounded time. Should a receiver ever be not ready (credits prevent it),
        // retry without limit instead of failing the connection: the device's RNR
        // counters show it (`RdmaContext::rnr_events`).
        attr.setup_timeout(timing.timeout_exp)
            .setup_retry_cnt(timing.retry_cnt)
            .setup_rnr_retry(7);
    }
    qp.modify(&attr).map_err(|e| {
        cm_error(
            ErrorKind::Io(std::io::ErrorKind::Other),
            &format!("cannot move the queue pair to {state:?}"),
            e,
        )
    })?;
    Ok(path_mtu)
}

fn conn_param(qp: &BasicQueuePair) -> ConnectionParameter {
    let mut p = ConnectionParameter::default();
    p.setup_qp_number(qp.qp_number());
    p
}

/// Connect an RC queue pair to `addr`, blocking the calling thread for at most
/// `timeout`. `before_connect` runs once the QP exists (INIT), e.g. to post receives.
///
/// # Errors
/// `ConnectionRefused` (no listener, unreachable), `TimedOut`, `Unsupported`, or the
/// error of `before_connect`.
pub fn connect_qp(
    addr: SocketAddr,
    timeout: Duration,
    before_connect: impl FnOnce(&RdmaContext, &mut BasicQueuePair) -> Result<()>,
) -> Result<CmConnection> {
    connect_qp_with(
        addr,
        timeout,
        QpTiming::default(),
        |ctx| CqSource::new(ctx, CQ_ENTRIES),
        before_connect,
    )
}

/// [`connect_qp`] with the retransmission `timing` and the CQ made by `make_cq` (e.g.
/// on a shared completion channel).
pub(crate) fn connect_qp_with(
    addr: SocketAddr,
    timeout: Duration,
    timing: QpTiming,
    make_cq: impl FnOnce(&RdmaContext) -> Result<CqSource>,
    before_connect: impl FnOnce(&RdmaContext, &mut BasicQueuePair) -> Result<()>,
) -> Result<CmConnection> {
    let deadline = crate::time::deadline(Instant::now(), timeout);
    let ch = channel()?;
    let id = ch
        .create_id(PortSpace::Tcp)
        .map_err(|e| cm_error(ErrorKind::Unsupported, "rdma_create_id", e))?;
    Watch::attach(&id);
    let what = format!("RDMA connect to {addr}");
    id.resolve_addr(None, addr, ms(timeout))
        .map_err(|e| cm_error(ErrorKind::ConnectionRefused, &what, e))?;
    drop(expect(
        next_event(&ch, deadline, &format!("{what} (resolving the address)"))?,
        EventType::AddressResolved,
        &what,
    )?);
    id.resolve_route(ms(deadline.saturating_duration_since(Instant::now())))
        .map_err(|e| cm_error(ErrorKind::ConnectionRefused, &what, e))?;
    drop(expect(
        next_event(&ch, deadline, &format!("{what} (resolving the route)"))?,
        EventType::RouteResolved,
        &what,
    )?);
    let (context, source, mut qp) = make_qp(&id, make_cq)?;
    before_connect(&context, &mut qp)?;
    id.connect(conn_param(&qp))
        .map_err(|e| cm_error(ErrorKind::ConnectionRefused, &what, e))?;
    drop(expect(
        next_event(
            &ch,
            deadline,
            &format!("{what} (waiting for the peer to accept)"),
        )?,
        EventType::ConnectResponse,
        &what,
    )?);
    let path_mtu = move_qp(
        &id,
        &context,
        &mut qp,
        QueuePairState::ReadyToReceive,
        timing,
    )?;
    move_qp(&id, &context, &mut qp, QueuePairState::ReadyToSend, timing)?;
    id.establish()
        .map_err(|e| cm_error(ErrorKind::ConnectionReset, &what, e))?;
    // From now on the poller reads this connection's channel while it sleeps.
    let mut source = source;
    source.watch_cm(ch.clone());
    Ok(CmConnection {
        qp,
        source: Some(source),
        context,
        path_mtu,
        handle: CmHandle { id },
    })
}

/// A listening RDMA-CM identifier.
///
/// A thread of its own ("net-rs-rdma-listen") reads the listener's event channel: it
/// queues connect requests for [`accept`](CmListener::accept) and hands every other
/// event to the accepted connection it concerns (see the driver's `events` module). The thread ends
/// once the listener and every connection it accepted are gone.
pub struct CmListener {
    id: Arc<Identifier>,
    requests: crossbeam_channel::Receiver<Arc<Identifier>>,
    stop: Arc<AtomicBool>,
}

/// The listener thread: read `ch` until the listener is dropped and no identifier
/// created on `ch` is left (each holds a reference to it).
fn listen_loop(
    ch: Arc<EventChannel>,
    tx: crossbeam_channel::Sender<Arc<Identifier>>,
    stop: Arc<AtomicBool>,
) {
    let mut tx = Some(tx);
    loop {
        if stop.load(Ordering::Acquire) {
            // Unaccepted requests die with the queue: their identifiers are destroyed
            // (the peer sees a rejection) and release the channel.
            tx = None;
            if Arc::strong_count(&ch) == 1 {
                return;
            }
        }
        let mut fds = libc::pollfd {
            fd: ch.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fds` is one valid, initialized pollfd that outlives the call.
        unsafe { libc::poll(&mut fds, 1, 100) };
        events::drain(&ch, |ev| {
            if ev.event_type() != EventType::ConnectRequest {
                return events::dispatch(ev);
            }
            let id = ev.cm_id();
            drop(ev);
            if let (Some(id), Some(tx)) = (id, &tx) {
                let _ = tx.send(id);
            }
        });
    }
}

impl CmListener {
    /// Listen on `addr` (a local IP of an RDMA device, or `0.0.0.0`; not `127.0.0.1`).
    ///
    /// # Errors
    /// `Unsupported` without RDMA; the bind or listen error.
    pub fn bind(addr: SocketAddr) -> Result<CmListener> {
        let ch = channel()?;
        let id = ch
            .create_id(PortSpace::Tcp)
            .map_err(|e| cm_error(ErrorKind::Unsupported, "rdma_create_id", e))?;
        id.bind_addr(addr).map_err(|e| {
            cm_error(
                ErrorKind::Io(std::io::ErrorKind::AddrNotAvailable),
                &format!("rdma_bind_addr {addr}"),
                e,
            )
        })?;
        id.listen(128)
            .map_err(|e| cm_error(ErrorKind::Io(std::io::ErrorKind::Other), "rdma_listen", e))?;
        let (tx, requests) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::Builder::new()
            .name("net-rs-rdma-listen".into())
            .spawn(move || listen_loop(ch, tx, s))
            .map_err(Error::from)?;
        Ok(CmListener { id, requests, stop })
    }

    /// Accept the next connection: wait at most `timeout` for a peer's request, then up
    /// to 10 s more for that connection's handshake (giving up on it sooner would tear
    /// down a connection its peer already sees as accepted). `before_accept` runs once
    /// the QP exists (INIT), e.g. to post receives.
    ///
    /// # Errors
    /// `TimedOut`, or the error of setting up the QP or of `before_accept`.
    pub fn accept(
        &self,
        timeout: Duration,
        before_accept: impl FnOnce(&RdmaContext, &mut BasicQueuePair) -> Result<()>,
    ) -> Result<CmConnection> {
        self.accept_with(
            timeout,
            ACCEPT_HANDSHAKE,
            QpTiming::default(),
            |ctx| CqSource::new(ctx, CQ_ENTRIES),
            before_accept,
        )
    }

    /// [`accept`](CmListener::accept) with the retransmission `timing` and the CQ made
    /// by `make_cq`.
    ///
    /// `timeout` bounds only the wait for a request. Once one is taken, setting its
    /// connection up (QP, memory, RDMA-CM's reply and the peer's confirmation) is
    /// bounded by `handshake` on its own: giving up on it when the caller's `timeout`
    /// runs out would destroy a connection the peer already sees as accepted (its
    /// first message fails with "RDMA-CM reported Disconnected" or `Rejected`), and a
    /// server that accepts in a loop with a short timeout (to check a stop flag) would
    /// lose every connection whose setup took longer than that timeout.
    pub(crate) fn accept_with(
        &self,
        timeout: Duration,
        handshake: Duration,
        timing: QpTiming,
        make_cq: impl FnOnce(&RdmaContext) -> Result<CqSource>,
        before_accept: impl FnOnce(&RdmaContext, &mut BasicQueuePair) -> Result<()>,
    ) -> Result<CmConnection> {
        let deadline = crate::time::deadline(Instant::now(), timeout);
        let what = "RDMA accept";
        let id = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let id = self.requests.recv_timeout(left).map_err(|e| match e {
                crossbeam_channel::RecvTimeoutError::Timeout => Error::new(
                    ErrorKind::TimedOut,
                    format!("{what}: no connection within {timeout:?}"),
                ),
                crossbeam_channel::RecvTimeoutError::Disconnected => Error::new(
                    ErrorKind::Io(std::io::ErrorKind::Other),
                    format!("{what}: the listener thread ended"),
                ),
            })?;
            // A request that went stale while it waited (its peer gave up, the link
            // went down meanwhile) cannot even say how to set up a queue pair: drop it
            // (the peer, if it is still there, sees a rejection) and wait for the next,
            // rather than fail this accept for a connection nobody waits for any more.
            if id.get_qp_attr(QueuePairState::Init).is_ok() {
                break id;
            }
        };
        let deadline = crate::time::deadline(Instant::now(), handshake);
        let watch = Watch::attach(&id);
        let (context, source, mut qp) = make_qp(&id, make_cq)?;
        before_accept(&context, &mut qp)?;
        let path_mtu = move_qp(
            &id,
            &context,
            &mut qp,
            QueuePairState::ReadyToReceive,
            timing,
        )?;
        move_qp(&id, &context, &mut qp, QueuePairState::ReadyToSend, timing)?;
        id.accept(conn_param(&qp))
            .map_err(|e| cm_error(ErrorKind::ConnectionReset, what, e))?;
        watch.wait_established(deadline, what)?;
        Ok(CmConnection {
            qp,
            source: Some(source),
            context,
            path_mtu,
            handle: CmHandle { id },
        })
    }
}

impl Drop for CmListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl fmt::Debug for CmListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmListener")
            .field("port", &self.id.port())
            .finish_non_exhaustive()
    }
}
