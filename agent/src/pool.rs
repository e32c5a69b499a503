//! Worker threads for slow signing operations (RSA, devices), behind a bounded queue.
//! A full queue answers `busy` at once: the agent never lets callers pile up unboundedly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Sender, TrySendError};
use keyward::{Error, Result};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    tx: Sender<Job>,
    depth: Arc<AtomicUsize>,
    workers: usize,
}

impl Pool {
    pub fn new(workers: usize, queue: usize) -> Pool {
        // Multi-consumer: each idle worker parks on the channel by itself, so handing over a
        // job wakes exactly one thread (a shared Mutex<Receiver> woke a second one per job to
        // take over the lock, which measured as ~100 µs of CPU per device request).
        let (tx, rx) = bounded::<Job>(queue);
        let depth = Arc::new(AtomicUsize::new(0));
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let depth = depth.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("keyward-sign-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        depth.fetch_sub(1, Ordering::Relaxed);
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start signing worker {i}: {e}");
            }
        }
        Pool {
            tx,
            depth,
            workers: workers.max(1),
        }
    }

    /// Run `f` on a worker; `busy` immediately if the queue is full.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let (otx, orx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = otx.send(f());
        });
        self.depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                return Err(Error::Busy("the signing queue is full".into()));
            }
            Err(TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                return Err(Error::Internal("signing workers are gone".into()));
            }
        }
        orx.await
            .map_err(|_| Error::Internal("a signing worker dropped a job".into()))?
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_answers_busy_at_once() {
        let pool = Arc::new(Pool::new(1, 1));
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        // Occupy the only worker...
        let p = pool.clone();
        let first = tokio::spawn(async move {
            p.run(move || {
                let _ = started_tx.send(());
                let _ = release_rx.recv();
                Ok(1)
            })
            .await
        });
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        // ...fill the one queue slot...
        let p = pool.clone();
        let second = tokio::spawn(async move { p.run(|| Ok(2)).await });
        while pool.depth() == 0 {
            tokio::task::yield_now().await;
        }
        // ...and the next job is refused immediately.
        assert_eq!(pool.run(|| Ok(3)).await.unwrap_err().code(), "busy");
        release_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 2);
    }
}
