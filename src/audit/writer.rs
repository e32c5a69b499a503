//! The agent's audit writer: one thread owns the log and commits in groups — every record that
//! arrived while the previous fsync ran shares the next one — so audit does not cap throughput.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::file::{Lock, LogFile};
use super::record::Record;
use crate::config::AuditConfig;
use crate::error::{Error, Result};

/// Largest group written with one fsync.
const MAX_BATCH: usize = 4096;
/// How often a busy writer looks for fail-open records (they wait at most this long to be
/// written); an idle one looks less and less often, up to IDLE_MAX.
const LINGER_LAZY: Duration = Duration::from_millis(2);
const IDLE_MAX: Duration = Duration::from_millis(10);
/// Longest a fail-open record stays written but not yet fsynced.
pub const LAZY_SYNC: Duration = Duration::from_millis(10);

/// What the writer reports to the agent's metrics.
pub trait Observer: Send + Sync {
    /// One group commit: how long write + fsync took and how many records it made durable.
    fn committed(&self, took: Duration, records: usize);
    /// Records that could not be written (the log was unavailable).
    fn dropped(&self, records: usize);
}

/// Counters readable at any time (status op, doctor).
#[derive(Default)]
pub struct Stats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    /// Records handed to the writer and not yet durable or dropped.
    pub queued: AtomicU64,
    pub available: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

enum Msg {
    /// A record, its ticket (tickets are given in channel order) and whether someone waits
    /// for it to be durable (fail-closed).
    Record(Box<Record>, u64, bool),
    Flush(oneshot::Sender<()>),
}

/// Tickets already written or failed, shared by the writer and whoever waits for a record.
#[derive(Default)]
struct Outcomes {
    /// Ticket ranges (inclusive) whose commit failed; the newest few are kept, which covers
    /// every request still waiting (they wait at most `timeout_ms`).
    failed: Mutex<std::collections::VecDeque<(u64, u64, String)>>,
}

/// Failed ranges kept for late lookups.
const FAILED_KEPT: usize = 256;

/// Handle to the writer thread; cheap to share. `disabled()` accepts and discards records.
pub struct AuditLog {
    /// The channel and the next ticket, under one lock so tickets follow channel order.
    tx: Option<Mutex<(mpsc::Sender<Msg>, u64)>>,
    /// Every ticket ≤ this value has been committed or has failed.
    done: tokio::sync::watch::Receiver<u64>,
    outcomes: Arc<Outcomes>,
    stats: Arc<Stats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The writer, to wake it early from a linger (fail-closed records, flushes).
    writer: Option<std::thread::Thread>,
    timeout: Duration,
}

impl AuditLog {
    /// Open the log in `dir` (repairing a torn tail) and start the writer thread.
    pub fn start(
        dir: &Path,
        cfg: &AuditConfig,
        observer: Option<Arc<dyn Observer>>,
    ) -> Result<AuditLog> {
        let log = {
            let _lock = Lock::take_creating(dir)?;
            LogFile::open(dir, cfg.max_file_bytes)?
        };
        let stats = Arc::new(Stats {
            available: AtomicBool::new(true),
            ..Stats::default()
        });
        let outcomes = Arc::new(Outcomes::default());
        let (done_tx, done) = tokio::sync::watch::channel(0u64);
        let (tx, rx) = mpsc::channel();
        let (st, oc) = (stats.clone(), outcomes.clone());
        let thread = std::thread::Builder::new()
            .name("keyward-audit".into())
            .spawn(move || run(log, rx, &st, &oc, &done_tx, observer.as_deref()))
            .map_err(|e| Error::Internal(format!("starting the audit writer: {e}")))?;
        Ok(AuditLog {
            tx: Some(Mutex::new((tx, 1))),
            done,
            outcomes,
            stats,
            writer: Some(thread.thread().clone()),
            thread: Mutex::new(Some(thread)),
            timeout: Duration::from_millis(cfg.timeout_ms),
        })
    }

    /// Audit off: records are discarded.
    pub fn disabled() -> AuditLog {
        AuditLog {
            tx: None,
            done: tokio::sync::watch::channel(0u64).1,
            outcomes: Arc::new(Outcomes::default()),
            stats: Arc::new(Stats::default()),
            thread: Mutex::new(None),
            writer: None,
            timeout: Duration::ZERO,
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// How long a fail-closed request waits for its record.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Queue a record without waiting for it (fail-open): it is written with the next group
    /// and made durable within [`LAZY_SYNC`].
    pub fn record(&self, r: Record) {
        let _ = self.send(r, false);
    }

    /// Queue a record that a fail-closed answer waits for; its ticket tells when it is durable
    /// ([`AuditLog::outcome`]). `None` when the audit is off or the writer is gone.
    pub fn enqueue(&self, r: Record) -> Option<u64> {
        self.send(r, true)
    }

    fn send(&self, r: Record, durable: bool) -> Option<u64> {
        let tx = self.tx.as_ref()?;
        let mut g = tx.lock().ok()?;
        let ticket = g.1;
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if g.0.send(Msg::Record(Box::new(r), ticket, durable)).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        g.1 += 1;
        drop(g);
        if durable {
            if let Some(w) = &self.writer {
                w.unpark();
            }
        }
        Some(ticket)
    }

    /// Whether the record of `ticket` is durable: `None` while it is still being written.
    pub fn outcome(&self, ticket: u64) -> Option<Result<()>> {
        if *self.done.borrow() < ticket {
            return None;
        }
        let failed = self.outcomes.failed.lock().ok()?;
        Some(
            match failed
                .iter()
                .find(|(lo, hi, _)| (*lo..=*hi).contains(&ticket))
            {
                Some((_, _, why)) => Err(Error::AuditUnavailable(why.clone())),
                None => Ok(()),
            },
        )
    }

    /// A receiver that changes whenever more records are durable (or failed).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.done.clone()
    }

    /// Wait for `ticket`'s outcome, at most `[audit] timeout_ms`.
    pub async fn wait(&self, ticket: u64) -> Result<()> {
        let mut rx = self.done.clone();
        let waited = tokio::time::timeout(self.timeout, async {
            loop {
                if let Some(r) = self.outcome(ticket) {
                    return r;
                }
                if rx.changed().await.is_err() {
                    return Err(Error::AuditUnavailable(
                        "the audit writer has stopped".into(),
                    ));
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| Err(self.timed_out()))
    }

    /// The error of a record not durable within `[audit] timeout_ms`.
    pub fn timed_out(&self) -> Error {
        Error::AuditUnavailable(format!(
            "the audit record was not durable within {} ms",
            self.timeout.as_millis()
        ))
    }

    /// Wait (at most `limit`) until everything queued before this call is written.
    pub fn flush(&self, limit: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        let sent = tx.lock().is_ok_and(|g| g.0.send(Msg::Flush(done)).is_ok());
        if let Some(w) = &self.writer {
            w.unpark();
        }
        if sent {
            let deadline = Instant::now() + limit;
            let mut wait = wait;
            while Instant::now() < deadline {
                match wait.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    _ => break,
                }
            }
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = &self.writer {
            w.unpark();
        }
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

fn run(
    mut log: LogFile,
    rx: mpsc::Receiver<Msg>,
    stats: &Stats,
    outcomes: &Outcomes,
    done: &tokio::sync::watch::Sender<u64>,
    observer: Option<&dyn Observer>,
) {
    // Records that could not be written are counted; the next commit that works says so.
    let mut lost: u64 = 0;
    let mut lost_why = String::new();
    let mut last_sync = Instant::now();
    let mut idle = LINGER_LAZY;
    let mut closed = false;
    loop {
        // The writer never blocks on the channel: it takes what is queued, and otherwise parks
        // for a while. A fail-open sender therefore never has to wake it (no system call on the
        // request path); a fail-closed sender, a flush and the shutdown unpark it at once.
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if batch.is_empty() {
            if closed {
                break;
            }
            // Written fail-open records get their fsync within LAZY_SYNC.
            if log.unsynced() && last_sync.elapsed() >= LAZY_SYNC {
                if let Err(e) = log.sync() {
                    tracing::error!(code = e.code(), "audit fsync failed: {e}");
                }
                last_sync = Instant::now();
            }
            std::thread::park_timeout(idle);
            idle = (idle * 2).min(IDLE_MAX);
            continue;
        }
        idle = LINGER_LAZY;
        let mut records = Vec::with_capacity(batch.len() + 1);
        let mut flushes = Vec::new();
        let (mut lo, mut hi) = (u64::MAX, 0);
        let mut must_sync = false;
        if lost > 0 {
            let mut gap = Record::new("gap");
            gap.reason = Some(format!(
                "{lost} record(s) could not be written while the log was unavailable ({lost_why})"
            ));
            records.push(gap);
        }
        for m in batch {
            match m {
                Msg::Record(r, t, durable) => {
                    must_sync |= durable;
                    records.push(*r);
                    lo = lo.min(t);
                    hi = hi.max(t);
                }
                Msg::Flush(f) => {
                    must_sync = true;
                    flushes.push(f);
                }
            }
        }
        let n = if hi >= lo { hi - lo + 1 } else { 0 };
        if n > 0 {
            let started = Instant::now();
            let sync = must_sync || last_sync.elapsed() >= LAZY_SYNC;
            let result = log.append(&mut records, sync);
            if sync && result.is_ok() {
                last_sync = Instant::now();
            }
            stats.queued.fetch_sub(n, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    lost = 0;
                    stats.written.fetch_add(n, Ordering::Relaxed);
                    stats.available.store(true, Ordering::Relaxed);
                    if let Some(o) = observer {
                        o.committed(started.elapsed(), n as usize);
                    }
                }
                Err(e) => {
                    if lost == 0 {
                        tracing::error!(code = e.code(), "audit log unavailable: {e}");
                    }
                    lost += n;
                    lost_why = e.to_string();
                    stats.dropped.fetch_add(n, Ordering::Relaxed);
                    stats.available.store(false, Ordering::Relaxed);
                    if let Ok(mut le) = stats.last_error.lock() {
                        *le = Some(e.to_string());
                    }
                    if let Ok(mut f) = outcomes.failed.lock() {
                        if f.len() >= FAILED_KEPT {
                            f.pop_front();
                        }
                        f.push_back((lo, hi, e.to_string()));
                    }
                    if let Some(o) = observer {
                        o.dropped(n as usize);
                    }
                }
            }
            done.send_replace(hi);
        }
        if !flushes.is_empty() && log.unsynced() {
            let _ = log.sync();
        }
        for f in flushes {
            let _ = f.send(());
        }
        if !must_sync {
            // Group fail-open records over LINGER_LAZY: fewer, larger writes.
            std::thread::park_timeout(LINGER_LAZY);
        }
    }
    let _ = log.sync();
}
