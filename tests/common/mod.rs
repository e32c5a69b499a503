//! Shared harness for the integration tests: a throw-away keyward home, a wrapper that runs the
//! real `keyward` binary and records everything it prints, and an `Agent` guard that runs
//! `keyward agent --foreground` on a private socket and stops it when dropped.
//!
//! Every test gets its own temp directory, home and socket, so tests run in parallel.
#![allow(dead_code)]

pub mod softhsm;
pub mod swtpm;
pub mod token_home;
pub mod verify;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyward::client::Client;
use serde_json::Value;

/// The passphrase of every test home (written to a 0600 file, never passed in argv).
pub const PASSPHRASE: &str = "kw-test-passphrase-51e0c7d2b9";

/// How long one CLI command may run before the test fails (RSA-4096 generation included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the agent may take to answer `status` after being spawned.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of a client call (a hang fails the test instead of blocking it forever).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn keyward_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keyward"))
}

/// What one CLI invocation did.
#[derive(Debug, Clone)]
pub struct Output {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The output of a command that must have succeeded.
    pub fn expect_success(self) -> Output {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// The error code the CLI printed: `error[<code>]` on stderr, or `{"error":{"code":..}}`.
    pub fn error_code(&self) -> Option<String> {
        if let Some(v) = self.json_error() {
            return v["code"].as_str().map(str::to_owned);
        }
        let start = self.stderr.find("error[")? + "error[".len();
        let end = self.stderr[start..].find(']')? + start;
        Some(self.stderr[start..end].to_string())
    }

    /// The `error` object of `--json` error output, if stderr holds one.
    pub fn json_error(&self) -> Option<Value> {
        self.stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .chain(serde_json::from_str::<Value>(self.stderr.trim()).ok())
            .find_map(|v| v.get("error").cloned())
    }

    /// stdout parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout of {:?} is not JSON ({e}):\n{self}", self.args))
    }

    /// Panic unless the command failed with `code` (exit status 1, code on stderr).
    pub fn assert_error(&self, code: &str) {
        assert!(
            !self.success(),
            "{:?} should have failed with {code}:\n{self}",
            self.args
        );
        assert_eq!(
            self.status.code(),
            Some(1),
            "{:?} should exit 1 on error {code}:\n{self}",
            self.args
        );
        assert_eq!(
            self.error_code().as_deref(),
            Some(code),
            "{:?} printed the wrong error code:\n{self}",
            self.args
        );
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- {:?} exited {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}

/// Numbers import source files, so key names never shape a path in the test.
static IMPORT_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A temp directory holding a keyward home, a passphrase file and the socket location.
pub struct TestHome {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub pass_file: PathBuf,
    pub sock: PathBuf,
    /// Everything every command printed (for the secret-leak scan).
    transcript: Mutex<Vec<u8>>,
}

impl TestHome {
    /// A fresh, initialised home (scrypt work factor 10 so init and unlock are fast).
    pub fn new() -> TestHome {
        let h = TestHome::uninitialized();
        h.init().expect_success();
        assert!(
            h.home.join("identity.age").is_file(),
            "init did not create identity.age"
        );
        h
    }

    /// The directory layout without running `init`. The passphrase file exists (mode 0600).
    pub fn uninitialized() -> TestHome {
        let dir = tempfile::Builder::new()
            .prefix("kwtest-")
            .tempdir()
            .expect("creating a temp dir");
        let home = dir.path().join("home");
        let pass_file = dir.path().join("pass");
        write_private(&pass_file, format!("{PASSPHRASE}\n").as_bytes());
        let sock = dir.path().join("s").join("agent.sock");
        TestHome {
            dir,
            home,
            pass_file,
            sock,
            transcript: Mutex::new(Vec::new()),
        }
    }

    pub fn pass_source(&self) -> String {
        format!("file:{}", self.pass_file.display())
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.home.join("keys")
    }

    /// A path inside the temp dir (outside the home).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `keyward --home H` with a clean environment pointing at this test's socket.
    pub fn command(&self) -> Command {
        let mut c = Command::new(keyward_bin());
        c.arg("--home").arg(&self.home);
        c.env("KEYWARD_SOCK", &self.sock)
            .env_remove("KEYWARD_HOME")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("KEYWARD_PASSPHRASE")
            .env("NO_COLOR", "1");
        c
    }

    /// Run the CLI with `args`, stdin empty.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_full(args, None, &[])
    }

    /// Run the CLI feeding `input` on stdin.
    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        self.run_full(args, Some(input), &[])
    }

    pub fn run_full(&self, args: &[&str], input: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
        let mut c = self.command();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = run_command(c, input);
        self.record(&out);
        out
    }

    fn record(&self, out: &Output) {
        let mut t = self.transcript.lock().expect("transcript lock");
        t.extend_from_slice(out.stdout.as_bytes());
        t.push(b'\n');
        t.extend_from_slice(out.stderr.as_bytes());
        t.push(b'\n');
    }

    /// Everything the CLI printed so far in this home.
    pub fn transcript(&self) -> Vec<u8> {
        self.transcript.lock().expect("transcript lock").clone()
    }

    /// Run and require success.
    /// `keyward init` with the test passphrase file and a fast scrypt (work factor 10).
    pub fn init(&self) -> Output {
        self.run(&[
            "init",
            "--passphrase",
            &self.pass_source(),
            "--kdf-work-factor",
            "10",
        ])
    }

    /// `key import NAME --type hmac-sha256 --file SRC --shred --passphrase SOURCE`.
    pub fn import_shred(&self, name: &str, src: &Path, passphrase: &str) -> Output {
        self.run(&[
            "key",
            "import",
            name,
            "--type",
            "hmac-sha256",
            "--file",
            &src.display().to_string(),
            "--shred",
            "--passphrase",
            passphrase,
        ])
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        self.run(args).expect_success()
    }

    pub fn generate(&self, name: &str, key_type: &str) -> Output {
        self.ok(&["key", "generate", name, "--type", key_type])
    }

    /// Write `material` to a 0600 file in the temp dir and import it with `--file`.
    pub fn import(&self, name: &str, key_type: Option<&str>, material: &[u8]) -> Output {
        // The name may be hostile (`../x`): never let it shape the source file's path.
        let n = IMPORT_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let src = self.path(&format!("import-{n}"));
        write_private(&src, material);
        let src_s = src.display().to_string();
        let mut args = vec!["key", "import", name, "--file", &src_s];
        if let Some(t) = key_type {
            args.extend(["--type", t]);
        }
        let out = self.run(&args);
        let _ = fs::remove_file(&src);
        out
    }

    /// Import and require success.
    pub fn import_ok(&self, name: &str, key_type: Option<&str>, material: &[u8]) -> Output {
        let out = self.import(name, key_type, material);
        assert!(out.success(), "import of {name} failed:\n{out}");
        out
    }

    /// Key names from `keyward --json key list`.
    pub fn listed_keys(&self) -> Vec<String> {
        let out = self.ok(&["--json", "key", "list"]);
        key_names(&out.json())
            .unwrap_or_else(|| panic!("`key list --json` has no recognisable key list:\n{out}"))
    }

    /// File names in keys/ (sorted); empty when the directory does not exist.
    pub fn key_files(&self) -> Vec<String> {
        list_dir(&self.keys_dir())
    }

    /// Start the agent on this home's socket and wait until it answers `status`.
    pub fn agent(&self) -> Agent {
        self.agent_with_env(&[])
    }

    pub fn agent_with_env(&self, env: &[(&str, &str)]) -> Agent {
        Agent::start(self, env)
    }

    /// Spawn `keyward agent --foreground` without waiting for it (for start-up failures).
    pub fn spawn_agent_raw(&self, passphrase_source: &str, log_prefix: &str) -> AgentProcess {
        let stdout_path = self.path(&format!("{log_prefix}.stdout"));
        let stderr_path = self.path(&format!("{log_prefix}.stderr"));
        let mut c = self.command();
        c.args(["agent", "--foreground", "--passphrase", passphrase_source])
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                fs::File::create(&stdout_path).expect("creating agent stdout file"),
            ))
            .stderr(Stdio::from(
                fs::File::create(&stderr_path).expect("creating agent stderr file"),
            ));
        let child = c.spawn().expect("spawning keyward agent");
        AgentProcess {
            child,
            stdout_path,
            stderr_path,
        }
    }
}

/// A daemon started by `keyward agent` (background mode); SIGKILLed on drop if still alive.
pub struct BackgroundAgent {
    pub pid: u32,
    /// What `keyward agent` printed on stdout and stderr.
    pub printed: String,
}

impl BackgroundAgent {
    pub fn alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }
}

impl Drop for BackgroundAgent {
    fn drop(&mut self) {
        if self.alive() {
            signal(self.pid, libc::SIGKILL);
        }
    }
}

impl TestHome {
    /// Run `keyward agent` (no --foreground) with `env`, require it to return 0 and the socket
    /// to answer; the daemon's pid comes from `status`.
    pub fn background_agent(
        &self,
        passphrase_source: &str,
        env: &[(&str, &str)],
    ) -> BackgroundAgent {
        let out_path = self.path("bg.stdout");
        let err_path = self.path("bg.stderr");
        let mut cmd = self.command();
        cmd.args(["agent", "--passphrase", passphrase_source])
            .stdin(Stdio::null())
            // Files, not pipes: a daemon that kept a pipe open would hang a pipe reader.
            .stdout(fs::File::create(&out_path).expect("bg stdout"))
            .stderr(fs::File::create(&err_path).expect("bg stderr"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning keyward agent");
        let mut status = None;
        let finished = wait_until(Duration::from_secs(30), || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        let printed = || {
            format!(
                "{}{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            )
        };
        if !finished {
            let _ = child.kill();
            panic!("`keyward agent` (background) did not return\n{}", printed());
        }
        let status = status.expect("exit status");
        assert!(
            status.success(),
            "background start failed ({status})\n{}",
            printed()
        );
        let mut c = Client::connect(&self.sock)
            .unwrap_or_else(|e| panic!("the background agent does not answer: {e}\n{}", printed()));
        c.set_timeout(Some(CALL_TIMEOUT)).expect("timeout");
        let pid = c.status().expect("status of the background agent").pid;
        BackgroundAgent {
            pid,
            printed: printed(),
        }
    }
}

/// Key names from a `key list --json` document: an array of keys or `{"keys": [...]}`.
pub fn key_names(v: &Value) -> Option<Vec<String>> {
    let arr = match v {
        Value::Array(a) => a,
        Value::Object(o) => o.get("keys")?.as_array()?,
        _ => return None,
    };
    arr.iter()
        .map(|k| k.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// Sorted file names in a directory (empty if it does not exist).
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("reading a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    names.sort();
    names
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Create (or replace) a file with mode 0600.
pub fn write_private(path: &Path, data: &[u8]) {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    f.write_all(data).expect("writing a private file");
}

/// Run a command with a timeout, capturing stdout and stderr.
pub fn run_command(mut c: Command, input: Option<&[u8]>) -> Output {
    let args: Vec<String> = std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    c.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    let pid = child.id();
    if let Some(data) = input {
        let mut stdin = child.stdin.take().expect("child stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(r) => r.unwrap_or_else(|e| panic!("waiting for {args:?}: {e}")),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("{args:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    };
    Output {
        args,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn signal(pid: u32, sig: i32) {
    let pid = i32::try_from(pid).expect("pid fits i32");
    // SAFETY: kill(2) on a pid of a child this test spawned; no memory is involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A spawned agent process that may or may not come up.
pub struct AgentProcess {
    pub child: Child,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl AgentProcess {
    pub fn log(&self) -> String {
        let out = fs::read_to_string(&self.stdout_path).unwrap_or_default();
        let err = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        format!("--- agent stdout:\n{out}\n--- agent stderr:\n{err}")
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Wait up to `limit` for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait on the agent") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(st) = self.child.try_wait().expect("try_wait on the agent") {
            return st;
        }
        signal(self.child.id(), libc::SIGTERM);
        if let Some(st) = self.wait_exit(Duration::from_secs(5)) {
            return st;
        }
        let _ = self.child.kill();
        self.child.wait().expect("waiting for the killed agent")
    }
}

/// A running agent; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Agent {
    pub proc: AgentProcess,
    pub sock: PathBuf,
    pub pid: u32,
}

impl Agent {
    fn start(home: &TestHome, env: &[(&str, &str)]) -> Agent {
        let stdout_path = home.path("agent.stdout");
        let stderr_path = home.path("agent.stderr");
        let mut c = home.command();
        c.args(["agent", "--foreground", "--passphrase", &home.pass_source()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stdout_path)
                    .expect("creating agent stdout file"),
            ))
            .stderr(Stdio::from(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr_path)
                    .expect("creating agent stderr file"),
            ));
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().expect("spawning keyward agent");
        let pid = child.id();
        let mut agent = Agent {
            proc: AgentProcess {
                child,
                stdout_path,
                stderr_path,
            },
            sock: home.sock.clone(),
            pid,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        let mut last_err = String::from("socket not created yet");
        loop {
            if let Some(st) = self.proc.child.try_wait().expect("try_wait on the agent") {
                panic!(
                    "the agent exited during start-up with {st}\n{}",
                    self.proc.log()
                );
            }
            if self.sock.exists() {
                match Client::connect(&self.sock).and_then(|mut c| {
                    c.set_timeout(Some(Duration::from_secs(2)))?;
                    c.status()
                }) {
                    Ok(_) => return,
                    Err(e) => last_err = format!("{} ({e})", e.code()),
                }
            }
            if start.elapsed() > AGENT_READY_TIMEOUT {
                panic!(
                    "the agent did not answer `status` within {AGENT_READY_TIMEOUT:?}: {last_err}\n{}",
                    self.proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A blocking client with a call timeout.
    pub fn client(&self) -> Client {
        let c = Client::connect(&self.sock)
            .unwrap_or_else(|e| panic!("connecting to the agent: {e}\n{}", self.proc.log()));
        c.set_timeout(Some(CALL_TIMEOUT))
            .expect("setting the client timeout");
        c
    }

    /// A raw socket connection (read timeout set) for hand-made frames.
    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock)
            .unwrap_or_else(|e| panic!("connecting to the agent: {e}\n{}", self.proc.log()));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        s.set_write_timeout(Some(Duration::from_secs(20)))
            .expect("write timeout");
        s
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.proc
            .child
            .try_wait()
            .expect("try_wait on the agent")
            .is_none()
    }

    /// A fresh connection answers `status` (the agent survived whatever came before).
    pub fn assert_serving(&mut self, after: &str) {
        assert!(
            self.alive(),
            "the agent died after {after}\n{}",
            self.proc.log()
        );
        let mut c = self.client();
        let st = c
            .status()
            .unwrap_or_else(|e| panic!("status after {after} failed: {e}\n{}", self.proc.log()));
        assert_eq!(st.pid, self.pid, "status reports another pid");
    }

    /// Stop the agent gracefully and return how it exited.
    pub fn stop(mut self) -> ExitStatus {
        self.proc.terminate()
    }

    /// SIGKILL the agent (no clean-up runs) and reap it.
    pub fn kill9(mut self) -> ExitStatus {
        let _ = self.proc.child.kill();
        self.proc
            .child
            .wait()
            .expect("waiting for the killed agent")
    }

    /// Resident set size of the agent in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let st = fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("agent status");
        st.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS line")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.terminate();
    }
}

// ---- raw frames -------------------------------------------------------------------------

/// 4-byte big-endian length + body (written by hand, independent of the library's framing).
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

pub fn write_frame(s: &mut UnixStream, body: &[u8]) {
    s.write_all(&frame(body)).expect("writing a frame");
}

/// What reading one frame produced.
#[derive(Debug)]
pub enum Read1 {
    Frame(Value),
    /// Clean end of stream (or a reset) before any byte of a frame.
    Closed,
}

/// Read one response frame; panics on timeout or a malformed frame.
pub fn read_frame(s: &mut UnixStream) -> Read1 {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match s.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Read1::Closed,
            Ok(0) => panic!("the agent closed the connection inside a length prefix"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && got == 0 => {
                return Read1::Closed
            }
            Err(e) => panic!("reading a response frame: {e}"),
        }
    }
    let n = u32::from_be_bytes(len) as usize;
    assert!(n <= 1 << 20, "response frame of {n} bytes");
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).expect("reading a response body");
    Read1::Frame(serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "response is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    }))
}

/// Read one frame that must be there.
pub fn read_response(s: &mut UnixStream) -> Value {
    match read_frame(s) {
        Read1::Frame(v) => v,
        Read1::Closed => panic!("the agent closed the connection instead of answering"),
    }
}

/// Send one JSON request body and read one response.
pub fn roundtrip(s: &mut UnixStream, body: &[u8]) -> Value {
    write_frame(s, body);
    read_response(s)
}

/// The error code of a response, asserting it is an error response.
pub fn error_code(resp: &Value) -> String {
    assert_eq!(resp["ok"], Value::Bool(false), "expected an error: {resp}");
    resp["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error response without a code: {resp}"))
        .to_string()
}

// ---- misc ---------------------------------------------------------------------------------

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .unwrap_or_else(|e| panic!("not base64 ({e}): {s:?}"))
}

/// `n` random bytes that never end in a newline: HMAC secrets (the main use) are read as files
/// and lose one trailing newline (`SecretBytes::trim_one_newline`, for secrets saved with an
/// editor), so a random secret ending in `\n` — 1 in 256 — would not round-trip and the test
/// comparing against it would fail by chance.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .expect("reading /dev/urandom");
    if let Some(last) = v.last_mut() {
        if *last == b'\n' {
            *last = b'n';
        }
    }
    v
}

pub fn key_name(s: &str) -> keyward::KeyName {
    keyward::KeyName::new(s).expect("a valid key name")
}

/// Run an external tool (openssl, ssh-keygen) and require success.
pub fn tool(program: &str, args: &[&str]) -> Output {
    let mut c = Command::new(program);
    c.args(args);
    let out = run_command(c, None);
    assert!(out.success(), "{program} failed:\n{out}");
    out
}

/// Poll `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
