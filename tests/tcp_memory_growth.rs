//! Memory of the TCP receive path while a large message arrives
//! (`tcp_suite::a_growing_message_costs_what_arrived`), in a process of its own:
//! resident memory belongs to the whole process, so the other suites' tests, running
//! in parallel, would blur it. One runtime after another, in one test.
#![cfg(any(feature = "tokio", feature = "async-std"))]

mod common;
mod tcp_suite;

#[test]
fn a_growing_message_costs_what_arrived() {
    #[cfg(feature = "tokio")]
    common::run_tokio_current_thread(|rt| {
        Box::pin(tcp_suite::a_growing_message_costs_what_arrived(rt))
    });
    #[cfg(feature = "async-std")]
    futures::executor::block_on(tcp_suite::a_growing_message_costs_what_arrived(
        net_rs::runtime::default_runtime().unwrap(),
    ));
}
