//! hyper 1.x's `rt::Read` and `rt::Write` for [`ByteStream`] (feature `hyper`): hyper's
//! client and server connections run on it directly, under any runtime (hyper's own
//! I/O traits need no tokio).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};

use super::ByteStream;
use crate::runtime::Runtime;
use crate::transport::Transport;

impl<T: Transport> Read for ByteStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut out: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let room = out.remaining();
        self.get_mut()
            .poll_read_into(cx, room, |got| out.put_slice(got))
            .map_ok(|_| ())
    }
}

impl<T: Transport> Write for ByteStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_from(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_from(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_all(cx)
    }

    /// Flush, then [`Transport::shutdown`]: the peer reads the end of the stream.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_all(cx)
    }
}

/// hyper's [`Executor`](hyper::rt::Executor) over a net-rs [`Runtime`]: hyper's HTTP/2
/// connections spawn their background tasks on whichever runtime the transport uses
/// (tokio, async-std, smol, the default one).
///
/// ```no_run
/// # async fn run(stream: net_rs::stream::ByteStream<net_rs::drivers::tcp::TcpTransport>)
/// # -> Result<(), Box<dyn std::error::Error>> {
/// use net_rs::stream::HyperExecutor;
/// let exec = HyperExecutor::new(net_rs::runtime::default_runtime()?);
/// let (mut sender, conn) =
///     hyper::client::conn::http2::handshake::<_, _, String>(exec.clone(), stream).await?;
/// exec.spawn(async move {
///     let _ = conn.await;
/// });
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HyperExecutor {
    rt: Arc<dyn Runtime>,
}

impl HyperExecutor {
    /// Spawn hyper's tasks on `rt`.
    pub fn new(rt: Arc<dyn Runtime>) -> Self {
        HyperExecutor { rt }
    }

    /// Spawn `fut` on the runtime (for the connection future hyper's handshake returns).
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.rt.spawn(Box::pin(fut));
    }
}

impl<F> hyper::rt::Executor<F> for HyperExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.rt.spawn(Box::pin(async move {
            fut.await;
        }));
    }
}
