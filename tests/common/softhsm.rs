//! A private SoftHSM 2 for integration tests: a temp directory with its own `softhsm2.conf`
//! (`directories.tokendir = <dir>/tokens`, file object store), random SO and user PINs in 0600
//! files, and initialised tokens. The system token directory is never touched.
//!
//! # One SoftHSM configuration per test binary
//!
//! SoftHSM reads `SOFTHSM2_CONF` from the process environment once, at `C_Initialize`, and a
//! PKCS#11 module is initialised once per process (keyward shares one module context per library
//! file). So every test in ONE process necessarily sees ONE configuration. Therefore:
//!
//! * A test binary uses [`SoftHsm::shared`]: one `OnceLock` SoftHsm whose configuration is put
//!   into `SOFTHSM2_CONF` once, before any module is loaded (the first call does it; call it
//!   first in every test). Tests isolate themselves with their own token in that configuration
//!   ([`SoftHsm::token`], one distinct label per test), so they still run in parallel and never
//!   see each other's keys or login state (PKCS#11 login state is per token).
//! * [`SoftHsm::new`] itself sets nothing global; use it directly only for a SoftHSM that this
//!   process never loads (e.g. one used only by child processes).
//! * Child processes (`pkcs11-tool`, `softhsm2-util`, the `keyward` binary) get the environment
//!   explicitly ([`SoftHsm::command`], [`SoftHsm::env`]); nothing relies on inheritance.
//! * Tokens are created IN this process (through `keyward::backend::pkcs11::init_token`) once
//!   the process uses this configuration: SoftHSM enumerates token directories at
//!   `C_Initialize`, so a token that another process (e.g. `softhsm2-util`) creates while the
//!   module is loaded here stays invisible to this process until the module is finalised.
//!   Objects (keys) created by other processes on an existing token ARE seen.
//! * A test that needs the module finalised and re-initialised (device loss: a token that
//!   disappears and comes back is only rediscovered by a fresh `C_Initialize`, which keyward does
//!   only when no other token of the process uses the module) must run in its own process: see
//!   [`run_in_child`].
//!
//! The shared directory is removed when the test process exits (an `atexit` handler).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use keyward::config::TokenConfig;
use keyward::secret::SecretBytes;

use super::{run_command, write_private, Output};

/// Debian's SoftHSM module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The label of the token every SoftHsm starts with.
pub const DEFAULT_LABEL: &str = "keyward";

/// A private SoftHSM configuration with its own token directory (see the module doc).
pub struct SoftHsm {
    /// Removed on drop (instances from `new`); the shared one is removed at process exit.
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
    conf: PathBuf,
    so_pin_file: PathBuf,
    pin_file: PathBuf,
    /// Labels of the tokens made so far. Token creation is serialised under this lock: it takes
    /// the module's single free slot, and the new token directory is found by comparing listings.
    labels: Mutex<Vec<String>>,
    default_dir: PathBuf,
}

/// One token of a [`SoftHsm`], selected by its label.
pub struct Token<'a> {
    hsm: &'a SoftHsm,
    label: String,
    dir: PathBuf,
}

static SHARED: OnceLock<SoftHsm> = OnceLock::new();
static SHARED_ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_shared_dir() {
    if let Some(root) = SHARED_ROOT.get() {
        let _ = fs::remove_dir_all(root);
    }
}

impl SoftHsm {
    /// A new temp directory with `softhsm2.conf`, random PINs (0600 files) and the token
    /// [`DEFAULT_LABEL`], initialised by `softhsm2-util` run with this configuration only.
    /// Sets nothing in this process's environment.
    pub fn new() -> SoftHsm {
        let dir = tempfile::Builder::new()
            .prefix("keyward-softhsm-")
            .tempdir()
            .expect("temp dir for SoftHSM");
        let mut hsm = SoftHsm::in_dir(dir.path().to_path_buf());
        hsm._dir = Some(dir);
        hsm
    }

    fn in_dir(root: PathBuf) -> SoftHsm {
        assert!(
            Path::new(MODULE).is_file(),
            "SoftHSM module {MODULE} missing: apt-get install softhsm2"
        );
        let tokens = root.join("tokens");
        fs::create_dir_all(&tokens).expect("token dir");
        let conf = root.join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("writing softhsm2.conf");
        let so_pin_file = root.join("so-pin");
        let pin_file = root.join("user-pin");
        write_private(&so_pin_file, hex::encode(super::random_bytes(8)).as_bytes());
        write_private(&pin_file, hex::encode(super::random_bytes(8)).as_bytes());
        let mut hsm = SoftHsm {
            _dir: None,
            root,
            conf,
            so_pin_file,
            pin_file,
            labels: Mutex::new(vec![DEFAULT_LABEL.to_string()]),
            default_dir: PathBuf::new(),
        };
        let before = hsm.token_dirs();
        let so = hsm.so_pin_string();
        let user = hsm.pin_string();
        let mut c = hsm.command("softhsm2-util");
        c.args([
            "--init-token",
            "--free",
            "--label",
            DEFAULT_LABEL,
            "--so-pin",
            &so,
            "--pin",
            &user,
        ]);
        let out = run_command(c, None);
        assert!(out.success(), "softhsm2-util --init-token failed:\n{out}");
        hsm.default_dir = hsm.new_token_dir(&before);
        hsm
    }

    /// The SoftHsm of this test binary: created on first use, its configuration exported as
    /// `SOFTHSM2_CONF` (once, before any PKCS#11 module is loaded), removed at exit.
    pub fn shared() -> &'static SoftHsm {
        SHARED.get_or_init(|| {
            let root = std::env::temp_dir().join(format!(
                "keyward-softhsm-{}-{}",
                std::process::id(),
                hex::encode(super::random_bytes(4))
            ));
            fs::create_dir(&root).expect("shared SoftHSM dir");
            fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .expect("chmod 700");
            SHARED_ROOT.set(root.clone()).expect("shared root set once");
            // SAFETY: registering a plain extern "C" fn without captured state.
            unsafe {
                libc::atexit(remove_shared_dir);
            }
            let hsm = SoftHsm::in_dir(root);
            // The one process-wide setting, made before this process loads any module.
            std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
            hsm
        })
    }

    /// Whether this process's PKCS#11 module uses this configuration.
    fn is_process_conf(&self) -> bool {
        std::env::var_os("SOFTHSM2_CONF").is_some_and(|c| Path::new(&c) == self.conf)
    }

    /// A new token `label` in this configuration, with the same PINs. Labels must be unique.
    /// In the process that uses this configuration it is created through the loaded module
    /// (`init_token`), so this process sees it; otherwise by `softhsm2-util`.
    pub fn token(&self, label: &str) -> Token<'_> {
        assert!(label.len() <= 32, "token labels have at most 32 bytes");
        let mut labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        assert!(
            !labels.iter().any(|l| l == label),
            "token label {label:?} is already used in {}",
            self.conf.display()
        );
        let before = self.token_dirs();
        if self.is_process_conf() {
            keyward::backend::pkcs11::init_token(
                Path::new(MODULE),
                label,
                &self.so_pin(),
                &self.pin(),
            )
            .unwrap_or_else(|e| panic!("init_token {label}: {e}"));
        } else {
            let (so, user) = (self.so_pin_string(), self.pin_string());
            let mut c = self.command("softhsm2-util");
            c.args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                &so,
                "--pin",
                &user,
            ]);
            let out = run_command(c, None);
            assert!(out.success(), "softhsm2-util --init-token failed:\n{out}");
        }
        let dir = self.new_token_dir(&before);
        labels.push(label.to_string());
        Token {
            hsm: self,
            label: label.to_string(),
            dir,
        }
    }

    /// The token created with this SoftHsm.
    pub fn default_token(&self) -> Token<'_> {
        Token {
            hsm: self,
            label: DEFAULT_LABEL.to_string(),
            dir: self.default_dir.clone(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    pub fn module(&self) -> &Path {
        Path::new(MODULE)
    }

    /// The default token's label.
    pub fn label(&self) -> &str {
        DEFAULT_LABEL
    }

    /// The user PIN file (0600), shared by every token of this SoftHsm.
    pub fn pin_file(&self) -> &Path {
        &self.pin_file
    }

    pub fn so_pin_file(&self) -> &Path {
        &self.so_pin_file
    }

    pub fn pin(&self) -> SecretBytes {
        SecretBytes::new(fs::read(&self.pin_file).expect("reading the user PIN"))
    }

    pub fn so_pin(&self) -> SecretBytes {
        SecretBytes::new(fs::read(&self.so_pin_file).expect("reading the SO PIN"))
    }

    /// The user PIN as text, for tools that only take it as an argument (pkcs11-tool).
    pub fn pin_string(&self) -> String {
        fs::read_to_string(&self.pin_file).expect("reading the user PIN")
    }

    fn so_pin_string(&self) -> String {
        fs::read_to_string(&self.so_pin_file).expect("reading the SO PIN")
    }

    /// keyward's `[pkcs11.<alias>]` for the default token.
    pub fn token_config(&self) -> TokenConfig {
        self.default_token().token_config()
    }

    /// The environment a child process needs to see this SoftHSM.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".into(), self.conf.display().to_string())]
    }

    /// `program` with this SoftHSM's environment set explicitly.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env());
        c
    }

    fn token_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.root.join("tokens"))
            .expect("listing the token dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        v.sort();
        v
    }

    fn new_token_dir(&self, before: &[PathBuf]) -> PathBuf {
        let new: Vec<PathBuf> = self
            .token_dirs()
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect();
        assert_eq!(
            new.len(),
            1,
            "expected one new token directory, got {new:?}"
        );
        new.into_iter().next().expect("one")
    }
}

impl Token<'_> {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn conf_path(&self) -> &Path {
        self.hsm.conf_path()
    }

    pub fn module(&self) -> &Path {
        self.hsm.module()
    }

    pub fn pin_file(&self) -> &Path {
        self.hsm.pin_file()
    }

    pub fn pin(&self) -> SecretBytes {
        self.hsm.pin()
    }

    pub fn hsm(&self) -> &SoftHsm {
        self.hsm
    }

    /// This token's directory under `<dir>/tokens` (SoftHSM names it by a UUID).
    pub fn token_dir(&self) -> &Path {
        &self.dir
    }

    /// `[pkcs11.<alias>]` for this token: `pin = "file:<pin file>"`, default sessions and
    /// timeout (what keyward.toml would give).
    pub fn token_config(&self) -> TokenConfig {
        TokenConfig {
            module: PathBuf::from(MODULE),
            label: Some(self.label.clone()),
            serial: None,
            pin: format!("file:{}", self.hsm.pin_file.display()),
            sessions: 0,
            timeout_ms: 2000,
        }
    }

    /// Run `pkcs11-tool --module M --token-label L <args>` with this SoftHSM's environment.
    /// `login`: add `--login --pin <PIN>` (pkcs11-tool takes the PIN only as an argument).
    pub fn pkcs11_tool(&self, login: bool, args: &[&str]) -> Output {
        let mut c = self.hsm.command("pkcs11-tool");
        c.args(["--module", MODULE, "--token-label", &self.label]);
        if login {
            let pin = self.hsm.pin_string();
            c.args(["--login", "--pin", &pin]);
        }
        c.args(args);
        run_command(c, None)
    }
}

/// Run the test `name` of this test binary in a child process (its own PKCS#11 module state)
/// with `marker` set in its environment; panics with the child's output unless it passed.
/// The test itself checks `std::env::var_os(marker)` to know it is the child.
pub fn run_in_child(name: &str, marker: &str) -> Output {
    let exe = std::env::current_exe().expect("test binary path");
    let mut c = Command::new(exe);
    c.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(marker, "1")
        .env_remove("SOFTHSM2_CONF");
    let out = run_command(c, None);
    assert!(
        out.success() && out.stdout.contains("1 passed"),
        "child test {name} failed:\n{out}"
    );
    out
}
