//! The byte stream suite on the async-io adapter: under async-std, under smol, and
//! under `futures::executor::block_on` with the default runtime.
#![cfg(feature = "async-std")]

mod common;
mod stream_suite;

use common::Case;

mod async_std_runtime {
    crate::stream_suite!(crate::common::run_async_std);
}

mod smol_runtime {
    crate::stream_suite!(crate::common::run_smol);
}

/// The default runtime when no tokio runtime runs: the shared async-io adapter, tasks
/// spawned on its own executor thread, the test on `futures::executor::block_on`.
mod default_runtime {
    use super::*;
    fn run(case: Case) {
        let rt = net_rs::runtime::default_runtime().unwrap();
        futures::executor::block_on(case(rt));
    }
    crate::stream_suite!(run);
}
