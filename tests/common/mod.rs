//! What every integration suite shares: deadlines, spawning through the `Runtime`, and
//! one runner per runtime. A suite case is `fn(Arc<dyn Runtime>) -> future`; each
//! runner builds its runtime, hands the case the matching adapter and blocks on it.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::future::{select, Either};
use net_rs::runtime::Runtime;

/// One suite case, ready to run under some runtime.
pub type Case = fn(Arc<dyn Runtime>) -> Pin<Box<dyn Future<Output = ()>>>;

/// Fail the test instead of hanging.
pub async fn deadline<T>(rt: &Arc<dyn Runtime>, fut: impl Future<Output = T>) -> T {
    let fut = std::pin::pin!(fut);
    match select(fut, rt.sleep(Duration::from_secs(30))).await {
        Either::Left((v, _)) => v,
        Either::Right(_) => panic!("test step hung for 30 s"),
    }
}

/// Spawn `fut` on `rt`; the receiver yields its output (or `Canceled` if it panicked).
pub fn spawn<T: Send + 'static>(
    rt: &Arc<dyn Runtime>,
    fut: impl Future<Output = T> + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    rt.spawn(Box::pin(async move {
        let _ = tx.send(fut.await);
    }));
    rx
}

#[cfg(feature = "tokio")]
pub fn run_tokio_current_thread(case: Case) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let net: Arc<dyn Runtime> = Arc::new(net_rs::runtime::tokio::TokioRuntime::new(
        rt.handle().clone(),
    ));
    rt.block_on(case(net));
}

#[cfg(feature = "tokio")]
pub fn run_tokio_multi_thread(case: Case) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let net: Arc<dyn Runtime> = Arc::new(net_rs::runtime::tokio::TokioRuntime::new(
        rt.handle().clone(),
    ));
    rt.block_on(case(net));
}

#[cfg(feature = "async-std")]
pub fn run_async_std(case: Case) {
    let rt: Arc<dyn Runtime> = Arc::new(net_rs::runtime::async_io::AsyncIoRuntime::with_spawner(
        |task| {
            async_std::task::spawn(task);
        },
    ));
    async_std::task::block_on(case(rt));
}

#[cfg(feature = "async-std")]
pub fn run_smol(case: Case) {
    let rt: Arc<dyn Runtime> = Arc::new(net_rs::runtime::async_io::AsyncIoRuntime::with_spawner(
        |task| smol::spawn(task).detach(),
    ));
    smol::block_on(case(rt));
}
