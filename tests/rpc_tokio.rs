//! The request/response suite under tokio: current-thread and multi-thread runtimes.
#![cfg(feature = "tokio")]

mod common;
mod rpc_suite;

mod current_thread {
    crate::rpc_suite!(crate::common::run_tokio_current_thread);
}

mod multi_thread {
    crate::rpc_suite!(crate::common::run_tokio_multi_thread);
}
