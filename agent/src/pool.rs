//! Worker threads for slow signing operations (RSA, devices), behind a bounded queue.
//! A full queue answers `busy` at once: the agent never lets callers pile up unboundedly.
//!
//! A device request that a connection sends on its own (nothing else pipelined behind it) is
//! signed on the connection's thread instead when the token has an idle session
//! ([`Pool::sign_here`]): no hand-off to a worker and back, which on a small VM costs more CPU
//! than a SoftHSM signature (docs/decisions.md D14). A watchdog thread keeps the device
//! timeout's promise for those calls.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};
use keyward::backend::pkcs11::IdleSession;
use keyward::backend::tpm::IdleWorker;
use keyward::backend::Signature;
use keyward::model::{Algorithm, KeyRef};
use keyward::proto::{frame, Response};
use keyward::{Error, Result};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    tx: Sender<Job>,
    depth: Arc<AtomicUsize>,
    workers: usize,
    /// Device calls running on connection threads now (at most `workers`).
    here: AtomicUsize,
    /// `None` if its thread could not start: then nothing is signed on connection threads.
    watchdog: Option<Arc<Watchdog>>,
}

/// Where a connection's lone request is answered if its device call outlives the timeout:
/// the connection's socket (a duplicate descriptor) and the request's id.
#[derive(Clone)]
pub struct Answer {
    pub id: Option<u64>,
    pub socket: Arc<UnixStream>,
}

tokio::task_local! {
    /// Set by the connection (server.rs) around a request it answers itself because nothing
    /// else is buffered or waiting to be written: only such a request may hold the
    /// connection's thread for a device call, since the watchdog can then answer it alone.
    pub static LONE: Answer;
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
            here: AtomicUsize::new(0),
            watchdog: Watchdog::start(),
        }
    }

    /// Sign on the calling thread when that costs no waiting: the connection marked the
    /// request [`LONE`], fewer than `workers` such calls are running, and `idle` finds the
    /// device connected and free (a PKCS#11 session, the TPM context). `None`: queue it as
    /// usual. `device` names it in the timeout error ("pkcs11 token `t`", "tpm `t`").
    ///
    /// The device call runs inside `block_in_place`, so the runtime hands this worker's other
    /// tasks and the I/O driver to another thread first; the reactor never waits for a device.
    /// If the call outlives `limit`, the watchdog answers `backend_unavailable` and closes the
    /// connection (whose task is still in the call); the thread, the session and the slot
    /// stay taken until the device returns, as a pool worker would.
    pub fn sign_here<I: Idle>(
        &self,
        device: String,
        limit: Duration,
        idle: impl FnOnce() -> Option<I>,
        key: &KeyRef,
        alg: Algorithm,
        msg: &[u8],
    ) -> Option<Result<Signature>> {
        let watchdog = self.watchdog.as_ref()?;
        let answer = LONE.try_with(Answer::clone).ok()?;
        // block_in_place needs the multi-thread runtime (the agent's; not a unit test's).
        let flavor = tokio::runtime::Handle::try_current().ok()?.runtime_flavor();
        if flavor != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        if self.here.fetch_add(1, Ordering::AcqRel) >= self.workers {
            self.here.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let slot = Slot(&self.here);
        let session = idle()?;
        let call = Arc::new(Call {
            state: Mutex::new(CallState::Running),
            answer,
            device,
            limit,
        });
        let id = watchdog.arm(call.clone(), Instant::now() + limit);
        let result = tokio::task::block_in_place(|| session.sign(key, alg, msg));
        watchdog.disarm(id);
        drop(slot);
        let mut state = call.lock();
        if *state == CallState::Expired {
            // Already answered by the watchdog, and the connection is closed.
            return Some(Err(call.error()));
        }
        *state = CallState::Done;
        Some(result)
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

/// A device that was free when asked, ready to sign once on the calling thread.
pub trait Idle {
    fn sign(self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature>;
}

impl Idle for IdleSession<'_> {
    fn sign(self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        IdleSession::sign(self, key, alg, msg)
    }
}

impl Idle for IdleWorker<'_> {
    fn sign(self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        IdleWorker::sign(self, key, alg, msg)
    }
}

/// One slot of the device calls running on connection threads.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallState {
    Running,
    Done,
    Expired,
}

/// A device call on a connection thread, as the watchdog sees it.
struct Call {
    state: Mutex<CallState>,
    answer: Answer,
    /// "pkcs11 token `t`", "tpm `t`": for the error and the log.
    device: String,
    limit: Duration,
}

impl Call {
    fn lock(&self) -> MutexGuard<'_, CallState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self) -> Error {
        Error::BackendUnavailable(format!(
            "{}: the device did not answer within {} ms",
            self.device,
            self.limit.as_millis()
        ))
    }

    /// The deadline passed: answer the client and close its connection, unless the call
    /// finished first. Under the call's lock, so the connection cannot write meanwhile.
    fn expire(&self) {
        let mut state = self.lock();
        if *state != CallState::Running {
            return;
        }
        *state = CallState::Expired;
        let e = self.error();
        tracing::warn!(device = %self.device, "{e}; answered by the watchdog, closing the connection");
        let answer = frame::encode(&Response::err(self.answer.id, &e).to_bytes());
        // The socket is non-blocking: a client that does not read gets only the close.
        let _ = (&*self.answer.socket).write(&answer);
        let _ = self.answer.socket.shutdown(Shutdown::Both);
    }
}

/// The deadlines of device calls on connection threads. One thread, which sleeps until the
/// earliest deadline; arming a call wakes it only when that call is due before it would look
/// anyway, so in steady use arming costs a lock and a push, no thread wake-up.
struct Watchdog {
    reg: Mutex<Registry>,
    wake: Condvar,
}

struct Registry {
    armed: Vec<Armed>,
    next_id: u64,
    /// When the thread looks next; `None`: parked until a call is armed.
    looks_at: Option<Instant>,
    /// Calls armed since the thread last looked (it parks only after quiet looks).
    armed_since: u64,
    /// The shortest limit armed so far: the idle look interval, so that arming never has to
    /// wake the thread while it looks regularly.
    shortest: Duration,
}

struct Armed {
    id: u64,
    deadline: Instant,
    call: Arc<Call>,
}

/// Quiet looks (no call armed in between) before the watchdog parks.
const QUIET_LOOKS: u32 = 3;
const IDLE_LOOK: Duration = Duration::from_secs(1);

impl Watchdog {
    fn start() -> Option<Arc<Watchdog>> {
        let w = Arc::new(Watchdog {
            reg: Mutex::new(Registry {
                armed: Vec::new(),
                next_id: 0,
                looks_at: None,
                armed_since: 0,
                shortest: IDLE_LOOK,
            }),
            wake: Condvar::new(),
        });
        let me = w.clone();
        match std::thread::Builder::new()
            .name("keyward-watchdog".into())
            .spawn(move || me.watch())
        {
            Ok(_) => Some(w),
            Err(e) => {
                // Without it a hung call could not be answered: devices use the workers only.
                tracing::error!("cannot start the device watchdog: {e}");
                None
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arm(&self, call: Arc<Call>, deadline: Instant) -> u64 {
        let mut reg = self.lock();
        reg.next_id = reg.next_id.wrapping_add(1);
        let id = reg.next_id;
        reg.shortest = reg.shortest.min(call.limit);
        reg.armed.push(Armed { id, deadline, call });
        reg.armed_since += 1;
        if reg.looks_at.is_none_or(|t| deadline < t) {
            self.wake.notify_one();
        }
        id
    }

    fn disarm(&self, id: u64) {
        let mut reg = self.lock();
        if let Some(i) = reg.armed.iter().position(|a| a.id == id) {
            reg.armed.swap_remove(i);
        }
    }

    fn watch(&self) {
        let mut quiet = 0u32;
        let mut reg = self.lock();
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            reg.armed.retain(|a| {
                let keep = a.deadline > now;
                if !keep {
                    due.push(a.call.clone());
                }
                keep
            });
            if !due.is_empty() {
                drop(reg);
                for call in due {
                    call.expire();
                }
                reg = self.lock();
                continue;
            }
            if reg.armed_since > 0 || !reg.armed.is_empty() {
                quiet = 0;
            } else {
                quiet = quiet.saturating_add(1);
            }
            reg.armed_since = 0;
            let next = match reg.armed.iter().map(|a| a.deadline).min() {
                Some(d) => Some(d),
                None if quiet < QUIET_LOOKS => Some(now + reg.shortest),
                None => None,
            };
            reg.looks_at = next;
            reg = match next {
                Some(t) => {
                    self.wake
                        .wait_timeout(reg, t.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.wake.wait(reg).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn call_on(socket: UnixStream, limit: Duration) -> Arc<Call> {
        socket.set_nonblocking(true).unwrap();
        Arc::new(Call {
            state: Mutex::new(CallState::Running),
            answer: Answer {
                id: Some(7),
                socket: Arc::new(socket),
            },
            device: "pkcs11 token `tok`".into(),
            limit,
        })
    }

    #[test]
    fn a_call_past_its_deadline_is_answered_and_its_connection_closed() {
        let (agent_side, mut client) = UnixStream::pair().unwrap();
        let watchdog = Watchdog::start().expect("watchdog thread");
        let call = call_on(agent_side, Duration::from_millis(100));
        let t = Instant::now();
        watchdog.arm(call.clone(), t + call.limit);
        // The "device call" never returns; the client still gets its answer, then EOF.
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("answer, then EOF");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(100),
            "answered early: {took:?}"
        );
        assert!(
            took < Duration::from_millis(1500),
            "answered late: {took:?}"
        );
        let frame::Buffered::Complete(len) = frame::buffered(&got) else {
            panic!("not one whole frame: {got:?}");
        };
        assert_eq!(got.len(), 4 + len, "exactly one frame");
        let v: serde_json::Value = serde_json::from_slice(&got[4..]).unwrap();
        assert_eq!(v["id"], 7, "{v}");
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["error"]["code"], "backend_unavailable", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("did not answer within 100 ms")),
            "{v}"
        );
        assert_eq!(*call.lock(), CallState::Expired);
    }

    #[test]
    fn a_call_that_returns_in_time_is_left_alone() {
        let (agent_side, mut client) = UnixStream::pair().unwrap();
        let watchdog = Watchdog::start().expect("watchdog thread");
        let call = call_on(agent_side, Duration::from_millis(50));
        let id = watchdog.arm(call.clone(), Instant::now() + call.limit);
        // What `sign_here` does when the device answers.
        watchdog.disarm(id);
        *call.lock() = CallState::Done;
        std::thread::sleep(Duration::from_millis(300));
        client.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let r = client.read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the watchdog wrote or closed: {r:?}"
        );
        // Expiring it anyway (a race lost by the watchdog) changes nothing.
        call.expire();
        assert_eq!(*call.lock(), CallState::Done);
        assert!(
            client.read(&mut buf).is_err(),
            "still open, nothing written"
        );
    }

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
