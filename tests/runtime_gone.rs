//! A transport that outlives its runtime: libraries keep connections in statics, test
//! harnesses make a runtime per test. After the runtime that made the connection is
//! gone, every operation returns an error or succeeds (none hangs, none panics), and
//! what `send` accepted before is still delivered.
#![cfg(feature = "tokio")]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use net_rs::drivers::tcp::TcpTransport;
use net_rs::transport::Transport;
use net_rs::ErrorKind;

/// Run `f` on its own thread; fail the test if it takes more than 20 s.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} hung for 20 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Bytes read from `s` until EOF (or an error).
fn count_until_eof(s: &mut std::net::TcpStream) -> usize {
    let mut n = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return n,
            Ok(k) => n += k,
        }
    }
}

/// A blocking peer that echoes one message, then counts what arrives until EOF.
fn peer() -> (SocketAddr, mpsc::Receiver<usize>) {
    peer_pausing(Duration::ZERO)
}

/// [`peer`], reading nothing for `pause` after its echo (so what we send next fills
/// the socket).
fn peer_pausing(pause: Duration) -> (SocketAddr, mpsc::Receiver<usize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = [0u8; 4];
        s.read_exact(&mut head).unwrap();
        let mut m = vec![0u8; u32::from_be_bytes(head) as usize];
        s.read_exact(&mut m).unwrap();
        s.write_all(&head).unwrap();
        s.write_all(&m).unwrap();
        std::thread::sleep(pause);
        let n = count_until_eof(&mut s);
        let _ = tx.send(n);
    });
    (addr, rx)
}

fn tokio_rt(multi: bool) -> tokio::runtime::Runtime {
    if multi {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }
}

/// Every operation on a transport whose runtime is gone, run from `run` (another
/// runtime, or a plain `block_on`): an error or success each, within the bound.
fn use_after(t: Arc<TcpTransport>, run: fn(Box<dyn FnOnce() + Send>)) {
    let t2 = t.clone();
    run(Box::new(move || {
        futures::executor::block_on(async {
            let err = t2.send(Bytes::from_static(b"late")).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
            assert!(t2.is_closed());
            // Everything accepted before was written: flush has nothing to wait for.
            t2.flush().await.unwrap();
            assert!(t2.recv().await.is_err());
            let _ = t2.close().await;
        })
    }));
    drop(t);
}

fn outlives(multi: bool, then: fn(Box<dyn FnOnce() + Send>)) {
    let (addr, counted) = peer();
    let rt = tokio_rt(multi);
    let t = rt.block_on(async {
        let t = TcpTransport::connect(addr).await.unwrap();
        t.send(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(&t.recv().await.unwrap()[..], b"hello");
        Arc::new(t)
    });
    drop(rt);
    use_after(t, then);
    assert_eq!(
        counted.recv_timeout(Duration::from_secs(20)),
        Ok(0),
        "the peer sees EOF and nothing after the runtime ended"
    );
}

fn in_block_on(f: Box<dyn FnOnce() + Send>) {
    bounded("an operation from futures::executor::block_on", f);
}

fn in_other_tokio(f: Box<dyn FnOnce() + Send>) {
    bounded("an operation from another tokio runtime", move || {
        tokio_rt(false).block_on(async move { f() })
    });
}

#[test]
fn tokio_current_thread_then_block_on() {
    outlives(false, in_block_on);
}

#[test]
fn tokio_multi_thread_then_block_on() {
    outlives(true, in_block_on);
}

#[test]
fn tokio_current_thread_then_another_tokio_runtime() {
    outlives(false, in_other_tokio);
}

#[test]
fn tokio_multi_thread_then_another_tokio_runtime() {
    outlives(true, in_other_tokio);
}

/// Messages accepted just before the runtime is dropped still arrive in full, and
/// `close` from another runtime waits for them.
#[test]
fn queued_messages_are_delivered_after_the_runtime_is_dropped() {
    for multi in [false, true] {
        let (addr, counted) = peer();
        let rt = tokio_rt(multi);
        let size = 6 << 20;
        let t = rt.block_on(async {
            let t = TcpTransport::connect(addr).await.unwrap();
            t.send(Bytes::from_static(b"hi")).await.unwrap();
            t.recv().await.unwrap();
            for _ in 0..2 {
                t.send(vec![7u8; size].into()).await.unwrap();
            }
            t
        });
        drop(rt);
        let t = Arc::new(t);
        let t2 = t.clone();
        bounded("close after the runtime ended", move || {
            tokio_rt(false).block_on(async move { t2.close().await })
        })
        .unwrap();
        assert_eq!(
            counted.recv_timeout(Duration::from_secs(20)),
            Ok(2 * (4 + size)),
            "multi_thread {multi}: both messages arrive"
        );
    }
}

/// A peer that sends one 3-byte message at once, starts reading only after 300 ms (so
/// what we send is still queued when our runtime goes), counts what arrives until EOF
/// and keeps its end open for 2 s more (so our reads find nothing, not an end).
fn slow_peer_that_spoke() -> (SocketAddr, mpsc::Receiver<usize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&[0, 0, 0, 3, 1, 2, 3]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let n = count_until_eof(&mut s);
        let _ = tx.send(n);
        std::thread::sleep(Duration::from_secs(2));
    });
    (addr, rx)
}

/// Receiving after the runtime is gone ends receiving only: a message that had already
/// arrived is returned, a `recv` that would have to wait fails with `Unsupported`, and
/// neither that nor any later `flush`, `close`, `shutdown`, `recv` or the last handle's
/// drop loses what `send` accepted before. (Found by a breaker: one `recv` failed the
/// connection with tokio's "being shutdown" error, and the drop then cut 24 MiB of
/// accepted messages short.)
#[test]
fn receiving_after_the_runtime_is_gone_loses_nothing_sent() {
    let size = 8 << 20;
    for multi in [false, true] {
        for then in ["drop", "flush", "close", "shutdown", "messages"] {
            let (addr, counted) = slow_peer_that_spoke();
            let rt = tokio_rt(multi);
            let t = rt.block_on(async {
                let t = TcpTransport::connect(addr).await.unwrap();
                for i in 0..3u8 {
                    t.send(vec![i; size].into()).await.unwrap();
                }
                // Let the peer's message arrive before the runtime goes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                t
            });
            drop(rt);
            let what = format!("multi_thread {multi}, then {then}");
            let w = what.clone();
            bounded("operations after the runtime ended", move || {
                futures::executor::block_on(async move {
                    if then == "messages" {
                        use futures::StreamExt;
                        let mut m = t.messages();
                        let first = m.next().await.unwrap().unwrap();
                        assert_eq!(&first[..], &[1, 2, 3], "{w}");
                        let err = m.next().await.unwrap().unwrap_err();
                        assert_eq!(err.kind(), ErrorKind::Unsupported, "{w}: {err}");
                        assert!(m.next().await.is_none(), "{w}");
                        return;
                    }
                    assert_eq!(&t.recv().await.unwrap()[..], &[1, 2, 3], "{w}");
                    let err = t.recv().await.unwrap_err();
                    assert_eq!(err.kind(), ErrorKind::Unsupported, "{w}: {err}");
                    assert_eq!(t.recv().await.unwrap_err().kind(), ErrorKind::Unsupported);
                    match then {
                        "flush" => t.flush().await.unwrap(),
                        "close" => t.close().await.unwrap(),
                        "shutdown" => t.shutdown().await.unwrap(),
                        _ => {}
                    }
                })
            });
            assert_eq!(
                counted.recv_timeout(Duration::from_secs(30)),
                Ok(3 * (4 + size)),
                "{what}: every accepted message arrives"
            );
        }
    }
}

/// The async-io adapter with an executor of the user's that is dropped: the
/// connection's writer task goes with it; the same rules hold.
#[cfg(feature = "async-std")]
#[test]
fn async_io_with_a_dropped_executor() {
    use net_rs::drivers::tcp::TcpConfig;
    use net_rs::runtime::async_io::AsyncIoRuntime;
    use net_rs::runtime::Runtime;
    let (addr, counted) = peer();
    let ex = Arc::new(async_executor::Executor::new());
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let runner = {
        let ex = ex.clone();
        std::thread::spawn(move || futures::executor::block_on(ex.run(stopped.recv())))
    };
    let spawner = {
        let ex = Arc::downgrade(&ex);
        move |task| {
            if let Some(ex) = ex.upgrade() {
                ex.spawn(task).detach();
            }
        }
    };
    let rt: Arc<dyn Runtime> = Arc::new(AsyncIoRuntime::with_spawner(spawner));
    let cfg = TcpConfig::default().runtime(rt);
    let size = 6 << 20;
    let t = futures::executor::block_on(async {
        let t = TcpTransport::connect_with(addr, &cfg).await.unwrap();
        t.send(Bytes::from_static(b"hi")).await.unwrap();
        t.recv().await.unwrap();
        t.send(vec![1u8; size].into()).await.unwrap();
        t
    });
    stop.send_blocking(()).unwrap();
    let _ = runner.join().unwrap();
    drop(ex);
    let t = Arc::new(t);
    let t2 = t.clone();
    bounded("operations after the executor was dropped", move || {
        futures::executor::block_on(async move {
            let err = t2.send(Bytes::from_static(b"late")).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
            t2.close().await
        })
    })
    .unwrap();
    assert_eq!(
        counted.recv_timeout(Duration::from_secs(20)),
        Ok(4 + size),
        "what was accepted before arrives"
    );
}

/// A runtime driven by hand: spawned tasks wait in a list until the test polls them,
/// timers complete only once the runtime is "shut down" (then at once, as the tokio
/// adapter's do), and sockets come from the async-io adapter.
#[cfg(feature = "async-std")]
mod manual {
    use super::*;
    use net_rs::runtime::{AsyncListener, Runtime, SocketOptions, TcpSocket};
    use net_rs::transport::BoxFuture;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    #[derive(Default)]
    pub struct Manual {
        pub tasks: Mutex<Vec<BoxFuture<'static, ()>>>,
        pub down: Arc<AtomicBool>,
    }

    impl std::fmt::Debug for Manual {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Manual")
        }
    }

    impl Manual {
        /// Poll every task once (a noop waker: the test decides when to poll again).
        pub fn poll_all(&self) {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            self.tasks
                .lock()
                .unwrap()
                .retain_mut(|t| t.as_mut().poll(&mut cx).is_pending());
        }
    }

    impl Runtime for Manual {
        fn spawn(&self, task: BoxFuture<'static, ()>) {
            self.tasks.lock().unwrap().push(task);
        }
        fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
            let down = self.down.clone();
            Box::pin(futures::future::poll_fn(move |_| {
                if down.load(Ordering::SeqCst) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }))
        }
        fn is_shut_down(&self) -> bool {
            self.down.load(Ordering::SeqCst)
        }
        fn tcp_connect(
            &self,
            addr: SocketAddr,
            opts: SocketOptions,
        ) -> BoxFuture<'static, std::io::Result<TcpSocket>> {
            net_rs::runtime::async_io::AsyncIoRuntime::new().tcp_connect(addr, opts)
        }
        fn tcp_bind(
            &self,
            addr: SocketAddr,
            opts: SocketOptions,
        ) -> std::io::Result<Box<dyn AsyncListener>> {
            net_rs::runtime::async_io::AsyncIoRuntime::new().tcp_bind(addr, opts)
        }
    }
}

/// A runtime that is shutting down completes its timers at once (tokio's do, through
/// the adapter). The writer of a dropped transport, polled once more during that
/// shutdown, must not take its linger timer firing for the linger time running out
/// and drop what it still had: the linger thread delivers it. (Found by a breaker: 1
/// run in 50 of a multi-thread tokio program lost its last messages behind a clean
/// end of stream.)
#[cfg(feature = "async-std")]
#[test]
fn a_timer_fired_by_shutdown_is_not_the_linger_time_running_out() {
    use net_rs::drivers::tcp::TcpConfig;
    use std::sync::atomic::Ordering;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, counted) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // A slow reader: the transport's queue fills up first.
        std::thread::sleep(Duration::from_millis(300));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut n = 0;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        let _ = tx.send(n);
    });
    let rt = Arc::new(manual::Manual::default());
    let cfg = TcpConfig::default().runtime(rt.clone());
    let size = 8 << 20;
    bounded("the scenario", move || {
        futures::executor::block_on(async {
            let t = TcpTransport::connect_with(addr, &cfg).await.unwrap();
            t.send(vec![3u8; size].into()).await.unwrap();
            drop(t); // the last handle: the writer goes on, with a linger timer
        });
        rt.poll_all(); // the writer runs, arms its linger timer
        rt.down.store(true, Ordering::SeqCst); // shutdown: timers complete at once
        rt.poll_all(); // polled once more during the shutdown
        rt.tasks.lock().unwrap().clear(); // the runtime drops its tasks
    });
    assert_eq!(
        counted.recv_timeout(Duration::from_secs(20)),
        Ok(4 + size),
        "everything accepted arrives"
    );
}

/// A transport dropped (or shut down) on a runtime that then sits idle, its thread
/// blocked on something else (a blocking wrapper around an async client, say): the
/// peer still sees the stream end at once, as it would for a dropped socket, with
/// everything sent before it: what the socket takes at once is written by the dropping
/// thread, the rest (an 8 MiB message does not fit) by the linger thread, which needs
/// no runtime.
#[test]
fn the_stream_ends_when_the_last_handle_is_dropped_on_an_idle_runtime() {
    for (multi, shutdown_first, big) in [false, true]
        .into_iter()
        .flat_map(|m| [(m, false), (m, true)])
        .flat_map(|(m, s)| [(m, s, 32 << 10), (m, s, 8 << 20)])
    {
        {
            // The peer reads nothing for 200 ms after its echo: the 8 MiB message
            // is still mostly queued when the last handle goes.
            let (addr, counted) = peer_pausing(Duration::from_millis(200));
            let rt = tokio_rt(multi);
            rt.block_on(async {
                let t = TcpTransport::connect(addr).await.unwrap();
                t.send(Bytes::from_static(b"hello")).await.unwrap();
                assert_eq!(&t.recv().await.unwrap()[..], b"hello");
                t.send(Bytes::from(vec![7u8; big])).await.unwrap();
                t.send(Bytes::from_static(b"last")).await.unwrap();
                if shutdown_first {
                    // Not awaited: the caller gives up on it at once.
                    drop(t.shutdown());
                }
                drop(t);
            });
            // The runtime is alive and idle while the peer waits for the end.
            assert_eq!(
                counted.recv_timeout(Duration::from_secs(10)),
                Ok(4 + big + 4 + 4),
                "multi-thread {multi}, shutdown first {shutdown_first}, {big} B: the \
                 peer saw every byte and the end while the runtime sat idle"
            );
            drop(rt);
        }
    }
}

/// The adapter's idle task (how a transport learns its runtime is gone) lives only as
/// long as something made through the adapter: connections and listeners that come and
/// go leave no tasks parked on the runtime (each used to leave one, about 0.3 kB a
/// connection, for the runtime's life).
#[test]
fn connections_that_come_and_go_leave_no_tasks_behind() {
    use net_rs::drivers::tcp::TcpListener;
    bounded("1000 connections", || {
        let rt = tokio_rt(false);
        rt.block_on(async {
            let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
            let before = alive();
            for _ in 0..500 {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let (c, s) = futures::join!(TcpTransport::connect(addr), l.accept());
                drop((c.unwrap(), s.unwrap(), l));
            }
            // What the dropped connections still had to do ends within a moment.
            let mut left = alive();
            for _ in 0..200 {
                if left <= before + 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                left = alive();
            }
            assert!(
                left <= before + 4,
                "{left} tasks alive after 500 connections and listeners came and went (before: {before})"
            );
        })
    });
}
