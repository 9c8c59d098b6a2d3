//! [`Client`]: many calls in flight on one connection.

use std::fmt;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use event_listener::Event;
use futures::future::{select, Either};
use futures::ready;

use super::calls::{Begin, Calls, Incoming, Release, Wait, WINDOW};
use super::status::Status;
use super::wire::{Code, Header, Kind, HEADER_LEN};
use crate::buffer::Buf;
use crate::runtime::Runtime;
use crate::transport::{BoxFuture, Transport};

/// A [`Client`]'s settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The most calls open at once on the connection (default 256): a call beyond it
    /// waits for one to end. A call whose caller gave up keeps its place until the
    /// server's answer to it arrives (the server answers every request).
    pub max_in_flight: usize,
    /// The timeout of [`Client::call`] and [`Client::call_buf`] (default none). The
    /// server is told it as the request's time budget and does not start a request
    /// whose budget ran out while it waited.
    pub timeout: Option<Duration>,
    /// Tell the server when a call is given up after its request went out (default
    /// true), so it can stop working on it.
    pub send_cancels: bool,
    /// The runtime whose timers run the timeouts (default: the one
    /// [`default_runtime`](crate::runtime::default_runtime) finds, if any).
    pub runtime: Option<Arc<dyn Runtime>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_in_flight: 256,
            timeout: None,
            send_cancels: true,
            runtime: None,
        }
    }
}

impl ClientConfig {
    /// Set [`max_in_flight`](ClientConfig::max_in_flight) (at least 1).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Set [`timeout`](ClientConfig::timeout).
    pub fn timeout(mut self, d: Option<Duration>) -> Self {
        self.timeout = d;
        self
    }

    /// Set [`send_cancels`](ClientConfig::send_cancels).
    pub fn send_cancels(mut self, on: bool) -> Self {
        self.send_cancels = on;
        self
    }

    /// Set [`runtime`](ClientConfig::runtime).
    pub fn runtime(mut self, rt: Arc<dyn Runtime>) -> Self {
        self.runtime = Some(rt);
        self
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("max_in_flight", &self.max_in_flight)
            .field("timeout", &self.timeout)
            .field("send_cancels", &self.send_cancels)
            .finish_non_exhaustive()
    }
}

/// A request's payload in memory of the transport's [`BufferPool`], with room for the
/// RPC header in front: filled by the caller and sent without another copy (on RDMA,
/// registered memory). From [`Client::request_buf`]; it derefs to the payload.
///
/// [`BufferPool`]: crate::transport::BufferPool
pub struct RequestBuf {
    buf: Buf,
}

impl std::ops::Deref for RequestBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[HEADER_LEN..]
    }
}

impl std::ops::DerefMut for RequestBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[HEADER_LEN..]
    }
}

impl fmt::Debug for RequestBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuf")
            .field("len", &(self.buf.len() - HEADER_LEN))
            .finish()
    }
}

struct Inner<T> {
    transport: T,
    calls: Mutex<Calls<Waker>>,
    /// Notified when a slot is freed or the connection fails.
    freed: Event,
    timeout: Option<Duration>,
    runtime: Option<Arc<dyn Runtime>>,
}

/// The client side of net-rs's request/response protocol ([`super::wire`]) over one
/// connection: many calls in flight at once (pipelined, answered in any order), each
/// reply delivered to its own call and to no other.
///
/// Cheap to clone (an `Arc`); share it between tasks. There is no background task:
/// while calls wait, one of them reads the connection for all of them (see
/// [the module docs](super#layers)), so a call's future must be polled to completion
/// or dropped (as `.await`, `join!` and `select!` do), not parked half-way.
///
/// # Cancellation
/// Dropping a call's future (a `select!`, a timeout) cancels it: before its request was
/// accepted by the transport, nothing is sent; after, its reply is discarded when it
/// comes, never handed to another call, and the server is told (a cancel message, see
/// [`ClientConfig::send_cancels`]) with the next call.
///
/// # Errors
/// A call fails with a [`Status`]: the server's, or `DeadlineExceeded` for its timeout,
/// or `Unavailable` once the connection failed (every open and later call then fails,
/// with the transport's error as the source: make a new client on a new connection),
/// or `ResourceExhausted` for a request over the transport's `max_message_size`.
pub struct Client<T: Transport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for Client<T> {
    fn clone(&self) -> Self {
        Client {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Transport> fmt::Debug for Client<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.inner.lock();
        f.debug_struct("Client")
            .field("open", &c.open())
            .field("failed", &c.failed())
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Inner<T> {
    /// As the connection's reader: poll the pending `recv` in `reading` (starting one
    /// if none) and hand what it got to the call it answers.
    fn poll_read_one<'a>(
        &'a self,
        reading: &mut Option<BoxFuture<'a, crate::Result<Bytes>>>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let recv = reading.get_or_insert_with(|| Box::pin(self.transport.recv()));
        let got = ready!(recv.as_mut().poll(cx));
        *reading = None;
        self.deliver(got);
        Poll::Ready(())
    }
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, Calls<Waker>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T: Transport> Client<T> {
    /// A client on `transport` with the default [`ClientConfig`].
    pub fn new(transport: T) -> Self {
        Client::with_config(transport, ClientConfig::default())
    }

    /// A client on `transport` with `cfg`.
    pub fn with_config(transport: T, cfg: ClientConfig) -> Self {
        let runtime = cfg
            .runtime
            .or_else(|| crate::runtime::default_runtime().ok());
        Client {
            inner: Arc::new(Inner {
                transport,
                calls: Mutex::new(Calls::new(cfg.max_in_flight, cfg.send_cancels)),
                freed: Event::new(),
                timeout: cfg.timeout,
                runtime,
            }),
        }
    }

    /// The connection.
    pub fn transport(&self) -> &T {
        &self.inner.transport
    }

    /// Calls open now (including given-up ones still owed an answer).
    pub fn in_flight(&self) -> usize {
        self.inner.lock().open()
    }

    /// Why the connection failed, if it has: every call then fails with this.
    pub fn failed(&self) -> Option<Status> {
        self.inner.lock().failed().cloned()
    }

    /// A buffer for a request of `len` bytes, to fill and pass to
    /// [`call_buf`](Client::call_buf) (no copy on the way out).
    ///
    /// # Errors
    /// `ResourceExhausted` if the request would be over the transport's
    /// `max_message_size`, or the transport's allocation error.
    pub fn request_buf(&self, len: usize) -> Result<RequestBuf, Status> {
        let buf = self
            .inner
            .transport
            .alloc_buf(HEADER_LEN.saturating_add(len))
            .map_err(Status::from_transport)?;
        Ok(RequestBuf { buf })
    }

    /// Call `method` with `payload` (copied once into the transport's memory) and wait
    /// for the reply, within the configured [`timeout`](ClientConfig::timeout).
    ///
    /// # Errors
    /// See [`Client`].
    pub async fn call(&self, method: u16, payload: &[u8]) -> Result<Bytes, Status> {
        self.call_timeout(method, payload, self.inner.timeout).await
    }

    /// [`call`](Client::call) with its own `timeout` (`None`: wait as long as it takes).
    ///
    /// # Errors
    /// See [`Client`].
    pub async fn call_timeout(
        &self,
        method: u16,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Bytes, Status> {
        let mut buf = self.request_buf(payload.len())?;
        buf.copy_from_slice(payload);
        self.call_buf_timeout(method, buf, timeout).await
    }

    /// Call `method` with the request in `buf` (see [`request_buf`](Client::request_buf))
    /// and wait for the reply, within the configured [`timeout`](ClientConfig::timeout).
    ///
    /// # Errors
    /// See [`Client`].
    pub async fn call_buf(&self, method: u16, buf: RequestBuf) -> Result<Bytes, Status> {
        self.call_buf_timeout(method, buf, self.inner.timeout).await
    }

    /// [`call_buf`](Client::call_buf) with its own `timeout`.
    ///
    /// # Errors
    /// See [`Client`].
    pub async fn call_buf_timeout(
        &self,
        method: u16,
        buf: RequestBuf,
        timeout: Option<Duration>,
    ) -> Result<Bytes, Status> {
        let Some(limit) = timeout else {
            return self.exchange(method, buf, 0).await;
        };
        let Some(rt) = &self.inner.runtime else {
            return Err(Status::new(
                Code::FailedPrecondition,
                "a call with a timeout needs a runtime for its timer (ClientConfig::runtime)",
            ));
        };
        // The server's budget: the timeout in whole milliseconds, rounded up.
        let ms = limit.as_nanos().div_ceil(1_000_000);
        let budget = u32::try_from(ms).unwrap_or(u32::MAX).max(1);
        let sleep = rt.sleep(limit);
        let call = std::pin::pin!(self.exchange(method, buf, budget));
        match select(call, sleep).await {
            Either::Left((r, _)) => r,
            // The call's future is dropped here: it is given up (see `Exchange`).
            Either::Right(((), _)) => Err(Status::new(
                Code::DeadlineExceeded,
                format!("no reply within {limit:?}"),
            )),
        }
    }

    /// Wait for a free slot; its request id. While every slot is taken and no call
    /// reads the connection, this caller reads it (the answers of given-up calls are
    /// what frees their slots).
    async fn reserve(&self, method: u16) -> Result<u64, Status> {
        loop {
            let first = self.inner.lock().begin(method);
            match first {
                Ok(id) => return Ok(id),
                Err(Begin::Failed(s)) => return Err(s),
                Err(Begin::Read) => return self.read_for_a_slot(method).await,
                Err(Begin::Full) => {}
            }
            let listener = self.inner.freed.listen();
            let again = self.inner.lock().begin(method);
            match again {
                Ok(id) => return Ok(id),
                Err(Begin::Failed(s)) => return Err(s),
                Err(Begin::Read) => return self.read_for_a_slot(method).await,
                Err(Begin::Full) => listener.await,
            }
        }
    }

    /// As the reader ([`WINDOW`]), read until a slot is free.
    async fn read_for_a_slot(&self, method: u16) -> Result<u64, Status> {
        let mut w = WindowReader {
            inner: &self.inner,
            reading: None,
            active: true,
        };
        poll_fn(|cx| w.poll_slot(cx, method)).await
    }

    async fn exchange(&self, method: u16, buf: RequestBuf, budget: u32) -> Result<Bytes, Status> {
        let id = self.reserve(method).await?;
        let mut ex = Exchange {
            inner: &self.inner,
            id,
            reading: None,
            done: false,
        };
        let cancels = self.inner.lock().take_cancels();
        for (cid, cmethod) in cancels {
            let h = Header {
                kind: Kind::Cancel,
                method: cmethod,
                id: cid,
                word: 0,
            };
            // A cancel that cannot be sent: the connection is failing, and the request
            // below finds out.
            let _ = self
                .inner
                .transport
                .send(Bytes::copy_from_slice(&h.to_bytes()))
                .await;
        }
        let mut buf = buf.buf;
        Header {
            kind: Kind::Request,
            method,
            id,
            word: budget,
        }
        .write(&mut buf);
        match self.inner.transport.send(buf.freeze()).await {
            Ok(()) => self.inner.lock().sent(id),
            Err(e) => {
                ex.done = true;
                let fatal = e.is_fatal();
                let status = Status::from_transport(e.clone());
                let wakers = {
                    let mut c = self.inner.lock();
                    c.unsent(id);
                    if fatal {
                        c.fail(e)
                    } else {
                        Vec::new()
                    }
                };
                wakers.into_iter().for_each(Waker::wake);
                self.inner.freed.notify(if fatal { usize::MAX } else { 1 });
                return Err(status);
            }
        }
        poll_fn(|cx| ex.poll_answer(cx)).await
    }
}

/// One call from the moment it has a slot: dropping it gives the call up.
struct Exchange<'a, T: Transport> {
    inner: &'a Inner<T>,
    id: u64,
    /// The pending `recv` while this call is the reader.
    reading: Option<BoxFuture<'a, crate::Result<Bytes>>>,
    done: bool,
}

impl<T> Inner<T> {
    /// After a reader stopped: wake the call the role went to, or a caller waiting for
    /// a slot if nobody reads now or (`freed`) a slot was freed.
    fn released(&self, r: Release<Waker>, freed: bool) {
        let wake_window = r.released() || freed;
        if let Release::HandedTo(w) = r {
            w.wake();
        }
        if wake_window {
            self.freed.notify(1);
        }
    }

    /// Hand what the reader's `recv` returned to the calls.
    fn deliver(&self, got: crate::Result<Bytes>) {
        match got {
            Ok(msg) => {
                let incoming = self.lock().on_message(msg);
                match incoming {
                    Incoming::Answer(w) => {
                        if let Some(w) = w {
                            w.wake();
                        }
                    }
                    Incoming::Discarded => {
                        self.freed.notify(1);
                    }
                    Incoming::Protocol(wakers) => {
                        wakers.into_iter().for_each(Waker::wake);
                        self.freed.notify(usize::MAX);
                    }
                }
            }
            Err(e) => {
                let wakers = self.lock().fail(e);
                wakers.into_iter().for_each(Waker::wake);
                self.freed.notify(usize::MAX);
            }
        }
    }
}

impl<T: Transport> Exchange<'_, T> {
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bytes, Status>> {
        loop {
            let mut c = self.inner.lock();
            match c.wait(self.id, cx.waker().clone()) {
                Wait::Pending => return Poll::Pending,
                Wait::Done(r) => {
                    let release = c.stop_reading(self.id);
                    drop(c);
                    self.done = true;
                    self.reading = None;
                    self.inner.released(release, true);
                    return Poll::Ready(r);
                }
                Wait::Read => {}
            }
            drop(c);
            ready!(self.inner.poll_read_one(&mut self.reading, cx));
        }
    }
}

impl<T: Transport> Drop for Exchange<'_, T> {
    fn drop(&mut self) {
        // The pending `recv` goes first (it is cancel-safe: nothing is lost).
        self.reading = None;
        if self.done {
            return;
        }
        let (freed, release) = self.inner.lock().abandon(self.id);
        self.inner.released(release, freed);
    }
}

/// A caller waiting for a slot while it reads the connection ([`WINDOW`]); dropping it
/// gives the role up.
struct WindowReader<'a, T: Transport> {
    inner: &'a Inner<T>,
    reading: Option<BoxFuture<'a, crate::Result<Bytes>>>,
    /// Still the reader.
    active: bool,
}

impl<T: Transport> WindowReader<'_, T> {
    fn poll_slot(&mut self, cx: &mut Context<'_>, method: u16) -> Poll<Result<u64, Status>> {
        loop {
            let got = self.inner.lock().begin(method);
            match got {
                Ok(id) => {
                    self.stop();
                    return Poll::Ready(Ok(id));
                }
                Err(Begin::Failed(s)) => {
                    self.stop();
                    return Poll::Ready(Err(s));
                }
                // Still full; this caller still reads.
                Err(Begin::Full | Begin::Read) => {}
            }
            ready!(self.inner.poll_read_one(&mut self.reading, cx));
        }
    }

    fn stop(&mut self) {
        self.reading = None;
        if std::mem::take(&mut self.active) {
            let release = self.inner.lock().stop_reading(WINDOW);
            self.inner.released(release, false);
        }
    }
}

impl<T: Transport> Drop for WindowReader<'_, T> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<T: Transport> fmt::Debug for WindowReader<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowReader").finish_non_exhaustive()
    }
}

impl<T: Transport> fmt::Debug for Exchange<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange").field("id", &self.id).finish()
    }
}
