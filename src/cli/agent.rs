//! `keyward agent`: run the daemon in the foreground, or start it in the background and wait
//! until its socket answers. A prompted passphrase reaches the background process on a pipe.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyward::client::Client;
use keyward::config::Config;
use keyward::home::Home;
use keyward::secret::SecretSource;
use keyward::{Error, Result};
use serde_json::json;

use super::Ctx;
use crate::keyward_agent;

/// How long the background start may take (scrypt unlock + loading keys).
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Stay in the foreground (log to stderr) instead of starting in the background.
    #[arg(long)]
    foreground: bool,
    #[command(flatten)]
    opts: keyward_agent::Options,
}

pub fn run(ctx: &Ctx, a: AgentArgs) -> Result<()> {
    if a.foreground {
        return keyward_agent::run(ctx.home.clone(), a.opts);
    }
    let home = Home::open(ctx.home.as_deref())?;
    let config = Config::load(&home.config_path())?;
    let socket = a.opts.socket_path(&config, &home);
    if Client::connect(&socket).is_ok() {
        return Err(Error::AlreadyExists(format!(
            "an agent is already listening on {}",
            socket.display()
        )));
    }
    // A TPM-sealed identity opens without a passphrase unless a source is named (the same rule
    // as the foreground agent's): then nothing is read here and none is passed on.
    let sealed = keyward::identity::is_sealed(&home)
        && a.opts.passphrase.is_none()
        && config.agent.passphrase.is_none();
    let source = a.opts.passphrase_source(&config)?;
    // Read a prompted, piped or environment passphrase here and hand it over on a pipe: the
    // long-lived agent must not carry it in its environment (/proc/<pid>/environ).
    let piped = match &source {
        _ if sealed => None,
        SecretSource::File(_) => None,
        _ => Some(source.read("identity passphrase")?),
    };

    let log_path = home.root().join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log
        .try_clone()
        .map_err(|e| Error::io("duplicating the log handle", e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the keyward binary", e))?;
    let mut cmd = Command::new(exe);
    if let SecretSource::Env(name) = &source {
        cmd.env_remove(name);
    }
    cmd.arg("--home")
        .arg(home.root())
        .arg("agent")
        .arg("--foreground")
        .arg("--socket")
        .arg(&socket);
    match &source {
        _ if sealed => &mut cmd,
        // Only a file source is passed on as is; everything else arrives on the pipe.
        SecretSource::File(p) => cmd.arg("--passphrase").arg(format!("file:{}", p.display())),
        _ => cmd.arg("--passphrase").arg("stdin"),
    };
    if let Some(f) = &a.opts.log_format {
        cmd.arg("--log-format").arg(f);
    }
    cmd.stdin(if piped.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::from(log))
    .stderr(Stdio::from(log_err))
    // Own process group: a Ctrl-C in this terminal must not stop the agent.
    .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("starting the agent process", e))?;
    if let (Some(pass), Some(mut stdin)) = (piped, child.stdin.take()) {
        stdin
            .write_all(pass.expose())
            .map_err(|e| Error::io("handing the passphrase to the agent", e))?;
    }

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Error::io("waiting for the agent", e))?
        {
            return Err(startup_failure(&log_path, log_start, status.code()));
        }
        if let Ok(mut c) = Client::connect(&socket) {
            let _ = c.set_timeout(Some(Duration::from_secs(5)));
            if let Ok(st) = c.status() {
                let sock = socket.display().to_string();
                ctx.emit(
                    &json!({"pid": st.pid, "socket": sock, "log": log_path.display().to_string(), "keys": st.keys}),
                    || {
                        format!(
                            "agent started (pid {}), {} keys, socket {sock}\n  log: {}\n  export KEYWARD_SOCK={sock}",
                            st.pid,
                            st.keys,
                            log_path.display()
                        )
                    },
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(Error::AgentUnreachable(format!(
                "the agent did not become ready within {}s; see {}",
                START_TIMEOUT.as_secs(),
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Rebuild the agent's own error (its last `error[code]: message` line in the log).
fn startup_failure(log_path: &std::path::Path, from: u64, status: Option<i32>) -> Error {
    let all = std::fs::read(log_path).unwrap_or_default();
    let text = String::from_utf8_lossy(all.get(from as usize..).unwrap_or_default());
    let last = text.lines().rev().find(|l| l.starts_with("error["));
    if let Some(line) = last {
        if let Some((code, msg)) = line
            .strip_prefix("error[")
            .and_then(|r| r.split_once("]: "))
        {
            return Error::from_code(code, msg.to_string(), None);
        }
    }
    Error::Internal(format!(
        "the agent exited (status {status:?}) before it was ready; see {}",
        log_path.display()
    ))
}
