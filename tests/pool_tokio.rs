//! The pool suite under tokio (current-thread and multi-thread).
#![cfg(feature = "tokio")]

mod common;
mod pool_suite;

mod current_thread {
    crate::pool_suite!(crate::common::run_tokio_current_thread);
}

mod multi_thread {
    crate::pool_suite!(crate::common::run_tokio_multi_thread);
}
