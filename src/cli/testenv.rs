//! `keyward testenv up|down`: a throw-away SoftHSM token, keyward home and agent in one
//! directory, for trading teams' own test suites; `down` stops the agent and removes it all.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward::client::Client;
use keyward::config::{AgentConfig, Config, TokenConfig, DEFAULT_PKCS11_MODULE};
use keyward::home::{self, Home};
use keyward::keystore::Keystore;
use keyward::model::{KeyName, KeyType};
use keyward::secret::SecretBytes;
use keyward::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Ctx;

/// Token alias written to keyward.toml; SPEC keys with `backend = "pkcs11"` live there.
const TOKEN_ALIAS: &str = "test";
/// Label of the SoftHSM token testenv initialises.
const TOKEN_LABEL: &str = "keyward-testenv";
/// The state file `down` reads; its presence is what makes `down` willing to delete a dir.
const STATE_FILE: &str = "testenv.json";
/// Marker inside the state file (never remove a directory testenv did not create).
const MARKER: &str = "keyward-testenv/1";
/// Agent start: scrypt at work factor 10 plus loading keys takes well under a second.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// `down`: SIGTERM, then SIGKILL after this long.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// A Unix socket path must fit sockaddr_un (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 100;
/// Largest SPEC file accepted.
const MAX_SPEC: u64 = 1024 * 1024;

#[derive(clap::Subcommand)]
pub enum TestenvCmd {
    /// Create a SoftHSM token, a home and a running agent; print the environment to use them.
    Up {
        /// Directory to create (must not exist or be empty; default: a new temp dir).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Keys to provision (TOML, see docs/testing-with-softhsm.md).
        #[arg(long, value_name = "SPEC.toml")]
        keys: Option<PathBuf>,
        /// PKCS#11 module (SoftHSM by default).
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PKCS11_MODULE)]
        module: PathBuf,
    },
    /// Stop the agent of a testenv and remove its directory.
    Down {
        /// The testenv directory (default: $KEYWARD_TESTENV_DIR).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The SPEC file: `[[keys]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    keys: Vec<SpecKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecKey {
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    #[serde(default = "default_backend")]
    backend: String,
    /// Imported instead of generated: the secret text (HMAC string, PEM, 0x-hex).
    secret: Option<String>,
    /// Imported from a file; relative paths are relative to the SPEC file.
    secret_file: Option<PathBuf>,
    api_key: Option<String>,
    env: Option<String>,
}

fn default_backend() -> String {
    "pkcs11".into()
}

/// What `up` records for `down` (and for curious users) in DIR/testenv.json.
#[derive(Serialize, Deserialize)]
struct State {
    marker: String,
    dir: PathBuf,
    home: PathBuf,
    socket: PathBuf,
    softhsm2_conf: PathBuf,
    module: PathBuf,
    token_label: String,
    agent_pid: u32,
    agent_log: PathBuf,
    keys: Vec<Value>,
}

pub fn run(ctx: &Ctx, cmd: TestenvCmd) -> Result<()> {
    match cmd {
        TestenvCmd::Up { dir, keys, module } => up(ctx, dir, keys, &module),
        TestenvCmd::Down { dir } => down(ctx, dir),
    }
}

// ---- up ---------------------------------------------------------------------------------

fn up(ctx: &Ctx, dir: Option<PathBuf>, spec: Option<PathBuf>, module: &Path) -> Result<()> {
    // Read the SPEC before creating anything: a typo must not leave a half-built testenv.
    let spec_keys = match &spec {
        Some(p) => load_spec(p)?,
        None => Vec::new(),
    };
    let dir = create_dir(dir)?;
    let mut agent_pid = None;
    match build(&dir, &spec_keys, module, &mut agent_pid) {
        Ok(state) => {
            print_env(ctx, &state);
            Ok(())
        }
        Err(e) => {
            // Leave nothing behind on failure: the caller has no state file to `down` with.
            if let Some(pid) = agent_pid {
                stop_pid(pid);
            }
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn load_spec(path: &Path) -> Result<Vec<SpecKey>> {
    let md =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if md.len() > MAX_SPEC {
        return Err(Error::TooLarge(format!(
            "{} is larger than {MAX_SPEC} bytes",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let spec: Spec = toml::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut keys = spec.keys;
    let mut seen = std::collections::BTreeSet::new();
    for k in &mut keys {
        KeyName::new(&k.name)
            .map_err(|e| Error::Config(format!("{}: key name: {e}", path.display())))?;
        if !seen.insert(k.name.clone()) {
            return Err(Error::Config(format!(
                "{}: key `{}` is listed twice",
                path.display(),
                k.name
            )));
        }
        k.key_type.parse::<KeyType>().map_err(|e| {
            Error::Config(format!("{}: key `{}`: type: {e}", path.display(), k.name))
        })?;
        if !matches!(k.backend.as_str(), "pkcs11" | "soft") {
            return Err(Error::Config(format!(
                "{}: key `{}`: backend must be \"pkcs11\" or \"soft\"",
                path.display(),
                k.name
            )));
        }
        if k.secret.is_some() && k.secret_file.is_some() {
            return Err(Error::Config(format!(
                "{}: key `{}`: set `secret` or `secret_file`, not both",
                path.display(),
                k.name
            )));
        }
        if let Some(f) = &k.secret_file {
            if f.is_relative() {
                k.secret_file = Some(base.join(f));
            }
        }
    }
    Ok(keys)
}

/// The testenv directory, absolute and private. A given dir may exist only if it is empty.
fn create_dir(dir: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => {
            match std::fs::read_dir(&d) {
                Ok(mut rd) => {
                    if rd.next().is_some() {
                        return Err(Error::AlreadyExists(format!(
                            "{} exists and is not empty",
                            d.display()
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&d)
                        .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
                }
                Err(e) => return Err(Error::io(format!("reading {}", d.display()), e)),
            }
            d
        }
        None => {
            let mut r = [0u8; 6];
            aws_lc_rs::rand::fill(&mut r).map_err(|_| Error::Internal("random name".into()))?;
            let d = std::env::temp_dir().join(format!("keyward-testenv-{}", hex::encode(r)));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
            d
        }
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
    // Absolute: the paths go into config files and environment variables used elsewhere.
    dir.canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))
}

/// Random printable secret (hex) of `n` random bytes.
fn random_secret(n: usize) -> Result<SecretBytes> {
    let mut r = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut r).map_err(|_| Error::Internal("random secret".into()))?;
    let s = SecretBytes::new(hex::encode(&r).into_bytes());
    zeroize::Zeroize::zeroize(&mut r);
    Ok(s)
}

fn build(
    dir: &Path,
    keys: &[SpecKey],
    module: &Path,
    agent_pid: &mut Option<u32>,
) -> Result<State> {
    let socket = dir.join("agent.sock");
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::BadRequest(format!(
            "{} is too long for a Unix socket; pass a shorter --dir",
            socket.display()
        )));
    }

    // SoftHSM: a private config and token directory, never the system one.
    let hsm_dir = dir.join("softhsm");
    let tokens = hsm_dir.join("tokens");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&tokens)
        .map_err(|e| Error::io(format!("creating {}", tokens.display()), e))?;
    let conf = hsm_dir.join("softhsm2.conf");
    home::atomic_write(
        &conf,
        format!(
            "# written by keyward testenv\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        )
        .as_bytes(),
    )?;
    // SoftHSM reads SOFTHSM2_CONF once, at C_Initialize; nothing has loaded the module yet in
    // this single-threaded process, and every child (key commands, the agent) inherits it.
    std::env::set_var("SOFTHSM2_CONF", &conf);

    let so_pin_file = dir.join("so-pin");
    let pin_file = dir.join("user-pin");
    let pass_file = dir.join("passphrase");
    let so_pin = random_secret(16)?;
    let user_pin = random_secret(16)?;
    let pass = random_secret(24)?;
    home::atomic_write(&so_pin_file, so_pin.expose())?;
    home::atomic_write(&pin_file, user_pin.expose())?;
    home::atomic_write(&pass_file, pass.expose())?;
    keyward::backend::pkcs11::init_token(module, TOKEN_LABEL, &so_pin, &user_pin)?;

    // The home: config pointing at the token and the socket, identity with a fast KDF.
    let home = Home::at(&dir.join("home"));
    home.create_dirs()?;
    let config = Config {
        agent: AgentConfig {
            socket: Some(socket.clone()),
            passphrase: Some(format!("file:{}", pass_file.display())),
            ..AgentConfig::default()
        },
        pkcs11: BTreeMap::from([(
            TOKEN_ALIAS.to_string(),
            TokenConfig {
                module: module.to_path_buf(),
                label: Some(TOKEN_LABEL.into()),
                serial: None,
                pin: format!("file:{}", pin_file.display()),
                sessions: 0,
                timeout_ms: 2000,
            },
        )]),
        ..Config::default()
    };
    let text = toml::to_string_pretty(&config)
        .map_err(|e| Error::Internal(format!("writing keyward.toml: {e}")))?;
    home::atomic_write(
        &home.config_path(),
        format!("# written by keyward testenv\n{text}").as_bytes(),
    )?;
    keyward::identity::create(&home, &pass, Some(10))?;

    let exe = std::env::current_exe().map_err(|e| Error::io("locating the keyward binary", e))?;
    for k in keys {
        provision(&exe, &home, &socket, k)?;
    }

    let log = dir.join("agent.log");
    let pid = start_agent(&exe, &home, &socket, &pass_file, &log)?;
    *agent_pid = Some(pid);

    let store = Keystore::new(&home);
    let mut described = Vec::new();
    for k in keys {
        described.push(describe_key(&store, &k.name)?);
    }
    let state = State {
        marker: MARKER.into(),
        dir: dir.to_path_buf(),
        home: home.root().to_path_buf(),
        socket,
        softhsm2_conf: conf,
        module: module.to_path_buf(),
        token_label: TOKEN_LABEL.into(),
        agent_pid: pid,
        agent_log: log,
        keys: described,
    };
    let data = serde_json::to_vec_pretty(&state).map_err(|e| Error::Internal(e.to_string()))?;
    home::atomic_write(&dir.join(STATE_FILE), &data)?;
    Ok(state)
}

/// Create one SPEC key with the real CLI, exactly as an operator would.
fn provision(exe: &Path, home: &Home, socket: &Path, k: &SpecKey) -> Result<()> {
    let mut cmd = Command::new(exe);
    cmd.arg("--home").arg(home.root()).arg("--json").arg("key");
    let imported = k.secret.is_some() || k.secret_file.is_some();
    cmd.arg(if imported { "import" } else { "generate" })
        .arg(&k.name)
        .arg("--type")
        .arg(&k.key_type)
        .arg("--backend")
        .arg(&k.backend);
    if k.backend == "pkcs11" {
        cmd.arg("--token").arg(TOKEN_ALIAS);
    }
    if let Some(a) = &k.api_key {
        cmd.arg("--api-key").arg(a);
    }
    if let Some(e) = &k.env {
        cmd.arg("--env").arg(e);
    }
    if let Some(f) = &k.secret_file {
        cmd.arg("--file").arg(f);
    } else if k.secret.is_some() {
        // The secret goes on stdin, never argv.
        cmd.arg("--file").arg("-");
    }
    cmd.env("KEYWARD_SOCK", socket)
        .env_remove("KEYWARD_HOME")
        .stdin(if k.secret.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("running keyward key", e))?;
    if let (Some(secret), Some(mut stdin)) = (&k.secret, child.stdin.take()) {
        stdin
            .write_all(secret.as_bytes())
            .map_err(|e| Error::io("passing the secret to keyward key import", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("waiting for keyward key", e))?;
    if out.status.success() {
        return Ok(());
    }
    // Re-raise the child's own error with its stable code, naming the key.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let parsed = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find_map(|v| v.get("error").cloned());
    Err(match parsed {
        Some(e) => Error::from_code(
            e["code"].as_str().unwrap_or("internal"),
            format!(
                "provisioning key `{}`: {}",
                k.name,
                e["message"].as_str().unwrap_or_default()
            ),
            None,
        ),
        None => Error::Internal(format!(
            "provisioning key `{}` failed: {}",
            k.name,
            stderr.trim()
        )),
    })
}

/// Run `keyward agent --foreground` detached from our stdio, wait until it answers `status`.
fn start_agent(exe: &Path, home: &Home, socket: &Path, pass: &Path, log: &Path) -> Result<u32> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::io("duplicating the log handle", e))?;
    let mut child = Command::new(exe)
        .arg("--home")
        .arg(home.root())
        .arg("agent")
        .arg("--foreground")
        .arg("--socket")
        .arg(socket)
        .arg("--passphrase")
        .arg(format!("file:{}", pass.display()))
        .env("KEYWARD_SOCK", socket)
        .env_remove("KEYWARD_HOME")
        // A log file, not our pipes: a caller reading our output to EOF (subprocess.run,
        // `$(...)`) would otherwise wait for the agent to exit.
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        // Own process group: a Ctrl-C aimed at the test runner's foreground job must not
        // kill the agent out from under `down`.
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("starting the agent", e))?;
    let pid = child.id();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| l.starts_with("error["))
                .unwrap_or("");
            return Err(Error::AgentUnreachable(format!(
                "the agent exited ({status}) during start-up: {last} (log: {})",
                log.display()
            )));
        }
        if let Ok(mut c) = Client::connect(socket) {
            let _ = c.set_timeout(Some(Duration::from_secs(5)));
            if c.status().is_ok() {
                return Ok(pid);
            }
        }
        if Instant::now() > deadline {
            stop_pid(pid);
            return Err(Error::AgentUnreachable(format!(
                "the agent did not answer within {}s; see {}",
                READY_TIMEOUT.as_secs(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn describe_key(store: &Keystore, name: &str) -> Result<Value> {
    let meta = store.get(&KeyName::new(name)?)?;
    let v = meta.current_version()?;
    let public_key = match v.spki_der()? {
        Some(spki) => {
            keyward::pubkey::encode(meta.key_type, &spki, keyward::pubkey::Format::Pem, name)?
        }
        None => Value::Null,
    };
    Ok(json!({
        "name": name,
        "type": meta.key_type.to_string(),
        "backend": meta.backend.to_string(),
        "fingerprint": v.fingerprint,
        "public_key": public_key,
    }))
}

fn env_pairs(s: &State) -> [(&'static str, String); 4] {
    [
        ("KEYWARD_SOCK", s.socket.display().to_string()),
        ("KEYWARD_HOME", s.home.display().to_string()),
        ("SOFTHSM2_CONF", s.softhsm2_conf.display().to_string()),
        ("KEYWARD_TESTENV_DIR", s.dir.display().to_string()),
    ]
}

fn print_env(ctx: &Ctx, s: &State) {
    let pairs = env_pairs(s);
    let mut v = json!({
        "dir": s.dir.display().to_string(),
        "agent_pid": s.agent_pid,
        "agent_log": s.agent_log.display().to_string(),
        "token_label": s.token_label,
        "keys": s.keys,
    });
    let mut env = serde_json::Map::new();
    for (k, val) in &pairs {
        v[*k] = json!(val);
        env.insert((*k).to_string(), json!(val));
    }
    v["env"] = Value::Object(env);
    ctx.emit(&v, || {
        let mut out = String::new();
        for (k, val) in &pairs {
            out.push_str(&format!("export {k}={}\n", shell_quote(val)));
        }
        out.push_str(&format!(
            "# keyward testenv: agent pid {}, {} key(s); stop with: keyward testenv down --dir {}",
            s.agent_pid,
            s.keys.len(),
            shell_quote(&s.dir.display().to_string())
        ));
        out
    });
}

/// Single-quote for POSIX shells unless the value is plainly safe.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:+=,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// ---- down -------------------------------------------------------------------------------

fn down(ctx: &Ctx, dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir.or_else(|| std::env::var_os("KEYWARD_TESTENV_DIR").map(PathBuf::from)) {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => {
            return Err(Error::BadRequest(
                "pass --dir DIR (or set KEYWARD_TESTENV_DIR)".into(),
            ))
        }
    };
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotInitialized(format!(
                "{} is not a keyward testenv (no {STATE_FILE}); nothing removed",
                dir.display()
            ))
        } else {
            Error::io(format!("reading {}", state_path.display()), e)
        }
    })?;
    let state: State = serde_json::from_str(&text)
        .ok()
        .filter(|s: &State| s.marker == MARKER)
        .ok_or_else(|| {
            Error::Config(format!(
                "{} was not written by keyward testenv; nothing removed",
                state_path.display()
            ))
        })?;
    // The recorded agent, plus any agent (re)started on this home since `up`.
    let home_arg = state.home.display().to_string();
    let mut pids: Vec<u32> = agents_of(&home_arg);
    if is_our_agent(state.agent_pid, &home_arg) && !pids.contains(&state.agent_pid) {
        pids.push(state.agent_pid);
    }
    let mut stopped = Vec::new();
    for pid in pids {
        if stop_pid(pid) {
            stopped.push(pid);
        }
    }
    std::fs::remove_dir_all(&dir)
        .map_err(|e| Error::io(format!("removing {}", dir.display()), e))?;
    let d = dir.display().to_string();
    ctx.emit(&json!({"dir": d, "stopped": stopped}), || {
        format!("testenv down: stopped agent pid(s) {stopped:?}, removed {d}")
    });
    Ok(())
}

/// The argv of a live (non-zombie) process, or None.
fn live_cmdline(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the last ')' (the command name may contain anything).
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is a keyward agent serving this home (guards against a recycled pid).
fn is_our_agent(pid: u32, home: &str) -> bool {
    live_cmdline(pid).is_some_and(|args| {
        args.windows(2).any(|w| w[0] == "--home" && w[1] == home)
            && args.iter().any(|a| a == "agent")
    })
}

/// Every live agent process whose `--home` is this testenv's home.
fn agents_of(home: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && is_our_agent(*pid, home))
        .collect()
}

/// SIGTERM, SIGKILL after the grace period; true once the process is gone (or a zombie
/// waiting for its new parent to reap it).
fn stop_pid(pid: u32) -> bool {
    if live_cmdline(pid).is_none() {
        return false;
    }
    let _ = keyward::sys::send_signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if live_cmdline(pid).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = keyward::sys::send_signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && live_cmdline(pid).is_some() {
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// kill(1): the binary forbids unsafe code and keyward::sys has no signal wrapper yet.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/tmp/a-b_c.d"), "/tmp/a-b_c.d");
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
