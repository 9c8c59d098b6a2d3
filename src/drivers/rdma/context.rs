//! A verbs device context with a protection domain and registered memory.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::DeviceContext;
use sideway::ibverbs::protection_domain::ProtectionDomain;

use crate::error::{Error, ErrorKind, Result};
use crate::mem::Slab;

/// An open RDMA device with one protection domain.
#[derive(Clone)]
pub struct RdmaContext {
    name: String,
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    registrations: Arc<AtomicU64>,
}

fn unsupported(what: &str, detail: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("RDMA unavailable: {what} ({detail})"),
    )
}

impl RdmaContext {
    /// Open the device called `name`, or the first device if `name` is `None`.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] when rdma-core is not installed, the kernel has no
    /// RDMA support, no device exists or the named one does not; the message says which.
    pub fn open(name: Option<&str>) -> Result<RdmaContext> {
        let list = DeviceList::new().map_err(|e| {
            unsupported(
                "cannot list verbs devices; is rdma-core (libibverbs1, ibverbs-providers) \
                 installed and the kernel built with RDMA?",
                e,
            )
        })?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        let index = match name {
            None if names.is_empty() => {
                return Err(unsupported(
                    "no RDMA device found",
                    "add one with `rdma link add rxe0 type rxe netdev <if>` for Soft-RoCE",
                ))
            }
            None => 0,
            Some(want) => names.iter().position(|n| n == want).ok_or_else(|| {
                unsupported(&format!("no RDMA device named {want}"), names.join(", "))
            })?,
        };
        let device = list
            .get(index)
            .ok_or_else(|| unsupported("device list changed while opening", index))?;
        let ctx = device
            .open()
            .map_err(|e| unsupported(&format!("cannot open {}", names[index]), e))?;
        let pd = ctx.alloc_pd().map_err(|e| {
            Error::new(
                ErrorKind::Registration,
                format!(
                    "cannot allocate a protection domain on {}: {e}",
                    names[index]
                ),
            )
        })?;
        Ok(RdmaContext {
            name: names[index].clone(),
            ctx,
            pd,
            registrations: Arc::default(),
        })
    }

    /// A context over an already open device (for example the one RDMA-CM resolved an
    /// address to).
    ///
    /// # Errors
    /// [`ErrorKind::Registration`] if no protection domain can be allocated.
    pub fn from_device(ctx: Arc<DeviceContext>) -> Result<RdmaContext> {
        let name = sideway::ibverbs::device::DeviceInfo::name(&*ctx);
        let pd = ctx.alloc_pd().map_err(|e| {
            Error::new(
                ErrorKind::Registration,
                format!("cannot allocate a protection domain: {e}"),
            )
        })?;
        Ok(RdmaContext {
            name,
            ctx,
            pd,
            registrations: Arc::default(),
        })
    }

    /// The device's name (e.g. `rxe0`, `mlx5_0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Receiver-not-ready events the device has counted on all its ports (the sum of
    /// its `hw_counters` whose name mentions RNR, e.g. rxe's `rcvd_rnr_err`,
    /// `send_rnr_err`, `retry_rnr_exceeded_err`). Device-wide, not per connection.
    /// `None` if the device exposes no such counter in sysfs.
    pub fn rnr_events(&self) -> Option<u64> {
        let ports = std::fs::read_dir(format!("/sys/class/infiniband/{}/ports", self.name)).ok()?;
        let mut found = None;
        for port in ports.flatten() {
            let Ok(counters) = std::fs::read_dir(port.path().join("hw_counters")) else {
                continue;
            };
            for c in counters.flatten() {
                if !c.file_name().to_string_lossy().contains("rnr") {
                    continue;
                }
                if let Some(v) = std::fs::read_to_string(c.path())
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    *found.get_or_insert(0) += v;
                }
            }
        }
        found
    }

    /// The sideway device context.
    pub fn device_context(&self) -> &Arc<DeviceContext> {
        &self.ctx
    }

    /// The protection domain everything of this context is created in.
    pub fn protection_domain(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Memory registrations made through this context so far.
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }

    /// A slab of registered memory: power-of-two classes from `min_class` to
    /// `max_class` bytes, registered `region_size` bytes at a time.
    pub fn slab(&self, min_class: usize, max_class: usize, region_size: usize) -> Slab {
        super::slab_allocator::registered_slab(
            self.pd.clone(),
            self.registrations.clone(),
            min_class,
            max_class,
            region_size,
        )
    }
}

impl fmt::Debug for RdmaContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaContext")
            .field("device", &self.name)
            .field("registrations", &self.registrations())
            .finish()
    }
}
