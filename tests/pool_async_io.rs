//! The pool suite on the async-io adapter, under async-std and under smol.
#![cfg(feature = "async-std")]

mod pool_suite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use net_rs::adapters::async_io::AsyncIoRuntime;
use net_rs::runtime::Runtime;

type Case = fn(Arc<dyn Runtime>) -> Pin<Box<dyn Future<Output = ()>>>;

mod async_std_runtime {
    use super::*;
    fn run(case: Case) {
        let rt: Arc<dyn Runtime> = Arc::new(AsyncIoRuntime::with_spawner(|task| {
            async_std::task::spawn(task);
        }));
        async_std::task::block_on(case(rt));
    }
    crate::pool_suite!(run);
}

mod smol_runtime {
    use super::*;
    fn run(case: Case) {
        let rt: Arc<dyn Runtime> = Arc::new(AsyncIoRuntime::with_spawner(|task| {
            smol::spawn(task).detach()
        }));
        smol::block_on(case(rt));
    }
    crate::pool_suite!(run);
}
