//! PKCS#11 backend (cryptoki): keys live on an HSM or SoftHSM token, non-extractable, and
//! sign there through a small pool of sessions logged in once; a lost device heals itself.

use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use pkcs8::der::{Decode, Encode};

use super::material::{self, SecretKeyMaterial};
use super::{Backend, Health, KeySpec, NewKey, PublicInfo, Signature};
use crate::config::TokenConfig;
use crate::error::{Error, Result};
use crate::model::{Algorithm, BackendKind, KeyRef, KeyType};
use crate::secret::SecretBytes;

/// Longest wait between reconnection attempts after the device went away.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// DER-encoded curve OIDs, as CKA_EC_PARAMS wants them.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const SECP256K1_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// One token, as configured under `[pkcs11.<alias>]` in keyward.toml.
pub struct Pkcs11Backend {
    alias: String,
    cfg: TokenConfig,
    pin: SecretBytes,
    conn: Mutex<Conn>,
}

struct Conn {
    live: Option<Arc<Live>>,
    last_error: Option<String>,
    next_attempt: Instant,
    backoff: Duration,
    /// The token refused the PIN: never try again on our own (it would lock the token).
    pin_rejected: bool,
    /// A connection declared lost while operations were still running on it; no new one is
    /// opened until they are done, so the module can be finalised and re-initialised cleanly.
    retired: Option<Weak<Live>>,
}

/// A loaded module with an open, logged-in set of sessions. Dropped as a whole when the
/// device goes away; fields drop in order, so sessions close before the module finalises.
struct Live {
    sessions: Mutex<Vec<Session>>,
    available: Condvar,
    /// Threads waiting on `available` (changed under the `sessions` lock): giving a session
    /// back wakes one only if someone waits, saving a futex call per operation.
    waiting: AtomicUsize,
    keys: Mutex<HashMap<Vec<u8>, Arc<KeyObject>>>,
    slot: Slot,
    module: Arc<Module>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // Close sessions before the module may be finalised (when `module` drops after this).
        self.sessions
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// One initialised PKCS#11 module, shared by every token (and every command) that uses the
/// same library file: PKCS#11 state is per process and module, so C_Finalize must wait until
/// the last user is gone, and a later C_Initialize then starts the module afresh (which is
/// what lets a re-attached device or restored token be seen again).
pub struct Module {
    ctx: Pkcs11,
    path: PathBuf,
}

impl Drop for Module {
    fn drop(&mut self) {
        // Under the registry lock, so a concurrent load_module cannot C_Initialize the same
        // library while it is being finalised.
        let registry = modules().lock().unwrap_or_else(|p| p.into_inner());
        // A newer context for the same library registered while this one was dropping: it
        // shares the initialised library, which must stay initialised.
        if registry.get(&self.path).and_then(Weak::upgrade).is_some() {
            return;
        }
        if let Err(e) = self.ctx.clone().finalize() {
            tracing::debug!(module = %self.path.display(), "C_Finalize: {e}");
        }
    }
}

fn modules() -> &'static Mutex<HashMap<PathBuf, Weak<Module>>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Weak<Module>>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A private (or secret) key object and what signing with it needs besides its handle.
struct KeyObject {
    handle: ObjectHandle,
    key_type: KeyType,
    /// secp256k1: the uncompressed public point, to compute recovery ids.
    public_point: Option<Vec<u8>>,
}

/// What an operation found out about the device.
enum Failure {
    /// The device, token or session is gone: drop everything and reconnect later.
    Gone(String),
    /// A normal error; the session stays usable.
    Other(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

/// Token and slot facts for `keyward token list`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TokenSummary {
    pub slot: u64,
    pub label: String,
    pub serial: String,
    pub manufacturer: String,
    pub model: String,
    pub initialized: bool,
    pub free_private_memory: Option<usize>,
    pub mechanisms: Vec<String>,
}

impl Pkcs11Backend {
    /// Configure a token. Connecting happens now if possible; a token that is absent at start
    /// is retried with backoff on use, so other keys keep working.
    pub fn new(alias: &str, cfg: TokenConfig, pin: SecretBytes) -> Pkcs11Backend {
        let b = Pkcs11Backend::unconnected(alias, cfg, pin);
        if let Err(e) = b.live() {
            tracing::warn!(token = %b.alias, code = e.code(), "token not available yet: {e}");
        }
        b
    }

    /// Connect now and report the error (CLI use: no silent retry). One attempt: its own
    /// error comes back (a wrong PIN is `bad_passphrase`, not the remembered rejection).
    pub fn connect(alias: &str, cfg: TokenConfig, pin: SecretBytes) -> Result<Pkcs11Backend> {
        let b = Pkcs11Backend::unconnected(alias, cfg, pin);
        b.live()?;
        Ok(b)
    }

    fn unconnected(alias: &str, cfg: TokenConfig, pin: SecretBytes) -> Pkcs11Backend {
        Pkcs11Backend {
            alias: alias.to_string(),
            cfg,
            pin,
            conn: Mutex::new(Conn {
                live: None,
                last_error: None,
                next_attempt: Instant::now(),
                backoff: FIRST_BACKOFF,
                pin_rejected: false,
                retired: None,
            }),
        }
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    pub fn config(&self) -> &TokenConfig {
        &self.cfg
    }

    /// Whether the token refused the PIN (the backend then waits for a reload).
    pub fn pin_rejected(&self) -> bool {
        self.conn().pin_rejected
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unavailable(&self, why: &str) -> Error {
        Error::BackendUnavailable(format!("pkcs11 token `{}`: {why}", self.alias))
    }

    /// The live connection, connecting (with backoff after failures) if needed.
    fn live(&self) -> Result<Arc<Live>> {
        let mut c = self.conn();
        if let Some(l) = &c.live {
            return Ok(l.clone());
        }
        if c.pin_rejected {
            return Err(self.unavailable(
                "the token rejected the PIN; fix the PIN source and run `keyward reload` (the agent never retries a PIN)",
            ));
        }
        if let Some(old) = &c.retired {
            if old.strong_count() > 0 {
                return Err(self.unavailable(
                    "the device was lost; waiting for operations still running on it",
                ));
            }
            c.retired = None;
        }
        if Instant::now() < c.next_attempt {
            let why = c
                .last_error
                .clone()
                .unwrap_or_else(|| "not connected".into());
            return Err(self.unavailable(&why));
        }
        match self.open() {
            Ok(live) => {
                let live = Arc::new(live);
                c.live = Some(live.clone());
                c.last_error = None;
                c.backoff = FIRST_BACKOFF;
                tracing::info!(token = %self.alias, "token connected");
                Ok(live)
            }
            Err(e) => {
                if matches!(e, Error::BadPassphrase(_)) {
                    c.pin_rejected = true;
                    return Err(e);
                }
                c.last_error = Some(e.to_string());
                c.next_attempt = Instant::now() + c.backoff;
                c.backoff = (c.backoff * 2).min(MAX_BACKOFF);
                Err(match e {
                    Error::BackendUnavailable(_) => e,
                    other => self.unavailable(&other.to_string()),
                })
            }
        }
    }

    fn open(&self) -> Result<Live> {
        let module = load_module(&self.cfg.module)?;
        let ctx = module.ctx.clone();
        let slot = find_slot(&ctx, &self.cfg)?;
        let n = if self.cfg.sessions > 0 {
            self.cfg.sessions
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        };
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            sessions.push(ctx.open_rw_session(slot).map_err(|e| self.map_open(e))?);
        }
        let pin = pin_of(&self.pin)?;
        // PKCS#11 login state is per application and token: one login covers every session.
        match sessions[0].login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(self.map_open(e)),
        }
        Ok(Live {
            sessions: Mutex::new(sessions),
            available: Condvar::new(),
            waiting: AtomicUsize::new(0),
            keys: Mutex::new(HashMap::new()),
            slot,
            module,
        })
    }

    fn map_open(&self, e: CkError) -> Error {
        match &e {
            CkError::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            ) => Error::BadPassphrase(format!("pkcs11 token `{}` rejected the PIN", self.alias)),
            CkError::Pkcs11(RvError::PinLocked, _) => Error::BadPassphrase(format!(
                "pkcs11 token `{}`: the PIN is locked; unlock it with the SO PIN",
                self.alias
            )),
            _ => self.unavailable(&e.to_string()),
        }
    }

    /// Run `f` with a session of the live connection. A device-level failure drops the
    /// connection (reconnected on a later call) and is reported as `backend_unavailable`.
    fn with_session<T>(
        &self,
        f: impl FnOnce(&Live, &Session) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let live = self.live()?;
        let session = {
            let mut pool = live.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let deadline = Instant::now() + self.limit();
            loop {
                if let Some(s) = pool.pop() {
                    break s;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Busy(format!(
                        "all sessions of token `{}` are busy",
                        self.alias
                    )));
                }
                live.waiting.fetch_add(1, Ordering::Relaxed);
                pool = live
                    .available
                    .wait_timeout(pool, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                live.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        };
        let result = f(&live, &session);
        self.settle(&live, session, result)
    }

    /// Return the session after an operation, or retire the connection if the device is gone.
    fn settle<T>(
        &self,
        live: &Arc<Live>,
        session: Session,
        result: std::result::Result<T, Failure>,
    ) -> Result<T> {
        match result {
            Ok(v) => {
                self.give_back(live, session);
                Ok(v)
            }
            Err(Failure::Other(e)) => {
                self.give_back(live, session);
                Err(e)
            }
            Err(Failure::Gone(why)) => {
                drop(session);
                let mut c = self.conn();
                if c.live.as_ref().is_some_and(|l| Arc::ptr_eq(l, live)) {
                    c.live = None;
                    c.retired = Some(Arc::downgrade(live));
                    c.last_error = Some(why.clone());
                    c.next_attempt = Instant::now() + c.backoff;
                    c.backoff = (c.backoff * 2).min(MAX_BACKOFF);
                    tracing::warn!(token = %self.alias, "token lost: {why}; reconnecting with backoff");
                }
                Err(self.unavailable(&why))
            }
        }
    }

    /// A session that is idle right now, without waiting and without connecting: `None` when
    /// the token is not connected or every session is in use (the caller then queues the
    /// operation as usual). Lets the agent sign on the thread that read the request.
    pub fn idle_session(&self) -> Option<IdleSession<'_>> {
        let live = self.conn().live.clone()?;
        let session = live
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()?;
        Some(IdleSession {
            backend: self,
            live,
            session: Some(session),
        })
    }

    /// Sign with the key whose CKA_ID is `id` on `s` (the body of `Backend::sign`).
    fn sign_on(
        &self,
        live: &Live,
        s: &Session,
        id: &[u8],
        alg: Algorithm,
        msg: &[u8],
    ) -> std::result::Result<Signature, Failure> {
        let k = self.key_object(live, s, id, None)?;
        if !k.key_type.supports(alg) {
            return Err(Failure::Other(Error::BadRequest(format!(
                "scheme {alg} does not fit this {} key",
                k.key_type
            ))));
        }
        sign_with(s, &k, alg, msg)
    }

    fn give_back(&self, live: &Live, s: Session) {
        let waiting = {
            let mut pool = live.sessions.lock().unwrap_or_else(|p| p.into_inner());
            pool.push(s);
            live.waiting.load(Ordering::Relaxed)
        };
        if waiting > 0 {
            live.available.notify_one();
        }
    }

    /// Find (and cache) the private/secret key object with CKA_ID `id`.
    fn key_object(
        &self,
        live: &Live,
        s: &Session,
        id: &[u8],
        want: Option<KeyType>,
    ) -> std::result::Result<Arc<KeyObject>, Failure> {
        if let Some(k) = live.keys.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(k.clone());
        }
        let (handle, class) = find_key(s, &[Attribute::Id(id.to_vec())])
            .map_err(classify)?
            .ok_or_else(|| {
                Failure::Other(self.unavailable(&format!(
                    "no key object with id {} on the token",
                    hex::encode(id)
                )))
            })?;
        let key_type = describe(s, handle, class).map_err(classify)?;
        if let Some(w) = want {
            if w != key_type && !(w.is_hmac() && key_type.is_hmac()) {
                return Err(Failure::Other(Error::Internal(format!(
                    "token object {} is {key_type}, metadata says {w}",
                    hex::encode(id)
                ))));
            }
        }
        let public_point = if key_type == KeyType::Secp256k1 {
            let spki = public_spki_of(s, handle, id, key_type).map_err(classify)?;
            Some(crate::pubkey::raw_public_key(&spki).map_err(Failure::Other)?)
        } else {
            None
        };
        let k = Arc::new(KeyObject {
            handle,
            key_type,
            public_point,
        });
        live.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_vec(), k.clone());
        Ok(k)
    }

    /// Adopt an object another tool created: by label or by id (hex).
    pub fn adopt(
        &self,
        label: Option<&str>,
        id: Option<&[u8]>,
    ) -> Result<(KeyRef, KeyType, PublicInfo)> {
        self.with_session(|_, s| {
            let mut tmpl = Vec::new();
            if let Some(l) = label {
                tmpl.push(Attribute::Label(l.as_bytes().to_vec()));
            }
            if let Some(i) = id {
                tmpl.push(Attribute::Id(i.to_vec()));
            }
            let (handle, class) = find_key(s, &tmpl).map_err(classify)?.ok_or_else(|| {
                Failure::Other(Error::UnknownKey(format!(
                    "no private or secret key with {} on token {}",
                    label
                        .map(|l| format!("label {l}"))
                        .or(id.map(|i| format!("id {}", hex::encode(i))))
                        .unwrap_or_default(),
                    self.alias
                )))
            })?;
            let key_type = describe(s, handle, class).map_err(classify)?;
            let obj_id =
                match s
                    .get_attributes(handle, &[AttributeType::Id])
                    .map_err(classify)?
                    .pop()
                {
                    Some(Attribute::Id(v)) if !v.is_empty() => v,
                    _ => return Err(Failure::Other(Error::Unsupported(
                        "the object has no CKA_ID; set one (pkcs11-tool --set-id) before adopting"
                            .into(),
                    ))),
                };
            let public = if key_type.is_hmac() {
                PublicInfo {
                    spki_der: None,
                    fingerprint: format!("PKCS11:{}:{}", self.alias, hex::encode(&obj_id)),
                }
            } else {
                let spki = public_spki_of(s, handle, &obj_id, key_type).map_err(classify)?;
                PublicInfo {
                    fingerprint: crate::pubkey::fingerprint(&spki),
                    spki_der: Some(spki),
                }
            };
            Ok((self.key_ref(&obj_id), key_type, public))
        })
    }

    fn key_ref(&self, id: &[u8]) -> KeyRef {
        KeyRef {
            backend: BackendKind::Pkcs11,
            locator: format!("{}:{}", self.alias, hex::encode(id)),
        }
    }

    /// The CKA_ID inside one of this token's locators.
    fn id_of(&self, key: &KeyRef) -> Result<Vec<u8>> {
        let bad = || Error::Internal(format!("invalid pkcs11 locator {:?}", key.locator));
        let (alias, id) = key.locator.split_once(':').ok_or_else(bad)?;
        if key.backend != BackendKind::Pkcs11 || alias != self.alias {
            return Err(bad());
        }
        hex::decode(id).map_err(|_| bad())
    }

    /// Whether `key` lives on this token.
    pub fn owns(&self, key: &KeyRef) -> bool {
        key.backend == BackendKind::Pkcs11
            && key
                .locator
                .split_once(':')
                .is_some_and(|(a, _)| a == self.alias)
    }

    /// Verify that a key can be found and has the expected type (used on load).
    pub fn probe(&self, key: &KeyRef, key_type: KeyType) -> Result<()> {
        let id = self.id_of(key)?;
        self.with_session(|live, s| self.key_object(live, s, &id, Some(key_type)).map(|_| ()))
    }

    /// Token facts for `token list`.
    pub fn summary(&self) -> Result<TokenSummary> {
        let live = self.live()?;
        summarize(&live.module.ctx, live.slot)
    }
}

impl Backend for Pkcs11Backend {
    fn kind(&self) -> BackendKind {
        BackendKind::Pkcs11
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.limit())
    }

    fn health(&self) -> Health {
        let c = self.conn();
        if c.live.is_some() {
            Health::Up
        } else {
            Health::Down(
                c.last_error
                    .clone()
                    .unwrap_or_else(|| "not connected".into()),
            )
        }
    }

    fn generate(&self, spec: &KeySpec) -> Result<NewKey> {
        let id = new_id()?;
        let label = spec.name.as_str().as_bytes().to_vec();
        let t = spec.key_type;
        self.with_session(|_, s| {
            let common_priv = private_attrs(&label, &id);
            let common_pub = vec![
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::Label(label.clone()),
                Attribute::Id(id.clone()),
            ];
            if t.is_hmac() {
                // 64 bytes for both types: at least either digest's length (tokens refuse
                // shorter HMAC-SHA512 keys) and no longer than SHA-256's block (so neither
                // digest hashes the key first): one secret serves both schemes, as in soft.
                let len: u64 = 64;
                let mut tmpl = common_priv.clone();
                tmpl.extend([
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(CkKeyType::GENERIC_SECRET),
                    Attribute::ValueLen(len.into()),
                    Attribute::Verify(true),
                ]);
                s.generate_key(&Mechanism::GenericSecretKeyGen, &tmpl)
                    .map_err(classify)?;
                return Ok(NewKey {
                    key_ref: self.key_ref(&id),
                    public: PublicInfo {
                        spki_der: None,
                        fingerprint: format!("PKCS11:{}:{}", self.alias, hex::encode(&id)),
                    },
                });
            }
            let (mech, mut pub_t) = match t {
                KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                    let bits: u64 = match t {
                        KeyType::Rsa2048 => 2048,
                        KeyType::Rsa3072 => 3072,
                        _ => 4096,
                    };
                    (
                        Mechanism::RsaPkcsKeyPairGen,
                        vec![
                            Attribute::ModulusBits(bits.into()),
                            Attribute::PublicExponent(vec![1, 0, 1]),
                        ],
                    )
                }
                KeyType::Ed25519 => (
                    Mechanism::EccEdwardsKeyPairGen,
                    vec![Attribute::EcParams(ED25519_PARAMS.to_vec())],
                ),
                _ => (
                    Mechanism::EccKeyPairGen,
                    vec![Attribute::EcParams(ec_params(t)?.to_vec())],
                ),
            };
            pub_t.extend(common_pub);
            let (_pub_h, priv_h) = s
                .generate_key_pair(&mech, &pub_t, &common_priv)
                .map_err(classify)?;
            let spki = public_spki_of(s, priv_h, &id, t).map_err(classify)?;
            Ok(NewKey {
                key_ref: self.key_ref(&id),
                public: PublicInfo {
                    fingerprint: crate::pubkey::fingerprint(&spki),
                    spki_der: Some(spki),
                },
            })
        })
    }

    fn import(&self, spec: &KeySpec, secret: SecretKeyMaterial) -> Result<NewKey> {
        super::check_material(spec, &secret)?;
        let id = new_id()?;
        let label = spec.name.as_str().as_bytes().to_vec();
        let t = spec.key_type;
        let spki = material::public_spki(&secret)?;
        let (mut priv_t, pub_t) = import_templates(t, &secret, spki.as_deref())?;
        priv_t.extend(private_attrs(&label, &id));
        self.with_session(|_, s| {
            s.create_object(&priv_t).map_err(classify)?;
            if let Some(mut p) = pub_t {
                p.extend([
                    Attribute::Token(true),
                    Attribute::Verify(true),
                    Attribute::Label(label),
                    Attribute::Id(id.clone()),
                ]);
                s.create_object(&p).map_err(classify)?;
            }
            Ok(())
        })?;
        let fingerprint = match &spki {
            Some(d) => crate::pubkey::fingerprint(d),
            None => material::hmac_fingerprint(secret.expose()),
        };
        Ok(NewKey {
            key_ref: self.key_ref(&id),
            public: PublicInfo {
                spki_der: spki,
                fingerprint,
            },
        })
    }

    fn sign(&self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        let id = self.id_of(key)?;
        self.with_session(|live, s| self.sign_on(live, s, &id, alg, msg))
    }

    fn delete(&self, key: &KeyRef) -> Result<()> {
        let id = self.id_of(key)?;
        self.with_session(|live, s| {
            let objects = s
                .find_objects(&[Attribute::Id(id.clone())])
                .map_err(classify)?;
            for o in objects {
                s.destroy_object(o).map_err(classify)?;
            }
            live.keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            Ok(())
        })
    }
}

/// A session taken by [`Pkcs11Backend::idle_session`]; given back when signed with or dropped.
pub struct IdleSession<'a> {
    backend: &'a Pkcs11Backend,
    live: Arc<Live>,
    session: Option<Session>,
}

impl IdleSession<'_> {
    /// `Backend::sign` on this session: the same key lookup, mechanism and device-loss
    /// handling. Blocks for the device call.
    pub fn sign(mut self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        let b = self.backend;
        let id = b.id_of(key)?;
        let Some(session) = self.session.take() else {
            return Err(Error::Internal("idle session used twice".into()));
        };
        let result = b.sign_on(&self.live, &session, &id, alg, msg);
        b.settle(&self.live, session, result)
    }
}

impl Drop for IdleSession<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.backend.give_back(&self.live, s);
        }
    }
}

fn sign_with(
    s: &Session,
    k: &KeyObject,
    alg: Algorithm,
    msg: &[u8],
) -> std::result::Result<Signature, Failure> {
    let pss = |hash, mgf, len: u64| PkcsPssParams {
        hash_alg: hash,
        mgf,
        s_len: len.into(),
    };
    let sha = |d: &'static aws_lc_rs::digest::Algorithm| {
        aws_lc_rs::digest::digest(d, msg).as_ref().to_vec()
    };
    // Mechanism values are built here, on the signing thread (they are not Send). Tokens such
    // as SoftHSM lack CKM_ECDSA_SHA256: ECDSA input is hashed here and the digest signed.
    let (mech, input) = match alg {
        Algorithm::Ed25519 => (
            Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
            msg.to_vec(),
        ),
        Algorithm::EcdsaP256Sha256 => (Mechanism::Ecdsa, sha(&aws_lc_rs::digest::SHA256)),
        Algorithm::EcdsaP384Sha384 => (Mechanism::Ecdsa, sha(&aws_lc_rs::digest::SHA384)),
        Algorithm::EcdsaSecp256k1Keccak256
        | Algorithm::EcdsaSecp256k1Sha256
        | Algorithm::EcdsaSecp256k1Prehashed => (
            Mechanism::Ecdsa,
            super::secp256k1_digest(alg, msg)?.to_vec(),
        ),
        Algorithm::RsaPkcs1Sha256 => (Mechanism::Sha256RsaPkcs, msg.to_vec()),
        Algorithm::RsaPkcs1Sha512 => (Mechanism::Sha512RsaPkcs, msg.to_vec()),
        Algorithm::RsaPssSha256 => (
            Mechanism::Sha256RsaPkcsPss(pss(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32)),
            msg.to_vec(),
        ),
        Algorithm::RsaPssSha512 => (
            Mechanism::Sha512RsaPkcsPss(pss(MechanismType::SHA512, PkcsMgfType::MGF1_SHA512, 64)),
            msg.to_vec(),
        ),
        Algorithm::HmacSha256 => (Mechanism::Sha256Hmac, msg.to_vec()),
        Algorithm::HmacSha512 => (Mechanism::Sha512Hmac, msg.to_vec()),
    };
    let raw = s.sign(&mech, k.handle, &input).map_err(classify)?;
    if k.key_type != KeyType::Secp256k1 {
        return Ok(Signature::plain(raw));
    }
    let digest: [u8; 32] = input
        .as_slice()
        .try_into()
        .map_err(|_| Failure::Other(Error::Internal("secp256k1 digest length".into())))?;
    let point = k.public_point.as_deref().ok_or_else(|| {
        Failure::Other(Error::Internal("secp256k1 key without public point".into()))
    })?;
    recoverable(&raw, &digest, point).map_err(Failure::Other)
}

/// Low-s normalise a token's raw r‖s and find the recovery id by trying both candidates
/// against the known public key (tokens do not report it).
pub fn recoverable(raw: &[u8], digest: &[u8; 32], point: &[u8]) -> Result<Signature> {
    use k256::ecdsa::{RecoveryId, Signature as KSig, VerifyingKey};
    let sig = KSig::from_slice(raw)
        .map_err(|_| Error::Internal("token returned a malformed ECDSA signature".into()))?;
    let sig = sig.normalize_s().unwrap_or(sig);
    let expected = VerifyingKey::from_sec1_bytes(point)
        .map_err(|_| Error::Internal("invalid secp256k1 public key".into()))?;
    for rid in 0..2u8 {
        let Some(r) = RecoveryId::from_byte(rid) else {
            continue;
        };
        if VerifyingKey::recover_from_prehash(digest, &sig, r).is_ok_and(|vk| vk == expected) {
            return Ok(Signature {
                bytes: sig.to_bytes().to_vec(),
                recovery_id: Some(rid),
                digest: Some(*digest),
            });
        }
    }
    Err(Error::Internal(
        "token signature does not match the key's public key".into(),
    ))
}

/// Map a cryptoki error: device-level failures mean "reconnect", the rest are plain errors.
fn classify(e: CkError) -> Failure {
    match &e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
            | RvError::GeneralError => Failure::Gone(e.to_string()),
            RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => {
                Failure::Gone(e.to_string())
            }
            RvError::MechanismInvalid
            | RvError::KeyTypeInconsistent
            | RvError::KeyFunctionNotPermitted => Failure::Other(Error::Unsupported(format!(
                "the token refused the operation: {e}"
            ))),
            RvError::DataLenRange
            | RvError::DataInvalid
            | RvError::KeySizeRange
            | RvError::TemplateInconsistent
            | RvError::AttributeValueInvalid => Failure::Other(Error::BadRequest(format!(
                "the token refused the input: {e}"
            ))),
            _ => Failure::Other(Error::BackendUnavailable(format!("pkcs11: {e}"))),
        },
        _ => Failure::Gone(e.to_string()),
    }
}

/// The shared, initialised module for `path` (loading and initialising it if no one holds it).
fn load_module(path: &Path) -> Result<Arc<Module>> {
    let mut registry = modules().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = registry.get(path).and_then(Weak::upgrade) {
        return Ok(m);
    }
    if !path.is_file() {
        return Err(Error::BackendUnavailable(format!(
            "PKCS#11 module {} does not exist",
            path.display()
        )));
    }
    let ctx = Pkcs11::new(path).map_err(|e| {
        Error::BackendUnavailable(format!(
            "{} is not a usable PKCS#11 module: {e}",
            path.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Already initialised: by a context outside this registry (another library in the
        // process); share it rather than fail.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Error::BackendUnavailable(format!(
                "initialising {}: {e}",
                path.display()
            )))
        }
    }
    let m = Arc::new(Module {
        ctx,
        path: path.to_path_buf(),
    });
    registry.insert(path.to_path_buf(), Arc::downgrade(&m));
    Ok(m)
}

/// Find the configured token's slot by label or serial (slot numbers change, e.g. after init).
pub fn find_slot(ctx: &Pkcs11, cfg: &TokenConfig) -> Result<Slot> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| Error::BackendUnavailable(format!("listing slots: {e}")))?;
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        let label_ok = cfg
            .label
            .as_deref()
            .is_none_or(|l| info.label().trim_end() == l);
        let serial_ok = cfg
            .serial
            .as_deref()
            .is_none_or(|s| info.serial_number().trim_end() == s);
        if label_ok && serial_ok {
            return Ok(slot);
        }
    }
    Err(Error::BackendUnavailable(format!(
        "no token with {} in module {}",
        match (&cfg.label, &cfg.serial) {
            (Some(l), _) => format!("label {l:?}"),
            (None, Some(s)) => format!("serial {s:?}"),
            _ => "the configured label/serial".into(),
        },
        cfg.module.display()
    )))
}

/// Every token a module shows, for `keyward token list`.
pub fn list_tokens(module: &Path) -> Result<Vec<TokenSummary>> {
    let m = load_module(module)?;
    let ctx = &m.ctx;
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| Error::BackendUnavailable(format!("listing slots: {e}")))?;
    slots.into_iter().map(|s| summarize(ctx, s)).collect()
}

fn summarize(ctx: &Pkcs11, slot: Slot) -> Result<TokenSummary> {
    let info = ctx
        .get_token_info(slot)
        .map_err(|e| Error::BackendUnavailable(format!("token info: {e}")))?;
    let mechanisms = ctx
        .get_mechanism_list(slot)
        .map(|l| {
            l.iter()
                .map(|m| {
                    let flags = ctx
                        .get_mechanism_info(slot, *m)
                        .map(|i| {
                            let mut f = Vec::new();
                            if i.sign() {
                                f.push("sign");
                            }
                            if i.generate_key_pair() || i.generate() {
                                f.push("generate");
                            }
                            f.join(",")
                        })
                        .unwrap_or_default();
                    format!(
                        "{m}{}",
                        if flags.is_empty() {
                            String::new()
                        } else {
                            format!(" [{flags}]")
                        }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(TokenSummary {
        slot: slot.id(),
        label: info.label().trim_end().to_string(),
        serial: info.serial_number().trim_end().to_string(),
        manufacturer: info.manufacturer_id().trim_end().to_string(),
        model: info.model().trim_end().to_string(),
        initialized: info.token_initialized(),
        free_private_memory: info.free_private_memory(),
        mechanisms,
    })
}

/// Initialise a token (SoftHSM/dev convenience): SO PIN, label, then the user PIN.
pub fn init_token(
    module: &Path,
    label: &str,
    so_pin: &SecretBytes,
    user_pin: &SecretBytes,
) -> Result<TokenSummary> {
    let m = load_module(module)?;
    let ctx = &m.ctx;
    let slots = ctx
        .get_all_slots()
        .map_err(|e| Error::BackendUnavailable(format!("listing slots: {e}")))?;
    // A free slot: a token present but not initialised (SoftHSM always offers one).
    let slot = slots
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
        .ok_or_else(|| Error::BackendUnavailable("no uninitialised token in this module".into()))?;
    let so = pin_of(so_pin)?;
    ctx.init_token(slot, &so, label)
        .map_err(|e| Error::BackendUnavailable(format!("initialising the token: {e}")))?;
    // The slot id may change after initialisation: find the token again by label.
    let cfg = TokenConfig {
        module: module.to_path_buf(),
        label: Some(label.to_string()),
        serial: None,
        pin: "prompt".into(),
        sessions: 1,
        timeout_ms: 2000,
    };
    let slot = find_slot(ctx, &cfg)?;
    let s = ctx
        .open_rw_session(slot)
        .map_err(|e| Error::BackendUnavailable(e.to_string()))?;
    s.login(UserType::So, Some(&so))
        .map_err(|e| Error::BadPassphrase(format!("SO login: {e}")))?;
    s.init_pin(&pin_of(user_pin)?)
        .map_err(|e| Error::BadPassphrase(format!("setting the user PIN: {e}")))?;
    s.logout().ok();
    summarize(ctx, slot)
}

/// What every private or secret key keyward puts on a token carries: a token object that
/// only signs, never leaves the token in clear, and is found by its label and random id.
fn private_attrs(label: &[u8], id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

fn pin_of(p: &SecretBytes) -> Result<AuthPin> {
    let s = std::str::from_utf8(p.expose())
        .map_err(|_| Error::BadPassphrase("the PIN is not UTF-8".into()))?;
    Ok(AuthPin::from(s.to_owned()))
}

fn new_id() -> Result<Vec<u8>> {
    let mut id = vec![0u8; 16];
    aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::Internal("random id".into()))?;
    Ok(id)
}

fn ec_params(t: KeyType) -> Result<&'static [u8]> {
    match t {
        KeyType::P256 => Ok(P256_PARAMS),
        KeyType::P384 => Ok(P384_PARAMS),
        KeyType::Secp256k1 => Ok(SECP256K1_PARAMS),
        KeyType::Ed25519 => Ok(ED25519_PARAMS),
        other => Err(Error::Unsupported(format!("{other} is not an EC key type"))),
    }
}

/// The first private or secret key object matching `tmpl`.
fn find_key(
    s: &Session,
    tmpl: &[Attribute],
) -> cryptoki::error::Result<Option<(ObjectHandle, ObjectClass)>> {
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::SECRET_KEY] {
        let mut t = tmpl.to_vec();
        t.push(Attribute::Class(class));
        if let Some(h) = s.find_objects(&t)?.into_iter().next() {
            return Ok(Some((h, class)));
        }
    }
    Ok(None)
}

/// keyward's key type of a token object.
fn describe(s: &Session, h: ObjectHandle, class: ObjectClass) -> cryptoki::error::Result<KeyType> {
    let attrs = s.get_attributes(h, &[AttributeType::KeyType])?;
    let kt = attrs.iter().find_map(|a| match a {
        Attribute::KeyType(k) => Some(*k),
        _ => None,
    });
    let unsupported = || CkError::NotSupported;
    match kt {
        Some(k) if k == CkKeyType::RSA => {
            let attrs = s.get_attributes(h, &[AttributeType::Modulus])?;
            let bits = attrs
                .iter()
                .find_map(|a| match a {
                    Attribute::Modulus(m) => Some(m.iter().skip_while(|b| **b == 0).count() * 8),
                    _ => None,
                })
                .ok_or_else(unsupported)?;
            KeyType::rsa_for_bits(bits).ok_or_else(unsupported)
        }
        Some(k) if k == CkKeyType::EC => {
            let attrs = s.get_attributes(h, &[AttributeType::EcParams])?;
            let params = attrs
                .iter()
                .find_map(|a| match a {
                    Attribute::EcParams(p) => Some(p.clone()),
                    _ => None,
                })
                .ok_or_else(unsupported)?;
            match params.as_slice() {
                p if p == P256_PARAMS => Ok(KeyType::P256),
                p if p == P384_PARAMS => Ok(KeyType::P384),
                p if p == SECP256K1_PARAMS => Ok(KeyType::Secp256k1),
                _ => Err(unsupported()),
            }
        }
        Some(k) if k == CkKeyType::EC_EDWARDS => Ok(KeyType::Ed25519),
        Some(k) if k == CkKeyType::GENERIC_SECRET && class == ObjectClass::SECRET_KEY => {
            Ok(KeyType::HmacSha256)
        }
        _ => Err(unsupported()),
    }
}

/// The SPKI of a key pair, from its private object (RSA) or its public object (EC/EdDSA).
fn public_spki_of(
    s: &Session,
    priv_h: ObjectHandle,
    id: &[u8],
    t: KeyType,
) -> cryptoki::error::Result<Vec<u8>> {
    let bad = || CkError::NotSupported;
    if t.is_rsa() {
        let attrs = s.get_attributes(
            priv_h,
            &[AttributeType::Modulus, AttributeType::PublicExponent],
        )?;
        let (mut n, mut e) = (None, None);
        for a in attrs {
            match a {
                Attribute::Modulus(v) => n = Some(v),
                Attribute::PublicExponent(v) => e = Some(v),
                _ => {}
            }
        }
        let (n, e) = (n.ok_or_else(bad)?, e.ok_or_else(bad)?);
        return crate::pubkey::rsa_spki(&n, &e).map_err(|_| bad());
    }
    let pubs = s.find_objects(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Id(id.to_vec()),
    ])?;
    let h = pubs.into_iter().next().ok_or_else(bad)?;
    let point = s
        .get_attributes(h, &[AttributeType::EcPoint])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or_else(bad)?;
    // CKA_EC_POINT is DER-wrapped: an OCTET STRING around the point.
    let raw = spki::der::asn1::OctetString::from_der(&point)
        .map(|o| o.as_bytes().to_vec())
        .unwrap_or(point);
    crate::pubkey::ec_spki(t, &raw).map_err(|_| bad())
}

/// Object templates for importing `m`: (private or secret object, public object).
type Templates = (Vec<Attribute>, Option<Vec<Attribute>>);

fn import_templates(t: KeyType, m: &SecretKeyMaterial, spki: Option<&[u8]>) -> Result<Templates> {
    if t.is_hmac() {
        // Tokens such as SoftHSM refuse HMAC keys shorter than the digest. HMAC zero-pads
        // short keys to its block size anyway, so a zero-padded key of 64 bytes gives the same
        // tags for SHA-256 and SHA-512 (docs/pkcs11.md).
        let mut v = m.expose().to_vec();
        if v.len() < 64 {
            v.resize(64, 0);
        }
        return Ok((
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(CkKeyType::GENERIC_SECRET),
                Attribute::Value(v),
                Attribute::Verify(true),
            ],
            None,
        ));
    }
    let bad = |e: &dyn std::fmt::Display| Error::InvalidKeyMaterial(format!("{t}: {e}"));
    let info = pkcs8::PrivateKeyInfo::from_der(m.expose()).map_err(|e| bad(&e))?;
    let raw_pub = match spki {
        Some(d) => crate::pubkey::raw_public_key(d)?,
        None => return Err(Error::Internal("asymmetric key without public key".into())),
    };
    if t.is_rsa() {
        let k = pkcs1::RsaPrivateKey::from_der(info.private_key).map_err(|e| bad(&e))?;
        let u = |x: pkcs1::UintRef<'_>| x.as_bytes().to_vec();
        let priv_t = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(CkKeyType::RSA),
            Attribute::Modulus(u(k.modulus)),
            Attribute::PublicExponent(u(k.public_exponent)),
            Attribute::PrivateExponent(u(k.private_exponent)),
            Attribute::Prime1(u(k.prime1)),
            Attribute::Prime2(u(k.prime2)),
            Attribute::Exponent1(u(k.exponent1)),
            Attribute::Exponent2(u(k.exponent2)),
            Attribute::Coefficient(u(k.coefficient)),
        ];
        let pub_t = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(CkKeyType::RSA),
            Attribute::Modulus(u(k.modulus)),
            Attribute::PublicExponent(u(k.public_exponent)),
        ];
        return Ok((priv_t, Some(pub_t)));
    }
    let (kt, scalar) = if t == KeyType::Ed25519 {
        let seed = spki::der::asn1::OctetString::from_der(info.private_key).map_err(|e| bad(&e))?;
        (CkKeyType::EC_EDWARDS, seed.as_bytes().to_vec())
    } else {
        let ec = sec1::EcPrivateKey::from_der(info.private_key).map_err(|e| bad(&e))?;
        (CkKeyType::EC, ec.private_key.to_vec())
    };
    let params = ec_params(t)?.to_vec();
    let point = spki::der::asn1::OctetString::new(raw_pub)
        .and_then(|o| o.to_der())
        .map_err(|e| bad(&e))?;
    Ok((
        vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(kt),
            Attribute::EcParams(params.clone()),
            Attribute::Value(scalar),
        ],
        Some(vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(kt),
            Attribute::EcParams(params),
            Attribute::EcPoint(point),
        ]),
    ))
}
