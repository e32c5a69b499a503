//! The request path: identity → key lookup → lock state → backend (inline or worker pool) →
//! response. Every failure becomes an error value with a stable code; nothing here panics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyward::audit::{self, AuditLog, Record};
use keyward::backend::pkcs11::Pkcs11Backend;
use keyward::backend::soft::SoftBackend;
use keyward::backend::tpm::{TpmAuth, TpmBackend};
use keyward::backend::{Backend, Health};
use keyward::config::Config;
use keyward::home::Home;
use keyward::keystore::{KeyMeta, Keystore, VersionState};
use keyward::model::{Algorithm, BackendKind, ClientIdentity, Env, KeyName, KeyRef, KeyType};
use keyward::policy::engine::{Ask, Client, KeyFacts, Peer};
use keyward::policy::gate::{Gate, Snapshot};
use keyward::policy::locks::Locks;
use keyward::profile::{self, Clock, ProfileName};
use keyward::proto::{
    AuditStatus, BackendStatus, HelloResult, KeyInfo, Op, PublicKeyResult, SignResult,
    StatusResult, PROTOCOL_VERSION,
};
use keyward::{pubkey, Error, Result};
use serde_json::{json, Value};

use super::metrics::{Gauges, Metrics};
use super::pool::Pool;

/// One key as the agent serves it.
struct Served {
    meta: KeyMeta,
    current: KeyRef,
    /// The backend holding the key (soft, or the PKCS#11 token or TPM its locator names).
    backend: Arc<dyn Backend>,
    /// Set when the key's material could not be loaded: the key answers with this error.
    load_error: Option<String>,
    address: Option<String>,
}

/// Everything a request may read; swapped as a whole on reload.
struct Table {
    keys: HashMap<KeyName, Arc<Served>>,
}

/// The device timeout for a device call on a connection thread when the backend names none.
const DEVICE_LIMIT: Duration = Duration::from_millis(2000);

pub struct State {
    pub home: Home,
    pub socket: PathBuf,
    started: Instant,
    agent_uid: u32,
    soft: Arc<SoftBackend>,
    /// PKCS#11 tokens by alias (`[pkcs11.<alias>]`); replaced as a whole on reload.
    tokens: RwLock<Arc<HashMap<String, Arc<Pkcs11Backend>>>>,
    /// TPMs by alias (`[tpm.<alias>]`); replaced as a whole on reload, like `tokens`.
    tpms: RwLock<Arc<HashMap<String, Arc<TpmBackend>>>>,
    pool: Pool,
    table: RwLock<Arc<Table>>,
    config: RwLock<Arc<Config>>,
    locks: Mutex<Locks>,
    /// Policy, rate buckets, daily caps and nonces.
    gate: Gate,
    /// The hash-chained audit log (ARCHITECTURE §7).
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    /// Last health seen per backend (`pkcs11:<alias>`, `tpm:<alias>`), for up/down records.
    health_seen: Mutex<HashMap<String, bool>>,
    pub connections: AtomicUsize,
    pub requests: AtomicU64,
}

impl State {
    pub fn new(home: Home, socket: PathBuf, config: Config, soft: SoftBackend) -> Result<State> {
        let locks = Locks::load(&home.state_dir())?;
        let pool = Pool::new(config.workers(), config.agent.queue);
        let tokens = build_tokens(&config, &HashMap::new())?;
        let tpms = build_tpms(&config, &home, &HashMap::new())?;
        let agent_uid = keyward::sys::effective_uid();
        let gate = Gate::new(&config, &home.state_dir(), agent_uid)?;
        let metrics = Arc::new(Metrics::new());
        let audit = if config.audit.enabled {
            let observer: Arc<dyn keyward::audit::Observer> = metrics.clone();
            AuditLog::start(&home.audit_dir(), &config.audit, Some(observer))?
        } else {
            AuditLog::disabled()
        };
        let state = State {
            socket,
            started: Instant::now(),
            agent_uid,
            soft: Arc::new(soft),
            tokens: RwLock::new(Arc::new(tokens)),
            tpms: RwLock::new(Arc::new(tpms)),
            pool,
            table: RwLock::new(Arc::new(Table {
                keys: HashMap::new(),
            })),
            config: RwLock::new(Arc::new(config)),
            locks: Mutex::new(locks),
            gate,
            audit,
            metrics,
            health_seen: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            home,
        };
        state.load_keys()?;
        Ok(state)
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Read every key's metadata and decrypt its versions; swap the table in one step, so
    /// in-flight requests finish with the table they started with.
    fn load_keys(&self) -> Result<usize> {
        let metas = Keystore::new(&self.home).list()?;
        let mut keys = HashMap::new();
        let mut refs = Vec::new();
        for meta in metas {
            let current = match meta.current_version() {
                Ok(v) => meta.key_ref(v),
                Err(e) => {
                    tracing::error!(key = %meta.name, "metadata has no current version: {e}");
                    continue;
                }
            };
            let mut load_error = None;
            let backend = match self.backend_for(&current) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(key = %meta.name, code = e.code(), "{e}");
                    load_error = Some(e.to_string());
                    self.soft.clone()
                }
            };
            for v in &meta.versions {
                let r = meta.key_ref(v);
                if r.backend != BackendKind::Soft {
                    // Device keys are looked up on the token at first use: a token that is
                    // absent now must not stop the agent or the other keys.
                    refs.push(r);
                    continue;
                }
                if let Err(e) = self.soft.load(&r, meta.key_type) {
                    tracing::error!(key = %meta.name, version = v.version, code = e.code(), "cannot load key: {e}");
                    if v.version == meta.current {
                        load_error = Some(format!(
                            "key `{}` could not be loaded ({})",
                            meta.name,
                            e.code()
                        ));
                    }
                }
                refs.push(r);
            }
            let address = if meta.key_type == KeyType::Secp256k1 {
                meta.current_version()
                    .ok()
                    .and_then(|v| v.spki_der().ok().flatten())
                    .and_then(|d| pubkey::raw_public_key(&d).ok())
                    .and_then(|raw| pubkey::eth_address(&raw).ok())
            } else {
                None
            };
            keys.insert(
                meta.name.clone(),
                Arc::new(Served {
                    meta,
                    current,
                    backend,
                    load_error,
                    address,
                }),
            );
        }
        self.soft.retain(&refs);
        let n = keys.len();
        match self.table.write() {
            Ok(mut t) => *t = Arc::new(Table { keys }),
            Err(p) => *p.into_inner() = Arc::new(Table { keys }),
        }
        Ok(n)
    }

    fn tokens(&self) -> Arc<HashMap<String, Arc<Pkcs11Backend>>> {
        self.tokens
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn tpms(&self) -> Arc<HashMap<String, Arc<TpmBackend>>> {
        self.tpms
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The backend that holds `key`.
    fn backend_for(&self, key: &KeyRef) -> Result<Arc<dyn Backend>> {
        match key.backend {
            BackendKind::Soft => Ok(self.soft.clone()),
            BackendKind::Pkcs11 => {
                let alias = key.locator.split_once(':').map_or("", |(a, _)| a);
                match self.tokens().get(alias) {
                    Some(t) => Ok(t.clone()),
                    None => Err(Error::BackendUnavailable(format!(
                        "pkcs11 token `{alias}` is not configured in keyward.toml ([pkcs11.{alias}])"
                    ))),
                }
            }
            BackendKind::Tpm => {
                let alias = key.locator.split_once(':').map_or("", |(a, _)| a);
                match self.tpms().get(alias) {
                    Some(t) => Ok(t.clone()),
                    None => Err(Error::BackendUnavailable(format!(
                        "tpm `{alias}` is not configured in keyward.toml ([tpm.{alias}])"
                    ))),
                }
            }
            other => Err(Error::BackendUnavailable(format!(
                "backend {other} is not available in this build"
            ))),
        }
    }

    /// A device key signed on the calling connection's thread, when the connection marked
    /// the request lone and the device is free (a PKCS#11 token's idle session, a TPM's idle
    /// context; pool.rs `Pool::sign_here`); `None`: queue it as usual.
    fn sign_here(
        &self,
        key: &KeyRef,
        alg: Algorithm,
        msg: &[u8],
    ) -> Option<Result<keyward::backend::Signature>> {
        let alias = key.locator.split_once(':')?.0;
        match key.backend {
            BackendKind::Pkcs11 => {
                let token = self.tokens().get(alias)?.clone();
                let limit = token.timeout().unwrap_or(DEVICE_LIMIT);
                let device = format!("pkcs11 token `{alias}`");
                self.pool
                    .sign_here(device, limit, || token.idle_session(), key, alg, msg)
            }
            BackendKind::Tpm => {
                let tpm = self.tpms().get(alias)?.clone();
                let limit = tpm.timeout().unwrap_or(DEVICE_LIMIT);
                let device = format!("tpm `{alias}`");
                self.pool
                    .sign_here(device, limit, || tpm.idle_worker(), key, alg, msg)
            }
            _ => None,
        }
    }

    /// Re-read keyward.toml and the key registry. A bad config keeps the running one.
    pub fn reload(&self) -> Result<usize> {
        let cfg = Config::load(&self.home.config_path())?;
        let tokens = build_tokens(&cfg, &self.tokens())?;
        match self.tokens.write() {
            Ok(mut t) => *t = Arc::new(tokens),
            Err(p) => *p.into_inner() = Arc::new(tokens),
        }
        let tpms = build_tpms(&cfg, &self.home, &self.tpms())?;
        match self.tpms.write() {
            Ok(mut t) => *t = Arc::new(tpms),
            Err(p) => *p.into_inner() = Arc::new(tpms),
        }
        let n = self.load_keys()?;
        self.gate.reload(&cfg)?;
        match self.config.write() {
            Ok(mut c) => *c = Arc::new(cfg),
            Err(p) => *p.into_inner() = Arc::new(cfg),
        }
        Ok(n)
    }

    /// Whether a request will wait for a worker thread (slow signing) rather than finish in
    /// microseconds; the connection runs fast ones inline.
    pub fn is_slow(&self, op: &Op) -> bool {
        let (key, scheme) = match op {
            Op::Sign { key, scheme, .. } => (key, scheme.as_deref()),
            Op::SignRequest { key, .. } => (key, None),
            _ => return false,
        };
        let Some(s) = self.table().keys.get(key).cloned() else {
            return false;
        };
        // A request that will fail is answered inline; `sign` reports why.
        scheme_for(&s, scheme).is_ok_and(|alg| !s.backend.is_fast(alg))
    }

    pub fn status_keys(&self) -> usize {
        self.table().keys.len()
    }

    /// Admins: the agent's own user and root (the implicit `owner` client), and clients
    /// with `roles = ["admin"]`.
    fn is_admin(&self, who: &ClientIdentity) -> bool {
        self.gate
            .snapshot()
            .identify(&peer(who))
            .is_ok_and(|c| c.admin)
    }

    /// Whether this peer may use the agent at all: the agent's own user, root, or a uid/gid
    /// some configured client names.
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        self.gate.snapshot().policy.may_connect(uid, gid)
    }

    /// Answer one request, waiting for its audit record when its key is fail-closed.
    pub async fn handle(&self, who: &ClientIdentity, op: Op) -> Result<Value> {
        match self.handle_reply(who, op).await {
            Reply::Ready(r) => r,
            Reply::AfterAudit(d) => {
                let outcome = self.audit.wait(d.ticket).await;
                self.settle(d, outcome)
            }
        }
    }

    /// Answer one request; a fail-closed signature comes back deferred ([`Reply`]), so a
    /// connection can keep working while its records are committed together.
    pub async fn handle_reply(&self, who: &ClientIdentity, op: Op) -> Reply {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sign = match op {
            Op::Sign {
                key,
                data,
                scheme,
                version,
            } => {
                let started = Instant::now();
                let mut trail = Trail::default();
                let r = self
                    .sign(who, &key, &data, scheme.as_deref(), version, &mut trail)
                    .await;
                ("sign", key, trail, started, r)
            }
            Op::SignRequest {
                key,
                profile,
                request,
                version,
            } => {
                let started = Instant::now();
                let mut trail = Trail {
                    profile: Some(profile.clone()),
                    // Only the audit log needs it: no hashing on the request path without one.
                    request_sha256: self
                        .audit
                        .enabled()
                        .then(|| serde_json::to_vec(&request).ok())
                        .flatten()
                        .map(|b| audit::sha256_hex(&b)),
                    ..Trail::default()
                };
                let r = self
                    .sign_request(who, &key, &profile, &request, version, &mut trail)
                    .await;
                ("sign_request", key, trail, started, r)
            }
            other => return Reply::Ready(self.handle_other(who, other).await),
        };
        let (op, key, trail, started, r) = sign;
        self.audited(op, who, &key, trail, started, r)
    }

    async fn handle_other(&self, who: &ClientIdentity, op: Op) -> Result<Value> {
        match op {
            Op::Hello { version, token } => {
                if let Some(v) = version {
                    if v != PROTOCOL_VERSION {
                        return Err(Error::BadRequest(format!(
                            "protocol version {v} is not supported (this agent speaks {PROTOCOL_VERSION})"
                        )));
                    }
                }
                if let Some(t) = token {
                    let h = keyward::policy::engine::token_hash(&t);
                    if who.token_sha256.get().is_some_and(|old| *old != h) {
                        return Err(Error::BadRequest(
                            "this connection already presented a different token".into(),
                        ));
                    }
                    let _ = who.token_sha256.set(h);
                }
                let client = self.gate.snapshot().identify(&peer(who))?;
                to_value(HelloResult {
                    protocol: PROTOCOL_VERSION,
                    agent_version: keyward::VERSION.into(),
                    client: client.name.clone(),
                    uid: who.uid,
                    admin: client.admin,
                })
            }
            Op::ListKeys {} => self.list_keys(),
            Op::PublicKey { key, format } => self.public_key(&key, format.as_deref()),
            Op::Sign { .. } | Op::SignRequest { .. } => Err(Error::Internal(
                "signing ops are answered by handle_reply".into(),
            )),
            Op::Status {} => self.status(),
            Op::Lock { key, all, reason } => {
                self.require_admin(who)?;
                let target = lock_target(key.as_ref(), all)?;
                if let Some(k) = target {
                    self.served(k)?;
                }
                if let Some(r) = &reason {
                    if r.chars().any(char::is_control) {
                        return Err(Error::BadRequest(
                            "reason must not contain control characters".into(),
                        ));
                    }
                }
                self.with_locks(|l| l.lock(target, reason.clone(), who.uid))?;
                self.admin_record(who, Some("lock"), target, Ok(reason.clone()));
                tracing::warn!(uid = who.uid, key = ?target.map(KeyName::as_str), reason = ?reason, "signing locked");
                Ok(json!({"locked": true, "locks": self.with_locks(|l| Ok(l.list()))?}))
            }
            Op::Unlock { key, all } => {
                self.require_admin(who)?;
                let target = lock_target(key.as_ref(), all)?;
                self.with_locks(|l| l.unlock(target))?;
                self.admin_record(who, Some("unlock"), target, Ok(None));
                tracing::warn!(uid = who.uid, key = ?target.map(KeyName::as_str), "signing unlocked");
                Ok(json!({"locked": false, "locks": self.with_locks(|l| Ok(l.list()))?}))
            }
            Op::Reload {} => {
                self.require_admin(who)?;
                // File I/O and key parsing: keep the reactor thread free for other clients.
                let n = tokio::task::block_in_place(|| self.reload());
                let outcome = n.as_ref().err().map(|e| format!("failed: {e}"));
                self.admin_record(who, Some("reload"), None, Ok(outcome));
                let n = n?;
                tracing::info!(uid = who.uid, keys = n, "reloaded");
                Ok(json!({"reloaded": true, "keys": n}))
            }
        }
    }

    fn require_admin(&self, who: &ClientIdentity) -> Result<()> {
        if self.is_admin(who) {
            Ok(())
        } else {
            let e = Error::Forbidden("this operation needs an admin client".into());
            self.admin_record(who, None, None, Err(&e));
            Err(e)
        }
    }

    /// `agent_start` / `agent_stop`, with the agent's pid and version.
    pub fn lifecycle_record(&self, event: &str) {
        let mut r = Record::new(event);
        r.reason = Some(format!(
            "keyward agent {} pid {}, {} key(s)",
            keyward::VERSION,
            std::process::id(),
            self.status_keys()
        ));
        self.audit.record(r);
    }

    /// Record every backend whose health changed since the last look (`backend_up` /
    /// `backend_down` with the device's error).
    pub fn watch_backends(&self) {
        let now = self.device_health();
        let Ok(mut seen) = self.health_seen.lock() else {
            return;
        };
        for (name, health) in now {
            let up = matches!(health, Health::Up);
            if seen.insert(name.clone(), up) == Some(up) {
                continue;
            }
            let mut r = Record::new(if up { "backend_up" } else { "backend_down" });
            r.op = Some(name);
            if let Health::Down(why) = health {
                r.reason = Some(why);
            }
            self.audit.record(r);
        }
    }

    /// Every backend by the name status and metrics use: `soft`, then the devices.
    fn backend_health(&self) -> Vec<(String, Health)> {
        let mut out = vec![(self.soft.kind().to_string(), self.soft.health())];
        out.extend(self.device_health());
        out
    }

    /// The configured devices (`pkcs11:<alias>`, `tpm:<alias>`) and their health.
    fn device_health(&self) -> Vec<(String, Health)> {
        let mut out: Vec<(String, Health)> = Vec::new();
        out.extend(
            self.tokens()
                .values()
                .map(|t| (format!("pkcs11:{}", t.alias()), t.health())),
        );
        out.extend(
            self.tpms()
                .values()
                .map(|t| (format!("tpm:{}", t.alias()), t.health())),
        );
        out
    }

    /// An admin action done by the agent for `who`, or refused (fail-open: an allowed action
    /// has already happened). `outcome`: the reason to record, or the refusal.
    fn admin_record(
        &self,
        who: &ClientIdentity,
        op: Option<&str>,
        key: Option<&KeyName>,
        outcome: std::result::Result<Option<String>, &Error>,
    ) {
        let mut r = Record::new("admin");
        r.client = Some(audit::client_info(who, None));
        r.op = op.map(str::to_string);
        r.key = key.map(|k| k.to_string());
        match outcome {
            Ok(reason) => {
                r.decision = Some("allow".into());
                r.reason = reason;
            }
            Err(e) => {
                r.decision = Some("deny".into());
                r.code = Some(e.code().into());
                r.reason = Some(e.to_string());
            }
        }
        self.audit.record(r);
    }

    /// Count and audit one signing request. An allowed request on a fail-closed key comes
    /// back as [`Reply::AfterAudit`]: its answer may be released only once its record is
    /// durable ([`State::settle`]).
    fn audited(
        &self,
        op: &'static str,
        who: &ClientIdentity,
        key: &KeyName,
        trail: Trail,
        started: Instant,
        result: Result<Value>,
    ) -> Reply {
        // Label values from the agent's own tables only (series count stays bounded).
        let key_label = if self.table().keys.contains_key(key) {
            key.to_string()
        } else {
            "_unknown".to_string()
        };
        let profile_label = match trail.profile.as_deref() {
            None => "none".to_string(),
            Some(p) => p
                .parse::<ProfileName>()
                .map_or("_invalid".to_string(), |_| p.to_string()),
        };
        let labels = Labels {
            op,
            key: key_label,
            profile: profile_label,
            started,
        };
        match self.audit_request(op, who, key, trail, started, result) {
            Ok(Pending::Now(result)) => {
                self.count(&labels, &result);
                Reply::Ready(result)
            }
            Ok(Pending::Ticket(ticket, value)) => Reply::AfterAudit(Deferred {
                ticket,
                value,
                labels,
            }),
            Err(e) => {
                let result = Err(e);
                self.count(&labels, &result);
                Reply::Ready(result)
            }
        }
    }

    /// The answer of a deferred request once its record's fate is known.
    pub fn settle(&self, d: Deferred, outcome: Result<()>) -> Result<Value> {
        let result = outcome.map(|()| d.value);
        self.count(&d.labels, &result);
        result
    }

    fn count(&self, l: &Labels, result: &Result<Value>) {
        let code = result.as_ref().err().map_or("ok", Error::code);
        self.metrics
            .request(l.op, &l.key, &l.profile, code, l.started.elapsed());
    }

    fn audit_request(
        &self,
        op: &str,
        who: &ClientIdentity,
        key: &KeyName,
        trail: Trail,
        started: Instant,
        result: Result<Value>,
    ) -> Result<Pending> {
        if !self.audit.enabled() {
            return Ok(Pending::Now(result));
        }
        let mut r = Record::new(op);
        r.client = Some(audit::client_info(who, trail.client.as_deref()));
        r.key = Some(key.to_string());
        r.version = trail.version;
        r.profile = trail.profile;
        r.op = Some(op.into());
        r.method = trail.method;
        r.path = trail.path;
        r.request_sha256 = trail.request_sha256;
        r.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        match &result {
            Ok(_) => r.decision = Some("allow".into()),
            Err(e) => {
                let denied = matches!(
                    e,
                    Error::PolicyDenied(_)
                        | Error::RateLimited { .. }
                        | Error::Locked(_)
                        | Error::KeyDisabled(_)
                        | Error::Forbidden(_)
                        | Error::Unauthorized(_)
                );
                r.decision = Some(if denied { "deny" } else { "error" }.into());
                r.code = Some(e.code().into());
                r.reason = Some(e.to_string());
            }
        }
        let fail_closed = result.is_ok()
            && trail
                .env
                .is_some_and(|env| self.config().audit.fail_closed_for(env));
        if !fail_closed {
            self.audit.record(r);
            return Ok(Pending::Now(result));
        }
        let ticket = self
            .audit
            .enqueue(r)
            .ok_or_else(|| Error::AuditUnavailable("the audit writer has stopped".into()))?;
        Ok(Pending::Ticket(ticket, result?))
    }

    fn with_locks<T>(&self, f: impl FnOnce(&mut Locks) -> Result<T>) -> Result<T> {
        let mut g = self
            .locks
            .lock()
            .map_err(|_| Error::Internal("lock state poisoned".into()))?;
        f(&mut g)
    }

    fn served(&self, key: &KeyName) -> Result<Arc<Served>> {
        self.table()
            .keys
            .get(key)
            .cloned()
            .ok_or_else(|| Error::UnknownKey(key.to_string()))
    }

    fn list_keys(&self) -> Result<Value> {
        let table = self.table();
        let mut names: Vec<&KeyName> = table.keys.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let s = &table.keys[name];
            let v = s.meta.current_version()?;
            out.push(KeyInfo {
                name: name.to_string(),
                key_type: s.meta.key_type.to_string(),
                backend: s.meta.backend.to_string(),
                env: format!("{:?}", s.meta.env).to_lowercase(),
                version: s.meta.current,
                fingerprint: v.fingerprint.clone(),
                disabled: s.meta.disabled,
                locked: self.with_locks(|l| Ok(l.is_locked(name)))?,
                profiles: s.meta.profiles.clone(),
                address: s.address.clone(),
            });
        }
        Ok(json!({ "keys": out }))
    }

    fn public_key(&self, key: &KeyName, format: Option<&str>) -> Result<Value> {
        let s = self.served(key)?;
        let format: pubkey::Format = format.unwrap_or("pem").parse()?;
        let v = s.meta.current_version()?;
        let spki = v.spki_der()?.ok_or_else(|| {
            Error::Unsupported(format!(
                "key `{key}` is {}: it has no public key",
                s.meta.key_type
            ))
        })?;
        to_value(PublicKeyResult {
            key: key.to_string(),
            key_type: s.meta.key_type.to_string(),
            version: s.meta.current,
            format: format!("{format:?}").to_lowercase(),
            fingerprint: v.fingerprint.clone(),
            public_key: pubkey::encode(s.meta.key_type, &spki, format, key.as_str())?,
            address: s.address.clone(),
        })
    }

    /// The key, if it may sign at all right now: present, enabled, unlocked, loaded. The lock
    /// check comes first among the policy steps so a locked key answers in microseconds.
    fn usable(&self, key: &KeyName) -> Result<Arc<Served>> {
        let s = self.served(key)?;
        if s.meta.disabled {
            return Err(Error::KeyDisabled(key.to_string()));
        }
        self.with_locks(|l| l.check(key))?;
        if let Some(e) = &s.load_error {
            return Err(Error::BackendUnavailable(e.clone()));
        }
        Ok(s)
    }

    /// The version a request signs with: the current one, or the one it names if that version
    /// may still sign (in its grace period after a rotation; docs/lifecycle.md).
    fn choose(&self, s: &Served, version: Option<u32>) -> Result<Chosen> {
        let current = || Chosen {
            version: s.meta.current,
            key_ref: s.current.clone(),
            backend: s.backend.clone(),
        };
        let v = match version {
            None => return Ok(current()),
            Some(v) if v == s.meta.current => return Ok(current()),
            Some(v) => v,
        };
        let name = &s.meta.name;
        let kv = s
            .meta
            .versions
            .iter()
            .find(|x| x.version == v)
            .ok_or_else(|| Error::BadRequest(format!("key `{name}` has no version {v}")))?;
        let state = s.meta.version_state(kv, time::OffsetDateTime::now_utc());
        if !state.signs_when_named() {
            let why = match state {
                VersionState::Pending => "is not active yet (`keyward key activate`)",
                VersionState::Disabled => "is disabled",
                _ => "is retired (its grace period after the rotation is over)",
            };
            return Err(Error::KeyDisabled(format!(
                "version {v} of key `{name}` {why}"
            )));
        }
        let key_ref = s.meta.key_ref(kv);
        let backend = self.backend_for(&key_ref)?;
        Ok(Chosen {
            version: v,
            key_ref,
            backend,
        })
    }

    /// Identity, policy rules, then rate limits, failing fast (the `sign` op).
    fn admit(
        &self,
        who: &ClientIdentity,
        key: &KeyName,
        s: &Served,
        ask: &Ask<'_>,
        trail: &mut Trail,
    ) -> Result<()> {
        let snap = self.gate.snapshot();
        let client = snap.identify(&peer(who))?;
        trail.client = Some(client.name.clone());
        self.judge(&snap, &client, key, s, ask)?;
        snap.take_rate(&self.gate, &client, key, now_ms())
    }

    /// The policy rules for one request. A denial counts towards the key's
    /// `lock_after_denials` and may lock it.
    fn judge(
        &self,
        snap: &Snapshot,
        client: &Client,
        key: &KeyName,
        s: &Served,
        ask: &Ask<'_>,
    ) -> Result<()> {
        let facts = KeyFacts {
            name: key,
            env: s.meta.env,
            bound_profiles: &s.meta.profiles,
        };
        let Err(e) = snap.check(client, &facts, ask) else {
            return Ok(());
        };
        if let Some(lock) = self.gate.record_denial(snap, key) {
            let locked = self
                .with_locks(|l| l.lock(Some(&lock.key), Some(lock.reason.clone()), self.agent_uid));
            match locked {
                Ok(()) => tracing::warn!(key = %key, reason = %lock.reason, "key locked"),
                Err(le) => tracing::error!(key = %key, code = le.code(), "auto-lock failed: {le}"),
            }
        }
        Err(e)
    }

    /// `sign_request`: the profile builds the exact bytes (agent clock, per-key nonces), the
    /// backend signs them, the profile encodes the exchange's headers.
    async fn sign_request(
        &self,
        who: &ClientIdentity,
        key: &KeyName,
        profile: &str,
        request: &Value,
        version: Option<u32>,
        trail: &mut Trail,
    ) -> Result<Value> {
        let s = self.usable(key)?;
        let chosen = self.choose(&s, version)?;
        trail.version = Some(chosen.version);
        trail.env = Some(s.meta.env);
        let profile: ProfileName = profile.parse()?;
        // One policy snapshot and one identification for the whole request.
        let snap = self.gate.snapshot();
        let client = snap.identify(&peer(who))?;
        trail.client = Some(client.name.clone());
        // Who may use which profile is judged before the request is parsed: a key bound to
        // binance answers a kraken request with the rule, not with kraken's schema errors.
        let unparsed = Ask::Profile(profile, &Default::default());
        self.judge(&snap, &client, key, &s, &unparsed)?;
        let parsed = profile::parse(profile, request)?;
        trail.method = parsed.view.method.clone();
        trail.path = parsed.view.path.clone();
        self.judge(
            &snap,
            &client,
            key,
            &s,
            &Ask::Profile(profile, &parsed.view),
        )?;
        let now = now_ms();
        snap.take_rate(&self.gate, &client, key, now)?;
        let info = profile::KeyInfo {
            key_type: Some(s.meta.key_type),
            api_key: s.meta.api_key.clone(),
            passphrase: None,
            address: s.address.clone().or_else(|| s.meta.address.clone()),
        };
        // The clock borrows a non-Send closure: keep it out of the await below.
        let mut plan = {
            let mut nonces = |t: u64| self.gate.next_nonce(key, t);
            let mut clock = Clock {
                now_ms: now,
                client_time: snap.client_time(key),
                nonces: &mut nonces,
            };
            parsed.build(&info, &mut clock)?
        };
        if !s.meta.key_type.supports(plan.alg) {
            return Err(profile::unsupported_key(profile, s.meta.key_type));
        }
        let msg = std::mem::take(&mut plan.message);
        let sig = self.run_sign(&chosen, plan.alg, msg).await?;
        Ok(plan.finish(&sig)?.into_value())
    }

    /// Signs on the key's backend: inline when the backend is fast, else on the worker pool,
    /// bounded by the backend's device timeout.
    async fn run_sign(
        &self,
        chosen: &Chosen,
        alg: Algorithm,
        msg: Vec<u8>,
    ) -> Result<keyward::backend::Signature> {
        let backend = chosen.backend.clone();
        let key_ref = chosen.key_ref.clone();
        let sig = if backend.is_fast(alg) {
            backend.sign(&key_ref, alg, &msg)?
        } else if let Some(sig) = self.sign_here(&key_ref, alg, &msg) {
            sig?
        } else if key_ref.backend == BackendKind::Tpm && multi_thread_runtime() {
            // The TPM context is busy: the backend queues to its own worker thread and waits
            // at most its timeout_ms, so this call is bounded by itself; a hop to the pool
            // first would only add a cross-thread wake-up (D14).
            tokio::task::block_in_place(|| backend.sign(&key_ref, alg, &msg))?
        } else {
            let limit = backend.timeout();
            let job = self.pool.run(move || backend.sign(&key_ref, alg, &msg));
            match limit {
                // A device that hangs must not hang the client: answer within the limit (the
                // worker finishes or fails on its own; its session stays out until then).
                Some(t) => tokio::time::timeout(t, job).await.map_err(|_| {
                    Error::BackendUnavailable(format!(
                        "the device did not answer within {} ms",
                        t.as_millis()
                    ))
                })??,
                None => job.await?,
            }
        };
        Ok(sig)
    }

    async fn sign(
        &self,
        who: &ClientIdentity,
        key: &KeyName,
        data: &str,
        scheme: Option<&str>,
        version: Option<u32>,
        trail: &mut Trail,
    ) -> Result<Value> {
        let s = self.usable(key)?;
        let chosen = self.choose(&s, version)?;
        trail.version = Some(chosen.version);
        trail.env = Some(s.meta.env);
        self.admit(who, key, &s, &Ask::Raw, trail)?;
        let alg = scheme_for(&s, scheme)?;
        let msg = STANDARD
            .decode(data)
            .map_err(|_| Error::BadRequest("data must be standard base64".into()))?;
        if self.audit.enabled() {
            trail.request_sha256 = Some(audit::sha256_hex(&msg));
        }
        let sig = self.run_sign(&chosen, alg, msg).await?;
        let (signature, digest) = match sig.recovery_id {
            Some(rid) => {
                let mut b = sig.bytes;
                b.push(27 + rid);
                (b, sig.digest.map(|d| format!("0x{}", hex::encode(d))))
            }
            None => (sig.bytes, None),
        };
        to_value(SignResult {
            key: key.to_string(),
            version: chosen.version,
            scheme: alg.to_string(),
            signature: STANDARD.encode(signature),
            digest,
        })
    }

    fn status(&self) -> Result<Value> {
        to_value(StatusResult {
            agent_version: keyward::VERSION.into(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            socket: self.socket.display().to_string(),
            home: self.home.root().display().to_string(),
            keys: self.table().keys.len(),
            connections: self.connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            queue_depth: self.pool.depth(),
            workers: self.pool.workers(),
            dumpable: keyward::sys::is_dumpable(),
            memory_locked: keyward::sys::memory_locked(),
            locks: self.with_locks(|l| Ok(l.list()))?,
            backends: self
                .backend_health()
                .into_iter()
                .map(|(kind, health)| {
                    let (up, detail) = match health {
                        Health::Up => (true, None),
                        Health::Down(why) => (false, Some(why)),
                    };
                    BackendStatus { kind, up, detail }
                })
                .collect(),
            audit: Some(self.audit_status()),
            metrics: Some(self.metrics_text()),
        })
    }

    /// The Prometheus text exposition, with gauges read now.
    pub fn metrics_text(&self) -> String {
        let backends: Vec<(String, bool)> = self
            .backend_health()
            .into_iter()
            .map(|(name, h)| (name, matches!(h, Health::Up)))
            .collect();
        let st = self.audit.stats();
        self.metrics.set_gauges(Gauges {
            queue_depth: self.pool.depth(),
            connections: self.connections.load(Ordering::Relaxed),
            locks: self.with_locks(|l| Ok(l.list().len())).unwrap_or(0),
            audit_queued: st.queued.load(Ordering::Relaxed),
            audit_available: !self.audit.enabled() || st.available.load(Ordering::Relaxed),
            backends: &backends,
        });
        self.metrics.encode()
    }

    fn audit_status(&self) -> AuditStatus {
        let st = self.audit.stats();
        AuditStatus {
            enabled: self.audit.enabled(),
            available: !self.audit.enabled() || st.available.load(Ordering::Relaxed),
            written: st.written.load(Ordering::Relaxed),
            dropped: st.dropped.load(Ordering::Relaxed),
            queued: st.queued.load(Ordering::Relaxed),
            last_error: st.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// A request's answer, or (fail-closed keys) one to release once its record is durable.
pub enum Reply {
    Ready(Result<Value>),
    AfterAudit(Deferred),
}

/// A signature held back until its audit record is durable (`ticket`).
pub struct Deferred {
    pub ticket: u64,
    value: Value,
    labels: Labels,
}

/// What the request metrics need once the outcome is known.
struct Labels {
    op: &'static str,
    key: String,
    profile: String,
    started: Instant,
}

enum Pending {
    Now(Result<Value>),
    Ticket(u64, Value),
}

/// The key version a request signs with, and where it lives.
struct Chosen {
    version: u32,
    key_ref: KeyRef,
    backend: Arc<dyn Backend>,
}

/// What the audit record of one signing request says beyond its outcome; filled in as the
/// request gets through identification and key lookup.
#[derive(Default)]
struct Trail {
    client: Option<String>,
    version: Option<u32>,
    env: Option<Env>,
    profile: Option<String>,
    method: Option<String>,
    path: Option<String>,
    request_sha256: Option<String>,
}

/// Open the configured PKCS#11 tokens, keeping `current` ones whose configuration did not
/// change (and whose PIN was not refused: a reload is how an operator retries a PIN).
fn build_tokens(
    config: &Config,
    current: &HashMap<String, Arc<Pkcs11Backend>>,
) -> Result<HashMap<String, Arc<Pkcs11Backend>>> {
    let mut out = HashMap::new();
    for (alias, cfg) in &config.pkcs11 {
        if let Some(t) = current.get(alias) {
            if t.config() == cfg && !t.pin_rejected() {
                out.insert(alias.clone(), t.clone());
                continue;
            }
        }
        let source: keyward::secret::SecretSource = cfg.pin.parse()?;
        let pin = source.read(&format!("PIN of pkcs11 token {alias}"))?;
        out.insert(
            alias.clone(),
            Arc::new(Pkcs11Backend::new(alias, cfg.clone(), pin)),
        );
    }
    Ok(out)
}

/// Start the configured TPM backends, keeping `current` ones whose configuration did not
/// change and whose auth value the TPM did not refuse (a reload is how an operator retries an
/// auth value; keeping a backend keeps its connection and loaded keys).
fn build_tpms(
    config: &Config,
    home: &Home,
    current: &HashMap<String, Arc<TpmBackend>>,
) -> Result<HashMap<String, Arc<TpmBackend>>> {
    let mut out = HashMap::new();
    for (alias, cfg) in &config.tpm {
        if let Some(t) = current.get(alias) {
            if t.config() == cfg && !t.auth_rejected() {
                out.insert(alias.clone(), t.clone());
                continue;
            }
        }
        let auth = TpmAuth::read(alias, cfg)?;
        // `new` does not fail when the TPM is absent: its keys answer backend_unavailable
        // and the worker reconnects on use, so the agent and other keys still start.
        let tpm = TpmBackend::new(alias, cfg.clone(), &home.keys_dir(), auth)?;
        out.insert(alias.clone(), Arc::new(tpm));
    }
    Ok(out)
}

fn lock_target(key: Option<&KeyName>, all: bool) -> Result<Option<&KeyName>> {
    match (key, all) {
        (Some(k), false) => Ok(Some(k)),
        (None, true) => Ok(None),
        _ => Err(Error::BadRequest(
            "give exactly one of `key` or `all: true`".into(),
        )),
    }
}

/// The scheme a request names (or the key type's default), if it fits the key.
fn scheme_for(s: &Served, scheme: Option<&str>) -> Result<Algorithm> {
    let alg = match scheme {
        Some(name) => name.parse::<Algorithm>()?,
        None => s.meta.key_type.default_algorithm(),
    };
    if s.meta.key_type.supports(alg) {
        Ok(alg)
    } else {
        Err(Error::BadRequest(format!(
            "scheme {alg} does not fit key `{}` ({})",
            s.meta.name, s.meta.key_type
        )))
    }
}

/// `block_in_place` needs the multi-thread runtime (the agent's; not a unit test's).
fn multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// The policy's view of a connected peer.
fn peer(who: &ClientIdentity) -> Peer {
    Peer {
        uid: who.uid,
        gid: who.gid,
        exe: who.exe.clone(),
        token_sha256: who.token_sha256.get().copied(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Internal(format!("encoding result: {e}")))
}
