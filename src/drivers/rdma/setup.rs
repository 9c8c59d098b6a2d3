//! Opening an RDMA connection: the CQ on the device's reactor, the registered memory,
//! the protocol core with every receive posted before the peer can send, and the
//! transport's shell around them, all through RDMA-CM's connect or accept.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use event_listener::Event;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttributeMask};

use super::buffer::RecvSlot;
use super::cm::CmListener;
use super::config::{RdmaConfig, APP_MAX, APP_REGION, CQ_ENTRIES, QUEUE_DEPTH};
use super::conn::{Connection, Limits, Tick};
use super::context::RdmaContext;
use super::device::{DeviceReactor, Member};
use super::poller::CqSource;
use super::transport::{lock, post, Cq, RdmaTransport, Shared, CORK_IN_FLIGHT};
use crate::error::{Error, ErrorKind, Result};
use crate::linger::{self, Deliver};
use crate::mem::Slab;

/// Woken by the device thread when the handshake time is up: fails the connection if
/// the peer's hello has not come.
struct HelloWatch(Weak<Shared>);

impl Wake for HelloWatch {
    fn wake(self: Arc<Self>) {
        let Some(s) = self.0.upgrade() else { return };
        let timeout = s.cfg.handshake_timeout;
        let failed = s.drive(|c| {
            let silent = !c.greeted() && !c.is_closed();
            if silent {
                c.fail(Error::connection_lost(
                    ErrorKind::TimedOut,
                    format!(
                        "the peer connected but sent no hello within {timeout:?}: it does \
                         not speak net-rs's protocol (RdmaConfig::handshake_timeout)"
                    ),
                ));
            }
            silent
        });
        if failed {
            let _ = s.cm.disconnect();
        }
    }
}

/// Woken by the device thread at each keepalive tick (twice per interval): ticks the
/// core's keepalive (which may queue a probe or fail the connection), then sets itself
/// again for when the core says.
struct KeepaliveTick(Weak<Shared>);

impl Wake for KeepaliveTick {
    fn wake(self: Arc<Self>) {
        let Some(s) = self.0.upgrade() else { return };
        match s.drive(|c| c.on_keepalive_tick()) {
            Tick::Again { after_ms } => {
                let after = Duration::from_millis(u64::from(after_ms));
                let at = crate::time::deadline(Instant::now(), after);
                let reactor = s.reactor.clone();
                drop(s);
                reactor.wake_at(at, Waker::from(self));
            }
            Tick::Failed => {
                let _ = s.cm.disconnect();
            }
            Tick::Stop => {}
        }
    }
}

/// What the setup hook made: the registered memory and the core with its receives
/// posted.
pub(super) struct Setup {
    slab: Slab,
    app_slab: Slab,
    core: super::transport::Core,
}

impl RdmaTransport {
    pub(super) fn limits(cfg: &RdmaConfig, port_mtu: u32, initiator: bool) -> Limits {
        Limits {
            port_mtu,
            initiator,
            keepalive_ms: cfg.keepalive_ms(),
            keepalive_misses: cfg.keepalive_misses.max(1),
            depth: cfg.depth,
            chunk: cfg.chunk,
            max_message_size: cfg.max_message_size,
            send_buffer: cfg.send_buffer,
            recv_budget: cfg.recv_buffer,
            sq_depth: QUEUE_DEPTH,
            cork_in_flight: CORK_IN_FLIGHT,
        }
    }

    /// Register the memory and post every receive, before the peer can send.
    fn setup(
        ctx: &RdmaContext,
        qp: &mut BasicQueuePair,
        cfg: &RdmaConfig,
        initiator: bool,
    ) -> Result<Setup> {
        let slab = ctx.slab(cfg.chunk, cfg.chunk, (cfg.chunk * 256).max(1 << 20));
        // Regions are registered lazily, on the first `alloc_buf` of a class.
        let app_slab = ctx.slab(cfg.chunk, APP_MAX, APP_REGION);
        let registration = |e: std::io::Error| Error::new(ErrorKind::Registration, e.to_string());
        let bufs = (0..cfg.depth)
            .map(|_| {
                slab.alloc(cfg.chunk)
                    .map_err(registration)?
                    .map(RecvSlot)
                    .ok_or_else(|| Error::new(ErrorKind::Registration, "no receive slot"))
            })
            .collect::<Result<Vec<_>>>()?;
        // Register the send bounce slots now too (one per send-queue entry, the most
        // ever live): from here on no message registers anything.
        let bounce = (0..QUEUE_DEPTH)
            .map(|_| slab.alloc(cfg.chunk))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(registration)?;
        drop(bounce);
        // The hello tells the peer the largest packet this port takes.
        let port_mtu = qp
            .query(QueuePairAttributeMask::Port)
            .ok()
            .and_then(|(attr, _)| ctx.device_context().query_port(attr.port()).ok())
            .map_or(0, |p| 128 << p.attr.active_mtu.clamp(1, 5));
        let (core, first) = Connection::new(Self::limits(cfg, port_mtu, initiator), bufs);
        post(qp, &first, &[])?;
        Ok(Setup {
            slab,
            app_slab,
            core,
        })
    }

    /// The connection's CQ, on its device's shared reactor (started if need be).
    fn make_cq(
        ctx: &RdmaContext,
        cfg: &RdmaConfig,
        reactor: &mut Option<Arc<DeviceReactor>>,
    ) -> Result<CqSource> {
        let r = DeviceReactor::for_device(ctx, cfg.poller)?;
        let cq = r.new_cq(ctx, CQ_ENTRIES)?;
        *reactor = Some(r);
        Ok(cq)
    }

    fn start(
        conn: super::cm::CmConnection,
        reactor: Arc<DeviceReactor>,
        setup: Setup,
        cfg: RdmaConfig,
        peer: Option<SocketAddr>,
    ) -> Result<RdmaTransport> {
        let path_mtu = conn.path_mtu;
        let (qp, source, context, cm) = conn.into_parts();
        let mut core = setup.core;
        core.set_path_mtu(path_mtu);
        let mut source =
            source.ok_or_else(|| Error::new(ErrorKind::Registration, "no completion queue"))?;
        let cm_channel = source.take_cm();
        let shared = Arc::new_cyclic(|me| Shared {
            qp: Mutex::new(qp),
            cq: Mutex::new(Cq {
                source,
                buf: Vec::with_capacity(64),
            }),
            conn: Mutex::new(core),
            returns: Mutex::new(Vec::new()),
            has_returns: AtomicBool::new(false),
            drive_due: AtomicBool::new(false),
            returns_urgent: AtomicBool::new(true),
            inline: AtomicUsize::new(0),
            reactor,
            member: AtomicUsize::new(usize::MAX),
            me: me.clone(),
            slab: setup.slab,
            app_slab: setup.app_slab,
            heap: crate::buffer::HeapPool::default(),
            changed: Event::new(),
            cfg,
            cm,
            registration: Mutex::new(None),
            _context: context,
        });
        // The hello goes out first.
        shared.drive(|_| ());
        let weak = Arc::downgrade(&shared);
        shared.cm.on_gone(move |why| {
            if let Some(s) = weak.upgrade() {
                s.on_gone(why);
            }
        });
        let listed: Weak<dyn Deliver> = Arc::downgrade(&shared) as Weak<dyn Deliver>;
        *lock(&shared.registration) = Some(linger::register(listed));
        let member = Arc::downgrade(&shared) as Weak<dyn Member>;
        let id = shared.reactor.add(member, cm_channel);
        shared.member.store(id, Ordering::Release);
        // A peer that never says hello does not speak net-rs: give up on it in time.
        let deadline = crate::time::deadline(Instant::now(), shared.cfg.handshake_timeout);
        let watch = Waker::from(Arc::new(HelloWatch(Arc::downgrade(&shared))));
        shared.reactor.wake_at(deadline, watch);
        if let Some(ms) = lock(&shared.conn).first_keepalive_tick() {
            let first = Duration::from_millis(u64::from(ms));
            let first = crate::time::deadline(Instant::now(), first);
            let tick = Waker::from(Arc::new(KeepaliveTick(Arc::downgrade(&shared))));
            shared.reactor.wake_at(first, tick);
        }
        Ok(RdmaTransport { shared, peer })
    }

    /// Connect to `addr` (blocking the calling thread for at most `timeout`).
    ///
    /// # Errors
    /// As [`cm::connect_qp`](super::cm::connect_qp).
    pub fn connect_blocking(addr: SocketAddr, timeout: Duration, cfg: RdmaConfig) -> Result<Self> {
        let cfg_timing = cfg.qp_timing();
        Self::open(cfg, Some(addr), |make_cq, before| {
            super::cm::connect_qp_with(addr, timeout, cfg_timing, make_cq, before)
        })
    }

    /// Accept one connection on `listener` (blocking for at most `timeout`).
    ///
    /// # Errors
    /// As [`CmListener::accept`].
    pub fn accept_blocking(
        listener: &CmListener,
        timeout: Duration,
        cfg: RdmaConfig,
    ) -> Result<Self> {
        let (timing, handshake) = (cfg.qp_timing(), cfg.handshake_timeout);
        Self::open(cfg, None, |make_cq, before| {
            listener.accept_with(timeout, handshake, timing, make_cq, before)
        })
    }

    /// Set a connection up through `dial` (RDMA-CM connect or accept), which makes the
    /// CQ with the first hook and, once the QP exists, runs the second (registered
    /// memory, posted receives) before the peer can send.
    fn open(
        cfg: RdmaConfig,
        peer: Option<SocketAddr>,
        dial: impl FnOnce(
            &mut dyn FnMut(&RdmaContext) -> Result<CqSource>,
            &mut dyn FnMut(&RdmaContext, &mut BasicQueuePair) -> Result<()>,
        ) -> Result<super::cm::CmConnection>,
    ) -> Result<Self> {
        let cfg = cfg.normalized()?;
        let (mut setup, mut reactor) = (None, None);
        let conn = dial(
            &mut |ctx| Self::make_cq(ctx, &cfg, &mut reactor),
            &mut |ctx, qp| {
                setup = Some(Self::setup(ctx, qp, &cfg, peer.is_some())?);
                Ok(())
            },
        )?;
        let missing = || {
            Error::new(
                ErrorKind::Io(std::io::ErrorKind::Other),
                "RDMA-CM set up a connection without its completion queue or memory",
            )
        };
        let reactor = reactor.ok_or_else(missing)?;
        let setup = setup.ok_or_else(missing)?;
        Self::start(conn, reactor, setup, cfg, peer)
    }
}
