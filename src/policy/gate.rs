//! The agent's admission gate: one policy snapshot (rules + rate buckets) swapped whole on
//! reload, plus the state that outlives snapshots (daily counts, nonces, recent denials).
//! Requests hold the snapshot they started with, so a reload never changes a request midway.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::counters::{Daily, Nonces};
use super::engine::{Ask, Client, KeyFacts, Peer, Policy};
use super::rate::Limits;
use super::rules::LockAfter;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::KeyName;
use crate::profile::ClientTime;

/// The rules and buckets in force; replaced as one value.
pub struct Snapshot {
    pub policy: Policy,
    limits: Limits,
}

pub struct Gate {
    snapshot: RwLock<Arc<Snapshot>>,
    daily: Mutex<Daily>,
    nonces: Mutex<Nonces>,
    denials: Mutex<HashMap<KeyName, VecDeque<Instant>>>,
    agent_uid: u32,
}

/// What the gate decided after a denial: whether the key must now be locked.
pub struct AutoLock {
    pub key: KeyName,
    pub reason: String,
}

impl Gate {
    pub fn new(config: &Config, state_dir: &Path, agent_uid: u32) -> Result<Gate> {
        let policy = config.policy(agent_uid)?;
        let limits = Limits::default().rebuild(bucket_specs(config));
        Ok(Gate {
            snapshot: RwLock::new(Arc::new(Snapshot { policy, limits })),
            daily: Mutex::new(Daily::load(state_dir)?),
            nonces: Mutex::new(Nonces::load(state_dir)?),
            denials: Mutex::new(HashMap::new()),
            agent_uid,
        })
    }

    /// Compiles `config` completely, then swaps it in; on error the old policy stays.
    pub fn reload(&self, config: &Config) -> Result<()> {
        let policy = config.policy(self.agent_uid)?;
        let old = self.snapshot();
        let limits = old.limits.rebuild(bucket_specs(config));
        let next = Arc::new(Snapshot { policy, limits });
        match self.snapshot.write() {
            Ok(mut s) => *s = next,
            Err(p) => *p.into_inner() = next,
        }
        Ok(())
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Per-key nonce source (`max(now, last + 1)`, persisted by reservation).
    pub fn next_nonce(&self, key: &KeyName, now_ms: u64) -> Result<u64> {
        self.nonces
            .lock()
            .map_err(|_| Error::Internal("nonce state poisoned".into()))?
            .next(key.as_str(), now_ms)
    }

    /// Records a policy denial for `key`; returns the auto-lock to apply when the key's
    /// `lock_after_denials` threshold is reached.
    pub fn record_denial(&self, snap: &Snapshot, key: &KeyName) -> Option<AutoLock> {
        let LockAfter { count, within_s } = snap.policy.key(key).rule.lock_after_denials?;
        let now = Instant::now();
        let window = Duration::from_secs(within_s);
        let mut all = self.denials.lock().ok()?;
        let recent = all.entry(key.clone()).or_default();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            recent.pop_front();
        }
        if recent.len() >= count as usize {
            recent.clear();
            Some(AutoLock {
                key: key.clone(),
                reason: format!("auto-lock: {count} policy denials within {within_s} s"),
            })
        } else {
            None
        }
    }
}

impl Snapshot {
    pub fn identify(&self, peer: &Peer) -> Result<Arc<Client>> {
        self.policy.identify(peer)
    }

    pub fn check(&self, client: &Client, key: &KeyFacts<'_>, ask: &Ask<'_>) -> Result<()> {
        self.policy.check(client, key, ask)
    }

    /// Rate buckets (client, then key) and the key's daily cap; fail fast, never queue.
    pub fn take_rate(
        &self,
        gate: &Gate,
        client: &Client,
        key: &KeyName,
        now_ms: u64,
    ) -> Result<()> {
        if client.rate.is_some() {
            self.limits.take(&client_bucket(&client.name))?;
        }
        let k = self.policy.key(key);
        if k.rule.rate.is_some() {
            self.limits.take(&key_bucket(key.as_str()))?;
        }
        if let Some(max) = k.rule.daily_max {
            gate.daily
                .lock()
                .map_err(|_| Error::Internal("daily counter poisoned".into()))?
                .take(key.as_str(), max, now_ms)?;
        }
        Ok(())
    }

    /// Whether requests for `key` may carry their own time (PROFILES.md §0).
    pub fn client_time(&self, key: &KeyName) -> ClientTime {
        match self.policy.key(key).rule.client_timestamp_skew_ms {
            Some(ms) => ClientTime::Within(ms),
            None => ClientTime::Reject,
        }
    }
}

fn client_bucket(name: &str) -> String {
    format!("client:{name}")
}

fn key_bucket(name: &str) -> String {
    format!("key:{name}")
}

fn bucket_specs(config: &Config) -> Vec<(String, super::rules::RateSpec)> {
    let clients = config
        .clients
        .iter()
        .filter_map(|(n, c)| c.rate.map(|r| (client_bucket(n), r)));
    let keys = config
        .keys
        .iter()
        .filter_map(|(n, k)| k.rate.map(|r| (key_bucket(n), r)));
    clients.chain(keys).collect()
}
