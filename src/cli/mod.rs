//! The `keyward` command tree (clap derive), output formatting and error reporting.
//! One file per command group; every command supports `--json` where a script parses it.

mod admin;
mod agent;
mod audit;
mod bench;
mod bench_audit;
mod client;
mod doctor;
mod identity;
mod init;
mod key;
mod lifecycle;
mod migrate;
mod policy;
mod profile;
mod sign;
mod testenv;
mod token;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use keyward::client::Client;
use keyward::config::Config;
use keyward::home::Home;
use keyward::{Error, Result};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "Signing agent for trading systems: keys stay in the agent, processes ask it to sign",
    propagate_version = true
)]
pub struct Cli {
    /// keyward home directory (default: $KEYWARD_HOME, else ~/.keyward).
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Machine-readable output (JSON on stdout; errors as JSON on stderr).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a home: config, passphrase-protected identity, key directory.
    Init(init::InitArgs),
    /// Seal the identity to a TPM, or check the seal (unattended agent start).
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Start the agent (in the background unless --foreground).
    Agent(agent::AgentArgs),
    /// Show the running agent's state.
    Status,
    /// Check the home, config, keys, devices, host and agent; explain each problem's fix.
    Doctor(doctor::DoctorArgs),
    /// Create, import, list, show, delete keys and export public keys.
    #[command(subcommand)]
    Key(key::KeyCmd),
    /// Sign raw bytes through the agent.
    Sign(sign::SignArgs),
    /// Offline profile signing with a key file (no agent), and the profile names.
    #[command(subcommand)]
    Profile(profile::ProfileCmd),
    /// List or initialise PKCS#11 tokens.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Stop all signing, or one key's (persists across restarts).
    Lock(admin::LockArgs),
    /// Lift a lock.
    Unlock(admin::UnlockArgs),
    /// Make the agent re-read keyward.toml and the keys.
    Reload,
    /// Validate the policy, or explain a decision, offline.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Add a client rule (uid/gid, exe, token) to keyward.toml.
    #[command(subcommand)]
    Client(client::ClientCmd),
    /// Verify, query or follow the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Measure signing throughput and latency through the agent.
    Bench(bench::BenchArgs),
    /// Start or stop a throw-away SoftHSM-backed agent for test suites.
    #[command(subcommand)]
    Testenv(testenv::TestenvCmd),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// What every command gets: the global flags.
pub struct Ctx {
    pub home: Option<PathBuf>,
    pub json: bool,
}

impl Ctx {
    /// The home for commands that need an initialised one.
    pub fn open_home(&self) -> Result<Home> {
        Home::open(self.home.as_deref())
    }

    /// The socket this CLI would use: `$KEYWARD_SOCK`, the home's config, XDG, the home.
    pub fn socket(&self) -> Result<PathBuf> {
        let home = Home::resolve(self.home.as_deref())?;
        let configured = Config::load(&home.config_path())
            .ok()
            .and_then(|c| c.agent.socket);
        Ok(keyward::proto::socket_path(
            configured.as_deref(),
            home.root(),
        ))
    }

    pub fn connect(&self) -> Result<Client> {
        let c = Client::connect(&self.socket()?)?;
        c.set_timeout(Some(Duration::from_secs(30)))?;
        Ok(c)
    }

    /// Print a result: JSON when asked, else the human text.
    pub fn emit(&self, value: &Value, human: impl FnOnce() -> String) {
        let mut out = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            )
        } else {
            writeln!(out, "{}", human())
        };
    }
}

/// Record an admin change the CLI made (key generate, import, rotate, …) in the audit log.
/// The change is already on disk, so a log that cannot be written is reported, not fatal.
pub fn audit_change(ctx: &Ctx, op: &str, key: &str, version: Option<u32>, detail: Option<String>) {
    let result = Home::resolve(ctx.home.as_deref())
        .and_then(|home| keyward::audit::admin(&home, op, Some(key), version, detail));
    if let Err(e) = result {
        let _ = writeln!(
            std::io::stderr(),
            "warning: {op} of `{key}` is done but could not be recorded in the audit log: {e}"
        );
    }
}

/// Ask the running agent (if any) to reload after the key set changed. Never fails the
/// command: the change is on disk either way.
pub fn notify_agent(ctx: &Ctx) -> &'static str {
    let Ok(path) = ctx.socket() else {
        return "agent not running";
    };
    match Client::connect(&path) {
        Ok(mut c) => {
            let _ = c.set_timeout(Some(Duration::from_secs(10)));
            match c.call(&keyward::proto::Op::Reload {}) {
                Ok(_) => "agent reloaded",
                Err(_) => "agent reload failed: run `keyward reload`",
            }
        }
        Err(_) => "agent not running",
    }
}

pub fn is_tty() -> bool {
    std::io::stderr().is_terminal()
}

pub fn main() -> ExitCode {
    // The CLI handles secrets too (init, import): no core dumps, private files. Best effort:
    // a failure here must not stop an operator in an emergency (`keyward lock --all`).
    let _ = keyward::sys::disable_core_dumps();
    keyward::sys::set_private_umask();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A value our types refused (key name, key type, env, ...) is bad input like any other:
        // report it with its stable code. Usage mistakes, --help and --version stay clap's.
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid value");
            let message = first.strip_prefix("error: ").unwrap_or(first).to_string();
            let json = std::env::args().any(|a| a == "--json");
            report(&Error::BadRequest(message), json);
            return ExitCode::from(1);
        }
        Err(e) => e.exit(),
    };
    // `profile sign` is for scripts and always reports errors as JSON.
    let json_errors = cli.json || matches!(cli.command, Command::Profile(_));
    let ctx = Ctx {
        home: cli.home,
        json: cli.json,
    };
    let result = match cli.command {
        Command::Init(a) => init::run(&ctx, a),
        Command::Identity(c) => identity::run(&ctx, c),
        Command::Agent(a) => agent::run(&ctx, a),
        Command::Status => admin::status(&ctx),
        // A failed check is a finding, already printed: exit 1 without an error line.
        Command::Doctor(a) => match doctor::run(&ctx, a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Key(k) => key::run(&ctx, k),
        // A broken chain is a finding, already printed: exit 1 without an error line.
        Command::Audit(a) => match audit::run(&ctx, a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Sign(a) => sign::run(&ctx, a),
        Command::Profile(p) => profile::run(&ctx, p),
        Command::Token(t) => token::run(&ctx, t),
        Command::Lock(a) => admin::lock(&ctx, a),
        Command::Unlock(a) => admin::unlock(&ctx, a),
        Command::Reload => admin::reload(&ctx),
        Command::Policy(p) => policy::run(&ctx, p),
        Command::Client(c) => client::run(&ctx, c),
        Command::Bench(a) => match Home::resolve(ctx.home.as_deref()) {
            Ok(home) => bench::run(&a, &home, ctx.json),
            Err(e) => Err(e),
        },
        Command::Testenv(t) => testenv::run(&ctx, t),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "keyward",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e, json_errors);
            ExitCode::from(1)
        }
    }
}

fn report(e: &Error, json: bool) {
    let mut err = std::io::stderr().lock();
    if json {
        let v = serde_json::json!({"error": {"code": e.code(), "message": e.to_string(), "hint": e.hint()}});
        let _ = writeln!(err, "{v}");
    } else {
        let _ = writeln!(err, "error[{}]: {e}\n  hint: {}", e.code(), e.hint());
    }
}

/// Read a whole input (`-` = stdin) up to `limit` bytes, as non-secret data.
pub fn read_input(path: &Path, limit: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    let r: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?,
        )
    };
    r.take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("reading input", e))?;
    if buf.len() > limit {
        return Err(Error::BadRequest(format!(
            "input is larger than {limit} bytes"
        )));
    }
    Ok(buf)
}
