//! The pool suite on the async-io adapter, under async-std and under smol.
#![cfg(feature = "async-std")]

mod common;
mod pool_suite;

mod async_std_runtime {
    crate::pool_suite!(crate::common::run_async_std);
}

mod smol_runtime {
    crate::pool_suite!(crate::common::run_smol);
}
