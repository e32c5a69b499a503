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
    Record(Box<Record>, Option<oneshot::Sender<Result<()>>>),
    Flush(oneshot::Sender<()>),
}

/// Handle to the writer thread; cheap to share. `disabled()` accepts and discards records.
pub struct AuditLog {
    tx: Option<mpsc::Sender<Msg>>,
    stats: Arc<Stats>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
        let (tx, rx) = mpsc::channel();
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("keyward-audit".into())
            .spawn(move || run(log, rx, &st, observer.as_deref()))
            .map_err(|e| Error::Internal(format!("starting the audit writer: {e}")))?;
        Ok(AuditLog {
            tx: Some(tx),
            stats,
            thread: Mutex::new(Some(thread)),
            timeout: Duration::from_millis(cfg.timeout_ms),
        })
    }

    /// Audit off: records are discarded.
    pub fn disabled() -> AuditLog {
        AuditLog {
            tx: None,
            stats: Arc::new(Stats::default()),
            thread: Mutex::new(None),
            timeout: Duration::ZERO,
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queue a record without waiting for it (fail-open).
    pub fn record(&self, r: Record) {
        if let Some(tx) = &self.tx {
            self.stats.queued.fetch_add(1, Ordering::Relaxed);
            if tx.send(Msg::Record(Box::new(r), None)).is_err() {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queue a record and wait until it is durable (fail-closed): `audit_unavailable` when the
    /// log cannot be written or the disk does not answer within `[audit] timeout_ms`.
    pub async fn durable(&self, r: Record) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if tx.send(Msg::Record(Box::new(r), Some(done))).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::AuditUnavailable(
                "the audit writer has stopped".into(),
            ));
        }
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::AuditUnavailable(
                "the audit writer has stopped".into(),
            )),
            Err(_) => Err(Error::AuditUnavailable(format!(
                "the audit record was not durable within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Wait (at most `limit`) until everything queued before this call is written.
    pub fn flush(&self, limit: Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = oneshot::channel();
        if tx.send(Msg::Flush(done)).is_ok() {
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
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

fn run(mut log: LogFile, rx: mpsc::Receiver<Msg>, stats: &Stats, observer: Option<&dyn Observer>) {
    // Records that could not be written are counted; the next commit that works says so.
    let mut lost: u64 = 0;
    let mut lost_why = String::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut records = Vec::with_capacity(batch.len() + 1);
        let mut waiters = Vec::new();
        let mut flushes = Vec::new();
        if lost > 0 {
            let mut gap = Record::new("gap");
            gap.ts = crate::keystore::now_rfc3339();
            gap.reason = Some(format!(
                "{lost} record(s) could not be written while the log was unavailable ({lost_why})"
            ));
            records.push(gap);
        }
        for m in batch {
            match m {
                Msg::Record(r, w) => {
                    records.push(*r);
                    waiters.push(w);
                }
                Msg::Flush(f) => flushes.push(f),
            }
        }
        let n = waiters.len();
        if records.is_empty() {
            for f in flushes {
                let _ = f.send(());
            }
            continue;
        }
        let started = Instant::now();
        let result = log.append(&mut records);
        stats.queued.fetch_sub(n as u64, Ordering::Relaxed);
        match &result {
            Ok(()) => {
                lost = 0;
                stats.written.fetch_add(n as u64, Ordering::Relaxed);
                stats.available.store(true, Ordering::Relaxed);
                if let Some(o) = observer {
                    o.committed(started.elapsed(), n);
                }
            }
            Err(e) => {
                if lost == 0 {
                    tracing::error!(code = e.code(), "audit log unavailable: {e}");
                }
                lost += n as u64;
                lost_why = e.to_string();
                stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                stats.available.store(false, Ordering::Relaxed);
                if let Ok(mut le) = stats.last_error.lock() {
                    *le = Some(e.to_string());
                }
                if let Some(o) = observer {
                    o.dropped(n);
                }
            }
        }
        for w in waiters.into_iter().flatten() {
            let _ = w.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(Error::AuditUnavailable(e.to_string())),
            });
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}
