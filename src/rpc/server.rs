//! [`Server`]: answers the requests of connections with a [`Handler`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use event_listener::{Event, EventListener};
use futures::future::{select, AbortHandle, AbortRegistration, Abortable, Either};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{ready, FutureExt};

use super::status::Status;
use super::wire::{Code, Header, Kind, HEADER_LEN};
use crate::buffer::Buf;
use crate::coop::Budget;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Runtime;
use crate::transport::{BoxFuture, Transport};

/// Allocates message buffers from the connection's transport (`Transport::alloc_buf`).
type Alloc = Arc<dyn Fn(usize) -> Result<Buf> + Send + Sync>;

/// One request, as a [`Handler`] gets it.
#[derive(Clone)]
pub struct Request {
    id: u64,
    method: u16,
    payload: Bytes,
    deadline: Option<Instant>,
    /// The transport's allocator, when the server has a handle it can keep
    /// ([`Server::serve_shared`]).
    alloc: Option<Alloc>,
    /// The whole reply message (header and payload) of the last [`ReplyBuf`] frozen for
    /// this request: sent as it is if the handler returns its payload.
    made: Arc<Mutex<Option<Bytes>>>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("len", &self.payload.len())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// A reply's payload built in place, with room for the RPC header in front, from
/// [`Request::reply_buf`]: return [`freeze`](ReplyBuf::freeze)'s `Bytes` from the
/// handler and the reply goes out without another copy. Derefs to the payload.
pub struct ReplyBuf {
    buf: Buf,
    head: Header,
    made: Arc<Mutex<Option<Bytes>>>,
}

impl ReplyBuf {
    /// The payload as `Bytes`, to return from the handler (`Ok(buf.freeze())`).
    pub fn freeze(self) -> Bytes {
        let mut buf = self.buf;
        self.head.write(&mut buf);
        let whole = buf.freeze();
        let payload = whole.slice(HEADER_LEN..);
        *self.made.lock().unwrap_or_else(|p| p.into_inner()) = Some(whole);
        payload
    }
}

impl std::ops::Deref for ReplyBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[HEADER_LEN..]
    }
}

impl std::ops::DerefMut for ReplyBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[HEADER_LEN..]
    }
}

impl fmt::Debug for ReplyBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyBuf")
            .field("len", &(self.buf.len() - HEADER_LEN))
            .finish()
    }
}

impl Request {
    /// The method tag the client called.
    pub fn method(&self) -> u16 {
        self.method
    }

    /// The request's payload (a slice of the received message: no copy).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload, owned.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// When the caller's time budget runs out, if it gave one (measured from when the
    /// request arrived). The server answers `DeadlineExceeded` then, and drops the
    /// handler's future if it is still running.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// A zeroed buffer for a reply of `len` bytes, in the transport's memory when the
    /// connection is served with [`Server::serve_shared`] (registered memory on RDMA;
    /// heap memory otherwise), with the header's room in front: fill it and return
    /// `Ok(buf.freeze())`, and the reply is sent without another copy. (Any other
    /// `Bytes` a handler returns is copied once behind the header.)
    ///
    /// # Errors
    /// `ResourceExhausted` for a reply over the transport's `max_message_size`, or the
    /// allocation's error.
    pub fn reply_buf(&self, len: usize) -> std::result::Result<ReplyBuf, Status> {
        let total = HEADER_LEN.saturating_add(len);
        let buf = match &self.alloc {
            Some(alloc) => alloc(total).map_err(Status::from_transport)?,
            None => Buf::from_storage(Box::new(vec![0u8; total]), total),
        };
        Ok(ReplyBuf {
            buf,
            head: Header {
                kind: Kind::Reply,
                method: self.method,
                id: self.id,
                word: 0,
            },
            made: self.made.clone(),
        })
    }
}

/// What answers requests: an async function from [`Request`] to the reply's payload
/// or a [`Status`]. A handler that panics fails its own request with `Internal` (the
/// panic is caught while its future is polled); the connection's other requests go on. Implemented for every `Fn(Request) -> impl Future<Output =
/// Result<Bytes, Status>>` that is `Send + Sync + 'static` with a `Send + 'static` future.
pub trait Handler: Send + Sync + 'static {
    /// Answer `req`. The future may be dropped before it completes: the caller's
    /// cancel, its deadline, or the connection's end.
    fn call(
        &self,
        req: Request,
    ) -> impl Future<Output = std::result::Result<Bytes, Status>> + Send + 'static;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Bytes, Status>> + Send + 'static,
{
    fn call(
        &self,
        req: Request,
    ) -> impl Future<Output = std::result::Result<Bytes, Status>> + Send + 'static {
        self(req)
    }
}

/// A [`Server`]'s settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The most requests one connection has running at once (default 256); while it
    /// has that many the server reads no more from it (the client's calls wait in the
    /// transport: backpressure).
    pub max_concurrent_per_connection: usize,
    /// The most requests running at once over all connections (default 4096).
    pub max_concurrent: usize,
    /// The runtime whose timers end handlers at their deadlines (default: the one
    /// [`default_runtime`](crate::runtime::default_runtime) finds; without one,
    /// deadlines are only checked before a request starts).
    pub runtime: Option<Arc<dyn Runtime>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_concurrent_per_connection: 256,
            max_concurrent: 4096,
            runtime: None,
        }
    }
}

impl ServerConfig {
    /// Set [`max_concurrent_per_connection`](ServerConfig::max_concurrent_per_connection)
    /// (at least 1).
    pub fn max_concurrent_per_connection(mut self, n: usize) -> Self {
        self.max_concurrent_per_connection = n.max(1);
        self
    }

    /// Set [`max_concurrent`](ServerConfig::max_concurrent) (at least 1).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// Set [`runtime`](ServerConfig::runtime).
    pub fn runtime(mut self, rt: Arc<dyn Runtime>) -> Self {
        self.runtime = Some(rt);
        self
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field(
                "max_concurrent_per_connection",
                &self.max_concurrent_per_connection,
            )
            .field("max_concurrent", &self.max_concurrent)
            .finish_non_exhaustive()
    }
}

/// Where a connection's serving is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading requests.
    Reading,
    /// The server shuts down: finish what runs, start nothing, then end.
    Stopping,
}

/// A counting semaphore: the server-wide limit of running requests.
struct Limit {
    free: Mutex<usize>,
    freed: Event,
}

impl Limit {
    fn try_take(&self) -> bool {
        let mut f = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if *f == 0 {
            return false;
        }
        *f -= 1;
        true
    }

    fn give(&self) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.freed.notify(1);
    }
}

/// A place under the server-wide limit, given back when dropped.
struct Permit<'a>(&'a Limit);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.give();
    }
}

struct Shared {
    per_connection: usize,
    limit: Limit,
    shutting_down: AtomicBool,
    /// Notified when shutdown starts, and when a connection's serving ends.
    changed: Event,
    connections: AtomicUsize,
    runtime: Option<Arc<dyn Runtime>>,
}

/// Serves net-rs's request/response protocol ([`super::wire`]) on connections.
///
/// [`serve_connection`](Server::serve_connection) runs one connection's requests
/// concurrently (up to the per-connection limit) inside the future it returns, and
/// sends each reply as soon as it is ready (out of order). It spawns nothing, so it
/// runs under any executor: spawn one such future per accepted connection. Cheap to
/// clone; every clone is the same server (limits and shutdown are shared).
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field(
                "connections",
                &self.shared.connections.load(Ordering::Relaxed),
            )
            .field(
                "shutting_down",
                &self.shared.shutting_down.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Default for Server {
    fn default() -> Self {
        Server::new(ServerConfig::default())
    }
}

/// Counts a connection being served; the count falls (and waiters hear it) on drop.
struct Serving<'a>(&'a Shared);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify(usize::MAX);
    }
}

impl Server {
    /// A server with `cfg`.
    pub fn new(cfg: ServerConfig) -> Self {
        let runtime = cfg
            .runtime
            .or_else(|| crate::runtime::default_runtime().ok());
        Server {
            shared: Arc::new(Shared {
                per_connection: cfg.max_concurrent_per_connection.max(1),
                limit: Limit {
                    free: Mutex::new(cfg.max_concurrent.max(1)),
                    freed: Event::new(),
                },
                shutting_down: AtomicBool::new(false),
                changed: Event::new(),
                connections: AtomicUsize::new(0),
                runtime,
            }),
        }
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Start a graceful shutdown and wait until every connection's serving ended: no
    /// connection starts another request (those waiting, and those that still come,
    /// are answered `Unavailable`: never started, safe to retry elsewhere); the
    /// requests running finish (or end by their deadline, or a cancel from their
    /// client) and their replies are sent; then each connection is shut down. A
    /// handler that never ends keeps this waiting: bound it with a timer if that can
    /// happen, and drop the `serve_connection` futures when it passes.
    pub async fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        self.shared.changed.notify(usize::MAX);
        loop {
            if self.connections() == 0 {
                return;
            }
            let l = self.shared.changed.listen();
            if self.connections() == 0 {
                return;
            }
            l.await;
        }
    }

    /// Whether [`shutdown`](Server::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }

    /// Serve the requests of `transport` with `handler` until the peer closes it, the
    /// connection fails, or the server shuts down.
    ///
    /// When the client closes the connection (or shuts its side down: on TCP the two
    /// look the same), the requests still running or waiting are dropped (nobody is
    /// left to take their answers) and this returns `Ok`: a client that goes away, even
    /// without cancelling, frees its handlers and its share of the server's limits.
    ///
    /// Requests are read ahead of the limits (at most `max_concurrent_per_connection`
    /// waiting, with the time each arrived), so a request whose caller's budget ran out
    /// while it waited is answered `DeadlineExceeded` without being started, and one
    /// the client cancelled is answered `Cancelled`. Past that the server reads no more
    /// from the connection: the client's calls wait in the transport (backpressure).
    /// On shutdown, the requests running finish and are answered, those not started
    /// are answered `Unavailable` (never started: safe to retry), then the connection
    /// is shut down.
    ///
    /// Dropping the future stops at once: running handlers are dropped, their replies
    /// never sent.
    ///
    /// # Errors
    /// The connection's error (`Ok` when the peer closed it, or the server shut down); `InvalidData` when the client broke the protocol (a malformed message, a
    /// reply where requests come, a request id already open), after which the
    /// connection is closed.
    pub async fn serve_connection<T: Transport, H: Handler>(
        &self,
        transport: &T,
        handler: &H,
    ) -> Result<()> {
        self.serve(transport, handler, None).await
    }

    /// [`serve_connection`](Server::serve_connection) on a transport in an `Arc`, which
    /// lets handlers build replies in the transport's memory
    /// ([`Request::reply_buf`]): zero-copy replies on RDMA.
    ///
    /// # Errors
    /// As [`serve_connection`](Server::serve_connection).
    pub async fn serve_shared<T: Transport, H: Handler>(
        &self,
        transport: Arc<T>,
        handler: &H,
    ) -> Result<()> {
        let t = transport.clone();
        let alloc: Alloc = Arc::new(move |len| t.alloc_buf(len));
        self.serve(&*transport, handler, Some(alloc)).await
    }

    async fn serve<T: Transport, H: Handler>(
        &self,
        transport: &T,
        handler: &H,
        alloc: Option<Alloc>,
    ) -> Result<()> {
        let shared = &*self.shared;
        shared.connections.fetch_add(1, Ordering::AcqRel);
        let _serving = Serving(shared);
        let limit = shared.per_connection;
        // Requests read and not started: (header, payload, when it arrived).
        let mut queued: VecDeque<(Header, Bytes, Instant)> = VecDeque::new();
        // Running requests and answers being sent; each yields its request id.
        let mut running: FuturesUnordered<BoxFuture<'_, u64>> = FuturesUnordered::new();
        // Every open request id: `None` while queued, its abort handle once started.
        let mut open: HashMap<u64, Option<AbortHandle>> = HashMap::new();
        let mut recv: Option<BoxFuture<'_, Result<Bytes>>> = None;
        let mut permit: Option<Permit<'_>> = None;
        let mut permit_wait: Option<EventListener> = None;
        let mut shutdown_wait: Option<EventListener> = None;
        let mut mode = Mode::Reading;
        let end = poll_fn(|cx| {
            // Messages that need no work (cancels of answered requests) must not keep
            // this poll, and the task's thread, busy for as long as a client sends them.
            let mut budget = Budget::new();
            loop {
                while let Poll::Ready(Some(id)) = running.poll_next_unpin(cx) {
                    open.remove(&id);
                }
                if mode != Mode::Stopping && shared.shutting_down.load(Ordering::Acquire) {
                    mode = Mode::Stopping;
                    permit = None;
                    // Nothing more starts: what waits is answered `Unavailable`.
                    for (h, _, _) in queued.drain(..) {
                        let s = Status::new(
                            Code::Unavailable,
                            "the server is shutting down: the request was not started",
                        );
                        running.push(Box::pin(send_answer(transport, h, Err(s))));
                    }
                    continue;
                }
                if mode == Mode::Stopping && running.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // Hear a shutdown while waiting (check, listen, check again).
                match &mut shutdown_wait {
                    None => {
                        shutdown_wait = Some(shared.changed.listen());
                        continue;
                    }
                    Some(l) => {
                        if Pin::new(l).poll(cx).is_ready() {
                            shutdown_wait = None;
                            continue;
                        }
                    }
                }
                // Start what waits, within both limits.
                let mut started = false;
                while !queued.is_empty() && running.len() < limit {
                    if permit.is_none() {
                        if shared.limit.try_take() {
                            permit = Some(Permit(&shared.limit));
                            permit_wait = None;
                        } else {
                            match &mut permit_wait {
                                None => {
                                    permit_wait = Some(shared.limit.freed.listen());
                                    continue;
                                }
                                Some(l) => {
                                    if Pin::new(l).poll(cx).is_ready() {
                                        permit_wait = None;
                                        continue;
                                    }
                                    break;
                                }
                            }
                        }
                    }
                    let (h, payload, arrived) = queued.pop_front().expect("not empty");
                    let deadline = (h.word > 0).then(|| {
                        crate::time::deadline(arrived, Duration::from_millis(u64::from(h.word)))
                    });
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        let s = Status::new(
                            Code::DeadlineExceeded,
                            "the caller's time budget ran out before the request started",
                        );
                        running.push(Box::pin(send_answer(transport, h, Err(s))));
                    } else {
                        let (abort, reg) = AbortHandle::new_pair();
                        open.insert(h.id, Some(abort));
                        let p = permit.take().expect("a permit is held");
                        let req = Request {
                            id: h.id,
                            method: h.method,
                            payload,
                            deadline,
                            alloc: alloc.clone(),
                            made: Arc::default(),
                        };
                        running.push(Box::pin(run(transport, handler, shared, h, req, p, reg)));
                    }
                    started = true;
                }
                if started {
                    // Poll the new ones (they register our waker).
                    continue;
                }
                // While stopping, reading goes on (bounded by what is being answered): new
                // requests are answered `Unavailable` at once, cancels still reach the
                // running handlers, and a client that leaves ends the connection.
                let may_read = match mode {
                    Mode::Reading => queued.len() < limit,
                    Mode::Stopping => running.len() < limit,
                };
                if !may_read {
                    // Read no further: a request that ends or a permit wakes us.
                    return Poll::Pending;
                }
                if recv.is_none() {
                    ready!(budget.spend(cx));
                }
                let f = recv.get_or_insert_with(|| Box::pin(transport.recv()));
                let got = match f.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(got) => got,
                };
                recv = None;
                let msg = match got {
                    Ok(msg) => msg,
                    // The client closed the connection (or shut down its side: on TCP the
                    // two look the same): nobody is left to answer. What runs and waits is
                    // dropped, as HTTP/2 cancels the streams of a closed connection; a
                    // client that leaves must not pin handlers and the server's limits.
                    Err(e) if e.kind() == ErrorKind::Closed => {
                        queued.clear();
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                };
                let (h, payload) = match Header::decode(msg) {
                    Ok(x) => x,
                    Err(e) => return Poll::Ready(Err(protocol(format!("the client sent {e}")))),
                };
                match h.kind {
                    Kind::Request if mode == Mode::Stopping => {
                        let s = Status::new(
                            Code::Unavailable,
                            "the server is shutting down: the request was not started",
                        );
                        running.push(Box::pin(send_answer(transport, h, Err(s))));
                    }
                    Kind::Request => {
                        if open.insert(h.id, None).is_some() {
                            return Poll::Ready(Err(protocol(format!(
                                "the client sent request {} while it was still open",
                                h.id
                            ))));
                        }
                        queued.push_back((h, payload, Instant::now()));
                    }
                    Kind::Cancel => match open.get(&h.id) {
                        Some(Some(abort)) => abort.abort(),
                        Some(None) => {
                            // Still waiting: answer it without starting it.
                            if let Some(k) = queued.iter().position(|(q, _, _)| q.id == h.id) {
                                let (q, _, _) = queued.remove(k).expect("found");
                                let s = Status::new(
                                    Code::Cancelled,
                                    "the client cancelled the request",
                                );
                                running.push(Box::pin(send_answer(transport, q, Err(s))));
                            }
                        }
                        // Already answered: nothing to do.
                        None => {}
                    },
                    Kind::Reply => {
                        return Poll::Ready(Err(protocol(format!(
                            "the client sent a reply (id {})",
                            h.id
                        ))))
                    }
                }
            }
        })
        .await;
        drop(running);
        match end {
            Ok(()) => transport.shutdown().await,
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                let _ = transport.close().await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

fn protocol(why: String) -> Error {
    Error::new(ErrorKind::InvalidData, format!("RPC protocol error: {why}"))
}

/// Run one request under its deadline and cancel, then send its answer; the
/// request's id.
async fn run<T: Transport, H: Handler>(
    transport: &T,
    handler: &H,
    shared: &Shared,
    h: Header,
    req: Request,
    permit: Permit<'_>,
    reg: AbortRegistration,
) -> u64 {
    let deadline = req.deadline;
    let made = req.made.clone();
    // A handler that panics fails its own request (`Internal`), not the connection's
    // other requests.
    let guarded = std::panic::AssertUnwindSafe(handler.call(req)).catch_unwind();
    let mut work = std::pin::pin!(Abortable::new(guarded, reg));
    let timer = match (deadline, &shared.runtime) {
        (Some(d), Some(rt)) => Some(rt.sleep(d.saturating_duration_since(Instant::now()))),
        _ => None,
    };
    let outcome = match timer {
        Some(t) => match select(work.as_mut(), t).await {
            Either::Left((r, _)) => Some(r),
            Either::Right(((), _)) => None,
        },
        None => Some(work.as_mut().await),
    };
    let result = match outcome {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(panic))) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Status::internal(format!("the handler panicked: {what}")))
        }
        Some(Err(_aborted)) => Err(Status::new(
            Code::Cancelled,
            "the client cancelled the request",
        )),
        None => Err(Status::new(
            Code::DeadlineExceeded,
            "the caller's time budget ran out on the server",
        )),
    };
    drop(permit);
    if let Some(whole) = built_in_place(&made, &result) {
        let _ = transport.send(whole).await;
        return h.id;
    }
    send_answer(transport, h, result).await
}

/// The whole reply message a [`ReplyBuf`] made, if the handler returned its payload.
fn built_in_place(
    made: &Mutex<Option<Bytes>>,
    result: &std::result::Result<Bytes, Status>,
) -> Option<Bytes> {
    let whole = made.lock().unwrap_or_else(|p| p.into_inner()).take()?;
    let b = result.as_ref().ok()?;
    (whole.len() == HEADER_LEN + b.len() && whole[HEADER_LEN..].as_ptr() == b.as_ptr())
        .then_some(whole)
}

/// Send the answer to request `h`; its id. A failed send means the connection failed:
/// the read side finds out.
async fn send_answer<T: Transport>(
    transport: &T,
    h: Header,
    result: std::result::Result<Bytes, Status>,
) -> u64 {
    let _ = transport.send(reply(transport, h, result)).await;
    h.id
}

/// The reply message for request `h`: the payload copied behind the header (into the
/// transport's memory), or the status with its message.
fn reply<T: Transport>(
    transport: &T,
    h: Header,
    result: std::result::Result<Bytes, Status>,
) -> Bytes {
    let (word, body) = match result {
        Ok(b) => (0, b),
        Err(s) => {
            // An error status must not read as success.
            let code = match s.code() {
                Code::Ok => Code::Unknown,
                c => c,
            };
            (code.as_u32(), Bytes::from(s.message().to_string()))
        }
    };
    let max = transport.max_message_size().saturating_sub(HEADER_LEN);
    let (word, body) = if body.len() > max {
        if word == 0 {
            (
                Code::ResourceExhausted.as_u32(),
                Bytes::from(format!(
                    "the reply of {} bytes is over the connection's maximum message ({max} bytes of payload)",
                    body.len()
                )),
            )
        } else {
            (word, body.slice(..max.min(4096)))
        }
    } else {
        (word, body)
    };
    let head = Header {
        kind: Kind::Reply,
        method: h.method,
        id: h.id,
        word,
    };
    match transport.alloc_buf(HEADER_LEN + body.len()) {
        Ok(mut buf) => {
            head.write(&mut buf);
            buf[HEADER_LEN..].copy_from_slice(&body);
            buf.freeze()
        }
        Err(_) => {
            let mut v = Vec::with_capacity(HEADER_LEN + body.len());
            v.extend_from_slice(&head.to_bytes());
            v.extend_from_slice(&body);
            Bytes::from(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(alloc: Option<Alloc>) -> Request {
        Request {
            id: 42,
            method: 7,
            payload: Bytes::from_static(b"question"),
            deadline: None,
            alloc,
            made: Arc::default(),
        }
    }

    #[test]
    fn a_reply_built_in_place_goes_out_whole_with_its_header() {
        let req = request(None);
        let mut r = req.reply_buf(5).unwrap();
        r.copy_from_slice(b"reply");
        let payload = r.freeze();
        assert_eq!(&payload[..], b"reply");
        let whole = built_in_place(&req.made, &Ok(payload)).expect("in place");
        let (h, body) = Header::decode(whole).unwrap();
        assert_eq!((h.kind, h.id, h.method, h.word), (Kind::Reply, 42, 7, 0));
        assert_eq!(&body[..], b"reply");
    }

    #[test]
    fn another_reply_or_an_error_is_not_taken_for_the_one_built_in_place() {
        let req = request(None);
        let mut r = req.reply_buf(5).unwrap();
        r.copy_from_slice(b"reply");
        let payload = r.freeze();
        // A slice of it, a copy of it, an error: the copy path.
        assert!(built_in_place(&req.made, &Ok(payload.slice(1..))).is_none());
        let req = request(None);
        let payload = req.reply_buf(5).unwrap().freeze();
        assert!(built_in_place(&req.made, &Ok(Bytes::copy_from_slice(&payload))).is_none());
        let req = request(None);
        let _ = req.reply_buf(5).unwrap().freeze();
        assert!(built_in_place(&req.made, &Err(Status::internal("no"))).is_none());
    }

    #[test]
    fn reply_buf_uses_the_transports_memory_and_its_limit() {
        let alloc: Alloc = Arc::new(|len| {
            if len > 64 {
                Err(Error::new(
                    ErrorKind::MessageTooLarge {
                        size: len as u64,
                        max: 64,
                        received: false,
                    },
                    "too large",
                ))
            } else {
                Ok(Buf::from_storage(Box::new(vec![0u8; 64]), len))
            }
        });
        let req = request(Some(alloc));
        assert_eq!(req.reply_buf(48).unwrap().len(), 48);
        let e = req.reply_buf(49).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
    }
}
