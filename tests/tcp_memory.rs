//! Memory of the TCP receive path under length prefixes that lie
//! (`tcp_suite::lying_length_prefixes_cost_what_arrived`), in a process of its own:
//! resident memory and address space belong to the whole process, so the other suites'
//! tests, running in parallel, would blur them. One runtime after another, in one test.
#![cfg(any(feature = "tokio", feature = "async-std"))]

mod common;
mod tcp_suite;

#[test]
fn lying_length_prefixes_cost_what_arrived() {
    #[cfg(feature = "tokio")]
    common::run_tokio_current_thread(|rt| {
        Box::pin(tcp_suite::lying_length_prefixes_cost_what_arrived(rt))
    });
    #[cfg(feature = "async-std")]
    futures::executor::block_on(tcp_suite::lying_length_prefixes_cost_what_arrived(
        net_rs::runtime::default_runtime().unwrap(),
    ));
}
