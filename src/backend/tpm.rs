//! TPM 2.0 backend (tss-esapi 7.x): keys are TPM-wrapped blobs in the home's keys/ directory
//! (or adopted persistent handles) and sign inside the TPM, one worker thread owning the context.
//!
//! Design (docs/tpm.md has the operator's view):
//! - A storage key (ECC P-256 SRK template, owner hierarchy) is derived from the TPM's owner
//!   seed on demand: the same template always gives the same key, so nothing about it is stored.
//! - Keys keyward creates or imports are children of it. Their TPM2B_PUBLIC / TPM2B_PRIVATE
//!   live in `keys/<name>.<version>.tpm`; the private part is encrypted to the storage key, so
//!   the file is useless on any other TPM (or after the owner hierarchy is cleared).
//! - The ESAPI context is not `Send` and the TPM is serial: one worker thread creates and owns
//!   it; requests reach it through a bounded channel and callers wait at most `timeout_ms`.
//! - swtpm has about three transient slots: the storage key stays loaded, at most
//!   `loaded_keys` keys stay loaded (LRU), everything else is loaded, used and flushed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use pkcs8::der::Decode;
use serde::{Deserialize, Serialize};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, EccParameter, EccPoint, EccScheme, EncryptedSecret, HashScheme,
    HashcheckTicket, HmacScheme, KeyDerivationFunctionScheme, KeyedHashScheme, MaxBuffer, Private,
    PrivateKeyRsa, Public, PublicBuffer, PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa,
    PublicKeyedHashParameters, PublicRsaParametersBuilder, RsaExponent, RsaScheme, Sensitive,
    SensitiveBuffer, SensitiveData, Signature as TpmSignature, SignatureScheme,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;

use super::material::{self, SecretKeyMaterial};
use super::{Backend, Health, KeySpec, NewKey, PublicInfo, Signature};
use crate::config::TpmConfig;
use crate::error::{Error, Result};
use crate::model::{Algorithm, BackendKind, KeyRef, KeyType};
use crate::secret::{SecretBytes, SecretSource};

/// Used when neither the config nor `$TPM2TOOLS_TCTI`/`$TCTI` names a TCTI.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// File name suffix of key blobs in the keys/ directory.
pub const BLOB_SUFFIX: &str = ".tpm";
/// Persistent handles that may be adopted (TPM 2.0 Part 2: persistent object range).
const PERSISTENT_FIRST: u32 = 0x8100_0000;
const PERSISTENT_LAST: u32 = 0x81FF_FFFF;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Key generation and import: RSA key generation on a real TPM takes seconds to a minute.
const SLOW_LIMIT: Duration = Duration::from_secs(180);
/// HMAC's block size for SHA-256 (128 for SHA-512); longer secrets are hashed first (RFC 2104).
const HMAC_BLOCK: usize = 64;
/// P-256 group order, for low-s normalisation.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// Recovery command printed when the TPM is in dictionary-attack lockout.
pub const LOCKOUT_HINT: &str =
    "the TPM is in dictionary-attack lockout; wait for the lockout interval or clear it with `tpm2_dictionarylockout --clear-lockout` (needs the lockout auth); keyward never retries";

/// Whether `s` is a TCTI string tss-esapi understands (config validation).
pub fn check_tcti(s: &str) -> Result<()> {
    TctiNameConf::from_str(s)
        .map(|_| ())
        .map_err(|e| Error::Config(format!("invalid TCTI {s:?}: {e}")))
}

/// The TCTI a config selects: its `tcti`, else `$TPM2TOOLS_TCTI`, `$TCTI`, else the device.
pub fn effective_tcti(cfg: &TpmConfig) -> String {
    cfg.tcti
        .clone()
        .or_else(|| std::env::var("TPM2TOOLS_TCTI").ok())
        .or_else(|| std::env::var("TCTI").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_TCTI.to_string())
}

/// Auth values read from the config's sources (once, at start or reload).
#[derive(Default)]
pub struct TpmAuth {
    pub owner: Option<SecretBytes>,
    pub key: Option<SecretBytes>,
}

impl TpmAuth {
    /// Read `owner_auth` and `key_auth` from their sources.
    pub fn read(alias: &str, cfg: &TpmConfig) -> Result<TpmAuth> {
        let read = |src: &Option<String>, what: &str| -> Result<Option<SecretBytes>> {
            src.as_deref()
                .map(|s| {
                    s.parse::<SecretSource>()?
                        .read(&format!("TPM `{alias}` {what}"))
                })
                .transpose()
        };
        Ok(TpmAuth {
            owner: read(&cfg.owner_auth, "owner auth")?,
            key: read(&cfg.key_auth, "key auth")?,
        })
    }
}

/// TPM facts for `keyward token list` and `doctor`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TpmSummary {
    pub alias: String,
    pub tcti: String,
    /// Four-character vendor id (e.g. `IBM`, `INTC`, `IFX`, `STM`).
    pub manufacturer: String,
    /// Vendor strings joined (e.g. `SW   TPM`).
    pub vendor: String,
    /// `major.minor.build.patch` from TPM_PT_FIRMWARE_VERSION_1/2.
    pub firmware_version: String,
    /// TPM 2.0 specification revision (e.g. `1.64`) and year.
    pub spec: String,
    pub algorithms: Vec<String>,
    pub ecc_curves: Vec<String>,
    /// Hash banks with at least one PCR allocated.
    pub pcr_banks: Vec<String>,
    pub transient_slots: Option<u32>,
    pub input_buffer: Option<u32>,
    pub lockout_counter: Option<u32>,
    pub max_auth_fail: Option<u32>,
    pub in_lockout: bool,
}

/// Parsed locator: a blob file in keys/ or a persistent handle.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Locator {
    Blob(String),
    Persistent(u32),
}

/// The file keyward writes for a TPM key (JSON): the TPM2B blobs in base64, as tpm2-tools'
/// `-u key.pub -r key.priv` files would hold them, plus what signing needs to know.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobFile {
    format: String,
    version: u32,
    key_type: KeyType,
    /// The parent template (only one so far).
    parent: String,
    /// Imported (not fixedTPM) or generated on the TPM (fixedTPM, fixedParent).
    imported: bool,
    /// Whether the key has an auth value (the configured `key_auth`).
    auth: bool,
    /// HMAC: the secret was longer than the digest's block and is stored as its hash (RFC 2104
    /// makes that the same key).
    #[serde(default)]
    hmac_prehashed: bool,
    /// Marshalled TPM2B_PUBLIC, base64.
    public: String,
    /// Marshalled TPM2B_PRIVATE, base64.
    private: String,
}

const BLOB_FORMAT: &str = "keyward-tpm-key";
const PARENT_SRK: &str = "owner/ecc-p256-srk";

/// A key as the worker needs it (read from disk on the caller's thread).
#[derive(Clone)]
struct KeyData {
    locator: String,
    source: KeySource,
    key_type: KeyType,
    auth: bool,
}

#[derive(Clone)]
enum KeySource {
    Blob { public: Public, private: Private },
    Persistent(u32),
}

/// One TPM, as configured under `[tpm.<alias>]`.
pub struct TpmBackend {
    alias: String,
    cfg: TpmConfig,
    tcti: String,
    keys_dir: PathBuf,
    tx: Sender<Job>,
    /// The TPM context and its loaded keys. The worker thread takes it for each queued job; a
    /// caller that finds it free with nothing queued may use it on its own thread
    /// ([`TpmBackend::idle_worker`]), saving two cross-thread wake-ups per signature.
    worker: Arc<Mutex<Worker>>,
    status: Arc<Mutex<Status>>,
    /// Parsed key blobs by locator. A blob file is written once and never changed (a new
    /// version is a new file), so it is read and parsed once, not on every signature.
    blobs: Mutex<HashMap<String, KeyData>>,
    /// Disconnected when the worker thread has dropped everything it owned.
    exited: Receiver<()>,
}

struct Status {
    connected: bool,
    last_error: Option<String>,
}

struct Job {
    deadline: Instant,
    run: Box<dyn FnOnce(&mut Worker) + Send>,
}

/// Longest a dropped backend waits for its worker to flush the TPM's objects.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Drop for TpmBackend {
    /// Without a resource manager (swtpm, /dev/tpm0) loaded objects outlive the process and
    /// fill the TPM's few transient slots, so a CLI command that exits must flush them first.
    /// The wait is bounded: a hung TPM must not hang the exit.
    fn drop(&mut self) {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        let job = Job {
            deadline: Instant::now() + CLOSE_WAIT,
            run: Box::new(move |w: &mut Worker| {
                if let Some(mut c) = w.conn.take() {
                    c.forget_all();
                }
                let _ = done_tx.send(());
            }),
        };
        if self.tx.try_send(job).is_ok() {
            let _ = done_rx.recv_timeout(CLOSE_WAIT);
        }
        // Let the worker finish and free its TSS state before the process may exit: the TSS
        // libraries' exit-time teardown racing a live worker corrupts the heap (seen as
        // SIGABRT at the end of CLI commands).
        let (closed, _) = crossbeam_channel::bounded::<Job>(0);
        drop(std::mem::replace(&mut self.tx, closed));
        let _ = self.exited.recv_timeout(CLOSE_WAIT);
    }
}

impl TpmBackend {
    /// Configure a TPM and start its worker. Connects now if possible; a TPM that is absent
    /// at start is retried with backoff on use, so other keys keep working.
    pub fn new(alias: &str, cfg: TpmConfig, keys_dir: &Path, auth: TpmAuth) -> Result<TpmBackend> {
        let b = TpmBackend::start(alias, cfg, keys_dir, auth)?;
        if let Err(e) = b.ping() {
            tracing::warn!(tpm = %b.alias, code = e.code(), "TPM not available yet: {e}");
        }
        Ok(b)
    }

    /// Connect now and report the error (CLI use).
    pub fn connect(
        alias: &str,
        cfg: TpmConfig,
        keys_dir: &Path,
        auth: TpmAuth,
    ) -> Result<TpmBackend> {
        let b = TpmBackend::start(alias, cfg, keys_dir, auth)?;
        b.ping()?;
        Ok(b)
    }

    fn start(alias: &str, cfg: TpmConfig, keys_dir: &Path, auth: TpmAuth) -> Result<TpmBackend> {
        let tcti = effective_tcti(&cfg);
        check_tcti(&tcti)?;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.queue.max(1));
        let status = Arc::new(Mutex::new(Status {
            connected: false,
            last_error: Some("not connected yet".into()),
        }));
        let worker = Worker {
            alias: alias.to_string(),
            tcti: tcti.clone(),
            owner_auth: to_auth(auth.owner.as_ref())?,
            key_auth: to_auth(auth.key.as_ref())?,
            loaded_keys: cfg.loaded_keys,
            conn: None,
            next_attempt: Instant::now(),
            backoff: FIRST_BACKOFF,
            auth_rejected: None,
            status: status.clone(),
        };
        let worker = Arc::new(Mutex::new(worker));
        let (exit_guard, exited) = crossbeam_channel::bounded::<()>(0);
        let owned = worker.clone();
        thread::Builder::new()
            .name(format!("keyward-tpm-{alias}"))
            .spawn(move || {
                Worker::run(&owned, rx);
                drop(exit_guard);
            })
            .map_err(|e| Error::Internal(format!("starting the TPM worker: {e}")))?;
        Ok(TpmBackend {
            alias: alias.to_string(),
            cfg,
            tcti,
            keys_dir: keys_dir.to_path_buf(),
            tx,
            worker,
            status,
            blobs: Mutex::new(HashMap::new()),
            exited,
        })
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn config(&self) -> &TpmConfig {
        &self.cfg
    }

    /// The TCTI in use (config, environment or the default device).
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    fn unavailable(&self, why: &str) -> Error {
        Error::BackendUnavailable(format!("tpm `{}`: {why}", self.alias))
    }

    /// Run `f` on the worker and wait at most `limit` for its answer. A full queue is `busy`;
    /// a TPM that does not answer in time is `backend_unavailable` (the job is skipped if the
    /// worker reaches it after its deadline).
    fn call<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl FnOnce(&mut Worker) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        let job = Job {
            deadline,
            run: Box::new(move |w| {
                let _ = rtx.send(f(w));
            }),
        };
        match self.tx.send_deadline(job, deadline) {
            Ok(()) => {}
            Err(SendTimeoutError::Timeout(_)) => {
                return Err(Error::Busy(format!(
                    "the queue of TPM `{}` is full",
                    self.alias
                )))
            }
            Err(SendTimeoutError::Disconnected(_)) => {
                return Err(Error::Internal(format!(
                    "the worker of TPM `{}` stopped",
                    self.alias
                )))
            }
        }
        match rrx.recv_deadline(deadline) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => Err(self
                .unavailable(&format!(
                    "no answer within {} ms (the TPM is busy or hangs)",
                    limit.as_millis()
                ))),
        }
    }

    /// One round trip to the TPM (connecting if needed).
    fn ping(&self) -> Result<()> {
        self.call(self.limit(), |w| {
            w.with_conn(|c| {
                c.ctx
                    .get_tpm_property(PropertyTag::Manufacturer)
                    .map(|_| ())
                    .map_err(classify)
            })
        })
    }

    /// TPM facts for `keyward token list` (manufacturer, firmware, algorithms, PCR banks).
    pub fn describe(&self) -> Result<TpmSummary> {
        let alias = self.alias.clone();
        let tcti = self.tcti.clone();
        self.call(self.limit(), move |w| {
            w.with_conn(|c| summarize(&mut c.ctx, &alias, &tcti).map_err(classify))
        })
    }

    fn key_ref(&self, loc: &Locator) -> KeyRef {
        let rest = match loc {
            Locator::Blob(f) => f.clone(),
            Locator::Persistent(h) => format!("{h:#010x}"),
        };
        KeyRef {
            backend: BackendKind::Tpm,
            locator: format!("{}:{rest}", self.alias),
        }
    }

    fn parse_locator(&self, key: &KeyRef) -> Result<Locator> {
        let bad = || Error::Internal(format!("invalid tpm locator {:?}", key.locator));
        let (alias, rest) = key.locator.split_once(':').ok_or_else(bad)?;
        if key.backend != BackendKind::Tpm || alias != self.alias {
            return Err(bad());
        }
        if let Some(hex) = rest.strip_prefix("0x") {
            let h = u32::from_str_radix(hex, 16).map_err(|_| bad())?;
            return Ok(Locator::Persistent(h));
        }
        let plain = !rest.is_empty()
            && !rest.starts_with('.')
            && rest.ends_with(BLOB_SUFFIX)
            && !rest.contains('/');
        if !plain {
            return Err(bad());
        }
        Ok(Locator::Blob(rest.to_string()))
    }

    /// Whether `key` lives on this TPM.
    pub fn owns(&self, key: &KeyRef) -> bool {
        key.backend == BackendKind::Tpm
            && key
                .locator
                .split_once(':')
                .is_some_and(|(a, _)| a == self.alias)
    }

    /// The blob file of a key version: `<keys dir>/<name>.<version>.tpm`.
    pub fn blob_path(&self, spec: &KeySpec) -> PathBuf {
        self.keys_dir.join(blob_file_name(spec))
    }

    fn blob_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyData>> {
        self.blobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key_data(&self, key: &KeyRef) -> Result<KeyData> {
        match self.parse_locator(key)? {
            Locator::Persistent(h) => Ok(KeyData {
                locator: key.locator.clone(),
                source: KeySource::Persistent(h),
                // Learned from the TPM when the handle is first used.
                key_type: KeyType::P256,
                auth: true,
            }),
            Locator::Blob(file) => {
                if let Some(d) = self.blob_cache().get(&key.locator) {
                    return Ok(d.clone());
                }
                let path = self.keys_dir.join(&file);
                let text = std::fs::read(&path).map_err(|e| {
                    self.unavailable(&format!("reading key blob {}: {e}", path.display()))
                })?;
                let (blob, public, private) = parse_blob(&text)
                    .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
                let data = KeyData {
                    locator: key.locator.clone(),
                    source: KeySource::Blob { public, private },
                    key_type: blob.key_type,
                    auth: blob.auth,
                };
                self.blob_cache().insert(key.locator.clone(), data.clone());
                Ok(data)
            }
        }
    }

    /// Public information of a key (blob keys need no TPM round trip).
    pub fn public_info(&self, key: &KeyRef) -> Result<(KeyType, PublicInfo)> {
        let data = self.key_data(key)?;
        match &data.source {
            KeySource::Blob { public, .. } => {
                let info = public_info_of(&self.alias, data.key_type, public, None)?;
                Ok((data.key_type, info))
            }
            KeySource::Persistent(h) => {
                let (t, info, _) = self.read_persistent(*h)?;
                Ok((t, info))
            }
        }
    }

    /// Load a key into the TPM and let it go again (`keyward doctor`): a blob stops loading
    /// once the owner hierarchy was cleared or on another TPM, which reading the file misses.
    pub fn probe(&self, key: &KeyRef) -> Result<()> {
        let data = self.key_data(key)?;
        self.call(self.limit(), move |w| {
            w.with_conn(|c| {
                let (h, flush_after) = c.handle_of(&data)?;
                if flush_after {
                    let _ = c.ctx.flush_context(h);
                }
                Ok(())
            })
        })
    }

    fn read_persistent(&self, handle: u32) -> Result<(KeyType, PublicInfo, Public)> {
        if !(PERSISTENT_FIRST..=PERSISTENT_LAST).contains(&handle) {
            return Err(Error::BadRequest(format!(
                "{handle:#010x} is not a persistent handle (0x81000000-0x81ffffff)"
            )));
        }
        let alias = self.alias.clone();
        let public = self.call(self.limit(), move |w| {
            w.with_conn(|c| {
                let h = c.persistent(handle)?;
                let (public, _, _) = c.ctx.read_public(h.into()).map_err(classify)?;
                Ok(public)
            })
            .map_err(|e| match e {
                Error::BackendUnavailable(m) if m.contains("no persistent object") => {
                    Error::UnknownKey(format!("{handle:#010x} on TPM `{alias}`"))
                }
                other => other,
            })
        })?;
        let t = key_type_of(&public)?;
        let info = public_info_of(&self.alias, t, &public, Some(handle))?;
        Ok((t, info, public))
    }

    /// Adopt a key another tool (tpm2-tools) made persistent at `handle` (0x81xxxxxx). It must
    /// be an unrestricted signing key: RSA, ECC P-256 or a keyed-hash (HMAC) key.
    pub fn adopt(&self, handle: u32) -> Result<(KeyRef, KeyType, PublicInfo)> {
        let (t, info, public) = self.read_persistent(handle)?;
        let attrs = public.object_attributes();
        if !attrs.sign_encrypt() {
            return Err(Error::Unsupported(format!(
                "the object at {handle:#010x} is not a signing key (create it with the sign attribute)"
            )));
        }
        if attrs.restricted() {
            return Err(Error::Unsupported(format!(
                "the key at {handle:#010x} is restricted: it signs only digests the TPM hashed itself; create it without `restricted`"
            )));
        }
        Ok((self.key_ref(&Locator::Persistent(handle)), t, info))
    }

    fn store_blob(&self, spec: &KeySpec, blob: &BlobFile) -> Result<KeyRef> {
        let file = blob_file_name(spec);
        let json = serde_json::to_vec_pretty(blob)
            .map_err(|e| Error::Internal(format!("encoding the key blob: {e}")))?;
        // Never overwrite: a blob is the only copy of a TPM key.
        crate::home::atomic_create(&self.keys_dir.join(&file), &json)?;
        Ok(self.key_ref(&Locator::Blob(file)))
    }

    /// Whether the TPM rejected an auth value (the backend then waits for a reload).
    /// The key and the bytes the TPM signs (a digest, or the HMAC message), checked before
    /// anything is sent to the TPM.
    fn sign_input(&self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<(KeyData, Vec<u8>)> {
        let data = self.key_data(key)?;
        if !matches!(data.source, KeySource::Persistent(_)) && !data.key_type.supports(alg) {
            return Err(Error::BadRequest(format!(
                "scheme {alg} does not fit this {} key",
                data.key_type
            )));
        }
        let input = prepare_input(alg, msg)?;
        Ok((data, input))
    }

    /// The TPM context when it is connected, free, and no job waits for it: `None` otherwise
    /// (the caller then signs through the queue as usual). Lets the agent sign a lone request
    /// on the thread that read it; the caller must bound the call itself (the agent's
    /// watchdog does), since a TPM that hangs holds that thread.
    pub fn idle_worker(&self) -> Option<IdleWorker<'_>> {
        if !self.tx.is_empty() {
            return None;
        }
        let worker = self.worker.try_lock().ok()?;
        if worker.conn.is_none() || worker.auth_rejected.is_some() {
            return None;
        }
        Some(IdleWorker {
            backend: self,
            worker,
        })
    }

    pub fn auth_rejected(&self) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("rejected the auth value"))
    }
}

impl Backend for TpmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tpm
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.limit())
    }

    fn health(&self) -> Health {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if s.connected {
            Health::Up
        } else {
            Health::Down(
                s.last_error
                    .clone()
                    .unwrap_or_else(|| "not connected".into()),
            )
        }
    }

    fn generate(&self, spec: &KeySpec) -> Result<NewKey> {
        let t = spec.key_type;
        // Refuse types a TPM cannot hold before touching the TPM or the keys directory.
        key_template(t, false, false)?;
        let path = self.blob_path(spec);
        if path.exists() {
            return Err(Error::AlreadyExists(format!("{} exists", path.display())));
        }
        let (public, private, auth) = self.call(SLOW_LIMIT, move |w| {
            let auth = w.key_auth.clone();
            let template = key_template(t, auth.is_some(), false)?;
            w.with_conn(|c| {
                let parent = c.primary()?;
                let r = c
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.create(parent, template.clone(), auth.clone(), None, None, None)
                    })
                    .map_err(classify)?;
                Ok((r.out_public, r.out_private, auth.is_some()))
            })
        })?;
        let blob = make_blob(t, false, auth, false, &public, &private)?;
        let key_ref = self.store_blob(spec, &blob)?;
        let info = public_info_of(&self.alias, t, &public, None)?;
        Ok(NewKey {
            key_ref,
            public: info,
        })
    }

    fn import(&self, spec: &KeySpec, secret: SecretKeyMaterial) -> Result<NewKey> {
        super::check_material(spec, &secret)?;
        let t = spec.key_type;
        let path = self.blob_path(spec);
        if path.exists() {
            return Err(Error::AlreadyExists(format!("{} exists", path.display())));
        }
        let spki = material::public_spki(&secret)?;
        let fingerprint = match &spki {
            Some(d) => crate::pubkey::fingerprint(d),
            None => material::hmac_fingerprint(secret.expose()),
        };
        let prepared = prepare_import(t, &secret, spki.as_deref())?;
        let hmac_prehashed = prepared.hmac_prehashed;
        let (public, private, auth) = self.call(SLOW_LIMIT, move |w| {
            let auth = w.key_auth.clone();
            let (public, sensitive) = prepared.into_tpm(auth.clone())?;
            let duplicate = SensitiveBuffer::try_from(sensitive)
                .and_then(|b| b.marshall())
                .and_then(Private::try_from)
                .map_err(|e| Error::Internal(format!("encoding the key for the TPM: {e}")))?;
            w.with_conn(|c| {
                let parent = c.primary()?;
                // No outer or inner wrapper: the duplicate is the plain TPM2B_SENSITIVE
                // (TPM2_Import allows that for objects without encryptedDuplication).
                let private = c
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.import(
                            parent.into(),
                            None,
                            public.clone(),
                            duplicate.clone(),
                            EncryptedSecret::default(),
                            SymmetricDefinitionObject::Null,
                        )
                    })
                    .map_err(classify)?;
                // Load once: the TPM checks that the public and private halves belong
                // together before keyward writes a blob it could not use.
                let h = c
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.load(parent, private.clone(), public.clone())
                    })
                    .map_err(classify)?;
                let _ = c.ctx.flush_context(h.into());
                Ok((public.clone(), private, auth.is_some()))
            })
        })?;
        let blob = make_blob(t, true, auth, hmac_prehashed, &public, &private)?;
        let key_ref = self.store_blob(spec, &blob)?;
        let mut info = public_info_of(&self.alias, t, &public, None)?;
        info.fingerprint = fingerprint;
        Ok(NewKey {
            key_ref,
            public: info,
        })
    }

    fn sign(&self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        let (data, input) = self.sign_input(key, alg, msg)?;
        self.call(self.limit(), move |w| {
            w.with_conn(|c| c.sign(&data, alg, &input))
        })
    }

    fn delete(&self, key: &KeyRef) -> Result<()> {
        match self.parse_locator(key)? {
            // A blob is the key: removing it destroys the key (the TPM holds no copy).
            Locator::Blob(file) => {
                self.blob_cache().remove(&key.locator);
                let locator = key.locator.clone();
                // Forget a loaded copy; a TPM that is down has none worth flushing.
                let _ = self.call(self.limit(), move |w| {
                    if let Some(c) = w.conn.as_mut() {
                        c.forget(&locator);
                    }
                    Ok(())
                });
                crate::home::remove_durably(&self.keys_dir.join(file))
            }
            // Adopted objects belong to whoever made them persistent: keyward forgets the
            // key but leaves the object (evict it with `tpm2_evictcontrol -c <handle>`).
            Locator::Persistent(_) => Ok(()),
        }
    }
}

/// The TPM context, taken by a caller while it was free (see [`TpmBackend::idle_worker`]).
pub struct IdleWorker<'a> {
    backend: &'a TpmBackend,
    worker: std::sync::MutexGuard<'a, Worker>,
}

impl IdleWorker<'_> {
    /// `Backend::sign` without the queue: the same checks, key loading and failure handling
    /// as the worker thread's. Blocks for the TPM call.
    pub fn sign(mut self, key: &KeyRef, alg: Algorithm, msg: &[u8]) -> Result<Signature> {
        let (data, input) = self.backend.sign_input(key, alg, msg)?;
        self.worker.with_conn(|c| c.sign(&data, alg, &input))
    }
}

fn blob_file_name(spec: &KeySpec) -> String {
    format!("{}.{}{BLOB_SUFFIX}", spec.name.as_str(), spec.version)
}

pub(crate) fn to_auth(s: Option<&SecretBytes>) -> Result<Option<Auth>> {
    s.map(|b| {
        Auth::try_from(b.expose().to_vec())
            .map_err(|_| Error::BadPassphrase("a TPM auth value may have at most 64 bytes".into()))
    })
    .transpose()
}

/// What a TPM call found out.
enum Failure {
    /// The TPM or its connection is gone: drop the context, reconnect with backoff.
    Gone(String),
    /// A handle keyward holds is no longer valid or the TPM is out of slots (someone else
    /// flushed it, or another process filled the slots): drop loaded objects, retry once.
    Stale(String),
    /// The TPM refused an auth value: never retried (each failure counts toward lockout).
    AuthRejected(String),
    /// Any other error; the connection stays.
    Other(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

/// The raw TSS2_RC of an error. tss-esapi 7 drops the layer when it decodes a response code,
/// but its Display of the two formats prints the whole value, so it is read back from there.
pub(crate) fn raw_rc(rc: &Tss2ResponseCode) -> Option<u32> {
    let s = match rc {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(z) => z.to_string(),
        Tss2ResponseCode::FormatOne(o) => o.to_string(),
    };
    let hex = s.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

fn classify(e: tss_esapi::Error) -> Failure {
    let rc = match e {
        tss_esapi::Error::WrapperError(k) => {
            return Failure::Other(Error::BadRequest(format!("TPM request refused: {k}")))
        }
        tss_esapi::Error::Tss2Error(rc) => rc,
    };
    let raw = raw_rc(&rc).unwrap_or(0);
    let layer = raw >> 16;
    if layer != 0 {
        // TCTI, ESYS, SYS, MU or resource-manager layer: the connection or the context's
        // command state is broken (e.g. swtpm killed: TCTI I/O error). Start afresh.
        return Failure::Gone(format!("TSS error {raw:#x} ({})", tss_layer(layer)));
    }
    let what = format!("TPM error {raw:#x}: {rc}");
    use Tss2ResponseCodeKind as K;
    match rc.kind() {
        Some(K::Lockout) => Failure::Other(Error::BackendUnavailable(format!(
            "{LOCKOUT_HINT} ({what})"
        ))),
        Some(K::AuthFail | K::BadAuth) => Failure::AuthRejected(what),
        Some(
            K::ObjectMemory
            | K::ObjectHandles
            | K::SessionMemory
            | K::SessionHandles
            | K::ReferenceH0
            | K::ReferenceH1
            | K::ReferenceH2
            | K::Handle
            | K::ContextGap,
        ) => Failure::Stale(what),
        Some(K::Initialize | K::Failure | K::Reboot | K::Retry | K::Testing | K::Canceled) => {
            Failure::Gone(what)
        }
        Some(K::Integrity) => Failure::Other(Error::BackendUnavailable(format!(
            "the key blob does not belong to this TPM: it was made by another TPM, or this TPM's owner hierarchy was cleared ({what})"
        ))),
        Some(K::Binding | K::KeySize | K::Key | K::EccPoint) => Failure::Other(
            Error::InvalidKeyMaterial(format!("the TPM refused the key: {what}")),
        ),
        Some(
            K::Asymmetric
            | K::Curve
            | K::Scheme
            | K::Hash
            | K::Mgf
            | K::Mode
            | K::Type
            | K::Symmetric
            | K::Kdf
            | K::Attributes,
        ) => Failure::Other(Error::Unsupported(format!(
            "backend tpm does not support this: {what}"
        ))),
        Some(K::Size | K::Value | K::Range | K::Insufficient) => {
            Failure::Other(Error::BadRequest(format!("the TPM refused the input: {what}")))
        }
        _ => Failure::Other(Error::BackendUnavailable(what)),
    }
}

fn tss_layer(layer: u32) -> &'static str {
    match layer {
        6 => "FAPI",
        7 => "ESYS",
        8 => "SYS",
        9 => "MU",
        10 => "TCTI: connection to the TPM lost",
        11 => "resource manager",
        12 => "resource manager (TPM)",
        _ => "TSS",
    }
}

/// The worker: owns the ESAPI context (not `Send`, so it is created on this thread).
struct Worker {
    alias: String,
    tcti: String,
    owner_auth: Option<Auth>,
    key_auth: Option<Auth>,
    loaded_keys: usize,
    conn: Option<Conn>,
    next_attempt: Instant,
    backoff: Duration,
    /// Set when the TPM refused an auth value; cleared only by a new backend (reload).
    auth_rejected: Option<String>,
    status: Arc<Mutex<Status>>,
}

struct Conn {
    ctx: Context,
    primary: Option<KeyHandle>,
    /// Loaded blob keys, most recently used last: (locator, handle).
    loaded: Vec<(String, KeyHandle)>,
    /// ESYS handles of persistent objects used so far.
    persistent: HashMap<u32, ObjectHandle>,
    max_loaded: usize,
    owner_auth: Option<Auth>,
    key_auth: Option<Auth>,
}

impl Worker {
    fn run(me: &Mutex<Worker>, rx: Receiver<Job>) {
        let lock = || me.lock().unwrap_or_else(|p| p.into_inner());
        while let Ok(job) = rx.recv() {
            // A caller on its own thread may hold the context (a hung TPM holds it long).
            let mut w = lock();
            // Its caller has given up: do not sign something nobody will receive.
            if Instant::now() >= job.deadline {
                continue;
            }
            (job.run)(&mut w);
        }
        // Every sender is gone (backend dropped): flush what is loaded and close, here, so
        // the TSS state is freed on this thread before it exits (see `TpmBackend::drop`).
        if let Some(mut c) = lock().conn.take() {
            c.forget_all();
        }
    }

    fn unavailable(&self, why: &str) -> Error {
        Error::BackendUnavailable(format!("tpm `{}`: {why}", self.alias))
    }

    fn set_status(&self, connected: bool, err: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.connected = connected;
        s.last_error = err;
    }

    fn connect(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            if Instant::now() < self.next_attempt {
                let why = self
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not connected".into());
                return Err(self.unavailable(&why));
            }
            match self.open() {
                Ok(c) => {
                    self.conn = Some(c);
                    self.backoff = FIRST_BACKOFF;
                    self.set_status(true, None);
                    tracing::info!(tpm = %self.alias, tcti = %self.tcti, "TPM connected");
                }
                Err(e) => {
                    self.lost(e.to_string());
                    return Err(self.unavailable(&e.to_string()));
                }
            }
        }
        self.conn
            .as_mut()
            .ok_or_else(|| Error::Internal("TPM connection vanished".into()))
    }

    /// The connection failed: back off before the next attempt (200 ms doubling to 30 s).
    fn lost(&mut self, why: String) {
        self.conn = None;
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.set_status(false, Some(why));
    }

    fn open(&self) -> Result<Conn> {
        let conf = TctiNameConf::from_str(&self.tcti)
            .map_err(|e| Error::Config(format!("invalid TCTI {:?}: {e}", self.tcti)))?;
        let ctx = Context::new(conf)
            .map_err(|e| Error::BackendUnavailable(format!("connecting to {}: {e}", self.tcti)))?;
        let mut c = Conn {
            ctx,
            primary: None,
            loaded: Vec::new(),
            persistent: HashMap::new(),
            max_loaded: self.loaded_keys,
            owner_auth: self.owner_auth.clone(),
            key_auth: self.key_auth.clone(),
        };
        // A round trip, so "connected" means the TPM answers (a TCTI can open lazily).
        c.ctx
            .get_tpm_property(PropertyTag::Manufacturer)
            .map_err(|e| Error::BackendUnavailable(format!("{}: {e}", self.tcti)))?;
        if let Some(a) = &c.owner_auth {
            c.ctx
                .tr_set_auth(ObjectHandle::Owner, a.clone())
                .map_err(|e| Error::Internal(format!("setting the owner auth: {e}")))?;
        }
        Ok(c)
    }

    /// Run `f` on the live connection. Stale handles are dropped and `f` retried once; a
    /// lost connection is dropped and reported `backend_unavailable` (reconnect later).
    fn with_conn<T>(
        &mut self,
        mut f: impl FnMut(&mut Conn) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        if let Some(why) = &self.auth_rejected {
            return Err(self.unavailable(why));
        }
        let mut retried = false;
        loop {
            let c = self.connect()?;
            match f(c) {
                Ok(v) => return Ok(v),
                Err(Failure::Stale(why)) if !retried => {
                    c.forget_all();
                    tracing::debug!(tpm = %self.alias, "stale TPM objects ({why}); reloading");
                    retried = true;
                }
                Err(Failure::Stale(why)) => {
                    c.forget_all();
                    return Err(self.unavailable(&why));
                }
                Err(Failure::Gone(why)) => {
                    tracing::warn!(tpm = %self.alias, "TPM lost: {why}; reconnecting with backoff");
                    // Dropping the context may try to flush over a dead link: harmless.
                    self.lost(why.clone());
                    return Err(self.unavailable(&why));
                }
                Err(Failure::AuthRejected(what)) => {
                    let why = format!(
                        "the TPM rejected the auth value ({what}); fix key_auth/owner_auth and run `keyward reload` (keyward never retries: each failure counts toward the TPM's dictionary-attack lockout)"
                    );
                    self.auth_rejected = Some(why.clone());
                    self.set_status(false, Some(why.clone()));
                    return Err(Error::BadPassphrase(format!("tpm `{}`: {why}", self.alias)));
                }
                Err(Failure::Other(e)) => return Err(e),
            }
        }
    }
}

impl Conn {
    /// The storage key, created from the fixed template on first use (deterministic from the
    /// owner seed, so every connection gets the same key).
    fn primary(&mut self) -> std::result::Result<KeyHandle, Failure> {
        if let Some(h) = self.primary {
            return Ok(h);
        }
        let r = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
            })
            .map_err(classify)?;
        self.primary = Some(r.key_handle);
        Ok(r.key_handle)
    }

    fn persistent(&mut self, handle: u32) -> std::result::Result<ObjectHandle, Failure> {
        if let Some(h) = self.persistent.get(&handle) {
            return Ok(*h);
        }
        let tpm_handle = PersistentTpmHandle::new(handle)
            .map(TpmHandle::Persistent)
            .map_err(|e| Failure::Other(Error::BadRequest(format!("{handle:#x}: {e}"))))?;
        let h = self.ctx.tr_from_tpm_public(tpm_handle).map_err(|e| {
            match classify(e) {
                // TPM_RC_HANDLE from ReadPublic: nothing is persisted there.
                Failure::Stale(_) => Failure::Other(Error::BackendUnavailable(format!(
                    "no persistent object at {handle:#010x}"
                ))),
                other => other,
            }
        })?;
        if let Some(a) = &self.key_auth {
            self.ctx
                .tr_set_auth(h, a.clone())
                .map_err(|e| Failure::Other(Error::Internal(format!("setting key auth: {e}"))))?;
        }
        self.persistent.insert(handle, h);
        Ok(h)
    }

    /// The loaded handle of a key (loading a blob under the storage key if needed).
    fn handle_of(&mut self, key: &KeyData) -> std::result::Result<(ObjectHandle, bool), Failure> {
        match &key.source {
            KeySource::Persistent(h) => Ok((self.persistent(*h)?, false)),
            KeySource::Blob { public, private } => {
                if let Some(i) = self.loaded.iter().position(|(l, _)| *l == key.locator) {
                    let entry = self.loaded.remove(i);
                    let h = entry.1;
                    self.loaded.push(entry);
                    return Ok((h.into(), false));
                }
                let parent = self.primary()?;
                let h = self
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.load(parent, private.clone(), public.clone())
                    })
                    .map_err(classify)?;
                if key.auth {
                    if let Some(a) = &self.key_auth {
                        self.ctx.tr_set_auth(h.into(), a.clone()).map_err(|e| {
                            Failure::Other(Error::Internal(format!("setting key auth: {e}")))
                        })?;
                    }
                }
                if self.max_loaded == 0 {
                    return Ok((h.into(), true));
                }
                while self.loaded.len() >= self.max_loaded {
                    let (_, old) = self.loaded.remove(0);
                    let _ = self.ctx.flush_context(old.into());
                }
                self.loaded.push((key.locator.clone(), h));
                Ok((h.into(), false))
            }
        }
    }

    fn sign(
        &mut self,
        key: &KeyData,
        alg: Algorithm,
        input: &[u8],
    ) -> std::result::Result<Signature, Failure> {
        let (h, flush_after) = self.handle_of(key)?;
        let r = self.sign_loaded(h, key, alg, input);
        if flush_after {
            let _ = self.ctx.flush_context(h);
        }
        r
    }

    fn sign_loaded(
        &mut self,
        h: ObjectHandle,
        key: &KeyData,
        alg: Algorithm,
        input: &[u8],
    ) -> std::result::Result<Signature, Failure> {
        let hash = |a| HashScheme::new(a);
        let scheme = match alg {
            Algorithm::HmacSha256 | Algorithm::HmacSha512 => {
                let hash_alg = if alg == Algorithm::HmacSha256 {
                    HashingAlgorithm::Sha256
                } else {
                    HashingAlgorithm::Sha512
                };
                if key.key_type.is_hmac() && hash_alg != hmac_hash(key.key_type) {
                    return Err(Failure::Other(Error::Unsupported(format!(
                        "backend tpm does not support {alg} with this {} key: a TPM HMAC key is bound to its digest (import the secret again as {})",
                        key.key_type,
                        if hash_alg == HashingAlgorithm::Sha512 { "hmac-sha512" } else { "hmac-sha256" }
                    ))));
                }
                let buf = MaxBuffer::try_from(input.to_vec()).map_err(|_| {
                    Failure::Other(Error::BadRequest(format!(
                        "the TPM computes HMAC over at most 1024 bytes, got {}",
                        input.len()
                    )))
                })?;
                let tag = self
                    .ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.hmac(h, buf.clone(), hash_alg)
                    })
                    .map_err(classify)?;
                return Ok(Signature::plain(tag.value().to_vec()));
            }
            Algorithm::RsaPkcs1Sha256 => SignatureScheme::RsaSsa {
                hash_scheme: hash(HashingAlgorithm::Sha256),
            },
            Algorithm::RsaPkcs1Sha512 => SignatureScheme::RsaSsa {
                hash_scheme: hash(HashingAlgorithm::Sha512),
            },
            Algorithm::RsaPssSha256 => SignatureScheme::RsaPss {
                hash_scheme: hash(HashingAlgorithm::Sha256),
            },
            Algorithm::RsaPssSha512 => SignatureScheme::RsaPss {
                hash_scheme: hash(HashingAlgorithm::Sha512),
            },
            Algorithm::EcdsaP256Sha256 => SignatureScheme::EcDsa {
                hash_scheme: hash(HashingAlgorithm::Sha256),
            },
            other => {
                return Err(Failure::Other(super::unsupported(
                    BackendKind::Tpm,
                    &format!("signing with {other}"),
                )))
            }
        };
        let digest = Digest::try_from(input.to_vec())
            .map_err(|_| Failure::Other(Error::Internal("digest length".into())))?;
        let sig = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.sign(h.into(), digest.clone(), scheme, null_ticket()?)
            })
            .map_err(classify)?;
        match sig {
            TpmSignature::RsaSsa(s) | TpmSignature::RsaPss(s) => {
                Ok(Signature::plain(s.signature().value().to_vec()))
            }
            TpmSignature::EcDsa(s) => {
                let r = left_pad(s.signature_r().value(), 32)?;
                let s = left_pad(s.signature_s().value(), 32)?;
                let mut out = r;
                out.extend_from_slice(&low_s(&s));
                Ok(Signature::plain(out))
            }
            _ => Err(Failure::Other(Error::Internal(
                "the TPM returned an unexpected signature type".into(),
            ))),
        }
    }

    fn forget(&mut self, locator: &str) {
        if let Some(i) = self.loaded.iter().position(|(l, _)| l == locator) {
            let (_, h) = self.loaded.remove(i);
            let _ = self.ctx.flush_context(h.into());
        }
    }

    /// Flush every transient object keyward loaded (and the storage key); close persistent
    /// handles' ESYS objects. Errors are ignored: the objects may already be gone.
    fn forget_all(&mut self) {
        for (_, h) in std::mem::take(&mut self.loaded) {
            let _ = self.ctx.flush_context(h.into());
        }
        if let Some(p) = self.primary.take() {
            let _ = self.ctx.flush_context(p.into());
        }
        for (_, mut h) in std::mem::take(&mut self.persistent) {
            let _ = self.ctx.tr_close(&mut h);
        }
    }
}

/// A ticket that says "not hashed by the TPM": enough for unrestricted keys.
pub(crate) fn null_ticket() -> tss_esapi::Result<HashcheckTicket> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
}

/// What the TPM is given to sign: the digest (hashed here), or the message itself for HMAC.
fn prepare_input(alg: Algorithm, msg: &[u8]) -> Result<Vec<u8>> {
    use aws_lc_rs::digest::{digest, SHA256, SHA512};
    Ok(match alg {
        Algorithm::RsaPkcs1Sha256 | Algorithm::RsaPssSha256 | Algorithm::EcdsaP256Sha256 => {
            digest(&SHA256, msg).as_ref().to_vec()
        }
        Algorithm::RsaPkcs1Sha512 | Algorithm::RsaPssSha512 => {
            digest(&SHA512, msg).as_ref().to_vec()
        }
        Algorithm::HmacSha256 | Algorithm::HmacSha512 => {
            if msg.len() > 1024 {
                return Err(Error::BadRequest(format!(
                    "the TPM computes HMAC over at most 1024 bytes (TPM2_HMAC input limit), got {}",
                    msg.len()
                )));
            }
            msg.to_vec()
        }
        other => {
            return Err(super::unsupported(
                BackendKind::Tpm,
                &format!("signing with {other}"),
            ))
        }
    })
}

fn left_pad(v: &[u8], n: usize) -> std::result::Result<Vec<u8>, Failure> {
    let v = &v[v.iter().take_while(|b| **b == 0).count()..];
    if v.len() > n {
        return Err(Failure::Other(Error::Internal(
            "ECDSA component longer than the curve".into(),
        )));
    }
    let mut out = vec![0u8; n - v.len()];
    out.extend_from_slice(v);
    Ok(out)
}

/// `s` or `n - s`, whichever is smaller (both verify; low-s is what most verifiers prefer and
/// the form keyward returns for every backend).
fn low_s(s: &[u8]) -> Vec<u8> {
    let mut half = [0u8; 32];
    // n >> 1
    let mut carry = 0u8;
    for (i, b) in P256_ORDER.iter().enumerate() {
        half[i] = (b >> 1) | (carry << 7);
        carry = b & 1;
    }
    if s <= &half[..] {
        return s.to_vec();
    }
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = P256_ORDER[i] as i16 - s[i] as i16 - borrow;
        borrow = if d < 0 {
            d += 256;
            1
        } else {
            0
        };
        out[i] = d as u8;
    }
    out.to_vec()
}

/// The storage key template (TCG "ECC P-256 SRK"): a restricted decryption key with
/// AES-128-CFB, noDA (it has no auth value to guess), derived from the owner seed.
pub(crate) fn srk_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                tss_esapi::structures::SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(vec![0u8; 32])?,
            EccParameter::try_from(vec![0u8; 32])?,
        ))
        .build()
}

/// The public template of a key keyward creates (`imported = false`: fixedTPM, fixedParent,
/// sensitiveDataOrigin) or imports (TPM2_Import requires fixedTPM and fixedParent clear; the
/// key still cannot leave the TPM: its empty authPolicy makes TPM2_Duplicate impossible).
/// The RSA scheme is NULL so one key signs both RSASSA and RSAPSS; ECC keys are ECDSA-SHA256
/// and HMAC keys name their digest (TPMs require a scheme for sign-only keyed-hash keys).
fn key_template(t: KeyType, with_auth: bool, imported: bool) -> Result<Public> {
    let tss = |e: tss_esapi::Error| Error::Internal(format!("TPM template: {e}"));
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(!imported)
        .with_fixed_parent(!imported)
        .with_sensitive_data_origin(!imported)
        .with_user_with_auth(true)
        // Without an auth value there is nothing to guess: keep such keys out of the
        // dictionary-attack logic (so a lockout never stops them).
        .with_no_da(!with_auth)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .with_restricted(false)
        .build()
        .map_err(tss)?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs);
    let public = match t {
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            let bits = match t {
                KeyType::Rsa2048 => RsaKeyBits::Rsa2048,
                KeyType::Rsa3072 => RsaKeyBits::Rsa3072,
                _ => RsaKeyBits::Rsa4096,
            };
            builder
                .with_public_algorithm(PublicAlgorithm::Rsa)
                .with_rsa_parameters(
                    PublicRsaParametersBuilder::new()
                        .with_scheme(RsaScheme::Null)
                        .with_key_bits(bits)
                        .with_exponent(RsaExponent::default())
                        .with_is_signing_key(true)
                        .with_is_decryption_key(false)
                        .with_restricted(false)
                        .with_symmetric(SymmetricDefinitionObject::Null)
                        .build()
                        .map_err(tss)?,
                )
                .with_rsa_unique_identifier(PublicKeyRsa::default())
                .build()
        }
        KeyType::P256 => builder
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(true)
                    .with_is_decryption_key(false)
                    .with_restricted(false)
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .build()
                    .map_err(tss)?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build(),
        KeyType::HmacSha256 | KeyType::HmacSha512 => builder
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Hmac {
                hmac_scheme: HmacScheme::new(hmac_hash(t)),
            }))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build(),
        other => {
            return Err(super::unsupported(
                BackendKind::Tpm,
                &format!("{other} keys (TPMs have RSA, ECC P-256 and HMAC keys)"),
            ))
        }
    };
    public.map_err(tss)
}

/// The digest of an HMAC key type. A TPM HMAC key (sign set, decrypt clear) must name its
/// scheme, and TPM2_HMAC then refuses other digests: on a TPM the type fixes the digest.
fn hmac_hash(t: KeyType) -> HashingAlgorithm {
    if t == KeyType::HmacSha512 {
        HashingAlgorithm::Sha512
    } else {
        HashingAlgorithm::Sha256
    }
}

/// Key material turned into what the TPM needs, computed before the worker is involved.
struct PreparedImport {
    key_type: KeyType,
    /// RSA: modulus, exponent, one prime. ECC: x, y, scalar. HMAC: the (possibly hashed) key.
    parts: Vec<zeroize::Zeroizing<Vec<u8>>>,
    exponent: u32,
    hmac_prehashed: bool,
}

fn prepare_import(
    t: KeyType,
    m: &SecretKeyMaterial,
    spki: Option<&[u8]>,
) -> Result<PreparedImport> {
    use zeroize::Zeroizing;
    let bad = |e: &dyn std::fmt::Display| Error::InvalidKeyMaterial(format!("{t}: {e}"));
    if t.is_hmac() {
        let secret = m.expose();
        let (block, digest_alg) = if t == KeyType::HmacSha512 {
            (128, &aws_lc_rs::digest::SHA512)
        } else {
            (HMAC_BLOCK, &aws_lc_rs::digest::SHA256)
        };
        let (key, prehashed) = if secret.len() > block {
            // RFC 2104: a key longer than the block is replaced by its hash. TPMs cap
            // keyed-hash keys (128 bytes in the reference code), so store the equivalent key.
            let d = aws_lc_rs::digest::digest(digest_alg, secret);
            (Zeroizing::new(d.as_ref().to_vec()), true)
        } else {
            (Zeroizing::new(secret.to_vec()), false)
        };
        return Ok(PreparedImport {
            key_type: t,
            parts: vec![key],
            exponent: 0,
            hmac_prehashed: prehashed,
        });
    }
    let info = pkcs8::PrivateKeyInfo::from_der(m.expose()).map_err(|e| bad(&e))?;
    if t.is_rsa() {
        let k = pkcs1::RsaPrivateKey::from_der(info.private_key).map_err(|e| bad(&e))?;
        let e = k.public_exponent.as_bytes();
        if e.len() > 4 {
            return Err(bad(&"public exponent does not fit 32 bits"));
        }
        let exponent = e.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        return Ok(PreparedImport {
            key_type: t,
            parts: vec![
                Zeroizing::new(k.modulus.as_bytes().to_vec()),
                Zeroizing::new(k.prime1.as_bytes().to_vec()),
            ],
            exponent,
            hmac_prehashed: false,
        });
    }
    if t != KeyType::P256 {
        return Err(super::unsupported(
            BackendKind::Tpm,
            &format!("{t} keys (TPMs have RSA, ECC P-256 and HMAC keys)"),
        ));
    }
    let ec = sec1::EcPrivateKey::from_der(info.private_key).map_err(|e| bad(&e))?;
    let point = crate::pubkey::raw_public_key(
        spki.ok_or_else(|| Error::Internal("EC key without public key".into()))?,
    )?;
    if point.len() != 65 || point[0] != 4 {
        return Err(bad(&"expected an uncompressed P-256 point"));
    }
    Ok(PreparedImport {
        key_type: t,
        parts: vec![
            Zeroizing::new(point[1..33].to_vec()),
            Zeroizing::new(point[33..].to_vec()),
            Zeroizing::new(left_pad_plain(ec.private_key, 32)),
        ],
        exponent: 0,
        hmac_prehashed: false,
    })
}

fn left_pad_plain(v: &[u8], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n.saturating_sub(v.len())];
    out.extend_from_slice(v);
    out
}

impl PreparedImport {
    /// The public area and sensitive area for TPM2_Import.
    fn into_tpm(self, auth: Option<Auth>) -> Result<(Public, Sensitive)> {
        let tss = |e: tss_esapi::Error| Error::InvalidKeyMaterial(format!("TPM import: {e}"));
        let template = key_template(self.key_type, auth.is_some(), true)?;
        let auth_value = auth.unwrap_or_default();
        let part = |i: usize| self.parts[i].to_vec();
        match template {
            Public::Rsa {
                object_attributes,
                name_hashing_algorithm,
                auth_policy,
                parameters,
                ..
            } => {
                let parameters = PublicRsaParametersBuilder::new()
                    .with_scheme(parameters.rsa_scheme())
                    .with_key_bits(parameters.key_bits())
                    .with_exponent(if self.exponent == 65537 {
                        RsaExponent::default()
                    } else {
                        RsaExponent::create(self.exponent).map_err(tss)?
                    })
                    .with_is_signing_key(true)
                    .with_restricted(false)
                    .with_symmetric(SymmetricDefinitionObject::Null)
                    .build()
                    .map_err(tss)?;
                let public = Public::Rsa {
                    object_attributes,
                    name_hashing_algorithm,
                    auth_policy,
                    parameters,
                    unique: PublicKeyRsa::try_from(part(0)).map_err(tss)?,
                };
                let sensitive = Sensitive::Rsa {
                    auth_value,
                    seed_value: Digest::default(),
                    sensitive: PrivateKeyRsa::try_from(part(1)).map_err(tss)?,
                };
                Ok((public, sensitive))
            }
            Public::Ecc {
                object_attributes,
                name_hashing_algorithm,
                auth_policy,
                parameters,
                ..
            } => {
                let public = Public::Ecc {
                    object_attributes,
                    name_hashing_algorithm,
                    auth_policy,
                    parameters,
                    unique: EccPoint::new(
                        EccParameter::try_from(part(0)).map_err(tss)?,
                        EccParameter::try_from(part(1)).map_err(tss)?,
                    ),
                };
                let sensitive = Sensitive::Ecc {
                    auth_value,
                    seed_value: Digest::default(),
                    sensitive: EccParameter::try_from(part(2)).map_err(tss)?,
                };
                Ok((public, sensitive))
            }
            Public::KeyedHash {
                object_attributes,
                name_hashing_algorithm,
                auth_policy,
                parameters,
                ..
            } => {
                // The public `unique` of a keyed-hash object is H(seedValue ‖ key): it names
                // the key without revealing it; the seed is random so equal keys differ.
                let mut seed = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut seed)
                    .map_err(|_| Error::Internal("random seed".into()))?;
                let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
                ctx.update(&seed);
                ctx.update(&self.parts[0]);
                let unique = ctx.finish().as_ref().to_vec();
                let public = Public::KeyedHash {
                    object_attributes,
                    name_hashing_algorithm,
                    auth_policy,
                    parameters,
                    unique: Digest::try_from(unique).map_err(tss)?,
                };
                let sensitive = Sensitive::Bits {
                    auth_value,
                    seed_value: Digest::try_from(seed).map_err(tss)?,
                    sensitive: SensitiveData::try_from(part(0)).map_err(tss)?,
                };
                Ok((public, sensitive))
            }
            Public::SymCipher { .. } => Err(Error::Internal("unexpected template".into())),
        }
    }
}

fn make_blob(
    t: KeyType,
    imported: bool,
    auth: bool,
    hmac_prehashed: bool,
    public: &Public,
    private: &Private,
) -> Result<BlobFile> {
    let (public, private) = encode_pair(public, private)?;
    Ok(BlobFile {
        format: BLOB_FORMAT.into(),
        version: 1,
        key_type: t,
        parent: PARENT_SRK.into(),
        imported,
        auth,
        hmac_prehashed,
        public,
        private,
    })
}

/// A key object's two halves as stored in keyward's files: base64 of the marshalled
/// TPM2B_PUBLIC and of TPM2B_PRIVATE (big-endian u16 size, then the TPM-encrypted bytes),
/// the layout of tpm2-tools' `-u`/`-r` files.
pub(crate) fn encode_pair(public: &Public, private: &Private) -> Result<(String, String)> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let pub_bytes = PublicBuffer::try_from(public.clone())
        .and_then(|b| b.marshall())
        .map_err(|e| Error::Internal(format!("marshalling TPM2B_PUBLIC: {e}")))?;
    let p = private.value();
    let len = u16::try_from(p.len()).map_err(|_| Error::Internal("private blob size".into()))?;
    let mut priv_bytes = len.to_be_bytes().to_vec();
    priv_bytes.extend_from_slice(p);
    Ok((b64.encode(pub_bytes), b64.encode(priv_bytes)))
}

/// Inverse of [`encode_pair`]; the error names the malformed part (callers add what file).
pub(crate) fn decode_pair(
    public: &str,
    private: &str,
) -> std::result::Result<(Public, Private), String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let pub_bytes = b64.decode(public).map_err(|_| "public".to_string())?;
    let public = PublicBuffer::unmarshall(&pub_bytes)
        .and_then(Public::try_from)
        .map_err(|e| format!("TPM2B_PUBLIC: {e}"))?;
    let priv_bytes = b64.decode(private).map_err(|_| "private".to_string())?;
    if priv_bytes.len() < 2
        || usize::from(u16::from_be_bytes([priv_bytes[0], priv_bytes[1]])) != priv_bytes.len() - 2
    {
        return Err("TPM2B_PRIVATE size".into());
    }
    let private =
        Private::try_from(priv_bytes[2..].to_vec()).map_err(|e| format!("TPM2B_PRIVATE: {e}"))?;
    Ok((public, private))
}

fn parse_blob(text: &[u8]) -> Result<(BlobFile, Public, Private)> {
    let bad = |what: &str| Error::Internal(format!("malformed TPM key blob: {what}"));
    let blob: BlobFile = serde_json::from_slice(text).map_err(|e| bad(&e.to_string()))?;
    if blob.format != BLOB_FORMAT || blob.version != 1 || blob.parent != PARENT_SRK {
        return Err(bad("unknown format, version or parent"));
    }
    let (public, private) = decode_pair(&blob.public, &blob.private).map_err(|e| bad(&e))?;
    Ok((blob, public, private))
}

/// A key blob file as keyward stored it (for `keyward bench`'s raw tss-esapi baseline, which
/// loads the same blob under the same storage key itself).
pub(crate) struct StoredBlob {
    pub key_type: KeyType,
    /// Whether the key has an auth value (the configured `key_auth`).
    pub auth: bool,
    pub public: Public,
    pub private: Private,
}

/// Read and parse a key blob file (`keys/<name>.<version>.tpm`).
pub(crate) fn read_blob(path: &Path) -> Result<StoredBlob> {
    let text =
        std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let (blob, public, private) =
        parse_blob(&text).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    Ok(StoredBlob {
        key_type: blob.key_type,
        auth: blob.auth,
        public,
        private,
    })
}

/// The blob file name of a locator `<alias>:<name>.<version>.tpm` on TPM `alias` (`None` for
/// other TPMs, persistent handles and anything that is not a plain file name in keys/).
pub(crate) fn blob_in_locator(locator: &str, alias: &str) -> Option<String> {
    let (a, rest) = locator.split_once(':')?;
    let plain = a == alias
        && !rest.is_empty()
        && !rest.starts_with('.')
        && rest.ends_with(BLOB_SUFFIX)
        && !rest.contains('/');
    plain.then(|| rest.to_string())
}

/// keyward's key type of a TPM public area.
fn key_type_of(public: &Public) -> Result<KeyType> {
    match public {
        Public::Rsa { parameters, .. } => {
            let bits = match parameters.key_bits() {
                RsaKeyBits::Rsa2048 => 2048,
                RsaKeyBits::Rsa3072 => 3072,
                RsaKeyBits::Rsa4096 => 4096,
                RsaKeyBits::Rsa1024 => 1024,
            };
            KeyType::rsa_for_bits(bits).ok_or_else(|| {
                Error::Unsupported(format!("backend tpm does not support RSA-{bits} keys"))
            })
        }
        Public::Ecc { parameters, .. } if parameters.ecc_curve() == EccCurve::NistP256 => {
            Ok(KeyType::P256)
        }
        Public::Ecc { parameters, .. } => Err(Error::Unsupported(format!(
            "backend tpm does not support curve {:?}",
            parameters.ecc_curve()
        ))),
        Public::KeyedHash { .. } => Ok(KeyType::HmacSha256),
        Public::SymCipher { .. } => Err(Error::Unsupported(
            "backend tpm does not sign with symmetric cipher keys".into(),
        )),
    }
}

/// SPKI and fingerprint of a TPM public area.
fn public_info_of(
    alias: &str,
    t: KeyType,
    public: &Public,
    handle: Option<u32>,
) -> Result<PublicInfo> {
    match public {
        Public::Rsa {
            parameters, unique, ..
        } => {
            let e = match parameters.exponent().value() {
                0 => 65537,
                e => e,
            };
            let spki = crate::pubkey::rsa_spki(unique.value(), &e.to_be_bytes())?;
            Ok(PublicInfo {
                fingerprint: crate::pubkey::fingerprint(&spki),
                spki_der: Some(spki),
            })
        }
        Public::Ecc { unique, .. } => {
            let mut point = vec![4u8];
            point.extend(left_pad_plain(unique.x().value(), 32));
            point.extend(left_pad_plain(unique.y().value(), 32));
            let spki = crate::pubkey::ec_spki(KeyType::P256, &point)?;
            Ok(PublicInfo {
                fingerprint: crate::pubkey::fingerprint(&spki),
                spki_der: Some(spki),
            })
        }
        Public::KeyedHash { unique, .. } => {
            // H(seed ‖ key) with a random seed: identifies this TPM object, not the secret.
            let id = match handle {
                Some(h) => format!("{h:#010x}"),
                None => hex::encode(&unique.value()[..unique.value().len().min(16)]),
            };
            Ok(PublicInfo {
                spki_der: None,
                fingerprint: format!("TPM:{alias}:{id}"),
            })
        }
        Public::SymCipher { .. } => Err(Error::Unsupported(format!(
            "backend tpm does not support {t} here"
        ))),
    }
}

fn summarize(ctx: &mut Context, alias: &str, tcti: &str) -> tss_esapi::Result<TpmSummary> {
    let mut prop = |t| ctx.get_tpm_property(t);
    let chars = |v: Option<u32>| -> String {
        v.map(|x| {
            x.to_be_bytes()
                .iter()
                .filter(|b| b.is_ascii_graphic() || **b == b' ')
                .map(|b| *b as char)
                .collect::<String>()
        })
        .unwrap_or_default()
    };
    let manufacturer = chars(prop(PropertyTag::Manufacturer)?).trim().to_string();
    let mut vendor = String::new();
    for t in [
        PropertyTag::VendorString1,
        PropertyTag::VendorString2,
        PropertyTag::VendorString3,
        PropertyTag::VendorString4,
    ] {
        vendor.push_str(&chars(prop(t)?));
    }
    let fw1 = prop(PropertyTag::FirmwareVersion1)?.unwrap_or(0);
    let fw2 = prop(PropertyTag::FirmwareVersion2)?.unwrap_or(0);
    let firmware_version = format!(
        "{}.{}.{}.{}",
        fw1 >> 16,
        fw1 & 0xffff,
        fw2 >> 16,
        fw2 & 0xffff
    );
    let rev = prop(PropertyTag::Revision)?.unwrap_or(0);
    let year = prop(PropertyTag::Year)?.unwrap_or(0);
    let spec = format!("2.0 rev {}.{:02} ({year})", rev / 100, rev % 100);
    let transient_slots = prop(PropertyTag::HrTransientMin)?;
    let input_buffer = prop(PropertyTag::InputBuffer)?;
    let lockout_counter = prop(PropertyTag::LockoutCounter)?;
    let max_auth_fail = prop(PropertyTag::MaxAuthFail)?;
    // TPMA_PERMANENT bit 9: inLockout.
    let in_lockout = prop(PropertyTag::Permanent)?.is_some_and(|p| p & (1 << 9) != 0);

    let mut algorithms = Vec::new();
    if let (CapabilityData::Algorithms(list), _) =
        ctx.get_capability(CapabilityType::Algorithms, 0, 128)?
    {
        for a in list.iter() {
            algorithms.push(format!("{:?}", a.algorithm_identifier()).to_lowercase());
        }
    }
    let mut ecc_curves = Vec::new();
    if let (CapabilityData::EccCurves(list), _) =
        ctx.get_capability(CapabilityType::EccCurves, 0, 64)?
    {
        for c in list.iter() {
            ecc_curves.push(format!("{c:?}").to_lowercase());
        }
    }
    let mut pcr_banks = Vec::new();
    if let (CapabilityData::AssignedPcr(list), _) =
        ctx.get_capability(CapabilityType::AssignedPcr, 0, 16)?
    {
        for s in list.get_selections() {
            if !s.is_empty() {
                pcr_banks.push(format!("{:?}", s.hashing_algorithm()).to_lowercase());
            }
        }
    }
    Ok(TpmSummary {
        alias: alias.to_string(),
        tcti: tcti.to_string(),
        manufacturer,
        vendor: vendor.trim().to_string(),
        firmware_version,
        spec,
        algorithms,
        ecc_curves,
        pcr_banks,
        transient_slots,
        input_buffer,
        lockout_counter,
        max_auth_fail,
        in_lockout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_s_flips_high_s_only() {
        let small = [1u8; 32];
        assert_eq!(low_s(&small), small.to_vec());
        let mut high = P256_ORDER;
        high[31] -= 1; // n - 1 → 1
        let mut one = [0u8; 32];
        one[31] = 1;
        assert_eq!(low_s(&high), one.to_vec());
    }

    #[test]
    fn raw_rc_reads_the_layer() {
        // TCTI layer (10) I/O error, as tss2-tcti-swtpm reports a dead socket.
        let e = classify(tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(
            0x000a_000a,
        )));
        assert!(matches!(e, Failure::Gone(_)));
    }
}
