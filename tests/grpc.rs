//! gRPC (tonic) over net-rs TCP (feature `grpc`): the greeter of
//! `examples/grpc_greeter` (its generated code), a unary call and a bidirectional
//! stream; a client that starts before the server (its pool retries the refused
//! connects); the server killed (its runtime dropped, every connection with it) and
//! started again mid-load: every call ends in bounded time, ok or with a lost
//! connection's error, and the client recovers by itself. Every wait is bounded.
#![cfg(feature = "grpc")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use net_rs::grpc::GrpcConnector;
use net_rs::pool::{ConnectionPool, PoolConfig, ReconnectPolicy, TcpConnector};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::Code;

mod stream_env;

use stream_env::helloworld::greeter_client::GreeterClient;
use stream_env::helloworld::greeter_server::GreeterServer;
use stream_env::helloworld::HelloRequest;
use stream_env::MyGreeter;

async fn bounded<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still waiting after {secs} s"),
    }
}

/// A server on a runtime of its own (so dropping that runtime kills it, every
/// connection with it), on `addr` (port 0: any).
fn start_server(addr: SocketAddr) -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = rt.block_on(stream_env::bind_retrying(addr));
    let bound = l.local_addr().unwrap();
    rt.spawn(async move {
        Server::builder()
            .add_service(GreeterServer::new(MyGreeter {
                loopback_peer: true,
            }))
            .serve_with_incoming(net_rs::grpc::tcp_incoming(l))
            .await
            .unwrap();
    });
    (rt, bound)
}

/// [`start_server`] from a test's runtime (a runtime is built outside of it).
async fn serve_from_async(addr: SocketAddr) -> (tokio::runtime::Runtime, SocketAddr) {
    tokio::task::spawn_blocking(move || start_server(addr))
        .await
        .unwrap()
}

fn channel(addr: SocketAddr) -> Channel {
    let pool = ConnectionPool::new(
        TcpConnector::new(addr),
        PoolConfig::default()
            .checkout_timeout(Duration::from_secs(5))
            .reconnect(ReconnectPolicy::fixed(Duration::from_millis(20))),
    )
    .unwrap();
    Endpoint::from_static("http://greeter").connect_with_connector_lazy(GrpcConnector::new(pool))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_bidirectional_streaming() {
    let (server, addr) = serve_from_async("127.0.0.1:0".parse().unwrap()).await;
    let mut greeter = GreeterClient::new(channel(addr));
    for i in 0..50 {
        let r = bounded(
            10,
            "a unary call",
            greeter.say_hello(HelloRequest {
                name: format!("n{i}"),
            }),
        )
        .await
        .unwrap();
        assert_eq!(r.into_inner().message, format!("Hello n{i}"));
    }
    // The stream, with messages of up to 1 MiB (several stream chunks each).
    let names: Vec<String> = (0..200)
        .map(|i| "x".repeat(if i % 50 == 0 { 1 << 20 } else { i }))
        .collect();
    let requests =
        futures::stream::iter(names.clone().into_iter().map(|name| HelloRequest { name }));
    let mut replies = bounded(10, "the stream's start", greeter.chat(requests))
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    while let Some(r) = bounded(10, "a stream reply", replies.message())
        .await
        .unwrap()
    {
        assert_eq!(r.message, format!("Hello {}", names[got]));
        got += 1;
    }
    assert_eq!(got, names.len());
    server.shutdown_background();
}

/// The client starts first: its connects are refused until the server listens, and
/// the pool's policy retries them; the first call succeeds once the server is there.
#[tokio::test]
async fn a_client_that_starts_first_connects_when_the_server_comes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut greeter = GreeterClient::new(channel(port));
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        start_server(port).0
    });
    let t = Instant::now();
    let r = bounded(
        10,
        "the first call",
        greeter.say_hello(HelloRequest {
            name: "early".into(),
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.into_inner().message, "Hello early");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    server.join().unwrap().shutdown_background();
}

/// 8 tasks call in a loop; the server is killed, then started again on the same port:
/// every call ends within its bound (ok, or a lost connection's error: `Unavailable`
/// while the server is away; `Unknown`/`Cancelled` from tonic for a call the lost
/// connection cut short), and calls succeed again after the restart, with no help from
/// the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_every_call_ends_and_the_client_recovers() {
    let (server, addr) = serve_from_async("127.0.0.1:0".parse().unwrap()).await;
    let greeter = GreeterClient::new(channel(addr));
    let done = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let (ok_after, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for task in 0..8 {
        let mut g = greeter.clone();
        let (done, restarted, ok_after, failed) = (
            done.clone(),
            restarted.clone(),
            ok_after.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !done.load(Ordering::SeqCst) {
                seq += 1;
                let name = format!("{task}-{seq}");
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(15),
                    g.say_hello(HelloRequest { name: name.clone() }),
                )
                .await
                .unwrap_or_else(|_| panic!("a call still waited after 15 s"));
                assert!(t.elapsed() < Duration::from_secs(15));
                match r {
                    Ok(reply) => {
                        assert_eq!(reply.into_inner().message, format!("Hello {name}"));
                        if restarted.load(Ordering::SeqCst) {
                            ok_after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(s) => {
                        // `Unavailable` for a call made while the server is away (the
                        // pool's connect failed); a call the lost connection cut short
                        // ends as tonic maps hyper's error: `Unknown` ("transport
                        // error") or `Cancelled` (the connection closed before it went
                        // out), whatever the transport under it.
                        let lost = match s.code() {
                            Code::Unavailable => true,
                            Code::Unknown => s.message().contains("transport error"),
                            Code::Cancelled => s.message().contains("canceled"),
                            _ => false,
                        };
                        assert!(lost, "not a lost connection's error: {s:?}");
                        failed.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.shutdown_background();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (server, _) = serve_from_async(addr).await;
    restarted.store(true, Ordering::SeqCst);
    bounded(30, "calls after the restart", async {
        while ok_after.load(Ordering::SeqCst) < 100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    done.store(true, Ordering::SeqCst);
    for t in tasks {
        bounded(20, "a calling task", t).await.unwrap();
    }
    eprintln!(
        "server killed and restarted: {} calls failed Unavailable, {} replies after",
        failed.load(Ordering::SeqCst),
        ok_after.load(Ordering::SeqCst)
    );
    server.shutdown_background();
}

/// The child of [`an_accept_error_that_lasts_costs_no_cpu`]: a server limited to 64
/// file descriptors, its address on stdout, until its stdin closes.
#[cfg(target_os = "linux")]
fn emfile_child() {
    use rustix::process::{setrlimit, Resource, Rlimit};
    use std::io::{Read as _, Write as _};
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(64),
            maximum: Some(64),
        },
    )
    .unwrap();
    let (_rt, addr) = start_server("127.0.0.1:0".parse().unwrap());
    println!("ADDR={addr}");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    std::process::exit(0);
}

/// The CPU time (user + system, in clock ticks of 10 ms) process `pid` used so far.
#[cfg(target_os = "linux")]
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A server out of file descriptors (`EMFILE` on every accept while connections wait
/// in the backlog) does not spin on failed accepts (tonic asks for the next connection
/// at once after an error: `tcp_incoming` waits), and serves again once connections
/// close. The server runs in a child process (this test binary again) with a limit of
/// 64 descriptors, and 150 clients connect to it.
#[cfg(target_os = "linux")]
#[test]
fn an_accept_error_that_lasts_costs_no_cpu() {
    use std::io::BufRead as _;
    const CHILD: &str = "NET_RS_GRPC_EMFILE_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return emfile_child();
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "an_accept_error_that_lasts_costs_no_cpu",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let addr: SocketAddr = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "the child ended");
        // The harness may have written the test's name on the same line.
        if let Some(k) = line.find("ADDR=") {
            break line[k + 5..].trim().parse().unwrap();
        }
    };
    let clients: Vec<_> = (0..150)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(pid) - t0;
    eprintln!("the server out of descriptors: {spent} ticks of CPU (of 10 ms) in 2 s");
    drop(clients);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let served = rt.block_on(async {
        let mut greeter = GreeterClient::new(channel(addr));
        let start = Instant::now();
        loop {
            let call = greeter.say_hello(HelloRequest { name: "e".into() });
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(Ok(r)) => return Ok(r.into_inner().message),
                other if start.elapsed() > Duration::from_secs(20) => {
                    return Err(format!("{other:?}"))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    drop(child.stdin.take());
    let _ = child.wait();
    assert!(
        spent < 50,
        "the server out of descriptors used {spent} ticks of CPU (of 10 ms) in 2 s"
    );
    assert_eq!(served.expect("served again"), "Hello e");
}
