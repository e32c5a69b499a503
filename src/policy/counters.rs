//! State that must survive a restart without an fsync per request: per-key increasing nonces
//! and daily signature counts, persisted by reserving ahead (state/nonces.json, daily.json).
//!
//! Both files record a *reservation*: the highest nonce / count that may have been handed out.
//! A restart resumes above it, so a nonce is never reused and a cap never over-allows; the
//! price is a jump of at most one reservation (see docs/policy.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::home;

/// How far ahead of the last nonce (ms) a reservation reaches.
pub const NONCE_RESERVE_MS: u64 = 60_000;

fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Error::Config(format!(
                "{} is corrupt ({e}); fix or remove it",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).ctx(format!("reading {}", path.display())),
    }
}

fn save<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    home::atomic_write(path, &bytes)
}

/// Strictly increasing millisecond nonces per key (Kraken, Hyperliquid).
pub struct Nonces {
    path: PathBuf,
    reserved: BTreeMap<String, u64>,
    last: BTreeMap<String, u64>,
}

impl Nonces {
    pub fn load(state_dir: &Path) -> Result<Nonces> {
        let path = state_dir.join("nonces.json");
        let reserved: BTreeMap<String, u64> = load(&path)?;
        // Resume above everything that may have been handed out before the restart.
        let last = reserved.clone();
        Ok(Nonces {
            path,
            reserved,
            last,
        })
    }

    /// `max(now_ms, last + 1)` for `key`, durable (reserved on disk) before it is returned.
    pub fn next(&mut self, key: &str, now_ms: u64) -> Result<u64> {
        let last = self.last.get(key).copied().unwrap_or(0);
        let n = now_ms.max(last.saturating_add(1));
        if n == u64::MAX {
            return Err(Error::Internal(format!(
                "nonce space of key {key} is exhausted"
            )));
        }
        let reserved = self.reserved.get(key).copied().unwrap_or(0);
        if n > reserved {
            let mut next = self.reserved.clone();
            next.insert(key.to_string(), n.saturating_add(NONCE_RESERVE_MS));
            save(&self.path, &next)?;
            self.reserved = next;
        }
        self.last.insert(key.to_string(), n);
        Ok(n)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DailyFile {
    /// UTC day, `YYYY-MM-DD`.
    day: String,
    reserved: BTreeMap<String, u64>,
}

/// Signatures per key per UTC day against `daily_max`.
pub struct Daily {
    path: PathBuf,
    file: DailyFile,
    used: BTreeMap<String, u64>,
}

impl Daily {
    pub fn load(state_dir: &Path) -> Result<Daily> {
        let path = state_dir.join("daily.json");
        let file: DailyFile = load(&path)?;
        let used = file.reserved.clone();
        Ok(Daily { path, file, used })
    }

    /// Counts one signature for `key` if it is under `max` today; else `rate_limited` with the
    /// time until the next UTC midnight.
    pub fn take(&mut self, key: &str, max: u64, now_ms: u64) -> Result<()> {
        let day = utc_day(now_ms);
        if self.file.day != day {
            self.file = DailyFile {
                day: day.clone(),
                reserved: BTreeMap::new(),
            };
            self.used.clear();
        }
        let used = self.used.get(key).copied().unwrap_or(0);
        if used >= max {
            let retry_after_ms = 86_400_000 - now_ms % 86_400_000;
            return Err(Error::RateLimited {
                message: format!(
                    "key {key} reached its daily_max of {max} signatures (UTC day {day})"
                ),
                retry_after_ms,
            });
        }
        let reserved = self.file.reserved.get(key).copied().unwrap_or(0);
        if used + 1 > reserved {
            // Reserve ~1% of the cap at a time: a crash loses at most that much of the day's
            // allowance and never grants more than `max`.
            let chunk = (max / 100).max(1);
            let mut next = self.file.clone();
            next.reserved
                .insert(key.to_string(), (used + chunk).min(max));
            save(&self.path, &next)?;
            self.file = next;
        }
        self.used.insert(key.to_string(), used + 1);
        Ok(())
    }

    pub fn used(&self, key: &str) -> u64 {
        self.used.get(key).copied().unwrap_or(0)
    }
}

fn utc_day(now_ms: u64) -> String {
    let secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        Err(_) => "out-of-range".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_increase_and_never_repeat_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = Nonces::load(dir.path()).unwrap();
        let a = n.next("k", 1_000).unwrap();
        let b = n.next("k", 1_000).unwrap();
        let c = n.next("k", 500).unwrap();
        assert_eq!((a, b, c), (1_000, 1_001, 1_002));
        assert_eq!(n.next("other", 7).unwrap(), 7);
        drop(n);
        let mut n = Nonces::load(dir.path()).unwrap();
        let d = n.next("k", 1_000).unwrap();
        assert!(d > c, "{d}");
        assert_eq!(d, 1_000 + NONCE_RESERVE_MS + 1);
        assert!(n.next("other", 7).unwrap() > 7);
    }

    #[test]
    fn daily_caps_survive_restarts_and_reset_at_midnight() {
        let dir = tempfile::tempdir().unwrap();
        let day = 1_700_000_000_000u64;
        let mut d = Daily::load(dir.path()).unwrap();
        for _ in 0..3 {
            d.take("k", 5, day).unwrap();
        }
        drop(d);
        let mut d = Daily::load(dir.path()).unwrap();
        d.take("k", 5, day).unwrap();
        d.take("k", 5, day).unwrap();
        let e = d.take("k", 5, day).unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        match e {
            Error::RateLimited { retry_after_ms, .. } => {
                assert!(retry_after_ms > 0 && retry_after_ms <= 86_400_000)
            }
            _ => unreachable!(),
        }
        d.take("k", 5, day + 86_400_000).unwrap();
    }
}
