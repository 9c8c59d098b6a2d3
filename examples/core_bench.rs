//! The RDMA protocol's own cost, without a device: two connection cores (the pure
//! state machines the RDMA transport runs on) joined by an in-memory wire on one
//! thread. Prints messages per second per core and nanoseconds per message at 64 B and
//! 4 KiB, one way and ping-pong (a round trip counts as two messages), and the heap
//! allocations made while measuring (counted by `allocation-counter`).
//!
//! `cargo run --release --example core_bench [-- MESSAGES]`

use net_rs::__bench::RdmaCore;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    println!("RDMA protocol core: both ends and the wire on one thread, no verbs");
    println!(
        "{:>8} | {:>9} | {:>14} | {:>8} | {:>11}",
        "size", "pattern", "msgs/s (core)", "ns/msg", "allocations"
    );
    let mut one_way_64 = 0.0;
    for size in [64usize, 4096] {
        for ping_pong in [false, true] {
            let count = if ping_pong { n / 4 } else { n };
            let mut bench = RdmaCore::new(size, ping_pong);
            bench.run(count / 10);
            let mut r = None;
            let info = allocation_counter::measure(|| r = Some(bench.run(count)));
            let r = r.expect("ran");
            let msgs = if ping_pong {
                2 * r.messages
            } else {
                r.messages
            };
            let rate = msgs as f64 / r.elapsed.as_secs_f64();
            if size == 64 && !ping_pong {
                one_way_64 = rate;
            }
            println!(
                "{:>8} | {:>9} | {:>14.0} | {:>8.1} | {:>11}",
                format!("{size} B"),
                if ping_pong { "ping-pong" } else { "one way" },
                rate,
                1e9 / rate,
                format!("{} / {msgs}", info.count_total)
            );
        }
    }
    println!(
        "target: >= 10 M messages/s per core at 64 B one way: {:.2} M ({})",
        one_way_64 / 1e6,
        if one_way_64 >= 10e6 { "met" } else { "MISSED" }
    );
}
