//! What `send` accepted reaches the peer even when the program ends right after.
//!
//! Each case runs the README's seed program in a child process (this test binary run
//! again with `NET_RS_EXIT_CHILD` set): connect, `send` one message, and end: return
//! from `main` (the runtime is dropped, or it is net-rs's own executor thread that the
//! exit kills), or `std::process::exit` with the transport still alive. A plain `std`
//! server counts the bytes until EOF and must get every one, every run, under every
//! runtime and for sizes from 4 bytes to 8 MiB (far more than the socket buffer takes).
//! The same for bytes written through a `ByteStream` and flushed.
#![cfg(feature = "tokio")]

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use net_rs::drivers::tcp::{TcpConfig, TcpTransport};
use net_rs::transport::Transport;

const CHILD: &str = "NET_RS_EXIT_CHILD";

/// How the child program ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// `main` returns; the transport is dropped first.
    Return,
    /// `std::process::exit(0)` right after `send`, the transport still alive.
    Exit,
    /// The bytes written through a `ByteStream` and flushed, then `main` returns.
    StreamReturn,
    /// The same, then `std::process::exit(0)`, the stream still alive.
    StreamExit,
}

fn payload(size: usize) -> Bytes {
    (0..size)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn seed(addr: SocketAddr, size: usize, end: End) {
    // A config without a runtime: each runtime's default applies.
    let transport = TcpTransport::connect_with(addr, &TcpConfig::default())
        .await
        .expect("connect");
    if let End::StreamReturn | End::StreamExit = end {
        use futures::AsyncWriteExt;
        let mut stream = net_rs::stream::ByteStream::new(transport);
        stream.write_all(&payload(size)).await.expect("write");
        stream.flush().await.expect("flush");
        if let End::StreamExit = end {
            std::process::exit(0);
        }
        return;
    }
    transport.send(payload(size)).await.expect("send");
    if let End::Exit = end {
        std::process::exit(0);
    }
}

/// The child side: run the seed program under the runtime named in the spec.
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let mut it = spec.split(' ');
    let runtime = it.next().unwrap().to_string();
    let addr: SocketAddr = it.next().unwrap().parse().unwrap();
    let size: usize = it.next().unwrap().parse().unwrap();
    let end = match it.next().unwrap() {
        "return" => End::Return,
        "stream-return" => End::StreamReturn,
        "stream-exit" => End::StreamExit,
        _ => End::Exit,
    };
    match runtime.as_str() {
        "tokio-current-thread" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(seed(addr, size, end)),
        "tokio-multi-thread" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(seed(addr, size, end)),
        #[cfg(feature = "async-std")]
        "async-std" => async_std::task::block_on(seed(addr, size, end)),
        #[cfg(feature = "async-std")]
        "smol" => smol::block_on(seed(addr, size, end)),
        #[cfg(feature = "async-std")]
        "futures" => futures::executor::block_on(seed(addr, size, end)),
        other => panic!("unknown runtime {other}"),
    }
}

/// Run one child and return the bytes the server received before EOF. `speak`: the
/// server first sends a message the child never reads, and starts reading late (a
/// socket closed with unread input answers with a reset, which would lose what is
/// still in flight).
fn run_once(runtime: &str, size: usize, end: End) -> usize {
    run_with(runtime, size, end, false).len()
}

fn run_with(runtime: &str, size: usize, end: End, speak: bool) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let end_word = match end {
        End::Return => "return",
        End::Exit => "exit",
        End::StreamReturn => "stream-return",
        End::StreamExit => "stream-exit",
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--test-threads=1", "--quiet"])
        .env(CHILD, format!("{runtime} {addr} {size} {end_word}"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let (mut sock, _) = loop {
        match listener.accept() {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{runtime}: the child never connected"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    sock.set_nonblocking(false).unwrap();
    if speak {
        std::io::Write::write_all(&mut sock, &[0, 0, 0, 2, b'h', b'i']).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{runtime}, {size} B: read after {} bytes: {e}", got.len()),
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{runtime}: the child failed: {status}");
    got
}

/// The payloads of the length-prefixed frames in `raw`, joined (a cut frame ends it).
fn unframe(raw: &[u8]) -> Vec<u8> {
    let (mut out, mut at) = (Vec::new(), 0);
    while at + 4 <= raw.len() {
        let n = u32::from_be_bytes(raw[at..at + 4].try_into().unwrap()) as usize;
        if at + 4 + n > raw.len() {
            break;
        }
        out.extend_from_slice(&raw[at + 4..at + 4 + n]);
        at += 4 + n;
    }
    out
}

fn runtimes() -> Vec<&'static str> {
    let mut v = vec!["tokio-current-thread", "tokio-multi-thread"];
    if cfg!(feature = "async-std") {
        v.extend(["async-std", "smol", "futures"]);
    }
    v
}

fn check(end: End, rounds: usize) {
    for runtime in runtimes() {
        for size in [4usize, 1024, 1 << 20, 8 << 20] {
            for round in 0..rounds {
                let got = run_once(runtime, size, end);
                assert_eq!(
                    got,
                    4 + size,
                    "{runtime}, {size} B message, {end:?} from main, round {round}: the \
                     server got {got} of {} bytes",
                    4 + size
                );
            }
        }
    }
}

#[test]
fn message_sent_right_before_main_returns_is_delivered() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    check(End::Return, 3);
}

#[test]
fn message_sent_right_before_process_exit_is_delivered() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    check(End::Exit, 2);
}

#[test]
fn delivered_even_with_input_left_unread() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    for end in [End::Return, End::Exit] {
        for runtime in runtimes() {
            for size in [1usize << 20, 8 << 20] {
                let got = run_with(runtime, size, end, true).len();
                assert_eq!(
                    got,
                    4 + size,
                    "{runtime}, {size} B, {end:?}, peer spoke first: the server got {got} of {}",
                    4 + size
                );
            }
        }
    }
}

/// Bytes written through a `ByteStream` and flushed reach the peer, whole and in
/// order, when `main` returns or the process exits right after the flush.
#[test]
fn bytes_flushed_right_before_the_program_ends_are_delivered() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    for end in [End::StreamReturn, End::StreamExit] {
        for runtime in runtimes() {
            for size in [4usize, 100_000, 8 << 20] {
                for round in 0..2 {
                    let got = unframe(&run_with(runtime, size, end, false));
                    assert_eq!(
                        got.len(),
                        size,
                        "{runtime}, {size} B through a ByteStream, {end:?}, round {round}"
                    );
                    assert!(
                        got[..] == payload(size)[..],
                        "{runtime}, {size} B: bytes differ"
                    );
                }
            }
        }
    }
}
