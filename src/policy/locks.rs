//! Signing locks (`keyward lock --all | --key K`), persisted in `state/locks.json` so a lock
//! survives a restart or a crash: the file is written atomically before the lock is reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::home;
use crate::model::KeyName;
use crate::proto::LockInfo;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    #[serde(default)]
    all: Option<Entry>,
    #[serde(default)]
    keys: BTreeMap<String, Entry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    reason: Option<String>,
    since: String,
    by_uid: u32,
}

/// The lock set, mirrored on disk.
#[derive(Debug)]
pub struct Locks {
    path: PathBuf,
    state: Persisted,
}

impl Locks {
    /// Load `state/locks.json` (absent = nothing locked; unreadable = error, never "unlocked").
    pub fn load(state_dir: &Path) -> Result<Locks> {
        let path = state_dir.join("locks.json");
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::Config(format!(
                    "{} is corrupt ({e}); fix or remove it",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e).ctx(format!("reading {}", path.display())),
        };
        Ok(Locks { path, state })
    }

    /// Why `key` may not sign right now, if it may not.
    pub fn check(&self, key: &KeyName) -> Result<()> {
        let describe = |scope: &str, e: &Entry| {
            let why = e
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            Error::Locked(format!("{scope} locked since {}{why}", e.since))
        };
        if let Some(e) = &self.state.all {
            return Err(describe("signing is", e));
        }
        if let Some(e) = self.state.keys.get(key.as_str()) {
            return Err(describe(&format!("key `{key}` is"), e));
        }
        Ok(())
    }

    pub fn is_locked(&self, key: &KeyName) -> bool {
        self.check(key).is_err()
    }

    /// Lock one key (`Some`) or everything (`None`); durable before it returns.
    pub fn lock(&mut self, key: Option<&KeyName>, reason: Option<String>, uid: u32) -> Result<()> {
        let entry = Entry {
            reason,
            since: crate::keystore::now_rfc3339(),
            by_uid: uid,
        };
        let mut next = self.state.clone();
        match key {
            Some(k) => {
                next.keys.insert(k.to_string(), entry);
            }
            None => next.all = Some(entry),
        }
        self.persist(next)
    }

    /// Unlock one key, or everything (`None` clears the global lock and every key lock).
    pub fn unlock(&mut self, key: Option<&KeyName>) -> Result<()> {
        let mut next = self.state.clone();
        match key {
            Some(k) => {
                next.keys.remove(k.as_str());
            }
            None => next = Persisted::default(),
        }
        self.persist(next)
    }

    fn persist(&mut self, next: Persisted) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| Error::Internal(e.to_string()))?;
        home::atomic_write(&self.path, &bytes)?;
        self.state = next;
        Ok(())
    }

    pub fn list(&self) -> Vec<LockInfo> {
        let info = |key: Option<String>, e: &Entry| LockInfo {
            key,
            reason: e.reason.clone(),
            since: e.since.clone(),
            by_uid: e.by_uid,
        };
        self.state
            .all
            .iter()
            .map(|e| info(None, e))
            .chain(
                self.state
                    .keys
                    .iter()
                    .map(|(k, e)| info(Some(k.clone()), e)),
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_persist_and_scope_correctly() {
        let d = tempfile::tempdir().unwrap();
        let a = KeyName::new("a").unwrap();
        let b = KeyName::new("b").unwrap();
        let mut l = Locks::load(d.path()).unwrap();
        l.lock(Some(&a), Some("incident 42".into()), 0).unwrap();
        assert_eq!(l.check(&a).unwrap_err().code(), "locked");
        assert!(l.check(&b).is_ok());
        let l2 = Locks::load(d.path()).unwrap();
        assert!(l2
            .check(&a)
            .unwrap_err()
            .to_string()
            .contains("incident 42"));
        l.lock(None, None, 0).unwrap();
        assert!(Locks::load(d.path()).unwrap().check(&b).is_err());
        l.unlock(None).unwrap();
        let l3 = Locks::load(d.path()).unwrap();
        assert!(l3.check(&a).is_ok() && l3.check(&b).is_ok());
        std::fs::write(d.path().join("locks.json"), b"{garbage").unwrap();
        assert_eq!(Locks::load(d.path()).unwrap_err().code(), "config");
    }
}
