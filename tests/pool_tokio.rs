//! The pool suite under tokio (current-thread and multi-thread).
#![cfg(feature = "tokio")]

mod pool_suite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use net_rs::adapters::tokio::TokioRuntime;
use net_rs::runtime::Runtime;

type Case = fn(Arc<dyn Runtime>) -> Pin<Box<dyn Future<Output = ()>>>;

mod current_thread {
    use super::*;
    fn run(case: Case) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let net: Arc<dyn Runtime> = Arc::new(TokioRuntime::new(rt.handle().clone()));
        rt.block_on(case(net));
    }
    crate::pool_suite!(run);
}

mod multi_thread {
    use super::*;
    fn run(case: Case) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let net: Arc<dyn Runtime> = Arc::new(TokioRuntime::new(rt.handle().clone()));
        rt.block_on(case(net));
    }
    crate::pool_suite!(run);
}
