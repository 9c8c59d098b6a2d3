//! `raw std`: a blocking `std::net::TcpStream` behind a `BufReader` and a `BufWriter`,
//! frames of a 4-byte big-endian length and the payload (the same bytes as
//! `LengthDelimitedCodec` and net-rs's TCP frames put on the wire).
//!
//! Its streaming ends are also the common peers of the streaming tables: every sender
//! streams to [`common_receiver`] and every receiver is fed by [`common_sender`], which
//! run the very code of the `raw std` rows on the accepting side.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::contender::{
    count_until_end, decode_count, round_trips, serve, stream_until, Contender, Sender,
};

/// The `raw std` rows.
pub struct Raw;

impl Contender for Raw {
    fn name(&self) -> &'static str {
        "raw std"
    }

    fn ping_pong(&self, msg: &Bytes, dur: Duration) -> Vec<Duration> {
        let (addr, h) = serve(|l| {
            let (s, _) = l.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = BufWriter::new(s);
            echo(&mut r, &mut w);
        });
        let rtts = self.ping_pong_to(addr, msg, dur);
        h.join().unwrap();
        rtts
    }

    fn ping_pong_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> Vec<Duration> {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = BufWriter::new(s);
        let mut buf = Vec::new();
        round_trips(dur, || {
            write_frame(&mut w, msg).unwrap();
            w.flush().unwrap();
            read_frame(&mut r, &mut buf).unwrap();
            assert_eq!(buf.len(), msg.len());
        })
    }

    fn senders(&self) -> Vec<Box<dyn Sender>> {
        vec![Box::new(Raw), Box::new(Shared)]
    }

    fn stream_from(&self, addr: SocketAddr, size: usize) {
        receive_stream(TcpStream::connect(addr).unwrap(), size)
    }
}

impl Sender for Raw {
    fn name(&self) -> &'static str {
        "raw std"
    }

    fn stream_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> (u64, Duration) {
        send_stream(TcpStream::connect(addr).unwrap(), msg, dur)
    }
}

/// `raw shared`: [`Raw`]'s sender with the shape of a `send(&self, Bytes)`: the
/// `BufWriter` behind a `Mutex` (so any thread may send on it) and each message handed
/// over as a `Bytes` by value (the caller's clone, dropped once copied). What the rows
/// differ by is the least any shareable send taking `Bytes` pays per message (a lock,
/// an unlock, a reference count up and down), with no queue, task or runtime.
pub struct Shared;

impl Sender for Shared {
    fn name(&self) -> &'static str {
        "raw shared"
    }

    fn stream_to(&self, addr: SocketAddr, msg: &Bytes, dur: Duration) -> (u64, Duration) {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        let w = std::sync::Mutex::new(BufWriter::with_capacity(64 << 10, s));
        let send = |m: Bytes| write_frame(&mut *w.lock().unwrap(), &m);
        let t0 = Instant::now();
        let sent = stream_until(t0 + dur, || {
            send(std::hint::black_box(msg.clone())).unwrap()
        });
        (end_stream(r, w.into_inner().unwrap(), sent), t0.elapsed())
    }
}

/// The receiver every sender of the send-side table streams to: [`Raw`]'s receiving
/// end (a 64 KiB `BufReader`) on its own thread, for one connection.
pub fn common_receiver(size: usize) -> (SocketAddr, JoinHandle<()>) {
    serve(move |l| {
        let (s, _) = l.accept().unwrap();
        receive_stream(s, size)
    })
}

/// The sender that streams `msg` for `dur` to every receiver of the receive-side table:
/// [`Raw`]'s sending end (a 64 KiB `BufWriter`) on its own thread, for one connection.
/// The thread's result is the count and the time, as [`Sender::stream_to`]'s.
pub fn common_sender(msg: Bytes, dur: Duration) -> (SocketAddr, JoinHandle<(u64, Duration)>) {
    serve(move |l| {
        let (s, _) = l.accept().unwrap();
        send_stream(s, &msg, dur)
    })
}

/// The sending end of a streaming cell, on a connected stream: see
/// [`Sender::stream_to`].
fn send_stream(s: TcpStream, msg: &[u8], dur: Duration) -> (u64, Duration) {
    s.set_nodelay(true).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    let mut w = BufWriter::with_capacity(64 << 10, s);
    let t0 = Instant::now();
    let sent = stream_until(t0 + dur, || write_frame(&mut w, msg).unwrap());
    (end_stream(r, w, sent), t0.elapsed())
}

/// The end of a sending cell: the empty end marker, then the receiver's count, which
/// must be `sent`.
fn end_stream(mut r: BufReader<TcpStream>, mut w: BufWriter<TcpStream>, sent: u64) -> u64 {
    write_frame(&mut w, &[]).unwrap();
    w.flush().unwrap();
    let mut buf = Vec::new();
    read_frame(&mut r, &mut buf).unwrap();
    let got = decode_count(&buf);
    assert_eq!(got, sent, "receiver counted every message");
    got
}

/// The receiving end of a streaming cell, on a connected stream: see
/// [`Contender::stream_from`].
fn receive_stream(s: TcpStream, size: usize) {
    s.set_nodelay(true).unwrap();
    let mut r = BufReader::with_capacity(64 << 10, s.try_clone().unwrap());
    let mut w = BufWriter::new(s);
    let mut buf = Vec::new();
    let n = count_until_end(size, || {
        read_frame(&mut r, &mut buf).unwrap();
        buf.len()
    });
    write_frame(&mut w, &n.to_be_bytes()).unwrap();
    w.flush().unwrap();
}

/// Echo every frame until the peer closes.
pub fn echo(r: &mut impl Read, w: &mut impl Write) {
    let mut buf = Vec::new();
    while read_frame(r, &mut buf).is_ok() {
        if write_frame(w, &buf).and_then(|()| w.flush()).is_err() {
            return;
        }
    }
}

/// The receiving end of a streaming cell whose size is not known beforehand (the
/// remote server of `--serve`): every message must be the size of the first (else no
/// count goes back, and the sender fails).
pub fn receive_any_stream(s: TcpStream) {
    s.set_nodelay(true).unwrap();
    let mut r = BufReader::with_capacity(64 << 10, s.try_clone().unwrap());
    let mut w = BufWriter::new(s);
    let mut buf = Vec::new();
    let (mut size, mut n) = (None, 0u64);
    while read_frame(&mut r, &mut buf).is_ok() && !buf.is_empty() {
        if *size.get_or_insert(buf.len()) != buf.len() {
            return;
        }
        n += 1;
    }
    let _ = write_frame(&mut w, &n.to_be_bytes()).and_then(|()| w.flush());
}

fn write_frame(w: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&(payload.len() as u32).to_be_bytes())?;
    w.write_all(payload)
}

fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h)?;
    buf.resize(u32::from_be_bytes(h) as usize, 0);
    r.read_exact(buf)
}

/// `--transport tcp --serve ADDR`: the server side for a client on another host. An
/// echo server on `addr` (the latency rows) and the common receiver on port + 1 (the
/// send-side rows), a thread per connection; exits after a minute without a new
/// connection.
pub fn serve_remote(addr: SocketAddr) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let listen = |port: u16| {
        let l = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), port))
            .unwrap_or_else(|e| panic!("bind {}:{port}: {e}", addr.ip()));
        l.set_nonblocking(true).expect("nonblocking listener");
        l
    };
    let (echo_l, count_l) = (listen(addr.port()), listen(addr.port() + 1));
    println!("serving");
    let accept = |l: std::net::TcpListener, echoes: bool| {
        let last = last.clone();
        std::thread::spawn(move || loop {
            match l.accept() {
                Ok((s, _)) => {
                    last.store(start.elapsed().as_secs(), Ordering::Relaxed);
                    s.set_nonblocking(false).expect("blocking stream");
                    std::thread::spawn(move || {
                        if echoes {
                            s.set_nodelay(true).unwrap();
                            let mut r = BufReader::new(s.try_clone().unwrap());
                            echo(&mut r, &mut BufWriter::new(s));
                        } else {
                            receive_any_stream(s);
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        })
    };
    let _threads = (accept(echo_l, true), accept(count_l, false));
    while start.elapsed().as_secs() < last.load(Ordering::Relaxed) + 60 {
        std::thread::sleep(Duration::from_millis(200));
    }
}
