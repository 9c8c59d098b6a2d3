//! `Framed`: tokio-util's `Framed<TcpStream, LengthDelimitedCodec>` on current-thread
//! tokio runtimes. It sends two ways in the send-side table: `SinkExt::send` (one flush
//! per message) and `SinkExt::feed` in the loop with one flush at the end (also on a
//! multi-thread runtime with 2 workers, the `mt` row).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::{self, LengthDelimitedCodec};

use crate::contender::{
    count_until_end_async, current_thread, decode_count, round_trips_async, runtime, serve,
    stream_until_async, Contender, Sender,
};
use crate::MAX;

/// The `Framed` rows.
pub struct Framed;

fn framed(s: TcpStream) -> codec::Framed<TcpStream, LengthDelimitedCodec> {
    s.set_nodelay(true).unwrap();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX)
        .new_codec();
    codec::Framed::new(s, codec)
}

async fn connect(addr: SocketAddr) -> codec::Framed<TcpStream, LengthDelimitedCodec> {
    framed(TcpStream::connect(addr).await.unwrap())
}

impl Contender for Framed {
    fn name(&self) -> &'static str {
        "Framed"
    }

    fn ping_pong(&self, msg: &Bytes, dur: Duration) -> Vec<Duration> {
        let (addr, h) = serve(|l| {
            current_thread().block_on(async move {
                l.set_nonblocking(true).unwrap();
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let (s, _) = l.accept().await.unwrap();
                let mut f = framed(s);
                while let Some(Ok(m)) = f.next().await {
                    f.send(m.freeze()).await.unwrap();
                }
            })
        });
        let rtts = self.ping_pong_to(addr, msg, dur);
        h.join().unwrap();
        rtts
    }

    fn ping_pong_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> Vec<Duration> {
        current_thread().block_on(async {
            let mut f = connect(addr).await;
            round_trips_async(dur, async || {
                f.send(msg.clone()).await.unwrap();
                let r = f.next().await.unwrap().unwrap();
                assert_eq!(r.len(), msg.len());
            })
            .await
        })
    }

    fn senders(&self) -> Vec<Box<dyn Sender>> {
        vec![
            Box::new(FramedSender {
                feed: false,
                multi: false,
            }),
            Box::new(FramedSender {
                feed: true,
                multi: false,
            }),
            Box::new(FramedSender {
                feed: true,
                multi: true,
            }),
        ]
    }

    fn stream_from(&self, addr: SocketAddr, size: usize) {
        current_thread().block_on(async {
            let mut f = connect(addr).await;
            let n =
                count_until_end_async(size, async || f.next().await.unwrap().unwrap().len()).await;
            f.send(Bytes::copy_from_slice(&n.to_be_bytes()))
                .await
                .unwrap();
        })
    }
}

/// `Framed` sending with `SinkExt::send` (`feed: false`) or with `SinkExt::feed` and
/// the flush of the end marker's `send` (`feed: true`).
struct FramedSender {
    feed: bool,
    multi: bool,
}

impl Sender for FramedSender {
    fn name(&self) -> &'static str {
        match (self.feed, self.multi) {
            (false, _) => "Framed send",
            (true, false) => "Framed feed",
            (true, true) => "Framed feed mt",
        }
    }

    fn stream_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> (u64, Duration) {
        let feed = self.feed;
        runtime(self.multi).block_on(async {
            let mut f = connect(addr).await;
            let t0 = Instant::now();
            let sent = stream_until_async(t0 + dur, async || {
                if feed {
                    f.feed(msg.clone()).await.unwrap();
                } else {
                    f.send(msg.clone()).await.unwrap();
                }
            })
            .await;
            f.send(Bytes::new()).await.unwrap();
            let reply = f.next().await.unwrap().unwrap();
            let got = decode_count(&reply);
            assert_eq!(got, sent, "receiver counted every message");
            (got, t0.elapsed())
        })
    }
}
