//! `net-rs` and `net-rs lat`: net-rs's TCP transport with default settings and in
//! latency mode (`TcpConfig::busy_poll`), on current-thread tokio runtimes (the `mt`
//! send-side row: a multi-thread runtime with 2 workers).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use net_rs::drivers::tcp::{TcpConfig, TcpListener, TcpTransport};
use net_rs::transport::Transport;

use crate::contender::{
    count_until_end_async, current_thread, decode_count, round_trips_async, runtime,
    stream_until_async, Contender, Sender,
};
use crate::MAX;

/// The busy-poll window of the `net-rs lat` rows (latency mode).
const BUSY_POLL: Duration = Duration::from_millis(1);

/// The `net-rs` rows (`busy: false`) or the `net-rs lat` rows (`busy: true`).
pub struct NetRs {
    pub busy: bool,
}

impl NetRs {
    fn config(&self) -> TcpConfig {
        let c = TcpConfig::default().max_message_size(MAX);
        if self.busy {
            c.busy_poll(BUSY_POLL)
        } else {
            c
        }
    }

    /// Runs a net-rs server on its own thread and current-thread runtime.
    fn serve<F, Fut>(&self, server: F) -> (SocketAddr, std::thread::JoinHandle<()>)
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let config = self.config();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            current_thread().block_on(async move {
                let l = TcpListener::bind_with("127.0.0.1:0", &config)
                    .await
                    .unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                server(l).await
            })
        });
        (rx.recv().expect("server started"), h)
    }
}

impl Contender for NetRs {
    fn name(&self) -> &'static str {
        if self.busy {
            "net-rs lat"
        } else {
            "net-rs"
        }
    }

    fn ping_pong(&self, msg: &Bytes, dur: Duration) -> Vec<Duration> {
        let (addr, h) = self.serve(|l| async move {
            let c = l.accept().await.unwrap();
            while let Ok(m) = c.recv().await {
                c.send(m).await.unwrap();
            }
        });
        let rtts = self.ping_pong_to(addr, msg, dur);
        h.join().unwrap();
        rtts
    }

    fn ping_pong_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> Vec<Duration> {
        current_thread().block_on(async {
            let t = TcpTransport::connect_with(addr, &self.config())
                .await
                .unwrap();
            let rtts = round_trips_async(dur, async || {
                t.send(msg.clone()).await.unwrap();
                let r = t.recv().await.unwrap();
                assert_eq!(r.len(), msg.len());
            })
            .await;
            t.close().await.unwrap();
            rtts
        })
    }

    fn senders(&self) -> Vec<Box<dyn Sender>> {
        let busy = self.busy;
        if busy {
            vec![Box::new(NetRsSender { busy, multi: false })]
        } else {
            vec![
                Box::new(NetRsSender { busy, multi: false }),
                Box::new(NetRsSender { busy, multi: true }),
            ]
        }
    }

    fn stream_from(&self, addr: SocketAddr, size: usize) {
        current_thread().block_on(async {
            let c = TcpTransport::connect_with(addr, &self.config())
                .await
                .unwrap();
            let n = count_until_end_async(size, async || c.recv().await.unwrap().len()).await;
            c.send(Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .unwrap();
            c.close().await.unwrap();
        })
    }
}

/// net-rs sending: a plain `send().await` loop (`send` queues the message and returns;
/// the writer task writes).
struct NetRsSender {
    busy: bool,
    multi: bool,
}

impl Sender for NetRsSender {
    fn name(&self) -> &'static str {
        match (self.busy, self.multi) {
            (false, false) => "net-rs",
            (false, true) => "net-rs mt",
            (true, _) => "net-rs lat",
        }
    }

    fn stream_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> (u64, Duration) {
        let config = NetRs { busy: self.busy }.config();
        runtime(self.multi).block_on(async {
            let t = TcpTransport::connect_with(addr, &config).await.unwrap();
            let t0 = Instant::now();
            let sent =
                stream_until_async(t0 + dur, async || t.send(msg.clone()).await.unwrap()).await;
            t.send(Bytes::new()).await.unwrap();
            let reply = t.recv().await.unwrap();
            let got = decode_count(&reply);
            assert_eq!(got, sent, "receiver counted every message");
            (got, t0.elapsed())
        })
    }
}
