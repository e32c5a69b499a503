//! `keyward bench`'s measurement: sign round trips through the agent's socket, in-process,
//! through OpenSSH's ssh-agent and, for token keys, raw cryptoki calls on the same token (for TPM
//! keys, raw tss-esapi calls on the same TPM), all with the same loop; latencies and throughput,
//! no printing.

pub mod in_process;
pub mod machine;
pub mod pipelined;
pub mod raw_pkcs11;
pub mod raw_tpm;
pub mod report;
pub mod ssh_agent;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::backend::pkcs11::Pkcs11Backend;
use crate::backend::tpm::TpmBackend;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::model::{Algorithm, KeyName, KeyRef, KeyType};

pub use in_process::InProcessKey;
pub use machine::Machine;
pub use raw_pkcs11::RawToken;
pub use raw_tpm::RawTpm;
pub use report::Report;
pub use stats::Stats;

/// Size of the message every request signs (the first 8 bytes carry a request counter).
pub const MESSAGE_LEN: usize = 100;
/// Time each client signs before measuring starts (connections made, caches and workers warm).
pub const WARMUP: Duration = Duration::from_millis(200);
/// How often (in requests) a client adds its count to the shared progress counter.
const PROGRESS_BATCH: u64 = 64;

/// What a case signs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// C_Sign through `cryptoki` straight on the token, one session per thread (token keys).
    RawPkcs11,
    /// TPM2_Sign through `tss-esapi` straight on the TPM, the key blob loaded once per case,
    /// one ESAPI context per thread (TPM keys).
    RawTpm,
    /// The agent's backend called directly in the bench process (the baseline): the soft
    /// backend with the key file, or the pkcs11 backend connected to the token.
    InProcess,
    /// The keyward agent over its socket.
    Keyward,
    /// OpenSSH's ssh-agent holding the same key.
    SshAgent,
}

impl Target {
    pub const ALL: [Target; 5] = [
        Target::RawPkcs11,
        Target::RawTpm,
        Target::InProcess,
        Target::Keyward,
        Target::SshAgent,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Target::RawPkcs11 => "raw cryptoki",
            Target::RawTpm => "raw tss-esapi",
            Target::InProcess => "in-process",
            Target::Keyward => "keyward socket",
            Target::SshAgent => "ssh-agent",
        }
    }
}

/// How long each client of a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Duration(Duration),
    /// Requests per client.
    Requests(u64),
}

impl Limit {
    pub fn describe(self) -> String {
        match self {
            Limit::Duration(d) => format!("{} s", d.as_secs_f64()),
            Limit::Requests(n) => format!("{n} requests per client"),
        }
    }
}

/// One client's measurements: every latency (ns) and when it started and stopped.
struct ClientRun {
    latencies: Vec<u64>,
    start: Instant,
    end: Instant,
}

enum ClientFailure {
    Failed(Error),
    /// Stopped because another client of the case failed.
    Aborted,
}

/// Every latency (ns) of one or more runs of a case and their summed wall time, so runs of the
/// same case in several rounds fold into one set of statistics.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub latencies: Vec<u64>,
    pub elapsed: Duration,
    /// CPU time (user + system) the agent process and this process spent during the runs.
    pub agent_cpu: Option<Duration>,
    pub own_cpu: Option<Duration>,
}

impl Samples {
    pub fn extend(&mut self, other: Samples) {
        self.latencies.extend_from_slice(&other.latencies);
        self.elapsed += other.elapsed;
        let add = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (x, None) | (None, x) => x,
        };
        self.agent_cpu = add(self.agent_cpu, other.agent_cpu);
        self.own_cpu = add(self.own_cpu, other.own_cpu);
    }

    pub fn stats(&mut self) -> Stats {
        Stats::from_latencies(&mut self.latencies, self.elapsed)
    }

    /// CPU µs per request: (agent, this process).
    pub fn cpu_per_request_us(&self) -> (Option<f64>, Option<f64>) {
        let n = self.latencies.len() as f64;
        let per = |d: Option<Duration>| d.filter(|_| n > 0.0).map(|d| d.as_secs_f64() * 1e6 / n);
        (per(self.agent_cpu), per(self.own_cpu))
    }
}

/// User + system CPU time of a process from /proc (`None` where unreadable). Resolution is
/// the clock tick (10 ms); a case of thousands of requests over seconds makes that negligible.
pub fn process_cpu(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // /proc reports clock ticks of USER_HZ, which is 100 on every Linux architecture.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Run `clients` threads, each with its own signer from `make(i)`, signing sequentially until
/// `limit`; every request's latency is recorded. `progress` counts completed requests (batched).
/// The first error from any client stops the case and is returned.
pub fn drive<S, F>(clients: usize, limit: Limit, make: F, progress: &AtomicU64) -> Result<Stats>
where
    F: Fn(usize) -> Result<S> + Sync,
    S: FnMut(&[u8]) -> Result<()>,
{
    drive_samples(clients, limit, make, progress).map(|mut s| s.stats())
}

/// [`drive`], returning the latencies instead of their statistics.
pub fn drive_samples<S, F>(
    clients: usize,
    limit: Limit,
    make: F,
    progress: &AtomicU64,
) -> Result<Samples>
where
    F: Fn(usize) -> Result<S> + Sync,
    S: FnMut(&[u8]) -> Result<()>,
{
    if clients == 0 {
        return Err(Error::BadRequest("a case needs at least one client".into()));
    }
    let barrier = Barrier::new(clients);
    let stop = AtomicBool::new(false);
    let outcomes: Vec<std::result::Result<ClientRun, ClientFailure>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let (make, barrier, stop) = (&make, &barrier, &stop);
                s.spawn(move || one_client(i, limit, make, barrier, stop, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ClientFailure::Failed(Error::Internal(
                        "a benchmark client thread panicked".into(),
                    )))
                })
            })
            .collect()
    });
    let mut all = Vec::new();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut aborted = false;
    for o in outcomes {
        match o {
            Ok(ClientRun {
                latencies,
                start,
                end,
            }) => {
                all.extend_from_slice(&latencies);
                first = Some(first.map_or(start, |f| f.min(start)));
                last = Some(last.map_or(end, |l| l.max(end)));
            }
            Err(ClientFailure::Failed(e)) => return Err(e),
            Err(ClientFailure::Aborted) => aborted = true,
        }
    }
    if aborted {
        return Err(Error::Internal("benchmark case aborted".into()));
    }
    let elapsed = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f),
        _ => Duration::ZERO,
    };
    Ok(Samples {
        latencies: all,
        elapsed,
        agent_cpu: None,
        own_cpu: None,
    })
}

fn one_client<S, F>(
    i: usize,
    limit: Limit,
    make: &F,
    barrier: &Barrier,
    stop: &AtomicBool,
    progress: &AtomicU64,
) -> std::result::Result<ClientRun, ClientFailure>
where
    F: Fn(usize) -> Result<S> + Sync,
    S: FnMut(&[u8]) -> Result<()>,
{
    let fail = |e: Error| {
        stop.store(true, Ordering::Relaxed);
        ClientFailure::Failed(e)
    };
    let mut msg = [0u8; MESSAGE_LEN];
    for (j, b) in msg.iter_mut().enumerate() {
        *b = b'a' + (j % 26) as u8;
    }
    // Connect and warm up; every client reaches the barrier exactly once, even on failure.
    let prepared = make(i).and_then(|mut signer| {
        let t = Instant::now();
        while t.elapsed() < WARMUP && !stop.load(Ordering::Relaxed) {
            signer(&msg)?;
        }
        Ok(signer)
    });
    let prepared = prepared.map_err(fail);
    barrier.wait();
    let mut signer = prepared?;
    if stop.load(Ordering::Relaxed) {
        return Err(ClientFailure::Aborted);
    }

    let (deadline_after, max) = match limit {
        Limit::Duration(d) => (Some(d), u64::MAX),
        Limit::Requests(n) => (None, n),
    };
    let mut lat = Vec::with_capacity(match limit {
        Limit::Requests(n) => usize::try_from(n).unwrap_or(0).min(1 << 24),
        Limit::Duration(d) => (d.as_secs_f64() * 20_000.0) as usize,
    });
    let start = Instant::now();
    let deadline = deadline_after.map(|d| start + d);
    let mut done = 0u64;
    while done < max {
        msg[..8].copy_from_slice(&done.to_be_bytes());
        let t0 = Instant::now();
        signer(&msg).map_err(fail)?;
        let t1 = Instant::now();
        lat.push(t1.duration_since(t0).as_nanos() as u64);
        done += 1;
        if done.is_multiple_of(PROGRESS_BATCH) {
            progress.fetch_add(PROGRESS_BATCH, Ordering::Relaxed);
            if stop.load(Ordering::Relaxed) {
                return Err(ClientFailure::Aborted);
            }
        }
        if deadline.is_some_and(|d| t1 >= d) {
            break;
        }
    }
    let end = Instant::now();
    progress.fetch_add(done % PROGRESS_BATCH, Ordering::Relaxed);
    if stop.load(Ordering::Relaxed) {
        return Err(ClientFailure::Aborted);
    }
    Ok(ClientRun {
        latencies: lat,
        start,
        end,
    })
}

/// A key the agent holds matched to an ssh-agent identity (same public key).
#[derive(Clone, Debug)]
pub struct SshIdentity {
    pub blob: Vec<u8>,
    pub flags: u32,
    pub comment: String,
}

/// One key to benchmark and the paths it can be signed through.
pub struct BenchKey {
    pub name: KeyName,
    pub key_type: KeyType,
    pub scheme: Algorithm,
    pub fingerprint: String,
    pub in_process: Option<InProcessKey>,
    pub ssh: Option<SshIdentity>,
    pub raw: Option<RawKey>,
    pub raw_tpm: Option<RawTpmKey>,
}

/// A token key for the raw cryptoki path: the token and the key's CKA_ID.
#[derive(Clone)]
pub struct RawKey {
    pub token: Arc<RawToken>,
    pub id: Vec<u8>,
}

/// A TPM key for the raw tss-esapi path: the TPM and the key's blob file.
#[derive(Clone)]
pub struct RawTpmKey {
    pub tpm: Arc<RawTpm>,
    pub blob: PathBuf,
}

/// TPM keys to benchmark against raw tss-esapi calls, found by the caller in the home's key
/// metadata (the blob file is the part after `:` in a tpm locator).
pub struct TpmKeys {
    pub raw: Arc<RawTpm>,
    /// keyward's tpm backend connected from this process, for the in-process path.
    pub backend: Option<Arc<TpmBackend>>,
    pub keys: Vec<(KeyName, KeyRef, PathBuf)>,
}

/// Token keys to benchmark against raw cryptoki calls, found by the caller in the home's
/// key metadata (the CKA_ID is the hex after `:` in a pkcs11 locator).
pub struct TokenKeys {
    pub raw: Arc<RawToken>,
    /// keyward's pkcs11 backend connected from this process, for the in-process path.
    pub backend: Option<Arc<Pkcs11Backend>>,
    pub keys: Vec<(KeyName, KeyRef, Vec<u8>)>,
}

impl BenchKey {
    pub fn has(&self, t: Target) -> bool {
        match t {
            Target::RawPkcs11 => self.raw.is_some(),
            Target::RawTpm => self.raw_tpm.is_some(),
            Target::Keyward => true,
            Target::InProcess => self.in_process.is_some(),
            Target::SshAgent => self.ssh.is_some(),
        }
    }
}

/// What the agent said about itself (from `status`, when it answers).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub agent_version: String,
    pub pid: u32,
    pub workers: usize,
    pub backends: Vec<String>,
}

/// Everything needed to run the cases.
pub struct Plan {
    pub socket: PathBuf,
    pub ssh_agent: Option<PathBuf>,
    pub agent: Option<AgentInfo>,
    pub keys: Vec<BenchKey>,
    /// Cross-checks done before measuring (same key on every path, signatures verify).
    pub checks: Vec<String>,
    /// Keys skipped and why.
    pub notes: Vec<String>,
}

/// What to benchmark.
pub struct PlanOptions<'a> {
    pub socket: &'a Path,
    /// Keys to benchmark; empty = every usable key the agent lists.
    pub keys: &'a [KeyName],
    /// Key files to sign with in-process, by key name.
    pub in_process: &'a [(KeyName, PathBuf)],
    /// An ssh-agent socket to compare against.
    pub ssh_agent: Option<&'a Path>,
    /// Token keys to also sign with raw cryptoki calls (and keyward's backend in-process).
    pub tokens: &'a [TokenKeys],
    /// TPM keys to also sign with raw tss-esapi calls (and keyward's backend in-process).
    pub tpms: &'a [TpmKeys],
    /// Signature scheme per key instead of the key type's default.
    pub schemes: &'a [(KeyName, Algorithm)],
}

/// Ask the agent which keys to use, load in-process keys, match ssh-agent identities, and
/// check that every path signs with the same key.
pub fn plan(opts: &PlanOptions<'_>) -> Result<Plan> {
    let mut client = Client::connect(opts.socket)?;
    client.set_timeout(Some(Duration::from_secs(30)))?;
    let listed = client.list_keys()?;
    let agent = client.status().ok().map(|s| AgentInfo {
        agent_version: s.agent_version,
        pid: s.pid,
        workers: s.workers,
        backends: s.backends.into_iter().map(|b| b.kind).collect(),
    });
    let mut notes = Vec::new();
    let mut selected = Vec::new();
    if opts.keys.is_empty() {
        for k in &listed {
            if k.disabled || k.locked {
                let why = if k.disabled { "disabled" } else { "locked" };
                notes.push(format!("key `{}` skipped: {why}", k.name));
            } else {
                selected.push(k.clone());
            }
        }
    } else {
        for name in opts.keys {
            let k = listed
                .iter()
                .find(|k| k.name == name.as_str())
                .ok_or_else(|| Error::UnknownKey(name.to_string()))?;
            selected.push(k.clone());
        }
    }
    if selected.is_empty() {
        return Err(Error::UnknownKey(
            "the agent holds no usable key to benchmark; create one with `keyward key generate`"
                .into(),
        ));
    }
    for (name, _) in opts.in_process {
        if !selected.iter().any(|k| k.name == name.as_str()) {
            return Err(Error::BadRequest(format!(
                "--in-process names key `{name}`, which is not being benchmarked"
            )));
        }
    }
    for (name, _) in opts.schemes {
        if !selected.iter().any(|k| k.name == name.as_str()) {
            return Err(Error::BadRequest(format!(
                "--scheme names key `{name}`, which is not being benchmarked"
            )));
        }
    }

    let mut ssh = match opts.ssh_agent {
        Some(p) => {
            let mut a = ssh_agent::SshAgent::connect(p)?;
            let ids = a.identities()?;
            Some((a, ids))
        }
        None => None,
    };

    let mut keys = Vec::new();
    let mut checks = Vec::new();
    for info in selected {
        let name = KeyName::new(&info.name)?;
        let key_type: KeyType = info.key_type.parse()?;
        let scheme = match opts.schemes.iter().find(|(n, _)| *n == name) {
            Some((_, s)) if key_type.supports(*s) => *s,
            Some((_, s)) => {
                return Err(Error::BadRequest(format!(
                    "--scheme {s} does not fit key `{name}` ({key_type})"
                )))
            }
            None => key_type.default_algorithm(),
        };
        let on_token = opts.tokens.iter().find_map(|t| {
            t.keys
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, r, id)| (t, r, id))
        });
        let raw = on_token.map(|(t, _, id)| RawKey {
            token: t.raw.clone(),
            id: id.clone(),
        });
        let on_tpm = opts.tpms.iter().find_map(|t| {
            t.keys
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, r, blob)| (t, r, blob))
        });
        let raw_tpm = on_tpm.map(|(t, _, blob)| RawTpmKey {
            tpm: t.raw.clone(),
            blob: blob.clone(),
        });
        // The TPM's few transient slots are shared by every path: each check below starts
        // with an empty TPM (the path that signs loads what it needs).
        let evict = || match &raw_tpm {
            Some(r) => r.tpm.evict_all().map(|_| ()),
            None => Ok(()),
        };
        let in_process = match opts.in_process.iter().find(|(n, _)| *n == name) {
            Some((_, path)) => {
                let k = InProcessKey::load(path, key_type)?;
                if k.fingerprint() != info.fingerprint {
                    return Err(Error::InvalidKeyMaterial(format!(
                        "{} is not the key the agent holds as `{name}` (fingerprint {} vs {})",
                        path.display(),
                        k.fingerprint(),
                        info.fingerprint
                    )));
                }
                Some(k)
            }
            None => match on_token {
                Some((
                    TokenKeys {
                        backend: Some(b), ..
                    },
                    key_ref,
                    _,
                )) => Some(InProcessKey::on_token(
                    b.clone(),
                    key_ref.clone(),
                    key_type,
                    info.fingerprint.clone(),
                )?),
                _ => match on_tpm {
                    Some((
                        TpmKeys {
                            backend: Some(b), ..
                        },
                        key_ref,
                        _,
                    )) => Some(InProcessKey::on_tpm(
                        b.clone(),
                        key_ref.clone(),
                        key_type,
                        info.fingerprint.clone(),
                    )?),
                    _ => None,
                },
            },
        };
        let public_raw =
            if key_type.is_hmac() {
                None
            } else {
                let r = client.public_key(&name, "hex")?;
                let hex_text = r.public_key.as_str().unwrap_or_default().to_string();
                Some(hex::decode(hex_text.trim_start_matches("0x")).map_err(|e| {
                    Error::Internal(format!("public key of `{name}` is not hex: {e}"))
                })?)
            };
        let mut matched = None;
        if let Some((_, ids)) = &ssh {
            // HMAC and secp256k1 keys have no ssh-agent equivalent: nothing to match or note.
            if let Some(blob) = ssh_blob(&mut client, &name, key_type)? {
                matched = ids.iter().find(|i| i.blob == blob).map(|i| SshIdentity {
                    blob: i.blob.clone(),
                    flags: ssh_agent::flags_for(&i.blob),
                    comment: i.comment.clone(),
                });
                if matched.is_none() {
                    notes.push(format!(
                        "key `{name}` ({key_type}): ssh-agent holds no identity with this public key"
                    ));
                }
            }
        }

        // Cross-check: one signature from every path, verified or compared.
        let msg = b"keyward bench cross-check";
        evict()?;
        let sig = client.sign(&name, msg, Some(scheme.as_str()))?;
        let ks = base64::engine::general_purpose::STANDARD
            .decode(&sig.signature)
            .map_err(|e| Error::Internal(format!("signature is not base64: {e}")))?;
        let mut done = Vec::new();
        if let Some(raw) = &public_raw {
            if verify(scheme, raw, msg, &ks)? {
                done.push("keyward's signature verifies");
            }
        }
        if let Some(k) = &in_process {
            evict()?;
            let ps = k.sign(scheme, msg)?.bytes;
            let ok = match &public_raw {
                Some(raw) => verify(scheme, raw, msg, &ps)?,
                None => ps == ks,
            };
            if !ok {
                return Err(Error::Internal(format!(
                    "`{name}`: the in-process signature does not match the agent's key"
                )));
            }
            done.push(match (&public_raw, on_token.is_some(), on_tpm.is_some()) {
                (Some(_), true, _) => "keyward's pkcs11 backend in this process signs with the same token key, verified",
                (Some(_), _, true) => "keyward's tpm backend in this process signs with the same key blob, verified",
                (Some(_), false, false) => "the in-process key file has the same fingerprint and its signature verifies",
                (None, _, _) => "the in-process secret has the same fingerprint and gives the same tag",
            });
        }
        if let Some(r) = &raw {
            let rs = r.token.signer(&r.id, scheme)?.sign(msg)?;
            let ok = match &public_raw {
                Some(raw) => verify(scheme, raw, msg, &rs)?,
                None => rs == ks,
            };
            if !ok {
                return Err(Error::Internal(format!(
                    "`{name}`: the raw cryptoki signature does not match the agent's key"
                )));
            }
            done.push("a raw C_Sign on the token object with this CKA_ID verifies with the agent's public key");
        }
        if let Some(r) = &raw_tpm {
            evict()?;
            let loaded = r.tpm.load(&r.blob)?;
            let rs = r.tpm.signer(loaded.target(), scheme)?.sign(msg)?;
            drop(loaded);
            let ok = match &public_raw {
                Some(raw) => verify(scheme, raw, msg, &rs)?,
                None => false,
            };
            if !ok {
                return Err(Error::Internal(format!(
                    "`{name}`: the raw tss-esapi signature does not verify with the agent's public key"
                )));
            }
            done.push("the key blob loaded by raw tss-esapi calls under the same storage key signs, and the signature verifies with the agent's public key");
        }
        if let (Some(id), Some((a, _))) = (&matched, ssh.as_mut()) {
            let (_, ss) = a.sign_blob(&id.blob, msg, id.flags)?;
            let ss = match key_type {
                KeyType::P256 => ssh_agent::ecdsa_ssh_to_raw(&ss, 32)?,
                KeyType::P384 => ssh_agent::ecdsa_ssh_to_raw(&ss, 48)?,
                _ => ss,
            };
            let ok = match &public_raw {
                Some(raw) => verify(scheme, raw, msg, &ss)?,
                None => false,
            };
            if !ok {
                return Err(Error::Internal(format!(
                    "`{name}`: ssh-agent's signature does not verify with the agent's public key"
                )));
            }
            done.push("ssh-agent holds the same public key and its signature verifies");
        }
        if !done.is_empty() {
            checks.push(format!("`{name}` ({key_type}): {}", done.join("; ")));
        }
        keys.push(BenchKey {
            name,
            key_type,
            scheme,
            fingerprint: info.fingerprint,
            in_process,
            ssh: matched,
            raw,
            raw_tpm,
        });
    }
    Ok(Plan {
        socket: opts.socket.to_path_buf(),
        ssh_agent: opts.ssh_agent.map(Path::to_path_buf),
        agent,
        keys,
        checks,
        notes,
    })
}

/// The OpenSSH key blob of a keyward key, for the key types ssh-agent can hold.
fn ssh_blob(client: &mut Client, name: &KeyName, t: KeyType) -> Result<Option<Vec<u8>>> {
    if !(t == KeyType::Ed25519 || t == KeyType::P256 || t == KeyType::P384 || t.is_rsa()) {
        return Ok(None);
    }
    let r = client.public_key(name, "ssh")?;
    let line = r.public_key.as_str().unwrap_or_default();
    ssh_agent::blob_from_openssh(line).map(Some)
}

/// The machine's floor for one round trip: a thread echoing length-prefixed frames over a Unix
/// socket pair, with request and answer the size of a keyward `sign` exchange (≈ 250 bytes).
/// No parsing, no signing: what the kernel and scheduler alone cost per round trip.
pub fn socket_floor(limit: Limit, progress: &AtomicU64) -> Result<Stats> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    const FRAME: usize = 250;
    let io = |e: std::io::Error| Error::io("socket floor", e);
    let (mut a, mut b) = UnixStream::pair().map_err(io)?;
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; FRAME];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let stats = {
        let client = std::sync::Mutex::new(Some(&mut a));
        drive(
            1,
            limit,
            |_| {
                let s = client
                    .lock()
                    .ok()
                    .and_then(|mut c| c.take())
                    .ok_or_else(|| Error::Internal("socket floor: one client only".into()))?;
                let mut buf = [0u8; FRAME];
                Ok(move |msg: &[u8]| {
                    buf[..msg.len().min(FRAME)].copy_from_slice(&msg[..msg.len().min(FRAME)]);
                    s.write_all(&buf).map_err(io)?;
                    s.read_exact(&mut buf).map_err(io)
                })
            },
            progress,
        )
    };
    let _ = a.shutdown(std::net::Shutdown::Both);
    drop(a);
    let _ = echo.join();
    stats
}

/// Verify a signature with a raw public key (Ed25519 32 bytes, EC point, RSA PKCS#1 DER).
/// `Ok(false)` = this scheme is not checked here (secp256k1).
pub fn verify(scheme: Algorithm, public_raw: &[u8], msg: &[u8], sig: &[u8]) -> Result<bool> {
    use aws_lc_rs::signature::{self as s, UnparsedPublicKey, VerificationAlgorithm};
    let alg: &'static dyn VerificationAlgorithm = match scheme {
        Algorithm::Ed25519 => &s::ED25519,
        Algorithm::EcdsaP256Sha256 => &s::ECDSA_P256_SHA256_FIXED,
        Algorithm::EcdsaP384Sha384 => &s::ECDSA_P384_SHA384_FIXED,
        Algorithm::RsaPkcs1Sha256 => &s::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RsaPkcs1Sha512 => &s::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::RsaPssSha256 => &s::RSA_PSS_2048_8192_SHA256,
        Algorithm::RsaPssSha512 => &s::RSA_PSS_2048_8192_SHA512,
        _ => return Ok(false),
    };
    UnparsedPublicKey::new(alg, public_raw)
        .verify(msg, sig)
        .map(|_| true)
        .map_err(|_| Error::Internal(format!("a {scheme} signature did not verify")))
}

/// One measurement: a key, a path, a number of concurrent clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    /// Index into [`Plan::keys`].
    pub key: usize,
    pub target: Target,
    pub clients: usize,
}

/// A measured case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub key: String,
    pub key_type: String,
    pub scheme: String,
    pub target: Target,
    pub clients: usize,
    #[serde(flatten)]
    pub stats: Stats,
    /// CPU time per request of the agent process (keyward socket cases, when readable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cpu_us: Option<f64>,
    /// CPU time per request of the bench process (clients, or the in-process/raw signing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cpu_us: Option<f64>,
}

impl Plan {
    /// Every case, grouped by key: raw cryptoki, in-process, keyward, ssh-agent, each at every
    /// client count.
    pub fn cases(&self, clients: &[usize]) -> Vec<Case> {
        let mut out = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            for t in Target::ALL {
                if k.has(t) {
                    for &c in clients {
                        out.push(Case {
                            key: i,
                            target: t,
                            clients: c,
                        });
                    }
                }
            }
        }
        out
    }

    /// Measure one case.
    pub fn run(&self, case: &Case, limit: Limit, progress: &AtomicU64) -> Result<CaseResult> {
        let mut s = self.sample(case, limit, progress)?;
        self.result(case, &mut s)
    }

    /// A case's result from its (possibly several rounds of) samples.
    pub fn result(&self, case: &Case, samples: &mut Samples) -> Result<CaseResult> {
        let k = self
            .keys
            .get(case.key)
            .ok_or_else(|| Error::Internal("case names no key of the plan".into()))?;
        let (agent_cpu_us, client_cpu_us) = samples.cpu_per_request_us();
        Ok(CaseResult {
            key: k.name.to_string(),
            key_type: k.key_type.to_string(),
            scheme: k.scheme.to_string(),
            target: case.target,
            clients: case.clients,
            stats: samples.stats(),
            agent_cpu_us: agent_cpu_us.filter(|_| case.target == Target::Keyward),
            client_cpu_us,
        })
    }

    /// Run one case once and return its latencies and CPU use.
    pub fn sample(&self, case: &Case, limit: Limit, progress: &AtomicU64) -> Result<Samples> {
        // A TPM key's case starts with an empty TPM: the paths take turns in its few transient
        // slots, and the one measured reloads its key during the warm-up (not counted).
        if let Some(r) = self.keys.get(case.key).and_then(|k| k.raw_tpm.as_ref()) {
            r.tpm.evict_all()?;
        }
        let agent_pid = self.agent.as_ref().map(|a| a.pid);
        let (a0, o0) = (
            agent_pid.and_then(|p| process_cpu(Some(p))),
            process_cpu(None),
        );
        let mut s = self.sample_inner(case, limit, progress)?;
        let (a1, o1) = (
            agent_pid.and_then(|p| process_cpu(Some(p))),
            process_cpu(None),
        );
        s.agent_cpu = a0.zip(a1).map(|(a, b)| b.saturating_sub(a));
        s.own_cpu = o0.zip(o1).map(|(a, b)| b.saturating_sub(a));
        Ok(s)
    }

    fn sample_inner(&self, case: &Case, limit: Limit, progress: &AtomicU64) -> Result<Samples> {
        let k = self
            .keys
            .get(case.key)
            .ok_or_else(|| Error::Internal("case names no key of the plan".into()))?;
        let scheme = k.scheme;
        let samples = match case.target {
            Target::Keyward => drive_samples(
                case.clients,
                limit,
                |_| {
                    let mut c = Client::connect(&self.socket)?;
                    c.set_timeout(Some(Duration::from_secs(30)))?;
                    let name = k.name.clone();
                    Ok(move |msg: &[u8]| c.sign(&name, msg, Some(scheme.as_str())).map(|_| ()))
                },
                progress,
            )?,
            Target::RawPkcs11 => {
                let r = k
                    .raw
                    .as_ref()
                    .ok_or_else(|| Error::Internal("no raw PKCS#11 key".into()))?;
                drive_samples(
                    case.clients,
                    limit,
                    |_| {
                        // Each client thread opens its own session (sessions are not shared).
                        let mut signer = r.token.signer(&r.id, scheme)?;
                        Ok(move |msg: &[u8]| signer.sign(msg).map(|_| ()))
                    },
                    progress,
                )?
            }
            Target::RawTpm => {
                let r = k
                    .raw_tpm
                    .as_ref()
                    .ok_or_else(|| Error::Internal("no raw TPM key".into()))?;
                // Loaded once for the case (on this thread, flushed when `loaded` drops); each
                // client thread signs through its own context referring to that object.
                let loaded = r.tpm.load(&r.blob)?;
                let target = loaded.target();
                let s = drive_samples(
                    case.clients,
                    limit,
                    |_| {
                        let mut signer = r.tpm.signer(target, scheme)?;
                        Ok(move |msg: &[u8]| signer.sign(msg).map(|_| ()))
                    },
                    progress,
                );
                drop(loaded);
                s?
            }
            Target::InProcess => {
                let ip = k
                    .in_process
                    .as_ref()
                    .ok_or_else(|| Error::Internal("no in-process key".into()))?;
                drive_samples(
                    case.clients,
                    limit,
                    |_| Ok(move |msg: &[u8]| ip.sign(scheme, msg).map(|_| ())),
                    progress,
                )?
            }
            Target::SshAgent => {
                let (id, path) = k
                    .ssh
                    .as_ref()
                    .zip(self.ssh_agent.as_deref())
                    .ok_or_else(|| Error::Internal("no ssh-agent identity".into()))?;
                drive_samples(
                    case.clients,
                    limit,
                    |_| {
                        let mut a = ssh_agent::SshAgent::connect(path)?;
                        Ok(move |msg: &[u8]| a.sign_in_place(&id.blob, msg, id.flags))
                    },
                    progress,
                )?
            }
        };
        Ok(samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_counts_requests_and_clients() {
        let progress = AtomicU64::new(0);
        let s = drive(
            3,
            Limit::Requests(100),
            |_| Ok(|_: &[u8]| -> Result<()> { Ok(()) }),
            &progress,
        )
        .unwrap();
        assert_eq!(s.requests, 300);
        assert_eq!(progress.load(Ordering::Relaxed), 300);
        assert!(s.p50_us >= 0.0 && s.p99_us >= s.p50_us);

        let s = drive(
            2,
            Limit::Duration(Duration::from_millis(100)),
            |_| {
                Ok(|_: &[u8]| -> Result<()> {
                    std::thread::sleep(Duration::from_millis(1));
                    Ok(())
                })
            },
            &progress,
        )
        .unwrap();
        assert!(s.elapsed_s >= 0.1 && s.elapsed_s < 1.0, "{}", s.elapsed_s);
        assert!(s.p50_us >= 1000.0);
        assert!(s.requests >= 2 * 50, "{}", s.requests);
    }

    #[test]
    fn one_failing_client_fails_the_case_without_hanging() {
        let progress = AtomicU64::new(0);
        // Client 1 cannot connect.
        let e = drive(
            4,
            Limit::Duration(Duration::from_secs(30)),
            |i| {
                if i == 1 {
                    Err(Error::AgentUnreachable("nope".into()))
                } else {
                    Ok(|_: &[u8]| -> Result<()> { Ok(()) })
                }
            },
            &progress,
        )
        .unwrap_err();
        assert_eq!(e.code(), "agent_unreachable");
        // A client fails mid-run.
        let t = Instant::now();
        let e = drive(
            2,
            Limit::Duration(Duration::from_secs(30)),
            |i| {
                let mut n = 0u32;
                Ok(move |_: &[u8]| -> Result<()> {
                    n += 1;
                    if i == 0 && n > 1000 {
                        Err(Error::RateLimited {
                            message: "slow down".into(),
                            retry_after_ms: 5,
                        })
                    } else {
                        Ok(())
                    }
                })
            },
            &progress,
        )
        .unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn socket_floor_measures_round_trips() {
        let s = socket_floor(Limit::Requests(500), &AtomicU64::new(0)).unwrap();
        assert_eq!(s.requests, 500);
        assert!(s.p50_us > 0.0);
    }

    #[test]
    fn messages_carry_a_counter() {
        let seen = std::sync::Mutex::new(Vec::new());
        drive(
            1,
            Limit::Requests(3),
            |_| {
                Ok(|m: &[u8]| -> Result<()> {
                    assert_eq!(m.len(), MESSAGE_LEN);
                    if let Ok(mut v) = seen.lock() {
                        v.push(m[..8].to_vec());
                    }
                    Ok(())
                })
            },
            &AtomicU64::new(0),
        )
        .unwrap();
        let v = seen.into_inner().unwrap();
        let tail: Vec<u64> = v[v.len() - 3..]
            .iter()
            .map(|b| u64::from_be_bytes(b[..].try_into().unwrap()))
            .collect();
        assert_eq!(tail, [0, 1, 2]);
    }
}
