//! Pool settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::policy::ReconnectPolicy;
use crate::runtime::Runtime;

/// Settings of a [`ConnectionPool`](super::ConnectionPool).
///
/// Defaults follow bb8 where it has one: `max_size` 10, `min_idle` 0, checkout timeout
/// 30 s, idle timeout 10 min, max lifetime 30 min, connect timeout 10 s.
#[derive(Clone)]
pub struct PoolConfig {
    pub(crate) max_size: usize,
    pub(crate) min_idle: usize,
    pub(crate) checkout_timeout: Duration,
    pub(crate) connect_timeout: Duration,
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

    /// How long a checkout may wait, connecting included, before `TimedOut`.
    pub fn checkout_timeout(mut self, d: Duration) -> Self {
        self.checkout_timeout = d;
        self
    }

    /// Deadline of one connection attempt.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
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

    /// Run [`Connector::check`](super::Connector::check) on an idle connection before
    /// handing it out; a failing one is discarded and the checkout goes on.
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
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("test_on_checkout", &self.test_on_checkout)
            .field("reaper_interval", &self.reaper_interval)
            .field("reconnect", &self.reconnect)
            .finish_non_exhaustive()
    }
}
