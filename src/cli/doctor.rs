//! `keyward doctor`: checks a home, its config, keys, devices, the host and the running agent,
//! and reports each finding as pass/warn/fail/info with the command that fixes it (exit 1 on fail).

use std::collections::BTreeMap;
use std::fs;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use keyward::backend::pkcs11::Pkcs11Backend;
use keyward::backend::soft::SoftBackend;
use keyward::backend::tpm::TpmBackend;
use keyward::backend::{material, PublicInfo};
use keyward::client::Client;
use keyward::config::Config;
use keyward::home::Home;
use keyward::keystore::{KeyMeta, KeyVersion, Keystore};
use keyward::model::{BackendKind, KeyType};
use keyward::secret::SecretSource;
use keyward::{pubkey, Error, Result};
use serde::Serialize;
use serde_json::json;

use super::Ctx;

/// How long the agent may take to answer `status` before doctor reports it unresponsive.
const AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `timedatectl` may take (it waits on D-Bus, which can hang on a broken host).
const TIMEDATECTL_TIMEOUT: Duration = Duration::from_secs(2);
/// 2025-01-01T00:00:00Z: a clock before this is certainly wrong (no battery, no sync).
const EARLIEST_PLAUSIBLE: u64 = 1_735_689_600;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Identity passphrase source (env:NAME, file:PATH, stdin or prompt): also decrypt every
    /// soft key and compare its public key with the metadata. Without it soft keys are only
    /// checked to exist.
    #[arg(long, value_name = "SOURCE")]
    passphrase: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Info,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Info => "INFO",
        }
    }
}

/// One finding. `id` is stable (docs/doctor.md lists them); `subject` names the file, key,
/// token or TPM when a check runs once per item.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: Status,
    pub message: String,
    pub fix: Option<String>,
}

impl Check {
    fn new(id: &str, status: Status, message: impl Into<String>) -> Check {
        Check {
            id: id.to_string(),
            subject: None,
            status,
            message: message.into(),
            fix: None,
        }
    }
    fn pass(id: &str, message: impl Into<String>) -> Check {
        Check::new(id, Status::Pass, message)
    }
    fn info(id: &str, message: impl Into<String>) -> Check {
        Check::new(id, Status::Info, message)
    }
    fn warn(id: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::new(id, Status::Warn, message).fix(fix)
    }
    fn fail(id: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::new(id, Status::Fail, message).fix(fix)
    }
    fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
    fn about(mut self, subject: impl Into<String>) -> Check {
        self.subject = Some(subject.into());
        self
    }
}

/// Run every check and print the report. `Ok(false)` when a check failed (exit status 1).
pub fn run(ctx: &Ctx, args: DoctorArgs) -> Result<bool> {
    let home = Home::resolve(ctx.home.as_deref())?;
    let checks = collect(ctx, &home, &args);
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let ok = count(Status::Fail) == 0;
    let v = json!({
        "home": home.root().display().to_string(),
        "ok": ok,
        "counts": {
            "pass": count(Status::Pass),
            "warn": count(Status::Warn),
            "fail": count(Status::Fail),
            "info": count(Status::Info),
        },
        "checks": checks,
    });
    ctx.emit(&v, || {
        let width = checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
        let mut s = format!("keyward doctor: {}", home.root().display());
        for c in &checks {
            // Path checks already name their path; other subjects (keys, tokens) are shown.
            let subject = c
                .subject
                .as_deref()
                .filter(|x| !c.message.contains(x))
                .map(|x| format!("[{x}] "))
                .unwrap_or_default();
            s.push_str(&format!(
                "\n{}  {:<width$}  {subject}{}",
                c.status.label(),
                c.id,
                c.message
            ));
            if let Some(f) = &c.fix {
                s.push_str(&format!("\n      {:<width$}  fix: {f}", ""));
            }
        }
        s.push_str(&format!(
            "\n{} checks: {} pass, {} warn, {} fail, {} info",
            checks.len(),
            count(Status::Pass),
            count(Status::Warn),
            count(Status::Fail),
            count(Status::Info)
        ));
        s
    });
    Ok(ok)
}

fn collect(ctx: &Ctx, home: &Home, args: &DoctorArgs) -> Vec<Check> {
    let mut out = Vec::new();
    let initialized = check_home(home, &mut out);
    let config = if initialized {
        check_permissions(home, &mut out);
        check_config(home, &mut out)
    } else {
        None
    };
    if let Some(cfg) = &config {
        check_secret_files(cfg, &mut out);
    }
    check_socket_dir(ctx, &mut out);
    check_agent(ctx, home, &mut out);
    out.push(check_mlock_limit());
    out.push(check_clock());
    if initialized {
        check_identity(home, config.as_ref(), &mut out);
        check_keys(home, config.as_ref(), args, &mut out);
        out.extend(check_audit(home));
    }
    out
}

// ---- home and permissions ------------------------------------------------------------------

fn check_home(home: &Home, out: &mut Vec<Check>) -> bool {
    let root = home.root();
    if home.is_initialized() {
        out.push(Check::pass(
            "home",
            format!("{} is a keyward home", root.display()),
        ));
        return true;
    }
    let message = if root.exists() {
        format!(
            "{} has no identity.age/identity.pub: not an initialised keyward home",
            root.display()
        )
    } else {
        format!("{} does not exist", root.display())
    };
    out.push(Check::fail(
        "home",
        message,
        "run `keyward init` (or pass --home / set KEYWARD_HOME to the right directory)",
    ));
    false
}

/// What a path must look like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Holds secrets or policy: 0600 or stricter, a regular file.
    PrivateFile,
    /// 0700 or stricter, a real directory.
    PrivateDir,
    /// Public but must not be replaceable by others (identity.pub: new keys are encrypted
    /// to it, so a swapped file would hand the next key to whoever swapped it).
    ProtectedFile,
}

/// Mode and owner of `path` as `want` requires; `None` when the path does not exist.
fn check_path(id: &str, path: &Path, want: Want) -> Option<Check> {
    let shown = path.display();
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(
                Check::fail(
                    id,
                    format!("cannot read {shown}: {e}"),
                    "check the path and the permissions of its directories",
                )
                .about(shown.to_string()),
            )
        }
    };
    let is_dir = want == Want::PrivateDir;
    let right_type = if is_dir {
        md.file_type().is_dir()
    } else {
        md.file_type().is_file()
    };
    if !right_type {
        let what = if is_dir {
            "a directory"
        } else {
            "a regular file"
        };
        return Some(
            Check::fail(
                id,
                format!("{shown} is not {what} (symlinks are refused)"),
                format!("replace {shown} with {what} (not a symlink)"),
            )
            .about(shown.to_string()),
        );
    }
    let me = keyward::sys::effective_uid();
    if md.uid() != me {
        return Some(
            Check::fail(
                id,
                format!(
                    "{shown} is owned by uid {}, not by this user (uid {me})",
                    md.uid()
                ),
                format!("chown {me} {shown}"),
            )
            .about(shown.to_string()),
        );
    }
    let mode = md.mode() & 0o7777;
    let (mask, chmod, why) = match want {
        Want::PrivateFile => (0o077, "600", "group or others can access it"),
        Want::PrivateDir => (0o077, "700", "group or others can access it"),
        Want::ProtectedFile => (0o022, "644", "group or others can replace it"),
    };
    if mode & mask != 0 {
        return Some(
            Check::fail(
                id,
                format!("{shown} has mode {mode:04o}: {why}"),
                format!("chmod {chmod} {shown}"),
            )
            .about(shown.to_string()),
        );
    }
    Some(
        Check::pass(id, format!("{shown}: mode {mode:04o}, owned by uid {me}"))
            .about(shown.to_string()),
    )
}

fn check_permissions(home: &Home, out: &mut Vec<Check>) {
    out.extend(check_path("perm.home", home.root(), Want::PrivateDir));
    for d in [
        home.keys_dir(),
        home.state_dir(),
        home.audit_dir(),
        home.run_dir(),
    ] {
        out.extend(check_path("perm.dir", &d, Want::PrivateDir));
    }
    out.extend(check_path(
        "perm.identity",
        &home.identity_path(),
        Want::PrivateFile,
    ));
    out.extend(check_path(
        "perm.identity",
        &keyward::identity::sealed_path(home),
        Want::PrivateFile,
    ));
    out.extend(check_path(
        "perm.identity_pub",
        &home.recipient_path(),
        Want::ProtectedFile,
    ));
    out.extend(check_path(
        "perm.config",
        &home.config_path(),
        Want::PrivateFile,
    ));
    let mut files: Vec<PathBuf> = fs::read_dir(home.keys_dir())
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for f in files {
        out.extend(check_path("perm.key_file", &f, Want::PrivateFile));
    }
}

// ---- config and secret sources --------------------------------------------------------------

fn check_config(home: &Home, out: &mut Vec<Check>) -> Option<Config> {
    let path = home.config_path();
    if !path.exists() {
        out.push(Check::info(
            "config",
            format!(
                "{} does not exist: every setting is at its default",
                path.display()
            ),
        ));
        return Some(Config::default());
    }
    match Config::load(&path) {
        Ok(cfg) => {
            out.push(Check::pass(
                "config",
                format!("{} is valid", path.display()),
            ));
            if !cfg.audit.enabled {
                out.push(Check::warn(
                    "config.audit",
                    "audit.enabled = false: signatures are not recorded in the audit log",
                    format!(
                        "remove `enabled = false` from [audit] in {} (it is meant for benchmarks only)",
                        path.display()
                    ),
                ));
            }
            Some(cfg)
        }
        Err(e) => {
            out.push(Check::fail(
                "config",
                e.to_string(),
                format!(
                    "fix {} at the reported line and column (`keyward policy check` re-checks it)",
                    path.display()
                ),
            ));
            None
        }
    }
}

/// Every `file:` secret source the config names, with the setting that names it.
fn secret_files(cfg: &Config) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    let mut add = |setting: String, source: Option<&str>| {
        if let Some(Ok(SecretSource::File(p))) = source.map(str::parse::<SecretSource>) {
            v.push((setting, p));
        }
    };
    add("agent.passphrase".into(), cfg.agent.passphrase.as_deref());
    for (alias, t) in &cfg.pkcs11 {
        add(format!("pkcs11.{alias}.pin"), Some(&t.pin));
    }
    for (alias, t) in &cfg.tpm {
        add(format!("tpm.{alias}.owner_auth"), t.owner_auth.as_deref());
        add(format!("tpm.{alias}.key_auth"), t.key_auth.as_deref());
    }
    v
}

fn check_secret_files(cfg: &Config, out: &mut Vec<Check>) {
    for (setting, path) in secret_files(cfg) {
        let c = check_path("perm.secret_file", &path, Want::PrivateFile).unwrap_or_else(|| {
            Check::fail(
                "perm.secret_file",
                format!("{} does not exist", path.display()),
                format!(
                    "create it with the secret (`install -m 600 /dev/null {}`, then write it) or point {setting} elsewhere",
                    path.display()
                ),
            )
        });
        let message = format!("{setting}: {}", c.message);
        out.push(Check { message, ..c }.about(setting));
    }
}

// ---- socket and agent -----------------------------------------------------------------------

fn check_socket_dir(ctx: &Ctx, out: &mut Vec<Check>) {
    let sock = match ctx.socket() {
        Ok(s) => s,
        Err(e) => {
            out.push(Check::warn(
                "socket.dir",
                format!("cannot work out the socket path: {e}"),
                e.hint(),
            ));
            return;
        }
    };
    let Some(dir) = sock.parent().filter(|d| !d.as_os_str().is_empty()) else {
        out.push(Check::fail(
            "socket.dir",
            format!("socket path {} has no directory", sock.display()),
            "set agent.socket in keyward.toml (or KEYWARD_SOCK) to an absolute path",
        ));
        return;
    };
    let shown = dir.display();
    let md = match fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.push(
                Check::info(
                    "socket.dir",
                    format!("{shown} does not exist yet: the agent creates it (0700) at start"),
                )
                .about(shown.to_string()),
            );
            return;
        }
        Err(e) => {
            out.push(
                Check::fail(
                    "socket.dir",
                    format!("cannot read {shown}: {e}"),
                    "check the path and the permissions of its directories",
                )
                .about(shown.to_string()),
            );
            return;
        }
    };
    let me = keyward::sys::effective_uid();
    let mode = md.mode() & 0o7777;
    // The same rules as the agent's bind (agent/src/server.rs): it refuses to start otherwise.
    let c = if !md.file_type().is_dir() {
        Check::fail(
            "socket.dir",
            format!("{shown} is not a directory"),
            format!("remove {shown}, or choose another socket path (agent.socket)"),
        )
    } else if md.uid() != me {
        Check::fail(
            "socket.dir",
            format!(
                "{shown} is owned by uid {}, not by this user (uid {me})",
                md.uid()
            ),
            format!("chown {me} {shown}, or choose a socket path in a directory you own"),
        )
    } else if mode & 0o022 != 0 {
        Check::fail(
            "socket.dir",
            format!("{shown} has mode {mode:04o}: others could replace the socket with their own"),
            format!("chmod 700 {shown}"),
        )
    } else {
        Check::pass(
            "socket.dir",
            format!("{shown}: mode {mode:04o}, owned by uid {me}"),
        )
    };
    out.push(c.about(shown.to_string()));
}

fn check_agent(ctx: &Ctx, home: &Home, out: &mut Vec<Check>) {
    let Ok(sock) = ctx.socket() else { return };
    let status = Client::connect(&sock).and_then(|mut c| {
        c.set_timeout(Some(AGENT_TIMEOUT))?;
        c.status()
    });
    let st = match status {
        Ok(st) => st,
        Err(Error::AgentUnreachable(_)) => {
            out.push(
                Check::info(
                    "agent",
                    format!(
                        "no agent is running on {}: its dumpability and memory lock are checked while it runs",
                        sock.display()
                    ),
                )
                .fix("start it with `keyward agent`"),
            );
            return;
        }
        Err(e) => {
            out.push(Check::fail(
                "agent",
                format!(
                    "the agent on {} does not answer `status`: {e}",
                    sock.display()
                ),
                "check the agent log (<home>/agent.log); restart it with `keyward agent`",
            ));
            return;
        }
    };
    let same_home = fs::canonicalize(&st.home).ok() == fs::canonicalize(home.root()).ok();
    out.push(if same_home {
        Check::pass(
            "agent",
            format!(
                "agent {} (pid {}) serves {} on {}",
                st.agent_version, st.pid, st.home, st.socket
            ),
        )
    } else {
        Check::warn(
            "agent",
            format!(
                "the agent on {} (pid {}) serves another home: {}",
                sock.display(),
                st.pid,
                st.home
            ),
            "point KEYWARD_SOCK or agent.socket at this home's agent, or pass the right --home",
        )
    });
    out.push(if st.dumpable {
        Check::fail(
            "agent.dumpable",
            format!(
                "the agent (pid {}) is dumpable: a core dump or a same-user ptrace can read its keys",
                st.pid
            ),
            "restart the agent with `keyward agent` (it sets PR_SET_DUMPABLE 0 at start); if it stays dumpable, check for a wrapper or debugger that changes it",
        )
    } else {
        Check::pass(
            "agent.dumpable",
            format!(
                "the agent (pid {}) is not dumpable: no core dumps, no same-user ptrace",
                st.pid
            ),
        )
    });
    out.push(agent_core_limit(st.pid, st.dumpable));
    out.push(if st.memory_locked {
        Check::pass(
            "agent.memory_locked",
            "the agent's memory is locked: key material is never swapped out",
        )
    } else {
        Check::warn(
            "agent.memory_locked",
            "the agent's memory is not locked (mlockall failed): decrypted keys outside keyward's own buffers may be swapped to disk",
            "raise RLIMIT_MEMLOCK for the agent (systemd: LimitMEMLOCK=infinity; shell: `ulimit -l unlimited`; or /etc/security/limits.conf memlock) and restart it; or run without swap / with encrypted swap",
        )
    });
    for b in st.backends.iter().filter(|b| !b.up) {
        out.push(
            Check::warn(
                "agent.backend",
                format!(
                    "the agent reports backend {} down{}",
                    b.kind,
                    b.detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
                "check the device or token; the agent reconnects by itself once it is back",
            )
            .about(b.kind.clone()),
        );
    }
}

/// The agent's RLIMIT_CORE, from /proc/<pid>/limits.
fn agent_core_limit(pid: u32, dumpable: bool) -> Check {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok();
    match limits
        .as_deref()
        .and_then(|l| limit_of(l, "Max core file size"))
    {
        Some((soft, _)) if soft == "0" => Check::pass(
            "agent.core_dumps",
            format!("the agent (pid {pid}) has a core file size limit of 0"),
        ),
        Some((soft, _)) => {
            let (status, consequence) = if dumpable {
                (
                    Status::Fail,
                    "and it is dumpable: a crash writes its keys to disk",
                )
            } else {
                (
                    Status::Warn,
                    "(not dumpable, so the kernel writes no core; the limit is a second line of defence)",
                )
            };
            Check::new(
                "agent.core_dumps",
                status,
                format!("the agent (pid {pid}) allows core files of {soft} bytes {consequence}"),
            )
            .fix("restart the agent with `keyward agent` (it sets RLIMIT_CORE 0 at start)")
        }
        None => Check::info(
            "agent.core_dumps",
            format!(
                "cannot read /proc/{pid}/limits (another PID namespace?): core limit not checked"
            ),
        ),
    }
}

/// The soft and hard value of one line of a /proc/<pid>/limits file.
fn limit_of(limits: &str, name: &str) -> Option<(String, String)> {
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let mut f = line[name.len()..].split_whitespace();
    Some((f.next()?.to_string(), f.next()?.to_string()))
}

// ---- host -----------------------------------------------------------------------------------

fn check_mlock_limit() -> Check {
    let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let (soft, hard) = limit_of(&limits, "Max locked memory").unwrap_or_default();
    let shown = |v: &str| match v.parse::<u64>() {
        Ok(b) => format!("{} KiB", b / 1024),
        Err(_) if v.is_empty() => "unknown".into(),
        Err(_) => v.to_string(),
    };
    if keyward::sys::effective_uid() == 0 {
        return Check::pass(
            "mlock.limit",
            format!(
                "running as root: the agent can lock all its memory (RLIMIT_MEMLOCK {} does not bind CAP_IPC_LOCK)",
                shown(&soft)
            ),
        );
    }
    if soft == "unlimited" {
        return Check::pass(
            "mlock.limit",
            "RLIMIT_MEMLOCK is unlimited: the agent can lock all its memory",
        );
    }
    Check::warn(
        "mlock.limit",
        format!(
            "RLIMIT_MEMLOCK is {} (hard {}): an agent started from here locks only keyward's own secret buffers, not the crypto library's copies",
            shown(&soft),
            shown(&hard)
        ),
        "start the agent with an unlimited memlock limit: systemd `LimitMEMLOCK=infinity`, or `ulimit -l unlimited` (needs a hard limit raised in /etc/security/limits.conf)",
    )
}

/// The clock's NTP state. The kernel's STA_UNSYNC (adjtimex) would be the direct source, but
/// this binary forbids unsafe code and keyward::sys has no wrapper for it yet; systemd's
/// timesync flag file and `timedatectl` answer on hosts that use them.
fn check_clock() -> Check {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now < EARLIEST_PLAUSIBLE {
        return Check::fail(
            "clock",
            format!("the system clock reads {} (before 2025): it is wrong", keyward::keystore::now_rfc3339()),
            "set the time and enable NTP (`timedatectl set-ntp true`, chrony or ntpd); exchanges reject requests with skewed timestamps",
        );
    }
    let fix = "enable time synchronisation (`timedatectl set-ntp true`, or run chrony/ntpd): exchanges reject requests whose timestamp is outside their window (e.g. Binance recvWindow, 5 s by default)";
    match ntp_synchronized() {
        Some(true) => Check::pass("clock", "the system clock is synchronised (NTP)"),
        Some(false) => Check::warn("clock", "the system clock is not synchronised (NTP)", fix),
        None => Check::info(
            "clock",
            "cannot tell whether the clock is synchronised (no systemd-timesyncd state, timedatectl unavailable); make sure NTP runs",
        )
        .fix(fix),
    }
}

fn ntp_synchronized() -> Option<bool> {
    if Path::new("/run/systemd/timesync/synchronized").exists() {
        return Some(true);
    }
    let mut child = std::process::Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + TIMEDATECTL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut text).ok()?;
    match text.trim() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

// ---- identity -------------------------------------------------------------------------------

fn check_identity(home: &Home, config: Option<&Config>, out: &mut Vec<Check>) {
    if !keyward::identity::is_sealed(home) {
        let source = config.and_then(|c| c.agent.passphrase.clone());
        out.push(
            Check::info(
                "identity.seal",
                match source {
                    Some(s) => format!("the identity is not sealed to a TPM: the agent reads the passphrase from {s}"),
                    None => "the identity is not sealed to a TPM: the agent asks for the passphrase at start".into(),
                },
            )
            .fix("optional, for unattended start: `keyward identity seal --tpm ALIAS`"),
        );
        return;
    }
    let blob = match keyward::identity::read_sealed(home) {
        Ok(b) => b,
        Err(e) => {
            out.push(Check::fail(
                "identity.seal",
                format!("identity.tpm cannot be read: {e}"),
                "reseal with `keyward identity seal --tpm ALIAS` (identity.age and the passphrase still work)",
            ));
            return;
        }
    };
    let Some(cfg) = config else {
        out.push(Check::warn(
            "identity.seal",
            format!("identity.tpm is sealed to TPM `{}`; not checked because keyward.toml does not load", blob.tpm),
            "fix keyward.toml, then run `keyward doctor` again",
        ));
        return;
    };
    let pcrs = blob
        .pcrs
        .as_ref()
        .map(|p| format!(" (PCRs {p})"))
        .unwrap_or_default();
    match keyward::identity::unlock_sealed(home, cfg) {
        Ok(identity) => {
            drop(identity);
            out.push(Check::pass(
                "identity.seal",
                format!("the TPM `{}` unseals the identity{pcrs}: unattended start works", blob.tpm),
            ));
        }
        Err(e) => out.push(Check::fail(
            "identity.seal",
            format!("the TPM `{}` does not unseal the identity{pcrs}: {e}", blob.tpm),
            format!(
                "reseal with `keyward identity seal --tpm {}` (after a firmware or boot change the PCRs differ); until then start the agent with `--passphrase SOURCE`",
                blob.tpm
            ),
        )),
    }
}

// ---- keys and backends ----------------------------------------------------------------------

/// The device a key lives on, opened once per alias.
type Opened<T> = BTreeMap<String, std::result::Result<T, String>>;

fn check_keys(home: &Home, config: Option<&Config>, args: &DoctorArgs, out: &mut Vec<Check>) {
    let keys = match Keystore::new(home).list() {
        Ok(k) => k,
        Err(e) => {
            out.push(Check::fail(
                "keys.metadata",
                format!("the key registry does not load: {e}"),
                "restore the named file in keys/ from a backup, or move it aside",
            ));
            return;
        }
    };
    let identity = args
        .passphrase
        .as_deref()
        .and_then(|src| unlock_identity(home, src, out));
    let soft = match keyward::identity::recipient(home) {
        Ok(r) => Some(SoftBackend::new(&home.keys_dir(), r, identity)),
        Err(e) => {
            out.push(Check::fail(
                "keys.metadata",
                format!("identity.pub does not load: {e}"),
                "restore identity.pub from a backup (it is the public half of identity.age)",
            ));
            None
        }
    };
    let (tokens, tpms) = match config {
        Some(cfg) => (open_tokens(home, cfg, out), open_tpms(home, cfg, out)),
        None => (Opened::new(), Opened::new()),
    };
    if keys.is_empty() {
        out.push(Check::info("key", "no keys in this home"));
    }
    for meta in &keys {
        for v in &meta.versions {
            let subject = format!("{} v{}", meta.name, v.version);
            let mut c = match meta.backend {
                BackendKind::Soft => match &soft {
                    Some(b) => check_soft_key(home, b, meta, v),
                    None => Check::warn(
                        "key",
                        "not checked: identity.pub does not load",
                        "see keys.metadata",
                    ),
                },
                BackendKind::Pkcs11 => on_device(&tokens, config, v, "pkcs11", |b| {
                    check_token_key(b, meta, v)
                }),
                BackendKind::Tpm => check_tpm_key(home, &tpms, config, meta, v),
                other => Check::info("key", format!("backend {other} is not checked by doctor")),
            };
            let retired = meta.disabled || v.disabled;
            if retired && c.status == Status::Fail {
                // Material of a key nobody can sign with any more is not an outage.
                c.status = Status::Warn;
                c.message.push_str(" (the key or version is disabled)");
            }
            out.push(c.about(subject));
        }
    }
}

fn unlock_identity(home: &Home, src: &str, out: &mut Vec<Check>) -> Option<age::x25519::Identity> {
    let result = src
        .parse::<SecretSource>()
        .and_then(|s| s.read("identity passphrase"))
        .and_then(|pass| keyward::identity::unlock(home, &pass));
    match result {
        Ok(id) => {
            out.push(Check::pass(
                "identity.unlock",
                "the passphrase decrypts identity.age: soft keys are decrypted and compared",
            ));
            Some(id)
        }
        Err(e) => {
            out.push(Check::fail(
                "identity.unlock",
                format!("cannot unlock the identity: {e}; soft keys are only checked to exist"),
                e.hint(),
            ));
            None
        }
    }
}

/// The alias in a device locator `<alias>:<rest>`.
fn alias_of(v: &KeyVersion) -> &str {
    v.locator.split_once(':').map_or("", |(a, _)| a)
}

/// Run `f` on the device the key version lives on, or explain why it cannot be checked.
fn on_device<T>(
    opened: &Opened<T>,
    config: Option<&Config>,
    v: &KeyVersion,
    kind: &str,
    f: impl FnOnce(&T) -> Check,
) -> Check {
    let alias = alias_of(v);
    match opened.get(alias) {
        Some(Ok(b)) => f(b),
        Some(Err(_)) => Check::warn(
            "key",
            format!("not checked: {kind} `{alias}` is not available (see backend.{kind})"),
            format!("fix backend.{kind} [{alias}] first"),
        ),
        None if config.is_none() => Check::warn(
            "key",
            "not checked: keyward.toml does not load",
            "fix keyward.toml, then run `keyward doctor` again",
        ),
        None => Check::fail(
            "key",
            format!("lives on {kind} `{alias}`, which keyward.toml does not configure"),
            format!("add the [{kind}.{alias}] section back to keyward.toml (docs/{kind}.md)"),
        ),
    }
}

fn check_soft_key(home: &Home, b: &SoftBackend, meta: &KeyMeta, v: &KeyVersion) -> Check {
    let path = home.keys_dir().join(&v.locator);
    if !path.is_file() {
        return missing_material(meta, &format!("its key file {} is missing", path.display()));
    }
    let key_ref = meta.key_ref(v);
    match b.decrypt(&key_ref, meta.key_type) {
        Ok(m) => {
            let public = material::public_spki(&m).map(|spki| {
                let fingerprint = match &spki {
                    Some(d) => pubkey::fingerprint(d),
                    None => material::hmac_fingerprint(m.expose()),
                };
                PublicInfo {
                    spki_der: spki,
                    fingerprint,
                }
            });
            match public {
                Ok(p) => compare(meta, v, meta.key_type, &p, true, "decrypts"),
                Err(e) => Check::fail(
                    "key",
                    format!("{} decrypts but does not parse: {e}", path.display()),
                    restore_fix(meta),
                ),
            }
        }
        // No identity in this process: existence is all that can be checked.
        Err(Error::Locked(_)) => Check::pass(
            "key",
            format!(
                "key file {} exists (pass --passphrase SOURCE to decrypt and compare it)",
                path.display()
            ),
        ),
        Err(e) => Check::fail(
            "key",
            format!("{} does not decrypt: {e}", path.display()),
            restore_fix(meta),
        ),
    }
}

fn check_token_key(b: &Pkcs11Backend, meta: &KeyMeta, v: &KeyVersion) -> Check {
    let id = match v.locator.split_once(':').map(|(_, id)| hex::decode(id)) {
        Some(Ok(id)) => id,
        _ => {
            return Check::fail(
                "key",
                format!(
                    "the metadata's locator {:?} is not `alias:hex-id`",
                    v.locator
                ),
                restore_fix(meta),
            )
        }
    };
    // `adopt` by CKA_ID is the backend's "find this object and read its public key"; doctor
    // only reads what it returns and writes nothing.
    match b.adopt(None, Some(&id)) {
        Ok((_, t, public)) => compare(meta, v, t, &public, false, "found on the token"),
        Err(Error::UnknownKey(_)) => missing_material(
            meta,
            &format!(
                "no private or secret key object with CKA_ID {} on token `{}`",
                hex::encode(&id),
                b.alias()
            ),
        ),
        Err(e) => Check::fail("key", format!("token `{}`: {e}", b.alias()), e.hint()),
    }
}

fn check_tpm_key(
    home: &Home,
    tpms: &Opened<TpmBackend>,
    config: Option<&Config>,
    meta: &KeyMeta,
    v: &KeyVersion,
) -> Check {
    let rest = v.locator.split_once(':').map_or("", |(_, r)| r);
    let blob = (!rest.starts_with("0x")).then(|| home.keys_dir().join(rest));
    // A missing blob is the key being gone, whatever state the TPM is in.
    if let Some(p) = &blob {
        if !p.is_file() {
            return missing_material(
                meta,
                &format!("its TPM key blob {} is missing", p.display()),
            );
        }
    }
    on_device(tpms, config, v, "tpm", |b| {
        let key_ref = meta.key_ref(v);
        let public = match b.public_info(&key_ref) {
            Ok((t, p)) => (t, p),
            Err(Error::UnknownKey(m)) => {
                return missing_material(meta, &format!("no persistent object at {m}"))
            }
            Err(e) => {
                return Check::fail(
                    "key",
                    format!("TPM `{}`: {e}", b.alias()),
                    restore_fix(meta),
                )
            }
        };
        match b.probe(&key_ref) {
            Ok(()) => {}
            // The TPM's own verdict on the blob (TPM_RC_INTEGRITY, worded by the backend):
            // the key is unusable on this TPM.
            Err(e @ Error::BackendUnavailable(_))
                if e.to_string().contains("does not belong to this TPM") =>
            {
                return Check::fail(
                    "key",
                    format!("TPM `{}` does not load the key: {e}", b.alias()),
                    format!(
                        "check that the TCTI of [tpm.{}] reaches the TPM that created the key (a blob loads nowhere else); if that TPM was cleared the key is lost: `keyward key delete {}` and create a new one",
                        b.alias(),
                        meta.name
                    ),
                );
            }
            // Busy or out of object slots says nothing about the key: a TPM without a
            // resource manager (swtpm, /dev/tpm0) has about three slots and a running agent
            // holds two of them.
            Err(e @ (Error::BackendUnavailable(_) | Error::Busy(_))) => {
                return Check::warn(
                    "key",
                    format!("TPM `{}` could not load the key just now: {e}", b.alias()),
                    "run `keyward doctor` again; on a TPM without a resource manager (swtpm, /dev/tpm0) stop the agent first, or use /dev/tpmrm0 or tpm2-abrmd",
                );
            }
            Err(e) => {
                return Check::fail(
                    "key",
                    format!("TPM `{}` does not load the key: {e}", b.alias()),
                    restore_fix(meta),
                );
            }
        }
        compare(meta, v, public.0, &public.1, false, "loads in the TPM")
    })
}

/// Whether what the device (or the decrypted file) holds is what the metadata registered.
/// `fingerprint_comparable`: HMAC fingerprints of device keys name the object, not the secret.
fn compare(
    meta: &KeyMeta,
    v: &KeyVersion,
    found_type: KeyType,
    public: &PublicInfo,
    fingerprint_comparable: bool,
    how: &str,
) -> Check {
    let same_type =
        found_type == meta.key_type || (found_type.is_hmac() && meta.key_type.is_hmac());
    if !same_type {
        return Check::fail(
            "key",
            format!(
                "the stored object is {found_type}, the metadata says {}",
                meta.key_type
            ),
            restore_fix(meta),
        );
    }
    let registered = match v.spki_der() {
        Ok(s) => s,
        Err(e) => return Check::fail("key", e.to_string(), restore_fix(meta)),
    };
    let matches = match (&registered, &public.spki_der) {
        (Some(a), Some(b)) => a == b,
        (None, None) => !fingerprint_comparable || public.fingerprint == v.fingerprint,
        _ => false,
    };
    if matches {
        Check::pass(
            "key",
            format!(
                "{} {how}; public key matches {}",
                meta.key_type, v.fingerprint
            ),
        )
    } else {
        Check::fail(
            "key",
            format!(
                "{how}, but its public key ({}) is not the registered one ({}): signatures would not verify at the exchange",
                public.fingerprint, v.fingerprint
            ),
            restore_fix(meta),
        )
    }
}

fn missing_material(meta: &KeyMeta, what: &str) -> Check {
    Check::fail("key", what.to_string(), restore_fix(meta))
}

fn restore_fix(meta: &KeyMeta) -> String {
    format!(
        "restore the key material from a backup; if it is lost, remove the key with `keyward key delete {}` and create a new one (register its public key / API secret with the exchange again)",
        meta.name
    )
}

/// Whether a secret source can be read without a terminal this run does not have.
fn readable_without_prompt(source: Option<&str>) -> bool {
    source.is_none_or(|s| s != "prompt" || std::io::stdin().is_terminal())
}

fn open_tokens(home: &Home, cfg: &Config, out: &mut Vec<Check>) -> Opened<Pkcs11Backend> {
    let mut opened = Opened::new();
    for (alias, t) in &cfg.pkcs11 {
        if !readable_without_prompt(Some(&t.pin)) {
            out.push(
                Check::warn(
                    "backend.pkcs11",
                    format!("token `{alias}` not checked: its PIN source is `prompt` and there is no terminal"),
                    "run `keyward doctor` on a terminal, or use a file: or env: PIN source",
                )
                .about(alias.clone()),
            );
            opened.insert(alias.clone(), Err("PIN not available".into()));
            continue;
        }
        let c = match super::key::open_token(home, alias) {
            Ok(b) => {
                let c = Check::pass(
                    "backend.pkcs11",
                    format!(
                        "token `{alias}` ({}) answers and accepts the PIN",
                        t.label
                            .as_deref()
                            .map(|l| format!("label {l}"))
                            .or(t.serial.as_deref().map(|s| format!("serial {s}")))
                            .unwrap_or_default()
                    ),
                );
                opened.insert(alias.clone(), Ok(b));
                c
            }
            Err(e) => {
                let c = Check::fail(
                    "backend.pkcs11",
                    format!("token `{alias}`: {e}"),
                    format!(
                        "{} (module {}; `keyward token list` shows the tokens it sees)",
                        e.hint(),
                        t.module.display()
                    ),
                );
                opened.insert(alias.clone(), Err(e.to_string()));
                c
            }
        };
        out.push(c.about(alias.clone()));
    }
    opened
}

fn open_tpms(home: &Home, cfg: &Config, out: &mut Vec<Check>) -> Opened<TpmBackend> {
    let mut opened = Opened::new();
    for (alias, t) in &cfg.tpm {
        let prompts = [t.owner_auth.as_deref(), t.key_auth.as_deref()];
        if !prompts.into_iter().all(readable_without_prompt) {
            out.push(
                Check::warn(
                    "backend.tpm",
                    format!("TPM `{alias}` not checked: an auth source is `prompt` and there is no terminal"),
                    "run `keyward doctor` on a terminal, or use file: or env: auth sources",
                )
                .about(alias.clone()),
            );
            opened.insert(alias.clone(), Err("auth not available".into()));
            continue;
        }
        let c = match super::key::open_tpm(home, alias) {
            Ok(b) => {
                let c = Check::pass(
                    "backend.tpm",
                    format!("TPM `{alias}` answers on {}", b.tcti()),
                );
                opened.insert(alias.clone(), Ok(b));
                c
            }
            Err(e) => {
                let c = Check::fail(
                    "backend.tpm",
                    format!("TPM `{alias}`: {e}"),
                    format!(
                        "{} (TCTI {}; `keyward token list` describes the TPMs it reaches)",
                        e.hint(),
                        keyward::backend::tpm::effective_tcti(t)
                    ),
                );
                opened.insert(alias.clone(), Err(e.to_string()));
                c
            }
        };
        out.push(c.about(alias.clone()));
    }
    opened
}

// ---- audit ----------------------------------------------------------------------------------

/// The audit log: the newest file's chain verifies (from its first record's link, so the check
/// stays fast however long the log), the files are private, and repaired torn tails are shown.
pub fn check_audit(home: &Home) -> Vec<Check> {
    use std::os::unix::fs::MetadataExt;
    let dir = home.audit_dir();
    let files = match keyward::audit::file::list(&dir) {
        Ok(f) => f,
        Err(e) => {
            return vec![Check::fail(
                "audit",
                format!("cannot read the audit log in {}: {e}", dir.display()),
                format!("check the permissions of {}", dir.display()),
            )]
        }
    };
    let Some((_, newest)) = files.last() else {
        return vec![Check::info(
            "audit",
            "no audit records yet (the agent writes them)",
        )];
    };
    let mut out = Vec::new();
    match keyward::audit::verify::verify_dir(&dir, Some(newest)) {
        Ok(r) => match &r.problem {
            None => out.push(Check::pass(
                "audit",
                format!(
                    "the hash chain of {} verifies ({} record(s), up to seq {})",
                    newest.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
                    r.records,
                    r.last_seq.unwrap_or(0)
                ),
            )),
            Some(p) => out.push(Check::fail(
                "audit",
                format!(
                    "the audit log is damaged: {} at seq {} ({} line {}): {}",
                    p.kind,
                    p.seq.map_or("?".into(), |s| s.to_string()),
                    p.file,
                    p.line,
                    p.detail
                ),
                "keep a copy of the audit directory for investigation; `keyward audit verify` checks the whole log",
            )),
        },
        Err(e) => out.push(Check::fail(
            "audit",
            format!("cannot verify the audit log: {e}"),
            format!("check the permissions of {}", dir.display()),
        )),
    }
    let me = keyward::sys::effective_uid();
    for (_, p) in &files {
        if let Ok(md) = std::fs::metadata(p) {
            if md.mode() & 0o077 != 0 || md.uid() != me {
                out.push(Check::warn(
                    "audit.perm",
                    format!(
                        "{} is mode {:04o}, owner uid {}: others may read who signed what",
                        p.display(),
                        md.mode() & 0o7777,
                        md.uid()
                    ),
                    format!("chmod 600 {}", p.display()),
                ));
            }
        }
    }
    let torn = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("torn-"))
                .count()
        })
        .unwrap_or(0);
    if torn > 0 {
        out.push(Check::info(
            "audit.repairs",
            format!("{torn} torn record tail(s) from crashes were cut off and kept aside (torn-*.bin); each repair is a `repair` record"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_lines_parse() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \nMax core file size        0                    unlimited            bytes     \nMax locked memory         8388608              8388608              bytes     \n";
        assert_eq!(
            limit_of(text, "Max core file size"),
            Some(("0".into(), "unlimited".into()))
        );
        assert_eq!(
            limit_of(text, "Max locked memory"),
            Some(("8388608".into(), "8388608".into()))
        );
        assert_eq!(limit_of(text, "Max nothing"), None);
    }

    #[test]
    fn file_sources_are_found_and_others_ignored() {
        let cfg = Config::parse(
            "[agent]\npassphrase = \"file:/p\"\n[pkcs11.t]\nlabel = \"x\"\npin = \"env:PIN\"\n[tpm.a]\nkey_auth = \"file:/k\"\n",
            Path::new("k.toml"),
        )
        .unwrap();
        let found: Vec<String> = secret_files(&cfg).into_iter().map(|(s, _)| s).collect();
        assert_eq!(found, ["agent.passphrase", "tpm.a.key_auth"]);
    }
}
