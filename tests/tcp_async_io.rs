//! The TCP suite on the async-io adapter: under async-std, under smol, and under a
//! minimal executor written here (embedding in a custom executor).
#![cfg(feature = "async-std")]

mod common;
mod tcp_suite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use net_rs::runtime::async_io::AsyncIoRuntime;
use net_rs::runtime::Runtime;

use common::Case;

mod async_std_runtime {
    crate::tcp_suite!(crate::common::run_async_std);
}

mod smol_runtime {
    crate::tcp_suite!(crate::common::run_smol);
}

/// The default runtime when no tokio runtime runs: the shared async-io adapter.
mod default_runtime {
    use super::*;
    fn run(case: Case) {
        let rt = net_rs::runtime::default_runtime().unwrap();
        futures::executor::block_on(case(rt));
    }
    crate::tcp_suite!(run);
}

/// A single-threaded executor in ~50 lines: a run queue of tasks woken through
/// `std::task::Wake`, and a thread park when there is nothing to run. It knows nothing
/// about sockets; async-io's reactor thread drives the I/O.
mod custom_executor {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Condvar, Mutex};
    use std::task::{Context, Wake, Waker};

    type BoxFut = Pin<Box<dyn Future<Output = ()> + Send>>;

    struct Task {
        fut: Mutex<Option<BoxFut>>,
        queue: Arc<Queue>,
    }

    #[derive(Default)]
    struct Queue {
        ready: Mutex<VecDeque<Arc<Task>>>,
        main_woken: Mutex<bool>,
        cv: Condvar,
    }

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            let q = self.queue.clone();
            q.ready.lock().unwrap().push_back(self);
            q.cv.notify_one();
        }
    }

    struct MainWaker(Arc<Queue>);
    impl Wake for MainWaker {
        fn wake(self: Arc<Self>) {
            *self.0.main_woken.lock().unwrap() = true;
            let _g = self.0.ready.lock().unwrap();
            self.0.cv.notify_one();
        }
    }

    fn block_on(queue: Arc<Queue>, main: Pin<Box<dyn Future<Output = ()>>>) {
        let mut main = main;
        let main_waker = Waker::from(Arc::new(MainWaker(queue.clone())));
        *queue.main_woken.lock().unwrap() = true;
        loop {
            if std::mem::take(&mut *queue.main_woken.lock().unwrap())
                && main
                    .as_mut()
                    .poll(&mut Context::from_waker(&main_waker))
                    .is_ready()
            {
                return;
            }
            let next = queue.ready.lock().unwrap().pop_front();
            match next {
                Some(task) => {
                    let waker = Waker::from(task.clone());
                    let mut slot = task.fut.lock().unwrap();
                    if let Some(f) = slot.as_mut() {
                        if f.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
                            *slot = None;
                        }
                    }
                }
                None => {
                    let ready = queue.ready.lock().unwrap();
                    if ready.is_empty() && !*queue.main_woken.lock().unwrap() {
                        drop(queue.cv.wait(ready).unwrap());
                    }
                }
            }
        }
    }

    fn run(case: Case) {
        let queue = Arc::new(Queue::default());
        let q = queue.clone();
        let rt: Arc<dyn Runtime> = Arc::new(AsyncIoRuntime::with_spawner(move |fut| {
            let task = Arc::new(Task {
                fut: Mutex::new(Some(fut)),
                queue: q.clone(),
            });
            task.wake();
        }));
        block_on(queue, case(rt));
    }
    crate::tcp_suite!(run);
}
