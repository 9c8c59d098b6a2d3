//! Pool settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::policy::ReconnectPolicy;
use crate::runtime::Runtime;

/// Settings of a [`ConnectionPool`](super::ConnectionPool).
///
/// Defaults follow bb8 where it has one: `max_size` 10, `min_idle` 0, checkout timeout
/// 30 s, idle timeout 10 min, max lifetime 30 min, connect timeout 10 s, no request
/// timeout.
///
/// # Timeouts, from the outside in
/// * `checkout_timeout` bounds a whole [`get`](super::ConnectionPool::get): waiting its
///   turn, connecting (every retry included) and [`Connector::check`](super::Connector::check).
/// * `connect_timeout` bounds one [`Connector::connect`](super::Connector::connect) call,
///   cut short by what is left of `checkout_timeout`. It is the pool's own and it wins:
///   it applies to every connector. A connector may have a limit of its own inside it
///   ([`TcpConfig::connect_timeout`](crate::drivers::tcp::TcpConfig::connect_timeout)
///   bounds each address a [`TcpConnector`](super::TcpConnector) tries; `RdmaConnector`'s
///   `timeout` bounds its attempt); whichever expires first ends the attempt, so set the
///   connector's limit no shorter than the pool's unless you mean it per address.
///   A failed attempt puts the pool into backoff (the reconnect policy); one cut short
///   by the checkout's deadline does not (it says nothing about the server), so with a
///   `checkout_timeout` shorter than `connect_timeout` a server that never answers is
///   never seen as down: each checkout spends its whole timeout on it.
/// * `request_timeout` bounds one [`request`](super::PooledConnection::request).
///
/// Each bound cancels a future at an `.await`: a connector or check that blocks its
/// thread cannot be cut short (see [`Connector::connect`](super::Connector::connect)).
#[derive(Clone)]
pub struct PoolConfig {
    pub(crate) max_size: usize,
    pub(crate) min_idle: usize,
    pub(crate) checkout_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) test_on_checkout: bool,
    pub(crate) reaper_interval: Duration,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) runtime: Option<Arc<dyn Runtime>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_size: 10,
            min_idle: 0,
            checkout_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            test_on_checkout: false,
            reaper_interval: Duration::from_secs(1),
            reconnect: ReconnectPolicy::default(),
            runtime: None,
        }
    }
}

impl PoolConfig {
    /// Most connections open at once, idle and in use together (at least 1).
    pub fn max_size(mut self, n: usize) -> Self {
        self.max_size = n.max(1);
        self
    }

    /// Idle connections the background task keeps open (at most `max_size`).
    pub fn min_idle(mut self, n: usize) -> Self {
        self.min_idle = n;
        self
    }

    /// How long a checkout may take, waiting, connecting and checking included, before
    /// it fails with `TimedOut` (default 30 s).
    pub fn checkout_timeout(mut self, d: Duration) -> Self {
        self.checkout_timeout = d;
        self
    }

    /// Deadline of one connection attempt (one `Connector::connect` call; default
    /// 10 s), never beyond what is left of the checkout timeout. See the
    /// [type docs](PoolConfig#timeouts-from-the-outside-in) for how it relates to the
    /// connector's own limit.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Deadline of one [`request`](super::PooledConnection::request) (send and the
    /// reply), default `None` (no limit). A request that runs out of time fails with
    /// `TimedOut` and its connection is discarded (its reply may still come).
    pub fn request_timeout(mut self, d: Option<Duration>) -> Self {
        self.request_timeout = d;
        self
    }

    /// Close connections idle for longer than this (`None`: never).
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Close connections older than this once they are idle (`None`: never).
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.max_lifetime = d;
        self
    }

    /// Also run [`Connector::check`](super::Connector::check) on an idle connection
    /// before handing it out (default off). Every checkout of an idle connection probes
    /// it anyway, without I/O of its own ([`Transport::is_closed`] and
    /// [`Transport::has_unread`]); the check is for what only the protocol can tell (a
    /// ping). It is bounded by what is left of `checkout_timeout`: a check that fails is
    /// discarded and the checkout goes on; one that runs out of time, or is cancelled
    /// with the checkout, is discarded and the checkout fails with `TimedOut`.
    ///
    /// [`Transport::is_closed`]: crate::transport::Transport::is_closed
    /// [`Transport::has_unread`]: crate::transport::Transport::has_unread
    pub fn test_on_checkout(mut self, on: bool) -> Self {
        self.test_on_checkout = on;
        self
    }

    /// How often the background task reaps expired connections and refills `min_idle`.
    pub fn reaper_interval(mut self, d: Duration) -> Self {
        self.reaper_interval = d.max(Duration::from_millis(1));
        self
    }

    /// What to do when connecting fails.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// The runtime for timers and the background task (default:
    /// [`default_runtime`](crate::runtime::default_runtime)).
    pub fn runtime(mut self, rt: Arc<dyn Runtime>) -> Self {
        self.runtime = Some(rt);
        self
    }
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolConfig")
            .field("max_size", &self.max_size)
            .field("min_idle", &self.min_idle)
            .field("checkout_timeout", &self.checkout_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("test_on_checkout", &self.test_on_checkout)
            .field("reaper_interval", &self.reaper_interval)
            .field("reconnect", &self.reconnect)
            .finish_non_exhaustive()
    }
}
